"""`mrhp serve`: serve the extraction and training deployments from this machine (no work pool or worker)."""
from __future__ import annotations

import argparse
import logging


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve the extraction and training flows from this box until interrupted (see docs/gpu_box.md)",
        description=(
            "Serve deployments mrhp-extract/all (on the cron schedule, if any), "
            "mrhp-extract-<stage>/<stage> and mrhp-train/train from this process; runs are triggered from "
            "the Prefect UI or `prefect deployment run`. Same-named deployments on a work pool (from "
            "`mrhp deploy`) are replaced; `mrhp deploy` puts them back. Needs a Prefect server: set PREFECT_API_URL."
        ),
    )
    p.add_argument("--cron", help="cron schedule of the whole extraction (default: flows.cron)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flows.deploy import deploy_spec, require_api_url, serve_deployments
    from pipeline.manifest import load_manifest

    require_api_url("serve")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per API request otherwise
    serve_deployments(deploy_spec(load_manifest(args.manifest), cron=args.cron))
    return 0
