"""The settings tree: profiles, overrides, errors, the run's saved config."""

import pytest

from hpa.config import ConfigError, build_config, load_run_config, parse_overrides, setup_run
from hpa.utils.fs import atomic_path
from hpa.utils.shards import parse_shard, select_shard


def test_profiles_and_overrides():
    cfg = build_config("quick", overrides=["image_model.epochs=7", "cam.tta_flip=true", "seed=3"])
    assert cfg["profile"] == "quick" and cfg["image_model"]["epochs"] == 7 and cfg["cam"]["tta_flip"] is True
    assert cfg["seed"] == 3 and cfg["image_model"]["image_size"] == 128
    assert parse_overrides(["a.b.c=[1, 2]"]) == {"a": {"b": {"c": [1, 2]}}}


def test_unknown_keys_list_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown setting 'image_model.epoch'.*'epochs'"):
        build_config("quick", overrides=["image_model.epoch=3"])
    with pytest.raises(ConfigError, match=r"valid profiles: \['default', 'full', 'quick'\]"):
        build_config("fast")
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["epochs"])


def test_setup_run_records_and_reloads(tmp_path):
    run = tmp_path / "run"
    cfg = setup_run(run, data=tmp_path, profile="quick", overrides=["seed=5"])
    assert (run / "config.yaml").is_file() and cfg["data"] == str(tmp_path.resolve())
    again = setup_run(run)  # later stages need only --run
    assert again == cfg == load_run_config(run)
    changed = setup_run(run, overrides=["cam.batch_size=3"])
    assert load_run_config(run)["cam"]["batch_size"] == 3 and changed["seed"] == 5
    with pytest.raises(ConfigError, match="profile 'quick', not 'default'"):
        setup_run(run, profile="default")
    with pytest.raises(ConfigError, match="no data folder"):
        setup_run(tmp_path / "other")


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
