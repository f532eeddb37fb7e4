#!/usr/bin/env python
"""Stage 02: image probabilities and class activation maps (CAMs) for every image of a split.

Reads RUN/image_model/model.pt (stage 01), the fields (through RUN/cache/{split}_{S}.npy) and,
for outlines, RUN/masks/{split}/ (stage 03). Writes RUN/cams/{split}/{ID}.npz (raw float16 CAMs
at feature resolution: train, the image's labels; test, every class with probability >=
cam.test_prob_floor, 0 = all 19), RUN/cams/{split}/probs.csv (ID, p0..p18; written when the split
is complete, by the last shard), RUN/cams/overlays/{split}/{ID}.png and RUN/cams/overlays/index.html.
Resumable: images with a CAM file are skipped unless --force. Details: docs/cams.md.
    python stages/02_cam.py --run RUN --split test [--method gradcam] [--shard 0/4]
    python stages/02_cam.py --run RUN --overlays-only      # redraw overlays, e.g. after stage 03
"""

import argparse
from pathlib import Path

from hpa.cam.methods import available_methods
from hpa.config import add_common_args, resolve_device, setup_run
from hpa.engine.checkpoint import load_model
from hpa.pipeline.cams import compute_split_cams, draw_split_overlays, file_sha1, write_overlay_index
from hpa.pipeline.cli import run_stage
from hpa.pipeline.image_model import image_model_dir
from hpa.utils.shards import parse_shard
from hpa.utils.timing import stage_timer


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--split", choices=("train", "test"), default=None,
                    help="default: train (with --overlays-only: every split that has CAMs)")
    ap.add_argument("--method", choices=available_methods(), default=None, help="default: config cam.method")
    ap.add_argument("--overlays-only", action="store_true", help="only (re)draw overlays and index.html")
    ap.add_argument("--shard", default=None, help="i/N: every N-th image from the i-th (0-based)")
    ap.add_argument("--workers", type=int, default=None, help="decoding/drawing processes (default: num_workers)")
    ap.add_argument("--force", action="store_true", help="recompute CAMs and overlays that exist")
    args = ap.parse_args(argv)
    run_stage("02_cam", args.run, lambda: run(args))


def run(args):
    overrides = list(args.overrides) + ([f"cam.method={args.method}"] if args.method else [])
    cfg = setup_run(args.run, args.data, args.profile, args.config, overrides)
    c, shard = cfg.cam, parse_shard(args.shard)
    workers = cfg.num_workers if args.workers is None else args.workers
    splits = [args.split] if args.split else (["train", "test"] if args.overlays_only else ["train"])
    for split in splits:
        if args.overlays_only and not (Path(args.run) / "cams" / split).is_dir():
            continue
        stage = f"02_cam_{split}" + (f"_shard{shard[0]}of{shard[1]}" if shard[1] > 1 else "")
        with stage_timer(args.run, stage + ("_overlays" if args.overlays_only else "")):
            if not args.overlays_only:
                device = resolve_device(cfg.device)
                model_path = image_model_dir(args.run) / "model.pt"
                model, meta = load_model(model_path, device)
                stats = compute_split_cams(
                    args.run, cfg.data, split, model, meta, method=c.method, batch_size=c.batch_size,
                    tta_flip=c.tta_flip, prob_floor=c.test_prob_floor, device=device, shard=shard,
                    force=args.force, workers=workers, on_bad_image=cfg.on_bad_image,
                    signature={"model_sha1": file_sha1(model_path)}, amp=cfg.image_model.amp, scale=c.scale)
                print(f"cams {split}: {stats['computed']} computed, {stats['done_before']} done before, "
                      f"{stats['skipped']} skipped" + ("" if stats["complete"] else " (incomplete: other shards)"))
            n = draw_split_overlays(args.run, cfg.data, split, c.overlay_max_images,
                                    c.overlay_size, c.overlay_top_k, shard,
                                    force=args.force or args.overlays_only, workers=workers)
            page = write_overlay_index(args.run, cfg.data)
        print(f"overlays {split}: {n} drawn -> {page}")


if __name__ == "__main__":
    main()
