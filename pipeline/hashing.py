"""Content hashes and fingerprints: the store addresses items by what they contain."""
from __future__ import annotations

import hashlib
import json
import unicodedata
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """sha256 of a file's bytes, streamed in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def normalize_text(text: str) -> str:
    """NFC-normalise and collapse runs of whitespace: the form a text's hash is taken over."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def text_key(text: str, *extra: str) -> str:
    """Content key of a text (plus any qualifiers such as the field it is tokenized for)."""
    h = hashlib.sha256()
    for part in (*extra, normalize_text(text)):
        h.update(part.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


def fingerprint(stage: str, params: Any, *, code_version: str) -> str:
    """Stage fingerprint: hash of stage name, code version and canonical JSON of its parameters."""
    payload = json.dumps(
        {"stage": stage, "code": code_version, "params": params},
        sort_keys=True,
        default=str,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]
