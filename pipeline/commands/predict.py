"""`mrhp predict RUN --input PATH`: rank the reviews of new products with a trained run.

Input: products in the MRHP format, either a folder holding `<category>.prd.<split>` and
`<category>.rvw.<split>` tables or the path of one `.prd.` table (its `.rvw.` sibling is used).
A `.rel.` sibling is optional; when present its labels are reported next to the scores.
Product and review ids must be non-empty strings (or integers) without path separators, as
`validate` requires; image files are `<images>/<split>/{prd,rvw}/<id>/pic_*` and may not
resolve (symlinks) outside the image root.
Texts are tokenized exactly as the tokens stage does (`features.text.tokens.encode_texts`) in
the vocabulary the run was trained with (its `data.json`). Images are looked up in the feature
store by the sha256 of their bytes under the run dataset's rois fingerprint. A model that needs
image features (`required_views` includes rois) is not run text-only in silence: when the
image folder is absent, holds no image for the input, or some image has no stored features,
predict stops with a one-line DataError naming `mrhp extract --stage rois`, unless the run's
`allow_missing` or `--allow-missing rois` says so (then those images are left out and counted).
An image whose extraction was recorded as failed adds no ROIs, as in training. When the model
needs probe masks, new reviews get masks computed the way the probes stage does
(`features.text.probes.ProbeMasker` with the manifest's probes parameters); a review whose mask
cannot be computed gets a mask of ones; a dataset without a probes view is refused likewise.

Output: JSON lines `{"product_id", "rank", "review_id", "score"[, "label"]}`, ranked by score
within each product, to --output or stdout; `--format table` prints a readable table instead.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from models.config import DataConfig
from models.data import InMemorySource, ProductItem, ReviewItem, concat_rois, required_views, store_embeddings
from models.runs import read_json, resolve_run, seed_dirs
from models.trainer import load_run, score_source
from pipeline.datasets.mrhp import (
    PRD_COLUMNS, PRD_OPTIONAL, REL_COLUMNS, RVW_COLUMNS, RVW_OPTIONAL, parse_img_urls, product_text,
)
from pipeline.datasets.tables import read_column_table
from pipeline.config import short_repr
from pipeline.errors import DataError, TrainingError
from pipeline.hashing import sha256_file
from pipeline.manifest import load_manifest


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict", help="rank the reviews of new products (MRHP format) with a trained run",
        description="Score and rank the reviews of products given as MRHP tables.",
    )
    p.add_argument("run", metavar="RUN", help="run name under the runs root, or a run folder")
    p.add_argument("--input", required=True, help="folder of MRHP tables, or one <category>.prd.<split> file")
    p.add_argument("--images", default=None,
                   help="image root holding <split>/{prd,rvw}/<id>/pic_*.jpg (default: <input folder>/pictures)")
    p.add_argument("--seed", type=int, default=0, help="which seed<k> run to use (default 0)")
    p.add_argument("--output", default=None, help="write JSON lines here (default stdout)")
    p.add_argument("--format", choices=("jsonl", "table"), default="jsonl")
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


def _image_files(root: Path | None, split: str, kind: str, item_id: str) -> list[Path]:
    """`<root>/<split>/<kind>/<id>/pic_*` files, each resolving inside the image root."""
    if root is None:
        return []
    folder = root / split / kind / item_id
    if not folder.is_dir():
        return []
    base = root.resolve()
    out = []
    for p in sorted(folder.iterdir()):
        if not p.name.startswith("pic_"):
            continue
        try:
            full = p.resolve(strict=True)
        except (OSError, RuntimeError) as e:  # dangling link, loop
            raise DataError(f"image {p} cannot be resolved ({e})") from None
        if not full.is_relative_to(base):
            raise DataError(f"image {p} resolves to {full}, outside the image root {base}")
        if full.is_file():
            out.append(full)
    return out


class _Rois:
    """ROI features of image files already in the store (by content hash).

    Counts `found` (features stored), `failed` (extraction recorded as failed: no ROIs, as in
    training) and `missing` (never extracted). Store errors (damage) propagate."""

    def __init__(self, store_root: Path, dataset: str, cfg: DataConfig) -> None:
        from pipeline.store import FeatureStore

        self.cfg = cfg
        self.found = self.missing = self.failed = self.files = 0
        self.missing_examples: list[str] = []
        store = FeatureStore(store_root)
        self.has_view = any(v.dataset == dataset and v.stage == "rois" for v in store.views())
        self.reader = store.reader("rois", store.view(dataset, "rois").fingerprint) if self.has_view else None

    def __call__(self, files: list[Path]) -> np.ndarray:
        per = []
        for f in files:
            self.files += 1
            key = sha256_file(f) if self.reader is not None else None
            if key is None or key not in self.reader:
                if key is not None and self.reader.failure(key) is not None:
                    self.failed += 1
                    continue
                self.missing += 1
                if len(self.missing_examples) < 3:
                    self.missing_examples.append(str(f))
                continue
            self.found += 1
            per.append(np.asarray(self.reader.get(key)["features"], dtype=np.float32))
        return concat_rois(per, self.cfg)

    def check(self, *, needed: bool, images: Path | None, dataset: str) -> None:
        """Refuse to rank without image features the model needs (see the module docstring)."""
        if not needed:
            return
        fix = (f"run `mrhp extract --dataset <a dataset holding these images> --stage rois` (the run's "
               f"dataset is {dataset!r}) or pass --allow-missing rois to rank without them")
        if not self.has_view:
            raise DataError(f"the model needs image features, but dataset {dataset!r} has no rois view: "
                            f"build it with `mrhp extract --dataset {dataset} --stage rois` "
                            "(or pass --allow-missing rois)")
        if images is None:
            raise DataError("the model needs image features, but the image folder (--images, default "
                            "<input folder>/pictures) does not exist: pass --images, or --allow-missing rois")
        if self.files == 0:
            raise DataError(f"the model needs image features, but --images {images} holds no "
                            "<split>/{prd,rvw}/<id>/pic_* file for any input item: check --images, or pass "
                            "--allow-missing rois")
        if self.missing:
            raise DataError(f"{self.missing} of {self.files} input images have no features in the store "
                            f"(e.g. {self.missing_examples[0]}): {fix}")


def load_input(path: Path, images: Path | None, *, spec, vocab_fp: str | None, manifest, cfg: DataConfig,
               dataset: str, probes_needed: bool = False) -> tuple[InMemorySource, _Rois]:
    """Read the MRHP tables named by `path` into an in-memory source in the run's vocabulary."""
    try:
        from features.text.tokens import encode_texts, load_vocabularies
    except ImportError as e:  # pragma: no cover - the tokens stage ships with the package
        raise TrainingError(f"predict needs the tokens stage (features.text.tokens): {e}") from None
    if vocab_fp is None:
        raise TrainingError("the run has no recorded vocabulary fingerprint (data.json); retrain with `mrhp train`")
    prd_vocab, rvw_vocab = load_vocabularies(manifest, dataset, fingerprint=vocab_fp)
    max_len = manifest.stage_params("tokens").max_len
    rois = _Rois(manifest.store_root, dataset, cfg)
    products: list[ProductItem] = []
    for prd_path, rvw_path, rel_path, category, split in _table_sets(path):
        pkeys, pt = read_column_table(prd_path, PRD_COLUMNS, PRD_OPTIONAL)
        rkeys, rt = read_column_table(rvw_path, RVW_COLUMNS, RVW_OPTIONAL)
        labels: dict[str, float] = {}
        if rel_path is not None:
            lkeys, lt = read_column_table(rel_path, REL_COLUMNS)
            for k in lkeys:
                votes = lt["upvotes"][k]
                if isinstance(votes, bool) or not isinstance(votes, (int, float)):
                    raise DataError(f"{rel_path}: row {short_repr(k)} column 'upvotes': expected a number, "
                                    f"got {short_repr(votes)}")
                labels[check_id(lt["review_id"][k], rel_path, k, "review_id")] = float(votes)
        pids = [check_id(pt["product_id"][k], prd_path, k, "product_id") for k in pkeys]
        ptexts = [product_text(spec, category, str(pt["name"][k] or ""), str(pt["description"][k] or ""))
                  for k in pkeys]
        penc = encode_texts(ptexts, prd_vocab, language=spec.language, max_len=max_len)
        by_pid: dict[str, ProductItem] = {}
        for k, pid, enc in zip(pkeys, pids, penc):
            parse_img_urls(pt["img_url"][k], prd_path, k)  # validates the cell
            item = ProductItem(id=pid, tokens=enc.ids.astype(np.int64),
                               rois=rois(_image_files(images, split, "prd", pid)))
            by_pid[pid] = item
            products.append(item)
        rtexts = [str(rt["content"][k] or "") for k in rkeys]
        renc = encode_texts(rtexts, rvw_vocab, language=spec.language, max_len=max_len)
        names = {pid: str(pt["name"][k] or "") for k, pid in zip(pkeys, pids)}
        masks = probe_masks(manifest, spec, dataset, rtexts,
                            [names.get(str(rt["product_id"][k]), "") for k in rkeys], needed=probes_needed)
        for k, enc, mask in zip(rkeys, renc, masks):
            rid = check_id(rt["review_id"][k], rvw_path, k, "review_id")
            pid = check_id(rt["product_id"][k], rvw_path, k, "product_id")
            if pid not in by_pid:
                raise DataError(f"{rvw_path}: row {k!r}: review {rid!r} names product {pid!r}, not in {prd_path.name}")
            by_pid[pid].reviews.append(ReviewItem(
                id=rid, tokens=enc.ids.astype(np.int64), rois=rois(_image_files(images, split, "rvw", rid)),
                probe=_aligned_probe(mask, enc), label=labels.get(rid, float("nan")),
                length=float(enc.n_raw),
            ))
    products = [p for p in products if p.reviews]
    if not products:
        raise DataError(f"--input {path}: no product with reviews")
    return InMemorySource(products, roi_dim=cfg.roi_dim), rois


def probe_masks(manifest, spec, dataset: str, reviews: list[str], names: list[str], *,
                needed: bool = False) -> list:
    """Probe masks over the raw tokens of new reviews, as the probes stage computes them, or
    Nones when the model does not need them and the run's dataset has no probes view."""
    from pipeline.store import FeatureStore

    if not any(v.dataset == dataset and v.stage == "probes" for v in FeatureStore(manifest.store_root).views()):
        if needed:
            raise DataError(
                f"the model needs probe masks, but dataset {dataset!r} has no probes view: build it with "
                f"`mrhp extract --dataset {dataset} --stage probes` (or pass --allow-missing probes)"
            )
        return [None] * len(reviews)
    from features.text.probes import ProbeMasker, ProbeResult

    p = manifest.stage_params("probes")
    masker = ProbeMasker(language=spec.language, mode=p.mode, coref=p.coref,
                         near_root=p.near_root, batch_size=p.batch_size)
    return [r.mask if isinstance(r, ProbeResult) else None for r in masker.masks(reviews, names)]


def _aligned_probe(mask: np.ndarray | None, enc) -> np.ndarray:
    """The probe mask at the kept token positions (`mask[pos]`, as models.data aligns it)."""
    if mask is None or len(mask) != int(enc.n_raw):
        return np.ones(len(enc.ids), dtype=np.float32)
    return np.asarray(mask, dtype=np.float32)[np.asarray(enc.pos, dtype=np.int64)]


def ranked(preds: list[dict]) -> list[dict]:
    """Predictions grouped by product (input order) and ranked by score (stable)."""
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
                rec["label"] = r["label"]
            out.append(rec)
    return out


def run(args: argparse.Namespace) -> int:
    manifest = load_manifest(args.manifest)
    dirs = seed_dirs(resolve_run(manifest.roots.runs, args.run))
    chosen = [d for d in dirs if d.name == f"seed{args.seed}"] or (dirs if len(dirs) == 1 else [])
    if not chosen:
        raise TrainingError(f"run {args.run!r} has no seed{args.seed}; found {', '.join(d.name for d in dirs)}")
    run_dir = chosen[0]
    meta = read_json(run_dir / "data.json")
    dataset = meta["dataset"]
    spec = manifest.dataset(dataset)
    embeddings = store_embeddings(manifest.store_root, dataset)
    model, cfg = load_run(run_dir, embeddings=embeddings)
    inp = Path(args.input)
    images = Path(args.images) if args.images else (inp if inp.is_dir() else inp.parent) / "pictures"
    allowed = set(cfg.allow_missing) | set(args.allow_missing or ())
    needed = required_views(cfg.model, cfg.model_cfg) - allowed
    image_root = images if images.is_dir() else None
    source, rois = load_input(inp, image_root, spec=spec,
                              vocab_fp=meta.get("vocab_fingerprint"), manifest=manifest, cfg=cfg.data,
                              dataset=dataset, probes_needed="probes" in needed)
    rois.check(needed="rois" in needed, images=image_root, dataset=dataset)
    rows = ranked(score_source(model, source, cfg=cfg))
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
    print(f"predict: {len(source.product_ids)} products, {len(rows)} reviews ranked; images with "
          f"stored features {rois.found}, without {rois.missing}, failed {rois.failed}"
          + (f"; allowed missing: {', '.join(sorted(allowed))}" if allowed else ""), file=sys.stderr)
    return 0
