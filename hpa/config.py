"""Settings: one typed tree of defaults for the whole pipeline, profiles, and the run's saved config.

The tree is :class:`Settings`, one dataclass per section (``image_model``, ``cam``, ``segment``,
``pseudo``, ``cell_model``, ``predict``, ``evaluate``); every key has its type, default, meaning
and, where it has them, its valid choices and range, here and nowhere else.

Resolution order (later wins): the defaults -> profile (:data:`PROFILES`) -> ``--config FILE``
(YAML, same shape) -> ``key=value`` overrides on the command line (dotted keys, values parsed as
YAML: ``image_model.epochs=3``, ``cam.tta_flip=true``). Every merge is checked: an unknown key is
an error listing the valid keys of its section; a value of the wrong type, outside its choices or
its range is an error naming the key, what was given and what is allowed. Keys renamed since
earlier versions (:data:`RENAMED`) are translated with a warning, so old ``RUN/config.yaml`` files
and commands still load.

The resolved tree is written to ``RUN/config.yaml`` by the first stage that runs; later stages
read it, so they need only ``--run RUN``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import yaml

from hpa.utils.fs import write_text

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """An invalid setting: the message names the key and the valid choices."""


def setting(default: Any, help: str, *, choices: tuple | Callable[[], list] | None = None,
            ge: float | None = None, le: float | None = None, gt: float | None = None, length: int | None = None):
    """A dataclass field with its meaning and checks (``choices``: a tuple, or a function giving one)."""
    meta = {"help": help, "choices": choices, "ge": ge, "le": le, "gt": gt, "length": length}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: copy.deepcopy(d), metadata=meta)
    return field(default=default, metadata=meta)


def _models() -> list[str]:
    from hpa.models.factory import available_models

    return available_models()


def _cam_methods() -> list[str]:
    from hpa.cam.methods import available_methods

    return available_methods()


class Section:
    """Base of every settings section: built and checked from a mapping, turned back into one."""

    @classmethod
    def from_dict(cls, data: dict | None, path: str = ""):
        data = dict(data or {})
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            where = f" of {path.rstrip('.')}" if path else ""
            raise ConfigError(f"unknown setting {path + unknown[0]!r}; valid keys{where}: {names}")
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                continue
            hint, key = hints[f.name], f"{path}{f.name}"
            if isinstance(hint, type) and issubclass(hint, Section):
                if not isinstance(data[f.name], dict):
                    raise ConfigError(f"setting {key!r} is a section; give {key}.KEY=VALUE")
                kw[f.name] = hint.from_dict(data[f.name], key + ".")
            else:
                kw[f.name] = _checked(data[f.name], hint, key, f.metadata)
        return cls(**kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def merged(self, override: dict | None, path: str = ""):
        """A new tree: this one updated by ``override`` (nested mapping), checked."""
        return type(self).from_dict(_merge_dicts(self.to_dict(), override or {}, path), path)


def _merge_dicts(base: dict, override: dict, path: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if key in out and isinstance(out[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"setting {path}{key!r} is a section; give {path}{key}.KEY=VALUE")
            out[key] = _merge_dicts(out[key], value, f"{path}{key}.")
        else:
            out[key] = copy.deepcopy(value)  # unknown keys are reported by Section.from_dict
    return out


#: A number in exponent notation without a dot (``1e-3``), which YAML 1.1 leaves a string.
_SCIENTIFIC = re.compile(r"[+-]?\d+(\.\d*)?[eE][+-]?\d+")


def _checked(value: Any, hint: Any, key: str, meta: dict) -> Any:
    """``value`` converted to the type ``hint`` (int -> float where a float is due), or ConfigError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        if len(members) > 1:  # e.g. int | str: the first member type that takes the value
            for m in members:
                try:
                    return _checked(value, m, key, meta)
                except ConfigError:
                    continue
            raise ConfigError(f"setting {key!r}: unknown value {value!r}; valid: "
                              f"{', '.join(map(str, meta.get('choices') or [m.__name__ for m in members]))}")
        hint = members[0]
        origin, args = typing.get_origin(hint), typing.get_args(hint)

    def bad(expected: str):
        return ConfigError(f"setting {key!r} must be {expected}, got {value!r}")

    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad(f"a list of {args[0].__name__}")
        if meta.get("length") is not None and len(value) != meta["length"]:
            raise bad(f"a list of {meta['length']} values")
        return [_checked(v, args[0], key, {k: v for k, v in meta.items() if k != "length"}) for v in value]
    if hint is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
    elif hint is float:
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            value = float(value)  # PyYAML (YAML 1.1) reads 1e-3 and 5E-4, without a dot, as strings
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        value = float(value)
    elif hint is str:
        if not isinstance(value, str):
            raise bad("a string" + (" or null" if value is None else ""))
    choices = meta.get("choices")
    if choices is not None:
        valid = list(choices() if callable(choices) else choices)
        if value not in valid:
            raise ConfigError(f"setting {key!r}: unknown value {value!r}; valid: {', '.join(map(str, valid))}")
    for op, test, word in (("ge", lambda a, b: a >= b, ">="), ("le", lambda a, b: a <= b, "<="),
                           ("gt", lambda a, b: a > b, ">")):
        bound = meta.get(op)
        if bound is not None and not test(value, bound):
            raise ConfigError(f"setting {key!r} must be {word} {bound}, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------- stage 01
@dataclass
class ImageModelSettings(Section):
    """Stage 01, the image-level multi-label classifier. Defaults = the ``default`` profile (~8 min on 2 CPU cores)."""

    arch: str = setting("efficientnet-b0", "backbone by name (hpa.models.factory.available_models())", choices=_models)
    pretrained: Optional[str] = setting(None, "imagenet (the weights packaged for efficientnet-lite0/1/2) or a local path to an ImageNet "
                                          "state dict (3-channel); never downloaded")
    image_size: int = setting(128, "side of the square field cache (uint8; validation, CAMs and the cell view use it) "
                                   "for fields whose median cell spans cell_px / image_size of the field side; with "
                                   "cell_px null, every field is resized to it (docs/training.md, scaling from cells)",
                              ge=32)
    cell_px: Optional[float] = setting(28.0, "target cell diameter in network pixels (equivalent-area diameter of the "
                                             "median cell): the cache side is field side x cell_px / cell diameter "
                                             "(cell_diameter, or measured), to a multiple of 32 within "
                                             "image_size_range; train_crop scales with it. null: image_size for "
                                             "every data set", ge=4)
    image_size_range: list[int] = setting([64, 1024], "[min, max] of the cache side resolved from the cells (the max "
                                                      "also bounds the cache's disk use)", length=2, ge=32)
    train_crop: Optional[int] = setting(64, "training crops of this side in pixels of an image_size cache, cut from the "
                                            "cached fields; scaled by cache side / image_size, so a crop keeps its "
                                            "fraction of the field (null: whole fields)", ge=16)
    output_stride: int = setting(16, "16: CAMs twice as fine as the published stride 32 (same weights)",
                                 choices=(8, 16, 32))
    epochs: int = setting(56, "training epochs", ge=1)
    samples_per_epoch: Optional[int] = setting(1000, "training samples per epoch (null: the training images once); "
                                                     "fixes the budget", ge=1)
    batch_size: int = setting(32, "images per step per process", ge=1)
    lr: float = setting(4.0e-3, "peak learning rate of AdamW (after warm-up)", gt=0)
    weight_decay: float = setting(1.0e-2, "AdamW weight decay (not on biases and norm layers)", ge=0)
    warmup_epochs: float = setting(1.0, "linear warm-up length (epochs), then cosine decay to 1% of lr", ge=0)
    loss: str = setting("bce", "multi-label loss", choices=("bce", "focal"))
    focal_gamma: float = setting(2.0, "focusing parameter of the focal loss", ge=0)
    amp: str = setting("auto", "mixed precision: auto (bf16 on CUDA with bf16, fp16 on older GPUs, off on CPU) | "
                               "bf16 | fp16 | off", choices=("auto", "bf16", "fp16", "off"))
    channels_last: bool = setting(True, "channels-last memory format")
    accumulate: int = setting(1, "gradient accumulation steps", ge=1)
    folds: int = setting(5, "multi-label stratified folds written to RUN/splits.csv", ge=2)
    val_fold: int = setting(0, "the fold held out for validation", ge=0)
    val_every: int = setting(5, "validate every this many epochs (and after the last)", ge=1)
    aug_crop_scale: list[float] = setting([0.2, 0.3], "random resized crop: area range as a fraction of the field "
                                                      "([1, 1]: none)", length=2, gt=0, le=1)
    aug_intensity: float = setting(0.2, "per-channel brightness/contrast/gamma jitter strength (0 disables)", ge=0)
    dropout: float = setting(0.0, "head dropout (0: none; regularisation slowed the short training from scratch)",
                             ge=0, le=1)
    bn_momentum: Optional[float] = setting(0.1, "BatchNorm running-stats momentum (null: the arch's own, 0.01 for "
                                                "EfficientNet)", gt=0, le=1)
    input_norm: str = setting("per_image", "none | per_image: each field/crop standardised per channel inside the "
                                           "model", choices=("none", "per_image"))
    zero_init_residual: bool = setting(True, "residual blocks start as the identity (faster from scratch; ignored "
                                             "with pretrained)")
    balance_power: float = setting(0.0, "class-balanced sampling: image weight max_c count_c^-power (0: uniform)",
                                   ge=0)
    grad_clip: Optional[float] = setting(None, "clip the gradient norm to this value (null: off)", gt=0)
    drop_connect: Optional[float] = setting(0.0, "EfficientNet stochastic depth rate (0: off, better in a short "
                                                 "training from scratch; null: the arch's own, 0.2)", ge=0, le=1)
    loader_workers: Optional[int] = setting(0, "DataLoader workers (null: num_workers); cache rows are cheap: 0 is "
                                               "fastest on 2 CPU cores", ge=0)


# ---------------------------------------------------------------------------------------- stage 02
@dataclass
class CamSettings(Section):
    """Stage 02, class activation maps and their overlays."""

    method: str = setting("cam", "cam (exact, one pass for all classes) | gradcam | gradcam++ | xgradcam | ... "
                                 "(hpa.cam.methods.METHODS)", choices=_cam_methods)
    batch_size: int = setting(16, "images per forward pass", ge=1)
    tta_flip: bool = setting(False, "average CAMs (and logits) over the field, its horizontal and its vertical flip")
    scale: float = setting(1.0, "maps from the cached field enlarged this many times (bilinear; probabilities stay "
                                "at the cached size): cells span more feature pixels; 2 costs about 3x (docs/cams.md)",
                           ge=1, le=4)
    test_prob_floor: float = setting(0.0, "test split: store CAMs of classes with probability >= floor (0: all 19); "
                                          "train: labels", ge=0, le=1)
    overlay_max_images: int = setting(200, "overlays drawn for at most this many images per split (the first ones)",
                                      ge=0)
    overlay_size: int = setting(512, "longest side of overlay panels in pixels", ge=64)
    overlay_top_k: int = setting(3, "test overlays: panels for this many most probable classes", ge=1)


# ---------------------------------------------------------------------------------------- stage 03
@dataclass
class ClassicalSegmenterSettings(Section):
    """The built-in segmenter (hpa.segment.classical): runs on any CPU."""

    work_size: int = setting(512, "fields are segmented at about this longest side, labels upsampled", ge=64)
    min_nucleus: float = setting(0.10, "nuclei (or in-frame parts) below this x median nucleus area dropped", ge=0)
    min_cell: float = setting(0.35, "cells below this x median nucleus area dropped", ge=0)
    cell_threshold_scale: float = setting(0.7, "x automatic cell-foreground threshold (lower: larger cells)", gt=0)
    green_weight: float = setting(0.0, "weight of the protein channel in the cytoplasm signal", ge=0)


@dataclass
class HpaCellSegSettings(Section):
    """HPA-Cell-Segmentation (hpa.segment.hpacellseg_adapter): the reference tool, when installed."""

    nuclei_weights: Optional[str] = setting(None, "local path of the nuclei model weights (dpn_unet_nuclei_v1.pth)")
    cell_weights: Optional[str] = setting(None, "local path of the cell model weights (dpn_unet_cell_3ch_v1.pth)")
    scale_factor: float = setting(0.25, "working scale of the networks (of a reference_size field)", gt=0, le=1)
    multi_channel_model: bool = setting(True, "3-channel cell model (red, yellow, blue); false: 2-channel")
    padding: bool = setting(False, "reflect-pad network inputs (switched on by itself when sizes need it)")
    labeler: str = setting("hpacellseg", "labelling step: hpacellseg (its own label_cell, as the competition's masks) "
                                         "| relative (areas scale with the field)", choices=("hpacellseg", "relative"))
    reference_size: int = setting(2048, "fields under min(reference_size, 1728) px are enlarged to this side before the "
                                        "networks", ge=256)


@dataclass
class SegmentSettings(Section):
    """Stage 03, nuclei and whole-cell instance masks."""

    segmenter: str = setting("auto", "auto (hpacellseg when importable and both weight files are given, else "
                                     "classical) | classical | hpacellseg", choices=("auto", "classical", "hpacellseg"))
    classical: ClassicalSegmenterSettings = field(default_factory=ClassicalSegmenterSettings)
    hpacellseg: HpaCellSegSettings = field(default_factory=HpaCellSegSettings)


# ---------------------------------------------------------------------------------------- stage 04
@dataclass
class Cycle2Settings(Section):
    """How cycle 2's pseudo-labels differ from cycle 1's (docs/pseudo_labels.md)."""

    weight: float = setting(0.7, "evidence = (1-w) x cycle-1 evidence + w x cycle-1 cell-model evidence", ge=0, le=1)
    pos_quantile: float = setting(0.3, "cycle 2's pos_quantile (0: label every cell that passes pos_min)", ge=0, le=1)
    evidence: str = setting("membership", "membership: (1 - P_neg) x P_c / max P | softmax: P as it is "
                                          "(hpa.cells.pseudo_rules)", choices=("membership", "softmax"))
    secondary_rel: float = setting(0.0, "a positive cell also takes each image class whose evidence is >= this x its "
                                        "label's (0: off)", ge=0, le=1)
    fill_weight: float = setting(1.0, "cells the rule leaves out are filled from the cell model at this sampling "
                                      "weight (0: left out)", ge=0)
    fill_targets: str = setting("soft", "filled cells learn: soft (the cell model's probabilities over the image's "
                                        "classes and Negative) | hard (its best allowed class)",
                                choices=("soft", "hard"))


@dataclass
class PseudoSettings(Section):
    """Stage 04, cell pseudo-labels (and the cell tables of stages 04 and 06)."""

    score: str = setting("topk_mean", "aggregate of the normalised CAM inside a cell", choices=("mean", "topk_mean"))
    topk_frac: float = setting(0.25, "top-k mean over this fraction of the cell's pixels", gt=0, le=1)
    work_size: int = setting(512, "CAM scores are computed on cell masks reduced to this longest side", ge=32)
    times_image_prob: bool = setting(True, "multiply cell CAM scores by the image-level probability")
    cell_view: bool = setting(True, "cell tables get the image model's isolated-cell probabilities (hpa.cells.view)")
    view_weight: float = setting(0.75, "evidence = (1-v) x CAM score x image prob + v x isolated-cell prob (0: CAM "
                                       "only)", ge=0, le=1)
    pos_quantile: float = setting(0.3, "per-class positive threshold: this quantile of best-class scores of labelled "
                                       "cells", ge=0, le=1)
    pos_min: float = setting(0.3, "... but never below this", ge=0, le=1)
    neg_threshold: float = setting(0.1, "a cell whose best score is below this becomes Negative (18)", ge=0, le=1)
    multi_label: bool = setting(True, "positive cells also take the other image classes they pass (soft, uniform "
                                      "targets)")
    top_cell_per_label: bool = setting(False, "each image class no cell passes goes to the image's cell with the most "
                                              "evidence for it (multiple-instance rule; docs/pseudo_labels.md)")
    cycle2: Cycle2Settings = field(default_factory=Cycle2Settings)


# ---------------------------------------------------------------------------------------- stage 05
@dataclass
class CellModelSettings(Section):
    """Stage 05, the cell-level single-label classifier."""

    cycle2_init: str = setting("image", "cycle 2 starts from: image (the image model, as cycle 1) | cycle1 (the "
                                        "cycle-1 cell model, trained on)", choices=("image", "cycle1"))
    oof_folds: int = setting(0, "cycle 1: the training images' cell probabilities (cycle 2's second opinion) come "
                                "from this many extra models, each trained without a 1/k share of the images and "
                                "predicting its cells (0: from the cycle-1 model, which trained on them)", ge=0)
    crop_size: int = setting(64, "cell crops (cut from the full-res field) are resized to this square size", ge=16)
    margin: float = setting(0.1, "crop window: bbox grown by this fraction of its longest side on each side, made "
                                 "square", ge=0)
    outside: str = setting("dim", "what happens to crop pixels outside the cell mask", choices=("zero", "dim", "keep"))
    dim_factor: float = setting(0.25, "outside=dim: multiplier of those pixels", ge=0, le=1)
    output_stride: Optional[int] = setting(32, "16 | 32 | null (the image model's); same weights, 32 is cheaper on "
                                               "small crops", choices=(16, 32))
    epochs: int = setting(6, "training epochs (cycle 1)", ge=1)
    cycle2_epochs: Optional[int] = setting(None, "training epochs of cycle 2 and the oracle, which train on every cell of "
                                                 "the training images, not only the rule's (null: epochs)", ge=1)
    batch_size: int = setting(64, "cells per step per process", ge=1)
    val_every: int = setting(1, "validate every this many epochs (and after the last); the saved model is the last "
                                "epoch's either way", ge=1)
    lr: float = setting(1.0e-3, "peak AdamW learning rate (backbone from the image model, new head)", gt=0)
    weight_decay: float = setting(1.0e-2, "AdamW weight decay (not on biases and norm layers)", ge=0)
    warmup_epochs: float = setting(0.5, "linear warm-up length (epochs)", ge=0)
    label_smoothing: float = setting(0.1, "softmax cross-entropy label smoothing", ge=0, le=0.99)
    balance_power: float = setting(0.5, "class-balanced sampling: cell weight count_c^-power x label weight (0: off, "
                                        "1: equal)", ge=0)
    samples_per_epoch: Optional[int] = setting(2500, "cells drawn per epoch (null: all training cells); fixed: the same "
                                                     "per-epoch budget for cycles and oracle", ge=1)
    aug_intensity: float = setting(0.1, "flips and 90-degree turns always; per-channel intensity jitter strength",
                                   ge=0)
    dropout: Optional[float] = setting(None, "head dropout (null: the image model's)", ge=0, le=1)
    bn_momentum: Optional[float] = setting(0.1, "BatchNorm running-stats momentum (null: the arch's own)", gt=0, le=1)
    drop_connect: Optional[float] = setting(0.2, "EfficientNet stochastic depth rate (0: off; null: the arch's own, "
                                                 "0.2)", ge=0, le=1)
    tta_flip: bool = setting(False, "predict: average the softmax over the crop and its horizontal flip")
    predict_batch_size: int = setting(256, "cells per forward pass when predicting", ge=1)
    loader_workers: int = setting(0, "DataLoader workers (crops are small memmap rows: 0 is fastest on CPU)", ge=0)
    amp: str = setting("auto", "mixed precision: auto | bf16 | fp16 | off (as image_model.amp)",
                       choices=("auto", "bf16", "fp16", "off"))
    channels_last: bool = setting(True, "channels-last memory format")
    accumulate: int = setting(1, "gradient accumulation steps", ge=1)
    grad_clip: Optional[float] = setting(None, "clip the gradient norm to this value (null: off)", gt=0)


# ---------------------------------------------------------------------------------------- stages 06-07
@dataclass
class PredictSettings(Section):
    """Stage 06, per-cell confidences and the submission (docs/cell_model.md)."""

    combine: str = setting("cell", "how cell and image probabilities combine (the submission)",
                           choices=("cell", "product", "mean", "image", "product_max"))
    rank_combine: str = setting("product_max", "how they combine for the ranking output (rank0..rank18 of "
                                "predictions_test.parquet: comparable between images)",
                                choices=("cell", "product", "mean", "image", "product_max"))
    negative: str = setting("max", "how the Negative confidence is formed", choices=("max", "min_complement", "cell"))
    small_cell_penalty: bool = setting(True, "lower confidence for small cells and cells cut by the border")
    cycle: Union[int, str] = setting("last", "which cycle's cell model predicts: last | 1 | 2",
                                     choices=("last", 1, 2))


@dataclass
class EvaluateSettings(Section):
    """Stage 07, the report."""

    bootstrap: int = setting(200, "resamples of the test images for confidence intervals and paired step gains "
                                  "(0: none)", ge=0)


# ---------------------------------------------------------------------------------------- the tree
@dataclass
class Settings(Section):
    """The whole tree (``RUN/config.yaml``)."""

    seed: int = setting(0, "one seed for splits, augmentation, initialisation and sampling", ge=0)
    data: Optional[str] = setting(None, "data folder in the Kaggle layout (train.csv, train/, test/, optional gt/)")
    cell_diameter: Optional[float] = setting(None, "typical cell diameter in the fields' own pixels (equivalent-area "
                                                   "diameter of the median cell; HPA 2048-px fields: about 300-450); "
                                                   "null: measured from stage 03's train masks when they exist, else "
                                                   "by the classical segmenter on a sample of training fields", gt=0)
    profile: str = setting("default", "the profile this tree was built from (informational)")
    device: str = setting("auto", "auto (cuda when available) | cpu | cuda | cuda:N")
    num_workers: int = setting(2, "process-pool workers for per-image work", ge=0)
    on_bad_image: str = setting("error", "error: stop before long work | skip: record the image in a skipped.csv and "
                                         "go on", choices=("error", "skip"))
    image_model: ImageModelSettings = field(default_factory=ImageModelSettings)
    cam: CamSettings = field(default_factory=CamSettings)
    segment: SegmentSettings = field(default_factory=SegmentSettings)
    pseudo: PseudoSettings = field(default_factory=PseudoSettings)
    cell_model: CellModelSettings = field(default_factory=CellModelSettings)
    predict: PredictSettings = field(default_factory=PredictSettings)
    evaluate: EvaluateSettings = field(default_factory=EvaluateSettings)

    def __post_init__(self):
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"setting 'device': unknown value {self.device!r}; valid: auto, cpu, cuda, cuda:N")
        lo, hi = self.image_model.image_size_range
        if lo > hi:
            raise ConfigError(f"setting 'image_model.image_size_range' must be [min, max] with min <= max, got {[lo, hi]}")
        if self.image_model.val_fold >= self.image_model.folds:
            raise ConfigError(f"setting 'image_model.val_fold' must be < image_model.folds ({self.image_model.folds}), "
                              f"got {self.image_model.val_fold}")


#: Profile overrides, applied on top of the defaults.
PROFILES: dict[str, dict[str, Any]] = {
    "quick": {  # tiny: the whole chain in a couple of minutes on 2 CPU cores (tests use it)
        "num_workers": 0,
        "image_model": {"image_size": 128, "epochs": 2, "samples_per_epoch": None, "batch_size": 8, "folds": 3,
                        "val_every": 1},
        "cam": {"overlay_max_images": 4},
        "evaluate": {"bootstrap": 20},
        "pseudo": {"pos_min": 0.0},  # untrained models give weak evidence: keep some labels for the smoke test
        "segment": {"classical": {"work_size": 256}},
        "cell_model": {"crop_size": 32, "epochs": 1, "batch_size": 32, "samples_per_epoch": None},
    },
    "default": {},  # bash run_all.sh on a fresh machine: synthetic data, ~20 min on 2 CPU cores
    # bash run_all.sh --profile hard: the hard synthetic benchmark (docs/synth.md); cycle 2 fills every cell the
    # rule leaves out (44% here), twice cycle 1's cells: twice its epochs, chosen on the validation fold
    # (docs/pseudo_labels.md; cycle 1 at 12 epochs did not gain)
    # maps from the field enlarged 2x: an image's cells separate better (validation fold: cam 0.559 -> 0.611, broadcast
    # 0.568; docs/cams.md)
    # the cell models validate every 4th epoch (and after the last): 22 fewer passes over the validation cells,
    # 3-4 s each on 2 cores (the validation curve is for reading, the last epoch is kept)
    "hard": {"cell_model": {"cycle2_epochs": 12, "val_every": 4}, "cam": {"scale": 2.0}},
    "full": {  # real HPA scale on a GPU
        "num_workers": 8,
        # long runs on thousands of fields: EfficientNet's own regularisation (dropout, stochastic depth)
        # cells at 80 px (HPA 2048-px fields: a cache of about 480 px, at most 512: 22.9 GB for 21,806 fields);
        # crops of 128 px (28.6 GB for 20 cells per field): both caches within 60 GB (README)
        "image_model": {"arch": "efficientnet-b3", "image_size": 512, "cell_px": 80.0, "image_size_range": [128, 512],
                        "loader_workers": 8, "dropout": 0.2,
                        "drop_connect": 0.2, "train_crop": None, "aug_crop_scale": [0.6, 1.0],
                        "epochs": 20, "samples_per_epoch": None, "batch_size": 16, "lr": 5e-4, "val_every": 1},
        "cam": {"batch_size": 8},
        "segment": {"classical": {"work_size": 1024}},
        "cell_model": {"crop_size": 128, "epochs": 10, "batch_size": 64, "lr": 5e-4, "samples_per_epoch": None,
                       "loader_workers": 4, "tta_flip": True},
        "predict": {"combine": "product"},  # what the top HPA teams found best with their strong image models
    },
}

#: Keys renamed since earlier versions: old dotted key -> new dotted key (old config files and commands still work).
RENAMED = {
    **{f"pseudo.cycle2_{k}": f"pseudo.cycle2.{k}"
       for k in ("weight", "pos_quantile", "evidence", "secondary_rel", "fill_weight", "fill_targets")},
    **{f"segment.{k}": f"segment.classical.{k}"
       for k in ("work_size", "min_nucleus", "min_cell", "cell_threshold_scale", "green_weight")},
    **{f"segment.{k}": f"segment.hpacellseg.{k}"
       for k in ("scale_factor", "multi_channel_model", "padding", "labeler", "reference_size")},
    "segment.nuclei_model": "segment.hpacellseg.nuclei_weights",
    "segment.cell_model": "segment.hpacellseg.cell_weights",
}


def _flatten(tree: dict, path: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v and f"{path}{k}" not in RENAMED:
            out.update(_flatten(v, f"{path}{k}."))
        else:
            out[f"{path}{k}"] = v
    return out


def upgrade(tree: dict, source: str) -> dict:
    """``tree`` with renamed keys (:data:`RENAMED`) moved to their new place; a warning names each."""
    flat = _flatten(tree)
    if not any(k in RENAMED for k in flat):
        return tree
    out: dict = {}
    for key, value in flat.items():
        if key in RENAMED:
            log.warning("%s: setting %s is now %s", source, key, RENAMED[key])
            key = RENAMED[key]
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
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
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is given both as a value and as a section")
        node[parts[-1]] = yaml.safe_load(value) if value != "" else None
    return upgrade(tree, "command line")


def build_config(profile: str = "default", config_file: str | os.PathLike | None = None,
                 overrides: list[str] | None = None) -> Settings:
    """Resolve defaults + profile + YAML file + ``key=value`` overrides into one checked tree."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; valid profiles: {sorted(PROFILES)}")
    cfg = Settings().merged(PROFILES[profile])
    cfg.profile = profile
    if config_file:
        cfg = cfg.merged(load_yaml(config_file))
    return cfg.merged(parse_overrides(overrides or []))


def load_yaml(path: str | os.PathLike) -> dict:
    """A settings file as a nested mapping (renamed keys moved); ConfigError when missing or not a mapping."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return upgrade(data, str(path))


def config_path(run: str | os.PathLike) -> Path:
    return Path(run) / "config.yaml"


def save_config(run: str | os.PathLike, cfg: Settings) -> Path:
    """Write the resolved tree to ``RUN/config.yaml`` atomically."""
    return write_text(config_path(run), yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def load_run_config(run: str | os.PathLike) -> Settings:
    """Read ``RUN/config.yaml`` (written by the first stage of the run), completed by the defaults."""
    path = config_path(run)
    if not path.is_file():
        raise ConfigError(f"{path} not found: run stage 01 (or pass --data) first to create the run")
    try:
        return Settings().merged(load_yaml(path))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc} (a run made by another version? start a new --run folder)") from None


def setup_run(run: str | os.PathLike, data: str | os.PathLike | None = None, profile: str | None = None,
              config_file: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Settings:
    """The settings every stage script starts from.

    A new run (no ``RUN/config.yaml``) is built from the profile (``default`` if not given),
    the file and the overrides, with ``data`` recorded. An existing run keeps its saved tree;
    ``data``, a YAML file and overrides given now are applied on top and saved, so the file
    always says what the run used. Giving a different ``--profile`` to an existing run is an
    error (start a new run directory instead).
    """
    run = Path(run)
    if config_path(run).is_file():
        cfg = load_run_config(run)
        if profile and profile != cfg.profile:
            raise ConfigError(f"{config_path(run)} was made with profile {cfg.profile!r}, not {profile!r}; "
                              "use a new --run folder")
        new = cfg
        if config_file:
            new = new.merged(load_yaml(config_file))
        new = new.merged(parse_overrides(overrides or []))
    else:
        new = build_config(profile or "default", config_file, overrides)
    if data is not None:
        new.data = str(Path(data).resolve())
    if new.data is None:
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
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA device is available; use device=cpu or auto")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ConfigError(f"unknown device {name!r}; valid: auto, cpu, cuda, cuda:N")
    return name
