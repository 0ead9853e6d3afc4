"""infra/ and prefect.yaml parse, and reference only variables, files and names that exist.

No Docker engine or cluster runs here: these checks catch what breaks `docker compose up`,
`docker build`, `helm install` or `prefect deploy` before anyone tries them.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
COMPOSE = INFRA / "docker-compose.yml"
PLACEHOLDER = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-[^}]*)?\}")
JINJA = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def env_example() -> dict[str, str]:
    pairs = {}
    for line in (INFRA / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text()))


def yaml_docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


@pytest.mark.parametrize(
    "path",
    sorted([*INFRA.rglob("*.yml"), *INFRA.rglob("*.yaml"), REPO / "prefect.yaml"]),
    ids=lambda p: str(p.relative_to(REPO)),
)
def test_yaml_files_parse(path: Path) -> None:
    assert yaml_docs(path)


def test_every_compose_variable_is_in_env_example() -> None:
    used = set(PLACEHOLDER.findall(json.dumps(compose())))  # comments excluded
    documented = env_example()
    assert used, "compose uses no variables?"
    assert sorted(used - set(documented)) == []
    assert sorted(set(documented) - used) == [], "unused entries in .env.example"


def test_compose_services_build_from_files_that_exist_and_pin_images() -> None:
    config = compose()
    for name, service in config["services"].items():
        build = service.get("build")
        if build:
            context = (COMPOSE.parent / build["context"]).resolve()
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name
        image = service.get("image", "")
        assert image or build, f"{name}: neither image nor build"
        if image and not build and "${" not in image:
            assert ":" in image and not image.endswith(":latest"), f"{name}: pin {image}"
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (COMPOSE.parent / source).exists(), f"{name}: {source}"
            else:
                assert source in config["volumes"], f"{name}: undeclared volume {source}"
        for dep in service.get("depends_on", {}):
            assert dep in config["services"], f"{name} depends on unknown {dep}"


def test_compose_has_the_whole_stack_and_a_gpu_worker() -> None:
    services = compose()["services"]
    assert {"prefect-server", "prefect-db", "mlflow", "mlflow-db", "minio"} <= set(services)
    gpu = services["gpu-worker"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "--pool" in gpu["command"] and "gpu" in gpu["command"]
    assert "cpu" in services["cpu-worker"]["command"]
    assert (
        "postgresql"
        in services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    )


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_copy_sources_exist_and_base_is_pinned() -> None:
    instructions = dockerfile_instructions(INFRA / "Dockerfile")
    froms = [rest for op, rest in instructions if op == "FROM"]
    assert froms and all(":" in f and not f.endswith(":latest") for f in froms)
    copies = [shlex.split(rest) for op, rest in instructions if op == "COPY"]
    assert copies
    for args in copies:
        sources = [a for a in args[:-1] if not a.startswith("--")]
        for source in sources:  # the build context is the repository root
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    entry = (INFRA / "docker/entrypoint.sh").stat().st_mode
    assert entry & 0o111, "entrypoint.sh must be executable"


def job_template(pool: str) -> dict[str, Any]:
    return dict(json.loads((INFRA / f"k8s/{pool}-job-template.json").read_text()))


@pytest.mark.parametrize("pool", ["cpu", "gpu"])
def test_job_template_placeholders_are_declared_variables(pool: str) -> None:
    template = job_template(pool)
    used = set(JINJA.findall(json.dumps(template["job_configuration"])))
    declared = set(template["variables"]["properties"])
    assert used <= declared, used - declared


def test_gpu_template_requests_a_gpu_and_mounts_the_workspace() -> None:
    spec = job_template("gpu")["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert container["volumeMounts"][0]["mountPath"] == "/workspace"


def prefect_yaml() -> dict[str, Any]:
    return dict(yaml.safe_load((REPO / "prefect.yaml").read_text()))


def defined_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}


def test_prefect_yaml_entrypoints_pools_and_job_variables() -> None:
    config = prefect_yaml()
    workdir = config["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"]
    assert workdir.startswith("/workspace/")  # the volume every pool mounts
    for item in config["deployments"]:
        file, _, func = item["entrypoint"].partition(":")
        assert func in defined_functions(REPO / file), item["entrypoint"]
        pool = item["work_pool"]["name"]
        assert pool in {"cpu", "gpu"}
        variables = set(job_template(pool)["variables"]["properties"])
        assert set(item["work_pool"].get("job_variables", {})) <= variables, item["name"]
    by_name = {d["name"]: d for d in config["deployments"]}
    assert by_name["nightly"]["schedules"][0]["cron"] == "0 3 * * *"
    assert by_name["gpu-train"]["work_pool"]["job_variables"]["gpu_count"] == 1


def test_env_contract_is_documented() -> None:
    doc = (REPO / "docs/deploy.md").read_text()
    contract = {
        "MLFLOW_TRACKING_URI",
        "MLFLOW_S3_ENDPOINT_URL",
        "AWS_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "PREFECT_API_URL",
        "TRACETUNE_DVC_REMOTE",
        *env_example(),
    }
    contract |= set(re.findall(r"\{\{ \$([A-Z_]+) \}\}", (REPO / "prefect.yaml").read_text()))
    missing = sorted(v for v in contract if v not in doc)
    assert missing == []


@pytest.mark.parametrize("path", sorted((INFRA / "k8s").glob("*.yaml")), ids=lambda p: p.name)
def test_k8s_files_are_manifests_or_worker_values(path: Path) -> None:
    for doc in yaml_docs(path):
        if "worker" in doc:  # Helm values of prefect/prefect-worker
            config = doc["worker"]["config"]
            assert config["workPool"] in {"cpu", "gpu"} and config["type"] == "kubernetes"
            name = config["baseJobTemplate"]["existingConfigMapName"]
            assert f"tracetune-{config['workPool']}-job-template" == name
            assert f"infra/k8s/{config['workPool']}-job-template.json" in path.read_text()
        else:
            assert {"apiVersion", "kind", "metadata"} <= set(doc), path.name
            assert doc["metadata"]["name"]
