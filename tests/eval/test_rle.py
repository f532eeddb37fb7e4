"""Mask strings (hpa.eval.rle): the competition's encoding, round trips, batch encoding, errors."""

import base64
import zlib

import numpy as np
import pytest
from pycocotools import mask as mask_util
from shared_data import HPA_REAL, needs

from hpa.eval.rle import RLEError, decode_mask, decode_rles, encode_instances, encode_mask


def reference_encode(mask):
    """The competition's encoder, written out step by step."""
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return base64.b64encode(zlib.compress(rle["counts"], zlib.Z_BEST_COMPRESSION)).decode("ascii")


def test_known_counts_string():
    m = np.zeros((4, 5), bool)
    m[1:3, 1:4] = True
    s = encode_mask(m)
    # Fortran order runs: 5 background, 2 fg, 2 bg, 2 fg, 2 bg, 2 fg, 5 bg -> COCO string:
    # "5", "2", "2", then deltas to the run two before: 0, 0, 0, 5-2=3
    assert zlib.decompress(base64.b64decode(s)) == b"5220003"
    assert s == reference_encode(m)
    assert isinstance(s, str)


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (13, 7), (32, 32), (3, 100)])
def test_round_trip_random(shape):
    rng = np.random.default_rng(sum(shape))
    for density in (0.05, 0.5, 0.95):
        m = rng.random(shape) < density
        s = encode_mask(m)
        assert s == reference_encode(m)
        out = decode_mask(s, *shape)
        assert out.dtype == bool and out.shape == shape
        np.testing.assert_array_equal(out, m)


@pytest.mark.parametrize("shape", [(5, 9), (9, 5), (1, 1)])
def test_round_trip_empty_and_full(shape):
    for m in (np.zeros(shape, bool), np.ones(shape, bool)):
        np.testing.assert_array_equal(decode_mask(encode_mask(m), *shape), m)
    assert zlib.decompress(base64.b64decode(encode_mask(np.ones(shape, bool)))).startswith(b"0")  # 0 background first


def test_accepts_0_1_integers_rejects_labels():
    m = np.zeros((4, 6), np.uint8)
    m[1, 2:5] = 1
    assert encode_mask(m) == encode_mask(m.astype(bool))
    with pytest.raises(ValueError, match="encode_instances"):
        encode_mask(m * 2)
    with pytest.raises(ValueError, match="2-D"):
        encode_mask(np.zeros((2, 3, 4), bool))


def test_encode_instances_matches_per_cell_encoding():
    rng = np.random.default_rng(0)
    blocks = np.kron(rng.integers(0, 6, (4, 5)), np.ones((6, 5), np.int64))  # 24 x 25, cells cross columns
    noise = rng.integers(0, 4, (11, 17)) * 7  # ragged runs, non-consecutive ids
    sparse = np.zeros((9, 14), np.int32)
    sparse[-1, -1] = 3  # last pixel: no trailing background run
    sparse[0, 0] = 5  # first pixel: zero-length first background run
    for lab in (blocks, noise, sparse, np.zeros((4, 4), np.int32)):
        got = encode_instances(lab)
        ids = [int(i) for i in np.unique(lab) if i != 0]
        assert sorted(got) == ids
        for i in ids:
            assert got[i] == encode_mask(lab == i)
            np.testing.assert_array_equal(decode_mask(got[i], *lab.shape), lab == i)


def test_decode_errors():
    m = np.zeros((4, 5), bool)
    m[1:3, 1:4] = True
    good = encode_mask(m)
    b64 = lambda raw: base64.b64encode(raw).decode()  # noqa: E731
    with pytest.raises(ValueError, match="not base64"):
        decode_mask("@@not base64@@", 4, 5)
    with pytest.raises(ValueError, match="not zlib"):
        decode_mask(b64(b"plain bytes"), 4, 5)
    with pytest.raises(ValueError, match="not a COCO RLE string"):
        decode_mask(b64(zlib.compress(b"52\x01")), 4, 5)  # character below '0'
    with pytest.raises(ValueError, match="truncated"):
        decode_mask(b64(zlib.compress(b"5" + bytes([48 + 0x20]))), 4, 5)  # continuation bit on the last char
    with pytest.raises(ValueError, match="negative run"):
        # run 3 = delta + run 1 = -3 + 2: 'M' = 48 + 29 is -3 in 5-bit two's complement
        decode_mask(b64(zlib.compress(b"522M")), 4, 5)
    with pytest.raises(ValueError, match=r"covers 20 pixels but the image is 5 x 5 = 25"):
        decode_mask(good, 5, 5)
    with pytest.raises(ValueError, match=r"covers 20 pixels but the image is 2 x 5 = 10"):
        decode_mask(good, 2, 5)
    with pytest.raises(ValueError, match="positive integers"):
        decode_mask(good, 0, 5)


def test_decode_rles_reports_index_and_gives_coco_objects():
    a = np.zeros((6, 4), bool)
    a[:3] = True
    b = np.zeros((6, 4), bool)
    b[2:, 1:] = True
    rles = decode_rles([encode_mask(a), encode_mask(b)], 6, 4)
    assert mask_util.area(rles).tolist() == [12, 12]
    # IoU straight from the runs: intersection row 2 x cols 1..3 = 3 pixels, union 12 + 12 - 3 = 21
    assert mask_util.iou([rles[0]], [rles[1]], [0])[0, 0] == 3 / 21
    with pytest.raises(RLEError) as exc:
        decode_rles([encode_mask(a), encode_mask(np.zeros((5, 4), bool))], 6, 4)
    assert exc.value.index == 1


REAL_MASK = HPA_REAL / "masks" / "b6a469d8-bbad-11e8-b2ba-ac1f6b6435d0_predictedmask.png"


@needs(REAL_MASK)
def test_real_hpa_mask_instances():
    from hpa.io.fields import read_mask

    lab = read_mask(REAL_MASK)
    got = encode_instances(lab)
    ids = [int(i) for i in np.unique(lab) if i]
    assert sorted(got) == ids and len(ids) == 10
    for i in ids:
        assert got[i] == encode_mask(lab == i)
    np.testing.assert_array_equal(decode_mask(got[ids[0]], *lab.shape), lab == ids[0])
