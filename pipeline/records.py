"""Canonical dataset records: what every reader produces and every stage consumes.

Ids are the dataset's own (stable across runs). Image refs are posix paths relative to the
dataset's image root (`pictures/<split>/{prd,rvw}/<id>/pic_<n>_<i>.jpg` by convention) plus the
URL they were crawled from when known.
"""
from __future__ import annotations

from dataclasses import dataclass, field

MAX_LABEL = 4  # helpfulness labels are 0..MAX_LABEL (REFERENCE.md section 1)


@dataclass(frozen=True)
class ImageRef:
    path: str  # relative to the dataset's image root, posix separators
    url: str | None = None


@dataclass(frozen=True)
class Product:
    id: str
    name: str
    description: str
    text: str  # name + " " + description (Lazada clothing: name alone)
    images: tuple[ImageRef, ...] = ()
    category: str = ""
    split: str = ""


@dataclass(frozen=True)
class Review:
    id: str
    product_id: str
    text: str
    label: int  # helpfulness 0..4
    images: tuple[ImageRef, ...] = ()
    votes: int | None = None  # raw vote count when the source had one
    category: str = ""
    split: str = ""


@dataclass
class DatasetRecords:
    """All products and reviews of one dataset (every category and split asked for)."""

    name: str
    products: dict[str, Product] = field(default_factory=dict)
    reviews: list[Review] = field(default_factory=list)
    label_interpretation: str = ""  # "votes" or "labels": how the rel upvotes column was read
    # reviews the reader left out by its documented rules, by reason -> count (e.g. "reviews with
    # 0 votes (dropped)"); empty when none was. Said by the reader and recorded in run.json.
    dropped: dict[str, int] = field(default_factory=dict)

    def reviews_by_product(self) -> dict[str, list[Review]]:
        out: dict[str, list[Review]] = {}
        for r in self.reviews:
            out.setdefault(r.product_id, []).append(r)
        return out

    def split(self, split: str) -> DatasetRecords:
        """The products and reviews of one split (products are split-disjoint in MRHP)."""
        reviews = [r for r in self.reviews if r.split == split]
        pids = {r.product_id for r in reviews}
        return DatasetRecords(
            name=self.name,
            products={p: v for p, v in self.products.items() if p in pids or v.split == split},
            reviews=reviews,
            label_interpretation=self.label_interpretation,
        )
