"""CAM overlays: panel layout, heat colours, cell outlines, and a gallery page without broken links."""

from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_fields import make_tiny_dataset, tiny_field

from hpa.cam.maps import CamRecord, save_cam
from hpa.cam.overlay import GalleryEntry, cell_outlines, panel_shape, render_overlay, write_gallery
from hpa.constants import NUM_CLASSES
from hpa.io.fields import write_field, write_mask
from hpa.models.factory import build_model
from hpa.pipeline.cams import compute_split_cams, draw_split_overlays, overlays_dir, write_overlay_index


def _record(classes, h=3, w=4, method="cam"):
    cams = np.full((len(classes), h, w), -1.0, np.float32)
    for n in range(len(classes)):
        cams[n, 1, 2] = 2.0  # one hot cell: feature row 1, column 2
    probs = np.linspace(0.05, 0.95, NUM_CLASSES).astype(np.float32)
    return CamRecord(cams, np.asarray(classes, np.int64), probs, np.zeros(NUM_CLASSES, np.float32), method, 64)


def test_overlay_layout_heat_and_outlines():
    h, w = 60, 90  # not square
    field = np.zeros((4, h, w), np.uint8)
    field[1] = 50
    mask = np.zeros((h, w), np.int32)
    mask[10:30, 10:40] = 1
    mask[35:55, 50:85] = 2
    img = render_overlay(field, _record([3, 7]), labels=[3, 7], cell_mask=mask, panel_size=120, title="x")
    ph, pw = panel_shape(h, w, 120)
    assert (ph, pw) == (80, 120)
    assert img.dtype == np.uint8 and img.shape == (44 + 40 + ph + 6, 3 * pw + 2 * 6, 3)  # header, titles, 3 panels
    # class 3's panel: the hot feature cell (rows 20-40, columns 45-67.5 of the field) is red, far away is grey
    top, left = 44 + 40, pw + 6
    panel = img[top:top + ph, left:left + pw].astype(int)
    hot = panel[int(30 * ph / h), int(56 * pw / w)]
    cold = panel[int(5 * ph / h), int(2 * pw / w)]
    assert hot[0] > 150 and hot[0] > hot[2] + 80, hot  # turbo's top end is red
    assert cold[0] == cold[1] == cold[2], cold  # CAM 0: the protein in grey only
    # outlines: white pixels on the border of cell 1 in the RGB panel, none inside it
    rgb = img[top:top + ph, :pw]
    white = np.flatnonzero((rgb[:, int(25 * pw / w)] == 255).all(1))  # a column through cell 1 only
    assert len(white) == 2 and abs(white[0] - 10 * ph / h) <= 1 and abs(white[1] - 30 * ph / h) <= 1, white


def test_a_dim_16_bit_field_looks_as_its_8_bit_version():
    rng = np.random.default_rng(2)
    f8 = rng.integers(0, 200, (4, 40, 60)).astype(np.uint8)
    f8[1, 10:20, 10:30] = 250
    rec = _record([3])
    a = render_overlay(f8, rec, labels=[3], panel_size=60).astype(int)
    b = render_overlay(f8.astype(np.uint16) * 16, rec, labels=[3], panel_size=60).astype(int)  # 0..4000 of 65535
    assert a.shape == b.shape and np.abs(a - b).max() <= 1


def test_overlay_test_image_shows_top_k_and_empty_maps_are_labelled():
    field = np.full((4, 32, 32), 30, np.uint8)
    img = render_overlay(field, _record(list(range(NUM_CLASSES))), labels=None, panel_size=64, top_k=2)
    assert img.shape[1] == max(3 * 64 + 2 * 6, 320)  # field + 2 most probable classes (header at least 320 wide)
    empty = CamRecord(np.zeros((0, 3, 4), np.float32), np.zeros(0, np.int64), np.full(NUM_CLASSES, 0.1, np.float32),
                      np.zeros(NUM_CLASSES, np.float32), "cam", 64)
    assert render_overlay(field, empty, panel_size=64).shape[0] == 44 + 40 + 64 + 6  # header, title, panel, margin
    with pytest.raises(ValueError, match="does not match the field"):
        render_overlay(field, empty, cell_mask=np.zeros((8, 8), np.int32))


def test_cell_outlines_are_borders_only():
    m = np.zeros((8, 8), np.int32)
    m[2:6, 2:6] = 4
    edge = cell_outlines(m)
    assert edge[2, 3] and edge[5, 3] and edge[3, 2] and not edge[3, 3] and not edge[0, 0]
    assert edge.sum() == 12


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links = []

    def handle_starttag(self, tag, attrs):
        self.links += [v for k, v in attrs if k in ("src", "href") and v]


def _page_links(page: Path) -> list[str]:
    parser = _Links()
    parser.feed(page.read_text())
    return parser.links


def test_gallery_references_only_existing_files(tmp_path):
    torch.manual_seed(0)
    data = make_tiny_dataset(tmp_path / "data", n=3, size=64)
    rng = np.random.default_rng(0)
    for i in ("t 0", "t1"):  # an ID with a space: links must be quoted
        write_field(data / "test", i, tiny_field(rng, [0], 64))
    pd.DataFrame({"ID": ["t 0", "t1"]}).to_csv(data / "test.csv", index=False)
    run = tmp_path / "run"
    model = build_model("resnet18", output_stride=16)
    meta = {"image_size": 64, "mean": None, "std": None}
    for split in ("train", "test"):
        compute_split_cams(run, data, split, model, meta, progress=False)
    write_mask(run / "masks" / "train" / "img000_cellmask.png", np.pad(np.ones((40, 40), np.uint16), 12))
    assert draw_split_overlays(run, data, "train", max_images=2, panel_size=96, progress=False) == 2
    assert draw_split_overlays(run, data, "test", max_images=5, panel_size=96, progress=False) == 2
    assert draw_split_overlays(run, data, "train", max_images=2, panel_size=96, progress=False) == 0  # resumed
    page = write_overlay_index(run, data)
    assert page == overlays_dir(run) / "index.html"
    links = _page_links(page)
    files = [unquote(urlparse(u).path) for u in links if not u.startswith("#")]
    assert len(files) == 2 * 4  # every overlay linked twice (image and full-size link)
    for f in files:
        assert not Path(f).is_absolute() and (page.parent / f).is_file(), f
    text = page.read_text()
    assert "img000" in text and "img002" not in text and "t 0" in text  # only drawn images are listed
    assert "Nucleoplasm" in text and "labels: unknown (test)" in text
    with pytest.raises(FileNotFoundError, match="not found"):
        write_gallery(page, [GalleryEntry("train", "zz", "train/zz.png", [1], np.zeros(NUM_CLASSES))])


def test_overlays_only_redraw_picks_up_new_masks(tmp_path):
    data = make_tiny_dataset(tmp_path / "data", n=1, size=64)
    run = tmp_path / "run"
    out = run / "cams" / "train"
    save_cam(out / "img000.npz", np.ones((1, 4, 4), np.float32), [0], np.full(NUM_CLASSES, 0.5), np.zeros(NUM_CLASSES))
    draw_split_overlays(run, data, "train", panel_size=64, progress=False)
    png = overlays_dir(run) / "train" / "img000.png"
    before = png.read_bytes()
    write_mask(run / "masks" / "train" / "img000_cellmask.png", np.pad(np.ones((40, 40), np.uint16), 12))
    assert draw_split_overlays(run, data, "train", panel_size=64, force=True, progress=False) == 1
    assert png.read_bytes() != before  # outlines added
