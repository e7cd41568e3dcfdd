"""`mrhp predict RUN --input PATH`: rank the reviews of new products with a trained run.

Input: products in the MRHP format, either a folder holding `<category>.prd.<split>` and
`<category>.rvw.<split>` tables or the path of one `.prd.` table (its `.rvw.` sibling is used).
A `.rel.` sibling is optional; when present its labels are reported next to the scores.
Product and review ids must be non-empty strings (or integers) without path separators, as
`validate` requires, and unique, as the reader requires.

Featurising is the extraction's own code, never a copy of it, so new products reach the model
exactly as training data did (tests/mrhp/test_predict_features.py pins it bit for bit):
- rows: the dataset reader's `product_row`, `review_row`, `rel_row` and `labels_mode`
  (pipeline.datasets.mrhp), over tables read by `read_column_table`;
- texts: the tokens stage's `TokensStage.work_item` + `run` in the vocabulary the run was trained
  with (its `data.json`, read by `vocabularies_for`); probe masks (when the model reads them and
  the dataset has a probes view) by `ProbesStage.work_item` + `run` with the manifest's probes
  parameters; text-encoder
  rows (when the model reads the bert view) by `BertStage.work_item` + `run`;
- images: an item's refs as the reader lists them (`ImageIndex.refs`: `<images>/<split>/{prd,rvw}/
  <id>/pic_<n>_<i>.<ext>` in (n, i) order), resolved by `resolve_image` (a file resolving outside
  the image root is refused), looked up in the feature store by the sha256 of their bytes (the
  rois stage's key) under the run dataset's rois fingerprint;
- items: `models.data.review_item`, `token_ids`, `as_rois`, `concat_rois` and
  `text_encoder_rows`, which `StoreSource` uses for training data.
A model that needs image features (`required_views` includes rois) is not run text-only in
silence: when the image folder is absent, holds no image for the input, or some image has no
stored features, predict stops with a one-line DataError naming `mrhp extract --stage rois`,
unless the run's `allow_missing` or `--allow-missing rois` says so (then those images are left
out and counted). An image whose extraction was recorded as failed, or a ref whose file was
never crawled, adds no ROIs, as in training. A review whose probe mask the stage records as a
failure gets a mask of ones with one warning line counting them, or stops predict under the
run's `data.probe_failures: refuse`, as in training (`models.data.probe_fallback`); a model
that needs probe masks (or text-encoder features) is refused when the run's dataset has no
probes view (declares no text encoder).

Same settings as training: the stages above featurise with the current manifest, so before any
text is featurised predict compares, for every view the model reads, the fingerprint the run
recorded (data.json `read_views`: `store.view(dataset, stage).fingerprint` of each view training
read) with the `fingerprint()` of the stage it runs (tokens, probes, bert: what the extraction
computes for the manifest's settings) or, for rois, with the fingerprint of the entries it reads
(the dataset's current rois view). A difference is a one-line DataError naming the stage, both
fingerprints and the fix (re-extract and retrain, or predict with the manifest settings the run
used); a run folder without the record (trained before it existed) gets a one-line warning on
stderr that the check could not be made, and predicts; a view the model reads that the run was
trained without (allowed missing then) but predict now uses gets a warning line too.

Scores: by default the mean of the scores of every seed of the run (seed<k>/ folders; each
seed's model scores every review); `--seed K` uses seed K alone.

Output: JSON lines `{"product_id", "rank", "review_id", "score"[, "label", "votes"]}`, ranked by
score within each product, to --output or stdout; `--format table` prints a readable table
instead. With a `.rel.` table, `label` is the 0-4 helpfulness label, read the way the run's
training data was read (`labels` in the run's data.json: "labels" takes the column as labels,
"votes" maps raw vote counts v to min(floor(log2 v), 4); runs without that record use the
dataset's manifest setting, "auto" picking as the reader does), and `votes` the raw value of the
column; a 0-vote review gets no label (the reader drops it from training data).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

from models.runs import recorded_views, short_fp  # noqa: F401 - re-exported: predict's messages and tests
from pipeline.config import short_repr
from pipeline.errors import DataError, StageError, TrainingError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from models.config import DataConfig
    from models.data import InMemorySource, ProductItem, ReviewItem
    from pipeline.manifest import DatasetSpec
    from pipeline.records import ImageRef
    from pipeline.stage import Record, WorkItem


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict", help="rank the reviews of new products (MRHP format) with a trained run",
        description="Score and rank the reviews of products given as MRHP tables.",
    )
    p.add_argument("run", metavar="RUN", help="run name under the runs root, or a run folder")
    p.add_argument("--input", required=True, help="folder of MRHP tables, or one <category>.prd.<split> file")
    p.add_argument("--images", default=None,
                   help="image root holding <split>/{prd,rvw}/<id>/pic_*.jpg (default: <input folder>/pictures)")
    p.add_argument("--seed", type=int, default=None,
                   help="use only seed<K> of the run (default: average the scores of all its seeds)")
    p.add_argument("--output", default=None, help="write JSON lines here (default stdout)")
    p.add_argument("--format", choices=("jsonl", "table"), default="jsonl",
                   help="JSON lines (default) or a readable table")
    p.add_argument("--allow-missing", dest="allow_missing", action="extend", nargs="+", default=[],
                   metavar="VIEW", choices=("rois", "probes", "bert"),
                   help="rank even though these features are missing for the input (default: refuse "
                        "when the model needs them)")
    p.set_defaults(func=run)


def _table_sets(path: Path) -> list[tuple[Path, Path, Path | None, str, str]]:
    """(prd, rvw, rel or None, category, split) for every table set named by --input."""
    if path.is_file():
        prds = [path]
    elif path.is_dir():
        prds = sorted(p for p in path.iterdir() if ".prd." in p.name and not p.name.startswith("."))
    else:
        raise DataError(f"--input {path}: no such file or folder")
    if not prds:
        raise DataError(f"--input {path}: no <category>.prd.<split> table found")
    out = []
    for prd in prds:
        if ".prd." not in prd.name:
            raise DataError(f"--input {prd}: expected a <category>.prd.<split> table")
        category, split = prd.name.split(".prd.", 1)
        rvw = prd.with_name(f"{category}.rvw.{split}")
        rel = prd.with_name(f"{category}.rel.{split}")
        if not rvw.is_file():
            raise DataError(f"{prd}: its review table {rvw.name} is missing")
        out.append((prd, rvw, rel if rel.is_file() else None, category, split))
    return out


def check_id(value, path: Path, row: str, column: str) -> str:
    """An id cell as `validate` accepts it: a non-empty string or an integer, no path parts."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{path}: row {short_repr(row)} column {column!r}: expected an id string, "
                        f"got {short_repr(value)}")
    text = str(value)
    if not text.strip() or "/" in text or "\\" in text or text in (".", "..") or "\0" in text:
        raise DataError(f"{path}: row {short_repr(row)} column {column!r}: id {short_repr(text)} is empty "
                        "or holds a path separator")
    return text


class _Rois:
    """ROI features of image files already in the store (by content hash, the rois stage's key).

    Images are an item's refs as the dataset reader lists them (`ImageIndex.refs`), resolved by
    `resolve_image` (a path leaving the image root is a DataError); a ref without a file (a URL
    never crawled) adds no ROIs, as the stage's failure record does in training. Counts `files`
    (image files of the input), `found` (features stored), `failed` (extraction recorded as
    failed: no ROIs, as in training) and `missing` (never extracted). Store errors propagate."""

    def __init__(self, store_root: Path, dataset: str, cfg: DataConfig) -> None:
        from pipeline.store import FeatureStore

        self.cfg = cfg
        self.found = self.missing = self.failed = self.files = 0
        self.missing_examples: list[str] = []
        store = FeatureStore(store_root)
        self.has_view = any(v.dataset == dataset and v.stage == "rois" for v in store.views())
        # the fingerprint of the rois entries read: the dataset's rois view's (checked against the run's)
        self.fingerprint = store.view(dataset, "rois").fingerprint if self.has_view else None
        self.reader = store.reader("rois", self.fingerprint) if self.fingerprint is not None else None

    def __call__(self, spec: DatasetSpec | None, refs: Sequence[ImageRef]) -> np.ndarray:
        """The item's ROIs as `StoreSource` builds them (`as_rois` per image, `concat_rois`);
        `spec` None: no image folder."""
        from models.data import as_rois, concat_rois
        from pipeline.datasets.mrhp import resolve_image
        from pipeline.hashing import sha256_file

        per: list[np.ndarray] = []
        if spec is None:
            return concat_rois(per, self.cfg)
        for ref in refs:
            full = resolve_image(spec, ref)
            if not full.is_file():
                continue
            self.files += 1
            key = sha256_file(full) if self.reader is not None else None
            if self.reader is None or key not in self.reader:
                if self.reader is not None and self.reader.failure(key) is not None:
                    self.failed += 1
                    continue
                self.missing += 1
                if len(self.missing_examples) < 3:
                    self.missing_examples.append(str(full))
                continue
            self.found += 1
            per.append(as_rois(self.reader.get(key)["features"], self.cfg.roi_dim, f"rois of image {full}"))
        return concat_rois(per, self.cfg)

    def check_setup(self, *, needed: bool, images: Path | None, dataset: str) -> None:
        """The refusals that need no input item (no rois view, no image folder): `load_input`
        makes them before any text is featurised."""
        if not needed:
            return
        if not self.has_view:
            raise DataError(f"the model needs image features, but dataset {dataset!r} has no rois view: "
                            f"build it with `mrhp extract --dataset {dataset} --stage rois` "
                            "(or pass --allow-missing rois)")
        if images is None:
            raise DataError("the model needs image features, but the image folder (--images, default "
                            "<input folder>/pictures) does not exist: pass --images, or --allow-missing rois")

    def check(self, *, needed: bool, images: Path | None, dataset: str) -> None:
        """Refuse to rank without image features the model needs (see the module docstring)."""
        if not needed:
            return
        self.check_setup(needed=needed, images=images, dataset=dataset)
        fix = (f"run `mrhp extract --dataset <a dataset holding these images> --stage rois` (the run's "
               f"dataset is {dataset!r}) or pass --allow-missing rois to rank without them")
        if self.files == 0:
            raise DataError(f"the model needs image features, but --images {images} holds no "
                            "<split>/{prd,rvw}/<id>/pic_* file for any input item: check --images, or pass "
                            "--allow-missing rois")
        if self.missing:
            raise DataError(f"{self.missing} of {self.files} input images have no features in the store "
                            f"(e.g. {self.missing_examples[0]}): {fix}")


def rel_labels(values: dict[str, float], mode: str, where: str) -> tuple[dict[str, float], dict[str, float]]:
    """(review id -> 0-4 label, review id -> raw column value) of a rel table's upvotes, read as
    the dataset reader reads them (`mode`: the dataset's labels setting, "auto" resolved by the
    reader's `labels_mode`). A 0-vote review (vote mode) has no label."""
    from pipeline.datasets.mrhp import MAX_LABEL, labels_mode, votes_to_label

    mode = labels_mode(mode, values.values())
    labels: dict[str, float] = {}
    for rid, v in values.items():
        if mode == "labels":
            if not (float(v).is_integer() and 0 <= v <= MAX_LABEL):
                raise DataError(f"{where}: review {rid!r}: upvotes {v:g} is not a label 0..{MAX_LABEL} "
                                f"(the run's dataset reads labels)")
            labels[rid] = float(v)
        else:
            if not float(v).is_integer() or v < 0:
                raise DataError(f"{where}: review {rid!r}: upvotes {v:g} is not a vote count")
            if v > 0:
                labels[rid] = float(votes_to_label(int(v)))
    return labels, dict(values)


def stage_records(stage, items: Sequence[WorkItem]) -> list[Record]:
    """`stage.run` over `items` (each distinct key computed once, as the runner does), one
    record per item in order: the extraction's own per-record compute, not a copy of it."""
    unique = list({it.key: it for it in items}.values())
    by_key = {r.key: r for r in stage.run(unique)}
    missing = [it.key for it in unique if it.key not in by_key]
    if missing:
        raise StageError(f"the {stage.name} stage returned no record for {len(missing)} input item(s)")
    return [by_key[it.key] for it in items]


def _arrays(rec: Record) -> dict[str, np.ndarray]:
    """A tokens record's arrays (the tokens stage records every text, an empty one included)."""
    if rec.arrays is None:
        raise DataError(f"tokens of an input text failed: {rec.failure}")
    return rec.arrays


def load_input(path: Path, images: Path | None, *, spec, vocab_fp: str | None, manifest, cfg: DataConfig,
               dataset: str, labels_mode: str | None = None, probes_needed: bool = False,
               probes_read: bool = True, bert_needed: bool = False, rois_needed: bool = False,
               check: Callable[[dict[str, str]], None] | None = None,
               warn: Callable[[str], None] | None = None) -> tuple[InMemorySource, _Rois]:
    """Read the MRHP tables named by `path` into an in-memory source in the run's vocabulary;
    each review's `label` is its 0-4 label (NaN without one), raw votes in `source.votes`.
    `probes_read` False (a model that reads no probe masks): the probes stage is not run.
    `rois_needed`: a missing rois view or image folder is refused first (`_Rois.check_setup`).
    `check`, when given, is called before any text is featurised with {stage: fingerprint} of
    the stages that will featurise the input (tokens; probes and bert when run: their
    `fingerprint()`, as the extraction computes it) and of the rois entries read (the dataset's
    rois view's fingerprint, when there is one); `run` passes `check_fingerprints`.
    Reviews whose probes record is a failure go through `models.data.probe_fallback` per table
    set, as training's splits do: under `cfg.probe_failures: refuse` a DataError naming the first,
    else one warning line through `warn` (default: stderr) and a mask of ones.

    Rows are parsed by the dataset reader's row functions (`product_row`, `review_row`,
    `rel_row`), texts featurised by the tokens (and probes, bert) stages' `work_item` + `run`,
    images listed by the reader's `ImageIndex`, and items assembled by `models.data.review_item`
    / `token_ids`, exactly as the extraction and `StoreSource` do for training data."""
    from features.text.tokens import build_stage as tokens_stage
    from models.data import InMemorySource, ProductItem, probe_fallback, review_item, token_ids
    from pipeline.datasets.mrhp import (
        PRD_COLUMNS,
        PRD_OPTIONAL,
        REL_COLUMNS,
        RVW_COLUMNS,
        RVW_OPTIONAL,
        ImageIndex,
        product_row,
        rel_row,
        review_row,
    )
    from pipeline.datasets.tables import read_column_table

    if vocab_fp is None:
        raise TrainingError("the run has no recorded vocabulary fingerprint (data.json); retrain with `mrhp train`")
    tokens = tokens_stage(manifest, dataset)  # the dataset's records are never read (no plan())
    vocabs = tokens.vocabularies_for(vocab_fp)  # the run's vocabulary, read from the store
    rois = _Rois(manifest.store_root, dataset, cfg)
    # no rois view / no image folder: refused before any text is featurised (`run` checks the rest after)
    rois.check_setup(needed=rois_needed, images=images, dataset=dataset)
    folder = path if path.is_dir() else path.parent
    # the input as a dataset: the run dataset's conventions (source, language), the input's folders
    in_spec = dataclasses.replace(spec, name=str(path), raw_root=folder,
                                  image_root=images if images is not None else folder / "pictures")
    index = ImageIndex(Path(in_spec.image_root))
    image_spec = in_spec if images is not None else None
    products: list[ProductItem] = []
    votes: dict[str, float] = {}
    seen_products: set[str] = set()
    seen_reviews: set[str] = set()
    # built once (spaCy loads once); only for a model that reads probe masks (`probes_read`: training
    # never opens the probes view for another, so its failures must not warn or refuse here either)
    probes = probes_stage(manifest, spec, dataset, needed=probes_needed) if probes_read or probes_needed else None
    bert = bert_stage(manifest, dataset) if bert_needed else None
    if check is not None:
        used = {"tokens": tokens.fingerprint()}
        if probes is not None:
            used["probes"] = probes.fingerprint()
        if bert is not None:
            used["bert"] = bert.fingerprint()
        if rois.fingerprint is not None:
            used["rois"] = rois.fingerprint
        check(used)
    for prd_path, rvw_path, rel_path, category, split in _table_sets(path):
        pkeys, pt = read_column_table(prd_path, PRD_COLUMNS, PRD_OPTIONAL)
        rkeys, rt = read_column_table(rvw_path, RVW_COLUMNS, RVW_OPTIONAL)
        labels: dict[str, float] = {}
        if rel_path is not None:
            lkeys, lt = read_column_table(rel_path, REL_COLUMNS)
            raw: dict[str, float] = {}
            for k in lkeys:
                check_id(lt["review_id"][k], rel_path, k, "review_id")
                _, rid, value = rel_row(lt, k, rel_path)
                raw[rid] = value
            labels, got = rel_labels(raw, labels_mode or spec.labels, str(rel_path))
            votes.update(got)
        for k in pkeys:
            check_id(pt["product_id"][k], prd_path, k, "product_id")
        prods = [product_row(in_spec, category, split, pt, k, prd_path, index) for k in pkeys]
        for k, prod in zip(pkeys, prods, strict=True):
            if prod.id in seen_products:
                raise DataError(f"{prd_path}: row {short_repr(k)}: duplicate product_id {short_repr(prod.id)}")
            seen_products.add(prod.id)
        ptoks = [_arrays(r) for r in stage_records(tokens, [tokens.work_item("prd", p.text, vocabs) for p in prods])]
        by_pid: dict[str, ProductItem] = {}
        for prod, tok in zip(prods, ptoks, strict=True):
            item = ProductItem(id=prod.id, tokens=token_ids(tok, cfg), rois=rois(image_spec, prod.images))
            by_pid[prod.id] = item
            products.append(item)
        rows = []
        for k in rkeys:
            rid = check_id(rt["review_id"][k], rvw_path, k, "review_id")
            pid = check_id(rt["product_id"][k], rvw_path, k, "product_id")
            if pid not in by_pid:
                raise DataError(f"{rvw_path}: row {k!r}: review {rid!r} names product {pid!r}, not in {prd_path.name}")
            if rid in seen_reviews:
                raise DataError(f"{rvw_path}: row {short_repr(k)}: duplicate review_id {short_repr(rid)}")
            seen_reviews.add(rid)
            rows.append(review_row(rt, k, rvw_path))
        rtoks = [_arrays(r) for r in stage_records(tokens, [tokens.work_item("rvw", r.text, vocabs) for r in rows])]
        by_id = {p.id: p for p in prods}
        masks = _mask_records(probes, [r.text for r in rows], [by_id[r.product_id] for r in rows])
        failed = [(row.id, why) for row, (_, why) in zip(rows, masks, strict=True) if why is not None]
        if probes is not None:  # reviews scored with a mask of ones: said, or refused (data.probe_failures)
            probe_fallback(rvw_path.name, len(rows), failed, policy=cfg.probe_failures, use="are scored",
                           say=warn or (lambda line: print(line, file=sys.stderr)))
        texts: list[tuple[ProductItem | ReviewItem, str]] = [(by_pid[p.id], p.text) for p in prods]
        for row, tok, (mask, _) in zip(rows, rtoks, masks, strict=True):
            review = review_item(
                row.id, tok, mask, rois(image_spec, index.refs(split, "rvw", row.id, row.urls)),
                labels.get(row.id, float("nan")), cfg, f"{rvw_path}: review {row.id!r}",
            )
            by_pid[row.product_id].reviews.append(review)
            texts.append((review, row.text))
        if bert is not None:
            attach_text_features(bert, texts)
    products = [p for p in products if p.reviews]
    if not products:
        raise DataError(f"--input {path}: no product with reviews")
    source = InMemorySource(products, roi_dim=cfg.roi_dim)
    source.votes = votes  # review id -> raw rel value, for the output's `votes` field
    return source, rois


CHECKED_STAGES = ("tokens", "probes", "bert", "rois")  # the features predict builds or reads, in order


def check_fingerprints(recorded: Mapping[str, str] | None, used: Mapping[str, str], *, run: str, dataset: str,
                       manifest_path: str, warn: Callable[[str], None]) -> None:
    """Refuse to featurise new products with other stage settings than the run was trained on.

    `recorded`: {stage: fingerprint} of the views the run read (`recorded_views`; None: a run from
    before they were recorded, which gets one warning that the check could not be made);
    `used`: {stage: fingerprint} of what predict featurises the input with, limited to the views
    the model reads. A stage whose fingerprints differ is a one-line DataError naming the stage,
    both fingerprints (short) and what to do. A stage the run did not read (its view was missing
    and allowed in training) but predict uses gets one warning line: the model sees features it
    was trained without."""
    if recorded is None:
        warn(f"warning: run {run!r} records no view fingerprints (data.json from before they were recorded): "
             "predict cannot check that it featurises with the stage settings the run was trained on; "
             "retrain the run to get the check")
        return
    for stage in CHECKED_STAGES:
        if stage not in used:
            continue
        fp = used[stage]
        was = recorded.get(stage)
        if was is None:
            warn(f"warning: run {run!r} was trained without a {stage} view of dataset {dataset!r}, but predict "
                 f"gives the model {stage} features (fingerprint {short_fp(fp)}) it never saw in training")
            continue
        if was == fp:
            continue
        if stage == "rois":
            raise DataError(
                f"rois: run {run!r} was trained on rois fingerprint {short_fp(was, fp)}, but the store's rois "
                f"view of dataset {dataset!r} now has {short_fp(fp, was)} (re-extracted with other settings "
                f"since training): retrain on the current rois (`mrhp train`), or predict from a store "
                f"holding the rois the run was trained on")
        raise DataError(
            f"{stage}: run {run!r} was trained on {stage} fingerprint {short_fp(was, fp)}, but the manifest "
            f"{manifest_path} now gives {short_fp(fp, was)} (stages.{stage} or its resources changed since "
            f"training): re-extract (`mrhp extract --dataset {dataset} --stage {stage}`) and retrain, or "
            f"predict with the manifest settings the run was trained with")


def bert_stage(manifest, dataset: str):
    """The bert stage of the run's dataset, computing new texts' encoder rows; refused when the
    dataset declares no text encoder."""
    from features.text.bert import build_stage

    stage = build_stage(manifest, dataset)
    if stage.encoder_spec is None:
        raise DataError(f"the model reads text-encoder features, but dataset {dataset!r} declares no "
                        f"text_encoder: set datasets.{dataset}.text_encoder in the manifest "
                        "(or pass --allow-missing bert)")
    return stage


def attach_text_features(stage, texts: Sequence[tuple[ProductItem | ReviewItem, str]]) -> None:
    """Set each item's text-encoder rows from its text (a product's `product_text`, a review's
    content), computed by the bert stage (`work_item` + `run`) and read as `StoreSource` reads
    the stored ones (`models.data.text_encoder_rows`)."""
    from models.data import text_encoder_rows

    recs = stage_records(stage, [stage.work_item(text) for _, text in texts])
    hidden = stage.schema["features"].shape[0]
    for (item, _), rec in zip(texts, recs, strict=True):
        item.text_feats, item.text_ids = text_encoder_rows(
            rec.arrays, rec.failure, lambda: hidden, f"bert features of input item {item.id!r}")


def probes_stage(manifest, spec, dataset: str, *, needed: bool = False):
    """The probes stage computing new reviews' masks with the manifest's probes parameters, or
    None when the run's dataset has no probes view and the model does not need one (refused
    when it does)."""
    from features.text.probes import ProbesStage
    from pipeline.store import FeatureStore

    if not any(v.dataset == dataset and v.stage == "probes" for v in FeatureStore(manifest.store_root).views()):
        if needed:
            raise DataError(
                f"the model needs probe masks, but dataset {dataset!r} has no probes view: build it with "
                f"`mrhp extract --dataset {dataset} --stage probes` (or pass --allow-missing probes)"
            )
        return None
    # one process: n_process changes no output (it is not in the stage fingerprint)
    params = dataclasses.replace(manifest.stage_params("probes"), n_process=1)
    return ProbesStage(params=params, language=spec.language, dataset=dataset, records_loader=None)


def _mask_records(stage, reviews: Sequence[str], products: Sequence) -> list[tuple[np.ndarray | None, str | None]]:
    """(mask, failure reason) of each review from the probes stage (`work_item` + `run`): the
    mask, or None with the reason where the stage records a failure; (None, None) for every
    review when there is no stage."""
    if stage is None:
        return [(None, None)] * len(reviews)
    named = [SimpleNamespace(name=p) if isinstance(p, str) else p for p in products]
    recs = stage_records(stage, [stage.work_item(text, p) for text, p in zip(reviews, named, strict=True)])
    return [(r.arrays["mask"], None) if r.arrays is not None else (None, r.failure or "unknown failure")
            for r in recs]


def _masks(stage, reviews: Sequence[str], products: Sequence) -> list:
    """Each review's mask from the probes stage, None where the stage records a failure (plain
    attention, as in training: counted, said or refused by `models.data.probe_fallback` in
    `load_input`) or there is no stage."""
    return [m for m, _ in _mask_records(stage, reviews, products)]


def probe_masks(manifest, spec, dataset: str, reviews: Sequence[str], products: Sequence, *,
                needed: bool = False) -> list:
    """Probe masks over the raw tokens of new reviews (`products`: each review's product, a
    `Product` or its name), computed by the probes stage itself (see `probes_stage`, `_masks`)."""
    return _masks(probes_stage(manifest, spec, dataset, needed=needed), reviews, products)


def _aligned_probe(mask: np.ndarray | None, enc) -> np.ndarray:
    """The probe mask at the kept token positions, as training aligns it (`models.data.aligned_probe`)."""
    from models.config import DataConfig
    from models.data import aligned_probe

    return aligned_probe({"ids": enc.ids, "pos": enc.pos}, mask, DataConfig(), "review")


def average_seeds(per_seed: list[list[dict]]) -> list[dict]:
    """One prediction per review: the mean score over the seeds (every seed scored the same
    reviews in the same order)."""
    import numpy as np

    first = per_seed[0]
    for k, preds in enumerate(per_seed[1:], 1):
        if [p["review_id"] for p in preds] != [p["review_id"] for p in first]:
            raise TrainingError(f"seed {k} scored different reviews than seed 0")
    scores = np.mean([[p["score"] for p in preds] for preds in per_seed], axis=0)
    return [{**p, "score": float(s)} for p, s in zip(first, scores, strict=True)]


def ranked(preds: list[dict], votes: dict[str, float] | None = None) -> list[dict]:
    """Predictions grouped by product (input order) and ranked by score (stable); `label` is the
    0-4 label when known, `votes` the raw rel value when given."""
    import numpy as np

    votes = votes or {}
    groups: dict[str, list[dict]] = {}
    for p in preds:
        groups.setdefault(p["product_id"], []).append(p)
    out = []
    for pid, rows in groups.items():
        order = np.argsort(-np.array([r["score"] for r in rows]), kind="stable")
        for rank, i in enumerate(order, 1):
            r = rows[i]
            rec = {"product_id": pid, "rank": rank, "review_id": r["review_id"], "score": r["score"]}
            if not np.isnan(r["label"]):
                rec["label"] = int(r["label"])
            if r["review_id"] in votes:
                v = votes[r["review_id"]]
                rec["votes"] = int(v) if float(v).is_integer() else v
            out.append(rec)
    return out


def run(args: argparse.Namespace) -> int:
    from models.data import required_views, store_embeddings
    from models.runs import read_json, resolve_run, seed_dirs
    from models.trainer import load_run, score_source
    from pipeline.manifest import load_manifest

    manifest = load_manifest(args.manifest)
    dirs = seed_dirs(resolve_run(manifest.roots.runs, args.run))
    if args.seed is None:
        chosen = dirs
    else:
        # a lone folder that is not a seed<k> one (a run folder given directly) serves any --seed;
        # a lone seed<k> folder serves --seed k only, never another seed's request
        lone = len(dirs) == 1 and not (dirs[0].name.startswith("seed") and dirs[0].name[4:].isdigit())
        chosen = [d for d in dirs if d.name == f"seed{args.seed}"] or (dirs if lone else [])
    if not chosen:
        raise TrainingError(f"run {args.run!r} has no seed{args.seed}; found {', '.join(d.name for d in dirs)}")
    metas = [read_json(d / "data.json") for d in chosen]
    meta = metas[0]
    views = [recorded_views(m, str(d / "data.json")) for d, m in zip(chosen, metas, strict=True)]
    for d, m, v in zip(chosen[1:], metas[1:], views[1:], strict=True):
        if ((m.get("dataset"), m.get("vocab_fingerprint"), v)
                != (meta.get("dataset"), meta.get("vocab_fingerprint"), views[0])):
            raise TrainingError(f"{d}: trained on other data ({m.get('dataset')}: dataset, vocabulary or view "
                                f"fingerprints) than {chosen[0].name}; pick one with --seed")
    dataset = meta["dataset"]
    spec = manifest.dataset(dataset)
    embeddings = store_embeddings(manifest.store_root, dataset)
    models = [load_run(d, embeddings=embeddings) for d in chosen]
    cfg = models[0][1]
    inp = Path(args.input)
    images = Path(args.images) if args.images else (inp if inp.is_dir() else inp.parent) / "pictures"
    allowed = set(cfg.allow_missing) | set(args.allow_missing or ())
    reads = required_views(cfg.model, cfg.model_cfg)
    needed = reads - allowed
    image_root = images if images.is_dir() else None

    def check(used: dict[str, str]) -> None:  # only the features the model reads matter
        check_fingerprints(views[0], {s: fp for s, fp in used.items() if s in reads}, run=args.run,
                           dataset=dataset, manifest_path=str(manifest.path),
                           warn=lambda line: print(line, file=sys.stderr))

    source, rois = load_input(inp, image_root, spec=spec,
                              vocab_fp=meta.get("vocab_fingerprint"), manifest=manifest, cfg=cfg.data,
                              dataset=dataset, labels_mode=meta.get("labels"),
                              probes_needed="probes" in needed, probes_read="probes" in reads,
                              bert_needed="bert" in needed, rois_needed="rois" in needed, check=check)
    rois.check(needed="rois" in needed, images=image_root, dataset=dataset)
    per_seed = [score_source(model, source, cfg=c) for model, c in models]
    rows = ranked(average_seeds(per_seed), getattr(source, "votes", None))
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        if args.format == "jsonl":
            for r in rows:
                out.write(json.dumps(r) + "\n")
        else:
            out.write(f"{'product':<20}{'rank':>5}  {'review':<24}{'score':>10}\n")
            for r in rows:
                out.write(f"{r['product_id']:<20}{r['rank']:>5}  {r['review_id']:<24}{r['score']:>10.4f}\n")
    finally:
        if out is not sys.stdout:
            out.close()
    print(f"predict: {len(source.product_ids)} products, {len(rows)} reviews ranked "
          f"(mean score of {len(chosen)} seed{'s' if len(chosen) > 1 else ''}: "
          f"{', '.join(d.name for d in chosen)}); images with "
          f"stored features {rois.found}, without {rois.missing}, failed {rois.failed}"
          + (f"; allowed missing: {', '.join(sorted(allowed))}" if allowed else ""), file=sys.stderr)
    return 0
