"""What a reviewer sees after a run: the Prefect and MLflow web UIs, read in a real browser.

The API can hold an artifact or a run that no page shows (a markdown table that does not render,
a run the default view hides); only the rendered page says what a person will find. So: a real
Prefect server and a real MLflow server on loopback ports, the retrain flow (tiny params, the
gate relaxed so that registration runs) against the Prefect server, and both UIs opened in
headless Chromium through Playwright, driving the system's Chromium (Debian's `chromium`
package; Playwright downloads no browser). The assertions are on visible text, compared with
what the run wrote (metrics/eval_*.json, metrics/register.json, the MLflow store):

- Prefect: the flow run page lists the `eval-comparison` artifact, whose page renders the table
  with a `tsr` column and one row per evaluated model and baseline; the gate verdict shows as the
  `gate-verdict` artifact when the flow publishes one, else as the register task's log line.
- MLflow: the experiment's runs page lists the evaluate runs (or the pipeline run they are
  nested under), and the compare view shows each of them with its TSR metric.

Screenshots of every page go to a temporary folder, or to $TRACETUNE_UI_SCREENSHOTS when set;
the test prints where. Skipped, with the reason, without Playwright or a Chromium binary
(docs/ui.md). Slow: the flow alone takes minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from flow_support import tiny_repo
from test_flow_e2e import PASSABLE

pytestmark = pytest.mark.slow

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
SCREENSHOTS_ENV = "TRACETUNE_UI_SCREENSHOTS"
PAGE_TIMEOUT_MS = 90_000  # a SPA's first render on a loaded 2-core machine
SERVER_START_S = 240
FLOW_TIMEOUT_S = 1800

# Runs the flow in its own process, so that PREFECT_API_URL points at the test's server without
# touching this process's Prefect settings (other modules use prefect_test_harness).
FLOW_SCRIPT = """
import json, sys
from flows.retrain import retrain
state = retrain(repo=sys.argv[1], approval="none", return_state=True)
print("FLOW_RUN " + json.dumps({"id": str(state.state_details.flow_run_id), "state": state.name}))
"""


def find_chromium() -> str | None:
    """$TRACETUNE_CHROMIUM, else the first Chromium-family binary on PATH."""
    explicit = os.environ.get("TRACETUNE_CHROMIUM")
    if explicit:
        return explicit
    return next(filter(None, (shutil.which(n) for n in CHROMIUM_NAMES)), None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log_tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


def wait_healthy(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    """Poll `url` until it answers 200; fail with the server's log if it dies or never does."""
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args!r} exited {proc.returncode}:\n{log_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    pytest.fail(f"{url} not healthy after {SERVER_START_S} s:\n{log_tail(log)}")


def die_with_parent() -> None:
    """Linux: the child gets SIGTERM when pytest dies without running its teardown (killed by
    a timeout or by hand), instead of living on as an orphaned server."""
    with suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@contextmanager
def serving(argv: list[str], env: dict[str, str], health: str, log: Path) -> Iterator[None]:
    """A server process (its own process group: Prefect starts uvicorn as a child) for the
    duration of the block, stopped with SIGTERM, then SIGKILL."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
    try:
        wait_healthy(proc, health, log)
        yield
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=20)
                break
            except subprocess.TimeoutExpired:
                continue


def api_post(api: str, path: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(
        f"{api}{path}", data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)


def api_get(api: str, path: str) -> Any:
    with urllib.request.urlopen(f"{api}{path}", timeout=30) as resp:
        return json.load(resp)


@dataclass(frozen=True)
class PrefectRun:
    ui: str  # the UI's root URL; the API is under /api
    flow_run_id: str
    root: Path  # the workspace the flow ran in

    @property
    def api(self) -> str:
        return f"{self.ui}/api"


@pytest.fixture(scope="module")
def chromium() -> str:
    """The browser binary; skips the module (before any server starts) when it cannot run."""
    pytest.importorskip(
        "playwright.sync_api",
        reason="Playwright is not installed: pip install -c requirements/constraints.txt "
        "'.[dev]' (docs/ui.md)",
    )
    found = find_chromium()
    if found and not Path(found).exists():
        pytest.skip(f"TRACETUNE_CHROMIUM={found} does not exist")
    if not found:
        pytest.skip(
            "no Chromium binary found (apt-get install chromium, or set TRACETUNE_CHROMIUM to "
            f"a Chromium/Chrome executable; looked for {', '.join(CHROMIUM_NAMES)} on PATH)"
        )
    return found


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wanted = os.environ.get(SCREENSHOTS_ENV)
    folder = Path(wanted) if wanted else tmp_path_factory.mktemp("ui-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    print(f"UI screenshots: {folder}")
    return folder


@pytest.fixture(scope="module")
def prefect_run(chromium: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectRun]:
    """A real `prefect server start` on loopback and one retrain run against it."""
    base = tmp_path_factory.mktemp("ui-prefect")
    root = tiny_repo(base / "repo", PASSABLE)
    port = free_port()
    ui = f"http://127.0.0.1:{port}"
    env = os.environ | {
        "PREFECT_HOME": str(base / "prefect-home"),
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        # The UI's bundle is told where the API is; its default is port 4200.
        "PREFECT_UI_API_URL": f"{ui}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    server = [sys.executable, "-m", "prefect", "server", "start"]
    server += ["--host", "127.0.0.1", "--port", str(port)]
    with serving(server, env, f"{ui}/api/health", base / "prefect-server.log"):
        done = subprocess.run(
            [sys.executable, "-c", FLOW_SCRIPT, str(root)],
            cwd=root,
            env=env | {"PREFECT_API_URL": f"{ui}/api"},
            capture_output=True,
            text=True,
            timeout=FLOW_TIMEOUT_S,
            preexec_fn=die_with_parent,
        )
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("FLOW_RUN ")]
        assert done.returncode == 0 and lines, (done.stdout[-3000:], done.stderr[-3000:])
        ran = json.loads(lines[-1].removeprefix("FLOW_RUN "))
        assert ran["state"] == "Completed", (ran, done.stdout[-3000:])
        yield PrefectRun(ui, ran["id"], root)


@pytest.fixture(scope="module")
def mlflow_ui(prefect_run: PrefectRun, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` on loopback over the run's own SQLite store."""
    db = prefect_run.root / "mlflow.db"
    assert db.is_file(), "the flow wrote no MLflow store"
    port = free_port()
    argv = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}"]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = os.environ | {"MLFLOW_ENABLE_TELEMETRY": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = tmp_path_factory.mktemp("ui-mlflow") / "mlflow-server.log"
    with serving(argv, env, f"http://127.0.0.1:{port}/health", log):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def page(chromium: str) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    # Chromium's sandbox refuses to start as root (CI containers).
    args = ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=args)
        tab = browser.new_page(viewport={"width": 1400, "height": 1000})
        tab.set_default_timeout(PAGE_TIMEOUT_MS)
        yield tab
        browser.close()


@contextmanager
def shot(page: Any, folder: Path, name: str) -> Iterator[None]:
    """Screenshot the page when the block ends, passed or failed (the failure is the one to see)."""
    try:
        yield
    except BaseException:
        page.screenshot(path=str(folder / f"{name}-FAILED.png"), full_page=True)
        raise
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


def visible(page: Any, text: str, exact: bool = False) -> None:
    """Wait until `text` is rendered and visible (the SPAs fetch after the first paint)."""
    page.get_by_text(text, exact=exact).first.wait_for(state="visible")


# --- expected values, from what the run wrote --------------------------------------------------


def evaluated_arms(metrics: Path) -> set[str]:
    """The comparison's rows: each evaluated model, then each baseline arm the files carry."""
    names: set[str] = set()
    for path in metrics.glob("eval_*.json"):
        payload = json.loads(path.read_text())
        names.add(path.stem.removeprefix("eval_"))
        names |= {
            k for k, v in payload.items() if k.startswith("baseline_") and isinstance(v, dict)
        }
    return names


def open_flow_run_artifact(page: Any, run: PrefectRun, name: str, key: str) -> None:
    """The flow run page, its Artifacts tab, then the artifact's card: as a person clicks."""
    page.goto(f"{run.ui}/runs/flow-run/{run.flow_run_id}")
    visible(page, name, exact=True)
    page.get_by_text("Artifacts", exact=True).first.click()
    card = page.get_by_text(key, exact=True).first
    card.wait_for(state="visible")
    card.click()
    page.wait_for_url(f"{run.ui}/artifacts/artifact/**")


# --- Prefect -----------------------------------------------------------------------------------


def test_prefect_ui_shows_the_comparison_table_and_the_gate_verdict(
    prefect_run: PrefectRun, page: Any, screenshots: Path
) -> None:
    run = prefect_run
    metrics = run.root / "metrics"
    arms = evaluated_arms(metrics)
    assert {"base", "sft"} <= arms, sorted(arms)  # the tiny run evaluated models
    name = api_get(run.api, f"/flow_runs/{run.flow_run_id}")["name"]

    with shot(page, screenshots, "prefect-1-flow-run"):
        page.goto(f"{run.ui}/runs/flow-run/{run.flow_run_id}")
        visible(page, name, exact=True)
        visible(page, "Completed", exact=True)
        page.get_by_text("Artifacts", exact=True).first.click()
        visible(page, "eval-comparison", exact=True)

    with shot(page, screenshots, "prefect-2-eval-comparison"):
        open_flow_run_artifact(page, run, name, "eval-comparison")
        table = page.locator("table").first
        table.wait_for(state="visible")
        headers = [h.strip() for h in table.locator("th").all_inner_texts()]
        assert "tsr" in headers, headers
        rows = {c.strip() for c in table.locator("tbody tr td:first-child").all_inner_texts()}
        assert rows == arms, (rows, arms)

    registered = json.loads((metrics / "register.json").read_text())
    version, verdict = registered["version"], registered["verdict"]
    flt = {"artifacts": {"flow_run_id": {"any_": [run.flow_run_id]}}}
    keys = {a["key"] for a in api_post(run.api, "/artifacts/filter", flt)}
    if "gate-verdict" in keys:  # the flow publishes the verdict as an artifact
        with shot(page, screenshots, "prefect-3-gate-verdict"):
            open_flow_run_artifact(page, run, name, "gate-verdict")
            visible(page, f"{registered['model']} v{version}")
            word = "passed" if verdict == "passed" else "refused"
            body = page.locator("body").inner_text().lower()
            assert word in body, body[:2000]
    else:  # before that: the register stage's own line in its task's log
        flt = {"flow_runs": {"id": {"any_": [run.flow_run_id]}}}
        tasks = api_post(run.api, "/task_runs/filter", flt)
        register = next(t for t in tasks if t["name"] == "register")
        line = f"{registered['model']} v{version} ({registered['candidate']}): gate {verdict}"
        with shot(page, screenshots, "prefect-3-register-log"):
            page.goto(f"{run.ui}/runs/task-run/{register['id']}")
            visible(page, line)


# --- MLflow ------------------------------------------------------------------------------------


def tsr_metric(metrics: dict[str, float]) -> str:
    """The run's own TSR key: `tsr`, or the evaluated arm's `candidate.tsr`."""
    for key in ("tsr", "candidate.tsr"):
        if key in metrics:
            return key
    raise AssertionError(f"no TSR metric among {sorted(metrics)[:20]}")


# The compare view's metric table is two virtualized grids (names, values) scrolled together;
# a row's cells share its `top` offset, and only rows near the viewport are rendered.
GRIDS = "() => [...document.querySelectorAll('.ReactVirtualized__Grid')]"
ROW_TOP = f"""(key) => {{
  const [names, values] = ({GRIDS})();
  const label = [...names.querySelectorAll('[style]')]
    .find(e => e.style.top && e.innerText.trim() === key);
  return [label ? parseFloat(label.style.top) : null, values.scrollTop, values.clientHeight];
}}"""
ROW_CELLS = f"""(key) => {{
  const [names, values] = ({GRIDS})();
  const label = [...names.querySelectorAll('[style]')]
    .find(e => e.style.top && e.innerText.trim() === key);
  if (!label) return null;
  return [...values.querySelectorAll('[style]')]
    .filter(e => e.style.top === label.style.top)
    .sort((a, b) => parseFloat(a.style.left) - parseFloat(b.style.left))
    .map(e => e.innerText.trim());
}}"""
WHEEL_PX, WHEEL_PAUSE_MS = 90, 300


def compare_row(page: Any, key: str) -> list[str]:
    """The values of metric `key` in the compare view, one per run: scrolls the metric table
    with the mouse wheel, as a person would, until the row is on screen."""
    values = page.locator(".ReactVirtualized__Grid").nth(1)
    values.wait_for(state="visible")
    for _ in range(400):
        top, scrolled, height = page.evaluate(ROW_TOP, key)
        if top is not None and scrolled <= top <= scrolled + height - 45:
            break
        values.hover()
        page.mouse.wheel(0, WHEEL_PX)
        # MLflow 3.17's names column follows the values one wheel event late: pause per step
        page.wait_for_timeout(WHEEL_PAUSE_MS)
    else:
        raise AssertionError(f"the compare view has no row {key!r}")
    # ...and a last nudge there and back brings the names column level for the screenshot.
    page.mouse.wheel(0, 1)
    page.wait_for_timeout(WHEEL_PAUSE_MS)
    page.mouse.wheel(0, -1)
    page.wait_for_timeout(WHEEL_PAUSE_MS)
    cells = page.evaluate(ROW_CELLS, key)
    assert cells, f"the compare view renders no values for {key!r}"
    return [str(c) for c in cells]


def test_mlflow_ui_lists_the_evaluate_runs_and_compares_their_tsr(
    prefect_run: PrefectRun, mlflow_ui: str, page: Any, screenshots: Path
) -> None:
    from mlflow import MlflowClient

    from tracetune.config import load_params

    root = prefect_run.root
    experiment_name = load_params(root / "params.yaml").tracking.experiment
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(experiment_name)
    assert experiment is not None, experiment_name
    runs = client.search_runs([experiment.experiment_id])
    by_id = {r.info.run_id: r for r in runs}
    evaluate = sorted(
        (r for r in runs if r.info.run_name.startswith("evaluate_")), key=lambda r: r.info.run_name
    )
    evaluated = {p.stem.removeprefix("eval_") for p in (root / "metrics").glob("eval_*.json")}
    assert {r.info.run_name.removeprefix("evaluate_") for r in evaluate} == evaluated

    # The runs page shows top-level runs; a stage run nested under its pipeline's parent run
    # shows as that parent until expanded.
    def listed_as(run: Any) -> str:
        parent = run.data.tags.get("mlflow.parentRunId")
        return str(by_id[parent].info.run_name if parent in by_id else run.info.run_name)

    with shot(page, screenshots, "mlflow-1-runs"):
        page.goto(f"{mlflow_ui}/#/experiments/{experiment.experiment_id}/runs")
        visible(page, experiment_name, exact=True)
        for listed in sorted({listed_as(r) for r in evaluate}):
            visible(page, listed, exact=True)

    ids = quote(json.dumps([r.info.run_id for r in evaluate]))
    experiments = quote(json.dumps([experiment.experiment_id]))
    with shot(page, screenshots, "mlflow-2-compare"):
        page.goto(f"{mlflow_ui}/#/compare-runs?runs={ids}&experiments={experiments}")
        visible(page, f"Comparing {len(evaluate)} Runs")
        for run in evaluate:
            visible(page, run.info.run_name, exact=True)
    with shot(page, screenshots, "mlflow-3-compare-tsr"):
        key = tsr_metric(evaluate[0].data.metrics)
        cells = compare_row(page, key)
        shown = [float(c) for c in cells]  # one value per run, in the runs' order
        assert shown == pytest.approx([r.data.metrics[key] for r in evaluate], abs=1e-3), cells
