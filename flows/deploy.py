"""Deployments of the extraction and training flows for a GPU box.

`build_deployments()` makes one deployment per flow (the whole extraction, one per stage, and
the training flow `mrhp-train/train`, on demand) carrying the manifest path, the manifest's cron
schedule (on the whole extraction only) and the name of the global concurrency limit the GPU
chunks and GPU training runs take a slot of. `apply_deployments()`
registers them on a work pool (creating a `process` pool and the limit when missing);
`serve_deployments()` runs them from this process instead (`mrhp serve`), no worker needed.

Why a global concurrency limit: two flow runs on one box (a scheduled run and a manual rerun)
must not put two ROI chunks on the same GPU. Each ROI chunk holds one slot of the limit
`<work_pool>-gpu` (size `flows.gpu_concurrency`, 1 per GPU) while it computes; within one flow
run the chunks of a process are serialised by a lock as well. A training run (device other than
"cpu") holds one slot of the same limit from start to end, so with one slot per GPU a training
run waits for the ROI/bert chunks of a running extraction and the other way round.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.manifest import Manifest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TRAIN_DEPLOYMENT = "train"  # mrhp-train/train


def gpu_limit_name(work_pool: str) -> str:
    return f"{work_pool}-gpu"


@dataclass(frozen=True)
class DeploySpec:
    """What `mrhp deploy` / `mrhp serve` create."""

    work_pool: str  # Prefect work pool the deployments run on
    cron: str | None  # schedule of the whole extraction (None: run on demand)
    gpu_limit: str  # global concurrency limit name
    gpu_concurrency: int  # its size: concurrent GPU chunks per box
    manifest_path: str  # absolute path passed to every flow run
    on_dask: bool = False  # flows.task_runner is dask: runs fan out on flows.dask_address


def deploy_spec(manifest: Manifest, *, work_pool: str | None = None, cron: str | None = None) -> DeploySpec:
    pool = work_pool or manifest.flows.work_pool
    if not pool:
        raise ConfigError("flows.work_pool: expected a work pool name, got an empty string")
    schedule = cron if cron is not None else manifest.flows.cron
    if schedule is not None:
        _check_cron(schedule)
    if manifest.flows.gpu_concurrency < 1:
        raise ConfigError(f"flows.gpu_concurrency: expected at least 1, got {manifest.flows.gpu_concurrency}")
    return DeploySpec(
        work_pool=pool, cron=schedule or None, gpu_limit=gpu_limit_name(pool),
        gpu_concurrency=manifest.flows.gpu_concurrency, manifest_path=str(manifest.path),
        on_dask=manifest.flows.task_runner == "dask",
    )


def _check_cron(expr: str) -> None:
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=expr)
    except Exception as e:  # pydantic ValidationError: say which value and what was expected
        raise ConfigError(f"cron: {expr!r} is not a valid cron expression (e.g. '0 3 * * *'): {e}") from None


def require_api_url(command: str) -> str:
    """The configured Prefect API; deployments on a temporary server would vanish with it."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise ConfigError(
            f"mrhp {command} needs a running Prefect server: start one (`prefect server start`) and "
            "set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api); see docs/gpu_box.md"
        )
    return str(url)


def build_deployments(spec: DeploySpec, *, for_work_pool: bool = True) -> list[Any]:
    """RunnerDeployment objects of the extraction flows (all, then one per stage) and of the
    training flow (last); nothing is sent to the API."""
    from prefect.deployments.runner import EntrypointType

    from flows.extract import STAGE_FLOWS, extract_flow

    params = {"manifest_path": spec.manifest_path, "gpu_limit": spec.gpu_limit, "progress": False,
              "on_dask": spec.on_dask}
    # Entrypoints by module (`flows.extract.extract_rois`, importable wherever the project is
    # installed), not by a file path relative to the folder `mrhp deploy` ran in; a process
    # worker would otherwise run each flow in an empty temporary folder and fail to find it.
    kw: dict[str, Any] = {"entrypoint_type": EntrypointType.MODULE_PATH}
    if for_work_pool:
        kw.update(work_pool_name=spec.work_pool, job_variables={"working_dir": str(PROJECT_ROOT)})
    out = [extract_flow.to_deployment(
        name="all", cron=spec.cron, parameters=params, tags=["mrhp"],
        description="Every stage of every dataset, recomputing only what changed.", **kw,
    )]
    for name, fl in STAGE_FLOWS.items():
        out.append(fl.to_deployment(
            name=name, parameters=params, tags=["mrhp", f"mrhp-stage:{name}"],
            description=f"The {name} stage (run on demand, e.g. after a data change).", **kw,
        ))
    out.append(build_training_deployment(spec, **kw))
    return out


def build_training_deployment(spec: DeploySpec, **kw: Any) -> Any:
    """The `mrhp-train/train` deployment: on demand, same work pool and GPU limit as extraction.

    Fixed parameters: the manifest path and `gpu_limit` (a GPU run holds a slot of it, as the
    ROI/bert chunks do, so training and GPU extraction never share the GPU at once). Given at run
    time (`prefect deployment run mrhp-train/train -p dataset=D -p model=M ...`): dataset and
    model (required), seeds, name, config (a YAML path on the GPU box), overrides (a JSON list of
    key=value strings), preset, resume, overwrite."""
    from flows.training import train_flow

    return train_flow.to_deployment(
        name=TRAIN_DEPLOYMENT, parameters={"manifest_path": spec.manifest_path, "gpu_limit": spec.gpu_limit},
        tags=["mrhp", "mrhp-train"],
        description="Train a model on a dataset from the store's cached views (mrhp train, scheduled): "
        "-p dataset=D -p model=M [-p seeds=N] [-p overrides='[\"lr=3e-4\"]'].", **kw,
    )


def ensure_gpu_limit(spec: DeploySpec) -> None:
    """Create or resize the global concurrency limit the GPU chunks hold."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(spec.gpu_limit, spec.gpu_concurrency)


def ensure_work_pool(name: str) -> bool:
    """Create a `process` work pool called `name` unless it exists; True when created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
            return True


def apply_deployments(spec: DeploySpec) -> list[str]:
    """Register the deployments on the work pool; returns their full names."""
    ensure_work_pool(spec.work_pool)
    ensure_gpu_limit(spec)
    names = []
    for dep in build_deployments(spec):
        dep.apply(work_pool_name=spec.work_pool)
        names.append(dep.full_name)
    return names


def release_from_work_pool(deployments: list[Any]) -> list[str]:
    """Delete the deployments of the same names that `mrhp deploy` put on a work pool.

    Serving updates a deployment in place but keeps its work pool, so a worker of that pool
    would keep taking the served deployment's runs (and its schedule would run twice). Served
    deployments are recreated at once without a pool; `mrhp deploy` moves them back."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    released = []
    with get_client(sync_client=True) as client:
        for dep in deployments:
            try:
                existing = client.read_deployment_by_name(dep.full_name)
            except ObjectNotFound:
                continue
            if existing.work_pool_name:
                client.delete_deployment(existing.id)
                released.append(dep.full_name)
    return released


def serve_deployments(spec: DeploySpec) -> None:
    """Serve the deployments from this process until interrupted (`mrhp serve`)."""
    from prefect import serve

    ensure_gpu_limit(spec)
    deployments = build_deployments(spec, for_work_pool=False)
    release_from_work_pool(deployments)
    serve(*deployments)
