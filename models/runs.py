"""Run folders: layout, checkpoints (safe to load), the metrics log and the PNG plots.

```
runs/<name>/[seed<k>/]
  config.yaml        the TrainConfig of the run, every field resolved (preset, model_cfg)
  run.json           dataset, category, model, preset, resolved model config, threshold, status,
                     best epoch, git commit + dirty flag, package versions, start/end times,
                     the fingerprint of every store view of the dataset (random-init flagged),
                     reviews the reader dropped (`dropped_reviews`) and, per split, reviews
                     whose probe mask fell back to ones (`probe_fallback`)
  metrics.jsonl      one JSON object per epoch ({"event": "epoch", ...}) and per evaluation
  checkpoints/       last.pt (model, optimizer, scheduler, RNG states: for --resume) and
                     best.pt (the same without optimizer and scheduler state)
  tensorboard/       SummaryWriter logs
  plots/             loss.png and dev.png, drawn once when the run ends (none for a model
                     without trainable parameters)
  data.json          what `mrhp predict` needs (written by `train_seeds`): dataset, manifest,
                     vocabulary fingerprint, threshold, how rel labels were read, and
                     `read_views`: {stage: {"dataset", "fingerprint"}} of every store view the
                     run read (predict refuses features built with other stage settings)
  eval_<split>.json  metrics and per-product metrics written by `mrhp evaluate`
runs/<name>/plots/   loss.png and dev.png: mean with a +-1 std band across the seeds
```
Checkpoints hold only tensors, numbers, strings, lists and dicts, so they load with
`torch.load(weights_only=True)`; the numpy Generator state is stored as a JSON string.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.config import short_repr
from pipeline.errors import TrainingError
from pipeline.stage import RANDOM_INIT_PREFIX, is_random_init

# Packages whose versions every run records (those installed).
RECORDED_PACKAGES: tuple[str, ...] = (
    "torch", "numpy", "scipy", "h5py", "prefect", "transformers", "torchvision", "detectron2",
    "spacy", "pyyaml", "matplotlib",
)
# Stages whose views of the dataset a training run reads (when present in the store).
READ_STAGES: tuple[str, ...] = ("tokens", "embeddings", "rois", "probes", "bert")


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def meta(self) -> Path:
        return self.root / "run.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.pt"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    def eval_file(self, split: str) -> Path:
        return self.root / f"eval_{split}.json"

    def make(self) -> RunPaths:
        for d in (self.root, self.checkpoints, self.tensorboard, self.plots):
            d.mkdir(parents=True, exist_ok=True)
        return self


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrainingError(f"{path}: not found (is this a run folder?)") from None
    except json.JSONDecodeError as e:
        raise TrainingError(f"{path}: not valid JSON ({e})") from None


def save_checkpoint(path: Path, state: Mapping[str, Any]) -> None:
    """torch.save to a temporary name, fsync, then rename: a crash never leaves half a file."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(dict(state), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint without unpickling code (weights_only=True)."""
    import torch

    if not path.is_file():
        raise TrainingError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file or an object weights_only refuses
        raise TrainingError(f"{path}: cannot load checkpoint safely ({type(e).__name__}: {e})") from None


def append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=False) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise TrainingError(f"{path}:{i}: not valid JSON ({e})") from None
    return out


def truncate_metrics(path: Path, last_epoch: int) -> None:
    """Keep the epoch records up to `last_epoch` (used when a run resumes)."""
    keep = [r for r in read_jsonl(path) if r.get("event") == "epoch" and r.get("epoch", 0) <= last_epoch]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
    os.replace(tmp, path)


def _epoch_records(path: Path) -> list[dict[str, Any]]:
    return [r for r in read_jsonl(path) if r.get("event") == "epoch"]


def _loss_series(epochs: list[dict[str, Any]]) -> dict[str, list[float | None]]:
    """Loss curves of a run: total, ranking and every auxiliary loss, one value per epoch."""
    series: dict[str, list[float | None]] = {"total": [r.get("train_loss") for r in epochs]}
    if any("rank_loss" in r for r in epochs):
        series["ranking"] = [r.get("rank_loss") for r in epochs]
    aux_names: list[str] = []
    for r in epochs:
        for k in r.get("aux", {}) or {}:
            if k not in aux_names:
                aux_names.append(k)
    for k in aux_names:
        series[k] = [(r.get("aux") or {}).get(k) for r in epochs]
    return series


def _dev_series(epochs: list[dict[str, Any]]) -> tuple[list[int], dict[str, list[float]]]:
    dev = [r for r in epochs if r.get("dev")]
    if not dev:
        return [], {}
    return [r["epoch"] for r in dev], {n: [r["dev"][n] for r in dev] for n in dev[0]["dev"]}


def _figure(title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("epoch")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return plt, fig, ax


def _finish(plt, fig, ax, best_epoch: int | None, out: Path) -> None:
    if best_epoch:
        ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label=f"best epoch {best_epoch}")
    # legend outside the axes, to the right, so it never hides a curve
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, borderaxespad=0.0)
    fig.tight_layout()
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)


def write_plots(paths: RunPaths, *, title: str | None = None, best_epoch: int | None = None) -> list[Path]:
    """loss.png (total, ranking and auxiliary train losses per epoch) and dev.png (dev metrics per
    epoch) from metrics.jsonl, titled `title` (run and seed), a dashed marker at `best_epoch`,
    legend outside the axes. Returns the files written (none without epoch records)."""
    epochs = _epoch_records(paths.metrics)
    if not epochs:
        return []
    title = title or paths.root.name
    paths.plots.mkdir(parents=True, exist_ok=True)
    x = [r["epoch"] for r in epochs]
    written = []
    plt, fig, ax = _figure(f"{title}: train loss")
    for name, ys in _loss_series(epochs).items():
        ax.plot(x, [float("nan") if y is None else y for y in ys], marker="o" if name == "total" else ".", label=name)
    ax.set_ylabel("train loss")
    _finish(plt, fig, ax, best_epoch, paths.plots / "loss.png")
    written.append(paths.plots / "loss.png")
    dx, dev = _dev_series(epochs)
    if dev:
        plt, fig, ax = _figure(f"{title}: dev metrics")
        for name, ys in dev.items():
            ax.plot(dx, ys, marker="o", label=name)
        ax.set_ylabel("dev metric")
        _finish(plt, fig, ax, best_epoch, paths.plots / "dev.png")
        written.append(paths.plots / "dev.png")
    return written


def _mean_band(runs: Sequence[tuple[list[int], list[float | None]]]):
    """Per epoch present in every run: (epochs, mean, std) over the runs."""
    import numpy as np

    common = sorted(set.intersection(*(set(x) for x, _ in runs))) if runs else []
    rows = []
    for x, ys in runs:
        at = dict(zip(x, ys, strict=True))
        rows.append([np.nan if at[e] is None else at[e] for e in common])
    arr = np.asarray(rows, dtype=np.float64)
    return common, np.nanmean(arr, axis=0), np.nanstd(arr, axis=0)


def write_seed_plots(root: Path, seed_paths: Sequence[RunPaths], *, title: str,
                     best_epochs: Sequence[int] = ()) -> list[Path]:
    """`root`/plots/loss.png and dev.png: for every curve, the mean across the seeds with a
    +-1 std band (epochs every seed reached); best epochs of the seeds marked."""
    per = [_epoch_records(p.metrics) for p in seed_paths]
    per = [e for e in per if e]
    if len(per) < 2:
        return []
    out_dir = root / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    n = len(per)
    plt, fig, ax = _figure(f"{title}: train loss, mean ± std over {n} seeds")
    names = list(_loss_series(per[0]))
    for name in names:
        runs = [([r["epoch"] for r in e], _loss_series(e).get(name, [None] * len(e))) for e in per]
        x, m, sd = _mean_band(runs)
        line, = ax.plot(x, m, label=name)
        ax.fill_between(x, m - sd, m + sd, alpha=0.25, color=line.get_color())
    ax.set_ylabel("train loss")
    _mark_best(ax, best_epochs)
    _finish(plt, fig, ax, None, out_dir / "loss.png")
    written.append(out_dir / "loss.png")
    devs = [_dev_series(e) for e in per]
    if all(d[1] for d in devs):
        plt, fig, ax = _figure(f"{title}: dev metrics, mean ± std over {n} seeds")
        for name in devs[0][1]:
            x, m, sd = _mean_band([(dx, d[name]) for dx, d in devs])
            line, = ax.plot(x, m, marker="o", label=name)
            ax.fill_between(x, m - sd, m + sd, alpha=0.25, color=line.get_color())
        ax.set_ylabel("dev metric")
        _mark_best(ax, best_epochs)
        _finish(plt, fig, ax, None, out_dir / "dev.png")
        written.append(out_dir / "dev.png")
    return written


def _mark_best(ax, best_epochs: Sequence[int]) -> None:
    for i, b in enumerate(sorted(set(int(e) for e in best_epochs if e))):
        ax.axvline(b, color="grey", linestyle="--", linewidth=1, label="best epochs" if i == 0 else None)


# ---- provenance recorded in run.json ------------------------------------------------------------

def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def git_state(where: Path | None = None) -> dict[str, Any]:
    """{"commit": sha or None, "dirty": bool or None} of the code's git checkout."""
    where = where or Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True,
                                text=True, timeout=10)
        if commit.returncode != 0:
            return {"commit": None, "dirty": None}
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                                capture_output=True, text=True, timeout=20)
        dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
        return {"commit": commit.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def package_versions(names: Sequence[str] = RECORDED_PACKAGES) -> dict[str, str]:
    """Python and the installed versions of `names` (packages not installed are left out)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            continue
    return out


def view_fingerprints(store_root: str | Path, dataset: str,
                      stages: Sequence[str] = READ_STAGES) -> dict[str, dict[str, Any]]:
    """stage -> {"fingerprint", "items", "random_init"} for every view of `dataset` among
    `stages` present in the store (what a training run reads)."""
    from pipeline.store import FeatureStore

    out: dict[str, dict[str, Any]] = {}
    for v in FeatureStore(Path(store_root)).views():
        if v.dataset == dataset and v.stage in stages:
            out[v.stage] = {"fingerprint": v.fingerprint, "items": int(v.n_items),
                            "random_init": is_random_init(v.fingerprint)}
    return out


def views_read(store_root: str | Path, dataset: str, stages: Collection[str]) -> dict[str, dict[str, str]]:
    """stage -> {"dataset", "fingerprint"} of the views of `dataset` among `stages` that the
    store holds now: the fingerprint `store.view(dataset, stage).fingerprint` gives (read from the
    index's view list, without opening the views). A run writes it to data.json (`read_views`,
    for the stages it read) and `mrhp predict` compares it with the fingerprints of the stages it
    runs (tokens, probes, bert) and of the rois entries it reads: featurising new products with
    other stage settings than training is refused, never silent."""
    from pipeline.store import FeatureStore

    out: dict[str, dict[str, str]] = {}
    for v in FeatureStore(Path(store_root)).views():
        if v.dataset == dataset and v.stage in stages:
            out[v.stage] = {"dataset": dataset, "fingerprint": v.fingerprint}
    return dict(sorted(out.items()))


def short_fp(fp: str, other: str = "") -> str:
    """A fingerprint shortened for a message (a random-init prefix kept): 8 hex digits, all of
    them when the first 8 do not tell it from `other`."""
    prefix = RANDOM_INIT_PREFIX if fp.startswith(RANDOM_INIT_PREFIX) else ""
    body = fp[len(prefix):]
    o = other[len(RANDOM_INIT_PREFIX):] if other.startswith(RANDOM_INIT_PREFIX) else other
    return prefix + (body if body[:8] == o[:8] else body[:8])


def recorded_views(meta: Mapping, where: str) -> dict[str, str] | None:
    """{stage: fingerprint} of the views a run read (data.json `read_views`, written by
    `train_seeds`); None for a run trained before they were recorded. A damaged record is a
    TrainingError naming the file and field."""
    if "read_views" not in meta:
        return None
    rec = meta["read_views"]
    if not isinstance(rec, Mapping):
        raise TrainingError(f"{where}: read_views: expected a mapping stage -> {{dataset, fingerprint}}, "
                            f"got {short_repr(rec)}")
    out: dict[str, str] = {}
    for stage, entry in rec.items():
        fp = entry.get("fingerprint") if isinstance(entry, Mapping) else None
        if not isinstance(fp, str) or not fp:
            raise TrainingError(f"{where}: read_views.{stage}: expected {{dataset, fingerprint}}, "
                                f"got {short_repr(entry)}")
        if entry.get("dataset") not in (None, meta.get("dataset")):
            raise TrainingError(f"{where}: read_views.{stage}: dataset {entry.get('dataset')!r} is not the run's "
                                f"dataset {meta.get('dataset')!r}")
        out[str(stage)] = fp
    return out


def changed_views(recorded: Mapping[str, str | None],
                  now: Mapping[str, str]) -> list[tuple[str, str | None, str | None]]:
    """(stage, recorded fingerprint, the store's now or None when the view is gone) of every stage
    in `recorded` ({stage: fingerprint}, e.g. `recorded_views`) whose view changed since, given the
    store's fingerprints `now`: the one comparison behind `mrhp evaluate`'s refusal and the
    trainer's resume check."""
    return [(s, was, now.get(s)) for s, was in sorted(recorded.items()) if now.get(s) != was]


def run_is_random_init(meta: Mapping[str, Any]) -> bool:
    """Whether a run.json says the run read features built with random-init weights."""
    if meta.get("random_init"):
        return True
    return any(bool(v.get("random_init")) for v in (meta.get("views") or {}).values() if isinstance(v, Mapping))


def seed_dirs(run: Path) -> list[Path]:
    """The run folders under `run`: its seed<k>/ subfolders, or `run` itself if it is one."""
    if (run / "config.yaml").is_file():
        return [run]
    seeds = sorted((p for p in run.glob("seed*") if (p / "config.yaml").is_file()),
                   key=lambda p: int(p.name[4:]) if p.name[4:].isdigit() else 1 << 30)
    if not seeds:
        raise TrainingError(f"{run}: not a run folder (no config.yaml, no seed*/config.yaml)")
    return seeds


def resolve_run(runs_root: Path, run: str) -> Path:
    """A run given as a path (existing folder) or as a name under the manifest's runs root."""
    p = Path(run)
    if p.is_dir():
        return p
    q = Path(runs_root) / run
    if q.is_dir():
        return q
    raise TrainingError(f"run {run!r}: no such folder (looked at {p} and {q})")
