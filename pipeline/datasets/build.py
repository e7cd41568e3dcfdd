"""Turn a public review dump (reviews + product metadata) into the MRHP format, streaming.

The construction rules are Amazon-MRHP's (../shared/docs/REFERENCE.md section 1), each a field
of `BuildConfig`: keep reviews with at least `min_votes` votes (vote > 0) and `min_chars`
characters (64); keep products with at least `min_reviews` such reviews (20) of which one has
at least `min_top_votes` votes (vote > 2); split the kept products (sorted ids) by two successive
shuffled splits, test = `test_fraction` of all, dev = `dev_fraction` of the rest, seed 0
(sklearn's train_test_split: 64/16/20 by default).

Memory. Pass 1 streams the reviews and keeps two integers per product that has a qualifying
review (about 200 bytes each). Pass 2 streams the reviews again and appends the kept ones to
per-split spool files; a third stream reads the metadata for the kept products. Each output
table is then written column by column from its spool (`ColumnTableWriter`), so peak memory is
bounded by the number of products, never by the number of reviews or the size of a table.
Disk: the spools need about the size of the output until the tables are written.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pipeline.datasets.mrhp import PRD_COLUMNS, PRD_OPTIONAL, REL_COLUMNS, RVW_COLUMNS, RVW_OPTIONAL
from pipeline.datasets.tables import ColumnTableWriter, iter_json_objects
from pipeline.errors import DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")
PRD_OUT = (PRD_COLUMNS[0], PRD_COLUMNS[1], "img_url", "keyword", "description", "brand_name")
RVW_OUT = (*RVW_COLUMNS, *RVW_OPTIONAL)
REL_OUT = REL_COLUMNS
assert set(PRD_OUT) == set(PRD_COLUMNS) | set(PRD_OPTIONAL)
_PROGRESS_EVERY = 1_000_000
_MAX_LISTED = 10  # skipped records listed by line before only counting


@dataclass(frozen=True, kw_only=True)
class BuildConfig:
    """Thresholds and split of the MRHP construction; defaults are the published Amazon-MRHP rules."""

    category: str  # output file prefix: <category>.{prd,rvw,rel}.<split>
    min_votes: int = 1  # a review needs at least this many helpful votes (published: vote > 0)
    min_chars: int = 64  # ... and at least this many characters of text
    min_reviews: int = 20  # a product needs at least this many such reviews ...
    min_top_votes: int = 3  # ... one of them with at least this many votes (published: vote > 2)
    test_fraction: float = 0.2  # share of products in test (first 80/20 split)
    dev_fraction: float = 0.2  # share of the remaining products in dev (second 80/20 split)
    seed: int = 0  # random_state of both splits
    dedupe: bool = False  # drop repeats of a review (same product, reviewer, text); costs ~100 B per qualifying review


@dataclass(frozen=True)
class SourceReview:
    """One review as a source adapter extracts it from a dump record."""

    product_id: str
    votes: int
    text: str
    title: str
    time: Any
    image_urls: list[str]
    reviewer: str = ""  # reviewer id, used only by BuildConfig.dedupe


@dataclass(frozen=True)
class SourceProduct:
    product_id: str
    name: str
    description: str
    image_urls: list[str]
    keyword: str
    brand: str


class Source(Protocol):
    """How one dump flavour maps its records to reviews and products."""

    name: str

    def review(self, obj: dict[str, Any]) -> SourceReview:
        """Raise ValueError (with a reason) for a record that cannot be read."""

    def product(self, obj: dict[str, Any]) -> SourceProduct:
        """Raise ValueError (with a reason) for a record that cannot be read."""


@dataclass
class BuildSummary:
    """What a build read, kept and wrote."""

    source: str
    config: dict[str, Any]
    reviews_read: int = 0
    reviews_qualifying: int = 0  # passing the per-review thresholds, any product
    products_seen: int = 0  # products with at least one qualifying review
    products_kept: int = 0
    products: dict[str, int] = field(default_factory=dict)  # split -> products
    reviews: dict[str, int] = field(default_factory=dict)  # split -> reviews
    products_without_metadata: int = 0
    duplicates_dropped: int = 0  # with BuildConfig.dedupe
    records_skipped: int = 0  # records that could not be read (listed in warnings)
    warnings: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def format(self) -> str:
        lines = [
            f"read {self.reviews_read:,} reviews; {self.reviews_qualifying:,} pass the review thresholds "
            f"over {self.products_seen:,} products; kept {self.products_kept:,} products",
        ]
        for s in SPLITS:
            lines.append(f"  {s:<5} {self.products.get(s, 0):>8,} products {self.reviews.get(s, 0):>10,} reviews")
        if self.duplicates_dropped:
            lines.append(f"  {self.duplicates_dropped:,} repeated reviews dropped (dedupe)")
        lines += [f"  warning: {w}" for w in self.warnings]
        lines.append(f"wrote {len(self.files)} files in {self.seconds:.1f} s; rel.upvotes holds raw votes "
                     "(declare the dataset with labels: votes)")
        return "\n".join(lines)


def split_products(product_ids: list[str], cfg: BuildConfig) -> dict[str, str]:
    """Product id -> split: two successive shuffled splits of the sorted ids (sklearn semantics)."""
    from sklearn.model_selection import train_test_split

    ids = sorted(product_ids)
    if len(ids) < 3:
        raise DataError(
            f"only {len(ids)} product(s) pass the thresholds (min_reviews={cfg.min_reviews}, "
            f"min_top_votes={cfg.min_top_votes}); at least 3 are needed for train/dev/test"
        )
    rest, test = train_test_split(ids, test_size=cfg.test_fraction, random_state=cfg.seed)
    train, dev = train_test_split(rest, test_size=cfg.dev_fraction, random_state=cfg.seed)
    return {**{p: "train" for p in train}, **{p: "dev" for p in dev}, **{p: "test" for p in test}}


def _reviews(
    source: Source, path: Path, summary: BuildSummary, *, report: bool
) -> Iterator[tuple[int, SourceReview]]:
    """Reviews of the dump; unreadable records are skipped (and, when `report`, counted and listed)."""
    for line, obj in iter_json_objects(path):
        try:
            yield line, source.review(obj)
        except ValueError as e:
            if not report:
                continue
            summary.records_skipped += 1
            if summary.records_skipped <= _MAX_LISTED:
                summary.warnings.append(f"{path}: line {line}: review skipped ({e})")


def build_mrhp(
    source: Source,
    *,
    reviews: Path,
    meta: Path | None,
    out: Path,
    config: BuildConfig,
    overwrite: bool = False,
    progress: Callable[[str], None] = log.info,
) -> BuildSummary:
    """Build `<out>/<category>.{prd,rvw,rel}.{train,dev,test}` (+ build_info.json) from a dump."""
    start = time.perf_counter()
    reviews, out = Path(reviews), Path(out)
    summary = BuildSummary(source=source.name, config=asdict(config))
    if not config.category or "/" in config.category or config.category.startswith("."):
        raise DataError(f"category {config.category!r}: expected a plain name such as 'home'")
    out.mkdir(parents=True, exist_ok=True)
    targets = [out / f"{config.category}.{k}.{s}" for s in SPLITS for k in ("prd", "rvw", "rel")]
    existing = [t.name for t in targets if t.exists()]
    if existing and not overwrite:
        raise DataError(f"{out}: {', '.join(existing)} already exist (pass --overwrite to replace them)")

    def qualifies(r: SourceReview) -> bool:
        return r.votes >= config.min_votes and len(r.text) >= config.min_chars

    seen: set[int] = set()

    def repeated(r: SourceReview) -> bool:
        """With dedupe: True for the second and later copies of a (product, reviewer, text)."""
        if not config.dedupe:
            return False
        h = hashlib.blake2b(digest_size=8)
        for part in (r.product_id, r.reviewer, r.text):
            h.update(part.encode("utf-8", "surrogatepass") + b"\x00")
        key = int.from_bytes(h.digest(), "little")
        if key in seen:
            return True
        seen.add(key)
        return False

    # Pass 1: per product, number of qualifying reviews and their largest vote count.
    counts: dict[str, int] = {}
    top: dict[str, int] = {}
    for _, r in _reviews(source, reviews, summary, report=True):
        summary.reviews_read += 1
        if summary.reviews_read % _PROGRESS_EVERY == 0:
            progress(f"pass 1: {summary.reviews_read:,} reviews read")
        if qualifies(r):
            if repeated(r):
                summary.duplicates_dropped += 1
                continue
            summary.reviews_qualifying += 1
            counts[r.product_id] = counts.get(r.product_id, 0) + 1
            if r.votes > top.get(r.product_id, 0):
                top[r.product_id] = r.votes
    summary.products_seen = len(counts)
    kept = [p for p, n in counts.items() if n >= config.min_reviews and top[p] >= config.min_top_votes]
    del counts, top
    seen.clear()
    split_of = split_products(kept, config)
    summary.products_kept = len(split_of)
    progress(f"pass 1 done: {summary.products_kept:,} of {summary.products_seen:,} products kept")

    writers: dict[tuple[str, str], ColumnTableWriter] = {}
    try:
        for s in SPLITS:
            writers[("rvw", s)] = ColumnTableWriter(out / f"{config.category}.rvw.{s}", RVW_OUT)
            writers[("rel", s)] = ColumnTableWriter(out / f"{config.category}.rel.{s}", REL_OUT)
            writers[("prd", s)] = ColumnTableWriter(out / f"{config.category}.prd.{s}", PRD_OUT)
        # Pass 2: emit the qualifying reviews of kept products; ids <product>-<n> in dump order.
        serial: dict[str, int] = dict.fromkeys(split_of, 0)
        n = 0
        for _, r in _reviews(source, reviews, summary, report=False):
            n += 1
            if n % _PROGRESS_EVERY == 0:
                progress(f"pass 2: {n:,} reviews read")
            s = split_of.get(r.product_id)
            if s is None or not qualifies(r) or repeated(r):
                continue
            rid = f"{r.product_id}-{serial[r.product_id]}"
            serial[r.product_id] += 1
            writers[("rvw", s)].add({"product_id": r.product_id, "review_id": rid, "content": r.text,
                                     "img_url": r.image_urls, "title": r.title, "time": r.time})
            writers[("rel", s)].add({"product_id": r.product_id, "review_id": rid, "upvotes": r.votes})
            summary.reviews[s] = summary.reviews.get(s, 0) + 1
        if n != summary.reviews_read:
            raise DataError(f"{reviews}: changed between passes ({summary.reviews_read:,} then {n:,} records)")

        # Metadata: one product row per kept product (first record wins over duplicates).
        written: set[str] = set()
        if meta is not None:
            meta_skipped = 0
            for line, obj in iter_json_objects(Path(meta)):
                try:
                    p = source.product(obj)
                except ValueError as e:
                    meta_skipped += 1
                    if meta_skipped <= _MAX_LISTED:
                        summary.warnings.append(f"{meta}: line {line}: product skipped ({e})")
                    continue
                s = split_of.get(p.product_id)
                if s is None or p.product_id in written:
                    continue
                written.add(p.product_id)
                writers[("prd", s)].add(_product_row(p))
            summary.records_skipped += meta_skipped
        missing = [p for p in sorted(split_of) if p not in written]
        if missing:
            summary.products_without_metadata = len(missing)
            summary.warnings.append(
                f"{len(missing):,} product(s) have no metadata record"
                + ("" if meta is not None else " (no --meta file given)")
                + "; their name is the product id and their description is empty"
            )
            for p in missing:
                writers[("prd", split_of[p])].add(_product_row(SourceProduct(p, p, "", [], "", "")))
        for s in split_of.values():
            summary.products[s] = summary.products.get(s, 0) + 1
        if summary.records_skipped > _MAX_LISTED:
            summary.warnings.append(f"{summary.records_skipped:,} records skipped in all")

        progress("writing tables")
        for w in writers.values():
            w.close()
            summary.files.append(w.path.name)
    except BaseException:
        for w in writers.values():
            w.discard()
        raise
    summary.seconds = time.perf_counter() - start
    info = out / "build_info.json"
    info.write_text(json.dumps(asdict(summary), indent=2) + "\n", encoding="utf-8")
    summary.files.append(info.name)
    return summary


def _product_row(p: SourceProduct) -> dict[str, Any]:
    return {"product_id": p.product_id, "name": p.name, "img_url": p.image_urls, "keyword": p.keyword,
            "description": p.description, "brand_name": p.brand}


def text_of(value: Any) -> str:
    """A dump field that may be a string, a list of strings or missing, as one string."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, list):
        return " ".join(s.strip() for s in value if isinstance(s, str) and s.strip())
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return str(value)
    raise ValueError(f"expected text or a list of texts, got {type(value).__name__}")


def url_list(value: Any, keys: tuple[str, ...] = ()) -> list[str]:
    """URLs from a list of strings or of objects (first non-empty of `keys` in each)."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"expected a list of image URLs, got {type(value).__name__}")
    urls = []
    for item in value:
        if isinstance(item, dict):
            item = next((item[k] for k in keys if isinstance(item.get(k), str) and item[k]), None)
        if isinstance(item, str) and item:
            urls.append(item)
    return urls
