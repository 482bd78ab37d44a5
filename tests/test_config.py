"""Typed configs: YAML round trip, loud errors, impossible values caught early."""
from __future__ import annotations

import pytest

from localssl.cli import main
from localssl.config import (
    ConfigError,
    ProbeConfig,
    TrainConfig,
    from_dict,
    load_yaml,
    save_yaml,
    validate_train,
)


def test_yaml_round_trip(tmp_path):
    cfg = TrainConfig(rule="clapp++dfb", width=0.5, grids=[8, 4, 4, 4, 2, 2], subset=100, crop_scale=[0.25, 1.0])
    save_yaml(cfg, tmp_path / "c.yaml")
    assert load_yaml(TrainConfig, tmp_path / "c.yaml") == cfg
    p = ProbeConfig(protocols=["fast", "paper"], random_init=True)
    save_yaml(p, tmp_path / "p.yaml")
    assert load_yaml(ProbeConfig, tmp_path / "p.yaml") == p


def test_unknown_key_lists_valid_ones(tmp_path):
    (tmp_path / "c.yaml").write_text("rule: clapp++\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"c.yaml.*'learning_rate'.*valid keys:.*lr"):
        load_yaml(TrainConfig, tmp_path / "c.yaml")


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="TrainConfig.epochs"):
        from_dict(TrainConfig, {"epochs": "many"})


@pytest.mark.parametrize(
    "kw, pattern",
    [
        ({"rule": "clap"}, r"unknown rule 'clap'.*clapp\+\+"),
        ({"dataset": "cifar11"}, r"unknown dataset 'cifar11'.*cifar10"),
        ({"encoder": "resnet"}, r"unknown encoder 'resnet'.*vgg6"),
        ({"f": "relu"}, r"unknown loss function f 'relu'.*hinge"),
        ({"feedback": "random"}, r"unknown feedback.*fixed"),
        ({"batch_size": 1}, "at least 2 images"),
        ({"grids": [8, 4, 4, 3, 2, 2]}, r"grid 3 of block 4 does not fit its 8x8 map at 32px.*\[1, 2, 4, 8\]"),
        ({"grids": [8, 4]}, "2 entries but encoder vgg6 has 6 blocks"),
        ({"f": "linear"}, "b_l2"),
        ({"lr": 0}, "lr must be > 0"),
    ],
)
def test_impossible_values_caught_before_training(kw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        validate_train(TrainConfig(**kw))


def test_cli_error_is_one_clear_line(tmp_path, capsys):
    rc = main(["train", "--rule", "nope", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown rule 'nope'" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_cli_flags_override_yaml(tmp_path, monkeypatch):
    import localssl.engine.trainer as tr

    seen = {}
    monkeypatch.setattr(tr, "train", lambda cfg, resume=False: seen.setdefault("cfg", cfg) and tmp_path)
    (tmp_path / "c.yaml").write_text("rule: clapp++global\nepochs: 7\nlr: 0.001\n")
    main(["train", "--config", str(tmp_path / "c.yaml"), "--epochs", "3", "--no-progress"])
    cfg = seen["cfg"]
    assert (cfg.rule, cfg.epochs, cfg.lr, cfg.progress) == ("clapp++global", 3, 0.001, False)


def test_cli_list_flags_parse_to_typed_lists(tmp_path, monkeypatch):
    import localssl.engine.trainer as tr

    seen = {}
    monkeypatch.setattr(tr, "train", lambda cfg, resume=False: seen.setdefault("cfg", cfg) and tmp_path)
    main(["train", "--grids", "8", "4", "4", "4", "2", "2", "--crop-scale", "0.2", "1", "--out", str(tmp_path)])
    assert seen["cfg"].grids == [8, 4, 4, 4, 2, 2] and seen["cfg"].crop_scale == [0.2, 1.0]
    from localssl.cli import _resolve, build_parser

    args = build_parser().parse_args(["probe", "runs/x", "--protocols", "fast", "knn", "paper"])
    assert _resolve(ProbeConfig, args).protocols == ["fast", "knn", "paper"]
