"""Amazon Review Data 2018 (Ni, Li & McAuley) -> MRHP format.

Reviews: one JSON object per line (gzipped or plain; concatenated pretty-printed objects are
accepted too) with `asin`, `vote` (a string such as "1,234", absent when 0), `reviewText`,
`summary`, `unixReviewTime`, `image` (review image URLs). Metadata: `asin`, `title`,
`description` (list of paragraphs), `imageURLHighRes`/`imageURL`, `brand`, `category`.
Product id = asin; review id = `<asin>-<n>`; review text = reviewText.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.datasets.build import (
    BuildConfig,
    BuildSummary,
    SourceProduct,
    SourceReview,
    build_mrhp,
    text_of,
    url_list,
)


def parse_vote(value: Any) -> int:
    """The 2018 `vote` field: absent -> 0, "1,234" -> 1234; ValueError for anything else."""
    if value is None:
        return 0
    if isinstance(value, bool):
        raise ValueError(f"vote {value!r} is not a count")
    if isinstance(value, int):
        votes = value
    elif isinstance(value, float) and value.is_integer():
        votes = int(value)
    elif isinstance(value, str) and value.strip().replace(",", "").isdigit():
        votes = int(value.strip().replace(",", ""))
    else:
        raise ValueError(f"vote {value!r} is not a count")
    if votes < 0:
        raise ValueError(f"vote {value!r} is negative")
    return votes


def _asin(obj: dict[str, Any]) -> str:
    asin = obj.get("asin")
    if not isinstance(asin, str) or not asin.strip():
        raise ValueError("no asin")
    return asin.strip()


class Amazon2018:
    """Source adapter for the 2018 dump."""

    name = "amazon2018"

    def review(self, obj: dict[str, Any]) -> SourceReview:
        return SourceReview(
            product_id=_asin(obj),
            votes=parse_vote(obj.get("vote")),
            text=text_of(obj.get("reviewText")),
            title=text_of(obj.get("summary")),
            time=obj.get("unixReviewTime"),
            image_urls=url_list(obj.get("image")),
            reviewer=text_of(obj.get("reviewerID")),
        )

    def product(self, obj: dict[str, Any]) -> SourceProduct:
        cats = obj.get("category")
        return SourceProduct(
            product_id=_asin(obj),
            name=text_of(obj.get("title")),
            description=text_of(obj.get("description")),
            image_urls=url_list(obj.get("imageURLHighRes")) or url_list(obj.get("imageURL")),
            keyword=" > ".join(c for c in cats if isinstance(c, str)) if isinstance(cats, list) else "",
            brand=text_of(obj.get("brand")),
        )


def build(*, reviews: Path, meta: Path | None, out: Path, config: BuildConfig, overwrite: bool = False) -> BuildSummary:
    """Build the MRHP tables of one category from the 2018 review (and metadata) dump."""
    return build_mrhp(Amazon2018(), reviews=reviews, meta=meta, out=out, config=config, overwrite=overwrite)
