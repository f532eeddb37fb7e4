"""The cell viewer: field pictures (hpa.viewer.render) and the page (hpa.viewer.page)."""

import json
import re

import numpy as np
import pytest

from hpa.viewer.page import ViewerField, page_data, viewer_html, write_viewer
from hpa.viewer.render import CLASS_COLOURS, SHORT_NAMES, hex_colour, render_field, text_colour, view_shape


def _field():
    field = np.zeros((4, 200, 300), np.uint8)
    field[2, 40:80, 40:80] = 200  # nuclei (blue)
    field[2, 120:160, 180:220] = 200
    field[0, 20:100, 20:140] = 90  # cytoplasm (red)
    field[0, 100:190, 150:290] = 90
    mask = np.zeros((200, 300), np.int32)
    mask[20:100, 20:140] = 1
    mask[100:190, 150:290] = 2
    return field, mask


def test_render_outlines_each_cell_in_its_top_class_colour():
    field, mask = _field()
    conf = np.zeros((2, 19), np.float32)
    conf[0, 6], conf[1, 16] = 0.9, 0.7  # ER, Cytosol
    pic = render_field(field, mask, [1, 2], conf, "F1", size=600)
    vh, vw = view_shape(200, 300, 600)
    assert (vh, vw) == (400, 600) and pic.shape[1] == 600 and pic.shape[0] > 400 and pic.dtype == np.uint8
    view = pic[:vh]
    # the outlines of cell 1 (x 40..280, y 40..200 at twice the size) and cell 2 (x 300..580, y 200..380)
    assert tuple(view[40, 60]) == CLASS_COLOURS[6] and tuple(view[200, 320]) == CLASS_COLOURS[16]
    assert tuple(view[39, 60]) != CLASS_COLOURS[6]  # the line lies inside the cell (1 px at this size)
    # inside a cell, away from outline and label: the composite (red cytoplasm 90 stretched to its percentile)
    assert tuple(view[60, 60]) != CLASS_COLOURS[6]
    # each label box in the class colour sits on the cell's most interior point
    assert (np.all(view == CLASS_COLOURS[6], axis=2)[100:140, :].sum() > 200)
    # the legend strip lists both classes
    strip = pic[vh:]
    assert np.all(strip == CLASS_COLOURS[6], axis=2).any() and np.all(strip == CLASS_COLOURS[16], axis=2).any()


def test_render_small_and_crowded_fields_and_errors():
    rng = np.random.default_rng(0)
    field = rng.integers(0, 255, (4, 64, 64)).astype(np.uint8)
    mask = np.kron(np.arange(1, 17).reshape(4, 4), np.ones((16, 16), int)).astype(np.int32)  # 16 touching cells
    conf = rng.random((16, 19)).astype(np.float32)
    pic = render_field(field, mask, np.arange(1, 17), conf, "", size=256)
    assert pic.shape[1] == 256 and pic.shape[0] > 256  # a 64-px field enlarged to the view size
    with pytest.raises(ValueError, match="same size"):
        render_field(field, mask[:10], np.arange(1, 17), conf)
    with pytest.raises(ValueError, match="16 cell ids for 2 rows"):
        render_field(field, mask, np.arange(1, 17), conf[:2])
    with pytest.raises(ValueError, match=">= 64"):
        render_field(field, mask, np.arange(1, 17), conf, size=32)
    empty = render_field(field, np.zeros_like(mask), [], np.zeros((0, 19)), "none", size=128)
    assert empty.shape[1] == 128


def test_colours_and_names():
    assert len(set(CLASS_COLOURS)) == 19 and len(SHORT_NAMES) == 19
    assert hex_colour(0) == "#4287f5" and text_colour((255, 230, 0)) == (0, 0, 0)
    assert text_colour((0, 0, 128)) == (255, 255, 255)


def _fields():
    conf = np.zeros((2, 19), np.float32)
    conf[0, [0, 16, 18]] = [0.5, 0.3, 0.1]
    conf[1, [12, 0, 3]] = [0.8, 0.1, 0.05]
    return [ViewerField("A</script>", "A.png", 300, 200, np.array([1, 2]), np.array([9600, 12600]), conf),
            ViewerField("bad", None, 0, 0, np.zeros(0), np.zeros(0), np.zeros((0, 19)), "skipped: unreadable")]


def test_page_embeds_every_cell_and_stays_one_file(tmp_path):
    fields = _fields()
    data = page_data(fields)
    assert data["names"][12] == "Centrosome" and data["short"][6] == "ER" and data["colour"][0] == "#4287f5"
    cells = data["fields"][0]["cells"]
    assert [c["id"] for c in cells] == [1, 2] and cells[1]["area"] == 12600
    assert cells[0]["conf"][16] == 0.3 and cells[1]["conf"][12] == 0.8 and len(cells[0]["conf"]) == 19
    html = viewer_html(fields, "T", "about <b>")
    assert "about &lt;b&gt;" in html and html.count("</script>") == 2  # the ID cannot close the script early
    blob = re.search(r'<script type="application/json" id="data">(.*?)</script>', html, re.S).group(1)
    assert json.loads(blob)["fields"][0]["id"] == "A</script>"
    assert "http" not in html.replace("http-equiv", "")  # no network, no external asset
    with pytest.raises(FileNotFoundError, match="1 picture"):
        write_viewer(tmp_path / "index.html", fields)
    (tmp_path / "A.png").write_bytes(b"x")
    assert write_viewer(tmp_path / "index.html", fields).is_file()
