"""One tree of defaults for the whole pipeline, profiles, and the run's saved config.

Resolution order (later wins): :data:`DEFAULTS` -> profile (:data:`PROFILES`) ->
``--config FILE`` (YAML, same shape) -> ``key=value`` overrides on the command line
(dotted keys, values parsed as YAML: ``image_model.epochs=3``, ``cam.tta_flip=true``).

The resolved tree is written to ``RUN/config.yaml`` by the first stage that runs; later
stages read it, so they need only ``--run RUN``. An unknown key is an error that lists
the valid keys of that section.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

from hpa.utils.fs import write_text

#: Every setting of the pipeline, with a comment each. Sections belong to stages.
DEFAULTS: dict[str, Any] = {
    "seed": 0,  # one seed for splits, augmentation, initialisation and sampling
    "data": None,  # data folder in the Kaggle layout (train.csv, train/, test/, optional gt/)
    "profile": "default",  # the profile this tree was built from (informational)
    "device": "auto",  # auto (cuda when available) | cpu | cuda
    "num_workers": 2,  # DataLoader / process-pool workers for per-image work
    "on_bad_image": "error",  # error: stop before long work | skip: record the image in RUN/skipped.csv and go on
    # ---------------------------------------------------------------- stage 01
    "image_model": {  # defaults = the `default` profile: ~7 min on 2 CPU cores (docs/training.md)
        "arch": "efficientnet-b0",  # backbone by name, see hpa.models.factory.available_models()
        "pretrained": None,  # local path to an ImageNet state dict (3-channel); never downloaded
        "image_size": 128,  # fields are resized to this square size (cached as uint8); validation and CAMs use it
        "train_crop": 64,  # training crops of this side in pixels, cut from the cached fields (null: whole fields)
        "output_stride": 16,  # 16: CAMs twice as fine as the published stride 32 (same weights)
        "epochs": 56,
        "samples_per_epoch": 1000,  # training samples per epoch (null: the training images once); fixes the budget
        "batch_size": 32,
        "lr": 4.0e-3,  # peak learning rate of AdamW (after warm-up)
        "weight_decay": 1.0e-2,
        "warmup_epochs": 1.0,  # linear warm-up length (epochs), then cosine decay to 1% of lr
        "loss": "bce",  # bce | focal
        "focal_gamma": 2.0,
        "amp": "auto",  # auto: bf16 on CUDA, off on CPU (bf16 measured slower on CPU) | bf16 | off
        "channels_last": True,
        "accumulate": 1,  # gradient accumulation steps
        "folds": 5,  # multi-label stratified folds written to RUN/splits.csv
        "val_fold": 0,  # the fold held out for validation
        "val_every": 5,  # validate every this many epochs (and after the last)
        "aug_crop_scale": [0.2, 0.3],  # random resized crop: area range as a fraction of the field ([1, 1]: none)
        "aug_intensity": 0.2,  # per-channel brightness/contrast/gamma jitter strength (0 disables)
        "dropout": 0.0,  # head dropout (0: none; regularisation slowed the short training from scratch)
        "bn_momentum": 0.1,  # BatchNorm running-stats momentum (None: the arch's own, 0.01 for EfficientNet)
        "input_norm": "per_image",  # none | per_image: each field/crop standardised per channel inside the model
        "zero_init_residual": True,  # residual blocks start as the identity (faster from scratch; ignored with pretrained)
        "balance_power": 0.0,  # class-balanced sampling: image weight max_c count_c^-power (0: uniform)
        "grad_clip": None,  # clip the gradient norm to this value (None: off)
        "drop_connect": 0.0,  # EfficientNet stochastic depth rate (0: off, better in a short training from scratch; null: the arch's own, 0.2)
        "loader_workers": 0,  # DataLoader workers (null: num_workers); cache rows are cheap: 0 is fastest on 2 CPU cores
    },
    # ---------------------------------------------------------------- stage 02
    "cam": {
        "method": "cam",  # cam (exact, one pass for all classes) | gradcam | gradcam++ | xgradcam | ... (hpa.cam.methods.METHODS)
        "batch_size": 16,  # images per forward pass
        "tta_flip": False,  # average CAMs (and logits) over the field, its horizontal and its vertical flip
        "test_prob_floor": 0.0,  # test split: store CAMs of classes with probability >= floor (0: all 19); train: labels
        "overlay_max_images": 200,  # overlays drawn for at most this many images per split (the first ones)
        "overlay_size": 512,  # longest side of overlay panels in pixels
        "overlay_top_k": 3,  # test overlays: panels for this many most probable classes
    },
    # ---------------------------------------------------------------- stage 03
    "segment": {
        "segmenter": "classical",  # classical | hpacellseg
        "nuclei_model": None,  # hpacellseg: local path of the nuclei model weights
        "cell_model": None,  # hpacellseg: local path of the cell model weights
        "scale_factor": 0.25,  # hpacellseg: working scale of the networks (of a reference_size field)
        "multi_channel_model": True,  # hpacellseg: 3-channel cell model (red, yellow, blue); False: 2-channel
        "padding": False,  # hpacellseg: reflect-pad network inputs (switched on by itself when sizes need it)
        "labeler": "relative",  # hpacellseg labelling step: relative (ours, sizes scale) | hpacellseg (its label_cell)
        "reference_size": 2048,  # hpacellseg: smaller fields are enlarged to this side before the networks
        "work_size": 512,  # classical: fields are segmented at about this longest side, labels upsampled
        "min_nucleus": 0.10,  # classical: nuclei (or in-frame parts) below this x median nucleus area dropped
        "min_cell": 0.35,  # classical: cells below this x median nucleus area dropped
        "cell_threshold_scale": 0.7,  # classical: x automatic cell-foreground threshold (lower: larger cells)
        "green_weight": 0.0,  # classical: weight of the protein channel in the cytoplasm signal
    },
    # ---------------------------------------------------------------- stage 04
    "pseudo": {
        "score": "topk_mean",  # mean | topk_mean: aggregate of the normalised CAM inside a cell
        "topk_frac": 0.25,  # top-k mean over this fraction of the cell's pixels
        "work_size": 512,  # CAM scores are computed on cell masks reduced to this longest side
        "times_image_prob": True,  # multiply cell CAM scores by the image-level probability
        "cell_view": True,  # cell tables get the image model's isolated-cell probabilities (hpa/cell_view.py)
        "view_weight": 0.75,  # evidence = (1-v) x CAM score x image prob + v x isolated-cell prob (0: CAM only)
        "pos_quantile": 0.3,  # per-class positive threshold: this quantile of best-class scores of labelled cells
        "pos_min": 0.3,  # ... but never below this
        "neg_threshold": 0.1,  # a cell whose best score is below this becomes Negative (18)
        "cycle2_weight": 0.7,  # cycle 2: evidence = (1-w) * cycle-1 evidence + w * cycle-1 cell-model evidence
        "multi_label": True,  # positive cells also take the other image classes they pass (soft, uniform targets)
        "cycle2_pos_quantile": 0.3,  # cycle 2's pos_quantile (0: label every cell that passes pos_min; docs/pseudo_labels.md)
        "cycle2_evidence": "membership",  # membership: (1 - P_neg) x P_c / max P | softmax: P as it is (hpa.pseudo)
        "cycle2_secondary_rel": 0.0,  # cycle 2: a positive cell also takes each image class whose evidence is >= this x its label's (0: off)
        "cycle2_fill_weight": 1.0,  # cycle 2: cells the rule leaves out are filled from the cell model at this sampling weight (0: left out)
        "cycle2_fill_targets": "soft",  # filled cells learn: soft (the cell model's probabilities over the image's classes and Negative) | hard (its best allowed class)
    },
    # ---------------------------------------------------------------- stage 05
    "cell_model": {
        "cycle2_init": "image",  # cycle 2 starts from: image (the image model, as cycle 1) | cycle1 (the cycle-1 cell model, trained on)
        "crop_size": 64,  # cell crops (cut from the full-res field) are resized to this square size
        "margin": 0.1,  # crop window: bbox grown by this fraction of its longest side on each side, made square
        "outside": "dim",  # zero | dim | keep: what happens to crop pixels outside the cell mask
        "dim_factor": 0.25,  # outside=dim: multiplier of those pixels
        "output_stride": 32,  # 16 | 32 | null (the image model's); same weights, 32 is cheaper on small crops
        "epochs": 6,
        "batch_size": 64,
        "lr": 1.0e-3,  # peak AdamW learning rate (backbone from the image model, new head)
        "weight_decay": 1.0e-2,
        "warmup_epochs": 0.5,
        "label_smoothing": 0.1,  # softmax cross-entropy label smoothing
        "balance_power": 0.5,  # class-balanced sampling: cell weight count_c^-power x label weight (0: off, 1: equal)
        "samples_per_epoch": 2500,  # cells drawn per epoch (None: all training cells); fixed: one budget for cycles and oracle
        "aug_intensity": 0.1,  # flips and 90-degree turns always; per-channel intensity jitter strength
        "dropout": None,  # head dropout (None: the image model's)
        "bn_momentum": 0.1,  # BatchNorm running-stats momentum (None: the arch's own)
        "drop_connect": 0.2,  # EfficientNet stochastic depth rate (0: off; null: the arch's own, 0.2)
        "tta_flip": False,  # predict: average the softmax over the crop and its horizontal flip
        "predict_batch_size": 256,
        "loader_workers": 0,  # DataLoader workers (crops are small memmap rows: 0 is fastest on CPU)
        "amp": "auto",  # auto: bf16 on CUDA, off on CPU | bf16 | off
        "channels_last": True,
        "accumulate": 1,  # gradient accumulation steps
        "grad_clip": None,  # clip the gradient norm to this value (None: off)
    },
    # ---------------------------------------------------------------- stage 06
    "predict": {
        "combine": "cell",  # cell | product | mean | image: how cell and image probabilities combine (docs/cell_model.md)
        "negative": "max",  # max | min_complement | cell: how the Negative confidence is formed
        "small_cell_penalty": True,  # lower confidence for small cells and cells cut by the border
        "cycle": "last",  # which cycle's cell model predicts (last | 1 | 2)
    },
    # ---------------------------------------------------------------- stage 07
    "evaluate": {
        "bootstrap": 200,  # resamples of the test images for confidence intervals and paired step gains (0: none)
    },
}

#: Profile overrides, applied on top of DEFAULTS.
PROFILES: dict[str, dict[str, Any]] = {
    "quick": {  # tiny: the whole chain in a couple of minutes on 2 CPU cores (tests use it)
        "num_workers": 0,
        "image_model": {"image_size": 128, "epochs": 2, "samples_per_epoch": None, "batch_size": 8, "folds": 3,
                        "val_every": 1},
        "cam": {"overlay_max_images": 4},
        "evaluate": {"bootstrap": 20},
        "pseudo": {"pos_min": 0.0},  # untrained models give weak evidence: keep some labels for the smoke test
        "segment": {"work_size": 256},
        "cell_model": {"crop_size": 32, "epochs": 1, "batch_size": 32, "samples_per_epoch": None},
    },
    "default": {},  # bash run_all.sh on a fresh machine: synthetic data, ~20 min on 2 CPU cores
    "full": {  # real HPA scale on a GPU
        "num_workers": 8,
        # long runs on thousands of fields: EfficientNet's own regularisation (dropout, stochastic depth)
        "image_model": {"arch": "efficientnet-b3", "image_size": 768, "loader_workers": 8, "dropout": 0.2,
                        "drop_connect": 0.2, "train_crop": None, "aug_crop_scale": [0.6, 1.0],
                        "epochs": 20, "samples_per_epoch": None, "batch_size": 16, "lr": 5e-4, "val_every": 1},
        "cam": {"batch_size": 8},
        "segment": {"work_size": 1024},
        "cell_model": {"crop_size": 256, "epochs": 10, "batch_size": 64, "lr": 5e-4, "samples_per_epoch": None,
                       "loader_workers": 4, "tta_flip": True},
        "predict": {"combine": "product"},  # what the top HPA teams found best with their strong image models
    },
}


class ConfigError(ValueError):
    """An invalid setting: the message names the key and the valid choices."""


def merge(base: dict, override: dict, path: str = "") -> dict:
    """Return ``base`` updated by ``override`` recursively; unknown keys are errors."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        dotted = f"{path}{key}"
        if key not in out:
            raise ConfigError(f"unknown setting {dotted!r}; valid keys{' of ' + path.rstrip('.') if path else ''}: {sorted(out)}")
        if isinstance(out[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"setting {dotted!r} is a section; give {dotted}.KEY=VALUE")
            out[key] = merge(out[key], value, dotted + ".")
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_overrides(items: list[str]) -> dict:
    """``["a.b=3", "c=x"]`` -> ``{"a": {"b": 3}, "c": "x"}`` (values parsed as YAML)."""
    tree: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (for example image_model.epochs=3)")
        key, value = item.split("=", 1)
        node = tree
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value) if value != "" else None
    return tree


def build_config(profile: str = "default", config_file: str | os.PathLike | None = None, overrides: list[str] | None = None) -> dict:
    """Resolve DEFAULTS + profile + YAML file + ``key=value`` overrides into one tree."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; valid profiles: {sorted(PROFILES)}")
    cfg = merge(DEFAULTS, PROFILES[profile])
    cfg["profile"] = profile
    if config_file:
        cfg = merge(cfg, load_yaml(config_file))
    return merge(cfg, parse_overrides(overrides or []))


def load_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return data


def config_path(run: str | os.PathLike) -> Path:
    return Path(run) / "config.yaml"


def save_config(run: str | os.PathLike, cfg: dict) -> Path:
    """Write the resolved tree to ``RUN/config.yaml`` atomically."""
    return write_text(config_path(run), yaml.safe_dump(cfg, sort_keys=False))


def load_run_config(run: str | os.PathLike) -> dict:
    """Read ``RUN/config.yaml`` (written by the first stage of the run), completed by DEFAULTS."""
    path = config_path(run)
    if not path.is_file():
        raise ConfigError(f"{path} not found: run stage 01 (or pass --data) first to create the run")
    return merge(DEFAULTS, load_yaml(path))


def setup_run(run: str | os.PathLike, data: str | os.PathLike | None = None, profile: str | None = None,
              config_file: str | os.PathLike | None = None, overrides: list[str] | None = None) -> dict:
    """The config every stage script starts from.

    A new run (no ``RUN/config.yaml``) is built from the profile (``default`` if not
    given), the file and the overrides, with ``data`` recorded. An existing run keeps
    its saved tree; ``data``, a YAML file and overrides given now are applied on top and
    saved, so the file always says what the run used. Giving a different ``--profile``
    to an existing run is an error (start a new run directory instead).
    """
    run = Path(run)
    if config_path(run).is_file():
        cfg = load_run_config(run)
        if profile and profile != cfg.get("profile"):
            raise ConfigError(f"{config_path(run)} was made with profile {cfg.get('profile')!r}, not {profile!r}; use a new --run folder")
        new = cfg
        if config_file:
            new = merge(new, load_yaml(config_file))
        new = merge(new, parse_overrides(overrides or []))
    else:
        new = build_config(profile or "default", config_file, overrides)
    if data is not None:
        new["data"] = str(Path(data).resolve())
    if new.get("data") is None:
        raise ConfigError(f"no data folder: pass --data DIR (run {run} has none recorded)")
    if not config_path(run).is_file() or new != load_run_config(run):
        save_config(run, new)
    return new


def add_common_args(parser, data_required: bool = False) -> None:
    """Arguments every stage script shares: --run, --data, --profile, --config, overrides."""
    parser.add_argument("--run", required=True, help="run directory: every stage reads and writes inside it")
    parser.add_argument("--data", required=data_required,
                        help="data folder in the Kaggle layout (train.csv, train/, test/, optional gt/); "
                             "recorded in RUN/config.yaml by the first stage")
    parser.add_argument("--profile", choices=sorted(PROFILES), default=None,
                        help="settings profile for a new run: quick (tests), default (run_all.sh), full (GPU, real HPA)")
    parser.add_argument("--config", default=None, help="YAML file overriding settings (same shape as RUN/config.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="setting overrides with dotted keys, e.g. image_model.epochs=3 cam.tta_flip=true")


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when available else ``cpu``; ``cuda`` without a GPU is an error."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available; use device=cpu or auto")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ConfigError(f"unknown device {name!r}; valid: auto, cpu, cuda, cuda:N")
    return name
