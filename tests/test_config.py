"""The settings tree: profiles, overrides, errors, the run's saved config."""

import pytest
import yaml

from hpa.config import (
    PROFILES,
    ConfigError,
    ImageModelSettings,
    Settings,
    build_config,
    load_run_config,
    parse_overrides,
    save_config,
    setup_run,
)
from hpa.utils.fs import atomic_path
from hpa.utils.shards import parse_shard, select_shard


def test_profiles_and_overrides():
    cfg = build_config("quick", overrides=["image_model.epochs=7", "cam.tta_flip=true", "seed=3"])
    assert cfg.profile == "quick" and cfg.image_model.epochs == 7 and cfg.cam.tta_flip is True
    assert cfg.seed == 3 and cfg.image_model.image_size == 128 and isinstance(cfg.image_model, ImageModelSettings)
    assert parse_overrides(["a.b.c=[1, 2]"]) == {"a": {"b": {"c": [1, 2]}}}


def test_unknown_keys_list_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown setting 'image_model.epoch'.*'epochs'"):
        build_config("quick", overrides=["image_model.epoch=3"])
    with pytest.raises(ConfigError, match=r"valid profiles: \['default', 'full', 'hard', 'quick'\]"):
        build_config("fast")
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["epochs"])


def test_setup_run_records_and_reloads(tmp_path):
    run = tmp_path / "run"
    cfg = setup_run(run, data=tmp_path, profile="quick", overrides=["seed=5"])
    assert (run / "config.yaml").is_file() and cfg.data == str(tmp_path.resolve())
    again = setup_run(run)  # later stages need only --run
    assert again == cfg == load_run_config(run)
    changed = setup_run(run, overrides=["cam.batch_size=3"])
    assert load_run_config(run).cam.batch_size == 3 and changed.seed == 5
    with pytest.raises(ConfigError, match="profile 'quick', not 'default'"):
        setup_run(run, profile="default")
    with pytest.raises(ConfigError, match="no data folder"):
        setup_run(tmp_path / "other")


def test_types_choices_and_ranges_are_checked_when_merged():
    ok = build_config("default", overrides=["image_model.lr=1", "image_model.grad_clip=null", "predict.cycle=2"])
    assert ok.image_model.lr == 1.0 and isinstance(ok.image_model.lr, float)  # an int where a float is due
    assert ok.image_model.grad_clip is None and ok.predict.cycle == 2
    # YAML 1.1 reads 1e-3 (no dot) as a string: on the command line and in a --config file it is a number all the same
    sci = build_config("default", overrides=["image_model.lr=1e-3", "cell_model.lr=+5E-4", "pseudo.pos_min=2.5e-1"])
    assert (sci.image_model.lr, sci.cell_model.lr, sci.pseudo.pos_min) == (0.001, 0.0005, 0.25)
    with pytest.raises(ConfigError, match=r"'image_model.lr' must be a number, got '1e-3x'"):
        build_config("default", overrides=["image_model.lr=1e-3x"])
    bad = {"image_model.epochs=two": r"'image_model.epochs' must be an integer, got 'two'",
           "image_model.epochs=0": r"'image_model.epochs' must be >= 1, got 0",
           "image_model.epochs=2.5": r"must be an integer, got 2.5",
           "cam.tta_flip=1": r"'cam.tta_flip' must be true or false, got 1",
           "image_model.loss=huber": r"'image_model.loss': unknown value 'huber'; valid: bce, focal",
           "image_model.arch=vgg": r"'image_model.arch': unknown value 'vgg'; valid: .*efficientnet-b0",
           "image_model.aug_crop_scale=[0.2]": r"must be a list of 2 values",
           "image_model.dropout=1.5": r"'image_model.dropout' must be <= 1, got 1.5",
           "image_model.epochs=null": r"'image_model.epochs' must be an integer, got None",
           "pseudo.cycle2.fill_targets=fuzzy": r"unknown value 'fuzzy'; valid: soft, hard",
           "device=gpu": r"'device': unknown value 'gpu'",
           "predict.cycle=3": r"'predict.cycle': unknown value 3; valid: last, 1, 2",
           "image_model.val_fold=5": r"'image_model.val_fold' must be < image_model.folds",
           "cam=3": r"'cam' is a section"}
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            build_config("default", overrides=[override])
    with pytest.raises(ConfigError, match=r"unknown setting 'pseudo.cycle2.weigth'; valid keys of pseudo.cycle2"):
        build_config("default", overrides=["pseudo.cycle2.weigth=0.5"])


def test_defaults_live_in_one_tree():
    """Every profile resolves, and the tree round-trips through YAML unchanged."""
    for name in PROFILES:
        cfg = build_config(name)
        assert Settings.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg
    assert build_config("quick").segment.classical.work_size == 256 and Settings().segment.segmenter == "auto"


def test_renamed_keys_and_old_config_files_still_load(tmp_path, caplog):
    """Keys of earlier versions (flat cycle2_*, segment.nuclei_model, ...) move to their new place with a warning."""
    cfg = build_config("default", overrides=["pseudo.cycle2_fill_weight=0.5", "segment.work_size=300",
                                             "segment.nuclei_model=/w/nuc.pth"])
    assert cfg.pseudo.cycle2.fill_weight == 0.5 and cfg.segment.classical.work_size == 300
    assert cfg.segment.hpacellseg.nuclei_weights == "/w/nuc.pth"
    run = tmp_path / "old"
    run.mkdir()
    old = {"seed": 1, "data": str(tmp_path), "profile": "default",
           "segment": {"segmenter": "classical", "cell_model": "/w/cell.pth", "min_cell": 0.3},
           "pseudo": {"cycle2_weight": 0.6, "cycle2_fill_targets": "hard", "view_weight": 0.5}}
    (run / "config.yaml").write_text(yaml.safe_dump(old))
    with caplog.at_level("WARNING"):
        loaded = load_run_config(run)
    assert "pseudo.cycle2_weight is now pseudo.cycle2.weight" in caplog.text
    assert (loaded.seed, loaded.pseudo.cycle2.weight, loaded.pseudo.cycle2.fill_targets) == (1, 0.6, "hard")
    assert loaded.segment.hpacellseg.cell_weights == "/w/cell.pth" and loaded.segment.classical.min_cell == 0.3
    assert loaded.pseudo.view_weight == 0.5 and loaded.image_model.epochs == Settings().image_model.epochs
    save_config(run, loaded)  # written back in the new shape
    assert yaml.safe_load((run / "config.yaml").read_text())["pseudo"]["cycle2"]["weight"] == 0.6
    (run / "config.yaml").write_text(yaml.safe_dump({"image_model": {"epochs": "many"}}))
    with pytest.raises(ConfigError, match=r"config.yaml: setting 'image_model.epochs' must be an integer"):
        load_run_config(run)


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_text("whole")
    assert target.read_text() == "whole" and len(list(tmp_path.iterdir())) == 1


def test_shards_partition_items():
    items = list(range(10))
    parts = [select_shard(items, (i, 3)) for i in range(3)]
    assert sorted(sum(parts, [])) == items and parse_shard("1/3") == (1, 3) and parse_shard(None) == (0, 1)
    for bad in ("3/3", "a/b", "1"):
        with pytest.raises(ValueError, match="shard"):
            parse_shard(bad)


def test_exponent_numbers_in_a_config_file(tmp_path):
    f = tmp_path / "settings.yaml"
    f.write_text("image_model:\n  lr: 1e-3\n  weight_decay: 5.0e-2\n")
    cfg = build_config("default", config_file=f)
    assert cfg.image_model.lr == 0.001 and cfg.image_model.weight_decay == 0.05
