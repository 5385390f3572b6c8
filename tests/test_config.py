"""Config strictness: unknown keys, wrong types, impossible values, overrides."""

from __future__ import annotations

import pytest
import yaml

from xfer.config import load_config, resolved_dict
from xfer.configbase import parse_overrides
from xfer.errors import ConfigError


def write(tmp_path, data) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_defaults_validate():
    cfg = load_config()
    assert cfg.cluster.num_workers == 2
    assert cfg.model.head.pooling == "avg"


def test_misspelt_key_names_key_file_and_suggestion(tmp_path):
    path = write(tmp_path, {"model": {"bse": "vgg16"}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "unknown key 'model.bse'" in msg
    assert path in msg
    assert "did you mean 'model.base'" in msg


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'trian'.*did you mean 'train'"):
        load_config(write(tmp_path, {"trian": {"batch_size": 3}}))


def test_wrong_type_names_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.batch_size.*valid integer.*'lots'"):
        load_config(write(tmp_path, {"train": {"batch_size": "lots"}}))


def test_impossible_values():
    with pytest.raises(ConfigError, match=r"train\.head\.epochs.*greater than or equal to 0"):
        load_config(None, ["train.head.epochs=-1"])
    with pytest.raises(ConfigError, match="nothing to train"):
        load_config(None, ["train.head.epochs=0", "train.fine_tune.epochs=0"])
    with pytest.raises(ConfigError, match=r"unknown base 'vgg61' \(did you mean 'vgg16'\?\)"):
        load_config(None, ["model.base=vgg61"])
    with pytest.raises(ConfigError, match="not both"):
        load_config(None, ["train.fine_tune.unfreeze_from=10", "train.fine_tune.unfreeze_top=5"])


def test_overrides_parse_as_yaml_and_win_over_file(tmp_path):
    path = write(tmp_path, {"train": {"batch_size": 8, "head": {"epochs": 2}}})
    cfg = load_config(
        path,
        [
            "train.head.epochs=7",
            "train.head.learning_rate=3e-4",
            "cluster.use_gpu=true",
            "model.head.dense=[{units: 16}, {units: 4, activation: gelu}]",
            "storage.root=s3://bucket/prefix/",
        ],
    )
    assert cfg.train.batch_size == 8  # from the file
    assert cfg.train.head.epochs == 7  # override wins
    assert cfg.train.head.learning_rate == pytest.approx(3e-4)
    assert cfg.cluster.use_gpu is True
    assert [d.units for d in cfg.model.head.dense] == [16, 4]
    assert cfg.model.head.dense[1].activation == "gelu"
    assert cfg.storage.root == "s3://bucket/prefix"


def test_override_errors_name_the_override():
    with pytest.raises(ConfigError, match=r"override 'train\.head\.epochs' is not of the form"):
        load_config(None, ["train.head.epochs"])
    with pytest.raises(ConfigError, match=r"unknown key 'train\.hed' in command-line override"):
        load_config(None, ["train.hed.epochs=3"])
    assert parse_overrides(["a.b=1", "a.c=x", "d="]) == {"a": {"b": 1, "c": "x"}, "d": None}


def test_config_is_frozen():
    cfg = load_config()
    with pytest.raises(Exception, match="frozen"):
        cfg.train.batch_size = 3  # type: ignore[misc]


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(str(listy))


def test_resolved_config_has_no_secrets():
    cfg = load_config(None, ["storage.endpoint_url=https://user:hunter2@s3.example.com"])
    text = yaml.safe_dump(resolved_dict(cfg))
    assert "hunter2" not in text
    assert "s3.example.com" in text
    # The resolved config is complete: every section, reloadable as it is.
    assert set(resolved_dict(cfg)) >= {"storage", "data", "model", "train", "cluster", "output"}


def test_recovery_is_on_by_default_on_a_cluster_and_off_locally(monkeypatch):
    """cluster.max_failures unset: 3 with a cluster address (the config's or RAY_ADDRESS,
    as `ray job submit` sets it for the driver), 0 on this machine; a value set wins."""
    from xfer.raycluster import max_failures

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert load_config().cluster.max_failures is None
    assert max_failures(load_config().cluster) == 0
    assert max_failures(load_config(None, ["cluster.address=ray://head:10001"]).cluster) == 3
    assert max_failures(load_config(None, ["cluster.max_failures=1"]).cluster) == 1
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert max_failures(load_config().cluster) == 3
    assert max_failures(load_config(None, ["cluster.max_failures=0"]).cluster) == 0
    monkeypatch.setenv("RAY_ADDRESS", "")
    assert max_failures(load_config().cluster) == 0


def test_a_dashboard_address_is_refused_with_the_job_api_command(monkeypatch):
    """RAY_ADDRESS=http://<head>:8265 (the job API's, as for jobs/submit.sh) cannot reach
    ray.init: one clear XferError naming where it came from and what to run instead;
    ray:// and host:port addresses pass through as they are."""
    from xfer.errors import XferError
    from xfer.raycluster import ray_address

    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.5:8265")
    with pytest.raises(XferError) as refused:
        ray_address(None)
    text = str(refused.value)
    assert "\n" not in text and text.startswith("RAY_ADDRESS=http://10.0.0.5:8265 is the Ray")
    assert "jobs/submit.sh train --config <config> output.run_id=<id>" in text
    with pytest.raises(XferError, match=r"^cluster\.address=https://head"):
        ray_address("https://head:8265")
    assert ray_address("ray://head:10001") == "ray://head:10001"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert ray_address(None) == "10.0.0.5:6379"


# ------------------------------------------------- what xfer score scores, from the config


def test_score_locations_come_from_the_config_under_its_root(tmp_path):
    path = write(
        tmp_path,
        {
            "storage": {"root": "s3://night-bucket"},
            "score": {
                "model": "{root}/models/pets",
                "input": "{root}/incoming/{date}/",
                "output": "{root}/predictions/pets",
                "date": "2026-01-05",
            },
        },
    )
    night = load_config(path).score.target(load_config(path).storage.root)
    assert (night.model, night.input, night.output, night.date) == (
        "s3://night-bucket/models/pets",
        "s3://night-bucket/incoming/{date}/",  # {date}: the night, filled in by xfer score
        "s3://night-bucket/predictions/pets",
        "2026-01-05",
    )
    # A flag wins over its key; the others stay the config's.
    cfg = load_config(path, ["storage.root=s3://other-bucket"])
    night = cfg.score.target(cfg.storage.root, model="s3://x/runs/r1", date="20260106")
    assert night.model == "s3://x/runs/r1" and night.date == "20260106"
    assert night.output == "s3://other-bucket/predictions/pets"


def test_score_date_written_as_yaml_reads_as_text():
    # YAML reads 2026-01-05 as a date and 20260105 as a number.
    assert load_config(None, ["score.date=2026-01-05"]).score.date == "2026-01-05"
    assert load_config(None, ["score.date=20260105"]).score.date == "20260105"


@pytest.mark.parametrize("missing", ["model", "input", "output"])
def test_a_missing_score_location_names_the_flag_and_the_key(missing):
    given = {k: f"s3://b/{k}" for k in ("model", "input", "output") if k != missing}
    cfg = load_config(None, [f"score.{k}={v}" for k, v in given.items()])
    with pytest.raises(ConfigError) as err:
        cfg.score.target(cfg.storage.root)
    assert f"--{missing}" in str(err.value) and f"score.{missing}" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_key_the_command_does_not_read_is_named(tmp_path):
    from xfer.configreads import unread_settings

    cfg = load_config(
        None, ["output.model_name=pets", "score.num_actors=2", "score.model=s3://b/models/m"]
    )
    assert unread_settings(cfg, "score") == [
        "output.model_name is set but xfer score does not read the output section"
    ]
    # Training reads the score: section (its test split is scored), not what a night scores.
    assert unread_settings(cfg, "train") == ["score.model is set but xfer train does not read it"]
    # A training config carries the shard: section of its dataset: no warning.
    assert unread_settings(load_config(None, ["shard.max_side=256"]), "train") == []
    assert unread_settings(load_config(None, ["data.image_size=96"]), "shard") == []
    assert unread_settings(load_config(), "score") == []


def test_xfer_score_warns_about_unread_keys_and_needs_a_model(tmp_path, capsys):
    from xfer.cli import main

    status = main(["score", "output.model_name=pets", "--input", "s3://b/in", "--output", "x"])
    err = capsys.readouterr().err
    assert status == 2
    assert (
        "[xfer] warning: output.model_name is set but xfer score does not read the output section"
        in err
    )
    assert "xfer: error: xfer score needs the model: give --model or set score.model" in err
