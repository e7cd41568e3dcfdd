"""Amazon Reviews 2023 (Hou et al.) -> MRHP format.

Reviews: JSON lines with `rating, title, text, images, asin, parent_asin, user_id, timestamp,
helpful_vote, verified_purchase`; `images` is a list of objects with
`large_image_url/medium_image_url/small_image_url`. Metadata: `parent_asin, title, description`
(list), `features` (list), `images` (objects with `hi_res/large/thumb`), `store`,
`main_category`, `categories`. Products are grouped by `parent_asin` (the 2023 release keys its
metadata by it; `asin` is the fallback); review id = `<parent_asin>-<n>`; review text = `text`;
product description = description paragraphs followed by the feature bullets.
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


def _product_id(obj: dict[str, Any]) -> str:
    for key in ("parent_asin", "asin"):
        v = obj.get(key)
        if isinstance(v, str) and v.strip():
            return v.strip()
    raise ValueError("no parent_asin or asin")


def _votes(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != int(value):
        raise ValueError(f"helpful_vote {value!r} is not a count")
    return int(value)


class Amazon2023:
    """Source adapter for the 2023 dump."""

    name = "amazon2023"

    def review(self, obj: dict[str, Any]) -> SourceReview:
        return SourceReview(
            product_id=_product_id(obj),
            votes=_votes(obj.get("helpful_vote")),
            text=text_of(obj.get("text")),
            title=text_of(obj.get("title")),
            time=obj.get("timestamp"),
            image_urls=url_list(obj.get("images"), ("large_image_url", "medium_image_url", "small_image_url")),
            reviewer=text_of(obj.get("user_id")),
        )

    def product(self, obj: dict[str, Any]) -> SourceProduct:
        description = " ".join(t for t in (text_of(obj.get("description")), text_of(obj.get("features"))) if t)
        cats = obj.get("categories")
        keyword = " > ".join(c for c in cats if isinstance(c, str)) if isinstance(cats, list) and cats else ""
        return SourceProduct(
            product_id=_product_id(obj),
            name=text_of(obj.get("title")),
            description=description,
            image_urls=url_list(obj.get("images"), ("hi_res", "large", "thumb")),
            keyword=keyword or text_of(obj.get("main_category")),
            brand=text_of(obj.get("store")),
        )


def build(*, reviews: Path, meta: Path | None, out: Path, config: BuildConfig, overwrite: bool = False) -> BuildSummary:
    """Build the MRHP tables of one category from the 2023 review (and metadata) files."""
    return build_mrhp(Amazon2023(), reviews=reviews, meta=meta, out=out, config=config, overwrite=overwrite)
