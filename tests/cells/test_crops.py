"""Cell crops and their cache: exact geometry, outside-pixel handling, padding, index order, resume."""


import numpy as np
import pytest
from shared_data import SHARED, needs

from hpa.cells.crops import INDEX_COLS, _crop_job, build_crop_cache, crop_cell, crop_image_cells, crop_window
from hpa.cells.table import cell_geometry
from hpa.io.fields import field_scale, read_field, read_mask, to_uint8, write_field, write_mask


def ramp_field(h=64, w=64, dtype=np.uint8):
    """Field whose pixel (c, y, x) = 50 * c + x + y (distinct, < 256 for 64 px)."""
    yy, xx = np.mgrid[:h, :w]
    return np.stack([(50 * c + xx + yy) % 256 for c in range(4)]).astype(dtype)


def test_crop_window_is_square_centred_with_margin():
    assert crop_window(10, 20, 30, 30, 0.0) == (10, 15, 20)
    assert crop_window(10, 20, 30, 30, 0.1) == (8, 13, 24)
    assert crop_window(0, 0, 10, 10, 0.5) == (-5, -5, 20)
    with pytest.raises(ValueError, match="empty bounding box"):
        crop_window(5, 5, 5, 9, 0.1)


@pytest.mark.parametrize("outside", ["zero", "dim", "keep"])
def test_crop_of_known_cell_exact(outside):
    field = ramp_field()
    mask = np.zeros((64, 64), np.int32)
    mask[20:30, 10:30] = 3  # a 20 x 10 rectangle
    mask[22:26, 14:18] = 0  # a hole: outside the cell
    crop = crop_cell(field, mask, 3, (10, 20, 30, 30), crop_size=20, margin=0.0, outside=outside, dim_factor=0.25)
    assert crop.dtype == np.uint8 and crop.shape == (4, 20, 20)
    win = field[:, 15:35, 10:30]
    inside = mask[15:35, 10:30] == 3
    assert np.array_equal(crop[:, inside], win[:, inside])
    expected_out = {"zero": np.zeros_like(win), "dim": np.rint(win * 0.25).astype(np.uint8), "keep": win}[outside]
    assert np.array_equal(crop[:, ~inside], expected_out[:, ~inside])
    assert inside.sum() == 200 - 16


def test_border_cell_is_padded_with_zeros_not_shifted():
    field = ramp_field() + 1  # no zero pixels in the field
    mask = np.zeros((64, 64), np.int32)
    mask[0:10, 0:10] = 1
    crop = crop_cell(field, mask, 1, (0, 0, 10, 10), crop_size=20, margin=0.5, outside="keep")
    assert np.all(crop[:, :5, :] == 0) and np.all(crop[:, :, :5] == 0)  # window rows/cols -5..-1
    assert np.array_equal(crop[:, 5:, 5:], field[:, 0:15, 0:15])  # the cell stays centred
    # the far side of the field: window 59..79 clipped at 64
    mask2 = np.zeros((64, 64), np.int32)
    mask2[54:64, 54:64] = 2
    crop2 = crop_cell(field, mask2, 2, (54, 54, 64, 64), 20, 0.5, "keep")
    assert np.array_equal(crop2[:, :15, :15], field[:, 49:64, 49:64]) and np.all(crop2[:, 15:, :] == 0)


def test_resize_uses_area_average_and_uint16_is_reduced_by_the_field_range():
    field = np.zeros((4, 64, 64), np.uint16)
    field[:, 20:40, 20:40] = 200 * 256
    field[:, 20:30, 20:30] = 100 * 256
    mask = np.zeros((64, 64), np.int32)
    mask[20:40, 20:40] = 1
    # the field's own range: its bright level 51200 -> 255, 25600 -> 127.5 -> 128 (round half to even)
    assert field_scale(field) == 51200.0
    crop = crop_cell(field, mask, 1, (20, 20, 40, 40), crop_size=10, margin=0.0, outside="zero")
    assert crop.shape == (4, 10, 10)
    assert np.all(crop[:, :5, :5] == 128) and np.all(crop[:, 5:, 5:] == 255)  # 2x2 blocks average exactly
    up = crop_cell(field, mask, 1, (20, 20, 40, 40), crop_size=40, margin=0.0, outside="zero")
    assert up.shape == (4, 40, 40) and up[0, 0, 0] == 128 and up[0, -1, -1] == 255


def test_a_dim_16_bit_cell_keeps_its_grey_levels_and_the_whole_field_sets_the_scale():
    rng = np.random.default_rng(0)
    field = rng.integers(0, 4000, (4, 64, 64)).astype(np.uint16)  # values 0..3999 of 65535
    field[:, 2:6, 2:6] = 4000  # the bright part lies outside the cell's window
    mask = np.zeros((64, 64), np.int32)
    mask[30:50, 30:50] = 1
    crop = crop_cell(field, mask, 1, (30, 30, 50, 50), crop_size=20, margin=0.0, outside="keep")
    expect = to_uint8(field, field_scale(field))[:, 30:50, 30:50]  # the whole field's scale, not the window's
    np.testing.assert_array_equal(crop, expect)
    assert len(np.unique(crop)) > 200  # the high byte alone would leave 16 levels
    geo = cell_geometry(mask)
    np.testing.assert_array_equal(crop_image_cells(field, mask, geo, 20, 0.0, "keep", 0.25)[0], crop)


def test_crop_rejects_bad_settings():
    field, mask = ramp_field(), np.ones((64, 64), np.int32)
    with pytest.raises(ValueError, match="valid: zero, dim, keep"):
        crop_cell(field, mask, 1, (0, 0, 64, 64), 16, outside="blur")
    with pytest.raises(ValueError, match="same size"):
        crop_cell(field, mask[:32], 1, (0, 0, 32, 32), 16)


def make_dataset(tmp_path, n_images=3):
    """``n_images`` 64-px fields; image k has k+1 rectangular cells, one touching the border."""
    data, masks = tmp_path / "data", tmp_path / "masks"
    ids = [f"img{k}" for k in range(n_images)]
    rng = np.random.default_rng(0)
    for k, image_id in enumerate(ids):
        write_field(data / "train", image_id, rng.integers(1, 255, (4, 64, 64), dtype=np.uint8))
        mask = np.zeros((64, 64), np.int32)
        for j in range(k + 1):
            mask[4 + 14 * j: 14 + 14 * j, 0 if j == 0 else 10 + 5 * j: 20 + 5 * j] = j + 1
        write_mask(masks / f"{image_id}_cellmask.png", mask)
    return data, masks, ids


def test_a_crop_cache_the_disk_cannot_hold_stops_before_it_is_written(tmp_path, monkeypatch, caplog):
    import errno
    import logging

    import hpa.utils.fs as fs

    data, masks, ids = make_dataset(tmp_path)  # 1 + 2 + 3 cells
    monkeypatch.setattr(fs, "free_bytes", lambda path: 10_000)
    with caplog.at_level(logging.INFO), pytest.raises(fs.NotEnoughSpace) as err:
        build_crop_cache(data, masks, "train", ids, 32, 0.1, "dim", 0.25, tmp_path / "cache")
    need = 6 * 4 * 32 * 32 + 128  # 24,704 bytes
    assert str(err.value) == (f"{tmp_path / 'cache'}: 6 cells of 3 images at 32 px need 24.7 kB on disk, only 10.0 kB "
                              "free there; free some space, put the run on a larger disk (--run), or lower "
                              "cell_model.crop_size") and need == 24_704 and err.value.errno == errno.ENOSPC
    assert "6 cells of 3 images x 4 channels x 32 x 32 px = 24.7 kB on disk" in caplog.text
    assert not list((tmp_path / "cache").glob("*.npy"))


def test_cache_index_order_and_crops(tmp_path):
    data, masks, ids = make_dataset(tmp_path)
    order = ids[::-1]  # the index follows the given order, cells by id
    crops, index = build_crop_cache(data, masks, "train", order, 16, 0.1, "dim", 0.25, tmp_path / "cache")
    assert list(index.columns) == INDEX_COLS
    assert list(index["ID"]) == ["img2"] * 3 + ["img1"] * 2 + ["img0"]
    assert list(index["cell_id"]) == [1, 2, 3, 1, 2, 1] and list(index["row"]) == list(range(6))
    assert crops.shape == (6, 4, 16, 16) and crops.dtype == np.uint8 and isinstance(crops, np.memmap)
    assert list(index["touches_border"]) == [True, False, False, True, False, True]
    for r in index.itertuples():
        field, mask = read_field(data / "train", r.ID), read_mask(masks / f"{r.ID}_cellmask.png")
        geo = cell_geometry(mask).set_index("cell_id").loc[r.cell_id]
        assert (r.x0, r.y0, r.x1, r.y1, r.area) == (geo.x0, geo.y0, geo.x1, geo.y1, geo.area)
        assert np.array_equal(crops[r.row], crop_cell(field, mask, r.cell_id, (r.x0, r.y0, r.x1, r.y1), 16, 0.1, "dim", 0.25))
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert files == ["train_16.json", "train_16.npy", "train_16.parquet"]


def test_cache_resumes_after_interruption_and_rebuilds_on_new_settings(tmp_path, monkeypatch):
    data, masks, ids = make_dataset(tmp_path)
    out = tmp_path / "cache"
    ref, ref_index = build_crop_cache(data, masks, "train", ids, 16, 0.1, "zero", 0.25, tmp_path / "ref")
    real_job, calls = _crop_job, []

    def failing_job(args):
        if args[2] == "img1":
            raise KeyboardInterrupt("simulated interruption")
        calls.append(args[2])
        return real_job(args)

    monkeypatch.setattr("hpa.cells.crops._crop_job", failing_job)
    with pytest.raises(KeyboardInterrupt):
        build_crop_cache(data, masks, "train", ids, 16, 0.1, "zero", 0.25, out)
    assert calls == ["img0"] and not (out / "train_16.npy").exists() and not (out / "train_16.parquet").exists()
    calls.clear()

    def counting_job(args):
        calls.append(args[2])
        return real_job(args)

    monkeypatch.setattr("hpa.cells.crops._crop_job", counting_job)
    crops, index = build_crop_cache(data, masks, "train", ids, 16, 0.1, "zero", 0.25, out)
    assert calls == ["img1", "img2"]  # img0 was not read again
    assert np.array_equal(np.asarray(crops), np.asarray(ref)) and index.equals(ref_index)
    calls.clear()
    build_crop_cache(data, masks, "train", ids, 16, 0.1, "zero", 0.25, out)
    assert calls == []  # complete: reused
    crops2, _ = build_crop_cache(data, masks, "train", ids, 16, 0.1, "keep", 0.25, out)
    assert calls == ids and not np.array_equal(np.asarray(crops2), np.asarray(ref))  # other settings: rebuilt


def test_cache_stopped_after_its_sidecar_leaves_no_build_files_behind(tmp_path, monkeypatch):
    """Stopped after the finished cache's sidecar is written, before the progress file is removed: the
    next call reuses the cache (no image read again) and removes it."""
    from hpa.cells import crops as crops_mod

    data, masks, ids = make_dataset(tmp_path)
    out = tmp_path / "cache"
    real = crops_mod.write_json

    def stop_after_the_final_sidecar(path, obj):
        real(path, obj)
        if not obj.get("partial"):
            raise KeyboardInterrupt

    monkeypatch.setattr(crops_mod, "write_json", stop_after_the_final_sidecar)
    with pytest.raises(KeyboardInterrupt):
        build_crop_cache(data, masks, "train", ids, 16, 0.1, "dim", 0.25, out)
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == ["train_16.json", "train_16.npy", "train_16.parquet",
                                                     "train_16.partial.txt"]
    monkeypatch.setattr(crops_mod, "_crop_job", lambda args: pytest.fail("a complete cache was cropped again"))
    crops, index = build_crop_cache(data, masks, "train", ids, 16, 0.1, "dim", 0.25, out)
    assert sorted(p.name for p in out.iterdir()) == ["train_16.json", "train_16.npy", "train_16.parquet"]
    assert len(index) == len(crops) == 6


def test_cache_with_worker_processes_equals_in_process(tmp_path):
    data, masks, ids = make_dataset(tmp_path)
    a, ia = build_crop_cache(data, masks, "train", ids, 16, 0.1, "dim", 0.25, tmp_path / "a", workers=0)
    b, ib = build_crop_cache(data, masks, "train", ids, 16, 0.1, "dim", 0.25, tmp_path / "b", workers=2)
    assert np.array_equal(np.asarray(a), np.asarray(b)) and ia.equals(ib)


def test_cache_checks_masks_and_ids(tmp_path):
    data, masks, ids = make_dataset(tmp_path, 1)
    with pytest.raises(FileNotFoundError, match="no cell mask"):
        build_crop_cache(data, masks, "train", ids + ["nope"], 16, 0.1, "dim", 0.25, tmp_path / "c")
    with pytest.raises(ValueError, match="duplicate"):
        build_crop_cache(data, masks, "train", ids + ids, 16, 0.1, "dim", 0.25, tmp_path / "c")


@needs(SHARED / "hpa_real" / "masks")
def test_real_full_resolution_field(tmp_path):
    """A real 2048+ px field: crops come from the full-resolution field, cell by cell."""
    real = SHARED / "hpa_real"
    mask_file = sorted((real / "masks").glob("*_predictedmask.png"))[0]
    image_id = mask_file.name[: -len("_predictedmask.png")]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train").symlink_to(real / "images")
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / f"{image_id}_cellmask.png").symlink_to(mask_file)
    crops, index = build_crop_cache(tmp_path / "data", tmp_path / "masks", "train", [image_id], 32, 0.1, "zero",
                                       0.25, tmp_path / "cache")
    mask = read_mask(mask_file)
    assert max(mask.shape) >= 2048
    assert len(index) == len(np.unique(mask)) - 1 and crops.shape == (len(index), 4, 32, 32)
    big = index.sort_values("area").iloc[-1]
    field = read_field(real / "images", image_id)
    expect = crop_cell(field, mask, int(big.cell_id), (big.x0, big.y0, big.x1, big.y1), 32, 0.1, "zero")
    assert np.array_equal(crops[int(big.row)], expect) and crops[int(big.row)].max() > 0
