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
import json
import sys
from pathlib import Path

from typing import TYPE_CHECKING

from pipeline.errors import DataError, StoreError, TrainingError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from models.config import DataConfig
    from models.data import InMemorySource


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

    def __init__(self, store_root: Path, dataset: str, cfg: "DataConfig") -> None:
        from pipeline.store import FeatureStore

        self.cfg = cfg
        self.found = self.missing = 0
        try:
            fp = FeatureStore(store_root).view(dataset, "rois").fingerprint
            self.reader = FeatureStore(store_root).reader("rois", fp)
        except StoreError:
            self.reader = None

    def __call__(self, files: list[Path]) -> "np.ndarray":
        import numpy as np

        from models.data import concat_rois
        from pipeline.hashing import sha256_file

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


def rel_labels(values: dict[str, float], mode: str, where: str) -> tuple[dict[str, float], dict[str, float]]:
    """(review id -> 0-4 label, review id -> raw column value) of a rel table's upvotes, read as
    the dataset reader reads them (`mode`: the dataset's labels setting). A 0-vote review (vote
    mode) has no label."""
    from pipeline.datasets.mrhp import MAX_LABEL, votes_to_label

    if mode == "auto":
        mode = "labels" if all(float(v).is_integer() and 0 <= v <= MAX_LABEL for v in values.values()) else "votes"
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


def load_input(path: Path, images: Path | None, *, spec, vocab_fp: str | None, manifest, cfg: "DataConfig",
               dataset: str, labels_mode: str | None = None) -> tuple["InMemorySource", _Rois]:
    """Read the MRHP tables named by `path` into an in-memory source in the run's vocabulary;
    each review's `label` is its 0-4 label (NaN without one), raw votes in `source.votes`."""
    import numpy as np

    from models.data import InMemorySource, ProductItem, ReviewItem
    from pipeline.datasets.mrhp import (
        PRD_COLUMNS, PRD_OPTIONAL, REL_COLUMNS, RVW_COLUMNS, RVW_OPTIONAL, parse_img_urls, product_text,
    )
    from pipeline.datasets.tables import read_column_table

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
    votes: dict[str, float] = {}
    for prd_path, rvw_path, rel_path, category, split in _table_sets(path):
        pkeys, pt = read_column_table(prd_path, PRD_COLUMNS, PRD_OPTIONAL)
        rkeys, rt = read_column_table(rvw_path, RVW_COLUMNS, RVW_OPTIONAL)
        labels: dict[str, float] = {}
        if rel_path is not None:
            lkeys, lt = read_column_table(rel_path, REL_COLUMNS)
            raw = {str(lt["review_id"][k]): float(lt["upvotes"][k]) for k in lkeys}
            labels, got = rel_labels(raw, labels_mode or spec.labels, str(rel_path))
            votes.update(got)
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
    source = InMemorySource(products, roi_dim=cfg.roi_dim)
    source.votes = votes  # review id -> raw rel value, for the output's `votes` field
    return source, rois


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


def _aligned_probe(mask: "np.ndarray | None", enc) -> "np.ndarray":
    """The probe mask at the kept token positions (`mask[pos]`, as models.data aligns it)."""
    import numpy as np

    if mask is None or len(mask) != int(enc.n_raw):
        return np.ones(len(enc.ids), dtype=np.float32)
    return np.asarray(mask, dtype=np.float32)[np.asarray(enc.pos, dtype=np.int64)]


def average_seeds(per_seed: list[list[dict]]) -> list[dict]:
    """One prediction per review: the mean score over the seeds (every seed scored the same
    reviews in the same order)."""
    import numpy as np

    first = per_seed[0]
    for k, preds in enumerate(per_seed[1:], 1):
        if [p["review_id"] for p in preds] != [p["review_id"] for p in first]:
            raise TrainingError(f"seed {k} scored different reviews than seed 0")
    scores = np.mean([[p["score"] for p in preds] for preds in per_seed], axis=0)
    return [{**p, "score": float(s)} for p, s in zip(first, scores)]


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
    from models.data import store_embeddings
    from models.runs import read_json, resolve_run, seed_dirs
    from models.trainer import load_run, score_source
    from pipeline.manifest import load_manifest

    manifest = load_manifest(args.manifest)
    dirs = seed_dirs(resolve_run(manifest.roots.runs, args.run))
    if args.seed is None:
        chosen = dirs
    else:
        chosen = [d for d in dirs if d.name == f"seed{args.seed}"] or (dirs if len(dirs) == 1 else [])
    if not chosen:
        raise TrainingError(f"run {args.run!r} has no seed{args.seed}; found {', '.join(d.name for d in dirs)}")
    metas = [read_json(d / "data.json") for d in chosen]
    meta = metas[0]
    for d, m in zip(chosen[1:], metas[1:]):
        if (m.get("dataset"), m.get("vocab_fingerprint")) != (meta.get("dataset"), meta.get("vocab_fingerprint")):
            raise TrainingError(f"{d}: trained on other data ({m.get('dataset')}) than {chosen[0].name}; "
                                f"pick one with --seed")
    dataset = meta["dataset"]
    spec = manifest.dataset(dataset)
    embeddings = store_embeddings(manifest.store_root, dataset)
    models = [load_run(d, embeddings=embeddings) for d in chosen]
    cfg = models[0][1]
    inp = Path(args.input)
    images = Path(args.images) if args.images else (inp if inp.is_dir() else inp.parent) / "pictures"
    source, rois = load_input(inp, images if images.is_dir() else None, spec=spec,
                              vocab_fp=meta.get("vocab_fingerprint"), manifest=manifest, cfg=cfg.data,
                              dataset=dataset, labels_mode=meta.get("labels"))
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
          f"stored features {rois.found}, without {rois.missing}", file=sys.stderr)
    return 0
