"""Word vectors through gensim: each format, the converted cache, sha256 checks, the matrix."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from features.text import vectors as vectors_mod
from features.text.vectors import build_matrix, load_vectors, source_sha256
from pipeline.errors import ResourceError
from pipeline.hashing import sha256_file

WORDS = {"pan": [0.1, 0.2, 0.3], "pot": [0.4, 0.5, 0.6], "lid": [-1.0, 0.0, 1.0]}


@dataclass(frozen=True)
class Spec:  # the fields of pipeline.manifest.WordVectorSpec the loader reads
    format: str
    path: Path | None = None
    package: str | None = None
    sha256: str | None = None
    name: str = "test-vectors"


def write_text_vectors(path: Path, header: bool) -> Path:
    lines = [f"{w} " + " ".join(map(str, v)) for w, v in WORDS.items()]
    if header:
        lines.insert(0, f"{len(WORDS)} 3")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("fmt,header", [("glove", False), ("word2vec", True)])
def test_text_formats_load_with_their_vectors(tmp_path, fmt, header):
    src = write_text_vectors(tmp_path / "v.txt", header)
    lv = load_vectors(Spec(fmt, src), cache_root=tmp_path / "store")
    assert lv.dim == 3 and list(lv.kv.index_to_key) == list(WORDS)
    np.testing.assert_allclose(lv.kv["pot"], WORDS["pot"], rtol=1e-6)
    assert lv.sha256 == sha256_file(src) and not lv.subwords


def test_conversion_happens_once_then_vectors_are_memory_mapped(tmp_path, monkeypatch):
    src = write_text_vectors(tmp_path / "glove.txt", header=False)
    first = load_vectors(Spec("glove", src), cache_root=tmp_path / "store")
    assert first.cache_dir == tmp_path / "store" / "vectors" / sha256_file(src)
    assert {p.name for p in first.cache_dir.iterdir()} == {"vectors.npy", "words.json", "meta.json"}

    def reparse(spec):
        raise AssertionError("parsed the source again")

    monkeypatch.setattr(vectors_mod, "_parse_source", reparse)
    again = load_vectors(Spec("glove", src), cache_root=tmp_path / "store")
    assert isinstance(again.kv.vectors, np.memmap) and again.kv.vectors.mode == "r"
    np.testing.assert_allclose(again.kv["lid"], WORDS["lid"])


def test_fasttext_bin_loads_with_subword_vectors_for_unseen_words(tmp_path):
    from gensim.models import FastText
    from gensim.models.fasttext import save_facebook_model

    sentences = [["frying", "pan", "pot", "lid", "steel"], ["pan", "pot", "handle"]] * 20
    model = FastText(vector_size=8, window=2, min_count=1, epochs=2, bucket=200, min_n=2, max_n=3, seed=1, workers=1)
    model.build_vocab(corpus_iterable=sentences)
    model.train(corpus_iterable=sentences, total_examples=len(sentences), epochs=2)
    src = tmp_path / "tiny.bin"
    save_facebook_model(model, str(src))

    lv = load_vectors(Spec("fasttext-bin", src), cache_root=tmp_path / "store")
    assert lv.subwords and lv.dim == 8 and "pan" in lv.kv.key_to_index
    np.testing.assert_allclose(lv.kv["pan"], model.wv["pan"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lv.kv.get_vector("pans"), model.wv.get_vector("pans"), rtol=1e-5, atol=1e-6)
    again = load_vectors(Spec("fasttext-bin", src), cache_root=tmp_path / "store")  # from the cache
    assert isinstance(again.kv.vectors_ngrams, np.memmap)
    np.testing.assert_allclose(again.kv.get_vector("pans"), model.wv.get_vector("pans"), rtol=1e-5, atol=1e-6)

    matrix, cov = build_matrix(["<pad>", "<oov>", "pan", "pans"], again)
    assert cov.found == 1 and cov.subword == 1 and cov.share == 0.5
    np.testing.assert_allclose(matrix[3], model.wv.get_vector("pans"), rtol=1e-5, atol=1e-6)


def test_packaged_glove_6b_50d_loads(tmp_path):
    lv = load_vectors(Spec("kumo"), cache_root=tmp_path / "store")
    assert lv.dim == 50 and len(lv.kv.index_to_key) == 400_000
    assert lv.kv.index_to_key[:3] == ["the", ",", "."]
    assert lv.kv.most_similar("pan", topn=10)  # real GloVe neighbours exist


def test_declared_sha256_mismatch_is_a_resource_error_naming_both(tmp_path):
    src = write_text_vectors(tmp_path / "glove.txt", header=False)
    with pytest.raises(ResourceError) as e:
        source_sha256(Spec("glove", src, sha256="0" * 64), cache_root=tmp_path / "store")
    assert "0" * 64 in str(e.value) and sha256_file(src) in str(e.value)
    assert source_sha256(Spec("glove", src, sha256=sha256_file(src).upper())) == sha256_file(src)


def test_a_changed_file_is_hashed_again(tmp_path):
    src = write_text_vectors(tmp_path / "glove.txt", header=False)
    before = source_sha256(Spec("glove", src), cache_root=tmp_path / "store")
    src.write_text("pan 1 2 3\n", encoding="utf-8")
    assert source_sha256(Spec("glove", src), cache_root=tmp_path / "store") != before


def test_missing_and_malformed_sources_are_resource_errors(tmp_path):
    with pytest.raises(ResourceError, match="file not found"):
        load_vectors(Spec("glove", tmp_path / "nope.txt"), cache_root=tmp_path)
    bad = tmp_path / "bad.vec"
    bad.write_text("not a header\npan 1 2\n", encoding="utf-8")
    with pytest.raises(ResourceError, match="not a readable word2vec file"):
        load_vectors(Spec("word2vec", bad), cache_root=tmp_path)
    with pytest.raises(ResourceError, match="format 'npz' unknown"):
        load_vectors(Spec("npz", bad), cache_root=tmp_path)


def test_matrix_has_zero_pad_row_seeded_uniform_oov_rows_and_found_vectors(tmp_path):
    src = write_text_vectors(tmp_path / "glove.txt", header=False)
    lv = load_vectors(Spec("glove", src), cache_root=tmp_path / "store")
    words = ["<pad>", "<oov>", "lid", "zzz", "pan"]
    m, cov = build_matrix(words, lv, oov_init=0.25, seed=3)
    assert m.dtype == np.float32 and m.shape == (5, 3)
    assert not m[0].any()
    np.testing.assert_allclose(m[2], WORDS["lid"])
    np.testing.assert_allclose(m[4], WORDS["pan"])
    assert np.all(np.abs(m[[1, 3]]) <= 0.25) and m[[1, 3]].any()
    assert (cov.words, cov.found, cov.subword) == (3, 2, 0) and cov.to_json()["coverage"] == pytest.approx(2 / 3)
    m2, _ = build_matrix(words, lv, oov_init=0.25, seed=3)
    np.testing.assert_array_equal(m, m2)
    m3, _ = build_matrix(words, lv, oov_init=0.25, seed=4)
    assert not np.array_equal(m[3], m3[3])
