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
    cfg = TrainConfig(rule="clapp++dfb", width=0.5, grids=[8, 4, 4, 4, 2, 2], subset=100, crop_scale=[0.25, 1.0],
                      resize=64, mean=[0.4914, 0.4822, 0.4465], std=[0.2470, 0.2435, 0.2616])
    save_yaml(cfg, tmp_path / "c.yaml")
    assert load_yaml(TrainConfig, tmp_path / "c.yaml") == cfg
    cfg = TrainConfig(encoder="resnet50", encoder_options={"stem": "imagenet", "cut": "units", "zero_init": True})
    save_yaml(cfg, tmp_path / "r.yaml")
    assert load_yaml(TrainConfig, tmp_path / "r.yaml") == cfg
    p = ProbeConfig(protocols=["fast", "paper"], random_init=True, grids=[7, 2, 2, 1, 1, 1], resize=28)
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
        ({"rule_options": {"f": "relu"}}, r"rule_options of clapp\+\+: unknown f 'relu'.*hinge"),
        ({"rule_options": {"feedback": "random"}}, r"unknown feedback.*fixed"),
        ({"rule_options": {"temperature": 0.1}},
         r"unknown ContrastiveOptions key\(s\) 'temperature'; valid keys: b_dtype, b_l2, b_lr_scale, b_momentum, "
         r"b_optimizer, b_rank, b_structure, f, feedback"),
        ({"rule": "bp-infonce", "rule_options": {"proj_dim": 0}}, r"rule_options of bp-infonce: proj_dim must be >= 1"),
        ({"batch_size": 1}, "at least 2 images"),
        ({"grids": [8, 4, 4, 3, 2, 2]}, r"at 32px input: block 4: grid 3 does not fit its 8x8 map .*\[1, 2, 4, 8\]"),
        ({"grids": [8, 4]}, "2 entries but encoder vgg6 has 6 blocks"),
        ({"resize": 40, "grids": [8, 4, 4, 4, 2, 2]}, r"at 40px input: block 4: .*10x10.*; block 5: .*5x5"),
        ({"resize": 8}, "cannot take 8px images.*--resize"),
        ({"resize": 0}, "resize must be > 0"),
        ({"mean": [0.5, 0.5, 0.5]}, "mean and std go together"),
        ({"mean": [0.5], "std": [0.2]}, "1 values but the images have 3 channel"),
        ({"mean": [0.5] * 3, "std": [0.2, 0.0, 0.2]}, "std must be > 0"),
        ({"rule_options": {"f": "linear"}}, "b_l2"),
        ({"lr": 0}, "lr must be > 0"),
        # nan and inf parse as floats and pass `> 0`; lr inf or 1e38 gives finite losses at step 1 and inf weights.
        ({"lr": float("inf")}, r"lr must be a finite number, got inf"),
        ({"lr": 1e38}, r"lr must be <= 1\.0"),
        ({"rule": "bp-infonce", "rule_options": {"temperature": float("nan")}},
         r"temperature must be a finite number, got nan"),
        ({"width": float("nan")}, "width must be a finite number"),
        ({"weight_decay": float("inf")}, "weight_decay must be a finite number"),
        ({"crop_scale": [float("nan"), 1.0]}, "crop_scale must be a finite number"),
        ({"mean": [0.5, float("inf"), 0.5], "std": [0.2] * 3}, "mean must be a finite number"),
        ({"out": ""}, "out must name the run's folder"),
        ({"encoder": "resnet18", "encoder_options": {"stem": "tiny"}}, "unknown ResNet stem 'tiny'.*imagenet"),
        ({"encoder": "resnet18", "encoder_options": {"depth": 34}}, r"'depth'; valid keys: cut, stem, zero_init"),
        ({"encoder_options": {"stem": "cifar"}}, "encoder 'vgg6' takes no encoder_options, got 'stem'"),
        ({"encoder": "resnet18", "grids": [8, 4, 4, 4, 2, 2]}, "6 entries but encoder resnet18 has 4 blocks"),
        # A width whose narrowest layer (128 channels in VGG-6) rounds to 0, also where the image size is known
        # only from the data (imagefolder): refused before any data is read.
        ({"width": 1e-9}, r"width must be a finite number > 0\.00390625 \(1/256: at or below it vgg6's 128-channel"),
        ({"width": 1 / 256, "dataset": "imagefolder"}, r"width must be a finite number > 0\.00390625"),
        ({"width": 0.001, "encoder": "vgg8"}, r"width must be a finite number > 0\.00390625 .*got 0\.001"),
        ({"seed": 2**70}, r"seed must be an integer in 0\.\.4294967295 \(2\*\*32 - 1\), got 1180591620717411303424"),
        ({"seed": -1}, r"seed must be an integer in 0\.\.4294967295 \(2\*\*32 - 1\), got -1"),
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
    from localssl.cli import build_parser, resolve_args

    args = build_parser().parse_args(["probe", "runs/x", "--protocols", "fast", "knn", "paper"])
    assert resolve_args(ProbeConfig, args).protocols == ["fast", "knn", "paper"]
    args = build_parser().parse_args(["probe", "runs/x", "--grids", "7", "2", "2", "1", "1", "1", "--resize", "28"])
    probe = resolve_args(ProbeConfig, args)
    assert probe.grids == [7, 2, 2, 1, 1, 1] and probe.resize == 28
    args = build_parser().parse_args(["train", "--resize", "64", "--mean", "0.5", "--std", "0.25"])
    cfg = resolve_args(TrainConfig, args)
    assert (cfg.resize, cfg.mean, cfg.std) == (64, [0.5], [0.25])


def test_encoder_options_from_yaml_and_key_value_flags(tmp_path, monkeypatch):
    """``--encoder-opt KEY=VALUE`` (repeatable) adds keys to the file's ``encoder_options`` or overrides them."""
    import localssl.engine.trainer as tr

    seen = {}
    monkeypatch.setattr(tr, "train", lambda cfg, resume=False: seen.setdefault("cfg", cfg) and tmp_path)
    (tmp_path / "c.yaml").write_text("encoder: resnet18\nencoder_options: {cut: units, zero_init: true}\n")
    main(["train", "--config", str(tmp_path / "c.yaml"), "--encoder-opt", "stem=cifar", "--encoder-opt", "cut=stages"])
    assert seen["cfg"].encoder_options == {"cut": "stages", "zero_init": True, "stem": "cifar"}
    validate_train(seen["cfg"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE, got 'stem'"):
        from_dict(TrainConfig, {"encoder_options": ["stem"]})
    with pytest.raises(ConfigError, match="TrainConfig.encoder_options: expected a mapping"):
        from_dict(TrainConfig, {"encoder_options": 3})


def test_probe_config_checks_grids_and_resize():
    from localssl.config import validate_probe

    for bad, pattern in (({"resize": -1}, "resize must be > 0"), ({"grids": [0, 1]}, "grids must be >= 1")):
        with pytest.raises(ConfigError, match=pattern):
            validate_probe(ProbeConfig(**bad))


def test_probe_config_checks_seed_and_device():
    from localssl.config import validate_probe

    for bad, pattern in (({"seed": 2**64}, r"seed must be an integer in 0\.\.4294967295"),
                         ({"device": "tpu"}, "unknown device 'tpu'; valid: auto, cpu, cuda, cuda:N, mps")):
        with pytest.raises(ConfigError, match=pattern):
            validate_probe(ProbeConfig(**bad))


def test_probe_config_refuses_non_finite_numbers():
    from localssl.config import validate_probe

    for bad, pattern in (({"lr": float("nan")}, "lr must be a finite number"),
                         ({"knn_t": float("inf")}, "knn_t must be a finite number"),
                         ({"lr": 2.0}, r"lr must be in \(0, 1\.0\]")):
        with pytest.raises(ConfigError, match=pattern):
            validate_probe(ProbeConfig(**bad))


def test_nan_from_the_command_line_is_refused_without_lr_advice(tmp_path, capsys):
    rc = main(["train", "--rule", "bp-infonce", "--rule-opt", "temperature=nan", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "temperature must be a finite number" in err and "--lr" not in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("options", [{"f": "relu"}, {"f": "linear"}])
def test_a_bad_rule_option_is_named_once(options):
    # A checked value (f=relu) and a trainable-only check (linear f without b_l2) both say whose option it is, once.
    with pytest.raises(ConfigError) as e:
        validate_train(TrainConfig(rule_options=options))
    assert str(e.value).count("rule_options of clapp++") == 1, str(e.value)
