"""`mrhp deploy`: register the extraction and training flows as Prefect deployments on a work pool."""
from __future__ import annotations

import argparse
import logging


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "deploy",
        help="create Prefect deployments of the extraction and training flows on a work pool (see docs/gpu_box.md)",
        description=(
            "Create (or update) deployments mrhp-extract/all, mrhp-extract-<stage>/<stage> and "
            "mrhp-train/train on the work pool of the manifest (flows.work_pool; a process pool is "
            "created when missing), with the cron schedule on the whole extraction and a global "
            "concurrency limit <work_pool>-gpu of flows.gpu_concurrency slots held by GPU chunks and "
            "GPU training runs. Training runs on demand: prefect deployment run mrhp-train/train "
            "-p dataset=D -p model=M. Needs a Prefect server: set PREFECT_API_URL."
        ),
    )
    p.add_argument("--cron", help="cron schedule of the whole extraction, e.g. '0 3 * * *' (default: flows.cron)")
    p.add_argument("--work-pool", help="work pool name (default: flows.work_pool)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flows.deploy import TRAIN_DEPLOYMENT, apply_deployments, deploy_spec, require_api_url
    from pipeline.manifest import load_manifest

    require_api_url("deploy")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per API request otherwise
    spec = deploy_spec(load_manifest(args.manifest), work_pool=args.work_pool, cron=args.cron)
    for name in apply_deployments(spec):
        print(f"deployed {name} on work pool {spec.work_pool}")
    print(f"GPU chunks and GPU training runs hold a slot of global concurrency limit {spec.gpu_limit} "
          f"({spec.gpu_concurrency})")
    print(f"start a worker on the GPU box: prefect worker start --pool {spec.work_pool}")
    print(f"train on it: prefect deployment run 'mrhp-train/{TRAIN_DEPLOYMENT}' -p dataset=DATASET -p model=MODEL "
          "[-p seeds=N] [-p overrides='[\"epochs=20\"]']")
    return 0
