"""Stage `simulate`: write the embedded default's production logs (a noisy prompt-only agent)."""

from __future__ import annotations

import shutil
import time
from typing import Any

from tasks._common import stage_params, write_json
from tracetune.config import Params
from tracetune.environments.base import draw_tasks, load_environment
from tracetune.trajectories.simulator import write_logs


def run(params: Params, clean: bool = True) -> dict[str, Any]:
    env_params = params.environment
    # Production agents are not capped at our evaluation step limit: runaway logs must exist.
    env = load_environment(env_params.class_path, max_steps=60, **env_params.kwargs)
    # No oracle, nothing to simulate: say so before the previous batch is cleaned away.
    env.require_oracle(draw_tasks(env, 1, params.simulate.seed)[0]).close()
    out = params.paths.raw_logs
    if clean and out.exists():
        shutil.rmtree(out)
    started = time.perf_counter()
    summary = write_logs(env, params.simulate, out).as_dict()
    summary["seconds"] = round(time.perf_counter() - started, 2)
    write_json(params.paths.metrics / "simulate.json", summary)
    return summary


def main(argv: list[str] | None = None) -> None:
    from tracetune.reporting import simulation_lines

    print("\n".join(simulation_lines(run(stage_params(argv)))))


if __name__ == "__main__":
    main()
