"""Figures for docs/benchmarks.md ("usability" section): how long `mrhp --help` takes, and how
large best.pt / last.pt are for an MCL model now that best.pt leaves out the optimizer state.

    PYTHONPATH=. python bench/cli_and_checkpoints.py [--before /work/main] [--repeat 3]

`--before PATH`: also time `--help` of another checkout (e.g. the main branch before the change).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def time_help(checkout: Path, repeat: int) -> tuple[float, bool]:
    """Median wall seconds of `python -m mrhp --help` in `checkout`, and whether torch got imported."""
    probe = ("import sys, contextlib, io\nfrom mrhp.cli import main\n"
             "with contextlib.redirect_stdout(io.StringIO()):\n"
             "    try:\n        main(['--help'])\n    except SystemExit:\n        pass\n"
             "print('torch' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    times, torch_loaded = [], False
    for _ in range(repeat):
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", probe], cwd=checkout, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - t)
        torch_loaded = r.stdout.strip().endswith("True")
        if r.returncode != 0:
            raise SystemExit(r.stderr)
    return statistics.median(times), torch_loaded


def checkpoint_sizes(vocab: int) -> dict[str, float]:
    import numpy as np
    import torch

    from models.registry import build_model
    from models.runs import save_checkpoint
    from models.trainer import trainable_parameters

    rng = np.random.default_rng(0)
    emb = {k: rng.standard_normal((vocab, 300)).astype(np.float32) for k in ("prd", "rvw")}
    model = build_model("mcl", {}, emb)
    params = trainable_parameters(model)
    opt = torch.optim.Adam(params, lr=1e-4)
    for p in params:  # one step: Adam's two moment buffers per trainable parameter
        p.grad = torch.zeros_like(p)
    opt.step()
    out = {"trainable_M": sum(p.numel() for p in params) / 1e6,
           "all_M": sum(p.numel() for p in model.parameters()) / 1e6}
    with tempfile.TemporaryDirectory() as d:
        best, last = Path(d) / "best.pt", Path(d) / "last.pt"
        save_checkpoint(best, {"model": model.state_dict(), "optimizer": {}, "scheduler": {}})
        save_checkpoint(last, {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": {}})
        out["best_MB"] = best.stat().st_size / 2**20
        out["last_MB"] = last.stat().st_size / 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--before", default=None, help="another checkout whose `--help` to time too")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=20000, help="rows of each embedding table (default 20000)")
    a = ap.parse_args()
    secs, torch_loaded = time_help(ROOT, a.repeat)
    print(f"mrhp --help (this checkout): {secs:.2f} s median of {a.repeat}; torch imported: {torch_loaded}")
    if a.before:
        secs, torch_loaded = time_help(Path(a.before), a.repeat)
        print(f"mrhp --help ({a.before}): {secs:.2f} s median of {a.repeat}; torch imported: {torch_loaded}")
    s = checkpoint_sizes(a.vocab)
    print(f"MCL (paper defaults, 2 x {a.vocab} x 300 embeddings frozen): {s['trainable_M']:.2f} M trainable of "
          f"{s['all_M']:.2f} M parameters; best.pt {s['best_MB']:.1f} MB (no optimizer state), "
          f"last.pt {s['last_MB']:.1f} MB (with Adam moments, for --resume)")


if __name__ == "__main__":
    main()
