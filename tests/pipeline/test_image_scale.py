"""The image model's working resolution from the cells' size: arithmetic, sources, saving, and that
cells half as wide on fields twice as large reach the network at the same size."""

import math

import numpy as np
import pandas as pd
import pytest

from hpa.config import ClassicalSegmenterSettings, ConfigError, build_config
from hpa.io.errors import InputError
from hpa.io.fields import write_field
from hpa.pipeline.image_scale import (
    equivalent_diameter,
    load_scale,
    mask_cell_rel,
    resolve_scale,
    run_scale,
    scale_path,
    scaled_crop,
    spread,
    table_cell_rel,
    working_size,
)


def _settings(**kw):
    return build_config("default", overrides=[f"image_model.{k}={v}" for k, v in kw.items()]).image_model


def test_working_size_rounds_to_32_and_clips():
    assert working_size(0.22, 28, [64, 1024]) == 128  # 127.3
    assert working_size(0.2, 28, [64, 1024]) == 128  # 140 -> 4.375 x 32
    assert working_size(0.107, 28, [64, 1024]) == 256  # 261.7
    assert working_size(0.17, 80, [128, 512]) == 480  # 470.6: an HPA field in the full profile
    assert working_size(0.01, 28, [64, 1024]) == 1024 and working_size(0.9, 28, [64, 1024]) == 64
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        working_size(0.0, 28, [64, 1024])
    with pytest.raises(ValueError, match="min <= max"):
        working_size(0.2, 28, [512, 128])


def test_the_training_crop_keeps_its_fraction_of_the_field():
    assert scaled_crop(64, 128, 128) == 64
    assert scaled_crop(64, 256, 128) == 128
    assert scaled_crop(64, 160, 128) == 80
    assert scaled_crop(64, 192, 128) == 96 and scaled_crop(64, 224, 128) == 112
    assert scaled_crop(64, 64, 128) == 32 and scaled_crop(100, 64, 128) == 48  # 50 -> a multiple of 16
    assert scaled_crop(None, 256, 128) is None


def test_diameters_from_masks_and_from_stage_03s_table():
    assert equivalent_diameter(math.pi * 25.0) == pytest.approx(10.0)
    mask = np.zeros((100, 100), np.int32)
    mask[:10, :10] = 1  # areas 100, 400, 900: median 400 -> diameter 22.57 -> 0.2257 of the side
    mask[20:40, 20:40] = 2
    mask[50:80, 50:80] = 3
    assert mask_cell_rel(mask) == pytest.approx(2 * math.sqrt(400 / math.pi) / 100)
    assert math.isnan(mask_cell_rel(np.zeros((5, 5), np.int32)))
    table = pd.DataFrame({"ID": ["a", "b", "c"], "height": [500, 1000, 800], "width": [500, 1000, 200],
                          "n_cells": [3, 5, 0], "median_cell_area": [math.pi * 50 ** 2, math.pi * 100 ** 2, 0.0]})
    np.testing.assert_allclose(table_cell_rel(table), [0.2, 0.2])  # c (no cells) left out
    assert spread(list("abcdefghij"), 4) == ["a", "d", "g", "j"] and spread(list("ab"), 4) == ["a", "b"]


def _fields(folder, n, size):
    for i in range(n):
        write_field(folder, f"f{i}", np.zeros((4, size, size), np.uint8))
    return [f"f{i}" for i in range(n)]


def test_sources_in_order_setting_table_and_no_cells(tmp_path):
    ids = _fields(tmp_path / "train", 3, 96)
    s = _settings()
    # 1. the setting: 24 px in 96-px fields = 25% -> 28 / 0.25 = 112 -> a multiple of 32: 128 (3.5 -> 4)
    sc = resolve_scale(s, tmp_path / "train", ids, cell_diameter=24.0)
    assert (sc.image_size, sc.train_crop, sc.source) == (128, 64, "setting cell_diameter")
    assert sc.cell_rel == 0.25 and sc.field_side == 96 and sc.cell_px_net == 32.0
    with pytest.raises(ConfigError, match="cell_diameter"):
        resolve_scale(s, tmp_path / "train", ids, cell_diameter=500.0)
    # 2. stage 03's table (rows of other images ignored): cells 10% of a 2048-px side -> 280 -> 288, crop 144
    table = tmp_path / "cells.csv"
    pd.DataFrame({"ID": ids + ["other"], "height": 2048, "width": 2048, "n_cells": [20, 20, 20, 20],
                  "median_cell_area": [math.pi * 102.4 ** 2] * 3 + [1.0]}).to_csv(table, index=False)
    sc = resolve_scale(s, tmp_path / "train", ids, masks_table=table)
    assert (sc.image_size, sc.train_crop, sc.n_fields) == (288, 144, 3) and sc.cell_rel == pytest.approx(0.1)
    # 3. the classical segmenter on black fields finds nothing: a clear error
    with pytest.raises(InputError, match="no cell found in 3 training fields.*cell_diameter=PIXELS"):
        resolve_scale(s, tmp_path / "train", ids, classical=ClassicalSegmenterSettings())
    # cell_px null: image_size for every data set, nothing measured
    sc = resolve_scale(_settings(cell_px="null", image_size=96), tmp_path / "train", ids)
    assert (sc.image_size, sc.train_crop, sc.cell_rel) == (96, 64, None)


def test_the_resolution_is_saved_and_reused_and_a_change_under_trained_weights_is_an_error(tmp_path):
    ids = _fields(tmp_path / "train", 2, 96)
    run = tmp_path / "run"
    s = _settings()
    first = run_scale(run, s, tmp_path / "train", ids, cell_diameter=24.0)
    assert load_scale(run) == first and scale_path(run).is_file()
    (run / "masks" / "train").mkdir(parents=True)  # masks appearing later do not change a saved resolution
    pd.DataFrame({"ID": ids, "height": 96, "width": 96, "n_cells": 1, "median_cell_area": 100.0}).to_csv(
        run / "masks" / "train" / "cells.csv", index=False)
    assert run_scale(run, s, tmp_path / "train", ids, cell_diameter=24.0) == first
    other = run_scale(run, _settings(cell_px=56), tmp_path / "train", ids, cell_diameter=24.0)  # no weights yet
    assert other.image_size == 224 and load_scale(run) == other
    (run / "image_model" / "last.pt").write_bytes(b"x")
    with pytest.raises(ConfigError, match="trained at 224 px; pass --force"):
        run_scale(run, s, tmp_path / "train", ids, cell_diameter=24.0)
    assert run_scale(run, s, tmp_path / "train", ids, cell_diameter=24.0, force=True).image_size == 128


@pytest.mark.slow
def test_half_size_cells_on_twice_the_field_reach_the_network_at_the_same_size(tmp_path):
    """The default benchmark's fields (256 px, cell scale 1) and fields of 512 px with cells half as wide
    (cell scale 0.5, four times as many): measured by the classical segmenter, cached at 128 and 256 px."""
    from hpa.synth.generate import make_field

    s, seg = _settings(), build_config("default").segment.classical
    sizes = {}
    for size, c in ((256, 1.0), (512, 0.5)):
        folder = tmp_path / f"{size}"
        ids = []
        for i in range(3):
            f = make_field(np.random.default_rng([7, i]), size, (0,), cell_scale=c)
            write_field(folder, f"f{i}", f.field)
            ids.append(f"f{i}")
        sizes[size] = resolve_scale(s, folder, ids, classical=seg)
    assert sizes[256].image_size == 128 and sizes[256].train_crop == 64
    assert sizes[512].image_size == 256 and sizes[512].train_crop == 128
    assert abs(sizes[512].cell_px_net - sizes[256].cell_px_net) < 0.15 * sizes[256].cell_px_net
    assert all(abs(sc.cell_px_net - 28) < 4 for sc in sizes.values())
