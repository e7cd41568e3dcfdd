"""Read a dataset's MRHP tables once per process (per command), not once per stage.

`mrhp extract` and `mrhp status` plan four stages (rois, tokens, embeddings, probes); each read
the whole dataset through `pipeline.datasets.mrhp.load_dataset`. Here the records are kept per
dataset spec and reused while the raw tables are unchanged: every call re-stats the files under
`raw_root` (size, mtime_ns, inode, ctime_ns: tens of files) and reads again on any change, so a
long-lived process (a Dask worker, a notebook) never serves stale records.

Callers treat the records as read-only (they are shared).
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

_MAX = 2  # datasets kept (the records of amazon-home are a few hundred MB)
_lock = threading.Lock()
_cache: OrderedDict[str, tuple[tuple, Any]] = OrderedDict()
loads = 0  # how many times the tables were actually read (tests and benches look at it)


def _signature(raw_root: Path) -> tuple:
    out = []
    for dirpath, dirnames, filenames in os.walk(raw_root):
        dirnames.sort()
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            try:
                st = os.stat(p)
            except OSError:
                continue
            out.append((os.path.relpath(p, raw_root), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns))
    return tuple(out)


def load_dataset_once(spec: Any) -> Any:
    """`load_dataset(spec)`, read once per process while the files under spec.raw_root are unchanged."""
    global loads
    from pipeline.datasets.mrhp import load_dataset

    key = repr(spec)
    with _lock:  # stages planned from several threads wait for one read
        sig = _signature(Path(spec.raw_root))
        hit = _cache.get(key)
        if hit is not None and hit[0] == sig:
            _cache.move_to_end(key)
            return hit[1]
        records = load_dataset(spec)
        loads += 1
        _cache[key] = (sig, records)
        _cache.move_to_end(key)
        while len(_cache) > _MAX:
            _cache.popitem(last=False)
        return records


def clear() -> None:
    with _lock:
        _cache.clear()
