"""Which objective a step trains and how objectives combine: `pseudo_gumbel`, `pseudo_label`,
`supervised`, `mixed` (Pseudo-Gumbel + mix_weight x supervised on the same batch) and, with
`streams.enabled`, the two-stream objective: self_weight x self-training on the unlabelled part of
a micro-batch + supervised_weight (lambda) x supervised on its labelled part, both weights
schedules of the optimizer step. The curriculum (supervised, then Pseudo-Gumbel from it, in one
run) is one such schedule (config.expand_curriculum), its switch the step self-training begins."""

from __future__ import annotations

import torch

from ..config import TrainConfig
from .drift import drift_diagnostics, due
from .passes import StepOutput
from .pseudo_gumbel import pseudo_gumbel_step
from .pseudo_label import pseudo_label_step
from .schedule import first_rise, schedule_at
from .supervised import supervised_step


def objective_kind_at(step: int, cfg: TrainConfig, gate_open: bool = True) -> str:
    """What step `step` (0-based) trains, as metrics.jsonl's `objective` names it: with two
    streams, `supervised` while self-training weighs 0 (the curriculum's warm-up, a closed gate),
    objective_kind while lambda is 0, else `<objective_kind>+supervised`."""
    if not cfg.streams.enabled:
        return cfg.objective_kind
    self_weight, supervised_weight = stream_weights(cfg, step, gate_open)
    if not self_weight:
        return "supervised"
    return f"{cfg.objective_kind}+supervised" if supervised_weight else cfg.objective_kind


def self_training_start(cfg: TrainConfig) -> int | None:
    """The step the self-training stage begins (streams.self_weight turns > 0 after weighing 0;
    the curriculum's switch), or None: self-training from step 0, or one data stream."""
    return first_rise(cfg.streams.self_weight) if cfg.streams.enabled else None


def stream_weights(cfg: TrainConfig, step: int, gate_open: bool = True) -> tuple[float, float]:
    """(self_weight, supervised_weight) at optimizer step `step`; self-training weighs 0 while
    the grounding gate is closed."""
    s = cfg.streams
    return (schedule_at(s.self_weight, step) if gate_open else 0.0), schedule_at(s.supervised_weight, step)


def labelled_share(cfg: TrainConfig, step: int, gate_open: bool = True) -> float:
    """The labelled fraction of step `step`'s micro-batches: the schedule's, except that no sample
    is drawn for a part that weighs 0 (all labelled while self-training weighs 0 or the gate is
    closed; all unlabelled while lambda is 0)."""
    self_weight, supervised_weight = stream_weights(cfg, step, gate_open)
    if not self_weight:
        return 1.0
    if not supervised_weight:
        return 0.0
    return schedule_at(cfg.streams.labelled_fraction, step)


def self_training_step(
    model, ema, batch: dict, cfg: TrainConfig, observer=None, reference=None, step: int = 0, kind: str | None = None
) -> StepOutput:
    """The self-training objective of unlabelled pairs (objective_kind pseudo_gumbel or
    pseudo_label), with the drift diagnostics on the steps they are due (objectives.drift)."""
    diagnose = due(cfg.objective, step)
    if (kind or cfg.objective_kind) == "pseudo_label":
        out = pseudo_label_step(
            model, ema, batch, cfg.objective, cfg.supervised, observer=observer, reference=reference, diagnose=diagnose
        )
        reads = "teacher"
    else:
        out = pseudo_gumbel_step(
            model, ema, batch, cfg.objective, observer=observer, reference=reference, diagnose=diagnose
        )
        reads = cfg.objective.segmenter_reads
    if diagnose:
        out.metrics.update(drift_diagnostics(model, batch, out, cfg.objective, reads))
    return out


def two_stream_step(
    model, ema, batch: dict, cfg: TrainConfig, step: int, observer=None, reference=None, gate_open: bool = True
) -> StepOutput:
    """batch: {"labelled": inputs | None, "unlabelled": inputs | None} (pg_train.data.streams).
    The step's output is the self-training part's (its captions, masks and metrics), else the
    supervised part's, with the combined loss and each part's loss, IoU and sample count."""
    self_weight, supervised_weight = stream_weights(cfg, step, gate_open)
    unlabelled, labelled = batch["unlabelled"], batch["labelled"]
    own = sup = None
    if unlabelled is not None and self_weight:
        own = self_training_step(model, ema, unlabelled, cfg, observer, reference, step)
    if labelled is not None and supervised_weight:
        sup = supervised_step(model, labelled, cfg.objective, cfg.supervised, observer=observer)
    if own is None and sup is None:
        raise ValueError(f"step {step}: a micro-batch with nothing to train (see objectives.mix.labelled_share)")
    out = own if own is not None else sup
    zero = torch.zeros((), device=out.loss.device)
    parts = {"self": (own, self_weight), "supervised": (sup, supervised_weight)}
    out.loss = sum(weight * part.loss for part, weight in parts.values() if part is not None)
    out.metrics["loss"] = out.loss.detach()
    for name, (part, weight) in parts.items():
        out.metrics[f"{name}_loss"] = part.loss.detach() if part is not None else zero
        out.metrics[f"{name}_iou"] = part.metrics["iou"] if part is not None else zero
        out.metrics[f"{name}_weight"] = torch.tensor(float(weight))
    if sup is not None:
        out.metrics["lm_loss"] = sup.metrics["lm_loss"]
    out.metrics["labelled_samples"] = torch.tensor(float(len(labelled["captions"]) if labelled else 0))
    out.metrics["unlabelled_samples"] = torch.tensor(float(len(unlabelled["captions"]) if unlabelled else 0))
    return out


def objective_step(
    model,
    ema,
    batch: dict,
    cfg: TrainConfig,
    kind: str | None = None,
    observer=None,
    reference=None,
    step: int = 0,
    gate_open: bool = True,
) -> StepOutput:
    """The objective's forward: Pseudo-Gumbel, pseudo-labels, supervised (ground-truth text),
    both on one batch (mixed), or the two-stream objective (streams.enabled; `step` picks the
    schedules' values). `reference`: the KL anchor's frozen reference (objectives.anchor)."""
    if cfg.streams.enabled:
        return two_stream_step(model, ema, batch, cfg, step, observer, reference, gate_open)
    kind = kind or cfg.objective_kind
    if kind == "supervised":
        return supervised_step(model, batch, cfg.objective, cfg.supervised, observer=observer)
    if kind == "pseudo_label":
        return self_training_step(model, ema, batch, cfg, observer, reference, step, kind)
    out = self_training_step(model, ema, batch, cfg, observer, reference, step, "pseudo_gumbel")
    if kind == "mixed":
        sup = supervised_step(model, batch, cfg.objective, cfg.supervised, observer=observer)
        out.loss = out.loss + cfg.supervised.mix_weight * sup.loss
        out.metrics["loss"] = out.loss.detach()
        out.metrics["lm_loss"] = sup.metrics["lm_loss"]
        out.metrics["supervised_iou"] = sup.metrics["iou"]
    return out
