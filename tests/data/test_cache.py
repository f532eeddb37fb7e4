"""Folds, the field cache (atomic, resumable, reusable), channel statistics, datasets, augmentation."""

import json
import os
import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_fields import make_tiny_dataset

from hpa.data.augment import BatchAugment
from hpa.data.cache import (
    FieldDataset,
    _load_field,
    build_field_cache,
    cache_bad_ids,
    cache_path,
    channel_stats,
    read_cache_rows,
)
from hpa.data.splits import load_or_make_splits, make_folds
from hpa.io.errors import InputError
from hpa.io.fields import field_scale, read_field, resize_field, to_uint8, write_field


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny"), n=12, size=64)


# --------------------------------------------------------------------------- folds
def test_folds_are_stratified_and_deterministic():
    rng = np.random.default_rng(0)
    y = (rng.random((60, 6)) < [0.5, 0.3, 0.1, 0.05, 0.2, 0.5]).astype(np.uint8)
    folds = make_folds(y, 3, seed=1)
    assert folds.shape == (60,) and set(folds.tolist()) == {0, 1, 2}
    assert np.array_equal(folds, make_folds(y, 3, seed=1))
    assert np.bincount(folds).max() - np.bincount(folds).min() <= 2
    for c in range(6):  # each class split as evenly as its count allows
        per_fold = [int(y[folds == k, c].sum()) for k in range(3)]
        assert max(per_fold) - min(per_fold) <= 1, (c, per_fold)


def test_folds_reject_bad_counts():
    with pytest.raises(ValueError, match=r"2 <= folds <= number of images \(3\)"):
        make_folds(np.eye(3), 5)


def test_splits_written_then_reused_and_mismatch_is_an_error(tmp_path):
    y = np.eye(4, dtype=np.uint8)[[0, 1, 2, 3, 0, 1, 2, 3]]
    ids = [f"a{i}" for i in range(8)]
    path = tmp_path / "splits.csv"
    f1 = load_or_make_splits(path, ids, y, 2, seed=0)
    df = pd.read_csv(path)
    assert list(df.columns) == ["ID", "fold"] and df["ID"].tolist() == ids
    assert np.array_equal(load_or_make_splits(path, ids[::-1], y[::-1], 2, seed=5), f1[::-1])
    with pytest.raises(InputError, match="made for other images"):
        load_or_make_splits(path, ids[:6], y[:6], 2, seed=0)


# --------------------------------------------------------------------------- cache
def test_cache_holds_resized_uint8_fields_and_is_reused(tiny, tmp_path, monkeypatch):
    ids = [f"img{i:03d}" for i in range(12)]
    out = cache_path(tmp_path, "train", 32)
    assert out == tmp_path / "cache" / "train_32.npy"
    arr = build_field_cache(tiny, "train", ids, 32, out, workers=0)
    assert isinstance(arr, np.memmap) and arr.shape == (12, 4, 32, 32) and arr.dtype == np.uint8
    for i in (0, 7):
        assert np.array_equal(arr[i], to_uint8(resize_field(read_field(tiny / "train", ids[i]), 32)))
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["ids"] == ids and side["size"] == 32 and side["bad_ids"] == {}
    assert not list(out.parent.glob("*partial*")) and not list(out.parent.glob("*.done.npy"))

    def no_decoding(args):
        raise AssertionError("a complete cache must not be decoded again")

    monkeypatch.setattr("hpa.data.cache._load_field", no_decoding)
    assert np.array_equal(build_field_cache(tiny, "train", ids, 32, out), arr)


def test_cache_from_worker_processes_matches(tiny, tmp_path):
    ids = [f"img{i:03d}" for i in range(12)]
    a = build_field_cache(tiny, "train", ids, 24, tmp_path / "a.npy", workers=0)
    b = build_field_cache(tiny, "train", ids, 24, tmp_path / "b.npy", workers=2)
    assert np.array_equal(a, b)


def test_interrupted_cache_resumes_without_redecoding(tiny, tmp_path, monkeypatch):
    ids = [f"img{i:03d}" for i in range(12)]
    out = tmp_path / "c.npy"
    real = _load_field
    calls = []

    def crash_at_eighth(args):
        calls.append(args[2])
        if len(calls) == 8:
            raise KeyboardInterrupt
        return real(args)

    monkeypatch.setattr("hpa.data.cache._load_field", crash_at_eighth)
    with pytest.raises(KeyboardInterrupt):
        build_field_cache(tiny, "train", ids, 32, out, flush_every=2)
    assert not out.exists() and (tmp_path / "c.partial.npy").exists()
    calls.clear()
    monkeypatch.setattr("hpa.data.cache._load_field", lambda a: (calls.append(a[2]), real(a))[1])
    arr = build_field_cache(tiny, "train", ids, 32, out, flush_every=2)
    assert calls == ids[7:]  # the seven finished fields are not decoded again
    ref = build_field_cache(tiny, "train", ids, 32, tmp_path / "ref.npy")
    assert np.array_equal(arr, ref)


def test_cache_stopped_after_its_sidecar_leaves_no_build_files_behind(tiny, tmp_path, monkeypatch):
    """Stopped between writing the finished cache's sidecar and removing the build's own files
    (progress bitmap, partial sidecar): the next call reuses the cache and removes them."""
    from hpa.data import cache as cache_mod

    ids = [f"img{i:03d}" for i in range(4)]
    out = tmp_path / "c.npy"
    real = cache_mod.write_json

    def stop_after_the_sidecar(path, obj):
        real(path, obj)
        if path == out.with_suffix(".json"):
            raise KeyboardInterrupt

    monkeypatch.setattr(cache_mod, "write_json", stop_after_the_sidecar)
    with pytest.raises(KeyboardInterrupt):
        build_field_cache(tiny, "train", ids, 16, out, flush_every=2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.done.npy", "c.json", "c.npy", "c.partial.json"]
    monkeypatch.setattr(cache_mod, "_load_field", lambda args: pytest.fail("a complete cache was decoded again"))
    arr = build_field_cache(tiny, "train", ids, 16, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "c.npy"]
    assert np.array_equal(arr[3], to_uint8(resize_field(read_field(tiny / "train", ids[3]), 16)))


def test_cache_bad_image_error_or_skip(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        write_field(tmp_path / "train", f"x{i}", rng.integers(0, 255, (4, 20, 20), dtype=np.uint8))
    (tmp_path / "train" / "x1_green.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match=r"x1_green\.png: cannot read image.*on_bad_image=skip"):
        build_field_cache(tmp_path, "train", ["x0", "x1", "x2"], 16, tmp_path / "e.npy")
    arr = build_field_cache(tmp_path, "train", ["x0", "x1", "x2"], 16, tmp_path / "s.npy", on_bad_image="skip")
    assert list(cache_bad_ids(tmp_path / "s.npy")) == ["x1"]
    assert arr[1].max() == 0  # the bad field's row stays zero, the others hold their fields
    for i in (0, 2):
        assert np.array_equal(arr[i], to_uint8(resize_field(read_field(tmp_path / "train", f"x{i}"), 16)))
    with pytest.raises(InputError, match="image folder .* does not exist"):
        build_field_cache(tmp_path, "test", ["x0"], 16, tmp_path / "t.npy")


def test_a_field_cache_the_disk_cannot_hold_stops_before_decoding(tiny, tmp_path, monkeypatch, caplog):
    import logging

    import hpa.utils.fs as fs

    ids = pd.read_csv(tiny / "train.csv")["ID"].tolist()
    monkeypatch.setattr(fs, "free_bytes", lambda path: 10 ** 9)
    decoded = []
    monkeypatch.setattr("hpa.data.cache._load_field", lambda job: decoded.append(job))
    out = tmp_path / "cache" / "train_8192.npy"
    with caplog.at_level(logging.INFO), pytest.raises(fs.NotEnoughSpace) as err:
        build_field_cache(tiny, "train", ids, 8192, out, progress=False)  # 12 x 4 x 8192^2 bytes: 3.2 GB
    assert str(err.value) == (f"{out.parent}: 12 fields at 8192 px need 3.2 GB on disk, only 1.0 GB free there; free "
                              "some space, put the run on a larger disk (--run), or lower image_model.cell_px or the "
                              "maximum of image_model.image_size_range")
    assert "12 fields x 4 channels x 8192 x 8192 px = 3.2 GB on disk" in caplog.text
    assert not decoded and not out.with_name("train_8192.partial.npy").exists()


def test_a_dim_16_bit_field_keeps_its_grey_levels_in_the_cache(tmp_path):
    rng = np.random.default_rng(1)
    field = rng.integers(0, 4001, (4, 64, 64)).astype(np.uint16)  # 0..4000 of 65535: the high byte holds 0..15
    write_field(tmp_path / "train", "w", field)
    arr = build_field_cache(tmp_path, "train", ["w"], 32, tmp_path / "w.npy")
    scale = field_scale(field)
    assert 3990 <= scale <= 4000  # the 99.99th percentile of the four channels pooled
    np.testing.assert_array_equal(arr[0], to_uint8(resize_field(field, 32), scale))  # scale of the full field
    assert arr.max() > 200 and len(np.unique(arr)) > 150  # the high byte would give 0..15


def _rss_file_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_cache_rows_are_read_without_keeping_them_mapped(tmp_path):
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 255, (48, 4, 256, 256), dtype=np.uint8)  # 256 KiB per row, 12 MiB in all
    np.save(tmp_path / "c.npy", ref)
    cache = np.load(tmp_path / "c.npy", mmap_mode="r")
    rows = [5, 0, 47, 5]
    assert np.array_equal(read_cache_rows(cache, rows), ref[rows])
    assert np.array_equal(read_cache_rows(ref, rows), ref[rows])  # a plain array is indexed
    before = _rss_file_kib()
    for start in range(0, 48, 8):
        read_cache_rows(cache, range(start, start + 8))
    assert _rss_file_kib() - before < 4 * 1024  # indexing the map would keep ~12 MiB resident
    with pytest.raises(IndexError, match="rows \\[48\\]"):
        read_cache_rows(cache, [1, 48])
    with open(tmp_path / "c.npy", "r+b") as f:
        f.truncate(cache.offset + 10 * ref[0].nbytes)
    with pytest.raises(InputError, match="ends inside row 12"):
        read_cache_rows(cache, [12])


# --------------------------------------------------------------------------- stats and datasets
def test_channel_stats_match_numpy():
    rng = np.random.default_rng(1)
    cache = rng.integers(0, 256, (10, 4, 8, 8), dtype=np.uint8)
    rows = [1, 3, 4, 8]
    mean, std = channel_stats(cache, rows, chunk=3)
    x = cache[rows].astype(np.float64) / 255
    assert np.allclose(mean, x.mean(axis=(0, 2, 3)), atol=1e-9)
    assert np.allclose(std, x.std(axis=(0, 2, 3)), atol=1e-9)
    assert channel_stats(np.zeros((2, 4, 4, 4), np.uint8))[1] == [1e-3] * 4


def test_field_dataset_items_and_lazy_pickling(tiny, tmp_path):
    ids = [f"img{i:03d}" for i in range(12)]
    out = tmp_path / "d.npy"
    build_field_cache(tiny, "train", ids, 32, out)
    y = np.eye(19, dtype=np.float32)[np.arange(3)]
    ds = FieldDataset(out, rows=[2, 5, 9], targets=y)
    x, t = ds[1]
    assert x.dtype == torch.uint8 and x.shape == (4, 32, 32) and torch.equal(t, torch.from_numpy(y[1]))
    assert torch.equal(x, torch.from_numpy(np.load(out)[5]))
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._cache is None and torch.equal(clone[1][0], x)
    with pytest.raises(IndexError, match=r"rows must lie in 0..11"):
        FieldDataset(out, rows=[12])
    with pytest.raises(ValueError, match=r"targets must be \(3, C\)"):
        FieldDataset(out, rows=[0, 1, 2], targets=y[:2])


# --------------------------------------------------------------------------- augmentation
def _symmetries(x):
    out = []
    for flip in (False, True):
        y = x.flip(-1) if flip else x
        out += [torch.rot90(y, k, (-2, -1)) for k in range(4)]
    return out


def test_flips_and_turns_are_exact_symmetries():
    torch.manual_seed(0)
    x = torch.rand(16, 4, 12, 12)
    y = BatchAugment(crop_scale=(1.0, 1.0), intensity=0.0)(x)
    seen = set()
    for a, b in zip(x, y):
        match = [i for i, s in enumerate(_symmetries(a)) if torch.equal(s, b)]
        assert match, "output is not a flip/turn of the input"
        seen.add(match[0])
    assert len(seen) >= 4  # several different symmetries were drawn


def test_affine_path_without_crop_is_a_symmetry_and_crops_keep_shape():
    torch.manual_seed(1)
    x = torch.rand(8, 4, 16, 16)
    y = BatchAugment(crop_scale=(0.99999, 1.0), crop_ratio=(1.0, 1.0))(x)  # grid_sample path, crop ~ whole field
    for a, b in zip(x, y):
        assert min(float((s - b).abs().max()) for s in _symmetries(a)) < 1e-3
    z = BatchAugment(crop_scale=(0.3, 0.6), intensity=0.3)((x * 255).to(torch.uint8))
    assert z.shape == x.shape and z.dtype == torch.float32 and 0 <= float(z.min()) and float(z.max()) <= 1


def test_intensity_jitter_is_per_channel_and_bounded():
    torch.manual_seed(2)
    x = torch.full((64, 4, 8, 8), 0.5)
    y = BatchAugment(flips=False, rot90=False, intensity=0.3)(x)
    # a flat channel keeps no contrast to change: 0.5 ** g * b with log g and b drawn per image and channel
    # (uniform in [-0.3, 0.3] and [0.7, 1.3]), in that order, from torch's generator
    torch.manual_seed(2)
    log_g, _contrast, b = (torch.empty(64, 4, 1, 1).uniform_(lo, hi) for lo, hi in ((-0.3, 0.3), (0.7, 1.3), (0.7, 1.3)))
    want = (0.5 ** torch.exp(log_g) * b).expand(64, 4, 8, 8)
    torch.testing.assert_close(y, want, rtol=0, atol=1e-6)
    assert 0.5 ** np.exp(0.3) * 0.7 <= float(y.min()) and float(y.max()) <= 0.5 ** np.exp(-0.3) * 1.3  # 0.27, 0.78
    assert len(torch.unique(y[:, :, 0, 0])) == 64 * 4  # a draw per image and channel
    assert torch.equal(BatchAugment(flips=False, rot90=False)(x), x)
    with pytest.raises(ValueError, match="crop_scale"):
        BatchAugment(crop_scale=(0.0, 1.0))


def test_crops_to_a_smaller_output_size():
    torch.manual_seed(3)
    x = torch.arange(16 * 16, dtype=torch.float32).view(1, 1, 16, 16).repeat(4, 4, 1, 1) / 255
    aug = BatchAugment(flips=False, rot90=False, crop_scale=(0.25, 0.25), crop_ratio=(1, 1), out_size=8)
    y = aug(x)
    assert y.shape == (4, 4, 8, 8)
    # an 8x8 crop at the field's own resolution: neighbouring output pixels differ by one input pixel
    dx = (y[..., 1:] - y[..., :-1]) * 255
    assert torch.allclose(dx, torch.ones_like(dx), atol=1e-3)
    with pytest.raises(ValueError, match="out_size must be >= 8"):
        BatchAugment(out_size=4)
