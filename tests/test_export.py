"""A trained backbone taken elsewhere: `localssl.load_encoder`, `localssl export` and `localssl.load_exported`."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import localssl
from localssl.cli import main
from localssl.data import dataset_spec
from localssl.engine.checkpoint import CHECKPOINT, CheckpointError, load_checkpoint
from localssl.engine.trainer import train
from localssl.export import EXPORT_JSON, ExportError, load_exported
from localssl.models import Preprocessing
from tests.test_messages import tiny_cfg

# ResNet-18 at width 1/16 with a small head: a blockwise rule, whose heads must stay out of the export.
RULE, ENCODER, WIDTH = "blockwise-barlow", "resnet18", 1 / 16
HEAD = {"expansion": 8, "projector": [16, 16]}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    train(tiny_cfg(out, rule=RULE, encoder=ENCODER, width=WIDTH, rule_options=HEAD, max_steps=2))
    return out


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported")
    assert main(["export", str(run), "--out", str(out)]) == 0
    return out


def _images(n=3, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_load_encoder_is_frozen_with_its_preprocessing_stated(run):
    enc = localssl.load_encoder(run)
    assert not enc.training and all(not m.training for m in enc.modules())
    assert all(not p.requires_grad for p in enc.parameters())
    spec = dataset_spec("shapes10")
    assert enc.preprocessing == Preprocessing(image_size=spec.image_size, channels=3, mean=tuple(spec.mean),
                                              std=tuple(spec.std))
    assert "/ 255" in enc.preprocessing.steps
    x = enc.preprocessing(_images())
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32
    outs = enc(x)  # every block's output, as BlockEncoder gives
    assert len(outs) == 4 and not outs[-1].requires_grad
    pooled = enc.pooled(x)
    assert pooled.shape == (3, outs[-1].shape[1])
    torch.testing.assert_close(pooled, outs[-1].mean(dim=(2, 3)))
    # The weights are the run's last checkpoint's, not a fresh init.
    state = load_checkpoint(run / CHECKPOINT)["encoder"]
    for k, v in enc.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_load_encoder_trainable_gets_gradients(run):
    enc = localssl.load_encoder(run, trainable=True)
    assert enc.training and all(p.requires_grad for p in enc.parameters())
    enc.pooled(enc.preprocessing(_images())).sum().backward()
    assert all(p.grad is not None for p in enc.parameters())


def test_export_holds_the_backbone_alone_and_its_description(run, exported):
    from safetensors.torch import load_file

    tensors = load_file(exported / "encoder.safetensors")
    enc = localssl.load_encoder(run)
    assert set(tensors) == set(enc.state_dict())  # no rule heads, no optimizer state
    meta = json.loads((exported / EXPORT_JSON).read_text())
    ckpt = load_checkpoint(run / CHECKPOINT)
    assert meta["encoder"] == ENCODER and meta["width"] == WIDTH and meta["in_channels"] == 3
    assert meta["encoder_options"] == ckpt["config"]["encoder_options"]  # resolved: the stem auto chose
    assert meta["encoder_options"]["stem"] == "cifar"
    assert meta["image_size"] == 32 and meta["mean"] == list(enc.preprocessing.mean)
    assert meta["block_shapes"] == [list(s) for s in enc.feature_shapes((3, 32, 32))]
    assert meta["pooled_features"] == meta["block_shapes"][-1][0]
    assert meta["rule"] == RULE and meta["step"] == 2 and meta["localssl_version"] == localssl.__version__
    import hashlib

    assert meta["checkpoint_sha256"] == hashlib.sha256((run / CHECKPOINT).read_bytes()).hexdigest()
    assert meta["weights"]["sha256"] == hashlib.sha256((exported / "encoder.safetensors").read_bytes()).hexdigest()
    assert not [p.name for p in exported.iterdir() if p.name.startswith(".")]  # no temp files left


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_round_trip_gives_the_same_outputs(run, tmp_path, fmt):
    out = tmp_path / fmt
    assert main(["export", str(run), "--format", fmt, "--out", str(out)]) == 0
    assert (out / ("encoder." + ("safetensors" if fmt == "safetensors" else "pt"))).is_file()
    a, b = localssl.load_encoder(run), localssl.load_exported(out)
    assert b.preprocessing == a.preprocessing and not b.training
    assert all(not p.requires_grad for p in b.parameters())
    x = a.preprocessing(_images(seed=1))
    for ya, yb in zip(a(x), b(x)):
        assert torch.equal(ya, yb)
    assert localssl.load_exported(out, trainable=True).training


def _tampered(exported, tmp_path, **changes):
    folder = tmp_path / "tampered"
    shutil.copytree(exported, folder)
    meta = json.loads((folder / EXPORT_JSON).read_text())
    meta.update(changes)
    (folder / EXPORT_JSON).write_text(json.dumps(meta))
    return folder


def test_a_json_that_does_not_match_the_weights_names_the_key(exported, tmp_path):
    folder = _tampered(exported, tmp_path, width=1 / 8)  # twice the channels of the stored tensors
    with pytest.raises(CheckpointError, match=r"does not match encoder\.json: 'blocks\.0\.stem\.0\.weight' has "
                                              r"shape \(4, 3, 3, 3\) in the file but \(8, 3, 3, 3\)"):
        load_exported(folder)


def test_a_json_whose_block_shapes_are_wrong_names_the_key(exported, tmp_path):
    meta = json.loads((exported / EXPORT_JSON).read_text())
    shapes = meta["block_shapes"]
    shapes[2][0] += 1
    with pytest.raises(ExportError, match=r"key 'block_shapes' says block 3 outputs"):
        load_exported(_tampered(exported, tmp_path, block_shapes=shapes))


@pytest.mark.parametrize("changes,message", [
    ({"in_channels": "three"}, r"key 'in_channels' must be an integer"),
    ({"format": "something-else"}, r"is not a localssl encoder export"),
    ({"schema": 99}, r"key 'schema' is 99"),
    ({"mean": [0.5]}, r"mean \[0\.5\] and std .* one value per channel"),
    ({"encoder": "resnet1000"}, r"encoder\.json: .*resnet1000"),
])
def test_a_damaged_json_is_one_error_naming_it(exported, tmp_path, changes, message):
    with pytest.raises(ExportError, match=message):
        load_exported(_tampered(exported, tmp_path, **changes))


def test_weights_that_are_not_the_json_s_are_refused(exported, tmp_path):
    folder = _tampered(exported, tmp_path)
    data = bytearray((folder / "encoder.safetensors").read_bytes())
    data[-1] ^= 0xFF  # one weight's last byte
    (folder / "encoder.safetensors").write_bytes(bytes(data))
    with pytest.raises(ExportError, match=r"encoder\.safetensors is not the file encoder\.json describes"):
        load_exported(folder)
    with pytest.raises(ExportError, match=r"key 'weights.file' must name a file beside it"):
        load_exported(_tampered(exported, tmp_path / "b", weights={"file": "../x", "format": "pt", "sha256": "0"}))


def test_export_of_a_folder_without_a_run_is_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"no checkpoint at {tmp_path / CHECKPOINT}" in err and len(err.strip().splitlines()) == 1


def test_import_localssl_stays_light():
    """`import localssl` loads no torch: `load_encoder` and `load_exported` are imported on first use."""
    import subprocess
    import sys

    code = ("import sys, localssl; assert 'torch' not in sys.modules, 'torch imported'; "
            "assert callable(localssl.load_encoder) and callable(localssl.load_exported); print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
