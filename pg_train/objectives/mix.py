"""Which objective a step trains and how objectives combine: `pseudo_gumbel`, `supervised`,
`mixed` (Pseudo-Gumbel + mix_weight x supervised on the same batch) or `curriculum` (supervised,
then Pseudo-Gumbel from it, in one run)."""

from __future__ import annotations

from ..config import TrainConfig, supervised_steps
from .passes import StepOutput
from .pseudo_gumbel import pseudo_gumbel_step
from .supervised import supervised_step


def objective_kind_at(step: int, cfg: TrainConfig) -> str:
    """The objective step `step` (0-based) trains: curriculum = supervised, then Pseudo-Gumbel."""
    if cfg.objective_kind == "curriculum":
        return "supervised" if step < supervised_steps(cfg) else "pseudo_gumbel"
    return cfg.objective_kind


def objective_step(model, ema, batch: dict, cfg: TrainConfig, kind: str | None = None, observer=None) -> StepOutput:
    """The objective's forward: Pseudo-Gumbel, supervised (ground-truth text), or both (mixed)."""
    kind = kind or objective_kind_at(0, cfg)
    if kind == "supervised":
        return supervised_step(model, batch, cfg.objective, cfg.supervised, observer=observer)
    out = pseudo_gumbel_step(model, ema, batch, cfg.objective, observer=observer)
    if kind == "mixed":
        sup = supervised_step(model, batch, cfg.objective, cfg.supervised, observer=observer)
        out.loss = out.loss + cfg.supervised.mix_weight * sup.loss
        out.metrics["loss"] = out.loss.detach()
        out.metrics["lm_loss"] = sup.metrics["lm_loss"]
        out.metrics["supervised_iou"] = sup.metrics["iou"]
    return out
