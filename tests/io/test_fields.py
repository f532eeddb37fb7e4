"""Reading fields, labels and masks, with a clear error for each kind of bad input."""


import numpy as np
import pytest
from PIL import Image
from shared_data import HPA_REAL, needs

from hpa.constants import CHANNELS, NUM_CLASSES
from hpa.io.errors import InputError
from hpa.io.fields import (
    field_scale,
    field_to_uint8,
    read_field,
    read_field_float,
    read_mask,
    resize_field,
    rgb_composite,
    to_float,
    to_uint8,
    write_field,
    write_mask,
)
from hpa.io.layout import check_images_exist, list_split, read_labels

REAL = HPA_REAL


def make_field(folder, image_id="img1", h=20, w=30, dtype=np.uint8, seed=0):
    rng = np.random.default_rng(seed)
    hi = 255 if dtype == np.uint8 else 65535
    field = rng.integers(0, hi, size=(4, h, w), endpoint=True).astype(dtype)
    write_field(folder, image_id, field)
    return field


def test_read_field_roundtrip_8_and_16_bit(tmp_path):
    f8 = make_field(tmp_path, "a", dtype=np.uint8)
    f16 = make_field(tmp_path, "b", dtype=np.uint16)
    got8, got16 = read_field(tmp_path, "a"), read_field(tmp_path, "b")
    assert got8.dtype == np.uint8 and got8.shape == (4, 20, 30) and np.array_equal(got8, f8)
    assert got16.dtype == np.uint16 and np.array_equal(got16, f16)
    flt = read_field_float(tmp_path, "b")
    scale = field_scale(f16)  # the field's own range: its 99.99th percentile (uniform 0..65535: near the top)
    assert 65000 < scale <= 65535
    assert flt.dtype == np.float32 and flt.max() == 1.0 and np.allclose(flt, np.minimum(f16 / scale, 1.0))
    assert to_float(np.array([255], np.uint8))[0] == 1.0


def _dim16(h=40, w=100, hot=0):
    """A dim 16-bit field: every channel holds each value 0..3999 (h * w = 4000 pixels), ``hot`` pixels at 65535."""
    f = np.stack([np.roll(np.arange(4000, dtype=np.uint16), 997 * c).reshape(h, w) for c in range(4)])
    f[0].flat[:hot] = 65535
    return f


def test_a_dim_16_bit_field_keeps_its_grey_levels():
    f16 = _dim16()
    # 16,000 pooled pixels, 4 of each value: the 99.99th percentile's rank floor(0.9999 * 15999) = 15997 -> 3999
    assert field_scale(f16) == 3999.0
    u8 = to_uint8(f16)
    assert u8.dtype == np.uint8 and u8.max() == 255 and len(np.unique(u8)) == 256  # the high byte alone: 16 levels
    assert len(np.unique(f16 >> 8)) == 16
    np.testing.assert_array_equal(u8, np.rint(f16.astype(np.float64) * 255 / 3999).astype(np.uint8))
    assert to_float(f16).max() == 1.0 and to_float(f16)[0].min() == 0.0
    # a hot pixel does not set the scale (the top 0.01% saturate: 1.6 of 16,000 pixels here, 1,677 of a 2048-px field)
    assert field_scale(_dim16(hot=1)) == 3999.0 and field_scale(_dim16(hot=3)) == 65535.0
    # resized: the full field's scale, then the resize in 16 bit
    small = field_to_uint8(f16, (20, 50))
    np.testing.assert_array_equal(small, to_uint8(resize_field(f16, (20, 50)), 3999.0))


def test_16_bit_scaling_keeps_the_channels_relative_brightness():
    f = _dim16().astype(np.uint32)
    f[1] //= 100  # a dim protein channel (0..39) next to bright stains: weak staining, not to be stretched
    f = (f * 10).astype(np.uint16)  # stains 0..39990
    u8 = to_uint8(f)
    assert field_scale(f) == 39990.0 and u8[1].max() == round(390 * 255 / 39990) == 2
    black = np.full((4, 10, 10), 7, np.uint16)  # nearly black: never brightened past its own numbers
    assert field_scale(black) == 255.0 and np.all(to_uint8(black) == 7)


def test_8_bit_fields_are_unchanged():
    f8 = np.random.default_rng(0).integers(0, 256, (4, 30, 40), dtype=np.uint8)
    assert field_scale(f8) == 255.0 and to_uint8(f8) is f8
    np.testing.assert_array_equal(field_to_uint8(f8, 20), resize_field(f8, 20))
    np.testing.assert_array_equal(to_float(f8), f8 / np.float32(255))


def test_channel_order_is_red_green_blue_yellow(tmp_path):
    for i, ch in enumerate(CHANNELS):
        Image.fromarray(np.full((5, 6), 10 * (i + 1), np.uint8)).save(tmp_path / f"x_{ch}.png")
    assert read_field(tmp_path, "x")[:, 0, 0].tolist() == [10, 20, 30, 40]


def test_tiff_and_colour_jpeg_channels(tmp_path):
    import tifffile

    tifffile.imwrite(tmp_path / "t_red.tif", np.full((8, 8), 1000, np.uint16))
    for ch in ("green", "blue", "yellow"):
        tifffile.imwrite(tmp_path / f"t_{ch}.tif", np.full((8, 8), 7, np.uint16))
    assert read_field(tmp_path, "t")[:, 0, 0].tolist() == [1000, 7, 7, 7]
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 1] = 200  # the HPA website shows the green channel in green
    for ch in CHANNELS:
        Image.fromarray(rgb).save(tmp_path / f"j_{ch}.jpg", quality=100)
    got = read_field(tmp_path, "j")
    assert got.shape == (4, 8, 8) and abs(int(got[1, 4, 4]) - 200) <= 2


def test_mixed_bit_depth_is_scaled_to_16_bit(tmp_path):
    Image.fromarray(np.full((4, 4), 255, np.uint8)).save(tmp_path / "m_red.png")
    for ch in ("green", "blue", "yellow"):
        Image.fromarray(np.full((4, 4), 300, np.uint16)).save(tmp_path / f"m_{ch}.png")
    got = read_field(tmp_path, "m")
    assert got.dtype == np.uint16 and got[0, 0, 0] == 65535 and got[1, 0, 0] == 300


def test_missing_channel_names_file(tmp_path):
    make_field(tmp_path, "a")
    (tmp_path / "a_yellow.png").unlink()
    with pytest.raises(InputError, match=r"a_yellow"):
        read_field(tmp_path, "a")
    with pytest.raises(InputError, match=r"1 of 1 images"):
        check_images_exist(tmp_path, ["a"])


def test_channels_of_different_sizes(tmp_path):
    make_field(tmp_path, "a")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "a_blue.png")
    with pytest.raises(InputError, match=r"differ in size.*a_blue.png 10x10"):
        read_field(tmp_path, "a")


def test_truncated_and_unreadable_files(tmp_path):
    make_field(tmp_path, "a", h=64, w=64)
    data = (tmp_path / "a_green.png").read_bytes()
    (tmp_path / "a_green.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"a_green.png: cannot read image"):
        read_field(tmp_path, "a")
    (tmp_path / "a_green.png").write_text("not an image")
    with pytest.raises(InputError, match=r"a_green.png"):
        read_field(tmp_path, "a")


def write_csv(path, text):
    path.write_text(text)
    return path


def test_read_labels_multi_hot(tmp_path):
    ids, y = read_labels(write_csv(tmp_path / "train.csv", "ID,Label\na,0|16\nb,18\nc,5\n"))
    assert ids == ["a", "b", "c"] and y.shape == (3, NUM_CLASSES) and y.dtype == np.uint8
    assert np.nonzero(y[0])[0].tolist() == [0, 16] and y[1, 18] == 1 and y.sum() == 4


@pytest.mark.parametrize("text, message", [
    ("ID,Label\na,19\n", r"row 2: class 19 outside 0..18"),
    ("ID,Label\na,0\nb,x|1\n", r"row 3: Label 'x\|1' is not"),
    ("ID,Label\na,0\na,1\n", r"row 3: duplicate ID 'a' \(first at row 2\)"),
    ("ID,Label\na,\n", r"row 2: empty Label"),
    ("Id,Labels\na,0\n", r"missing column"),
    ("ID,Label\na,-1\n", r"class -1 outside"),
])
def test_bad_label_rows(tmp_path, text, message):
    path = write_csv(tmp_path / "train.csv", text)
    with pytest.raises(InputError, match=message) as exc:
        read_labels(path)
    assert str(path) in str(exc.value)


def test_list_split_test_ids(tmp_path):
    (tmp_path / "test").mkdir()
    make_field(tmp_path / "test", "t1")
    make_field(tmp_path / "test", "t2")
    ids, labels = list_split(tmp_path, "test")
    assert ids == ["t1", "t2"] and labels is None
    write_csv(tmp_path / "sample_submission.csv", "ID,ImageWidth,ImageHeight,PredictionString\nt2,30,20,\n")
    assert list_split(tmp_path, "test")[0] == ["t2"]
    with pytest.raises(InputError, match="does not exist"):
        list_split(tmp_path / "nope", "train")


def test_resize_and_composite():
    field = np.zeros((4, 40, 60), np.uint16)
    field[2, 10:20, 10:20] = 60000
    small = resize_field(field, (20, 30))
    assert small.shape == (4, 20, 30) and small.dtype == np.uint16 and small[2, 7, 7] == 60000
    assert resize_field(field, 80).shape == (4, 80, 80)
    rgb = rgb_composite(field)
    assert rgb.shape == (40, 60, 3) and rgb.dtype == np.uint8 and rgb[15, 15, 2] == 255 and rgb[15, 15, 0] == 0


def test_mask_roundtrip_keeps_labels_above_255(tmp_path):
    mask = np.zeros((10, 10), np.int32)
    mask[2:5, 2:5] = 300
    mask[6:9, 6:9] = 1
    write_mask(tmp_path / "m.png", mask)
    assert np.array_equal(read_mask(tmp_path / "m.png"), mask)
    with pytest.raises(ValueError, match="0..65535"):
        write_mask(tmp_path / "bad.png", mask + 70000)


@needs(REAL)
def test_real_hpa_fields():
    import pandas as pd

    labels = pd.read_csv(REAL / "labels.csv")
    for image_id in labels["ID"]:
        field = read_field(REAL / "images", image_id)
        assert field.shape[0] == 4 and field.shape[1] in (2048, 3072) and field.shape[1] == field.shape[2]
        assert field.dtype in (np.uint8, np.uint16)
        assert all(field[c].max() > 0 for c in range(4))
        mask = read_mask(REAL / "masks" / f"{image_id}_predictedmask.png")
        assert mask.shape == field.shape[1:] and mask.max() >= 5
