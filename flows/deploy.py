"""Create the work pools, apply prefect.yaml's deployments, and read them back.

`python -m flows.deploy [--pool-type process|kubernetes] [--json]` against the server in
PREFECT_API_URL. prefect.yaml stays the one place where schedules, pools and job variables are
written; this module only makes sure the pools exist (with the infra/k8s job templates for
Kubernetes) and reports what the server holds, which is what the deployment test checks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

POOL_TEMPLATES = {
    "cpu": "infra/k8s/cpu-job-template.json",
    "gpu": "infra/k8s/gpu-job-template.json",
}


def prefect_argv(*args: str) -> list[str]:
    """The Prefect CLI of this interpreter, never prompting (it runs in scripts and CI)."""
    return [sys.executable, "-m", "prefect", "--no-prompt", *args]


def declared(repo: Path) -> list[dict[str, Any]]:
    """The deployments prefect.yaml declares (name, flow entrypoint, pool, crons)."""
    config = yaml.safe_load((repo / "prefect.yaml").read_text())
    out = []
    for item in config.get("deployments", []):
        out.append(
            {
                "name": item["name"],
                "entrypoint": item["entrypoint"],
                "pool": item["work_pool"]["name"],
                "crons": [s["cron"] for s in item.get("schedules") or [] if "cron" in s],
            }
        )
    return out


def job_template(repo: Path, pool: str, pool_type: str) -> dict[str, Any]:
    """The pool's base job template: ours for Kubernetes (GPU request, workspace PVC, the env
    contract), Prefect's default for process pools (docker compose, tests)."""
    if pool_type == "kubernetes":
        return dict(json.loads((repo / POOL_TEMPLATES[pool]).read_text()))
    from prefect.workers.process import ProcessWorker

    return dict(ProcessWorker.get_default_base_job_template())


async def _ensure_pools(repo: Path, pool_type: str) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    pools = sorted({d["pool"] for d in declared(repo)})
    async with get_client() as client:
        for pool in pools:
            create = WorkPoolCreate(
                name=pool, type=pool_type, base_job_template=job_template(repo, pool, pool_type)
            )
            made = await client.create_work_pool(create, overwrite=True)
            if made.type != pool_type:
                raise RuntimeError(f"work pool {pool!r} exists as {made.type!r}, not {pool_type}")
    return pools


def ensure_pools(repo: Path, pool_type: str) -> list[str]:
    """Create (or update the templates of) every pool prefect.yaml uses; idempotent."""
    return asyncio.run(_ensure_pools(repo, pool_type))


def deploy(repo: Path, pool_type: str) -> None:
    """Create the pools, then `prefect deploy --all` from the repository root."""
    ensure_pools(repo, pool_type)
    subprocess.run(
        prefect_argv("deploy", "--all"), cwd=repo, check=True, capture_output=True, text=True
    )


async def _read(names: list[str]) -> list[dict[str, Any]]:
    from prefect.client.orchestration import get_client

    out = []
    async with get_client() as client:
        pools = {p.name: p.type for p in await client.read_work_pools()}
        for name in names:
            dep = await client.read_deployment_by_name(name)
            out.append(
                {
                    "name": name,
                    "pool": dep.work_pool_name,
                    "pool_type": pools.get(dep.work_pool_name or ""),
                    "crons": [getattr(s.schedule, "cron", None) for s in dep.schedules],
                    "active": [s.active for s in dep.schedules],
                    "job_variables": dep.job_variables,
                    "parameters": dep.parameters,
                    "entrypoint": dep.entrypoint,
                }
            )
    return out


def read_back(repo: Path) -> list[dict[str, Any]]:
    """What the server holds for each deployment prefect.yaml declares (`flow/deployment`)."""
    from prefect.flows import load_flow_from_entrypoint

    names = []
    for item in declared(repo):
        flow: Any = load_flow_from_entrypoint(str(repo / item["entrypoint"]))
        names.append(f"{flow.name}/{item['name']}")
    return asyncio.run(_read(names))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__)
    parser.add_argument("--repo", default=".", help="repository root holding prefect.yaml")
    parser.add_argument("--pool-type", default="process", choices=["process", "kubernetes"])
    parser.add_argument("--json", action="store_true", help="print the read-back as JSON")
    args = parser.parse_args(argv)
    repo = Path(args.repo).resolve()
    deploy(repo, args.pool_type)
    deployments = read_back(repo)
    if args.json:
        print(json.dumps(deployments, indent=2, default=str))
        return
    for d in deployments:
        print(f"{d['name']:<24} pool={d['pool']} ({d['pool_type']}) cron={d['crons']}")


if __name__ == "__main__":
    main()
