"""Probe-mask throughput: the probes stage's work against bare spaCy `nlp.pipe`.

Prints reviews/s and words/s for (a) bare `nlp.pipe` with the components the stage loads
(tok2vec, tagger, parser, attribute_ruler, lemmatizer; ner excluded) and (b) the stage's
`ProbeMasker.masks` (the same parse + product-name keywords + rule coreference + sentence
masks), the ratio (b)/(a) (target: at most 1.25), and both with 1 and 2 processes.

Texts: the distinct review texts of ../shared/fixtures/amazon2018/AMAZON_FASHION_5.json when
present (product name: see bench/coref_agreement.py), else synthetic reviews.

    OMP_NUM_THREADS=1 .venv/bin/python bench/probe_masks.py [--limit N] [--repeat R]
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from features.text.probes import ProbeMasker  # noqa: E402
from features.text.tokenize import clean_text  # noqa: E402


def synthetic(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    nouns = ["pan", "shirt", "shoe", "lid", "handle", "strap", "box", "color", "size"]
    adjs = ["great", "cheap", "soft", "thin", "sturdy", "small", "perfect"]
    texts, names = [], []
    for _ in range(n):
        noun = rng.choice(nouns)
        sents = [f"I bought this {noun} last week.", f"It is {rng.choice(adjs)} and {rng.choice(adjs)}."]
        for _ in range(rng.randint(1, 6)):
            sents.append(f"The {rng.choice(nouns)} was {rng.choice(adjs)}, so my wife loves it.")
        texts.append(" ".join(sents))
        names.append(f"Classic {noun.title()}")
    return texts, names


def load_texts(limit: int | None) -> tuple[list[str], list[str], str]:
    from coref_agreement import FIXTURE, load_reviews, pseudo_names

    if not FIXTURE.is_file():
        texts, names = synthetic(limit or 2000)
        return texts, names, "synthetic reviews"
    reviews = load_reviews(FIXTURE)
    names_by_asin = pseudo_names(reviews)
    first_asin: dict[str, str] = {}
    for r in reviews:
        first_asin.setdefault(clean_text(r.get("reviewText", "")), r["asin"])
    first_asin.pop("", None)
    texts = list(first_asin)[:limit]
    names = [names_by_asin[first_asin[t]] for t in texts]
    return texts, names, f"{FIXTURE.name} (distinct review texts)"


def timed(fn, repeat: int) -> tuple[float, float]:
    """Best wall time and best CPU time of this process over `repeat` runs (CPU time is the
    steadier figure on a shared machine; with n_process > 1 it misses the workers' time)."""
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    return best, best_cpu


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="at most N reviews")
    ap.add_argument("--repeat", type=int, default=2, help="best of R runs per measurement")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--synthetic", type=int, default=0, help="use N synthetic reviews instead of the fixture")
    args = ap.parse_args(argv)

    if args.synthetic:
        texts, names = synthetic(args.synthetic)
        source = "synthetic reviews"
    else:
        texts, names, source = load_texts(args.limit)
    words = sum(len(t.split()) for t in texts)
    print(f"texts: {len(texts)} reviews, {words} words ({source}); {len(set(names))} distinct product names")
    rows = []
    for n_process in (1, 2):
        masker = ProbeMasker(language="en", mode="script", coref="rules", batch_size=args.batch_size, n_process=n_process)
        nlp = masker.nlp
        list(nlp.pipe(texts[:50]))  # warm up

        def bare() -> None:
            for _ in nlp.pipe(texts, batch_size=args.batch_size, n_process=n_process):
                pass

        def stage() -> None:
            masker._names.clear()  # product names are parsed again in every run
            masker.masks(texts, names)

        t_bare, c_bare = timed(bare, args.repeat)
        t_stage, c_stage = timed(stage, args.repeat)
        rows.append((n_process, t_bare, t_stage))
        cpu = f" | CPU time stage/bare {c_stage / c_bare:.3f}" if n_process == 1 else ""
        print(
            f"n_process={n_process}: bare nlp.pipe {len(texts) / t_bare:8.1f} reviews/s {words / t_bare:9.0f} words/s | "
            f"stage {len(texts) / t_stage:8.1f} reviews/s {words / t_stage:9.0f} words/s | "
            f"wall stage/bare {t_stage / t_bare:.3f}{cpu}"
        )
    (_, b1, s1), (_, b2, s2) = rows
    print(f"scaling 1 -> 2 processes (wall): bare x{b1 / b2:.2f}, stage x{s1 / s2:.2f}")
    print(f"load average after the run: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
