"""Bad input and a failing machine give one line naming the file/key/value and a non-zero exit, not a traceback;
nothing a run already wrote is lost."""
from __future__ import annotations

import builtins
import errno
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from localssl.cli import main
from localssl.config import ConfigError, TrainConfig, save_yaml
from localssl.engine import checkpoint as checkpoint_mod
from localssl.engine import trainer as trainer_mod
from localssl.engine.checkpoint import CHECKPOINT, load_checkpoint
from localssl.engine.trainer import train

TINY = ["--dataset", "shapes10", "--width", "0.0625", "--subset", "64", "--batch-size", "16", "--amp", "off",
        "--no-progress", "--seed", "1"]


def tiny_cfg(out, **kw) -> TrainConfig:
    base = dict(rule="clapp++", dataset="shapes10", width=1 / 16, subset=64, batch_size=16, max_steps=1, amp="off",
                progress=False, checkpoint_every=3, log_every=1, out=str(out), seed=1)
    base.update(kw)
    return TrainConfig(**base)


def one_line_error(capsys, rc: int, expected_rc: int = 2) -> str:
    err = capsys.readouterr().err
    assert rc == expected_rc, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def read_only(monkeypatch, folder: Path) -> None:
    """Every write under ``folder`` fails as on a read-only mount (EROFS), whoever runs the test (root ignores
    permission bits, so chmod alone would not do)."""
    folder = folder.absolute()

    def inside(p) -> bool:
        return isinstance(p, (str, os.PathLike)) and Path(os.fspath(p)).absolute().is_relative_to(folder)

    def denied(p):
        return OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(p))

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def open_(file, mode="r", *a, **kw):
        if inside(file) and any(c in mode for c in "wax+"):
            raise denied(file)
        return real_open(file, mode, *a, **kw)

    def os_open(path, flags, *a, **kw):
        if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise denied(path)
        return real_os_open(path, flags, *a, **kw)

    def mkdir(path, *a, **kw):
        if inside(path):
            raise denied(path)
        return real_mkdir(path, *a, **kw)

    for mod, name, fn in ((builtins, "open", open_), (io, "open", open_), (os, "open", os_open),
                          (os, "mkdir", mkdir)):
        monkeypatch.setattr(mod, name, fn)


def test_an_out_that_cannot_hold_a_run_is_one_line(tmp_path, capsys, monkeypatch):
    """A read-only --out (existing or to be created), an existing file, /dev/null, a path under a file."""
    ro = tmp_path / "ro"
    ro.mkdir()
    (tmp_path / "afile").write_text("mine")
    read_only(monkeypatch, ro)
    cases = [(ro, f"--out {ro}: cannot create or write the run folder (Read-only file system: {ro}/.localssl.lock)"),
             (ro / "run", f"--out {ro / 'run'}: cannot create or write the run folder (Read-only file system"),
             (tmp_path / "afile", f"--out {tmp_path / 'afile'} is a file, not a folder"),
             (Path("/dev/null"), "--out /dev/null is a device or other special file, not a folder"),
             (tmp_path / "afile" / "run", f"--out {tmp_path / 'afile' / 'run'}: cannot create or write the run "
                                          "folder (Not a directory")]
    for out, message in cases:
        err = one_line_error(capsys, main(["train", *TINY, "--max-steps", "1", "--out", str(out)]))
        assert message in err
    assert (tmp_path / "afile").read_text() == "mine"
    assert list(ro.iterdir()) == []


def _image_tree(root: Path, n_per_class: int = 16, seed: int = 0, size: int = 32) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k in range(2):
        (root / "train" / f"c{k}").mkdir(parents=True)
        for i in range(n_per_class):
            img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / "train" / f"c{k}" / f"{i:02d}.png")
    return root


def test_a_read_only_cache_is_one_line_naming_it(tmp_path, capsys, monkeypatch):
    data = _image_tree(tmp_path / "imgs")
    cache = tmp_path / "ro" / "cache"
    cache.parent.mkdir()
    monkeypatch.setenv("LOCALSSL_CACHE", str(cache))
    read_only(monkeypatch, cache.parent)
    rc = main(["train", "--dataset", "imagefolder", "--data-dir", str(data), "--width", "0.0625", "--batch-size",
               "16", "--amp", "off", "--no-progress", "--max-steps", "1", "--out", str(tmp_path / "run")])
    err = one_line_error(capsys, rc)
    assert f"cannot load imagefolder: {cache}" in err and "Read-only file system" in err
    assert f"the decode cache {cache} must be writable (set LOCALSSL_CACHE" in err


def test_a_full_disk_during_a_checkpoint_keeps_the_last_one_and_removes_the_temp_file(tmp_path, capsys,
                                                                                        monkeypatch):
    """The checkpoint of step 6 meets ENOSPC half-written: step 3's survives, the message says where, the
    partial temp file is gone, and the run resumes from it."""
    run = tmp_path / "run"
    real_save, calls = torch.save, []

    def full_disk(obj, fh, *a, **kw):
        if isinstance(obj, dict) and "optimizer" in obj:
            calls.append(obj["step"])
            if obj["step"] == 6:
                fh.write(b"half a checkpoint")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, fh, *a, **kw)

    monkeypatch.setattr(checkpoint_mod.torch, "save", full_disk)
    rc = main(["train", *TINY, "--checkpoint-every", "3", "--max-steps", "8", "--out", str(run)])
    err = one_line_error(capsys, rc, expected_rc=1)
    assert calls == [3, 6]
    assert (f"the checkpoint of step 6 could not be written to {run / CHECKPOINT} (No space left on device); the "
            f"last good checkpoint, of step 3, is kept at {run / CHECKPOINT}, and the partial file was removed") in err
    assert f"localssl train --resume --out {run}" in err
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name]
    assert load_checkpoint(run / CHECKPOINT)["step"] == 3
    monkeypatch.setattr(checkpoint_mod.torch, "save", real_save)
    assert main(["train", "--resume", "--out", str(run)]) == 0
    assert load_checkpoint(run / CHECKPOINT)["step"] == 8


@pytest.mark.parametrize("flags, message", [
    (["--threads", "-1"], "threads must be >= 1 (or unset for torch's default), got -1"),
    (["--threads", "0"], "threads must be >= 1 (or unset for torch's default), got 0"),
    (["--device", "tpu"], "unknown device 'tpu'; valid: auto, cpu, cuda, cuda:N, mps"),
    (["--device", "cuda"], "device 'cuda' asked for, but CUDA is not available here; valid here: auto, cpu"),
    (["--device", "mps"], "device 'mps' asked for, but MPS (Apple GPU) is not available here"),
])
def test_threads_and_device_are_checked_before_any_data_is_loaded(tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(trainer_mod, "load_dataset", lambda *a, **kw: pytest.fail("data loaded before the check"))
    err = one_line_error(capsys, main(["train", *TINY, *flags, "--max-steps", "1", "--out", str(tmp_path / "r")]))
    assert message in err
    assert not (tmp_path / "r").exists()


def _tamper(run: Path, **config) -> None:
    """Change the checkpoint's config (and config.yaml, so that a resume asks for the same): the tensors stay."""
    state = load_checkpoint(run / CHECKPOINT)
    state["config"].update(config)
    torch.save(state, run / CHECKPOINT)
    save_yaml(TrainConfig(**state["config"]), run / "config.yaml")


def test_tensors_that_do_not_match_their_config_name_the_checkpoint_key_and_shapes(tmp_path, capsys):
    run = train(tiny_cfg(tmp_path / "run"))
    _tamper(run, width=0.125)  # 16 channels in block 1 where the tensors have 8
    message = (f"{run / CHECKPOINT}: entry 'encoder' does not match the checkpoint's config: 'blocks.0.0.weight' has "
               "shape (8, 3, 3, 3) in the file but (16, 3, 3, 3) in the encoder built from the config")
    before = (run / CHECKPOINT).read_bytes()
    assert message in one_line_error(capsys, main(["train", "--resume", "--out", str(run), "--max-steps", "2"]))
    assert message in one_line_error(capsys, main(["probe", str(run), "--train-subset", "20", "--test-subset", "20"]))
    assert (run / CHECKPOINT).read_bytes() == before


@pytest.mark.parametrize("entry", ["config", "step"])
def test_a_checkpoint_without_its_config_or_step_names_the_file_and_the_entry(tmp_path, capsys, entry):
    run = train(tiny_cfg(tmp_path / "run"))
    state = load_checkpoint(run / CHECKPOINT)
    del state[entry]
    torch.save(state, run / CHECKPOINT)
    message = f"{run / CHECKPOINT} is not a complete localssl checkpoint: it has no '{entry}' entry"
    assert message in one_line_error(capsys, main(["train", "--resume", "--out", str(run), "--max-steps", "2"]))
    if entry == "config":  # a probe needs no step
        assert message in one_line_error(capsys, main(["probe", str(run), "--train-subset", "20"]))


def test_resume_compares_the_data_not_the_folder_it_was_read_from(tmp_path):
    """Moved to another folder, the same images resume; other images (same count, or fewer) are refused, naming
    what differs."""
    first = _image_tree(tmp_path / "first")
    cfg = tiny_cfg(tmp_path / "run", dataset="imagefolder", data_dir=str(first), subset=None)
    run = train(cfg)
    moved = tmp_path / "elsewhere" / "same"
    moved.parent.mkdir()
    shutil.move(first, moved)
    train(tiny_cfg(tmp_path / "run", dataset="imagefolder", data_dir=str(moved), subset=None, max_steps=2),
          resume=True)
    assert load_checkpoint(run / CHECKPOINT)["step"] == 2
    other = _image_tree(tmp_path / "other", seed=1)
    with pytest.raises(ConfigError, match=rf"cannot resume: --data-dir {other} does not hold the data "
                                          rf"{run / CHECKPOINT} was trained on: fingerprint: run has '[0-9a-f]+', "
                                          r"here '[0-9a-f]+' \(as many images of the same size, but other pixels"):
        train(tiny_cfg(tmp_path / "run", dataset="imagefolder", data_dir=str(other), subset=None, max_steps=3),
              resume=True)
    fewer = _image_tree(tmp_path / "fewer", n_per_class=15)
    with pytest.raises(ConfigError, match=r"images: run has 32, here 30; fingerprint"):
        train(tiny_cfg(tmp_path / "run", dataset="imagefolder", data_dir=str(fewer), subset=None, max_steps=3),
              resume=True)
    assert load_checkpoint(run / CHECKPOINT)["step"] == 2
