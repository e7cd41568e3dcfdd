"""Reader and validator for the released MRHP format (../shared/docs/REFERENCE.md section 1).

Files: `<raw_root>/<category>.{prd,rvw,rel}.<split>`, each a pandas-style column-oriented JSON
table `{"column": {"row_key": value}}`. One file is loaded at a time and dropped once its rows
are records, so peak memory is the records plus the largest single table.

Labels (`DatasetSpec.labels`): "labels" reads rel.upvotes as 0..4 helpfulness labels; "votes"
reads raw vote counts and maps v -> min(floor(log2 v), 4), dropping v = 0; "auto" picks
"labels" when every upvotes value of the dataset is integral and within 0..4, else "votes".
The choice is recorded in `DatasetRecords.label_interpretation`.

Image refs. The convention on disk is `<image_root>/<split>/{prd,rvw}/<id>/pic_<n>_<i>.<ext>`,
read here as: n = index of the URL in the item's `img_url` list, i = index of the file crawled
for that URL (0 unless a URL gave several files). An item's refs are every file in its folder
matching `pic_<n>_<i>.(jpg|jpeg|png|webp|gif|bmp)` sorted by (n, i), each carrying `img_url[n]`
when n is in range, plus `pic_<n>_0.jpg` for every URL index n with no file at all (those refs
point at missing files: `validate` counts them, stages record them as failures). Without any
folder the refs are therefore `pic_0_0.jpg .. pic_<N-1>_0.jpg` for the N URLs.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.datasets.tables import read_column_table
from pipeline.errors import DataError
from pipeline.manifest import DatasetSpec
from pipeline.records import MAX_LABEL, DatasetRecords, ImageRef, Product, Review

PRD_COLUMNS = ("product_id", "name", "description", "img_url")
PRD_OPTIONAL = ("keyword", "brand_name")  # written by the builders; not read (records do not use them)
RVW_COLUMNS = ("product_id", "review_id", "content", "img_url")
RVW_OPTIONAL = ("title", "time")  # Amazon only; not read
REL_COLUMNS = ("product_id", "review_id", "upvotes")
_PIC = re.compile(r"^pic_(\d+)_(\d+)\.(?:jpe?g|png|webp|gif|bmp)$", re.IGNORECASE)
_MAX_ISSUES_PER_FILE = 20  # validate lists this many errors/warnings per file, then a count
NO_REL_ROW = "reviews without a rel row (skipped)"
ZERO_VOTES = "reviews with 0 votes (dropped)"

log = logging.getLogger(__name__)
_said: set[tuple[str, str, tuple[tuple[str, int], ...]]] = set()  # drop warnings already given in this process


def table_path(spec: DatasetSpec, category: str, kind: str, split: str) -> Path:
    """Where the `kind` (prd, rvw, rel) table of one category and split lives."""
    return Path(spec.raw_root) / f"{category}.{kind}.{split}"


def votes_to_label(votes: int) -> int:
    """Helpfulness label from a vote count: min(floor(log2 v), 4) for v >= 1 (v = 0 is dropped)."""
    if votes < 1:
        raise ValueError(f"votes must be >= 1, got {votes}")
    return min(votes.bit_length() - 1, MAX_LABEL)


def product_text(spec: DatasetSpec, category: str, name: str, description: str) -> str:
    """name + " " + description (Lazada clothing: the name alone), as the reference code builds it."""
    if spec.source == "lazada" and category == "clothing":
        return name
    return f"{name} {description}".strip() if description else name


def resolve_image(spec: DatasetSpec, ref: ImageRef) -> Path:
    """Absolute path of an image ref; DataError if it leaves the image root ('..' or symlink)."""
    root = Path(spec.image_root).resolve()
    try:
        full = (root / ref.path).resolve()
    except (OSError, RuntimeError) as e:  # symlink loop
        raise DataError(f"image {ref.path!r} of dataset {spec.name!r} cannot be resolved: {e}") from None
    if full != root and root not in full.parents:
        raise DataError(
            f"image {ref.path!r} resolves to {full}, outside the image root {root} of dataset {spec.name!r}"
        )
    return full


@dataclass
class ValidationReport:
    """What `validate_dataset` found. `ok` is False when any error makes the dataset unusable."""

    dataset: str  # dataset name
    counts: dict[str, int] = field(default_factory=dict)  # file name -> rows read
    errors: list[str] = field(default_factory=list)  # each names the file and row
    warnings: list[str] = field(default_factory=list)  # tolerated problems (missing images...)
    label_interpretation: str = ""  # "votes" or "labels"
    stats: dict[str, int] = field(default_factory=dict)  # products/reviews per split, image counts
    label_histogram: dict[int, int] = field(default_factory=dict)  # label -> reviews

    @property
    def ok(self) -> bool:
        return not self.errors

    def format(self) -> str:
        lines = [f"dataset {self.dataset}: {'OK' if self.ok else 'ERRORS'}"]
        if self.counts:
            lines.append("  files (rows):")
            width = max(len(k) for k in self.counts)
            lines += [f"    {k:<{width}}  {v:>9,}" for k, v in self.counts.items()]
        if self.label_interpretation:
            lines.append(f"  labels read as: {self.label_interpretation}")
        if self.stats:
            lines.append("  " + ", ".join(f"{k} {v:,}" for k, v in self.stats.items()))
        if self.label_histogram:
            lines.append(
                "  label histogram: "
                + ", ".join(f"{k}: {v:,}" for k, v in sorted(self.label_histogram.items()))
            )
        lines.append(f"  {len(self.errors)} error(s), {len(self.warnings)} warning(s)")
        lines += [f"  error: {e}" for e in self.errors]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


class _Issues:
    """Strict mode raises the first error; collect mode records errors and warnings per file."""

    def __init__(self, collect: bool) -> None:
        self.collect = collect
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self._per_file: Counter[tuple[str, str]] = Counter()
        self.suppressed: Counter[tuple[str, str]] = Counter()

    def error(self, file: str, message: str) -> None:
        if not self.collect:
            raise DataError(message)
        self._add("error", file, message, self.errors)

    def warning(self, file: str, message: str) -> None:
        if self.collect:
            self._add("warning", file, message, self.warnings)

    def _add(self, kind: str, file: str, message: str, out: list[str]) -> None:
        self._per_file[(kind, file)] += 1
        if self._per_file[(kind, file)] <= _MAX_ISSUES_PER_FILE:
            out.append(message)
        else:
            self.suppressed[(kind, file)] += 1

    def finish(self) -> None:
        for (kind, file), n in sorted(self.suppressed.items()):
            (self.errors if kind == "error" else self.warnings).append(f"{file}: ... and {n} more {kind}(s)")


def _as_str(value: Any, path: Path, key: str, col: str) -> str:
    if type(value) is str:  # the common case first: this runs for every cell
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"{path}: row {key!r} column {col!r}: expected text, got {type(value).__name__}")


def _as_id(value: Any, path: Path, key: str, col: str) -> str:
    if type(value) is str and value:
        return value
    s = _as_str(value, path, key, col)
    if not s:
        raise DataError(f"{path}: row {key!r} column {col!r}: empty id")
    return s


def parse_img_urls(value: Any, path: Path, key: str) -> list[str]:
    """URLs from an img_url cell: a list (Amazon) or a JSON string of a list of URLs or of
    {"url": ...} objects (Lazada); null/NaN/"" mean none."""
    if type(value) is list and all(type(u) is str and u for u in value):
        return value  # Amazon: already a list of URLs
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return []
    if isinstance(value, str):
        s = value.strip()
        if not s.startswith("["):
            return [s]  # a single bare URL
        try:
            value = json.loads(s)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: row {key!r} column 'img_url': malformed JSON string ({e.msg})") from None
        except RecursionError:
            raise DataError(f"{path}: row {key!r} column 'img_url': JSON string nested too deeply") from None
    if not isinstance(value, list):
        raise DataError(
            f"{path}: row {key!r} column 'img_url': expected a list of URLs, got {type(value).__name__}"
        )
    urls = []
    for i, item in enumerate(value):
        if isinstance(item, dict):
            item = item.get("url")
        if not isinstance(item, str) or not item:
            raise DataError(
                f"{path}: row {key!r} column 'img_url'[{i}]: expected a URL or {{\"url\": ...}}, got {item!r}"
            )
        urls.append(item)
    return urls


def _number(value: Any, path: Path, key: str) -> float:
    if isinstance(value, bool) or value is None:
        raise DataError(f"{path}: row {key!r} column 'upvotes': expected a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value.replace(",", ""))
        except ValueError:
            raise DataError(f"{path}: row {key!r} column 'upvotes': expected a number, got {value!r}") from None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{path}: row {key!r} column 'upvotes': expected a number, got {value!r}")
    return float(value)


class ImageIndex:
    """Which item folders exist under <image_root>/<split>/<kind>/ (listed once per split and kind).

    `refs` gives an item's image refs by the convention of the module docstring (the reader and
    `mrhp predict` both list images through it)."""

    def __init__(self, image_root: Path) -> None:
        self.root = Path(image_root)
        self._dirs: dict[tuple[str, str], set[str]] = {}

    def refs(self, split: str, kind: str, item_id: str, urls: list[str]) -> tuple[ImageRef, ...]:
        # An absent folder means "not crawled yet" (its refs point at missing files, which validate
        # counts and stages record as failures); a folder that exists but cannot be listed is a
        # DataError, never read as "no images" (every image of the split would silently go missing).
        if (split, kind) not in self._dirs:
            base = self.root / split / kind
            self._dirs[(split, kind)] = set(_list_folder(base)) if base.is_dir() else set()
        found: list[tuple[int, int, str]] = []
        if item_id in self._dirs[(split, kind)]:
            folder = self.root / split / kind / item_id
            names = _list_folder(folder) if folder.is_dir() else []
            for name in names:
                m = _PIC.match(name)
                if m:
                    found.append((int(m.group(1)), int(m.group(2)), name))
        have = {n for n, _, _ in found}
        found += [(n, 0, f"pic_{n}_0.jpg") for n in range(len(urls)) if n not in have]
        found.sort()
        prefix = f"{split}/{kind}/{item_id}/"
        return tuple(
            ImageRef(path=prefix + name, url=urls[n] if n < len(urls) else None) for n, _, name in found
        )


def _list_folder(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError as e:
        raise DataError(f"{folder}: image folder cannot be listed ({e.strerror or e})") from None


def _check_id_is_folder_name(item_id: str, path: Path, key: str, col: str) -> None:
    if "/" in item_id or "\\" in item_id or item_id in (".", "..") or "\x00" in item_id:
        raise DataError(
            f"{path}: row {key!r} column {col!r}: id {item_id!r} cannot name an image folder "
            "(the image path would escape the image root)"
        )


def product_row(spec: DatasetSpec, category: str, split: str, table: dict[str, dict[str, Any]], key: str,
                path: Path, images: ImageIndex) -> Product:
    """Row `key` of a prd table as a Product: id, name, description, text (`product_text`) and
    image refs. Shared by the reader and `mrhp predict`, so new products parse as training data did."""
    pid = _as_id(table["product_id"][key], path, key, "product_id")
    name = _as_str(table["name"][key], path, key, "name")
    desc = _as_str(table["description"][key], path, key, "description")
    urls = parse_img_urls(table["img_url"][key], path, key)
    if urls:
        _check_id_is_folder_name(pid, path, key, "product_id")
    return Product(
        id=pid, name=name, description=desc, text=product_text(spec, category, name, desc),
        images=images.refs(split, "prd", pid, urls), category=category, split=split,
    )


@dataclass(frozen=True)
class ReviewRow:
    """One parsed row of a rvw table (its image refs: `ImageIndex.refs(split, "rvw", id, urls)`)."""

    id: str
    product_id: str
    text: str
    urls: list[str]


def review_row(table: dict[str, dict[str, Any]], key: str, path: Path) -> ReviewRow:
    """Row `key` of a rvw table (shared by the reader and `mrhp predict`)."""
    rid = _as_id(table["review_id"][key], path, key, "review_id")
    pid = _as_id(table["product_id"][key], path, key, "product_id")
    content = _as_str(table["content"][key], path, key, "content")
    urls = parse_img_urls(table["img_url"][key], path, key)
    if urls:
        _check_id_is_folder_name(rid, path, key, "review_id")
    return ReviewRow(id=rid, product_id=pid, text=content, urls=urls)


def rel_row(table: dict[str, dict[str, Any]], key: str, path: Path) -> tuple[str, str, float]:
    """(product id, review id, upvotes value) of row `key` of a rel table (shared with `mrhp predict`)."""
    pid = _as_id(table["product_id"][key], path, key, "product_id")
    rid = _as_id(table["review_id"][key], path, key, "review_id")
    return pid, rid, _number(table["upvotes"][key], path, key)


def labels_mode(mode: str, values: Iterable[float]) -> str:
    """How upvotes are read: `mode` ("labels" or "votes"), or for "auto" "labels" when every value
    is an integer 0..4, else "votes"."""
    if mode != "auto":
        return mode
    return "labels" if all(float(v).is_integer() and 0 <= v <= MAX_LABEL for v in values) else "votes"


@dataclass
class _RelRow:
    product_id: str
    value: float
    file: Path
    key: str


def _load(
    spec: DatasetSpec,
    splits: Sequence[str] | None,
    categories: Sequence[str] | None,
    issues: _Issues,
    counts: dict[str, int],
    stats: dict[str, int],
) -> DatasetRecords:
    splits = tuple(splits) if splits is not None else tuple(spec.splits)
    categories = tuple(categories) if categories is not None else tuple(spec.categories)
    for s in splits:
        if s not in spec.splits:
            raise DataError(f"dataset {spec.name!r}: no split {s!r}; declared: {', '.join(spec.splits)}")
    for c in categories:
        if c not in spec.categories:
            raise DataError(
                f"dataset {spec.name!r}: no category {c!r}; declared: {', '.join(spec.categories)}"
            )
    parts = [(c, s) for c in categories for s in splits]

    # 1. rel tables first (small): they decide how upvotes are read.
    rel: dict[tuple[str, str], dict[str, _RelRow]] = {}
    for c, s in parts:
        path = table_path(spec, c, "rel", s)
        rows: dict[str, _RelRow] = {}
        rel[(c, s)] = rows
        try:
            keys, t = read_column_table(path, REL_COLUMNS)
        except DataError as e:
            issues.error(str(path), str(e))
            continue
        counts[path.name] = len(keys)
        for key in keys:
            try:
                pid, rid, value = rel_row(t, key, path)
                if rid in rows:
                    raise DataError(
                        f"{path}: row {key!r}: duplicate review_id {rid!r} (first at row {rows[rid].key!r})"
                    )
                rows[rid] = _RelRow(pid, value, path, key)
            except DataError as e:
                issues.error(str(path), str(e))
        del t

    mode = labels_mode(spec.labels, (r.value for rows in rel.values() for r in rows.values()))
    records = DatasetRecords(name=spec.name, label_interpretation=mode)
    images = ImageIndex(Path(spec.image_root))
    product_at: dict[str, str] = {}  # product id -> "file row" where it was read
    review_at: dict[str, str] = {}

    for c, s in parts:
        # 2. products
        path = table_path(spec, c, "prd", s)
        local_products: set[str] = set()
        keys, t = _read_or_report(path, PRD_COLUMNS, issues, counts)
        for key in keys:
            try:
                pid = _as_id(t["product_id"][key], path, key, "product_id")
                if pid in product_at:
                    raise DataError(f"{path}: row {key!r}: duplicate product_id {pid!r} (first at {product_at[pid]})")
                product = product_row(spec, c, s, t, key, path, images)
                if not product.text.strip():
                    issues.warning(str(path), f"{path}: row {key!r}: product {pid!r} has no text")
                product_at[pid] = f"{path.name} row {key!r}"
                local_products.add(pid)
                records.products[pid] = product
            except DataError as e:
                issues.error(str(path), str(e))
        del t

        # 3. reviews, labelled from rel
        rel_rows = rel[(c, s)]
        rel_path = table_path(spec, c, "rel", s)
        path = table_path(spec, c, "rvw", s)
        seen_in_rvw: set[str] = set()
        dropped_zero = no_rel = 0
        keys, t = _read_or_report(path, RVW_COLUMNS, issues, counts)
        for key in keys:
            try:
                rid = _as_id(t["review_id"][key], path, key, "review_id")
                pid = _as_id(t["product_id"][key], path, key, "product_id")
                if rid in review_at:
                    raise DataError(f"{path}: row {key!r}: duplicate review_id {rid!r} (first at {review_at[rid]})")
                review_at[rid] = f"{path.name} row {key!r}"
                seen_in_rvw.add(rid)
                if pid not in local_products:
                    raise DataError(
                        f"{path}: row {key!r}: review {rid!r} names product {pid!r}, which is not in "
                        f"{table_path(spec, c, 'prd', s).name}"
                    )
                row = review_row(t, key, path)
                content = row.text
                r = rel_rows.get(rid)
                if r is None:
                    issues.warning(
                        str(path), f"{path}: row {key!r}: review {rid!r} has no row in {rel_path.name}; skipped"
                    )
                    no_rel += 1
                    continue
                if r.product_id != pid:
                    raise DataError(
                        f"{r.file}: row {r.key!r}: review {rid!r} is under product {r.product_id!r} "
                        f"but {path.name} row {key!r} says {pid!r}"
                    )
                label, votes = _label(mode, r)
                if label is None:
                    dropped_zero += 1
                    continue
                if not content.strip():
                    issues.warning(str(path), f"{path}: row {key!r}: review {rid!r} has no text")
                records.reviews.append(Review(
                    id=rid, product_id=pid, text=content, label=label,
                    images=images.refs(s, "rvw", rid, row.urls), votes=votes, category=c, split=s,
                ))
            except DataError as e:
                issues.error(str(path), str(e))
        del t
        prd_name = table_path(spec, c, "prd", s).name
        for rid, r in rel_rows.items():
            if prd_name not in counts:
                break  # the prd table itself is unusable (already reported)
            if r.product_id not in local_products:
                issues.error(str(r.file), f"{r.file}: row {r.key!r}: unknown product {r.product_id!r} "
                             f"(not in {prd_name})")
            elif rid not in seen_in_rvw and path.name in counts:
                issues.error(str(r.file), f"{r.file}: row {r.key!r}: unknown review {rid!r} "
                             f"(not in {path.name})")
        if path.name in counts:
            with_reviews = {r.product_id for r in rel_rows.values()}
            for pid in sorted(local_products - with_reviews):
                issues.warning(str(path), f"{prd_name}: product {pid!r} has no reviews in {rel_path.name}")
        for reason, n in ((NO_REL_ROW, no_rel), (ZERO_VOTES, dropped_zero)):
            if n:
                stats[reason] = stats.get(reason, 0) + n
                records.dropped[reason] = records.dropped.get(reason, 0) + n
    return records


def _label(mode: str, r: _RelRow) -> tuple[int | None, int | None]:
    """(label, raw votes) of a rel row; label None means a 0-vote review, which is dropped."""
    if mode == "labels":
        if not (r.value.is_integer() and 0 <= r.value <= MAX_LABEL):
            raise DataError(
                f"{r.file}: row {r.key!r} column 'upvotes': label {r.value:g} out of range "
                f"(expected an integer 0..{MAX_LABEL}; set labels: votes if the column holds vote counts)"
            )
        return int(r.value), None
    if not (r.value.is_integer() and r.value >= 0):
        raise DataError(
            f"{r.file}: row {r.key!r} column 'upvotes': vote count {r.value:g} out of range "
            "(expected a non-negative integer)"
        )
    v = int(r.value)
    return (votes_to_label(v), v) if v > 0 else (None, v)


def _read_or_report(path: Path, columns: Sequence[str], issues: Any,
                    counts: dict[str, int]) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """A table's rows, or none with the error recorded (validation goes on past a bad file)."""
    try:
        keys, t = read_column_table(path, columns)
    except DataError as e:
        issues.error(str(path), str(e))
        return [], {}
    counts[path.name] = len(keys)
    return keys, t


def load_dataset(
    spec: DatasetSpec,
    *,
    splits: Sequence[str] | None = None,
    categories: Sequence[str] | None = None,
) -> DatasetRecords:
    """Read the MRHP tables of `spec` (all its splits and categories unless narrowed) into records.

    Raises DataError naming the file, row key and column of the first problem. Reviews without
    a rel row are skipped; in vote mode reviews with 0 votes are dropped (REFERENCE.md section 1).
    Either is counted in `DatasetRecords.dropped` and said in one warning (once per process for
    the same dataset and counts: extraction and training read the tables several times).
    """
    records = _load(spec, splits, categories, _Issues(collect=False), {}, {})
    said = (spec.name, str(spec.raw_root), tuple(sorted(records.dropped.items())))
    if records.dropped and said not in _said:
        _said.add(said)
        log.warning("dataset %r: %s", spec.name, ", ".join(f"{n:,} {reason}" for reason, n in records.dropped.items()))
    return records


def validate_dataset(
    spec: DatasetSpec, *, images: Literal["verify", "exists", "skip"] = "verify"
) -> ValidationReport:
    """Check the raw data of `spec` without stopping at the first problem.

    Errors (unusable data): missing files, malformed JSON, non-UTF-8, missing columns, duplicate
    ids, rel rows naming unknown products or reviews, labels out of range, image paths leaving
    the image root. Warnings (counted, tolerated): missing or unreadable images, reviews without
    a rel row, empty texts. `images`: "verify" opens each image with PIL (verify, no decode),
    "exists" only checks that the files are there, "skip" does neither.
    """
    if images not in ("verify", "exists", "skip"):
        raise ValueError(f"images: expected 'verify', 'exists' or 'skip', got {images!r}")
    issues = _Issues(collect=True)
    report = ValidationReport(dataset=spec.name)
    if not Path(spec.raw_root).is_dir():
        issues.error(str(spec.raw_root), f"{spec.raw_root}: raw_root folder not found")
    dropped: dict[str, int] = {}
    records = _load(spec, None, None, issues, report.counts, dropped)
    report.label_interpretation = records.label_interpretation
    for split in spec.splits:
        part = [p for p in records.products.values() if p.split == split]
        report.stats[f"{split} products"] = len(part)
        report.stats[f"{split} reviews"] = sum(1 for r in records.reviews if r.split == split)
    report.stats.update(dropped)
    report.label_histogram = dict(Counter(r.label for r in records.reviews))
    if images != "skip":
        _check_images(spec, records, issues, report, verify=images == "verify")
    issues.finish()
    report.errors, report.warnings = issues.errors, issues.warnings
    return report


def _check_images(
    spec: DatasetSpec, records: DatasetRecords, issues: _Issues, report: ValidationReport, *, verify: bool
) -> None:
    from PIL import Image, UnidentifiedImageError

    found = missing = unreadable = 0
    items: Iterable[tuple[str, str, tuple[ImageRef, ...]]] = [
        *((f"product {p.id!r}", p.split, p.images) for p in records.products.values()),
        *((f"review {r.id!r}", r.split, r.images) for r in records.reviews),
    ]
    absent_splits: Counter[str] = Counter()
    for what, split, refs in items:
        if refs and not (Path(spec.image_root) / split).is_dir():
            absent_splits[split] += len(refs)  # nothing crawled for this split yet: one warning
            missing += len(refs)
            continue
        for ref in refs:
            label = f"images/{split}"
            try:
                full = resolve_image(spec, ref)
            except DataError as e:
                issues.error(label, f"{what}: {e}")
                continue
            if not full.is_file():
                missing += 1
                issues.warning(label, f"{what}: image {ref.path} is missing (url {ref.url})")
                continue
            if not verify:
                found += 1
                continue
            try:
                with Image.open(full) as im:
                    im.verify()
                found += 1
            except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                unreadable += 1
                issues.warning(label, f"{what}: image {ref.path} is unreadable ({type(e).__name__}: {e})")
            except Exception as e:  # noqa: BLE001 - any decoder failure is one named, counted warning
                unreadable += 1
                issues.warning(label, f"{what}: image {ref.path} is unreadable ({type(e).__name__}: {e})")
    for split, n in absent_splits.items():
        issues.warning(f"images/{split}", f"{Path(spec.image_root) / split}: folder not found, so all {n:,} "
                       f"image(s) of split {split!r} are missing (crawl them with `mrhp fetch-images`)")
    report.stats["images ok"] = found
    report.stats["images missing"] = missing
    report.stats["images unreadable"] = unreadable
