#!/usr/bin/env python
"""Stage 01: train the image-level multi-label classifier (4-channel EfficientNet by default).

Reads DATA/train.csv and DATA/train/{ID}_{red,green,blue,yellow}.* (and RUN/masks/train/cells.csv
when stage 03 ran first, for the cells' size); writes RUN/config.yaml, RUN/splits.csv (ID,fold),
RUN/image_model/scale.json (the cache side S from the cells' size: image_model.cell_px),
RUN/cache/train_{S}.npy (fields resized to S px, uint8, reused by later stages), and RUN/image_model/:
model.pt (weights + arch, classes, mean/std, input size), last.pt (resumable checkpoint), metrics.csv,
val_predictions.csv, thresholds.json, curves.png.

Re-running the same command resumes an interrupted training at the next epoch; a finished
one is skipped unless --force. Multi-GPU / multi-process (the "--" keeps torchrun from
reading --run as its own --run-path):
  torchrun --standalone --nproc_per_node N stages/01_train_image.py -- --data DIR --run RUN --profile full
Settings (image_model.*: arch, image_size, epochs, batch_size, lr, ...) are listed with their
meaning in hpa/config.py; override any of them as key=value, e.g. image_model.epochs=3.
"""

import argparse
from contextlib import nullcontext

from hpa.config import add_common_args, resolve_device, setup_run
from hpa.engine.distributed import init_distributed, is_main_process
from hpa.pipeline.cli import run_stage
from hpa.pipeline.image_model import image_model_dir, train_image_model
from hpa.utils.timing import stage_timer


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, data_required=False)
    ap.add_argument("--force", action="store_true", help="retrain from scratch even if RUN/image_model/ has a model")
    ap.add_argument("--no-progress", action="store_true", help="no per-epoch progress bar (log lines only)")
    args = ap.parse_args(argv)
    run_stage("01_train_image", args.run, lambda: run(args))


def run(args):
    # every rank resolves the same settings (config.yaml is written atomically with identical content)
    cfg = setup_run(args.run, args.data, args.profile, args.config, args.overrides)
    device = resolve_device(cfg.device)
    init_distributed(device)
    with stage_timer(args.run, "01_train_image") if is_main_process() else nullcontext():
        history = train_image_model(args.run, cfg.data, cfg.image_model, seed=cfg.seed, device=device,
                                    num_workers=cfg.num_workers, on_bad_image=cfg.on_bad_image,
                                    force=args.force, progress=not args.no_progress,
                                    cell_diameter=cfg.cell_diameter, classical=cfg.segment.classical)
    if is_main_process() and history:
        last = history[-1]
        print(f"image model: {len(history)} epochs, val mAP {last.get('mAP', float('nan')):.4f}, "
              f"macro F1 {last.get('f1', float('nan')):.4f} -> {image_model_dir(args.run) / 'model.pt'}")


if __name__ == "__main__":
    main()
