"""Low-level I/O shared by the MRHP reader and the dump builders.

- `read_column_table`: one pandas-style column-oriented JSON table (`{"column": {"row": v}}`),
  with errors naming the file, row key and column (malformed JSON, non-UTF-8 bytes, missing
  columns or cells).
- `ColumnTableWriter`: writes such a table without holding it in memory (rows are spooled to a
  JSON-lines file, then each column is written in one streaming pass over the spool).
- `iter_json_objects`: streams JSON objects from a gzipped or plain file, one object per line
  or concatenated pretty-printed objects, holding at most one object (plus one read chunk).
"""
from __future__ import annotations

import gzip
import io
import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from pipeline.errors import DataError

_READ_CHUNK = 1 << 20
_MAX_OBJECT_CHARS = 64 << 20  # an "object" larger than this means the input is not JSON objects


def _locate_bad_utf8(text: str) -> str:
    """Name the row and column holding the first undecodable byte (text decoded with surrogateescape)."""
    try:
        table = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return ""
    if not isinstance(table, dict):
        return ""
    for col, cells in table.items():
        if isinstance(col, str) and _has_surrogate(col):
            return f", in a column name {col.encode('utf-8', 'surrogateescape')!r}"
        if not isinstance(cells, dict):
            continue
        for key, value in cells.items():
            for s in (key, value):
                if isinstance(s, str) and _has_surrogate(s):
                    return f", row {key!r} column {col!r}"
            if isinstance(value, (list, dict)) and _has_surrogate(json.dumps(value, ensure_ascii=False)):
                return f", row {key!r} column {col!r}"
    return ""


def _has_surrogate(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def read_column_table(
    path: Path,
    required: Sequence[str],
    optional: Sequence[str] = (),
) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Load `path` and return (row keys, {column: {row key: value}}) for the columns asked for.

    Every required column must exist and hold a value for every row key of the first required
    column; optional columns may be absent (their cells read as None). Raises DataError naming
    the file (and row and column where there is one).
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark is tolerated
            raw = raw[3:]
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        where = _locate_bad_utf8(raw.decode("utf-8", "surrogateescape"))
        raise DataError(
            f"{path}: not UTF-8: byte {raw[e.start]:#04x} at offset {e.start}{where}"
        ) from None
    del raw
    try:
        table = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to be a table (arrays/objects inside each other)") from None
    del text
    if not isinstance(table, dict):
        raise DataError(
            f"{path}: expected a column-oriented JSON object {{column: {{row: value}}}}, "
            f"got a {type(table).__name__}"
        )
    missing = [c for c in required if c not in table]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)}; found: {', '.join(map(str, table)) or '(none)'}"
        )
    out: dict[str, dict[str, Any]] = {}
    for col in (*required, *optional):
        cells = table.get(col)
        if cells is None and col in optional:
            continue
        if not isinstance(cells, dict):
            raise DataError(
                f"{path}: column {col!r}: expected an object {{row key: value}}, got {type(cells).__name__}"
            )
        out[col] = cells
    keys = list(out[required[0]])
    for col in required[1:]:
        cells = out[col]
        if len(cells) != len(keys) or any(k not in cells for k in keys):
            missing_row = next((k for k in keys if k not in cells), None)
            if missing_row is not None:
                raise DataError(f"{path}: row {missing_row!r}: no value in column {col!r}")
            extra = next(k for k in cells if k not in out[required[0]])
            raise DataError(f"{path}: row {extra!r}: has column {col!r} but no {required[0]!r}")
    return keys, out


class ColumnTableWriter:
    """Write a column-oriented JSON table row by row with memory bounded by one row.

    Rows go to a JSON-lines spool next to the output; `close()` writes the table with one pass
    over the spool per column (to a temporary name, then renamed) and removes the spool.
    Row keys are "0", "1", ... as pandas writes them.
    """

    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        self.path = Path(path)
        self.columns = tuple(columns)
        self.rows = 0
        fd, spool = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".spool", dir=self.path.parent)
        self._spool_path = Path(spool)
        self._spool: IO[str] | None = os.fdopen(fd, "w", encoding="utf-8")

    def add(self, row: Mapping[str, Any]) -> None:
        assert self._spool is not None, "writer already closed"
        self._spool.write(json.dumps([row.get(c) for c in self.columns], ensure_ascii=False))
        self._spool.write("\n")
        self.rows += 1

    def close(self) -> None:
        if self._spool is None:
            return
        self._spool.close()
        self._spool = None
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as out:
                out.write("{")
                for ci, col in enumerate(self.columns):
                    out.write(("," if ci else "") + json.dumps(col) + ":{")
                    with open(self._spool_path, encoding="utf-8") as spool:
                        for ri, line in enumerate(spool):
                            value = json.loads(line)[ci]
                            out.write(("," if ri else "") + f'"{ri}":' + json.dumps(value, ensure_ascii=False))
                    out.write("}")
                out.write("}\n")
            os.replace(tmp, self.path)
        finally:
            self._spool_path.unlink(missing_ok=True)
            tmp.unlink(missing_ok=True)

    def discard(self) -> None:
        """Drop everything written (used when a build fails half-way)."""
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        self._spool_path.unlink(missing_ok=True)


def open_text(path: Path) -> IO[str]:
    """Open a plain or gzipped UTF-8 text file (gzip detected by its magic bytes, not the name)."""
    if not Path(path).is_file():
        raise DataError(f"{path}: file not found")
    try:
        with open(path, "rb") as f:
            magic = f.read(2)
        if magic == b"\x1f\x8b":
            return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig")
        return open(path, encoding="utf-8-sig")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def iter_json_objects(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number where the object starts, object) from a JSON-lines or concatenated-JSON file.

    Memory holds one read chunk plus the object being decoded. Raises DataError naming the file
    and line for malformed JSON, non-UTF-8 bytes, a corrupt gzip stream or a non-object value.
    """
    decoder = json.JSONDecoder()
    buf = ""
    pos = 0
    line = 1
    eof = False
    with open_text(path) as f:
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                if buf[pos] == "\n":
                    line += 1
                pos += 1
            if pos == len(buf):
                if eof:
                    return
                buf, pos, eof = _refill(f, path, line, buf, pos)
                continue
            try:
                obj, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                if eof or len(buf) - pos > _MAX_OBJECT_CHARS:
                    raise DataError(
                        f"{path}: malformed JSON in the object starting at line {line}: {e.msg}"
                    ) from None
                buf, pos, eof = _refill(f, path, line, buf, pos)
                continue
            if end == len(buf) and not eof:
                # a bare number or literal could go on in the next chunk: decode it again then
                buf, pos, eof = _refill(f, path, line, buf, pos)
                continue
            if not isinstance(obj, dict):
                raise DataError(f"{path}: line {line}: expected a JSON object, got {type(obj).__name__}")
            yield line, obj
            line += buf.count("\n", pos, end)
            pos = end


def _refill(f: IO[str], path: Path, line: int, buf: str, pos: int) -> tuple[str, int, bool]:
    """Drop the consumed part of `buf` and append the next chunk; the flag says end of file."""
    try:
        chunk = f.read(_READ_CHUNK)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 near line {line}: {e.reason}") from None
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read (corrupt gzip stream?) near line {line}: {e}") from None
    return buf[pos:] + chunk, 0, chunk == ""
