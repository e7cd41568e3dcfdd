"""data_manifest.yaml -> frozen, validated records.

Every error names the key path and what was expected; unknown keys are errors. Relative paths
resolve against the manifest's folder (roots) or against their declared root (dataset and
resource paths), and no path may escape its declared root.

A process parses a manifest once: `load_manifest` keeps the validated record in one memo keyed by
the file's resolved path, the sha256 of its bytes and the frozen overrides (`freeze_overrides`),
so a worker resolving many chunks, or a command asking several times, reads and hashes the
file (a few KiB) but parses and validates it once. An edited file has new bytes: a new entry.
The records are frozen, so every caller may share them. Symbolic links (roots and the paths below
them) are resolved when an entry is made; the entry keeps each declared path with what it
resolved to, and a hit resolves them again (a few stat calls): a link repointed while the process
lives (a served flow, a Dask worker) makes a new entry, checked like a fresh process would.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
import types
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.config import deep_merge, from_mapping, load_yaml
from pipeline.errors import ManifestError
from pipeline.params import STAGE_PARAMS, FlowParams
from pipeline.records import MAX_LABEL

DEFAULT_MANIFEST = "data_manifest.yaml"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Roots:
    """Declared roots (relative to the manifest folder). Paths below may not escape them."""

    data: Path = Path(".")  # datasets' raw tables and images
    resources: Path = Path(".")  # word vectors, detector weights
    store: Path = Path("store")  # the feature store folder itself
    runs: Path = Path("runs")  # training runs


@dataclass(frozen=True)
class DatasetSpec:
    raw_root: Path  # folder holding <category>.{prd,rvw,rel}.<split>, relative to roots.data
    image_root: Path  # folder holding <split>/{prd,rvw}/<id>/pic_<n>_<i>.jpg, relative to roots.data
    categories: tuple[str, ...]
    name: str = ""  # filled from the mapping key
    format: Literal["mrhp"] = "mrhp"
    source: Literal["amazon", "lazada"] = "amazon"  # img_url and product-text conventions
    language: Literal["en", "id"] = "en"
    splits: tuple[str, ...] = ("train", "dev", "test")
    threshold: float = 1.0  # relevance threshold for MAP/NDCG: 1 Amazon, 0 Lazada
    labels: Literal["auto", "votes", "labels"] = "auto"  # how rel.upvotes is read
    word_vectors: str = "glove-6b-50d"  # name under resources.word_vectors
    detector: str = "bua-r101-c4"  # name under resources.detectors
    text_encoder: str | None = None  # name under resources.text_encoders (bert stage); None: no
    # BERT features for this dataset (models fall back to word vectors + GRU)


@dataclass(frozen=True)
class WordVectorSpec:
    format: Literal["glove", "word2vec", "fasttext-bin", "kumo"]
    path: Path | None = None  # file, relative to roots.resources; None for a packaged source
    package: str | None = None  # python package shipping the vectors (format kumo)
    sha256: str | None = None  # checked before use when given
    name: str = ""


@dataclass(frozen=True)
class DetectorSpec:
    architecture: Literal["bua-r101-c4"] = "bua-r101-c4"
    path: Path | None = None  # checkpoint, relative to roots.resources; None: only random_init works
    sha256: str | None = None
    format: Literal["auto", "bua-pth", "d2-pkl"] = "auto"
    name: str = ""


@dataclass(frozen=True)
class TextEncoderSpec:
    """A Hugging Face `transformers` encoder (BERT family) for the bert stage and fine-tuning.

    Exactly one source: `path` (a local model folder holding config.json, the tokenizer files and
    the weights, relative to roots.resources), `package` (an installed Python package shipping such
    a folder at `<package>/<package_dir>`), or `hub` (a model id read from the local Hugging Face
    cache only: nothing is downloaded at run time; fetch it beforehand). `sha256` is over the
    weights file (`weights`, default model.safetensors, else pytorch_model.bin) and is verified
    before use; the bert stage refuses to run without it unless random_init is set."""

    path: Path | None = None
    package: str | None = None
    package_dir: str = "model"
    hub: str | None = None
    revision: str | None = None  # hub only: the snapshot to read (default: the cached main)
    weights: str | None = None  # weights file name inside the folder; None: auto
    sha256: str | None = None
    name: str = ""

    @property
    def source(self) -> str:
        """"path:<folder>", "package:<pkg>/<dir>" or "hub:<id>@<revision>" (for messages)."""
        if self.path is not None:
            return f"path:{self.path}"
        if self.package is not None:
            return f"package:{self.package}/{self.package_dir}"
        return f"hub:{self.hub}@{self.revision or 'main'}"


@dataclass(frozen=True)
class Resources:
    word_vectors: Mapping[str, WordVectorSpec] = field(default_factory=dict)
    detectors: Mapping[str, DetectorSpec] = field(default_factory=dict)
    text_encoders: Mapping[str, TextEncoderSpec] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    path: Path  # the manifest file
    folder: Path  # its folder: relative roots resolve against it
    roots: Roots
    datasets: Mapping[str, DatasetSpec]
    resources: Resources
    stages: Mapping[str, Any]  # stage name -> its params record (pipeline.params)
    flows: FlowParams

    @property
    def store_root(self) -> Path:
        return self.roots.store

    def dataset(self, name: str) -> DatasetSpec:
        if name not in self.datasets:
            raise ManifestError(
                f"{self.path}: no dataset {name!r}; declared: {', '.join(self.datasets) or '(none)'}"
            )
        return self.datasets[name]

    def stage_params(self, stage: str) -> Any:
        return self.stages[stage]

    def word_vectors(self, name: str) -> WordVectorSpec:
        if name not in self.resources.word_vectors:
            raise ManifestError(
                f"{self.path}: resources.word_vectors has no {name!r}; declared: "
                f"{', '.join(self.resources.word_vectors) or '(none)'}"
            )
        return self.resources.word_vectors[name]

    def detector(self, name: str) -> DetectorSpec:
        if name not in self.resources.detectors:
            raise ManifestError(
                f"{self.path}: resources.detectors has no {name!r}; declared: "
                f"{', '.join(self.resources.detectors) or '(none)'}"
            )
        return self.resources.detectors[name]

    def text_encoder(self, name: str) -> TextEncoderSpec:
        if name not in self.resources.text_encoders:
            raise ManifestError(
                f"{self.path}: resources.text_encoders has no {name!r}; declared: "
                f"{', '.join(self.resources.text_encoders) or '(none)'}"
            )
        return self.resources.text_encoders[name]


@dataclass(frozen=True)
class _Raw:
    """Top-level keys, validated before paths are resolved."""

    version: int = SCHEMA_VERSION
    roots: Roots = Roots()
    datasets: Mapping[str, Any] = field(default_factory=dict)
    resources: Mapping[str, Any] = field(default_factory=dict)
    stages: Mapping[str, Any] = field(default_factory=dict)
    flows: FlowParams = FlowParams()


def resolve_under(root: Path, p: Path, keypath: str, manifest: Path,
                  trace: list[tuple[Path, Path]] | None = None) -> Path:
    """Resolve `p` against `root`; refuse a result outside `root` (symlinks and '..' included).
    `trace` (the memo's) gets (the declared path, what it resolved to)."""
    root_r = root.resolve()
    full = (root / p) if not p.is_absolute() else p
    full_r = full.resolve()
    if trace is not None:
        trace.append((full, full_r))
    if full_r != root_r and root_r not in full_r.parents:
        raise ManifestError(
            f"{manifest}: {keypath}: path {str(p)!r} resolves to {full_r}, outside its declared "
            f"root {root_r}"
        )
    return full_r


def default_manifest_path() -> Path:
    return Path(os.environ.get("MRHP_MANIFEST", DEFAULT_MANIFEST))


# --------------------------------------------------------------------------- overrides

# One override: the key path (e.g. ("stages", "rois", "random_init")) and the value set there.
# Values are plain YAML scalars, or tuples of them (lists, frozen); nested mappings are spread
# into one entry per leaf. Immutable and hashable, so that it can key the memo below and travel
# inside a frozen request record (see features.registry.ExtractRequest).
FrozenOverrides = tuple[tuple[tuple[str, ...], Any], ...]
_SCALARS = (str, int, float, bool, type(None))


def freeze_overrides(overrides: Mapping[str, Any] | None) -> FrozenOverrides:
    """The nested `overrides` mapping as sorted (key path, value) leaves; lists become tuples.

    An empty mapping is no leaf (merging it changes nothing a valid manifest could hold). A value
    that is not plain YAML data is a ManifestError naming its key path."""
    out: list[tuple[tuple[str, ...], Any]] = []

    def freeze_value(v: Any, where: tuple[str, ...]) -> Any:
        if isinstance(v, _SCALARS):
            return v
        if isinstance(v, (list, tuple)):
            return tuple(freeze_value(x, where) for x in v)
        raise ManifestError(
            f"overrides: {'.'.join(where)}: expected a plain value (text, number, true/false, null or a "
            f"list of them), got {type(v).__name__}"
        )

    def walk(m: Mapping[str, Any], where: tuple[str, ...]) -> None:
        for k, v in m.items():
            if not isinstance(k, str):
                raise ManifestError(f"overrides: {'.'.join(where) or '(top)'}: keys must be text, got {k!r}")
            if isinstance(v, Mapping):
                walk(v, (*where, k))
            else:
                out.append(((*where, k), freeze_value(v, (*where, k))))

    if overrides:
        walk(overrides, ())
    return tuple(sorted(out, key=lambda kv: kv[0]))


def thaw_overrides(frozen: FrozenOverrides) -> dict[str, Any] | None:
    """The nested mapping `freeze_overrides` came from (tuples back to lists); None when empty."""
    if not frozen:
        return None

    def thaw_value(v: Any) -> Any:
        return [thaw_value(x) for x in v] if isinstance(v, tuple) else v

    out: dict[str, Any] = {}
    for keys, value in frozen:
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = thaw_value(value)
    return out


# --------------------------------------------------------------------------- loading

_MEMO_MAX = 8  # manifests kept per process (a key per file content and overrides)
_memo_lock = threading.Lock()
# (path, sha256, typed overrides) -> (record, (declared path, resolved path) of every path in it)
_memo: OrderedDict[tuple[str, str, Any], tuple[Manifest, tuple[tuple[Path, Path], ...]]] = OrderedDict()
parses = 0  # how many times a manifest was actually parsed and validated (tests and benches read it)


def load_manifest(path: str | Path | None = None, *,
                  overrides: Mapping[str, Any] | None = None) -> Manifest:
    """Load and validate a manifest (default: $MRHP_MANIFEST or ./data_manifest.yaml), once per
    process for a given file content and overrides (see the module docstring).

    `overrides` is a nested mapping merged over the file's content before validation (e.g.
    `{"stages": {"rois": {"random_init": True}}}` for `--random-init`)."""
    global parses
    mpath = Path(path) if path is not None else default_manifest_path()
    if not mpath.is_file():
        raise ManifestError(f"{mpath}: manifest file not found")
    frozen = freeze_overrides(overrides)
    try:
        raw_bytes = mpath.read_bytes()
    except OSError as e:
        raise ManifestError(f"{mpath}: cannot read the manifest ({e.strerror or e})") from None
    key = (str(mpath.resolve()), hashlib.sha256(raw_bytes).hexdigest(), _typed(frozen))
    with _memo_lock:
        hit = _memo.get(key)
    if hit is not None and all(declared.resolve() == resolved for declared, resolved in hit[1]):
        with _memo_lock:
            if key in _memo:
                _memo.move_to_end(key)
        return hit[0]
    try:
        text = raw_bytes.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")  # as read_text() did
    except UnicodeDecodeError as e:
        raise ManifestError(f"{mpath}: not UTF-8 text ({e})") from None
    data = load_yaml(text, str(mpath), error=ManifestError)  # alias bombs and deep nesting refused
    merge = thaw_overrides(frozen)
    if merge:
        if data is not None and not isinstance(data, Mapping):
            raise ManifestError(f"{mpath}: expected a mapping at the top level")
        data = deep_merge(data or {}, merge)
    trace: list[tuple[Path, Path]] = []
    manifest = manifest_from_mapping(data, mpath, trace=trace)
    with _memo_lock:
        parses += 1
        _memo[key] = (manifest, tuple(trace))
        _memo.move_to_end(key)
        while len(_memo) > _MEMO_MAX:
            _memo.popitem(last=False)
    return manifest


def _typed(value: Any) -> Any:
    """`value` with every scalar paired with its type, for the memo key: True == 1 == 1.0 in
    Python (one hash), but a bool field refuses 1 and an int field refuses true or 1.0, so
    overrides spelled with another type must not share an entry (nor skip their validation)."""
    if isinstance(value, tuple):
        return tuple(_typed(v) for v in value)
    return (type(value).__name__, value)


def clear_manifest_memo() -> None:
    """Forget every memoised manifest (tests)."""
    with _memo_lock:
        _memo.clear()


def manifest_from_mapping(data: Any, mpath: Path, *, trace: list[tuple[Path, Path]] | None = None) -> Manifest:
    """Validate an already-parsed manifest mapping that came from the file `mpath`. `trace`
    (`load_manifest`'s) gets every (declared path, resolved path) pair it resolved."""
    if data is not None and not isinstance(data, Mapping):
        raise ManifestError(f"{mpath}: expected a mapping of top-level keys, got {type(data).__name__}")
    top = {f.name for f in dataclasses.fields(_Raw)}
    unknown_top = sorted(set(map(str, data or {})) - top)
    if unknown_top:
        raise ManifestError(
            f"{mpath}: unknown top-level key(s) {', '.join(unknown_top)}; valid keys: {', '.join(sorted(top))}"
        )
    try:
        raw = from_mapping(_Raw, data, "")
    except ManifestError:
        raise
    except Exception as e:  # ConfigError from the generic validator
        raise ManifestError(f"{mpath}: {e}") from None
    if raw.version != SCHEMA_VERSION:
        raise ManifestError(f"{mpath}: version: expected {SCHEMA_VERSION}, got {raw.version}")
    folder = mpath.resolve().parent

    declared_roots = {f.name: folder / getattr(raw.roots, f.name) for f in dataclasses.fields(Roots)}
    roots = Roots(**{name: p.resolve() for name, p in declared_roots.items()})
    if trace is not None:
        trace += [(p, getattr(roots, name)) for name, p in declared_roots.items()]

    def sub(cls, value, keypath):
        try:
            return from_mapping(cls, value, keypath)
        except ManifestError:
            raise
        except Exception as e:
            raise ManifestError(f"{mpath}: {e}") from None

    res_raw = sub(_ResourcesRaw, raw.resources, "resources")
    word_vectors = {}
    for name, value in res_raw.word_vectors.items():
        kp = f"resources.word_vectors.{name}"
        spec = sub(WordVectorSpec, value, kp)
        if spec.path is None and spec.format != "kumo":
            raise ManifestError(f"{mpath}: {kp}.path: required for format {spec.format!r}")
        path = resolve_under(roots.resources, spec.path, f"{kp}.path", mpath, trace) if spec.path else None
        word_vectors[name] = dataclasses.replace(spec, path=path, name=name)
    detectors = {}
    for name, value in res_raw.detectors.items():
        kp = f"resources.detectors.{name}"
        spec = sub(DetectorSpec, value, kp)
        path = resolve_under(roots.resources, spec.path, f"{kp}.path", mpath, trace) if spec.path else None
        detectors[name] = dataclasses.replace(spec, path=path, name=name)
    text_encoders = {}
    for name, value in res_raw.text_encoders.items():
        kp = f"resources.text_encoders.{name}"
        spec = sub(TextEncoderSpec, value, kp)
        given = [k for k in ("path", "package", "hub") if getattr(spec, k) is not None]
        if len(given) != 1:
            raise ManifestError(
                f"{mpath}: {kp}: expected exactly one of path, package, hub; got "
                f"{', '.join(given) or 'none'}"
            )
        if spec.sha256 is not None and not _is_sha256(spec.sha256):
            raise ManifestError(f"{mpath}: {kp}.sha256: expected 64 hex digits, got {spec.sha256!r}")
        path = resolve_under(roots.resources, spec.path, f"{kp}.path", mpath, trace) if spec.path else None
        text_encoders[name] = dataclasses.replace(spec, path=path, name=name)
    resources = Resources(
        word_vectors=types.MappingProxyType(word_vectors),
        detectors=types.MappingProxyType(detectors),
        text_encoders=types.MappingProxyType(text_encoders),
    )

    datasets = {}
    for name, value in raw.datasets.items():
        kp = f"datasets.{name}"
        spec = sub(DatasetSpec, value, kp)
        if not spec.categories:
            raise ManifestError(f"{mpath}: {kp}.categories: expected at least one category")
        if not 0 <= spec.threshold < MAX_LABEL:  # NaN fails too
            raise ManifestError(f"{mpath}: {kp}.threshold: {threshold_problem(spec.threshold)}")
        if spec.word_vectors not in word_vectors:
            raise ManifestError(
                f"{mpath}: {kp}.word_vectors: {spec.word_vectors!r} is not declared under "
                f"resources.word_vectors ({', '.join(word_vectors) or 'none declared'})"
            )
        if spec.detector not in detectors:
            raise ManifestError(
                f"{mpath}: {kp}.detector: {spec.detector!r} is not declared under "
                f"resources.detectors ({', '.join(detectors) or 'none declared'})"
            )
        if spec.text_encoder is not None and spec.text_encoder not in text_encoders:
            raise ManifestError(
                f"{mpath}: {kp}.text_encoder: {spec.text_encoder!r} is not declared under "
                f"resources.text_encoders ({', '.join(text_encoders) or 'none declared'})"
            )
        datasets[name] = dataclasses.replace(
            spec,
            name=name,
            raw_root=resolve_under(roots.data, spec.raw_root, f"{kp}.raw_root", mpath, trace),
            image_root=resolve_under(roots.data, spec.image_root, f"{kp}.image_root", mpath, trace),
        )

    stages = {}
    unknown = sorted(set(raw.stages) - set(STAGE_PARAMS))
    if unknown:
        raise ManifestError(
            f"{mpath}: stages: unknown stage(s) {', '.join(unknown)}; valid: "
            f"{', '.join(STAGE_PARAMS)}"
        )
    for name, cls in STAGE_PARAMS.items():
        stages[name] = sub(cls, raw.stages.get(name), f"stages.{name}")
        check = getattr(stages[name], "problems", None)
        problems = check() if check is not None else []
        if problems:  # impossible settings are refused before any compute
            raise ManifestError(f"{mpath}: stages.{name}.{problems[0]}")

    return Manifest(
        path=mpath.resolve(),
        folder=folder,
        roots=roots,
        datasets=types.MappingProxyType(datasets),
        resources=resources,
        stages=types.MappingProxyType(stages),
        flows=raw.flows,
    )


@dataclass(frozen=True)
class _ResourcesRaw:
    word_vectors: Mapping[str, Any] = field(default_factory=dict)
    detectors: Mapping[str, Any] = field(default_factory=dict)
    text_encoders: Mapping[str, Any] = field(default_factory=dict)


def threshold_problem(value: float) -> str:
    """What is wrong with a relevance threshold outside [0, MAX_LABEL): a review is relevant when
    its label (0..MAX_LABEL) exceeds the threshold, so at MAX_LABEL or above (or NaN) no review is
    relevant and every metric is 0, and below 0 every review is, so MAP is 1 whatever the ranking."""
    return (f"expected a relevance threshold in [0, {MAX_LABEL}) (labels are 0..{MAX_LABEL}; a review "
            f"is relevant when its label exceeds it: 1 on Amazon, 0 on Lazada), got {value}")


def _is_sha256(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdefABCDEF" for c in value)
