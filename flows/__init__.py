"""Prefect flows: wiring of the `features/` stages to the store (no tensors here).

Importing this package also installs a fork fix for Prefect 3.8: each Prefect queue service
registers a `threading` exit hook in the process that started it; after fork() Prefect resets
the services in the child but not those hooks, so a forked child (a DataLoader worker, a
multiprocessing pool) fails an assertion when it exits and reports exit code 1. We drop the
inherited hooks in the child: the child never owned those services.
"""
from __future__ import annotations

import os
import threading


def _drop_inherited_prefect_exit_hooks() -> None:
    hooks = getattr(threading, "_threading_atexits", None)
    if not hooks:
        return
    def inherited(hook) -> bool:
        fn = getattr(hook, "func", hook)  # threading wraps each hook in functools.partial
        owner = getattr(fn, "__self__", None)
        return getattr(fn, "__name__", "") == "_at_exit" and \
            type(owner).__module__.startswith("prefect.")

    hooks[:] = [h for h in hooks if not inherited(h)]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited_prefect_exit_hooks)
