"""Coreference backends for the probes stage, behind one interface.

A backend turns parsed spaCy Docs into clusters: per doc, a list of clusters ordered by their
first mention, each a sorted list of mentions `(start, end)` (token indices in that doc, end
exclusive), with at least two mentions per cluster.

- `auto` (default): `neuralcoref` when its side environment is built (`make neuralcoref-env`;
  the one the SANCL paper names, appendix C), else `rules`. Which one ran is in the stage
  summary, `mrhp status`, every record's meta, and the fingerprint (the backend *used* enters
  it, so building the side environment later recomputes the masks).
- `rules` (built in, `features.text.coref.rules`): pronoun and noun-phrase resolution over the
  spaCy parse.
- `neuralcoref` (`features.text.coref.neuralcoref`): neuralcoref 4.0 in the Python 3.7 side
  environment; StageError when it is not built.
- `none`: no coreference (script mode: keyword sentences only; paper mode refuses it, since
  Algorithm 1 without clusters gives all-zero masks).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

Mention = tuple[int, int]  # [start, end) token indices in the doc
Cluster = list[Mention]

BACKENDS = ("auto", "rules", "neuralcoref", "none")


class CorefBackend(Protocol):
    name: str

    def clusters(self, docs: Sequence[Any], keywords: Sequence[Any]) -> list[list[Cluster]]:
        """Clusters of each doc. `keywords[i]` is the product keyword matcher of doc i (a
        backend may use it, e.g. to chain mentions of the product; it may also ignore it)."""


def resolve(name: str) -> tuple[str, str]:
    """(the backend `name` stands for here, why): `auto` becomes `neuralcoref` when its side
    environment is built, else `rules`; the others stand for themselves."""
    from pipeline.errors import StageError

    if name not in BACKENDS:
        raise StageError(f"probes.coref: unknown backend {name!r}; valid: {', '.join(BACKENDS)}")
    if name != "auto":
        return name, f"asked for by probes.coref: {name}"
    from features.text.coref.neuralcoref import env_dir, missing_reason

    reason = missing_reason()
    if reason is None:
        return "neuralcoref", f"picked by coref auto: side environment found at {env_dir()}"
    return "rules", f"picked by coref auto: {reason}"


def get_backend(name: str) -> CorefBackend | None:
    """The backend called `name` (`auto` resolved first; None for "none"); StageError when it
    cannot run here."""
    from pipeline.errors import StageError

    name, _ = resolve(name)
    if name == "rules":
        from features.text.coref.rules import RulesCoref

        return RulesCoref()
    if name == "neuralcoref":
        from features.text.coref.neuralcoref import NeuralCoref

        return NeuralCoref()
    if name == "none":
        return None
    raise StageError(f"probes.coref: unknown backend {name!r}; valid: {', '.join(BACKENDS)}")
