"""`mrhp predict RUN --input PATH`: rank the reviews of new products with a trained run.

Input: products in the MRHP format, either a folder holding `<category>.prd.<split>` and
`<category>.rvw.<split>` tables or the path of one `.prd.` table (its `.rvw.` sibling is used).
A `.rel.` sibling is optional; when present its labels are reported next to the scores.
Texts are tokenized exactly as the tokens stage does (`features.text.tokens.encode_texts`) in
the vocabulary the run was trained with (its `data.json`). Images are looked up in the feature
store by the sha256 of their bytes under the run dataset's rois fingerprint: an image already
extracted contributes its ROI features, any other image is counted and left out (run the rois
stage on a dataset holding it to include it). When the run's dataset has a probes view (the
model was trained with probe masks), new reviews get probe masks computed the way the probes
stage does (`features.text.probes.ProbeMasker` with the manifest's probes parameters); a
review whose mask cannot be computed, or a dataset without probes, gets a mask of ones.

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
from models.data import InMemorySource, ProductItem, ReviewItem, concat_rois, store_embeddings
from models.runs import read_json, resolve_run, seed_dirs
from models.trainer import load_run, score_source
from pipeline.datasets.mrhp import (
    PRD_COLUMNS, PRD_OPTIONAL, REL_COLUMNS, RVW_COLUMNS, RVW_OPTIONAL, parse_img_urls, product_text,
)
from pipeline.datasets.tables import read_column_table
from pipeline.errors import DataError, StoreError, TrainingError
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


def _image_files(root: Path | None, split: str, kind: str, item_id: str) -> list[Path]:
    if root is None:
        return []
    folder = root / split / kind / item_id
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith("pic_") and p.is_file())


class _Rois:
    """ROI features of image files already in the store (by content hash)."""

    def __init__(self, store_root: Path, dataset: str, cfg: DataConfig) -> None:
        from pipeline.store import FeatureStore

        self.cfg = cfg
        self.found = self.missing = 0
        try:
            fp = FeatureStore(store_root).view(dataset, "rois").fingerprint
            self.reader = FeatureStore(store_root).reader("rois", fp)
        except StoreError:
            self.reader = None

    def __call__(self, files: list[Path]) -> np.ndarray:
        per = []
        for f in files:
            try:
                got = self.reader.get(sha256_file(f)) if self.reader is not None else None
            except (StoreError, KeyError):
                got = None
            if got is None:
                self.missing += 1
                continue
            self.found += 1
            per.append(np.asarray(got["features"], dtype=np.float32))
        return concat_rois(per, self.cfg)


def load_input(path: Path, images: Path | None, *, spec, vocab_fp: str | None, manifest, cfg: DataConfig,
               dataset: str) -> tuple[InMemorySource, _Rois]:
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
            labels = {str(lt["review_id"][k]): float(lt["upvotes"][k]) for k in lkeys}
        pids = [str(pt["product_id"][k]) for k in pkeys]
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
                            [names.get(str(rt["product_id"][k]), "") for k in rkeys])
        for k, enc, mask in zip(rkeys, renc, masks):
            rid, pid = str(rt["review_id"][k]), str(rt["product_id"][k])
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


def probe_masks(manifest, spec, dataset: str, reviews: list[str], names: list[str]) -> list:
    """Probe masks over the raw tokens of new reviews, as the probes stage computes them, or
    Nones when the run's dataset has no probes view (its models saw masks of ones)."""
    from pipeline.store import FeatureStore

    try:
        FeatureStore(manifest.store_root).view(dataset, "probes")
    except StoreError:
        return [None] * len(reviews)
    from features.text.probes import ProbeMasker, ProbeResult

    p = manifest.stage_params("probes")
    masker = ProbeMasker.from_params(p, spec.language, n_process=1)
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
    source, rois = load_input(inp, images if images.is_dir() else None, spec=spec,
                              vocab_fp=meta.get("vocab_fingerprint"), manifest=manifest, cfg=cfg.data,
                              dataset=dataset)
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
          f"stored features {rois.found}, without {rois.missing}", file=sys.stderr)
    return 0
