"""Text stages: tokens and vocabularies, embedding matrices via gensim, SANCL probe masks.

Modules: `tokenize` (raw tokens shared by every text stage), `vocab` (MCR/standard vocabularies
and their cache beside the store), `tokens`, `embeddings`, `probes` (the stages), `vectors`
(GloVe/word2vec/fastText loading), `keywords` (product keywords, word-level matching),
`coref/` (coreference backends: `rules`, `neuralcoref`), `bert` (the text-encoder stage:
transformers token features). Nothing here imports spaCy, gensim or transformers at package
import: the stages load them when they first run.
"""
