"""Probe masks: throughput of the probes stage against bare spaCy, and how many masks are non-empty.

Default (throughput): reviews/s and words/s for (a) bare `nlp.pipe` with the components the
stage loads (tok2vec, tagger, parser, attribute_ruler, lemmatizer; ner excluded) and (b) the
stage's `ProbeMasker.masks` (the same parse + product-name keywords + rule coreference +
sentence masks), the ratio (b)/(a) (target: at most 1.25), and both with 1 and 2 processes.

`--share`: the share of reviews whose mask is not all zero, per mode (paper = Algorithm 1;
script = gen_amazon.py with its substring keyword test; script + the word-level test), with the
coreference backend `auto` resolves to here, and the share of masked tokens.

`--indonesian`: the same share on tests/data/id_probe_sample.json, a HAND-WRITTEN Lazada-style
sample (no real Indonesian data is available to this project), for the former rule (keyword =
first non-stop word of the name, exact word match, spaCy's plain Indonesian tokens) and the
current one (head noun skipping brands, clitics stripped, ICU-style tokens), with and without
the products' brand names.

Texts (throughput, --share): the distinct review texts of
../shared/fixtures/amazon2018/AMAZON_FASHION_5.json when present (product name: see
bench/coref_agreement.py), else synthetic reviews.

    OMP_NUM_THREADS=1 .venv/bin/python bench/probe_masks.py [--limit N] [--repeat R] [--share] [--indonesian]
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


ID_SAMPLE = ROOT / "tests" / "data" / "id_probe_sample.json"


def share_nonempty(results: list) -> tuple[float, float, int]:
    """(share of reviews with a non-zero mask, share of masked tokens, failures)."""
    ok = [r for r in results if not isinstance(r, Exception)]
    nonempty = sum(bool(r.mask.any()) for r in ok)
    tokens = sum(len(r.mask) for r in ok)
    masked = sum(int(r.mask.sum()) for r in ok)
    return nonempty / max(len(ok), 1), masked / max(tokens, 1), len(results) - len(ok)


def run_share(texts: list[str], names: list[str]) -> None:
    rows = [("paper", "substring"), ("script", "substring"), ("script", "word")]
    base = None
    for mode, test in rows:
        m = ProbeMasker(language="en", mode=mode, coref="auto", keyword_test=test)
        if base is not None:
            m._nlp = base.nlp
        base = base or m
        t0 = time.perf_counter()
        res = m.masks(texts, names)
        dt = time.perf_counter() - t0
        share, tok, failed = share_nonempty(res)
        label = f"{mode}" + (f" ({test} keyword test)" if mode == "script" else " (Algorithm 1)")
        print(f"{label:<36} coref {m.coref_used:<11} non-empty masks {share:6.1%}  masked tokens {tok:6.1%}  "
              f"failures {failed}  ({dt:.1f} s)")


def old_indonesian_rule(names: list[str], reviews: list[list[str]]) -> list[bool]:
    """The former rule: keyword = first alphabetic non-stop word of the name; a review is
    non-empty when one of spaCy's plain Indonesian tokens equals it (no clitics)."""
    import spacy

    nlp = spacy.blank("id")
    out = []
    for name, rvs in zip(names, reviews, strict=True):
        words = [t.lower_ for t in nlp(clean_text(name)) if t.is_alpha and not t.is_stop]
        kw = words[0] if words else None
        out += [kw is not None and any(t.lower_ == kw for t in nlp(clean_text(r))) for r in rvs]
    return out


def run_indonesian() -> None:
    import json

    data = json.loads(ID_SAMPLE.read_text(encoding="utf-8"))
    prods = data["products"]
    names = [p["name"] for p in prods]
    reviews = [p["reviews"] for p in prods]
    flat_r = [r for rv in reviews for r in rv]
    flat_n = [p["name"] for p in prods for _ in p["reviews"]]
    flat_b = [(p.get("brand", ""),) for p in prods for _ in p["reviews"]]
    print(f"{ID_SAMPLE.relative_to(ROOT)}: HAND-WRITTEN sample, {len(prods)} products, {len(flat_r)} reviews")
    old = old_indonesian_rule(names, reviews)
    kw_old = []
    import spacy

    nlp = spacy.blank("id")
    for n in names:
        w = [t.lower_ for t in nlp(n) if t.is_alpha and not t.is_stop]
        kw_old.append(w[0] if w else "")
    print(f"former rule (first non-stop word, exact match)  non-empty masks {sum(old) / len(old):6.1%}  "
          f"keywords: {', '.join(kw_old)}")
    # Tokenization cost: spaCy's plain Indonesian tokenizer vs the ICU-style one (features.text.tokenize).
    from features.text.tokenize import tokenize

    texts = flat_r * 50
    list(tokenize(texts[:5], "id"))  # builds the shared pipeline
    plain_nlp = spacy.blank("id")
    t_plain, _ = timed(lambda: [[t.text for t in d] for d in plain_nlp.tokenizer.pipe(texts)], 3)
    t_icu, _ = timed(lambda: list(tokenize(texts, "id")), 3)
    print(f"tokenizing {len(texts)} texts: plain spaCy 'id' {len(texts) / t_plain:,.0f} texts/s, "
          f"ICU-style {len(texts) / t_icu:,.0f} texts/s (x{t_icu / t_plain:.1f} the time)")
    for mode in ("script", "paper"):
        for with_brands in (False, True):
            m = ProbeMasker(language="id", mode=mode)
            res = m.masks(flat_r, flat_n, flat_b if with_brands else None)
            share, tok, failed = share_nonempty(res)
            kws = m.keywords(names, [(p.get("brand", ""),) for p in prods] if with_brands else None)
            label = f"{mode}, head noun + clitics{' + brand names' if with_brands else ''}"
            print(f"{label:<48} non-empty masks {share:6.1%}  masked tokens {tok:6.1%}  failures {failed}")
            if mode == "script" and not with_brands:
                print(f"  keywords: {', '.join(k.words[0] if k else '-' for k in kws)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="at most N reviews")
    ap.add_argument("--repeat", type=int, default=2, help="best of R runs per measurement")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--synthetic", type=int, default=0, help="use N synthetic reviews instead of the fixture")
    ap.add_argument("--share", action="store_true", help="share of non-empty masks per mode (no timing)")
    ap.add_argument(
        "--indonesian", action="store_true", help="share of non-empty masks on the hand-written Indonesian sample"
    )
    args = ap.parse_args(argv)

    if args.indonesian:
        run_indonesian()
        return 0
    if args.synthetic:
        texts, names = synthetic(args.synthetic)
        source = "synthetic reviews"
    else:
        texts, names, source = load_texts(args.limit)
    words = sum(len(t.split()) for t in texts)
    print(f"texts: {len(texts)} reviews, {words} words ({source}); {len(set(names))} distinct product names")
    if args.share:
        run_share(texts, names)
        return 0
    rows = []
    for n_process in (1, 2):
        masker = ProbeMasker(
            language="en", mode="paper", coref="rules", batch_size=args.batch_size, n_process=n_process
        )
        nlp = masker.nlp
        list(nlp.pipe(texts[:50]))  # warm up

        def bare(nlp=nlp, n_process=n_process) -> None:
            for _ in nlp.pipe(texts, batch_size=args.batch_size, n_process=n_process):
                pass

        def stage(masker=masker) -> None:
            masker._names.clear()  # product names are parsed again in every run
            masker.masks(texts, names)

        t_bare, c_bare = timed(bare, args.repeat)
        t_stage, c_stage = timed(stage, args.repeat)
        rows.append((n_process, t_bare, t_stage))
        cpu = f" | CPU time stage/bare {c_stage / c_bare:.3f}" if n_process == 1 else ""
        print(
            f"n_process={n_process}: bare nlp.pipe {len(texts) / t_bare:8.1f} reviews/s "
            f"{words / t_bare:9.0f} words/s | "
            f"stage {len(texts) / t_stage:8.1f} reviews/s {words / t_stage:9.0f} words/s | "
            f"wall stage/bare {t_stage / t_bare:.3f}{cpu}"
        )
    (_, b1, s1), (_, b2, s2) = rows
    print(f"scaling 1 -> 2 processes (wall): bare x{b1 / b2:.2f}, stage x{s1 / s2:.2f}")
    print(f"load average after the run: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
