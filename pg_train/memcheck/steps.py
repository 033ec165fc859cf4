"""The kinds of optimizer step a configuration trains, as memcheck predicts and measures them.

A run trains one objective on every step (objective_kind pseudo_gumbel, pseudo_label, supervised,
mixed) or, with two data streams (the curriculum is their shorthand), a schedule: the supervised
warm-up, then self-training on the unlabelled part of each micro-batch + supervised on its
labelled part (objectives.mix.two_stream_step). Memory differs between them (a supervised part
generates no caption; each part reads only its share of the samples), so each distinct step is
predicted and measured, and the budget is the largest.
"""

from __future__ import annotations

from dataclasses import dataclass

OBJECTIVES = ("pseudo_gumbel", "pseudo_label", "supervised")  # what one part of a step runs


@dataclass(frozen=True)
class StepKind:
    """One kind of step: the objectives it runs in order, each over its number of samples
    (`parts`), and `step`, an optimizer step of this kind (its schedules' values; measured there)."""

    parts: tuple[tuple[str, int], ...]
    step: int = 0
    mixed: bool = False  # objective_kind=mixed: Pseudo-Gumbel + supervised on the same samples

    @property
    def name(self) -> str:
        return "mixed" if self.mixed else "+".join(objective for objective, _ in self.parts)

    @property
    def label(self) -> str:
        """The name with each part's samples, e.g. `pseudo_label+supervised (2 + 2 samples)`."""
        counts = [n for _, n in self.parts]
        if self.mixed:  # both objectives read the same samples
            return f"mixed ({counts[0]} samples, both objectives)"
        return f"{self.name} ({' + '.join(map(str, counts))} sample{'s' if sum(counts) > 1 else ''})"

    @property
    def has_teacher(self) -> bool:
        return any(objective != "supervised" for objective, _ in self.parts)


def pseudo_gumbel_only(batch_size: int) -> StepKind:
    """The step memcheck audits without a training config (the preset's Pseudo-Gumbel)."""
    return StepKind((("pseudo_gumbel", batch_size),))


def step_kinds(cfg, batch_size: int) -> tuple[StepKind, ...]:
    """The distinct steps `cfg` (a TrainConfig, or None) trains with micro-batches of
    `batch_size`, in the order the run first meets them. Two streams: every micro-batch's split
    as pg_train.data.streams draws it (with the grounding gate open and, when the config has a
    gate, closed). Each kind's `step` is its first step without drift diagnostics (their no-grad
    passes are not modelled), else its first."""
    if cfg is None:
        return (pseudo_gumbel_only(batch_size),)
    from ..data.streams import labelled_count
    from ..objectives.drift import due
    from ..objectives.mix import labelled_share, stream_weights

    found: dict[tuple, StepKind] = {}

    def meet(parts: tuple, step: int, mixed: bool = False) -> None:
        known = found.get(parts)
        if known is None or (due(cfg.objective, known.step) and not due(cfg.objective, step)):
            found[parts] = StepKind(parts, step, mixed)

    if not cfg.streams.enabled:
        kind = cfg.objective_kind
        parts = (
            (("pseudo_gumbel", batch_size), ("supervised", batch_size)) if kind == "mixed" else ((kind, batch_size),)
        )
        for step in range(min(cfg.max_steps, 2)):
            meet(parts, step, kind == "mixed")
        return tuple(found.values())
    for gate_open in (True, False) if cfg.streams.gate_min_gap is not None else (True,):
        credit = 0.0
        for micro_batch in range(cfg.max_steps * cfg.grad_accum):
            step = micro_batch // cfg.grad_accum
            labelled, credit = labelled_count(credit, labelled_share(cfg, step, gate_open), batch_size)
            self_weight, supervised_weight = stream_weights(cfg, step, gate_open)
            parts = tuple(
                (objective, samples)
                for objective, samples, weight in (
                    (cfg.objective_kind, batch_size - labelled, self_weight),
                    ("supervised", labelled, supervised_weight),
                )
                if samples and weight
            )
            if parts:
                meet(parts, step)
    return tuple(found.values())
