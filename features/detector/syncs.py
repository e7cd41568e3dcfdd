"""Count the operations of a call that block the host on a GPU, on any device (CPU included).

On CUDA these stall the Python thread until the GPU catches up (or copy from pageable memory):
- scalar reads: `.item()`, `.tolist()`, `int(t)` (aten `_local_scalar_dense`);
- data-dependent shapes: `nonzero`, boolean-mask indexing, `masked_select`, `unique`;
- tensors made from Python data (`torch.tensor(list, device=...)`): a pageable host-to-device
  copy on CUDA (aten `lift_fresh`);
- device-to-host copies: `.cpu()`, `.to("cpu")` and `.numpy()` of a device tensor.

On a CPU tensor `.cpu()` is a no-op that never reaches the dispatcher, so the last kind is
counted by wrapping `torch.Tensor.cpu` while the counter is active.
"""
from __future__ import annotations

import collections
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_SYNC_OPS = {
    "aten::_local_scalar_dense": "scalar read",
    "aten::nonzero": "data-dependent shape",
    "aten::masked_select": "data-dependent shape",
    "aten::_unique2": "data-dependent shape",
    "aten::unique_dim": "data-dependent shape",
    "aten::unique_consecutive": "data-dependent shape",
    "aten::lift_fresh": "host-to-device copy of Python data",
}


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in _SYNC_OPS:
            self.counts[_SYNC_OPS[name]] += 1
        elif name == "aten::index" and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ())):
            self.counts["data-dependent shape"] += 1  # boolean-mask indexing: a nonzero inside
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_host_syncs():
    """`with count_host_syncs() as c: ...` then `c` maps kind -> count (c.total() for all)."""
    counter = _Counter()
    orig_cpu = torch.Tensor.cpu

    def cpu(self, *a, **k):
        counter.counts["device-to-host copy"] += 1
        return orig_cpu(self, *a, **k)

    torch.Tensor.cpu = cpu
    try:
        with counter:
            yield counter.counts
    finally:
        torch.Tensor.cpu = orig_cpu
