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
share of a small local step on a CPU (``localssl bench``).
"""
from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from localssl.atomic import atomic_file
from localssl.config import (
    ConfigError,
    TrainConfig,
    check_normalization,
    check_shapes,
    rule_options,
    save_yaml,
    shown,
    to_dict,
    validate_train,
)
from localssl.config import replace as replace_config
from localssl.data import dataset_spec, load_dataset
from localssl.data.augment import SimCLRViews
from localssl.data.cache import default_cache_dir
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
from localssl.engine.metrics import MetricLog
from localssl.engine.rundir import prepare_run_folder
from localssl.engine.runtime import (
    autocast,
    environment_info,
    resolve_amp,
    resolve_device,
    retain_freed_memory,
    seed_everything,
    set_deterministic,
)
from localssl.models import BlockEncoder, build_encoder, resolve_encoder_options
from localssl.rules import Rule, build_rule


class NonFiniteLossError(RuntimeError):
    """A loss became NaN/inf; the run stops and keeps its last good checkpoint."""


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
                     "threads", "retain_freed_memory", "out"}
# Options whose default depends on the data; a run saves them resolved, and
# leaving one unset on resume means "the run's".
RESOLVED_AT_START = ("grids", "mean", "std", "encoder_options")


def _fused_ok(params: list[torch.nn.Parameter]) -> bool:
    """Fused AdamW: one kernel over all tensors. On CPU it made CLAPP++'s step
    ~25% faster (its 12.6M-parameter B matrices at width 0.25); it needs
    floating-point parameters on CPU or CUDA."""
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def build_optimizer(encoder: BlockEncoder, rule: Rule, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """One AdamW over every trainable parameter: all blocks and the rule's own (B, heads)."""
    params = [p for p in encoder.parameters() if p.requires_grad]
    params += [p for g in range(len(rule.groups())) for p in rule.group_parameters(g)]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=_fused_ok(params))


def train_step(
    encoder: BlockEncoder,
    rule: Rule,
    optimizer: torch.optim.Optimizer | None,
    views: torch.Tensor,
    device: torch.device | None = None,
    amp_dtype: torch.dtype | None = None,
    micro_batch: int | None = None,
) -> list[torch.Tensor]:
    """One step on a batch of stacked views; returns every group's (detached) loss.

    With ``optimizer=None`` only the gradients are computed (they are left in
    ``.grad``), which is what gradient-alignment analysis and tests need.
    ``micro_batch`` (views per chunk) trades one more forward pass for
    activation memory: see `_micro_batched_step`; a chunk as large as the
    batch is the plain step.
    """
    if micro_batch is not None and micro_batch < views.shape[0]:
        return _micro_batched_step(encoder, rule, optimizer, views, device, amp_dtype, micro_batch)
    ctx = _amp(views, device, amp_dtype)
    top = None
    if rule.needs_top_context:
        # DFB context: the other view's top-layer output, with no gradient.
        with torch.no_grad(), ctx():
            top = encoder.run_blocks(views, range(len(encoder)))
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    losses = []
    h = views
    for g, blocks in enumerate(rule.groups()):
        # The cut between blocks: no gradient crosses it.
        h_in = h.detach()
        with ctx():
            out = encoder.run_blocks(h_in, blocks)
            loss = rule.loss(g, out, top)
        loss.backward()
        # Keep only the values; the graph of this group is freed here.
        h = out.detach()
        losses.append(loss.detach())
        del out, loss
    # One check (one device sync on a GPU) for all groups, before any update.
    _check_finite(losses, rule.groups())
    if optimizer is not None:
        optimizer.step()
    return losses


def _amp(views: torch.Tensor, device: torch.device | None, amp_dtype: torch.dtype | None):
    """A factory of the step's autocast context (a fresh one per ``with``)."""
    dev = device or views.device
    return lambda: autocast(dev, amp_dtype)


def _check_finite(losses: Sequence[torch.Tensor], groups: Sequence[Sequence[int]]) -> None:
    finite = torch.isfinite(torch.stack(losses))
    if not finite.all():
        g = int((~finite).nonzero()[0, 0])
        raise NonFiniteLossError(
            f"loss of group {g + 1} (blocks {[b + 1 for b in groups[g]]}) is {losses[g].item()}")


def _batch_coupling_modules(encoder: nn.Module) -> list[str]:
    """Modules whose output row depends on other rows in training mode (batch statistics)."""
    kinds = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)
    return [name for name, m in encoder.named_modules() if isinstance(m, kinds) and m.training]


def _some(names: Sequence[str], most: int = 3) -> str:
    """A few names of a list that may be long (a ResNet has 20 to 53 BatchNorms)."""
    rest = len(names) - most
    return ", ".join(names[:most]) + (f" and {rest} more" if rest > 0 else "")


def _micro_batched_step(
    encoder: BlockEncoder,
    rule: Rule,
    optimizer: torch.optim.Optimizer | None,
    views: torch.Tensor,
    device: torch.device | None,
    amp_dtype: torch.dtype | None,
    micro_batch: int,
) -> list[torch.Tensor]:
    """The step of `train_step`, holding the activations of one chunk of views at a time.

    A loss reads the whole batch (negatives and contexts are other rows), but
    only through each group's small representation z = represent(h) (the
    pooled map), and every block maps rows independently. So (METHODS 2.2b):
      1. no graph: every chunk through every block; keep each group's z
         (and the DFB context), never a full-batch activation;
      2. each group's loss on the whole batch of z: its backward gives the
         rule's own gradients (B) and dL/dz;
      3. every chunk again, block by block with a graph one chunk deep,
         back-propagating dL/dz[chunk] into the block's weights.
    The weight gradient is a sum over rows, so this equals the plain step's
    gradient up to float rounding (tests/test_rules.py checks it for every
    rule), at the cost of one more forward pass. Peak saved activations drop
    from one block at the full batch to one block at ``micro_batch`` views.
    The same holds for an end-to-end rule (its single group is the whole
    encoder): that is GradCache (Gao et al. 2021) for BP-InfoNCE.
    """
    coupled = _batch_coupling_modules(encoder)
    if coupled:
        raise ValueError(
            f"micro-batching needs blocks that map each row on its own; {_some(coupled)} use batch "
            "statistics (BatchNorm): set micro_batch to None or use an encoder without them"
        )
    ctx = _amp(views, device, amp_dtype)
    groups = rule.groups()
    chunks = views.split(micro_batch)
    # 1. Representations (and the DFB context) of the whole batch, chunk by chunk.
    reps: list[list[torch.Tensor]] = [[] for _ in groups]
    tops: list[torch.Tensor] = []
    with torch.no_grad(), ctx():
        for x in chunks:
            h = x
            for g, blocks in enumerate(groups):
                h = encoder.run_blocks(h, blocks)
                reps[g].append(rule.represent(g, h))
            if rule.needs_top_context:
                tops.append(rule.context(h))
    top = torch.cat(tops) if tops else None
    # 2. The losses on the whole batch: gradients of the rule's parameters and dL/dz.
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    losses, dz = [], []
    for g in range(len(groups)):
        z = torch.cat(reps[g]).requires_grad_()
        reps[g] = []
        with ctx():
            loss = rule.objective(g, z, top)
        loss.backward()
        dz.append(z.grad.split(micro_batch))
        losses.append(loss.detach())
    _check_finite(losses, groups)  # before the recomputation that a NaN would waste
    # 3. Each chunk again, block by block; no gradient crosses a group boundary.
    for c, x in enumerate(chunks):
        h = x
        for g, blocks in enumerate(groups):
            with ctx():
                out = encoder.run_blocks(h.detach(), blocks)
                z = rule.represent(g, out)
            z.backward(dz[g][c])
            h = out.detach()
            del out, z
    if optimizer is not None:
        optimizer.step()
    return losses


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

    def batch(self, epoch: int, i: int) -> torch.Tensor:
        idx = self.permutation(epoch)[i * self.batch_size : (i + 1) * self.batch_size]
        if self.images is not None:
            return self.images[idx.to(self.device)]
        idx_sorted = np.sort(idx.numpy())  # sorted reads are much faster on a memmap
        return torch.from_numpy(self.memmap[idx_sorted]).to(self.device)


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
    lock = prepare_run_folder(cfg.out, resume)
    try:
        return _train(cfg, resume, Path(cfg.out))
    finally:
        lock.release()


def _train(cfg: TrainConfig, resume: bool, out: Path) -> Path:
    ckpt_path = out / CHECKPOINT
    state = None
    if resume:
        state = load_checkpoint(ckpt_path, require=("encoder", "rule", "step", "rng", "config"))
        if "optimizer" not in state:
            raise ConfigError(
                f"{ckpt_path} holds no 'optimizer' entry (written by an earlier localssl, which kept one optimizer "
                "per group); it cannot be resumed by this version: its weights still load for `localssl probe`"
            )
        saved = to_dict(checkpoint_config(state, ckpt_path))
        cfg = replace_config(cfg, **{k: saved[k] for k in RESOLVED_AT_START
                                     if getattr(cfg, k) is None and saved.get(k) is not None})
        if cfg.encoder == saved.get("encoder") and cfg.encoder_options and saved.get("encoder_options"):
            # Options asked for (by a config file, or --encoder-opt) complete the run's saved ones, and
            # compare as the typed values the run saved ("true" from the command line is True).
            cfg = replace_config(cfg, encoder_options=resolve_encoder_options(
                cfg.encoder, {**saved["encoder_options"], **cfg.encoder_options}, None))
        # With the data's identity recorded, the data itself is compared once loaded, not its path.
        may_change = RESUMABLE_CHANGES | ({"data_dir"} if "data" in state else set())
        diff = {k: (saved[k], v) for k, v in to_dict(cfg).items() if k not in may_change and saved.get(k) != v}
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
    device = resolve_device(cfg.device)
    amp_dtype = resolve_amp(cfg.amp, device)

    spec, data = _load_images(cfg)
    identity = data_identity(data)
    if state is not None and "data" in state:
        check_same_data(state["data"], identity, ckpt_path, cfg.data_dir)
    # The run's config as used: grids fitted to this input size, the normalisation of
    # these images, the encoder's options with their size-dependent choices made (ResNet's
    # stem); probe and align read them back from config.yaml / the checkpoint.
    grids = check_shapes(cfg, spec.image_size, spec.channels)
    cfg = replace_config(cfg, grids=grids, mean=list(spec.mean), std=list(spec.std),
                         encoder_options=resolve_encoder_options(cfg.encoder, cfg.encoder_options, spec.image_size))
    encoder = build_encoder(cfg.encoder, cfg.width, spec.channels, cfg.encoder_options)
    shapes = encoder.feature_shapes((spec.channels, spec.image_size, spec.image_size))
    rule = build_rule(cfg.rule, shapes, rule_options(cfg))
    mf = torch.channels_last if cfg.channels_last else torch.contiguous_format
    coupled = _batch_coupling_modules(encoder) if cfg.micro_batch is not None else []
    if coupled:  # train_step would refuse it too; say so before any data is touched
        raise ConfigError(f"micro_batch needs an encoder without BatchNorm; {cfg.encoder} has {_some(coupled)}")
    encoder.to(device, memory_format=mf)
    rule.to(device)
    optimizer = build_optimizer(encoder, rule, cfg.lr, cfg.weight_decay)
    if state is not None:  # before anything in the folder is rewritten: a checkpoint that does not fit is refused
        load_weights(encoder, state["encoder"], ckpt_path, "encoder")
        load_weights(rule, state["rule"], ckpt_path, "rule")
        _restore(state["optimizer"], optimizer.load_state_dict, ckpt_path, "optimizer")
    crop = tuple(cfg.crop_scale) if cfg.crop_scale else spec.crop_scale
    augment = SimCLRViews(spec.image_size, spec.mean, spec.std, crop_scale=crop).to(device)
    batches = _Batches(data.images, cfg.batch_size, cfg.seed, device)
    if batches.steps_per_epoch == 0:
        raise ConfigError(f"{len(data)} images make no batch of {cfg.batch_size}")
    # --max-steps overrides --epochs (it may end mid-epoch, or run past epochs * steps per epoch).
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * batches.steps_per_epoch
    if state is not None and int(state["step"]) >= total:
        # Refused before anything in the folder is rewritten: the command asked for training and would do none.
        length = (f"--max-steps {cfg.max_steps}" if cfg.max_steps is not None
                  else f"--epochs {cfg.epochs} ({batches.steps_per_epoch} steps each)")
        raise ConfigError(
            f"nothing to train: {ckpt_path} is at step {int(state['step'])} and {length} ends the run at step "
            f"{total}; pass a larger --epochs or --max-steps (--epochs alone drops the run's --max-steps)"
        )
    save_yaml(cfg, out / "config.yaml")

    step = 0
    if state is not None:
        _restore(state["rng"], set_rng_state, ckpt_path, "rng")
        step = int(state["step"])
    log = MetricLog(out, resume_step=step if state is not None else None)
    env = environment_info(device)
    last_good = [step] if state is not None else []  # the step the checkpoint on disk holds

    def write(obj: Any, path: Path, what: str) -> None:
        """`save_atomic`, whose failure (a full disk) stops the run naming what is kept."""
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

    def checkpoint() -> None:
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
        write(
            {
                "encoder": encoder.state_dict(),
                "rule": rule.state_dict(),
                "optimizer": optimizer.state_dict(),
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
        while step < total and not stop:
            epoch, i = divmod(step, batches.steps_per_epoch)
            x = batches.batch(epoch, i)
            views = augment(x)
            try:
                losses = train_step(encoder, rule, optimizer, views, device=device, amp_dtype=amp_dtype,
                                    micro_batch=cfg.micro_batch)
            except NonFiniteLossError as e:
                raise NonFiniteLossError(
                    f"{e} in step {step + 1} (epoch {epoch + 1}); stopped. The last good checkpoint is kept at "
                    f"{ckpt_path if ckpt_path.exists() else '(none written yet)'}; lower --lr or change --amp."
                ) from None
            step += 1
            window_imgs += x.shape[0]
            imgs_total += x.shape[0]
            if step % cfg.log_every == 0 or step == total:
                vals = [float(v) for v in losses]
                now = time.perf_counter()
                ips = window_imgs / max(now - window_t, 1e-9)
                window_t, window_imgs = now, 0
                last_loss = sum(vals)
                row = {"step": step, "epoch": step / batches.steps_per_epoch, "loss": last_loss,
                       **{f"loss_{g + 1}": v for g, v in enumerate(vals)}, "images_per_s": ips}
                log.log(row)
                bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{ips:.0f}")
            bar.update(1)
            if step % cfg.checkpoint_every == 0 and step < total:
                checkpoint()
    finally:
        bar.close()
        for s, h in handlers.items():
            signal.signal(s, h)
    checkpoint()
    if stop and step < total:  # a signal during the last step: the run is complete, finish it normally
        name = signal.Signals(stop[0]).name
        raise TrainingInterrupted(
            f"{name} received: stopped after step {step} of {total}; checkpoint written to {ckpt_path}. "
            f"Continue with: localssl train --resume --out {out}", stop[0])
    write(encoder.state_dict(), out / ENCODER, "the encoder's weights")
    seconds = time.perf_counter() - t_start
    summary = {"steps": step, "images_seen_this_session": imgs_total, "seconds_this_session": seconds,
               "images_per_s": imgs_total / max(seconds, 1e-9), "final_loss": last_loss,
               "amp": str(amp_dtype), "device": str(device), "env": env}
    with atomic_file(out / "summary.json", "w") as fh:
        fh.write(json.dumps(summary, indent=2))
    return out


__all__ = ["train", "train_step", "build_optimizer", "NonFiniteLossError", "NonFiniteWeightsError",
           "CheckpointWriteError", "TrainingInterrupted"]
