"""Import ROI features extracted elsewhere into the store, as stage "rois", and export them back.

Users with existing bottom-up-attention features need not re-extract. Three source formats:

- `lxmert-tsv`: one row per image, tab-separated, no header (a header row starting `img_id` is
  skipped): img_id, img_h, img_w, objects_id, objects_conf, attrs_id, attrs_conf, num_boxes,
  boxes, features; the arrays are base64 of little-endian int64 (ids) or float32 (the rest).
  Streamed line by line: a file of any size needs memory for one chunk of rows only.
- `bua-npz`: a folder (searched recursively) of one `.npz` per image as bottom-up-attention.pytorch
  writes them: `x` (n, D) features, `bbox` (n, 4), `num_bbox`, `image_h`, `image_w` and `info`,
  a pickled dict holding `objects_id`, `objects_conf` and, with attributes on, `attrs_id`,
  `attrs_conf`. Arrays are loaded with `allow_pickle=False`. `info` is read by a restricted
  unpickler that only rebuilds numpy arrays, dtypes and scalars inside plain dicts, lists and
  strings; anything else (a class, a function) is refused and the file becomes a failure. With
  `npz_info="skip"` `info` is never read: object/attribute ids are stored as -1 and their
  confidences as NaN (features, boxes and image size are still exact).
- `mcr-pth`: torch files read with `torch.load(weights_only=True)`. Layout (ours, documented
  here): either a folder of one `.pt`/`.pth` per image, or one file holding a dict
  {img_id: per-image value}. A per-image value is a tensor (n, D) of features, or a dict of
  tensors with keys among features|x|feat, boxes|bbox, obj_ids|objects_id, obj_conf|objects_conf,
  attr_ids|attrs_id, attr_conf|attrs_conf, image_hw or image_h + image_w. Only features are
  required; a missing field is stored as the sentinel above (-1 ids, NaN confidences/boxes,
  image_hw (-1, -1)).

img_id: the TSV's first column; for folders the file's path relative to the folder without its
suffix (`train/rvw/R1/pic_0_0`); for a single npz/pt file its stem.

Stored fields match the extractor (docs/design.md "Stage outputs"). Features are float32 by
default so a TSV round-trips exactly; float16 on request. The fingerprint says where the data
came from: `import-<format>-<first 16 hex of the sources' sha256>` (+ `-f16`, `-noinfo`).
Keys: the sha256 of the local image when the matched dataset image exists under the image root
(the key the extractor would use), else `import:<format>:<img_id>`.

Several rows of one key (an image listed twice, or the same image bytes under two names): a good
row wins over a failed one wherever it comes; identical good rows are counted as duplicates; two
good rows whose stored arrays differ stop the import with a DataError naming both rows (which one
is right is not ours to guess).
"""
from __future__ import annotations

import base64
import binascii
import csv
import hashlib
import io
import logging
import pickle
import sys
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from pipeline.errors import DataError
from pipeline.hashing import sha256_file
from pipeline.records import DatasetRecords
from pipeline.schema import rois_schema
from pipeline.stage import Record

if TYPE_CHECKING:
    from pipeline.store import FeatureStore

log = logging.getLogger(__name__)

STAGE = "rois"
FORMATS = ("lxmert-tsv", "bua-npz", "mcr-pth")
TSV_FIELDS = (
    "img_id", "img_h", "img_w", "objects_id", "objects_conf",
    "attrs_id", "attrs_conf", "num_boxes", "boxes", "features",
)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")
_MAX_REPORTED_FAILURES = 50  # the report keeps this many failure lines; the store keeps all
_INT32 = np.iinfo(np.int32)


@dataclass(frozen=True)
class ImportConfig:
    """How a source is read and stored."""

    format: Literal["lxmert-tsv", "bua-npz", "mcr-pth"]  # source layout (module docstring)
    feature_dtype: Literal["float32", "float16"] = "float32"  # float32 round-trips exactly
    feature_dim: int = 2048  # features per box; a row with another width is a failure
    match: Literal["stem", "path"] = "stem"  # img_id vs dataset image: file stem or relative path
    npz_info: Literal["safe", "skip"] = "safe"  # bua-npz: read `info` safely, or ignore it
    chunk_size: int = 256  # records per store commit (and per resume check)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.feature_dim < 1:
            raise ValueError(f"feature_dim must be at least 1, got {self.feature_dim}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {self.chunk_size}")


@dataclass
class SourceItem:
    """One image as read from a source: store arrays, or why it could not be read."""

    img_id: str
    where: str  # "file.tsv line 7" / "a/b.npz": names the bad row in failure reasons
    arrays: dict[str, np.ndarray] | None = None
    failure: str | None = None


@dataclass
class ImportReport:
    """What an import did: source rows and dataset coverage."""

    format: str
    fingerprint: str
    sources: list[str] = field(default_factory=list)  # files read
    rows: int = 0  # images read from the source (good and bad)
    imported: int = 0  # written to the store by this run
    already_present: int = 0  # in the store from an earlier run with the same source
    duplicates: int = 0  # rows of a key another row supplies (identical good rows, failed rows beside a good one)
    failed: int = 0  # keys no good row supplied (recorded as store failures)
    unmatched_rows: int = 0  # source images matching no dataset image (stored all the same)
    dataset_images: int = 0  # distinct image refs of the dataset
    matched_images: int = 0  # dataset images that got features
    failed_images: int = 0  # dataset images whose source row failed (in the view as failures)
    failures: list[str] = field(default_factory=list)  # first failure reasons
    view_written: bool = False  # False when no dataset image matched: the old view is kept

    @property
    def unmatched_images(self) -> int:
        """Dataset images the source has nothing for (not in the view)."""
        return self.dataset_images - self.matched_images - self.failed_images

    def format_text(self) -> str:
        lines = [
            f"import {self.format} -> stage {STAGE}, fingerprint {self.fingerprint}",
            f"  source rows {self.rows}: imported {self.imported}, already present {self.already_present}, "
            f"duplicates {self.duplicates}, failed {self.failed}, matching no dataset image {self.unmatched_rows}",
            f"  dataset images {self.dataset_images}: with features {self.matched_images}, "
            f"failed {self.failed_images}, not in the source {self.unmatched_images}",
        ]
        if not self.view_written:
            lines.append("  no dataset image matched: the rois view was left as it was")
        lines += [f"  failure: {f}" for f in self.failures]
        if self.failed > len(self.failures):
            lines.append(f"  ... and {self.failed - len(self.failures)} more failures")
        return "\n".join(lines)




# --------------------------------------------------------------------------------------------
# sources and fingerprints


def source_files(fmt: str, path: str | Path) -> list[Path]:
    """The files an import reads, sorted; DataError when there are none."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: import source not found")
    if fmt == "lxmert-tsv":
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*.tsv") if q.is_file())
    elif fmt == "bua-npz":
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*.npz") if q.is_file())
    elif fmt == "mcr-pth":
        files = [p] if p.is_file() else sorted(
            q for q in p.rglob("*") if q.is_file() and q.suffix in (".pt", ".pth"))
    else:
        raise DataError(f"unknown import format {fmt!r}; valid: {', '.join(FORMATS)}")
    if not files:
        raise DataError(f"{p}: no {fmt} files found")
    return files


def source_fingerprint(config: ImportConfig, root: str | Path, files: Sequence[Path]) -> str:
    """`import-<format>-<sha256 of the sources, 16 hex>` plus `-f16`/`-noinfo` when they apply."""
    root = Path(root)
    if len(files) == 1 and files[0] == root:
        digest = sha256_file(root)
    else:
        h = hashlib.sha256()
        for f in files:
            h.update(f.relative_to(root).as_posix().encode("utf-8") + b"\x00")
            h.update(sha256_file(f).encode("ascii") + b"\n")
        digest = h.hexdigest()
    fp = f"import-{config.format}-{digest[:16]}"
    if config.feature_dtype == "float16":
        fp += "-f16"
    if config.format == "bua-npz" and config.npz_info == "skip":
        fp += "-noinfo"
    return fp


def read_source(config: ImportConfig, root: str | Path, files: Sequence[Path]) -> Iterator[SourceItem]:
    """Every image of the source, in file then row order."""
    root = Path(root)
    for f in files:
        if config.format == "lxmert-tsv":
            yield from read_lxmert_tsv(f, feature_dim=config.feature_dim)
        elif config.format == "bua-npz":
            yield read_bua_npz(f, _img_id(root, f), feature_dim=config.feature_dim, info=config.npz_info)
        elif root.is_file():
            yield from read_mcr_pth_mapping(f, feature_dim=config.feature_dim)
        else:
            yield read_mcr_pth_file(f, _img_id(root, f), feature_dim=config.feature_dim)


def _img_id(root: Path, f: Path) -> str:
    if root.is_file():
        return f.stem
    return f.relative_to(root).with_suffix("").as_posix()


# --------------------------------------------------------------------------------------------
# LXMERT TSV


def _b64_array(text: str, dtype: str, what: str) -> np.ndarray:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"{what}: not valid base64 ({e})") from None
    itemsize = np.dtype(dtype).itemsize
    if len(raw) % itemsize:
        raise ValueError(f"{what}: {len(raw)} bytes is not a whole number of {dtype} values")
    return np.frombuffer(raw, dtype=dtype)


def _int_field(text: str, what: str) -> int:
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"{what}: expected an integer, got {text[:40]!r}") from None
    if not v.is_integer() or v < 0:
        raise ValueError(f"{what}: expected a non-negative integer, got {text[:40]!r}")
    return int(v)


def _ids32(a: np.ndarray, what: str) -> np.ndarray:
    if a.dtype.kind not in "iu":
        raise ValueError(f"{what}: expected integer ids, got {a.dtype}")
    if a.size and (a.min() < _INT32.min or a.max() > _INT32.max):
        raise ValueError(f"{what}: ids outside the int32 range (min {a.min()}, max {a.max()})")
    return a.astype(np.int32)


_TSV_NAMES = {"obj_ids": "objects_id", "obj_conf": "objects_conf", "attr_ids": "attrs_id",
              "attr_conf": "attrs_conf", "boxes": "boxes", "features": "features"}
_NPZ_NAMES = {"obj_ids": "info.objects_id", "obj_conf": "info.objects_conf", "attr_ids": "info.attrs_id",
              "attr_conf": "info.attrs_conf", "boxes": "bbox", "features": "x"}


def _check_lengths(arrays: Mapping[str, np.ndarray], n: int, dim: int, names: Mapping[str, str] | None = None) -> None:
    """Per-box fields must have n entries (boxes n*4, features n*dim); `names`: source column names."""
    name = (lambda f: names.get(f, f)) if names else (lambda f: f)
    for f in ("obj_ids", "obj_conf", "attr_ids", "attr_conf"):
        if arrays[f].size != n:
            raise ValueError(f"{name(f)} has {arrays[f].size} values, expected num_boxes = {n}")
    if arrays["boxes"].size != 4 * n:
        raise ValueError(f"{name('boxes')} has {arrays['boxes'].size} values, expected num_boxes * 4 = {4 * n}")
    nf = arrays["features"].size
    if nf != n * dim:
        per = f" ({nf / n:g} per box)" if n else ""
        raise ValueError(f"{name('features')} has {nf} values{per}, expected num_boxes * {dim} = {n * dim}")


def parse_lxmert_row(fields: Sequence[str], *, feature_dim: int = 2048) -> tuple[str, dict[str, np.ndarray]]:
    """(img_id, float32/int32 store arrays) of one TSV row; ValueError naming the bad column."""
    if len(fields) != len(TSV_FIELDS):
        hint = (" (6 columns: the original Caffe generate_tsv.py layout without object ids, "
                "which this importer does not read)") if len(fields) == 6 else ""
        raise ValueError(f"expected {len(TSV_FIELDS)} tab-separated columns, got {len(fields)}{hint}")
    img_id = fields[0]
    if not img_id:
        raise ValueError("img_id is empty")
    h = _int_field(fields[1], "img_h")
    w = _int_field(fields[2], "img_w")
    n = _int_field(fields[7], "num_boxes")
    arrays = {
        "obj_ids": _ids32(_b64_array(fields[3], "<i8", "objects_id"), "objects_id"),
        "obj_conf": _b64_array(fields[4], "<f4", "objects_conf").astype(np.float32),
        "attr_ids": _ids32(_b64_array(fields[5], "<i8", "attrs_id"), "attrs_id"),
        "attr_conf": _b64_array(fields[6], "<f4", "attrs_conf").astype(np.float32),
        "boxes": _b64_array(fields[8], "<f4", "boxes").astype(np.float32),
        "features": _b64_array(fields[9], "<f4", "features").astype(np.float32),
    }
    _check_lengths(arrays, n, feature_dim, _TSV_NAMES)
    arrays["boxes"] = arrays["boxes"].reshape(n, 4)
    arrays["features"] = arrays["features"].reshape(n, feature_dim)
    arrays["image_hw"] = np.array([h, w], dtype=np.int32)
    return img_id, arrays


def read_lxmert_tsv(path: str | Path, *, feature_dim: int = 2048) -> Iterator[SourceItem]:
    """Stream a TSV line by line; a bad line becomes a failed SourceItem naming the line."""
    path = Path(path)
    csv.field_size_limit(sys.maxsize)  # a features cell is ~400 KB of base64 for 36 boxes
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.rstrip(b"\r\n")
            if not line.strip():
                continue
            where = f"{path.name} line {lineno}"
            try:
                text = line.decode("utf-8")
                fields = next(csv.reader([text], delimiter="\t"))
            except (UnicodeDecodeError, csv.Error) as e:
                yield SourceItem(img_id=f"line{lineno}", where=where, failure=f"{where}: unreadable ({e})")
                continue
            if lineno == 1 and fields and fields[0] == "img_id":
                continue  # a header row
            img_id = fields[0] if fields and fields[0] else f"line{lineno}"
            try:
                _, arrays = parse_lxmert_row(fields, feature_dim=feature_dim)
            except ValueError as e:
                yield SourceItem(img_id=img_id, where=where, failure=f"{where} (img_id {img_id!r}): {e}")
                continue
            yield SourceItem(img_id=img_id, where=where, arrays=arrays)


def export_lxmert_tsv(rows: Iterable[tuple[str, Mapping[str, np.ndarray]]], out: str | Path) -> int:
    """Write (img_id, rois arrays) pairs as an LXMERT TSV (CRLF rows, as LXMERT's csv writer makes).

    Ids go out as int64, the rest as float32: features imported as float32 reproduce the source
    rows byte for byte. Returns the number of rows written."""
    def b64(a: np.ndarray, dtype: str) -> str:
        return base64.b64encode(np.ascontiguousarray(a, dtype=dtype).tobytes()).decode("ascii")

    n_rows = 0
    with open(out, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\r\n")
        for img_id, a in rows:
            h, wd = (int(x) for x in np.asarray(a["image_hw"]).reshape(2))
            w.writerow([
                img_id, h, wd,
                b64(a["obj_ids"], "<i8"), b64(a["obj_conf"], "<f4"),
                b64(a["attr_ids"], "<i8"), b64(a["attr_conf"], "<f4"),
                int(np.asarray(a["boxes"]).shape[0]),
                b64(a["boxes"], "<f4"), b64(a["features"], "<f4"),
            ])
            n_rows += 1
    return n_rows


# --------------------------------------------------------------------------------------------
# bottom-up-attention.pytorch npz


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The globals numpy's own pickles of arrays, dtypes and scalars name (numpy 1.x and 2.x)."""
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = np.zeros(1).__reduce__()[0]
        allowed[(mod, "scalar")] = np.float32(0).__reduce__()[0]
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(mod, "_frombuffer")] = np.zeros(1).__reduce_ex__(5)[0]
    return allowed


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays, dtypes and scalars inside plain containers; refuses any other global."""

    _ALLOWED = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name}") from None


def _load_npz_info(path: Path) -> dict[str, Any]:
    """The `info` dict of a bottom-up-attention npz, read without executing pickled code."""
    with zipfile.ZipFile(path) as z:
        with z.open("info.npy") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            if not dtype.hasobject:
                raise ValueError(f"info: expected a pickled dict, found a {dtype} array of shape {shape}")
            obj = _NumpyOnlyUnpickler(io.BufferedReader(f)).load()
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
        obj = obj.item()
    if not isinstance(obj, dict):
        raise ValueError(f"info: expected a dict, found {type(obj).__name__}")
    return obj


def _scalar_int(value: Any, what: str) -> int:
    a = np.asarray(value)
    if a.size != 1 or a.dtype.kind not in "iuf" or not float(a.reshape(())).is_integer():
        raise ValueError(f"{what}: expected one integer, got {a.dtype} array of shape {a.shape}")
    return int(a.reshape(()))


def _sentinels(n: int) -> dict[str, np.ndarray]:
    return {
        "obj_ids": np.full(n, -1, np.int32), "obj_conf": np.full(n, np.nan, np.float32),
        "attr_ids": np.full(n, -1, np.int32), "attr_conf": np.full(n, np.nan, np.float32),
    }


def read_bua_npz(path: str | Path, img_id: str, *, feature_dim: int = 2048,
                 info: Literal["safe", "skip"] = "safe") -> SourceItem:
    """One bottom-up-attention.pytorch npz -> SourceItem (failed when anything is off)."""
    path = Path(path)
    where = str(path)
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError(f"not an .npz archive (np.load gave {type(z).__name__})")
        with z:
            missing = [k for k in ("x", "bbox", "image_h", "image_w") if k not in z.files]
            if missing:
                raise ValueError(f"missing key(s) {', '.join(missing)} (has {', '.join(z.files)})")
            x = np.asarray(z["x"])
            bbox = np.asarray(z["bbox"])
            h = _scalar_int(z["image_h"], "image_h")
            w = _scalar_int(z["image_w"], "image_w")
            n_decl = _scalar_int(z["num_bbox"], "num_bbox") if "num_bbox" in z.files else None
            has_info = "info" in z.files
        if x.ndim != 2:
            raise ValueError(f"x: expected shape (n, {feature_dim}), got {x.shape}")
        n = x.shape[0]
        if n_decl is not None and n_decl != n:
            raise ValueError(f"num_bbox is {n_decl} but x has {n} rows")
        arrays: dict[str, np.ndarray] = {"features": x.reshape(-1), "boxes": bbox.reshape(-1)}
        if info == "safe":
            if not has_info:
                raise ValueError("no `info` entry (object ids); import with npz_info='skip' to store -1 ids")
            d = _load_npz_info(path)
            if "objects_id" not in d or "objects_conf" not in d:
                raise ValueError(f"info: no objects_id/objects_conf (keys: {', '.join(map(str, d))})")
            arrays["obj_ids"] = _ids32(np.asarray(d["objects_id"]).reshape(-1), "info.objects_id")
            arrays["obj_conf"] = np.asarray(d["objects_conf"], dtype=np.float32).reshape(-1)
            if "attrs_id" in d:
                arrays["attr_ids"] = _ids32(np.asarray(d["attrs_id"]).reshape(-1), "info.attrs_id")
                arrays["attr_conf"] = np.asarray(d.get("attrs_conf", np.full(n, np.nan)), dtype=np.float32).reshape(-1)
            else:  # extracted with attributes off
                s = _sentinels(n)
                arrays["attr_ids"], arrays["attr_conf"] = s["attr_ids"], s["attr_conf"]
        else:
            arrays.update(_sentinels(n))
        if arrays["features"].dtype.kind != "f" or arrays["boxes"].dtype.kind != "f":
            raise ValueError(f"x/bbox: expected floating point, got {x.dtype}/{bbox.dtype}")
        _check_lengths(arrays, n, feature_dim, _NPZ_NAMES)
    except Exception as e:  # any error decoding an untrusted file is that file's failure
        return SourceItem(img_id=img_id, where=where, failure=f"{where}: {e}")
    arrays["features"] = arrays["features"].astype(np.float32).reshape(n, feature_dim)
    arrays["boxes"] = arrays["boxes"].astype(np.float32).reshape(n, 4)
    arrays["image_hw"] = np.array([h, w], dtype=np.int32)
    return SourceItem(img_id=img_id, where=where, arrays=arrays)


# --------------------------------------------------------------------------------------------
# torch files


_PTH_ALIASES = {
    "features": ("features", "x", "feat"),
    "boxes": ("boxes", "bbox"),
    "obj_ids": ("obj_ids", "objects_id"),
    "obj_conf": ("obj_conf", "objects_conf"),
    "attr_ids": ("attr_ids", "attrs_id"),
    "attr_conf": ("attr_conf", "attrs_conf"),
}


def _to_numpy(v: Any, what: str) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor
        return v.detach().cpu().numpy()
    if isinstance(v, (np.ndarray, int, float, list, tuple)):
        return np.asarray(v)
    raise ValueError(f"{what}: expected a tensor, got {type(v).__name__}")


def pth_item(value: Any, img_id: str, where: str, *, feature_dim: int = 2048) -> SourceItem:
    """One per-image value of an mcr-pth source (a features tensor or a dict of tensors)."""
    try:
        if isinstance(value, Mapping):
            got: dict[str, np.ndarray] = {}
            for name, aliases in _PTH_ALIASES.items():
                for a in aliases:
                    if a in value:
                        got[name] = _to_numpy(value[a], a)
                        break
            if "features" not in got:
                raise ValueError(f"no features (expected one of features, x, feat; keys: {', '.join(map(str, value))})")
            if "image_hw" in value:
                hw = _to_numpy(value["image_hw"], "image_hw").reshape(-1)
                if hw.size != 2:
                    raise ValueError(f"image_hw: expected 2 values, got {hw.size}")
                hw_t = (_scalar_int(hw[0], "image_hw[0]"), _scalar_int(hw[1], "image_hw[1]"))
            elif "image_h" in value and "image_w" in value:
                hw_t = (_scalar_int(_to_numpy(value["image_h"], "image_h"), "image_h"),
                        _scalar_int(_to_numpy(value["image_w"], "image_w"), "image_w"))
            else:
                hw_t = (-1, -1)
        else:
            got = {"features": _to_numpy(value, "value")}
            hw_t = (-1, -1)
        x = got["features"]
        if x.ndim != 2 or x.dtype.kind != "f":
            raise ValueError(f"features: expected a float (n, {feature_dim}) tensor, got {x.dtype} {x.shape}")
        n = x.shape[0]
        sent = _sentinels(n)
        arrays = {
            "features": x.reshape(-1),
            "boxes": got["boxes"].reshape(-1) if "boxes" in got else np.full(4 * n, np.nan, np.float32),
            "obj_ids": _ids32(got["obj_ids"].reshape(-1), "obj_ids") if "obj_ids" in got else sent["obj_ids"],
            "obj_conf": got.get("obj_conf", sent["obj_conf"]).reshape(-1).astype(np.float32),
            "attr_ids": _ids32(got["attr_ids"].reshape(-1), "attr_ids") if "attr_ids" in got else sent["attr_ids"],
            "attr_conf": got.get("attr_conf", sent["attr_conf"]).reshape(-1).astype(np.float32),
        }
        _check_lengths(arrays, n, feature_dim)
    except (ValueError, TypeError) as e:
        return SourceItem(img_id=img_id, where=where, failure=f"{where}: {e}")
    arrays["features"] = arrays["features"].astype(np.float32).reshape(n, feature_dim)
    arrays["boxes"] = arrays["boxes"].astype(np.float32).reshape(n, 4)
    arrays["image_hw"] = np.array(hw_t, dtype=np.int32)
    return SourceItem(img_id=img_id, where=where, arrays=arrays)


def _torch_load(path: Path, *, mmap: bool = False) -> Any:
    """torch.load with weights_only=True (tensors and plain containers only); mmap for big files."""
    import torch  # only this format needs torch

    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def read_mcr_pth_file(path: str | Path, img_id: str, *, feature_dim: int = 2048) -> SourceItem:
    path = Path(path)
    try:
        value = _torch_load(path)
    except Exception as e:  # torch raises UnpicklingError/RuntimeError/EOFError for bad files
        return SourceItem(
            img_id=img_id, where=str(path), failure=f"{path}: cannot load safely ({type(e).__name__}: {e})"
        )
    return pth_item(value, img_id, str(path), feature_dim=feature_dim)


def read_mcr_pth_mapping(path: str | Path, *, feature_dim: int = 2048) -> Iterator[SourceItem]:
    """A single torch file holding {img_id: per-image value}."""
    path = Path(path)
    try:
        mapping = _torch_load(path, mmap=True)
    except Exception as e:
        raise DataError(f"{path}: cannot load with torch.load(weights_only=True): {type(e).__name__}: {e}") from None
    if not isinstance(mapping, Mapping):
        if hasattr(mapping, "detach"):  # one image's tensor saved on its own
            yield pth_item(mapping, path.stem, str(path), feature_dim=feature_dim)
            return
        raise DataError(f"{path}: expected a dict {{img_id: tensor or dict of tensors}}, got {type(mapping).__name__}")
    if any(hasattr(mapping.get(a), "detach") for a in _PTH_ALIASES["features"]):
        # one image's dict of tensors saved on its own (its keys are field names, not img_ids)
        yield pth_item(mapping, path.stem, str(path), feature_dim=feature_dim)
        return
    for img_id, value in mapping.items():
        yield pth_item(value, str(img_id), f"{path.name}[{img_id!r}]", feature_dim=feature_dim)


# --------------------------------------------------------------------------------------------
# matching source images to dataset images


def _strip_image_suffix(s: str) -> str:
    p = PurePosixPath(s)
    return str(p.with_suffix("")) if p.suffix.lower() in IMAGE_SUFFIXES else s


class RefIndex:
    """Dataset image refs by match key: file stem (`stem`) or relative path without suffix (`path`)."""

    def __init__(self, records: DatasetRecords, match: Literal["stem", "path"]) -> None:
        self.match = match
        self.paths: set[str] = set()
        self._by_key: dict[str, list[str]] = {}
        refs = [r for p in records.products.values() for r in p.images]
        refs += [r for rv in records.reviews for r in rv.images]
        for ref in refs:
            if ref.path in self.paths:
                continue
            self.paths.add(ref.path)
            self._by_key.setdefault(self._ref_key(ref.path), []).append(ref.path)

    def _ref_key(self, path: str) -> str:
        p = PurePosixPath(path)
        return p.stem if self.match == "stem" else str(p.with_suffix(""))

    def lookup(self, img_id: str) -> list[str]:
        """Dataset image paths matching `img_id`; DataError when a stem matches several."""
        key = _strip_image_suffix(img_id.replace("\\", "/"))
        if self.match == "stem":
            key = PurePosixPath(key).name
        found = self._by_key.get(key, [])
        if len(found) > 1:
            shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
            raise DataError(
                f"img_id {img_id!r} matches {len(found)} dataset images by file stem ({shown}); "
                "stems are not unique in this dataset (MRHP names every image pic_<n>_<i>): "
                "use --match path with img_ids that are paths relative to the image root"
            )
        return found


# --------------------------------------------------------------------------------------------
# the import itself


def import_features(
    store: FeatureStore,
    dataset: str,
    image_root: str | Path,
    records: DatasetRecords,
    source: str | Path,
    config: ImportConfig,
) -> ImportReport:
    """Import `source` into `store` and write the dataset's rois view.

    Resumable: keys the store already holds for this fingerprint are not written again. Bad rows
    become store failures and report lines; the run goes on. Rows matching no dataset image are
    stored too (under `import:<format>:<img_id>`) but not put in the view. The view (every matched
    dataset image, failed ones included) replaces the dataset's rois view unless nothing matched.
    """
    files = source_files(config.format, source)
    fp = source_fingerprint(config, source, files)
    report = ImportReport(format=config.format, fingerprint=fp, sources=[str(f) for f in files])
    index = RefIndex(records, config.match)
    report.dataset_images = len(index.paths)
    root = Path(image_root).resolve()
    schema = rois_schema(config.feature_dtype, config.feature_dim)
    attrs = {
        "source": "import", "format": config.format, "feature_dtype": config.feature_dtype,
        "feature_dim": config.feature_dim, "npz_info": config.npz_info,
        "sources": [Path(f).name for f in files][:100],
    }

    view: dict[str, str] = {}
    seen: dict[str, bool] = {}  # key -> a good row supplied it
    # Duplicate rows of one key: a good row wins over a failed one wherever it comes, so a
    # failure is held back (it carries no arrays) until the source is read; two good rows must
    # agree, which a digest of their stored arrays checks without keeping the arrays.
    good: dict[str, tuple[bytes, str]] = {}  # key -> (digest of its stored arrays, where it was read)
    held: dict[str, tuple[Record, list[str]]] = {}  # key -> its failure, while no good row came
    pending: list[tuple[Record, list[str]]] = []
    writer = store.writer(STAGE, fp, schema, attrs=attrs, chunk_size=config.chunk_size)

    def flush() -> None:
        missing = set(store.missing(STAGE, fp, [r.key for r, _ in pending]))
        for rec, refs in pending:
            if rec.key in missing:
                writer.add(rec)
                report.imported += rec.ok
            else:
                report.already_present += rec.ok
            for ref in refs:  # failed ones too, as the extractor does: status counts them
                view[ref] = rec.key
        pending.clear()
        log.info("import %s: %d rows read, %d imported, %d already present, %d failed",
                 config.format, report.rows, report.imported, report.already_present, report.failed)

    try:
        for item in read_source(config, source, files):
            report.rows += 1
            refs = index.lookup(item.img_id)
            if not refs:
                report.unmatched_rows += 1
            key = _item_key(config.format, item.img_id, refs, root)
            if item.failure is None:
                item = _finite_features(item, config.feature_dtype)
            if item.failure is not None:
                if key in seen:  # a failed duplicate: the first failure or the good row stays
                    report.duplicates += 1
                    for ref in refs:  # the same image bytes under another name: map it too
                        view.setdefault(ref, key)
                    continue
                seen[key] = False
                held[key] = (Record(key=key, failure=item.failure), list(refs))
                continue
            arrays = dict(item.arrays)
            arrays["features"] = arrays["features"].astype(config.feature_dtype, copy=False)
            digest = _arrays_digest(arrays)
            if key in good:
                first_digest, first_where = good[key]
                if digest != first_digest:
                    raise DataError(
                        f"{item.where}: image key {key} (img_id {item.img_id!r}) was already read from "
                        f"{first_where} with different arrays; two good rows of one image must agree: "
                        f"remove one of them from the source")
                report.duplicates += 1
                for ref in refs:
                    view.setdefault(ref, key)
                continue
            if key in held:  # a failed row came first: this good row replaces it
                _, held_refs = held.pop(key)
                report.duplicates += 1
                refs = list(dict.fromkeys([*held_refs, *refs]))
            seen[key] = True
            good[key] = (digest, item.where)
            pending.append((Record(key=key, arrays=arrays, meta={"img_id": item.img_id}), refs))
            if len(pending) >= config.chunk_size:
                flush()
        for rec, refs in held.values():  # keys that no good row supplied: stored as failures
            report.failed += 1
            if len(report.failures) < _MAX_REPORTED_FAILURES:
                report.failures.append(rec.failure or "")
            pending.append((rec, refs))
            if len(pending) >= config.chunk_size:
                flush()
        if pending:
            flush()
    finally:
        writer.close()
    report.matched_images = sum(seen[k] for k in view.values())
    report.failed_images = len(view) - report.matched_images
    if view:  # an import that matched nothing must not wipe the dataset's current view
        store.write_view(dataset, STAGE, fp, view)
        report.view_written = True
    return report


def _arrays_digest(arrays: Mapping[str, np.ndarray]) -> bytes:
    """A digest of the arrays a row stores (names, dtypes, shapes and bytes): two good rows of
    one key are compared by it, so the first row's arrays need not be kept."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}\x00{a.dtype.str}\x00{a.shape}\x00".encode())
        h.update(a.tobytes())
    return h.digest()


def _finite_features(item: SourceItem, dtype: str) -> SourceItem:
    """`item`, or a failed one when its features hold NaN/inf, as read or once cast to `dtype`
    (float16 overflows above 65504). Before, such rows were stored and reached the models."""
    feats = item.arrays["features"] if item.arrays is not None else None
    if feats is None:
        return item
    bad = int(np.size(feats) - np.count_nonzero(np.isfinite(feats)))
    if bad:
        return SourceItem(item.img_id, item.where, failure=f"{item.where}: {bad} non-finite (NaN/inf) feature value(s)")
    if dtype == "float16":
        with np.errstate(over="ignore"):
            over = int(np.count_nonzero(~np.isfinite(np.asarray(feats).astype(np.float16))))
        if over:
            return SourceItem(item.img_id, item.where, failure=(
                f"{item.where}: {over} feature value(s) beyond float16's range (|x| > 65504); "
                f"import with --feature-dtype float32"))
    return item


def export_view_tsv(
    store: FeatureStore, dataset: str, out: str | Path, *, item_ids: Sequence[str] | None = None
) -> int:
    """Write a dataset's rois view (or the given item ids of it, in that order) as an LXMERT TSV.

    Failed items are left out. img_id is the one recorded at import (`meta["img_id"]`), else the
    item id without its image suffix. Returns the number of rows written."""
    view = store.view(dataset, STAGE)
    ids = list(item_ids) if item_ids is not None else sorted(view.item_ids())

    def rows() -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        for item_id in ids:
            if view.failure(item_id) is not None:
                continue
            key = view.key(item_id)
            img_id = view.reader.meta(key).get("img_id") or _strip_image_suffix(item_id)
            yield img_id, view.get(item_id)

    return export_lxmert_tsv(rows(), out)


def _item_key(fmt: str, img_id: str, refs: Sequence[str], root: Path) -> str:
    if len(refs) == 1:
        full = (root / refs[0]).resolve()
        if (full == root or root in full.parents) and full.is_file():
            return sha256_file(full)
    return f"import:{fmt}:{img_id}"


__all__ = [
    "FORMATS", "ImportConfig", "ImportReport", "RefIndex", "SourceItem", "TSV_FIELDS",
    "export_lxmert_tsv", "export_view_tsv", "import_features", "parse_lxmert_row", "pth_item", "read_bua_npz",
    "read_lxmert_tsv", "read_mcr_pth_file", "read_mcr_pth_mapping", "read_source", "rois_schema",
    "source_files", "source_fingerprint",
]
