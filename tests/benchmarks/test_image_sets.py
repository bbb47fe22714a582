"""The unseen image sets load through data.name=parquet, deterministically."""

import hashlib

from benchmarks.image_sets import SETS, write_set
from trainer.data import load_dataset


def _digest(folder):
    return hashlib.sha256((folder / "train.parquet").read_bytes() + (folder / "test.parquet").read_bytes()).hexdigest()


def test_every_set_loads_as_parquet_and_is_seeded(tmp_path):
    for name in SETS:
        counts = write_set(name, tmp_path / name, count=40)
        train = load_dataset("parquet", str(tmp_path / name), train=True, image_size=32)
        test = load_dataset("parquet", str(tmp_path / name), train=False, image_size=32)
        assert (len(train), len(test)) == (counts["train"], counts["test"]) == (30, 10)
        images, _, labels = train.__getitems__(list(range(len(train))))
        assert images.shape == (30, 3, 32, 32) and images.float().std() > 10, name
        assert int(labels.min()) >= 0
        first = _digest(tmp_path / name)
        write_set(name, tmp_path / name, count=40)
        assert _digest(tmp_path / name) == first, f"{name} is not seeded"


def test_glyphs_build_without_the_dejavu_fonts(tmp_path, monkeypatch, capsys):
    import benchmarks.image_sets as image_sets

    monkeypatch.setattr(image_sets, "FONT_DIR", tmp_path / "no-fonts")
    counts = write_set("glyphs", tmp_path / "glyphs", count=20)
    assert counts["train"] + counts["test"] == 20
    assert "Pillow's built-in font alone" in capsys.readouterr().err
