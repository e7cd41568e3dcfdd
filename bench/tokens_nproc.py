"""The tokens stage's tokenizer over 1 and N processes (issue 16, section 4).

spaCy's tokenizer runs in one Python thread; `stages.tokens.n_process` spreads the texts of a
chunk over a persistent pool of processes (features/text/tokens.py: tokenize_parallel). Texts:
synthetic English reviews of 20-128 words (Amazon-home shaped). The pool start-up (spawn +
loading the pipeline once per process) is reported apart from the steady rate.

    python bench/tokens_nproc.py [--texts 20000] [--procs 1 2]
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORDS = ("the this blender works great but lid leaks after two weeks of daily use I would buy again "
         "not worth price sturdy handle easy clean dishwasher safe motor loud kitchen counter "
         "returned it because the seal broke customer service replaced quickly five stars").split()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=20000)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args(argv)
    from features.text import tokens as T

    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 128))) + "." for _ in range(args.texts)]
    print(f"# tokens stage tokenizer, {args.texts:,} texts of 20-128 words; {platform.machine()}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    print("| processes | start-up s | texts/s | same tokens as 1 process |")
    print("|---|---|---|---|")
    ref = None
    for n in args.procs:
        t0 = time.perf_counter()
        if n > 1:
            list(T.tokenize_parallel(texts[: T._POOL_CHUNK * n + 1], "en", n_process=n))  # start the pool
        else:
            list(T.tokenize(texts[:10], "en"))  # load the pipeline
        start = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = list(T.tokenize_parallel(texts, "en", n_process=n))
        dt = time.perf_counter() - t0
        ref = ref or out
        print(f"| {n} | {start:.1f} | {len(texts) / dt:,.0f} | {out == ref} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
