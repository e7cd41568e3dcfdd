"""neuralcoref 4.0 backend: a Python 3.7 side process fed batches over a pipe.

neuralcoref needs spaCy 2.1 (Python <= 3.7), so it runs in the side environment that
`make neuralcoref-env` builds under `.sidecar/neuralcoref` (override with the environment
variable MRHP_NEURALCOREF_ENV). The side script (`neuralcoref_side.py`) parses each text with
its own spaCy 2.1 pipeline and returns mention character spans; they are mapped onto this
side's tokens by character offsets (a mention covers every token it overlaps).
"""
from __future__ import annotations

import atexit
import json
import os
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from features.text.coref import Cluster
from pipeline.errors import StageError

PROJECT_ROOT = Path(__file__).resolve().parents[3]
SIDE_SCRIPT = Path(__file__).resolve().parent / "neuralcoref_side.py"
DEFAULT_ENV = PROJECT_ROOT / ".sidecar" / "neuralcoref"
BATCH = 64  # texts per request line


def env_dir() -> Path:
    return Path(os.environ.get("MRHP_NEURALCOREF_ENV", str(DEFAULT_ENV)))


def missing_reason() -> str | None:
    """Why the side environment cannot run, or None when it looks complete."""
    env = env_dir()
    python = env / "bin" / "python"
    if not python.exists():
        return (
            f"neuralcoref side environment not found at {env}: run `make neuralcoref-env` "
            "(needs Python 3.7 at ~/.pyenv/versions/3.7.16; see ../shared/docs/ENVIRONMENT.md)"
        )
    if not (env / "model" / "neuralcoref").is_dir():
        return f"neuralcoref weights missing under {env / 'model'}: run `make neuralcoref-env` again"
    return None


class NeuralCoref:
    """Clusters from real neuralcoref 4.0 running in the side environment."""

    name = "neuralcoref"

    def __init__(self) -> None:
        reason = missing_reason()
        if reason:
            raise StageError(reason)
        self._proc: subprocess.Popen | None = None
        self._stderr: list[str] = []
        self._lock = threading.Lock()
        self.versions: Any = None

    # The subprocess is not carried across pickling (a stage rebuilt in another worker starts its own).
    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()

    def clusters(self, docs: Sequence[Any], keywords: Sequence[Any] = ()) -> list[list[Cluster] | None]:
        """Token-span clusters per doc; None for a doc neuralcoref failed on (see `errors`)."""
        spans = self.char_clusters([d.text for d in docs])
        return [None if cl is None else map_char_clusters(doc, cl) for doc, cl in zip(docs, spans, strict=True)]

    def char_clusters(self, texts: Sequence[str]) -> list[list[list[tuple[int, int]]] | None]:
        """Per text, its clusters as lists of (start_char, end_char) mention spans. A batch that
        fails is retried text by text; a text that fails alone gets None and its reason is kept
        in `self.errors[index]`."""
        out: list[list[list[tuple[int, int]]] | None] = []
        self.errors: dict[int, str] = {}
        with self._lock:
            for i in range(0, len(texts), BATCH):
                batch = list(texts[i:i + BATCH])
                try:
                    out.extend(self._request(batch))
                    continue
                except _BatchFailed:
                    pass
                for j, text in enumerate(batch):
                    try:
                        out.extend(self._request([text]))
                    except _BatchFailed as e:
                        self.errors[i + j] = str(e)
                        out.append(None)
        return out

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.stdin.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _start(self) -> subprocess.Popen:
        env = env_dir()
        child_env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        child_env["NEURALCOREF_CACHE"] = str(env / "model")
        child_env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "1")
        proc = subprocess.Popen(
            [str(env / "bin" / "python"), str(SIDE_SCRIPT)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, encoding="utf-8", bufsize=1, env=child_env,
        )
        self._stderr = []
        threading.Thread(target=self._drain, args=(proc,), daemon=True).start()
        line = proc.stdout.readline()
        if not line:
            proc.wait()
            raise StageError(
                f"neuralcoref side process exited with code {proc.returncode} while loading: "
                f"{self._tail()} (rebuild it with `make neuralcoref-env`)"
            )
        self.versions = json.loads(line).get("spacy")
        atexit.register(self.close)
        return proc

    def _drain(self, proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            self._stderr.append(line.rstrip())
            del self._stderr[:-20]

    def _tail(self) -> str:
        return " | ".join(self._stderr[-5:]) or "(no output)"

    def _request(self, texts: list[str]) -> list[list[list[tuple[int, int]]]]:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = self._start()
        try:
            self._proc.stdin.write(json.dumps({"texts": texts}) + "\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            try:
                code = self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                code = self._proc.wait()
            self._proc = None
            raise _BatchFailed(f"neuralcoref side process died (exit code {code}): {self._tail()}")
        reply = json.loads(line)
        if "error" in reply:
            raise _BatchFailed(f"neuralcoref failed: {reply['error']}")
        return [[[tuple(m) for m in c] for c in doc] for doc in reply["clusters"]]


class _BatchFailed(Exception):
    """A request the side process could not answer (retried text by text)."""


def map_char_clusters(doc: Any, clusters: list[list[tuple[int, int]]]) -> list[Cluster]:
    """Mentions as character spans -> token spans of `doc` (expanded to whole tokens)."""
    out: list[Cluster] = []
    for cluster in clusters:
        mentions = set()
        for s, e in cluster:
            span = doc.char_span(s, e, alignment_mode="expand")
            if span is not None and len(span):
                mentions.add((span.start, span.end))
        if len(mentions) >= 2:
            out.append(sorted(mentions))
    return sorted(out, key=lambda c: c[0])
