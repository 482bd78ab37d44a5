"""The notes under table 5 of ``localssl bench``: what a local rule's own parameters cost in FLOPs against the
input-gradient pass its step skips, written from the measured figures (never from rule names)."""
from __future__ import annotations

from typing import Any

from localssl.reports.bench.common import REFERENCE_ENCODER, REFERENCE_GFLOP

#: A local rule whose own parameters (B matrices, projection, head) cost at least this share of the
#: input-gradient pass its step skips gets a note: they eat that much of local training's FLOP saving.
HEAVY_OWN_FLOPS = 0.25
#: Step FLOPs within this fraction of the BP twin's read as "roughly even" in that note.
EVEN_FLOPS = 0.1


def _own_flops(d: dict[str, Any]) -> float:
    return d["rule_params_fwd"] + d["rule_params_bwd"]


def flop_notes(per_rule: dict[str, Any], width: float, twins: dict[str, str | None], encoder: str) -> list[str]:
    """Per local rule whose own parameters cost >= `HEAVY_OWN_FLOPS` of the input-gradient pass of its BP twin:
    that cost against the pass, the step totals of every local rule against the same twin beside it, the same at
    full width, and whether the rule keeps local training's FLOP saving. Nothing where no rule is that heavy."""
    ok = {k: v for k, v in per_rule.items() if "error" not in v}
    by_twin: dict[str, list[str]] = {}
    for name, d in ok.items():
        twin = twins.get(name)
        if d.get("local") and twin in ok and ok[twin]["encoder_bwd_input"] > 0:
            by_twin.setdefault(twin, []).append(name)
    heavy = {t: [r for r in rs if _own_flops(ok[r]) >= HEAVY_OWN_FLOPS * ok[t]["encoder_bwd_input"]]
             for t, rs in by_twin.items()}
    heavy = {t: rs for t, rs in heavy.items() if rs}
    if not heavy:
        return []
    notes = []
    if encoder == REFERENCE_ENCODER:
        ref = REFERENCE_GFLOP
        ref_b, ref_saved = ref["dense B (fwd + dB)"], ref["BP step"] - ref["local step"]
        notes.append(f"   METHODS 2.2b ({encoder}, full width, 32px): local step ~{ref['local step']}, BP "
                     f"~{ref['BP step']}, CLAPP++'s dense B ~{ref_b} GFLOP/view: B ~{ref_b / ref_saved:.1f}x the "
                     "input-gradient pass that local training skips, so CLAPP++ roughly even with BP.")
    scale = 1 / width**2  # every part grows with width^2 (B's side with width); the 3-channel input layer aside
    for twin, names in heavy.items():
        bp = ok[twin]
        full = bp["encoder_bwd_input"]
        for name in names:
            d, own = ok[name], _own_flops(ok[name])
            # A blockwise rule's block of several layers computes the input gradient inside it: it skips only the rest.
            skips = (f"the skipped input-gradient pass ({full / 1e9:.4f} in {twin})" if not d["encoder_bwd_input"] else
                     f"the input-gradient pass of {twin} ({full / 1e9:.4f}), of which it skips "
                     f"{max(full - d['encoder_bwd_input'], 0.0) / 1e9:.4f}")
            notes.append(f"   measured: {name}'s own parameters (B/proj forward + backward) {own / 1e9:.4f} GFLOP/view "
                         f"= {own / full:.2f}x {skips}.")
        totals = ", ".join(f"{r} {ok[r]['total'] / 1e9:.4f} ({ok[r]['total'] / bp['total']:.2f}x)"
                           for r in by_twin[twin])
        notes.append(f"   step totals: {totals}, {twin} {bp['total'] / 1e9:.4f}.")
        wide = ", ".join(f"{r} step ~{ok[r]['total'] * scale / 1e9:.1f} (own parameters "
                         f"~{_own_flops(ok[r]) * scale / 1e9:.1f})" for r in names)
        notes.append(f"   x{scale:.0f} (width {width} -> 1): {wide}, {twin} ~{bp['total'] * scale / 1e9:.1f} "
                     "GFLOP/view (counting 2 FLOPs per multiply-add).")
        # The rules that spend less than their twin in all: they keep (part of) the saving.
        lighter = [r for r in by_twin[twin] if r not in names and ok[r]["total"] < bp["total"]]
        beside = (f"; {', '.join(lighter)} {'keeps' if len(lighter) == 1 else 'keep'} the saving" if lighter else "")
        for name in names:
            ratio = ok[name]["total"] / bp["total"]
            if ratio > 1 + EVEN_FLOPS:
                verdict = (f"{name} costs more FLOPs than {twin} ({ratio:.2f}x): its own parameters outweigh what "
                           "local training saves")
            elif ratio >= 1 - EVEN_FLOPS:
                verdict = (f"{name}'s own parameters cost about as much as local training saves: it is roughly even "
                           f"with {twin} in FLOPs ({ratio:.2f}x)")
            else:
                verdict = (f"{name} keeps part of the saving ({ratio:.2f}x {twin}'s FLOPs); in time its own "
                           "parameters cost more than their FLOPs, because AdamW updates them every step (see "
                           "'in AdamW' in table 1)")
            notes.append(f"   So {verdict}{beside}.")
    return notes
