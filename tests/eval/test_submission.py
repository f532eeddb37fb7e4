"""Submission CSV (hpa.eval.submission): write -> read round trip, grouping of masks, errors naming row and ID."""

import numpy as np
import pandas as pd
import pytest

from hpa.eval.rle import encode_mask
from hpa.eval.submission import (
    SubmissionError,
    cell_mask_strings,
    format_predictions,
    prediction_string,
    read_submission,
    write_submission,
    write_submission_rows,
)


def two_cells(h=6, w=9):
    m = np.zeros((h, w), np.int32)
    m[0:3, 0:4] = 4
    m[3:6, 5:9] = 9
    return m


def test_write_read_round_trip(tmp_path):
    m = two_cells()
    conf = np.full((2, 19), np.nan, np.float32)
    conf[0, [0, 5, 18]] = [0.1, 0.30000001, 1e-7]
    conf[1, 3] = 0.7
    conf[1, 4] = -1.0  # negative: not written
    empty = np.zeros((4, 5), np.int32)
    path = write_submission(tmp_path / "sub.csv", {"img_a": (m, [4, 9], conf), "img_b": (empty, None, np.zeros((0, 19)))})
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert list(df.columns) == ["ID", "ImageWidth", "ImageHeight", "PredictionString"]
    assert df["ImageWidth"].tolist() == ["9", "5"] and df["ImageHeight"].tolist() == ["6", "4"]
    assert df["PredictionString"][1] == ""
    sub = read_submission(path)
    assert list(sub) == ["img_a", "img_b"]
    a = sub["img_a"]
    assert (a.width, a.height, a.row) == (9, 6, 2)
    assert a.classes.tolist() == [0, 5, 18, 3]  # cell order, then class order
    # float32 confidences come back exactly (shortest form of the float32 value)
    np.testing.assert_array_equal(a.confidences.astype(np.float32), np.float32([0.1, 0.30000001, 1e-7, 0.7]))
    assert a.confidences[0] == 0.1  # and the text is the short form "0.1", not 0.10000000149...
    assert a.mask_index.tolist() == [0, 0, 0, 1]  # the three triples of cell 4 share one decoded mask
    assert a.n_masks == 2
    np.testing.assert_array_equal(a.mask(0), m == 4)
    np.testing.assert_array_equal(a.mask(1), m == 9)
    assert sub["img_b"].n_predictions == 0 and sub["img_b"].n_masks == 0


def test_cell_ids_default_and_absent_cell():
    m = two_cells()
    conf = np.zeros((2, 19))
    conf[:, 1:] = np.nan
    s = prediction_string(m, None, conf)  # ids default to those in the mask: 4, 9
    tokens = s.split()
    assert tokens[0::3] == ["0", "0"] and tokens[1::3] == ["0.0", "0.0"]
    assert tokens[2::3] == [encode_mask(m == 4), encode_mask(m == 9)]
    s = prediction_string(m, [7], conf[:1])  # id 7 is not in the mask: an empty mask
    assert s.split()[2] == encode_mask(np.zeros(m.shape, bool))
    with pytest.raises(ValueError, match=r"\(K, 19\)"):
        prediction_string(m, [4], np.zeros((1, 18)))
    with pytest.raises(ValueError, match="cell_ids"):
        prediction_string(m, [4, 9, 10], conf)


def test_rows_from_finished_strings_equal_the_writer(tmp_path):
    """Stage 08 stores each cell's mask string and writes the rows later: the same bytes as write_submission."""
    m = two_cells()
    conf = np.full((2, 19), 0.25, np.float32)
    conf[1, 2] = np.nan
    strings = cell_mask_strings(m, np.array([4, 9, 5]))
    assert strings[:2] == [encode_mask(m == 4), encode_mask(m == 9)] and strings[2] == encode_mask(np.zeros((6, 9), bool))
    assert format_predictions(strings[:2], conf) == prediction_string(m, [4, 9], conf)
    a = write_submission(tmp_path / "a.csv", {"x": (m, [4, 9], conf), "y": (np.zeros((3, 4), np.int32), None,
                                                                            np.zeros((0, 19)))})
    b = write_submission_rows(tmp_path / "b.csv", [("x", 9, 6, format_predictions(strings[:2], conf)), ("y", 4, 3, "")])
    assert a.read_bytes() == b.read_bytes()
    with pytest.raises(ValueError, match="1 mask strings for 2 rows"):
        format_predictions(strings[:1], conf)
    with pytest.raises(ValueError, match="given twice"):
        write_submission_rows(tmp_path / "c.csv", [("x", 1, 1, ""), ("x", 1, 1, "")])


def test_atomic_write_leaves_no_file_on_error(tmp_path):
    m = two_cells()

    def rows():
        yield "ok", m, None, np.ones((2, 19))
        yield "bad", m, None, np.ones((2, 5))  # wrong shape, found after the first row was written

    with pytest.raises(ValueError, match="'bad'"):
        write_submission(tmp_path / "sub.csv", rows())
    assert list(tmp_path.iterdir()) == []


def _write_raw(tmp_path, rows):
    p = tmp_path / "raw.csv"
    p.write_text("ID,ImageWidth,ImageHeight,PredictionString\n" + "".join(f"{r}\n" for r in rows))
    return p


@pytest.mark.parametrize(
    "pred, message",
    [
        ("0 0.5", r"row 3 \(ID 'b'\).*not a multiple of 3"),
        ("19 0.5 {rle}", r"row 3 \(ID 'b'\): triple 1: class 19 outside 0..18"),
        ("0 0.5 {rle} -1 0.5 {rle}", r"row 3 \(ID 'b'\): triple 2: class -1 outside"),
        ("x 0.5 {rle}", r"row 3 \(ID 'b'\): triple 1: class 'x' is not an integer"),
        ("0 high {rle}", r"row 3 \(ID 'b'\): triple 1: confidence 'high' is not a number"),
        ("0 nan {rle}", r"row 3 \(ID 'b'\): triple 1: confidence 'nan' is not finite"),
        ("0 0.5 {rle} 1 0.5 %%%%", r"row 3 \(ID 'b'\): triple 2: bad mask: not base64"),
        ("0 0.5 {other}", r"row 3 \(ID 'b'\): triple 1: bad mask: RLE covers 20 pixels but the image is 6 x 9 = 54"),
    ],
)
def test_read_errors_name_row_and_id(tmp_path, pred, message):
    m = two_cells()
    rle = encode_mask(m == 4)
    other = encode_mask(np.zeros((4, 5), bool))
    good = f"a,9,6,0 0.5 {rle}"
    p = _write_raw(tmp_path, [good, "b,9,6," + pred.format(rle=rle, other=other)])
    with pytest.raises(SubmissionError, match=message):
        read_submission(p)


def test_read_errors_file_level(tmp_path):
    rle = encode_mask(two_cells() == 4)
    with pytest.raises(SubmissionError, match=r"row 3 \(ID 'a'\): duplicate ID \(first at row 2\)"):
        read_submission(_write_raw(tmp_path, [f"a,9,6,0 0.5 {rle}", "a,9,6,"]))
    with pytest.raises(SubmissionError, match=r"row 2 \(ID 'a'\).*not integers"):
        read_submission(_write_raw(tmp_path, ["a,nine,6,"]))
    bad = tmp_path / "cols.csv"
    bad.write_text("ID,PredictionString\na,\n")
    with pytest.raises(SubmissionError, match=r"missing column\(s\) \['ImageWidth', 'ImageHeight'\]"):
        read_submission(bad)
    with pytest.raises(SubmissionError, match="not found"):
        read_submission(tmp_path / "nope.csv")


def test_writer_rejects_bad_ids(tmp_path):
    m = two_cells()
    with pytest.raises(ValueError, match="comma"):
        write_submission(tmp_path / "s.csv", {"a,b": (m, None, np.ones((2, 19)))})
    with pytest.raises(ValueError, match="twice"):
        write_submission(tmp_path / "s.csv", [("a", m, None, np.ones((2, 19))), ("a", m, None, np.ones((2, 19)))])
