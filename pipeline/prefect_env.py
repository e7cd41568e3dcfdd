"""Prefect settings every `mrhp` command that runs flows needs, applied before Prefect is imported.

`make demo` exported these; the installed CLI must not depend on make. Each is set only when the
user has not set it: Prefect's home (its SQLite database, its local result storage) under the
feature store's folder, anonymous analytics off, and a start-up timeout for the temporary API
server long enough for a busy machine (Prefect's default of 20 s is not).

A failure to start or reach that server becomes one line naming the setting to change
(`OrchestrationError`, exit code 7) instead of Prefect's traceback.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from pipeline.errors import OrchestrationError

STARTUP_TIMEOUT_S = 120


def prefect_defaults(store_root: str | Path) -> dict[str, str]:
    """The settings `apply_prefect_defaults` would set, before looking at the environment."""
    return {
        "PREFECT_HOME": str(Path(store_root).resolve() / ".prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": str(STARTUP_TIMEOUT_S),
        # the project's own loggers reach the Prefect UI beside the flow's
        "PREFECT_LOGGING_EXTRA_LOGGERS": "pipeline,features,models,flows",
        # ... and, outside a flow run (the up-to-date check, training), they go to stderr only
        # instead of a UserWarning per record that Prefect has no run to attach them to
        "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    }


class QuietTaskStates:
    """A logging filter: Prefect's per-task "Finished in state Completed()" lines are noise on a
    terminal (one per chunk); they are kept at DEBUG (`mrhp -v`), failures and retries stay."""

    def filter(self, record) -> bool:  # noqa: A003 - logging's name
        msg = record.getMessage()
        if msg.startswith("Finished in state Completed") or msg.startswith("Finished in state Cached"):
            record.levelno, record.levelname = 10, "DEBUG"
            import logging

            return logging.getLogger(record.name).isEnabledFor(10) and logging.root.isEnabledFor(10)
        return True


def quiet_task_states() -> None:
    """Install `QuietTaskStates` on Prefect's task-run and flow-run loggers (idempotent)."""
    import logging

    for name in ("prefect.task_runs", "prefect.flow_runs"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, QuietTaskStates) for f in lg.filters):
            lg.addFilter(QuietTaskStates())


def apply_prefect_defaults(store_root: str | Path) -> dict[str, str]:
    """Set the defaults the user has not set; returns those it set. Prefect reads its settings when
    it is first imported, so a call after that changes nothing for this process (but still for the
    processes it starts), which is said once on stderr."""
    applied = {}
    for name, value in prefect_defaults(store_root).items():
        if name not in os.environ:
            os.environ[name] = value
            applied[name] = value
    if "PREFECT_HOME" in applied:
        # Prefect creates its home without parents: on a fresh checkout the store folder does not
        # exist yet and Prefect warned "Failed to create the Prefect home directory" (the store is
        # about to be created by the extraction anyway). A failure here is Prefect's to report.
        try:
            Path(applied["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
        except OSError:
            pass
    if applied and "prefect" in sys.modules and "PREFECT_HOME" in applied:
        print("mrhp: note: Prefect was imported before its settings were applied; "
              "PREFECT_HOME applies to worker processes only", file=sys.stderr)
    return applied


def orchestration_error(exc: BaseException) -> OrchestrationError | None:
    """The one-line error for a Prefect API server that could not be started or reached, or None
    when `exc` is something else."""
    text = str(exc)
    if "ephemeral Prefect API server" in text or "attempting to connect to ephemeral" in text:
        timeout = os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "20")
        return OrchestrationError(
            f"Prefect's temporary API server did not start within {timeout} s (a busy machine?); "
            "raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or start a server "
            "(`prefect server start`) and set PREFECT_API_URL"
        )
    name = type(exc).__name__
    if name in {"ConnectError", "ConnectTimeout", "PrefectHTTPStatusError"} and "api" in text.lower():
        url = os.environ.get("PREFECT_API_URL", "(unset)")
        first = text.splitlines()[0][:200] if text else name
        return OrchestrationError(f"cannot reach the Prefect API at {url}: {first}; "
                                  "is the server running? (see docs/gpu_box.md)")
    return None
