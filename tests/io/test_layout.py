"""A Kaggle-layout folder of links to fields that lie elsewhere (hpa/io/layout.py)."""

import pytest

from hpa.io.errors import InputError


def test_link_layout_links_fields_where_they_lie(tmp_path):
    from hpa.constants import CHANNELS
    from hpa.io.layout import link_layout, list_split

    src = tmp_path / "elsewhere"
    src.mkdir()
    for image_id, ext in (("a", "png"), ("b", "jpg")):
        for ch in CHANNELS:
            (src / f"{image_id}_{ch}.{ext}").write_bytes(f"{image_id}{ch}".encode())
    out = tmp_path / "data"
    assert link_layout(out, [(src, "a", "0|16"), (src, "b", "18")]) == ["a", "b"]
    for split in ("train", "test"):
        for image_id, ext in (("a", "png"), ("b", "jpg")):
            for ch in CHANNELS:
                p = out / split / f"{image_id}_{ch}.{ext}"
                assert p.is_symlink() and p.resolve() == (src / f"{image_id}_{ch}.{ext}").resolve()
    ids, y = list_split(out, "train")
    assert ids == ["a", "b"] and y[0].nonzero()[0].tolist() == [0, 16] and y[1].nonzero()[0].tolist() == [18]
    assert list_split(out, "test")[0] == ["a", "b"]
    assert link_layout(tmp_path / "two", [(src, "a", "0")], copies=2, splits=("test",)) == ["a-0", "a-1"]
    assert sorted(p.name for p in (tmp_path / "two" / "test").iterdir())[:2] == ["a-0_blue.png", "a-0_green.png"]
    (src / "b_yellow.jpg").unlink()
    with pytest.raises(InputError, match=r"b_yellow\.\*: channel file not found"):
        link_layout(tmp_path / "three", [(src, "b", "0")])
