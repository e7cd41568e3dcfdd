"""Run folders: layout, checkpoints (safe to load), the metrics log and the PNG plots.

```
runs/<name>/[seed<k>/]
  config.yaml        the TrainConfig of the run
  run.json           dataset, model, threshold, status, best epoch
  metrics.jsonl      one JSON object per epoch ({"event": "epoch", ...}) and per evaluation
  checkpoints/       best.pt and last.pt (state dicts, optimizer, scheduler, RNG states)
  tensorboard/       SummaryWriter logs
  plots/             loss.png and dev.png
  eval_<split>.json  metrics and per-product metrics written by `mrhp evaluate`
```
Checkpoints hold only tensors, numbers, strings, lists and dicts, so they load with
`torch.load(weights_only=True)`; the numpy Generator state is stored as a JSON string.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import TrainingError


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

    def make(self) -> "RunPaths":
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(dict(state), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint without unpickling code (weights_only=True)."""
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


def write_plots(paths: RunPaths) -> None:
    """loss.png (train loss per epoch) and dev.png (dev metrics per epoch) from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [r for r in read_jsonl(paths.metrics) if r.get("event") == "epoch"]
    if not epochs:
        return
    x = [r["epoch"] for r in epochs]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(x, [r.get("train_loss") for r in epochs], marker="o", label="total")
    if any("rank_loss" in r for r in epochs):
        ax.plot(x, [r.get("rank_loss") for r in epochs], marker=".", label="ranking")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("train loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths.plots / "loss.png", dpi=100)
    plt.close(fig)
    dev = [r for r in epochs if r.get("dev")]
    if dev:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for name in dev[0]["dev"]:
            ax.plot([r["epoch"] for r in dev], [r["dev"][name] for r in dev], marker="o", label=name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("dev metric")
        ax.legend()
        fig.tight_layout()
        fig.savefig(paths.plots / "dev.png", dpi=100)
        plt.close(fig)


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
