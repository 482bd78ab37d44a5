"""Gradient alignment of a local rule with backpropagation in a CNN (METHODS 3).

For a local rule (``rule.local``), two gradients of every block's weights are
computed on the *same* batch of views (same samples, same views, same
negatives, same detached top context for DFB rules):

- the **local** gradient: block l's own loss L^l, with the block's input
  detached. This is exactly what ``train_step(..., optimizer=None)``
  computes, and it is computed by calling it;
- the **BP** gradient: the *same rule's* top-block loss L^L (its own B^L,
  grid and context) back-propagated through the whole encoder, with nothing
  detached between blocks. It is the gradient that the local rule would
  follow if it were end-to-end BP-SSL with the rule's top loss.

Per block, the cosine between the flattened local and BP gradients of the
block's weights (every parameter with two or more dims: the conv kernel) is
reported, and the cosine of the bias gradients separately. Cosines are
computed in float64 with no eps clamp (``localssl.theory.metrics.cosine``),
because gradients at depth can have norms around 1e-8, where
``F.cosine_similarity`` misreads equal vectors (METHODS 3, practical notes).
The top block is the same computation on both sides, so its cosine is 1 by
construction.

Theorem 3.1 / Proposition 3.5 say that the local gradient equals the BP
gradient when every B^l sits at the optimum of its own loss for fixed W (and W
is orthogonal, the network linear, and the pooling kernel 1). ``fit_b`` trains
only the rule's B matrices, encoder frozen, to move towards that condition,
so that even a random-init encoder can be analysed meaningfully.

    localssl align runs/c10-clapp --batches 8 --batch-size 32 [--fit-b 200]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from localssl.data.augment import ViewBatch
from localssl.engine.runtime import autocast
from localssl.rules import Rule
from localssl.theory.metrics import cosine

__all__ = [
    "gradient_alignment", "layer_gradients", "fit_b", "align_run", "add_align_parser", "align_main",
    "format_table", "plot_alignment",
]


# ----------------------------------------------------------------------------- gradients


def _amp_dtype(amp: torch.dtype | str | None, device: torch.device) -> torch.dtype | None:
    """None/"off" -> fp32; "bf16" or a dtype -> autocast; "auto" -> the trainer's choice."""
    if amp is None or isinstance(amp, torch.dtype):
        return amp
    from localssl.engine.runtime import resolve_amp

    return resolve_amp(amp, device)


def _block_params(block: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(weights, biases) of a block: parameters with >= 2 dims are weights, 1-dim ones biases."""
    params = list(block.parameters())
    return [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]


def _flat_grad(params: list[nn.Parameter]) -> torch.Tensor:
    """The parameters' gradients flattened into one float64 vector (missing grads count as 0)."""
    if not params:
        return torch.zeros(0, dtype=torch.float64)
    parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1) for p in params]
    return torch.cat([t.to(torch.float64).cpu() for t in parts])


def _collect(encoder: nn.Module) -> list[dict[str, torch.Tensor]]:
    out = []
    for block in encoder.blocks:
        w, b = _block_params(block)
        out.append({"weight": _flat_grad(w), "bias": _flat_grad(b)})
    return out


def _zero(encoder: nn.Module, rule: Rule) -> None:
    encoder.zero_grad(set_to_none=True)
    rule.zero_grad(set_to_none=True)


def _check_local(rule: Rule) -> None:
    if not rule.local:
        raise ValueError(
            f"gradient alignment compares a local rule with BP, but {type(rule).__name__} is an end-to-end "
            "(BP) rule: its gradient *is* the BP gradient. Analyse a local rule (e.g. clapp++, clapp++global, "
            "clapp++dfb, clapp++both) on this encoder instead."
        )


@contextlib.contextmanager
def _grads_enabled(encoder: nn.Module):
    """Every encoder parameter requires grad inside; the previous flags come back after."""
    flags = [p.requires_grad for p in encoder.parameters()]
    try:
        for p in encoder.parameters():
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p, f in zip(encoder.parameters(), flags):
            p.requires_grad_(f)


def layer_gradients(
    encoder: nn.Module, rule: Rule, views: torch.Tensor, *, amp: torch.dtype | str | None = None
) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]], dict[str, float]]:
    """Local and BP gradients of every block on one batch of stacked views.

    Returns ``(local, bp, losses)``: ``local[k]`` and ``bp[k]`` are dicts with
    the flattened float64 gradients of block k's ``"weight"`` (all parameters
    with >= 2 dims) and ``"bias"`` (1-dim parameters); ``losses`` holds the
    top loss of both passes and every group's local loss. The encoder's and
    the rule's ``.grad`` are left cleared.
    """
    from localssl.engine.step import train_step, unpack

    _check_local(rule)
    x = unpack(views, rule)  # the rule's layout (a ViewBatch), or stacked [view 1; view 2]
    device = x.device
    dtype = _amp_dtype(amp, device)
    groups = rule.groups()
    g_top = len(groups) - 1
    with _grads_enabled(encoder):
        # Local: exactly the trainer's step without an optimizer (inputs detached per group).
        _zero(encoder, rule)
        local_losses = train_step(encoder, rule, None, views, device=device, amp_dtype=dtype)
        local = _collect(encoder)

        # BP: the rule's own top-group loss, through every block, nothing detached.
        _zero(encoder, rule)
        with autocast(device, dtype):
            h = encoder.run_blocks(x, range(len(encoder.blocks)))
            # DFB context: the detached top output, the same values train_step used.
            top = h.detach() if rule.needs_top_context else None
            loss = rule.loss(g_top, h, top)
        loss.backward()
        bp = _collect(encoder)
        bp_loss = float(loss.detach())
        del h, top, loss
        _zero(encoder, rule)
    return local, bp, {"top_loss_local": float(local_losses[-1]), "top_loss_bp": bp_loss,
                       "group_losses": [float(v) for v in local_losses]}


def _norm(v: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(v)) if v.numel() else 0.0


def _mean_std(x: list[float]) -> tuple[float, float]:
    a = np.asarray(x, dtype=np.float64)
    if a.size == 0:
        return math.nan, math.nan
    return float(a.mean()), float(a.std())


def gradient_alignment(
    encoder: nn.Module,
    rule: Rule,
    views_batches: Iterable[torch.Tensor],
    *,
    amp: torch.dtype | str | None = None,
) -> dict[str, Any]:
    """Per-block cosine between the local and the BP gradient, over batches.

    encoder:       a ``BlockEncoder``; its weights are not changed.
    rule:          a *local* rule (``rule.local``); a BP rule raises ValueError.
    views_batches: iterable of (2B, C, H, W) tensors, view 1 stacked on view
                   2, already on the encoder's device.
    amp:           None/"off" (fp32, the default: alignment of tiny gradients
                   wants full precision), "bf16", "auto" or a dtype.

    Returns a JSON-ready dict: ``layers`` (one entry per block, 1-based
    ``layer``) with ``cosine_mean``/``cosine_std`` over batches (weights
    only: conv kernels), ``cosine_bias_mean``/``cosine_bias_std`` (biases,
    separately; NaN where a block has none), ``norm_local_mean/std`` and
    ``norm_bp_mean/std`` (Euclidean norms of the flattened weight gradients), plus
    ``per_batch`` cosines, ``batches``, the mean top loss and every group's
    mean local loss (``group_loss_mean``). std is over batches (ddof 0).
    """
    _check_local(rule)
    n_blocks = len(encoder.blocks)
    cos: list[list[float]] = [[] for _ in range(n_blocks)]
    cos_b: list[list[float]] = [[] for _ in range(n_blocks)]
    nl: list[list[float]] = [[] for _ in range(n_blocks)]
    nb: list[list[float]] = [[] for _ in range(n_blocks)]
    top_losses = []
    group_losses = []
    n = 0
    images = 0
    for views in views_batches:
        local, bp, losses = layer_gradients(encoder, rule, views, amp=amp)
        top_losses.append(losses["top_loss_bp"])
        group_losses.append(losses["group_losses"])
        for k in range(n_blocks):
            cos[k].append(cosine(local[k]["weight"], bp[k]["weight"]))
            if local[k]["bias"].numel():
                cos_b[k].append(cosine(local[k]["bias"], bp[k]["bias"]))
            nl[k].append(_norm(local[k]["weight"]))
            nb[k].append(_norm(bp[k]["weight"]))
        n += 1
        images += views.images if isinstance(views, ViewBatch) else views.shape[0] // 2
    if n == 0:
        raise ValueError("gradient_alignment needs at least one batch of views")
    layers = []
    for k in range(n_blocks):
        c_m, c_s = _mean_std(cos[k])
        b_m, b_s = _mean_std(cos_b[k])
        l_m, l_s = _mean_std(nl[k])
        p_m, p_s = _mean_std(nb[k])
        layers.append({
            "layer": k + 1, "cosine_mean": c_m, "cosine_std": c_s, "cosine_bias_mean": b_m,
            "cosine_bias_std": b_s, "norm_local_mean": l_m, "norm_local_std": l_s, "norm_bp_mean": p_m,
            "norm_bp_std": p_s,
        })
    return {
        "layers": layers,
        "per_batch": {"cosine": cos, "cosine_bias": cos_b},
        "batches": n,
        "images_per_batch": images // n,
        "top_loss_mean": float(np.mean(top_losses)),
        "group_loss_mean": [float(v) for v in np.mean(group_losses, axis=0)],
        "cosine_of": "flattened weight gradients (conv kernels); biases separately as cosine_bias",
    }


# ----------------------------------------------------------------------------- fitting B


def _repeat(batches: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Cycle a re-iterable collection; a one-shot iterator is used once."""
    while True:
        count = 0
        for v in batches:
            count += 1
            yield v
        if count == 0 or iter(batches) is batches:
            return


def fit_b(
    encoder: nn.Module,
    rule: Rule,
    views_batches: Iterable[torch.Tensor],
    steps: int,
    *,
    lr: float = 1e-4,
    amp: torch.dtype | str | None = None,
) -> dict[str, Any]:
    """Train only the rule's own parameters (B matrices) for ``steps`` steps, encoder frozen.

    Theorem 3.1's condition is "every B^l at the optimum of its own local loss
    for fixed W"; this moves B towards it with AdamW (weight decay 0; the
    rule's own ``b_l2`` penalty is part of its loss). It is an approximation
    (a few hundred Adam steps on fresh batches, not the authors' L-BFGS to
    convergence): compare the per-layer losses it reports. Every block's loss
    is summed into one backward: with the encoder frozen, each loss touches
    only its own B's, so that is the same as one step per block.
    ``views_batches`` is cycled if it is a collection, used once if it is an
    iterator.

    Why the small default lr: Adam moves every entry of B by about lr per
    step, so a score u = z . (B c) moves by about lr * |z|_1 |c|_1, which is
    large for a dense B on the big first-layer maps of an untrained encoder
    (on CIFAR-10 at width 0.25, random init, 100 steps: lr 1e-3 made layer
    1's held-out loss grow from 3.9 to 13.2; 2e-4 and 5e-5 lowered every
    layer's held-out loss).

    Returns ``{"fitted", "steps", "lr", "loss_start", "loss_end",
    "group_loss_start", "group_loss_end"}``: the summed and per-group losses
    averaged over the first and the last ``window`` steps (up to 10);
    ``fitted`` is False (with a ``reason``) when nothing was trained.
    """
    params = [p for p in rule.parameters() if p.requires_grad]
    info: dict[str, Any] = {"fitted": False, "steps": 0, "lr": lr, "loss_start": math.nan, "loss_end": math.nan}
    if steps <= 0:
        info["reason"] = "not asked (0 steps)"
        return info
    if not params:
        info["reason"] = "the rule has no trainable B (feedback identity or fixed)"
        return info
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    groups = rule.groups()
    window = max(1, min(10, steps // 5))
    history: list[list[float]] = []
    from localssl.engine.step import unpack

    for views in _repeat(views_batches):
        if len(history) >= steps:
            break
        x = unpack(views, rule)
        dtype = _amp_dtype(amp, x.device)
        with torch.no_grad(), autocast(x.device, dtype):
            outs = encoder(x)
        top = outs[-1] if rule.needs_top_context else None
        with autocast(x.device, dtype):
            losses = [rule.loss(g, outs[group.output], top) for g, group in enumerate(groups)]
        loss = sum(losses)
        if not torch.isfinite(loss):
            raise ValueError(f"B fitting diverged at step {len(history) + 1} (loss {float(loss)}); lower the lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append([float(v.detach()) for v in losses])
    rule.zero_grad(set_to_none=True)
    done = len(history)
    if done:
        first = np.mean(history[:window], axis=0)
        last = np.mean(history[-window:], axis=0)
        info.update(loss_start=float(first.sum()), loss_end=float(last.sum()),
                    group_loss_start=[float(v) for v in first], group_loss_end=[float(v) for v in last],
                    window=window)
    info.update(fitted=done > 0, steps=done)
    if done < steps:
        info["reason"] = f"the batches ran out after {done} of {steps} steps"
    return info


# ----------------------------------------------------------------------------- output


def format_table(result: dict[str, Any]) -> str:
    """Plain-text table: layer, mean cosine, std, |local grad|, |BP grad|, bias cosine."""
    head = ["layer", "cos mean", "cos std", "|local grad|", "|BP grad|", "bias cos"]
    rows = [[
        str(r["layer"]), f"{r['cosine_mean']:.4f}", f"{r['cosine_std']:.4f}", f"{r['norm_local_mean']:.3e}",
        f"{r['norm_bp_mean']:.3e}",
        "-" if math.isnan(r["cosine_bias_mean"]) else f"{r['cosine_bias_mean']:.4f}",
    ] for r in result["layers"]]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def plot_alignment(result: dict[str, Any], path: str | Path, title: str = "") -> Path | None:
    """PNG of the mean cosine per layer with std error bars; None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - plots are an extra
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    layers = [r["layer"] for r in result["layers"]]
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    ax.errorbar(layers, [r["cosine_mean"] for r in result["layers"]], yerr=[r["cosine_std"] for r in result["layers"]],
                marker="o", capsize=3, label="weights")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(layers)
    ax.set_ylim(-1.05, 1.05)
    ax.set_xlabel("layer")
    ax.set_ylabel("cos(local grad, BP grad)")
    ax.set_title(title or "gradient alignment", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- run folders


def _views_sampler(images: np.ndarray, augment: nn.Module, batch_size: int, gen: torch.Generator,
                   device: torch.device) -> Callable[[], ViewBatch]:
    """Draws random batches (without replacement within a pass) of uint8 images -> the rule's views."""
    n = len(images)
    state = {"perm": torch.randperm(n, generator=gen), "i": 0}

    def draw() -> torch.Tensor:
        if state["i"] + batch_size > n:
            state["perm"], state["i"] = torch.randperm(n, generator=gen), 0
        idx = np.sort(state["perm"][state["i"]: state["i"] + batch_size].numpy())
        state["i"] += batch_size
        x = torch.from_numpy(np.ascontiguousarray(images[idx])).to(device)
        return augment.batch(x)

    return draw


def align_run(
    run_dir: str | Path,
    *,
    checkpoint: str | Path | None = None,
    rule_name: str | None = None,
    random_init: bool = False,
    batches: int = 8,
    batch_size: int = 32,
    fit_b_steps: int = 0,
    fit_b_lr: float = 1e-4,
    data_dir: str | None = None,
    subset: int | None = None,
    seed: int = 0,
    device: str = "auto",
    amp: str = "off",
) -> dict[str, Any]:
    """Gradient alignment of a run folder's encoder; the JSON-ready result (see ``gradient_alignment``).

    The rule analysed is the run's own (with its trained B matrices) unless
    ``rule_name`` names another local rule, which is then built fresh (random
    B) with the run's options (f, feedback, b_l2, grids when spatial). With
    ``random_init`` the encoder is an untrained one of the same shape (seeded
    by ``seed``) and B is fresh too, since trained B's belong to trained
    weights. Views are the rule's own (its view maker's) of the run's data set (pre-training split).
    """
    from localssl.builder import build_model, build_views
    from localssl.config import ConfigError
    from localssl.data import dataset_spec, load_dataset
    from localssl.engine.checkpoint import CHECKPOINT, checkpoint_config, load_checkpoint, load_weights
    from localssl.engine.runtime import resolve_device
    from localssl.rules import RULES

    t0 = time.perf_counter()
    if batches < 1 or batch_size < 2:
        raise ConfigError(f"need --batches >= 1 and --batch-size >= 2 (got {batches}, {batch_size})")
    run_dir = Path(run_dir)
    ckpt = Path(checkpoint) if checkpoint is not None else run_dir / CHECKPOINT
    state = load_checkpoint(ckpt, require=("encoder", "config"))
    cfg = checkpoint_config(state, ckpt)
    name = rule_name or cfg.rule
    if name not in RULES:
        raise ConfigError(f"unknown rule {name!r}; valid: {', '.join(RULES.names())}")
    dev = resolve_device(device)

    spec = dataset_spec(cfg.dataset)

    def load_images():
        d = load_dataset(cfg.dataset, data_dir if data_dir is not None else cfg.data_dir, spec.pretrain_split,
                         resize=cfg.resize)
        if subset is not None:
            if subset < batch_size:
                raise ConfigError(f"--subset {subset} is smaller than one batch ({batch_size} images)")
            if subset < len(d):
                d = d.subset(subset, seed=seed)
        if len(d) < batch_size:
            raise ConfigError(f"{len(d)} images make no batch of {batch_size}")
        return d

    # Refuse a BP rule before decoding any data, where the image size is known without it.
    data = load_images() if spec.image_size is None or cfg.resize is not None else None
    if data is not None:
        spec = spec.resolved(data)

    torch.manual_seed(seed)
    # The run's own grids and options (another rule keeps the options it shares with the run's).
    model = build_model(cfg, spec.channels, spec.image_size, rule=name)
    encoder, rule = model.encoder, model.rule
    if not random_init:
        load_weights(encoder, state["encoder"], ckpt, "encoder")
    if not rule.local:
        why = "the run's rule" if rule_name is None else "rule"
        raise ConfigError(
            f"{why} {name!r} is end-to-end (BP): its gradient is the BP gradient, so there is no local "
            "gradient to align. Pass --rule with a local rule (e.g. --rule clapp++) to analyse one on this "
            "encoder."
        )
    if data is None:
        data = load_images()
    b_source = "fresh"
    if name == cfg.rule and not random_init and "rule" in state:
        load_weights(rule, state["rule"], ckpt, "rule")
        b_source = "checkpoint"
    encoder.to(dev)
    rule.to(dev)

    # The run's normalisation (saved since runs record it; imagefolder's is its own).
    augment = build_views(cfg, spec.image_size, cfg.mean or spec.mean, cfg.std or spec.std, spec.crop_scale, dev,
                          rule)  # the views the rule trains on, in its layout
    gen = torch.Generator().manual_seed(seed)
    draw = _views_sampler(data.images, augment, batch_size, gen, dev)
    # Kornia draws its random parameters from the global generator.
    torch.manual_seed(seed)

    # The measuring views come first, so that a seed gives the same views with or without --fit-b.
    measure = [draw() for _ in range(batches)]
    fit = {"fitted": False, "steps": 0}
    if fit_b_steps > 0:
        fit = fit_b(encoder, rule, (draw() for _ in range(fit_b_steps)), fit_b_steps, lr=fit_b_lr, amp=amp)
        fit.setdefault("reason", None)
    result = gradient_alignment(encoder, rule, measure, amp=amp)
    result.update({
        "run": str(run_dir), "checkpoint": str(ckpt), "step": state.get("step"), "rule": name,
        "run_rule": cfg.rule, "random_init": random_init, "b_source": b_source,
        "b_fitted": bool(fit.get("fitted")), "fit_b": fit, "dataset": cfg.dataset, "split": spec.pretrain_split,
        "images_available": len(data), "batch_size": batch_size, "seed": seed, "device": str(dev), "amp": amp,
        "encoder": cfg.encoder, "width": cfg.width, "grids": list(rule.grids) if hasattr(rule, "grids") else None,
        "seconds": time.perf_counter() - t0,
    })
    return result


def _json_safe(x: Any) -> Any:
    """NaN/inf -> None, so the file is strict JSON (a block without bias has no bias cosine)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _stem(result: dict[str, Any]) -> str:
    return f"align-{result['rule']}" + ("-random" if result["random_init"] else "") + (
        f"-fitb{result['fit_b']['steps']}" if result["b_fitted"] else "")


def add_align_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``localssl align`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "align", help="gradient alignment of a local rule with BP, per layer (METHODS 3)",
        description="Cosine between each block's local gradient and the BP gradient of the same rule's top "
                    "loss, on the same views of the run's data set (the rule's view maker); writes a JSON file "
                    "and a PNG plot.",
    )
    p.add_argument("run", help="run folder written by `localssl train`")
    p.add_argument("--checkpoint", default=None, help="checkpoint file (default: RUN/checkpoint.pt)")
    p.add_argument("--rule", default=None,
                   help="analyse another local rule on the same encoder (fresh B unless it is the run's rule)")
    p.add_argument("--random-init", action="store_true", help="an untrained encoder of the same shape (fresh B)")
    p.add_argument("--batches", type=int, default=8, help="batches to average over (default: 8)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch, two views each (default: 32)")
    p.add_argument("--fit-b", type=int, default=0, metavar="N",
                   help="first train only the rule's B matrices for N steps, encoder frozen (default: 0)")
    p.add_argument("--fit-b-lr", type=float, default=1e-4, help="AdamW lr of the B fitting (default: 1e-4)")
    p.add_argument("--data-dir", default=None, help="data folder/archive (default: the run's)")
    p.add_argument("--subset", type=int, default=None, help="draw batches from only this many images")
    p.add_argument("--seed", type=int, default=0, help="seed of batches, views and --random-init (default: 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ... (default: auto)")
    p.add_argument("--amp", default="off", choices=["off", "bf16", "auto"],
                   help="autocast for the gradients (default: off; tiny gradients want fp32)")
    p.add_argument("--out", default=None, help="folder for the JSON and PNG (default: the run folder)")
    p.add_argument("--json", action="store_true", help="print the JSON result instead of the table")
    p.set_defaults(func=align_main)
    return p


def align_main(args: argparse.Namespace) -> int:
    """``localssl align``: measure, print a table (or JSON), write JSON and PNG."""
    result = align_run(
        args.run, checkpoint=args.checkpoint, rule_name=args.rule, random_init=args.random_init,
        batches=args.batches, batch_size=args.batch_size, fit_b_steps=args.fit_b, fit_b_lr=args.fit_b_lr,
        data_dir=args.data_dir, subset=args.subset, seed=args.seed, device=args.device, amp=args.amp,
    )
    out = Path(args.out) if args.out is not None else Path(args.run)
    out.mkdir(parents=True, exist_ok=True)
    stem = _stem(result)
    json_path = out / f"{stem}.json"
    result["json"] = str(json_path)
    png = plot_alignment(
        result, out / f"{stem}.png",
        title=f"{result['rule']} on run {Path(args.run).name}" + (" (random init)" if result["random_init"] else "")
        + (f", B fitted {result['fit_b']['steps']} steps" if result["b_fitted"] else ""),
    )
    result["png"] = str(png) if png else None
    text = json.dumps(_json_safe(result), indent=2, allow_nan=False)
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(json_path)
    if args.json:
        print(text)
    else:
        fit = result["fit_b"]
        b = f"B: {result['b_source']}" + (
            f", fitted {fit['steps']} steps (loss {fit['loss_start']:.4f} -> {fit['loss_end']:.4f})"
            if result["b_fitted"] else ", not fitted")
        print(f"{result['rule']} on {result['run']} (step {result['step']}, "
              f"{'random init' if result['random_init'] else 'trained'} encoder; {b}); "
              f"{result['batches']} batches x {result['batch_size']} images of {result['dataset']}")
        print(format_table(result))
        print(f"cosine of flattened conv-weight gradients, mean +- std over batches; written {json_path}"
              + (f" and {png}" if png else ""), file=sys.stderr)
    return 0
