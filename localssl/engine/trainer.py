"""The training loop: one loop for local and end-to-end rules.

For every batch, each group of blocks declared by the rule (one block per
group for local rules, one group of every block for BP) runs forward on the
*detached* output of the previous group, computes its own loss, runs backward
and its autograd graph is freed before the next group starts. Peak activation
memory is therefore one group's, not the whole network's. (Summing all local
losses and calling backward once, as the reference code does, gives the same
gradients but keeps every layer's graph alive; ``tests/test_rules.py`` checks
that both give equal updates.)

One AdamW (METHODS 2.4: lr 2e-4, wd 0) steps every group's parameters once,
at the end of the step. That is exactly the update of one optimizer per group
stepped right after its group's backward: AdamW is element-wise, and no group
reads a parameter that another group updates within the step (group k+1's
input was computed before any update). One step is one fused kernel and one
Python call per training step instead of one per group, which is a visible
share of a small local step on a CPU (``localssl bench``). ``--optimizer lars``
swaps in LARS (blockwise SSL's optimizer, METHODS 5.1), the same way.

Before every step the loop sets the lr to ``lr_at(step, ...)``
(`localssl.engine.optim`): a function of the step alone, so a resumed run
takes the lr an uninterrupted one would, with no scheduler state.
"""
from __future__ import annotations

import json
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from localssl.atomic import atomic_file
from localssl.builder import build_model, build_optimizer, build_step, build_views, resolve
from localssl.config import (
    ConfigError,
    TrainConfig,
    check_normalization,
    save_yaml,
    shown,
    to_dict,
    validate_train,
)
from localssl.config import replace as replace_config
from localssl.data import dataset_spec, load_dataset
from localssl.data.augment import ViewBatch
from localssl.data.cache import default_cache_dir
from localssl.data.draws import ImageDraws
from localssl.engine.checkpoint import (
    CHECKPOINT,
    ENCODER,
    CheckpointError,
    checkpoint_config,
    load_checkpoint,
    load_weights,
    rng_state,
    save_atomic,
    set_rng_state,
)
from localssl.engine.dataid import check_same_data, data_identity
from localssl.engine.distributed import Parallel, rank_device, start_parallel
from localssl.engine.metrics import MetricLog
from localssl.engine.optim import lr_at, set_lr
from localssl.engine.rundir import prepare_run_folder
from localssl.engine.runtime import (
    environment_info,
    resolve_amp,
    resolve_device,
    retain_freed_memory,
    seed_everything,
    set_deterministic,
)
from localssl.engine.step import NonFiniteLossError, batch_coupling_modules, some_names, train_step
from localssl.models import resolve_encoder_options
from localssl.rules import resolve_rule_options


class NonFiniteWeightsError(NonFiniteLossError):
    """The weights became NaN/inf (an update overflowed, the losses were finite); they are not checkpointed."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint (or the final weights) could not be written, e.g. a full disk; the run stops there.

    The file it would have replaced is untouched (writes are atomic) and the
    message says which step it holds and where.
    """


class TrainingInterrupted(RuntimeError):
    """SIGTERM or SIGINT stopped the run after a finished step, with a checkpoint of that step.

    ``returncode`` is the shell's code for death by that signal (128 + signal
    number), so a scheduler still sees that the run did not finish.
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.returncode = 128 + signum


# Options that may change when a run is resumed; anything else must match.
# micro_batch changes memory and time, not the gradient. data_dir may change
# too when the checkpoint records its data's identity (`data_identity`): the
# data, not the folder it was read from, is then what must match.
RESUMABLE_CHANGES = {"epochs", "max_steps", "micro_batch", "progress", "checkpoint_every", "log_every", "device",
                     "threads", "retain_freed_memory", "out", "pipeline", "stages", "dist_timeout"}
# Options whose default depends on the data; a run saves them resolved, and
# leaving one unset on resume means "the run's".
RESOLVED_AT_START = ("grids", "mean", "std", "encoder_options", "rule_options")


def resume_config(cfg: TrainConfig, saved: TrainConfig,
                  data_recorded: bool = True) -> tuple[TrainConfig, dict[str, tuple[Any, Any]]]:
    """``cfg`` as a resume of the run saved as ``saved`` reads it, and what differs between them.

    What ``cfg`` leaves unset of `RESOLVED_AT_START` is the run's; options it
    gives complete the run's saved ones. The difference maps every other
    option that is not a `RESUMABLE_CHANGES` to ``(run's value, asked
    value)``: a resume with any is refused. ``data_recorded``: the checkpoint
    holds its data's identity, so the data, not its folder, must match.
    """
    saved_d = to_dict(saved)
    if saved.rule_options:
        # A run of an earlier version lacks the rule options added since (e.g. CLAPP++'s b_rank): it trained
        # with their defaults, which by the rules' contract are the earlier behaviour, so it compares as that.
        saved_d["rule_options"] = resolve_rule_options(saved.rule, saved.rule_options)
    cfg = replace_config(cfg, **{k: saved_d[k] for k in RESOLVED_AT_START
                                 if getattr(cfg, k) is None and saved_d.get(k) is not None})
    if cfg.encoder == saved.encoder and cfg.encoder_options and saved.encoder_options:
        # Options asked for (by a config file, or --encoder-opt) complete the run's saved ones, and
        # compare as the typed values the run saved ("true" from the command line is True).
        cfg = replace_config(cfg, encoder_options=resolve_encoder_options(
            cfg.encoder, {**saved.encoder_options, **cfg.encoder_options}, None))
    if cfg.rule == saved.rule and cfg.rule_options and saved.rule_options:
        cfg = replace_config(cfg, rule_options=resolve_rule_options(
            cfg.rule, {**saved.rule_options, **cfg.rule_options}))
    # With the data's identity recorded, the data itself is compared once loaded, not its path.
    may_change = RESUMABLE_CHANGES | ({"data_dir"} if data_recorded else set())
    diff = {k: (saved_d[k], v) for k, v in to_dict(cfg).items() if k not in may_change and saved_d.get(k) != v}
    return cfg, diff


def _load_images(cfg: TrainConfig):
    """The pre-training images and their spec, with size, channels and normalisation as trained on."""
    spec = dataset_spec(cfg.dataset)
    # max_items decodes only the (class-balanced, fixed) subset on a first load;
    # resize happens in that one decode too.
    try:
        data = load_dataset(cfg.dataset, cfg.data_dir, spec.pretrain_split, download=cfg.download,
                            max_items=cfg.subset, resize=cfg.resize)
    except OSError as e:  # a read-only or full cache, an unreadable file: one line naming the path
        if isinstance(e, FileNotFoundError):
            raise  # the loaders' own message says which data set and where it looked
        hint = ""
        if e.filename is not None:
            failed, cache = Path(e.filename).absolute(), default_cache_dir().absolute()
            if failed.is_relative_to(cache) or cache.is_relative_to(failed):
                hint = f"; the decode cache {cache} must be writable (set LOCALSSL_CACHE to a writable folder)"
        where = e.filename or cfg.data_dir or "its source"
        raise ConfigError(f"cannot load {cfg.dataset}: {where}: {e.strerror or e}{hint}") from None
    # Size and channels from the images (imagefolder: also its own mean/std, from the cache).
    spec = spec.resolved(data)
    if cfg.mean is not None and cfg.std is not None:
        check_normalization(cfg.mean, cfg.std, spec.channels)
        spec = replace(spec, mean=tuple(cfg.mean), std=tuple(cfg.std))
    return spec, data


class _Batches:
    """Epoch-wise random batches of uint8 images, reproducible from (seed, epoch).

    The permutation of an epoch depends only on the seed and the epoch, so a
    resumed run picks up mid-epoch at exactly the batch it stopped before.
    """

    def __init__(self, images: np.ndarray, batch_size: int, seed: int, device: torch.device) -> None:
        self.n = len(images)
        self.batch_size = batch_size
        self.seed = seed
        self.device = device
        self._perm: tuple[int, torch.Tensor] | None = None
        # Small data sets live on the device as uint8 (airbench); large ones
        # stay memory-mapped and are gathered per batch.
        if images.nbytes <= 4 * 2**30:
            self.images = torch.from_numpy(np.array(images, copy=True)).to(device)  # writable copy
            self.memmap = None
        else:
            self.images, self.memmap = None, images

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.batch_size

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return self._perm[1]

    def indices(self, epoch: int, i: int) -> torch.Tensor:
        """Data set indices of batch ``i`` of ``epoch`` (a rank takes its slice of them)."""
        return self.permutation(epoch)[i * self.batch_size : (i + 1) * self.batch_size]

    def batch(self, epoch: int, i: int) -> torch.Tensor:
        return self.gather(self.indices(epoch, i))

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        """The uint8 images of data set indices ``idx``, in that order, on the device."""
        if self.images is not None:
            return self.images[idx.to(self.device)]
        order = np.argsort(idx.numpy())  # sorted reads are much faster on a memmap
        rows = self.memmap[idx.numpy()[order]]
        # Back in idx's order: row k is image idx[k], whose views are drawn from its index.
        return torch.from_numpy(rows[np.argsort(order)]).to(self.device)


def _restore(entry: Any, load: Any, path: Path, name: str) -> None:
    """``load(entry)``, its failure (an entry of another shape or layout) a `CheckpointError` naming it."""
    try:
        load(entry)
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{path}: entry {name!r} does not fit this run ({type(e).__name__}: {first[:200]})"
                              ) from None


def _nonfinite_parameters(*modules: nn.Module) -> list[str]:
    """Names of the parameters and buffers holding a NaN or inf (one device sync per tensor)."""
    return [name for m in modules for name, t in (*m.named_parameters(), *m.named_buffers())
            if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Pre-train an encoder with ``cfg.rule``; returns the run folder.

    The run holds an exclusive lock on ``cfg.out`` from before it writes
    anything until it returns (`localssl.engine.rundir`); a new run needs an
    empty or new folder. ``cfg.max_steps``, when set, is the run's length in
    steps and ``cfg.epochs`` is then unused. SIGTERM and SIGINT stop the run
    after the step in progress, with a checkpoint of it (`TrainingInterrupted`).
    """
    validate_train(cfg)
    # Under torchrun: the process group first (`localssl.engine.distributed`); rank 0 alone owns the folder.
    par = start_parallel(cfg.pipeline, cfg.stages, cfg.dist_timeout, cfg.batch_size,
                         rank_device(resolve_device(cfg.device)))
    try:
        lock = prepare_run_folder(cfg.out, resume) if par.is_writer else None
        try:
            par.barrier("waiting for rank 0 to prepare the run folder")
            return _train(cfg, resume, Path(cfg.out), par)
        finally:
            if lock is not None:
                lock.release()
    except BaseException as e:
        par.failed(e)  # the other ranks' error names this one and why
        raise
    finally:
        par.close()


def _views(augment: nn.Module, x: torch.Tensor, draws: ImageDraws, par: Parallel) -> ViewBatch:
    """The batch's views, each image's from (seed, epoch, its index) where the view maker can draw so."""
    if getattr(augment, "per_image_draws", False):
        return augment.batch(x, draws)
    if par.world > 1:
        raise ConfigError(f"view maker {type(augment).__name__} draws from the global RNG, so its views would "
                          "depend on the number of ranks: it cannot train on several processes")
    return augment.batch(x)


def _train(cfg: TrainConfig, resume: bool, out: Path, par: Parallel) -> Path:
    ckpt_path = out / CHECKPOINT
    state, saved = None, {}
    if resume:
        state = load_checkpoint(ckpt_path, require=("encoder", "rule", "step", "rng", "config"))
        if "optimizer" not in state:
            raise ConfigError(
                f"{ckpt_path} holds no 'optimizer' entry (written by an earlier localssl, which kept one optimizer "
                "per group); it cannot be resumed by this version: its weights still load for `localssl probe`"
            )
        # Through TrainConfig (checkpoint_config): an earlier version's rule options are top-level keys.
        saved_cfg = checkpoint_config(state, ckpt_path)
        saved = to_dict(saved_cfg)
        cfg, diff = resume_config(cfg, saved_cfg, data_recorded="data" in state)
        if diff:
            raise ConfigError(
                "cannot resume with a different config: "
                + "; ".join(f"{k}: run has {shown(a)}, asked {shown(b)}" for k, (a, b) in diff.items())
                + (" (this checkpoint records no fingerprint of its data, so only its --data-dir can be checked)"
                   if "data_dir" in diff else "")
            )

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    if cfg.retain_freed_memory:
        retain_freed_memory()
    set_deterministic(cfg.deterministic)
    seed_everything(cfg.seed)
    device = rank_device(resolve_device(cfg.device))
    amp_dtype = resolve_amp(cfg.amp, device)

    spec, data = _load_images(cfg)
    identity = data_identity(data)
    if state is not None and "data" in state:
        check_same_data(state["data"], identity, ckpt_path, cfg.data_dir)
    # The run's config as used: grids fitted to this input size, the normalisation of
    # these images, the encoder's options with their size-dependent choices made (ResNet's
    # stem); probe and align read them back from config.yaml / the checkpoint.
    cfg = resolve(cfg, spec.channels, spec.image_size, spec.mean, spec.std)
    model = build_model(cfg, spec.channels, spec.image_size)
    encoder, rule = model.encoder, model.rule
    mf = torch.channels_last if cfg.channels_last else torch.contiguous_format
    coupled = batch_coupling_modules(encoder) if cfg.micro_batch is not None else []
    if coupled:  # train_step would refuse it too; say so before any data is touched
        raise ConfigError(f"micro_batch needs an encoder without BatchNorm; {cfg.encoder} has {some_names(coupled)}")
    encoder.to(device, memory_format=mf)
    rule.to(device)
    optimizer = build_optimizer(encoder, rule, cfg.lr, cfg.weight_decay, cfg.optimizer, cfg.momentum)
    if state is not None:  # before anything in the folder is rewritten: a checkpoint that does not fit is refused
        load_weights(encoder, state["encoder"], ckpt_path, "encoder")
        load_weights(rule, state["rule"], ckpt_path, "rule")
        _restore(state["optimizer"], optimizer.load_state_dict, ckpt_path, "optimizer")
    augment = build_views(cfg, spec.image_size, spec.mean, spec.std, spec.crop_scale, device, rule)
    batches = _Batches(data.images, cfg.batch_size, cfg.seed, device)
    if batches.steps_per_epoch == 0:
        raise ConfigError(f"{len(data)} images make no batch of {cfg.batch_size}")
    # Every rank the same weights (data-parallel); the stages' split (pipeline, measured on the first batch).
    par.start(encoder, rule, lambda: _views(augment, batches.batch(0, 0), ImageDraws(cfg.seed, 0, 0,
                                                                                     batches.indices(0, 0)), par))
    # --max-steps overrides --epochs (it may end mid-epoch, or run past epochs * steps per epoch).
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * batches.steps_per_epoch
    step_fn = par.step(build_step(cfg, rule, total))
    if state is not None and cfg.lr_schedule == "cosine":
        # The cosine's lr at every step depends on the run's length: another length would give the steps
        # still to run the lr of a run that never took the steps already taken.
        run_total = saved["max_steps"] if saved["max_steps"] is not None else saved["epochs"] * batches.steps_per_epoch
        if run_total != total:
            raise ConfigError(
                f"cannot resume lr_schedule cosine with another run length: the run is {run_total} steps, asked "
                f"{total}; resume with --max-steps {run_total} (a cosine run cannot be lengthened: start a new one)"
            )
    if state is not None and int(state["step"]) >= total:
        # Refused before anything in the folder is rewritten: the command asked for training and would do none.
        length = (f"--max-steps {cfg.max_steps}" if cfg.max_steps is not None
                  else f"--epochs {cfg.epochs} ({batches.steps_per_epoch} steps each)")
        raise ConfigError(
            f"nothing to train: {ckpt_path} is at step {int(state['step'])} and {length} ends the run at step "
            f"{total}; pass a larger --epochs or --max-steps (--epochs alone drops the run's --max-steps)"
        )
    if par.is_writer:
        save_yaml(cfg, out / "config.yaml")

    step = 0
    if state is not None:
        _restore(state["rng"], set_rng_state, ckpt_path, "rng")
        step = int(state["step"])
    log = MetricLog(out, resume_step=step if state is not None else None) if par.is_writer else None
    env = environment_info(device)
    last_good = [step] if state is not None else []  # the step the checkpoint on disk holds

    def write(obj: Any, path: Path, what: str) -> None:
        """`save_atomic` on rank 0, whose failure (a full disk) stops the run naming what is kept."""
        if not par.is_writer:
            return
        try:
            save_atomic(obj, path)
        except OSError as e:
            if path != ckpt_path:  # the final weights: the checkpoint just written holds them too
                kept = f"the checkpoint at {ckpt_path} holds the same weights (`localssl probe` reads it)"
                then = ""
            elif last_good:
                kept = f"the last good checkpoint, of step {last_good[-1]}, is kept at {ckpt_path}"
                then = f" Free some space, then continue with: localssl train --resume --out {out}"
            else:
                kept, then = "no checkpoint of this run was written before", " Free some space and start again."
            raise CheckpointWriteError(
                f"{what} of step {step} could not be written to {path} ({e.strerror or e}); {kept}, and the "
                f"partial file was removed.{then}"
            ) from None

    def checkpoint() -> dict[str, Any]:
        # Losses can be finite while the update overflowed (a huge lr): check the weights themselves
        # before they replace the last good checkpoint. Only here and at the end, as it costs a sync per tensor.
        bad = _nonfinite_parameters(encoder, rule)
        if bad:
            raise NonFiniteWeightsError(
                f"after step {step} the weights are not finite ({', '.join(bad[:3])}"
                f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''}) although the losses were: an update "
                f"overflowed; stopped without saving them. The last good checkpoint is kept at "
                f"{ckpt_path if ckpt_path.exists() else '(none written yet)'}; lower --lr or change --amp."
            )
        entries = par.state(encoder, rule, optimizer)  # a pipeline's stages, gathered on rank 0
        write(
            {
                **entries,
                "step": step,
                "epoch": step // batches.steps_per_epoch,
                "rng": rng_state(),
                "config": to_dict(cfg),
                "env": env,
                "data": identity,
            },
            ckpt_path,
            "the checkpoint",
        )
        last_good.append(step)
        return entries

    encoder.train()
    bar = tqdm(total=total, initial=step, disable=not cfg.progress, desc=f"{cfg.rule}", dynamic_ncols=True)
    window_t, window_imgs, last_loss = time.perf_counter(), 0, float("nan")
    t_start, imgs_total = time.perf_counter(), 0
    stop: list[int] = []  # the signal that asked to stop, if any

    def on_signal(signum: int, frame: object) -> None:
        if stop and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        stop.append(signum)

    # A cluster pre-empts with SIGTERM, a user with Ctrl-C: both finish the step and checkpoint it.
    # Handlers can only be set from the main thread (elsewhere the defaults stay), and a signal the
    # process was started to ignore (`nohup`, `cmd &` for SIGINT) stays ignored.
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)
                    if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        while step < total and not par.any(bool(stop)):  # every rank stops after the same step
            epoch, i = divmod(step, batches.steps_per_epoch)
            index = par.shard(batches.indices(epoch, i))  # this rank's images of the global batch
            x = batches.gather(index) if par.reads_images else None
            views = _views(augment, x, ImageDraws(cfg.seed, epoch, i, index), par) if par.reads_images else None
            pos, span = step_fn.lr_span(step, total, len(rule.groups()))
            set_lr(optimizer, lr_at(pos, cfg.lr, span, cfg.lr_schedule, cfg.warmup_steps, cfg.min_lr))
            try:
                losses = step_fn(encoder, rule, optimizer, views, step, device=device, amp_dtype=amp_dtype)
            except NonFiniteLossError as e:
                raise NonFiniteLossError(
                    f"{e} in step {step + 1} (epoch {epoch + 1}); stopped. The last good checkpoint is kept at "
                    f"{ckpt_path if ckpt_path.exists() else '(none written yet)'}; lower --lr or change --amp."
                ) from None
            step += 1
            window_imgs += cfg.batch_size
            imgs_total += cfg.batch_size
            if step % cfg.log_every == 0 or step == total:
                losses = par.losses(losses)
                # A group that did not train this step (sequential schedule) logs null; lr: the one it stepped with.
                vals = {g: None if v is None else float(v) for g, v in enumerate(losses)}
                now = time.perf_counter()
                ips = window_imgs / max(now - window_t, 1e-9)
                window_t, window_imgs = now, 0
                last_loss = sum(v for v in vals.values() if v is not None)
                row = {"step": step, "epoch": step / batches.steps_per_epoch, "loss": last_loss,
                       **{f"loss_{g + 1}": v for g, v in vals.items()}, "lr": optimizer.param_groups[0]["lr"],
                       "images_per_s": ips, **step_fn.metrics()}
                if log is not None:
                    log.log(row)
                bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{ips:.0f}")
            bar.update(1)
            if step % cfg.checkpoint_every == 0 and step < total:
                checkpoint()
    finally:
        bar.close()
        for s, h in handlers.items():
            signal.signal(s, h)
    final = checkpoint()
    if step < total:  # a signal (here, or on another rank) stopped the run; during the last step: it is complete
        signum = stop[0] if stop else signal.SIGTERM
        name = signal.Signals(signum).name if stop else "a stop signal on another rank"
        raise TrainingInterrupted(
            f"{name} received: stopped after step {step} of {total}; checkpoint written to {ckpt_path}. "
            f"Continue with: localssl train --resume --out {out}", signum)
    write(final["encoder"], out / ENCODER, "the encoder's weights")
    if not par.is_writer:
        return out
    seconds = time.perf_counter() - t_start
    summary = {"steps": step, "images_seen_this_session": imgs_total, "seconds_this_session": seconds,
               "images_per_s": imgs_total / max(seconds, 1e-9), "final_loss": last_loss,
               "amp": str(amp_dtype), "device": str(device), "ranks": par.world, "env": env}
    with atomic_file(out / "summary.json", "w") as fh:
        fh.write(json.dumps(summary, indent=2))
    return out


__all__ = ["train", "train_step", "resume_config", "build_optimizer", "NonFiniteLossError", "NonFiniteWeightsError",
           "CheckpointWriteError", "TrainingInterrupted"]
