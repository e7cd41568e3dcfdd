"""`mrhp validate` on the embedded demo and on deliberately broken copies of it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mrhp.cli import main
from pipeline.errors import DataError, ManifestError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def demo_copy(tmp_path) -> Path:
    """A copy of the repository manifest and demo data; returns the copied manifest."""
    shutil.copytree(ROOT / "demo_data", tmp_path / "demo_data", ignore=shutil.ignore_patterns("*.py"))
    shutil.copy(ROOT / "data_manifest.yaml", tmp_path / "data_manifest.yaml")
    return tmp_path / "data_manifest.yaml"


def test_demo_validates_with_exit_0_and_counts_its_missing_image(capsys):
    rc = main(["--manifest", str(ROOT / "data_manifest.yaml"), "validate"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "dataset demo: OK" in out
    assert "labels read as: votes" in out
    assert "images missing 1" in out
    assert "B0DEMOHM05-2" in out
    assert "train products 4" in out and "dev products 2" in out and "test products 2" in out


def test_demo_validates_from_the_repository_root_without_manifest_flag(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("MRHP_MANIFEST", raising=False)
    assert main(["validate", "--dataset", "demo"]) == 0


def _edit_table(path: Path, fn) -> None:
    t = json.loads(path.read_text(encoding="utf-8"))
    fn(t)
    path.write_text(json.dumps(t), encoding="utf-8")


BREAKERS = {
    "malformed JSON": ("home.rvw.dev", lambda p: p.write_text(p.read_text(encoding="utf-8")[:200], encoding="utf-8")),
    "missing column": ("home.prd.test", lambda p: _edit_table(p, lambda t: t.pop("name"))),
    "duplicate ids": (
        "home.rvw.train",
        lambda p: _edit_table(p, lambda t: t["review_id"].update({"3": t["review_id"]["2"]})),
    ),
    "unknown review in rel": (
        "home.rel.dev",
        lambda p: _edit_table(p, lambda t: t["review_id"].update({"4": "B0GHOST-1"})),
    ),
    "label out of range": ("home.rel.test", lambda p: _edit_table(p, lambda t: t["upvotes"].update({"1": -2}))),
    "non-UTF-8": (
        "home.rvw.test",
        lambda p: p.write_bytes(p.read_bytes().replace(b"Easy to clean", b"Easy to \xe9clean")),
    ),
    "missing file": ("home.rel.train", lambda p: p.unlink()),
}


@pytest.mark.parametrize("case", sorted(BREAKERS))
def test_broken_copy_exits_nonzero_naming_the_file(demo_copy, capsys, case):
    name, breaker = BREAKERS[case]
    breaker(demo_copy.parent / "demo_data" / "mrhp" / name)
    rc = main(["--manifest", str(demo_copy), "validate", "--images", "skip"])
    out = capsys.readouterr().out
    assert rc == DataError.exit_code
    assert "dataset demo: ERRORS" in out
    assert any(name in line for line in out.splitlines() if line.strip().startswith("error:")), out
    assert "Traceback" not in out


def test_image_path_escaping_the_root_via_symlink_is_an_error(demo_copy, capsys):
    pictures = demo_copy.parent / "demo_data" / "pictures"
    target = pictures / "train" / "rvw" / "B0DEMOHM01-0"
    shutil.rmtree(target)
    outside = demo_copy.parent / "outside"
    outside.mkdir()
    shutil.copy(pictures / "train" / "prd" / "B0DEMOHM01" / "pic_0_0.jpg", outside / "pic_0_0.jpg")
    target.symlink_to(outside)
    rc = main(["--manifest", str(demo_copy), "validate"])
    out = capsys.readouterr().out
    assert rc == DataError.exit_code
    assert "outside the image root" in out and "B0DEMOHM01-0" in out


def test_missing_and_unreadable_images_are_counted_not_fatal(demo_copy, capsys):
    pictures = demo_copy.parent / "demo_data" / "pictures"
    (pictures / "train" / "prd" / "B0DEMOHM01" / "pic_0_0.jpg").unlink()
    (pictures / "test" / "prd" / "B0DEMOHM07" / "pic_0_0.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    rc = main(["--manifest", str(demo_copy), "validate"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "images missing 2" in out and "images unreadable 1" in out
    assert "test/prd/B0DEMOHM07/pic_0_0.jpg is unreadable" in out


def test_a_decompression_bomb_is_a_named_counted_warning(demo_copy, capsys):
    from PIL import Image

    pictures = demo_copy.parent / "demo_data" / "pictures"
    bomb = pictures / "test" / "prd" / "B0DEMOHM07" / "pic_0_0.jpg"
    # a small PNG whose header claims 20000 x 20000 pixels: over PIL's 2x bomb limit (~179M)
    Image.new("1", (20000, 20000)).save(bomb, format="PNG")
    rc = main(["--manifest", str(demo_copy), "validate"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "images unreadable 1" in out
    assert "B0DEMOHM07/pic_0_0.jpg is unreadable (DecompressionBombError" in out
    assert "Traceback" not in out


def test_invalid_manifest_exits_with_manifest_error_code(demo_copy, capsys):
    text = demo_copy.read_text()
    demo_copy.write_text(text.replace("    threshold: 1\n", "    threshold: 1\n    colour: blue\n", 1))
    rc = main(["--manifest", str(demo_copy), "validate"])
    assert rc == ManifestError.exit_code
    err = capsys.readouterr().err
    assert "datasets.demo" in err and "colour" in err


def test_undeclared_dataset_is_a_manifest_error(capsys):
    rc = main(["--manifest", str(ROOT / "data_manifest.yaml"), "validate", "--dataset", "nope"])
    assert rc == ManifestError.exit_code
    assert "no dataset 'nope'" in capsys.readouterr().err


def test_exists_mode_counts_missing_images_without_opening_files(demo_copy, capsys):
    pictures = demo_copy.parent / "demo_data" / "pictures"
    (pictures / "test" / "prd" / "B0DEMOHM07" / "pic_0_0.jpg").write_bytes(b"not an image")
    assert main(["--manifest", str(demo_copy), "validate", "--images", "exists"]) == 0
    out = capsys.readouterr().out
    assert "images ok 17, images missing 1, images unreadable 0" in out
