"""Hostile files for the checkpoint and config readers: malformed, truncated, oversized, mistyped, unknown or
code-executing. Each is one clear line naming the file (and the entry or key), and nothing in it runs."""
from __future__ import annotations

import builtins
import io
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from localssl.cli import main
from localssl.config import MAX_CONFIG_BYTES, ConfigError, TrainConfig, load_yaml
from localssl.engine.checkpoint import CHECKPOINT, CheckpointError, load_checkpoint, load_encoder_from_run
from localssl.engine.trainer import train


def assert_one_clear_line(message: str, *names: str, case: str = "") -> None:
    assert "\n" not in message and len(message) < 1000, (case, message)
    for name in names:
        assert name in message, (case, name, message)


class Payload:
    """Unpickling this creates ``marker``: proof that a reader ran the file's code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def good_state(tmp_path_factory) -> dict:
    """A real checkpoint's entries (trained once for this file)."""
    run = tmp_path_factory.mktemp("good") / "run"
    train(TrainConfig(dataset="shapes10", width=1 / 16, subset=64, batch_size=16, max_steps=1, amp="off",
                      progress=False, out=str(run)))
    return load_checkpoint(run / CHECKPOINT)


def _with(state: dict, **changes) -> dict:
    new = {k: (dict(v) if k == "config" else v) for k, v in state.items()}
    for key, value in changes.items():
        if value is _DROP:
            new.pop(key)
        elif key == "config_items":
            new["config"].update(value)
        else:
            new[key] = value
    return new


_DROP = object()


# (name, what to write, what the message must name besides the file)
def _hostile_checkpoints(state: dict) -> list[tuple[str, bytes | object, str]]:
    buf = io.BytesIO()
    torch.save(state, buf)
    whole = buf.getvalue()
    return [
        ("empty", b"", "is empty (0 bytes)"),
        ("garbage", bytes(range(256)) * 8, "not a plain-data PyTorch file"),
        ("truncated", whole[: len(whole) // 2], "not a plain-data PyTorch file"),
        ("zip-of-text", _zip({"a/data.pkl": b"not a pickle"}), "not a plain-data PyTorch file"),
        ("a tensor", torch.zeros(3), "holds a Tensor, not a dict"),
        ("no encoder", _with(state, encoder=_DROP), "it has no 'encoder' entry"),
        ("no config", _with(state, config=_DROP), "it has no 'config' entry"),
        ("config a list", _with(state, config=[1, 2]), "entry 'config' must be a dict"),
        ("config unknown key", _with(state, config_items={"lerning_rate": 1}),
         "unknown TrainConfig key(s) 'lerning_rate'"),
        ("config wrong type", _with(state, config_items={"width": "wide"}), "TrainConfig.width: expected a number"),
        ("config nan width", _with(state, config_items={"width": float("nan")}), "width must be a finite number"),
        ("config unknown encoder", _with(state, config_items={"encoder": "resnet"}), "unknown encoder 'resnet'"),
        ("oversized value", _with(state, config_items={"rule": "x" * 1_000_000, "encoder": "y" * 1_000_000}),
         "unknown encoder 'yyyy"),
        ("encoder not tensors", _with(state, encoder={"blocks.0.0.weight": "weights"}),
         "entry 'encoder' must map names to tensors"),
        ("encoder missing key", _with(state, encoder={k: v for k, v in state["encoder"].items()
                                                      if k != "blocks.5.0.bias"}), "has no 'blocks.5.0.bias'"),
        ("encoder extra key", _with(state, encoder={**state["encoder"], "blocks.9.0.weight": torch.zeros(1)}),
         "holds 'blocks.9.0.weight'"),
        ("encoder wrong shape", _with(state, encoder={**state["encoder"], "blocks.0.0.bias": torch.zeros(10**6)}),
         "'blocks.0.0.bias' has shape (1000000,) in the file but (8,)"),
        ("step a string", _with(state, step="3"), "entry 'step' must be an integer, got '3'"),
        ("step negative", _with(state, step=-5), "entry 'step' must be >= 0, got -5"),
    ]


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _write(path: Path, content) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    return path


def test_hostile_checkpoints_are_one_line_naming_the_file_and_entry(tmp_path, good_state):
    """Each through `load_encoder_from_run` (what `probe` reads), the strictest reader of a run."""
    for i, (case, content, expected) in enumerate(_hostile_checkpoints(good_state)):
        path = _write(tmp_path / f"{i}.pt", content)
        with pytest.raises(CheckpointError) as e:
            load_encoder_from_run(tmp_path, path)
        assert_one_clear_line(str(e.value), str(path), expected, case=case)


@pytest.mark.parametrize("form", ["torch.save", "torch.save legacy", "raw pickle", "inside a run's checkpoint"])
def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path, good_state, capsys, form):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    if form == "torch.save":
        torch.save({"encoder": Payload(marker)}, path)
    elif form == "torch.save legacy":
        torch.save({"encoder": Payload(marker)}, path, _use_new_zipfile_serialization=False)
    elif form == "raw pickle":
        path.write_bytes(pickle.dumps({"encoder": Payload(marker)}))
    else:  # a real checkpoint with one entry swapped for the payload
        torch.save(_with(good_state, env=Payload(marker)), path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert_one_clear_line(str(e.value), str(path), "nothing in it was run",
                          "" if form == "raw pickle" else "the Python object io.open")
    # The same through the commands that read a run: probe, and train --resume.
    run = tmp_path / "run"
    run.mkdir()
    path.replace(run / CHECKPOINT)
    (run / "config.yaml").write_text("dataset: shapes10\nwidth: 0.0625\n")
    for argv in (["probe", str(run)], ["train", "--resume", "--out", str(run)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert "nothing in it was run" in err and str(run / CHECKPOINT) in err
    assert not marker.exists(), "the checkpoint's payload ran"


# (name, YAML text or bytes, what the message must name besides the file)
HOSTILE_YAML: list[tuple[str, str | bytes, str]] = [
    ("malformed", "rule: clapp++\ngrids: [8, 4\n", "is not valid YAML at line 3, column 1"),
    ("truncated", 'rule: "clapp', "is not valid YAML at line 1"),
    ("tab indent", "rule: clapp++\n\tlr: 0.1\n", "is not valid YAML at line 2, column 1"),
    ("not text", b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "is not UTF-8 text"),
    ("a list", "- rule\n- lr\n", "a TrainConfig must be a mapping, got list"),
    ("a scalar", "42\n", "a TrainConfig must be a mapping, got int"),
    ("unknown key", "learning_rate: 0.1\n", "unknown TrainConfig key(s) 'learning_rate'"),
    ("non-string keys", "1: 2\n~: 3\nfoo: 5\n", "unknown TrainConfig key(s) 'foo', 1, None"),
    ("wrong type", "epochs: [1, 2]\n", "TrainConfig.epochs: expected an integer, got [1, 2]"),
    ("mapping for a number", "lr: {a: 1}\n", "TrainConfig.lr: expected a number"),
    ("huge integer", "seed: " + "9" * 5000 + "\n", "holds a value that cannot be read"),
    ("deep nesting", "grids: " + "[" * 50_000 + "]" * 50_000 + "\n", "nests its values too deeply"),
    # Aliases share one node, so the file is small, but the value's full repr has millions of characters.
    ("alias bomb", "grids: [[&a [x, x, x, x, x, x, x, x, x], " + ", ".join(
        f"&{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip("abcdef", "bcdefg")) + "]]\n",
     "TrainConfig.grids: expected an integer, got [["),
    ("nested alias in a list key", "mean: &m [[[[[[[[1]]]]]]]]\nstd: [*m, *m, *m]\n",
     "TrainConfig.mean: expected a number"),
]


def test_hostile_configs_are_one_line_naming_the_file_and_key(tmp_path):
    for i, (case, text, expected) in enumerate(HOSTILE_YAML):
        path = tmp_path / f"{i}.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(ConfigError) as e:
            load_yaml(TrainConfig, path)
        assert_one_clear_line(str(e.value), str(path), expected, case=case)


def test_an_oversized_config_is_refused_without_reading_it_whole(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("rule: clapp++\n" + "#" * (MAX_CONFIG_BYTES + 10) + "\n")
    with pytest.raises(ConfigError) as e:
        load_yaml(TrainConfig, path)
    assert_one_clear_line(str(e.value), str(path), "is over 1 MiB: not a localssl config")
    with pytest.raises(ConfigError, match=f"config file {tmp_path} cannot be read"):  # a folder, not a file
        load_yaml(TrainConfig, tmp_path)


@pytest.mark.parametrize("tag", ["!!python/object/apply:builtins.open [{marker}, w]",
                                 "!!python/object/new:builtins.open [{marker}, w]",
                                 "!!python/name:builtins.open", "!!python/object:pathlib.Path {{}}"])
def test_a_config_tag_that_would_run_code_is_refused_and_runs_nothing(tmp_path, capsys, tag):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f"rule: clapp++\nseed: {tag.format(marker=marker)}\n")
    with pytest.raises(ConfigError) as e:
        load_yaml(TrainConfig, path)
    assert_one_clear_line(str(e.value), str(path), "at line 2, column 7", "tag:yaml.org,2002:python/",
                          "the tag was refused, nothing was run")
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and str(path) in err
    assert not marker.exists(), "the config's payload ran"
    assert not (tmp_path / "run").exists()
