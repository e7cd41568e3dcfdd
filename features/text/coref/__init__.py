"""Coreference backends for the probes stage, behind one interface.

A backend turns parsed spaCy Docs into clusters: per doc, a list of clusters ordered by their
first mention, each a sorted list of mentions `(start, end)` (token indices in that doc, end
exclusive), with at least two mentions per cluster.

- `rules` (default, built in, `features.text.coref.rules`): pronoun and noun-phrase resolution
  over the spaCy parse.
- `neuralcoref` (`features.text.coref.neuralcoref`): neuralcoref 4.0 in the Python 3.7 side
  environment built by `make neuralcoref-env`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

Mention = tuple[int, int]  # [start, end) token indices in the doc
Cluster = list[Mention]

BACKENDS = ("rules", "neuralcoref", "none")


class CorefBackend(Protocol):
    name: str

    def clusters(self, docs: Sequence[Any], keywords: Sequence[Any]) -> list[list[Cluster]]:
        """Clusters of each doc. `keywords[i]` is the product keyword matcher of doc i (a
        backend may use it, e.g. to chain mentions of the product; it may also ignore it)."""


def get_backend(name: str) -> CorefBackend | None:
    """The backend called `name` (None for "none"); StageError when it cannot run here."""
    from pipeline.errors import StageError

    if name == "rules":
        from features.text.coref.rules import RulesCoref

        return RulesCoref()
    if name == "neuralcoref":
        from features.text.coref.neuralcoref import NeuralCoref

        return NeuralCoref()
    if name == "none":
        return None
    raise StageError(f"probes.coref: unknown backend {name!r}; valid: {', '.join(BACKENDS)}")
