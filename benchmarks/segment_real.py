"""Segmentation quality on real HPA fields against HPA-Cell-Segmentation's masks.

Also on a synthetic set with ``--synthetic`` (``python -m hpa.synth`` output: its test
split against ``gt/``). Reads ``DATA/images/{ID}_{red,green,blue,yellow}.png`` and the reference cell masks
``DATA/masks/{ID}_predictedmask.png`` (default DATA: ../shared/data/hpa_real beside
the repository), segments each field, matches cells one-to-one at IoU >= 0.6
(:func:`hpa.eval.matching.match_cells`) and prints, per field and pooled, the share of
reference cells matched (recall) and of predicted cells unmatched.

    python benchmarks/segment_real.py [--data DIR] [--segmenter classical] [--overlays /tmp/seg]
        [key=value ...]   # segmenter settings, e.g. work_size=768 split_h=0.3

With ``--overlays DIR`` it writes side-by-side PNGs (field | ours in white over
reference in yellow) to look at.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from hpa.eval.matching import match_cells
from hpa.io.fields import read_field, read_mask
from hpa.io.layout import list_split
from hpa.segment import get_segmenter

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hpa_real"


def reference_pairs(data: Path, synthetic: bool = False) -> list[tuple[str, Path, Path]]:
    """``(ID, image folder, reference cell mask)`` of every field to evaluate.

    Real layout: ``data/images`` + ``data/masks/{ID}_predictedmask.png``. Synthetic
    (``python -m hpa.synth`` output): ``data/test`` + ``data/gt/{ID}_cellmask.png``.
    """
    if synthetic:
        ids, _ = list_split(data, "test")
        return [(i, data / "test", data / "gt" / f"{i}_cellmask.png") for i in ids]
    return [(p.name[: -len("_predictedmask.png")], data / "images", p)
            for p in sorted((data / "masks").glob("*_predictedmask.png"))]


def evaluate(pairs: list[tuple[str, Path, Path]], segmenter, overlays: Path | None = None,
             overlay_size: int = 1024) -> list[dict]:
    """Segment every field of ``pairs`` and match it to its reference; one dict per field."""
    rows = []
    for image_id, folder, mask_path in pairs:
        field = read_field(folder, image_id)
        ref = read_mask(mask_path)
        t0 = time.perf_counter()
        cells, nuclei = segmenter.segment(field)
        sec = time.perf_counter() - t0
        m = match_cells(cells, ref, 0.6)
        rows.append(dict(id=image_id, size=field.shape[1], n_ref=m.n_true, n_pred=m.n_pred, matched=m.n_matched,
                         recall=m.recall, unmatched_pred=m.unmatched_pred_frac, seconds=sec))
        if overlays is not None:
            draw_overlay(overlays / f"seg_{image_id}.png", field, cells, ref, nuclei, m, overlay_size)
    return rows


def draw_overlay(path: Path, field, cells, ref, nuclei, match, size: int) -> None:
    """Field composite | our outlines (white), nuclei (cyan), reference (yellow).

    Reference cells left unmatched are tinted red, our unmatched cells magenta.
    """
    import cv2
    from skimage.segmentation import find_boundaries

    from hpa.io.fields import resize_field, rgb_composite, write_png

    H, W = cells.shape
    s = size / max(H, W)
    h, w = round(H * s), round(W * s)
    rgb = rgb_composite(resize_field(field, (h, w)))

    def small(m):
        return cv2.resize(m.astype(np.int32), (w, h), interpolation=cv2.INTER_NEAREST)

    out = rgb.astype(np.float32)
    sref, scell = small(ref), small(cells)
    miss_ref = np.setdiff1d(np.unique(sref[sref > 0]), [t for _, t, _ in match.pairs])
    miss_pred = np.setdiff1d(np.unique(scell[scell > 0]), [p for p, _, _ in match.pairs])
    for sel, colour in ((np.isin(sref, miss_ref), (255, 0, 0)), (np.isin(scell, miss_pred), (255, 0, 255))):
        out[sel] = 0.6 * out[sel] + 0.4 * np.array(colour, np.float32)
    out = out.astype(np.uint8)
    out[find_boundaries(sref)] = (255, 255, 0)
    out[find_boundaries(small(nuclei))] = (0, 255, 255)
    out[find_boundaries(scell)] = (255, 255, 255)
    write_png(path, np.concatenate([rgb, out], axis=1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--synthetic", action="store_true", help="DATA is a python -m hpa.synth folder: use its test split and gt/")
    ap.add_argument("--segmenter", default="classical")
    ap.add_argument("--overlays", type=Path, default=None, help="folder for side-by-side overlay PNGs")
    ap.add_argument("settings", nargs="*", metavar="key=value")
    args = ap.parse_args(argv)
    pairs = reference_pairs(args.data, args.synthetic)
    if not pairs:
        print(f"no reference masks found under {args.data}: nothing to evaluate", file=sys.stderr)
        return 1
    kw = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.settings)}
    seg = get_segmenter(args.segmenter, **kw)
    rows = evaluate(pairs, seg, args.overlays, 1024 if not args.synthetic else 512)
    print(f"{'field':10} {'px':>5} {'ref':>4} {'pred':>4} {'match':>5} {'recall':>6} {'unmatched_pred':>14} {'s':>5}")
    for r in rows if len(rows) <= 20 else []:
        print(f"{r['id'][:8]:10} {r['size']:5d} {r['n_ref']:4d} {r['n_pred']:4d} {r['matched']:5d} "
              f"{r['recall']:6.3f} {r['unmatched_pred']:14.3f} {r['seconds']:5.2f}")
    n_ref = sum(r["n_ref"] for r in rows)
    n_pred = sum(r["n_pred"] for r in rows)
    n_m = sum(r["matched"] for r in rows)
    print(f"{'pooled':10} {'':5} {n_ref:4d} {n_pred:4d} {n_m:5d} {n_m / max(n_ref, 1):6.3f} "
          f"{1 - n_m / max(n_pred, 1):14.3f}")
    print(f"mean over fields: recall {np.mean([r['recall'] for r in rows]):.3f}, "
          f"unmatched_pred {np.mean([r['unmatched_pred'] for r in rows]):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
