"""Tests of hpa.segment: the classical segmenter, the mask contract, the per-image loop.

Synthetic fields are drawn here from known masks (nuclei as discs in blue, cells as
Voronoi regions around them in red and yellow with a dim line where two cells touch),
so every expected answer is exact or tolerance-bounded.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi
from shared_data import HPA_REAL, needs

from hpa.eval.matching import match_cells
from hpa.io.errors import InputError
from hpa.io.fields import read_field, read_mask, write_field
from hpa.pipeline.segmentation import merge_tables, segment_images, table_name
from hpa.segment import available_segmenters, get_segmenter
from hpa.segment.common import check_masks, finalize_masks

REAL = HPA_REAL


def draw_field(centres, size, nuc_r, cell_r, rng=None, dtype=np.uint8):
    """A (4, H, W) field and its true (cells, nuclei) int32 masks.

    centres: list of (y, x); cells are the Voronoi regions of the centres within
    ``cell_r`` of them, nuclei discs of radius ``nuc_r``. ``size`` is int or (H, W).
    """
    rng = rng or np.random.default_rng(0)
    H, W = (size, size) if isinstance(size, int) else size
    P = int(cell_r) + 2  # centres may lie outside the frame: draw on a larger canvas, then crop
    seeds = np.zeros((H + 2 * P, W + 2 * P), np.int32)
    for k, (y, x) in enumerate(centres):
        seeds[int(round(y)) + P, int(round(x)) + P] = k + 1
    dmin, (iy, ix) = ndi.distance_transform_edt(seeds == 0, return_indices=True)
    owner = (seeds[iy, ix] - 1)[P:-P, P:-P]
    dmin = dmin[P:-P, P:-P]
    cells = np.where(dmin <= cell_r, owner + 1, 0).astype(np.int32)
    nuclei = np.where(dmin <= nuc_r, owner + 1, 0).astype(np.int32)
    edge = np.zeros((H, W), bool)  # one-pixel line where two cells touch
    edge[:, 1:] |= (cells[:, 1:] != cells[:, :-1]) & (cells[:, 1:] > 0) & (cells[:, :-1] > 0)
    edge[1:, :] |= (cells[1:, :] != cells[:-1, :]) & (cells[1:, :] > 0) & (cells[:-1, :] > 0)
    cyto = np.where(cells > 0, 110.0, 0.0) * (1 - 0.35 * (dmin / cell_r) ** 2)
    cyto[edge] *= 0.3
    noise = rng.normal(0, 4, (4, H, W))
    field = np.zeros((4, H, W), np.float64)
    field[0] = cyto
    field[3] = 0.9 * cyto
    field[1] = 0.3 * cyto
    field[2] = np.where(nuclei > 0, 180.0, 0.0)
    field = np.clip(field + noise, 0, 255)
    if dtype == np.uint16:
        return (field * 257).astype(np.uint16), cells, nuclei
    return field.astype(np.uint8), cells, nuclei


def grid_centres(n_rows, n_cols, step, offset, jitter=0.0, rng=None):
    rng = rng or np.random.default_rng(1)
    return [(offset + r * step + rng.uniform(-jitter, jitter), offset + c * step + rng.uniform(-jitter, jitter))
            for r in range(n_rows) for c in range(n_cols)]


# ------------------------------------------------------------------ registry and contract
def test_registry_lists_valid_names():
    assert available_segmenters() == ["classical", "hpacellseg"]
    with pytest.raises(ValueError, match=r"unknown segmenter 'watershed'.*classical.*hpacellseg"):
        get_segmenter("watershed")
    with pytest.raises(ValueError, match="unknown classical segmenter setting"):
        get_segmenter("classical", work_sise=256)


def test_bad_field_is_rejected_with_what_arrived():
    seg = get_segmenter("classical")
    with pytest.raises(InputError, match=r"shape \(4, H, W\).*\(3, 64, 64\)"):
        seg.segment(np.zeros((3, 64, 64), np.uint8))
    with pytest.raises(InputError, match="float32"):
        seg.segment(np.zeros((4, 64, 64), np.float32))


def test_finalize_masks_renumbers_and_drops_cells_without_nucleus():
    cells = np.array([[5, 5, 0, 9], [5, 5, 0, 9], [7, 7, 0, 0]])
    nuclei = np.array([[1, 0, 0, 0], [0, 0, 0, 3], [0, 0, 0, 3]])  # cell 7 has none; a nucleus pixel outside
    c, n = finalize_masks(cells, nuclei)
    assert c.tolist() == [[1, 1, 0, 2], [1, 1, 0, 2], [0, 0, 0, 0]]
    assert n.tolist() == [[1, 0, 0, 0], [0, 0, 0, 2], [0, 0, 0, 0]]
    check_masks(c, n)
    # hpacellseg's labelling keeps cells without a nucleus: renumbered, allowed by the relaxed check only
    c, n = finalize_masks(cells, nuclei, require_nucleus=False)
    assert c.tolist() == [[1, 1, 0, 3], [1, 1, 0, 3], [2, 2, 0, 0]]
    assert n.tolist() == [[1, 0, 0, 0], [0, 0, 0, 3], [0, 0, 0, 0]]
    check_masks(c, n, require_nucleus=False)
    with pytest.raises(AssertionError, match=r"cells without nucleus: \[2\]"):
        check_masks(c, n)


# ------------------------------------------------------------------ classical segmenter
def test_two_touching_cells_are_split():
    field, true_cells, _ = draw_field([(64, 44), (64, 84)], 128, nuc_r=9, cell_r=30)
    assert len(np.unique(true_cells[64, 30:100])) == 2  # they do touch (no background between)
    cells, nuclei = get_segmenter("classical").segment(field)
    check_masks(cells, nuclei)
    m = match_cells(cells, true_cells, 0.6)
    assert m.n_pred == 2 and m.n_matched == 2
    assert min(iou for _, _, iou in m.pairs) > 0.8


def test_border_cell_kept_only_when_enough_of_its_nucleus_is_in_frame():
    # nuclei of radius 10 (area ~314); centres: two inside, one half out (left), one almost out (right)
    centres = [(64, 50), (64, 100), (20, -1), (110, 137)]
    field, true_cells, true_nuclei = draw_field(centres, (128, 128), nuc_r=10, cell_r=24)
    in_frame = np.bincount(true_nuclei.ravel(), minlength=5)[1:]
    assert in_frame[2] > 100 and 0 < in_frame[3] < 20  # half a nucleus; a 5% sliver
    cells, nuclei = get_segmenter("classical").segment(field)
    check_masks(cells, nuclei)
    m = match_cells(cells, true_cells, 0.6)
    assert sorted(t for _, t, _ in m.pairs) == [1, 2, 3] and m.n_pred == 3


def test_no_nuclei_gives_empty_masks_and_a_warning(caplog):
    field, _, _ = draw_field([(64, 64)], 128, nuc_r=8, cell_r=30)
    field[2] = 0  # no nuclear stain at all
    with caplog.at_level(logging.WARNING, logger="hpa.segment.classical"):
        cells, nuclei = get_segmenter("classical").segment(field)
    assert cells.shape == nuclei.shape == (128, 128) and cells.dtype == np.int32
    assert cells.max() == 0 and nuclei.max() == 0
    assert any("no nuclei" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("size,work_size,dtype", [((200, 260), 512, np.uint8), ((300, 226), 128, np.uint16)])
def test_masks_keep_the_contract_and_find_the_cells(size, work_size, dtype):
    H, W = size
    rng = np.random.default_rng(3)
    step = 46 * max(H, W) / 260
    centres = grid_centres(int(H // step), int(W // step), step, step / 2, jitter=step * 0.12, rng=rng)
    field, true_cells, _ = draw_field(centres, (H, W), nuc_r=0.22 * step, cell_r=0.62 * step, rng=rng, dtype=dtype)
    cells, nuclei = get_segmenter("classical", work_size=work_size).segment(field)
    assert cells.shape == (H, W)
    check_masks(cells, nuclei)
    m = match_cells(cells, true_cells, 0.6)
    assert m.recall >= 0.9 and m.unmatched_pred_frac <= 0.1, (m.recall, m.unmatched_pred_frac)


def test_a_dim_16_bit_field_segments_as_its_8_bit_version():
    """The classical segmenter normalises each channel by its own percentile: 16 x an 8-bit field (values
    0..4080 of 65535) gives the same masks."""
    centres = grid_centres(3, 3, 60, 30, jitter=6, rng=np.random.default_rng(5))
    f8, _, _ = draw_field(centres, 180, nuc_r=13, cell_r=37, rng=np.random.default_rng(5))
    seg = get_segmenter("classical", work_size=512)
    cells8, nuclei8 = seg.segment(f8)
    cells16, nuclei16 = seg.segment(f8.astype(np.uint16) * 16)
    assert cells8.max() >= 8
    np.testing.assert_array_equal(cells16, cells8)
    np.testing.assert_array_equal(nuclei16, nuclei8)


def test_same_settings_give_similar_counts_on_a_4x_upscaled_field():
    rng = np.random.default_rng(5)
    centres = grid_centres(3, 3, 40, 22, jitter=5, rng=rng)
    small, true_cells, _ = draw_field(centres, 128, nuc_r=8, cell_r=26, rng=rng)
    big = np.stack([cv2.resize(c, (512, 512), interpolation=cv2.INTER_LINEAR) for c in small])
    seg = get_segmenter("classical", work_size=512)
    n_small = seg.segment(small)[0].max()
    cells_big, nuclei_big = seg.segment(big)
    check_masks(cells_big, nuclei_big)
    assert n_small == 9
    assert abs(int(cells_big.max()) - int(n_small)) <= 1


# ------------------------------------------------------------------ the per-image loop
def _write_split(root: Path, n: int = 4, size: int = 96) -> list[str]:
    rng = np.random.default_rng(11)
    ids = [f"img{i:02d}" for i in range(n)]
    for k, image_id in enumerate(ids):
        centres = grid_centres(2, 2, 44, 26, jitter=4, rng=rng)[: 2 + k % 3]
        field, _, _ = draw_field(centres, size, nuc_r=7, cell_r=24, rng=rng)
        write_field(root / "test", image_id, field)
    pd.DataFrame({"ID": ids}).to_csv(root / "test.csv", index=False)
    return ids


def test_resume_skips_finished_images_and_force_redoes_them(tmp_path):
    ids = _write_split(tmp_path / "data")
    out = tmp_path / "run" / "masks" / "test"
    t1 = segment_images(ids, tmp_path / "data" / "test", out)
    assert list(t1["ID"]) == ids and (t1["n_cells"] >= 2).all()
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*_cellmask.png")}
    os.remove(out / "img02_cellmask.png")  # as if interrupted before img02 finished
    t2 = segment_images(ids, tmp_path / "data" / "test", out)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*_cellmask.png")}
    assert {k for k in after if after[k] != first.get(k)} == {"img02_cellmask.png"}
    pd.testing.assert_frame_equal(t1.drop(columns="seconds"), t2.drop(columns="seconds"))
    segment_images(ids, tmp_path / "data" / "test", out, force=True)
    forced = {p.name: p.stat().st_mtime_ns for p in out.glob("*_cellmask.png")}
    assert all(forced[k] != after[k] for k in after)
    c, n = read_mask(out / "img01_cellmask.png"), read_mask(out / "img01_nucleimask.png")
    check_masks(c, n)
    assert t2.set_index("ID").loc["img01", "n_cells"] == c.max()


def test_two_shards_merged_equal_one_run(tmp_path):
    ids = _write_split(tmp_path / "data", n=5)
    img = tmp_path / "data" / "test"
    one = segment_images(ids, img, tmp_path / "one")
    for i in range(2):
        segment_images(ids, img, tmp_path / "sharded", shard=(i, 2), workers=2 if i else 1)
    assert (tmp_path / "sharded" / table_name((1, 2))).is_file()
    merged = merge_tables(tmp_path / "sharded", 2, ids)
    pd.testing.assert_frame_equal(one.drop(columns="seconds"), merged.drop(columns="seconds"))
    on_disk = pd.read_csv(tmp_path / "sharded" / "cells.csv", dtype={"ID": str})
    assert list(on_disk["ID"]) == ids
    for image_id in ids:
        a = read_mask(tmp_path / "one" / f"{image_id}_cellmask.png")
        b = read_mask(tmp_path / "sharded" / f"{image_id}_cellmask.png")
        assert np.array_equal(a, b)
    with pytest.raises(FileNotFoundError, match="shard-2-of-3"):
        merge_tables(tmp_path / "sharded", 3, ids)


def test_bad_image_is_skipped_or_raises_naming_the_file(tmp_path):
    ids = _write_split(tmp_path / "data", n=3)
    img = tmp_path / "data" / "test"
    (img / "img01_green.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    with pytest.raises(InputError, match="img01_green.png"):
        segment_images(ids, img, out, on_bad_image="error")
    table = segment_images(ids, img, out, on_bad_image="skip")
    assert list(table["ID"]) == ["img00", "img02"]
    skipped = pd.read_csv(out / "skipped.csv")
    assert list(skipped["ID"]) == ["img01"] and "img01_green.png" in skipped["reason"][0]


def test_stage_script_works_alone_on_a_folder_of_fields(tmp_path):
    import subprocess
    import sys

    _write_split(tmp_path / "data", n=2)
    repo = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, str(repo / "stages" / "03_segment.py"), "--data", str(tmp_path / "data"), "--split", "test",
           "--run", str(tmp_path / "run"), "--profile", "quick", "--workers", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    table = pd.read_csv(tmp_path / "run" / "masks" / "test" / "cells.csv")
    assert list(table.columns[:4]) == ["ID", "height", "width", "n_cells"] and len(table) == 2
    assert (tmp_path / "run" / "masks" / "test" / "img00_nucleimask.png").is_file()


# ------------------------------------------------------------------ quality on generated and real data
def test_quality_on_the_synthetic_benchmark_generator():
    synth = pytest.importorskip("hpa.synth.generate")
    seg = get_segmenter("classical")
    n_true = n_pred = n_matched = 0
    for k in range(3):
        sf = synth.make_field(np.random.default_rng(100 + k), size=256)
        cells, nuclei = seg.segment(sf.field)
        check_masks(cells, nuclei)
        m = match_cells(cells, sf.cell_mask, 0.6)
        n_true, n_pred, n_matched = n_true + m.n_true, n_pred + m.n_pred, n_matched + m.n_matched
    assert n_matched / n_true >= 0.95 and 1 - n_matched / n_pred <= 0.05, (n_true, n_pred, n_matched)


@needs(REAL / "masks")
def test_real_field_recall_against_hpa_cell_segmentation():
    image_id = "000a6c98-bb9b-11e8-b2b9-ac1f6b6435d0"
    field = read_field(REAL / "images", image_id)
    ref = read_mask(REAL / "masks" / f"{image_id}_predictedmask.png")
    cells, nuclei = get_segmenter("classical").segment(field)
    check_masks(cells, nuclei)
    m = match_cells(cells, ref, 0.6)
    assert m.recall >= 0.9 and m.unmatched_pred_frac <= 0.1, (m.recall, m.unmatched_pred_frac)
