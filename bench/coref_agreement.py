"""How often the built-in `rules` coreference agrees with real neuralcoref 4.0 on probe masks.

Data: ../shared/fixtures/amazon2018/AMAZON_FASHION_5.json (3,176 review objects over 31
products, pretty-printed and concatenated: decoded with json.JSONDecoder.raw_decode in a loop),
distinct (product, review text) pairs. The slice has no product metadata, so each product's
"name" is its most frequent noun lemma over its own reviews (generic review nouns such as
"product", "size" or "star" excluded): a one-word head noun, like the root SANCL's script takes
from a real name. Both backends see the same names, texts and parses; only the clusters differ. With one-word
names, `script` and `paper` modes have the same keywords, so one mode is measured.

Prints, per mode: token-level agreement (share of review tokens whose mask bit is the same),
share of reviews with identical masks, Cohen's kappa over tokens, the share of tokens masked
by each backend, how many reviews have a cluster chosen by each, and both backends' times.

    make neuralcoref-env   # once
    OMP_NUM_THREADS=1 .venv/bin/python bench/coref_agreement.py [--limit N]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FIXTURE = ROOT.parent / "shared" / "fixtures" / "amazon2018" / "AMAZON_FASHION_5.json"
GENERIC_NOUNS = frozenset(
    "product item star stars size fit price quality color colour purchase order time money "
    "way lot bit thing one day week month year review".split()
)


def load_reviews(path: Path) -> list[dict]:
    """The concatenated pretty-printed JSON objects of an Amazon 2018 review file."""
    text = path.read_text(encoding="utf-8")
    dec = json.JSONDecoder()
    out, i = [], 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            return out
        obj, i = dec.raw_decode(text, i)
        out.append(obj)


def pseudo_names(reviews: list[dict]) -> dict[str, str]:
    """asin -> its most frequent non-generic noun lemma over its reviews (see module doc)."""
    from features.text.tokenize import clean_text, load_english

    nlp = load_english(exclude=["ner", "parser"])
    by_asin: dict[str, list[str]] = {}
    for r in reviews:
        by_asin.setdefault(r["asin"], []).append(clean_text(r.get("reviewText", "")))
    names = {}
    for asin, texts in by_asin.items():
        counts: Counter[str] = Counter()
        for doc in nlp.pipe(dict.fromkeys(texts), batch_size=256):
            counts.update(
                t.lemma_.lower()
                for t in doc
                if t.pos_ == "NOUN" and t.is_alpha and t.lemma_.lower() not in GENERIC_NOUNS
            )
        names[asin] = counts.most_common(1)[0][0] if counts else ""
    return names


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    from features.text.coref.neuralcoref import NeuralCoref, missing_reason
    from features.text.coref.rules import RulesCoref
    from features.text.probes import ProbeMasker, sentence_mask
    from features.text.tokenize import clean_text

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="at most N distinct reviews")
    ap.add_argument("--mode", choices=("script", "paper"), default="script")
    args = ap.parse_args(argv)
    if not FIXTURE.is_file():
        print(f"fixture not found: {FIXTURE}")
        return 1
    reason = missing_reason()
    if reason:
        print(reason)
        return 1

    reviews = load_reviews(FIXTURE)
    names_by_asin = pseudo_names(reviews)
    first_asin: dict[str, str] = {}
    for r in reviews:
        first_asin.setdefault(clean_text(r.get("reviewText", "")), r["asin"])
    first_asin.pop("", None)
    texts = list(first_asin)[: args.limit]
    names = [names_by_asin[first_asin[t]] for t in texts]
    print(f"{len(reviews)} review objects, {len(texts)} distinct review texts, "
          f"{sum(len(t.split()) for t in texts)} words; product names: {dict(Counter(names).most_common(8))}")

    base = ProbeMasker(language="en", mode="script", coref="none")  # parser and keywords only
    t0 = time.perf_counter()
    docs = list(base.parse(texts))
    t_parse = time.perf_counter() - t0
    rules, neural = RulesCoref(), NeuralCoref()
    for mode in (args.mode,):
        masker = ProbeMasker(language="en", mode=mode, coref="rules")  # its backend is not used here
        masker._nlp = base.nlp
        kws = masker.keywords(names)
        t0 = time.perf_counter()
        cl_rules = rules.clusters(docs, kws)
        t_rules = time.perf_counter() - t0
        t0 = time.perf_counter()
        cl_neural = neural.clusters(docs, kws)
        t_neural = time.perf_counter() - t0
        failed = sum(c is None for c in cl_neural)
        a_all, b_all, same, chosen_r, chosen_n = [], [], 0, 0, 0
        for doc, kw, cr, cn in zip(docs, kws, cl_rules, cl_neural, strict=True):
            ra = sentence_mask(doc, kw, cr, mode=mode, coref="rules")
            rb = sentence_mask(doc, kw, cn or [], mode=mode, coref="neuralcoref")
            a_all.append(ra.mask)
            b_all.append(rb.mask)
            same += bool(np.array_equal(ra.mask, rb.mask))
            chosen_r += "cluster_rule" in ra.meta
            chosen_n += "cluster_rule" in rb.meta
        a, b = np.concatenate(a_all).astype(bool), np.concatenate(b_all).astype(bool)
        agree = float(np.mean(a == b))
        pa, pb = a.mean(), b.mean()
        pe = pa * pb + (1 - pa) * (1 - pb)
        kappa = (agree - pe) / (1 - pe) if pe < 1 else 1.0
        print(
            f"mode={mode}, {len(docs)} reviews: token agreement {agree:.4f} over {a.size} tokens; identical masks "
            f"{same / len(docs):.4f} ({same}/{len(docs)}); kappa {kappa:.3f}; masked tokens rules "
            f"{pa:.3f} neuralcoref {pb:.3f}; reviews with a chosen cluster rules {chosen_r} "
            f"neuralcoref {chosen_n}; neuralcoref failures {failed}"
        )
        print(f"  time: parse {t_parse:.1f} s (once), rules {t_rules:.2f} s, neuralcoref {t_neural:.1f} s "
              f"(side process, its own spaCy 2.1 parse included)")
    neural.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
