"""One optimizer step over a window of micro-batches: forward, the ranks' agreement on a
non-finite loss, backward, clipping, the optimizer step and the EMA update.

Training (`pg_train.train`) and memcheck's measurement (`pg_train.memcheck.measure`) both call
`optimizer_window`, so what memcheck measures and audits is the optimizer step training runs,
not a copy of it. The stages after the forward are observed like the objective's own
(`observer(stage)` -> context manager): WINDOW_STAGES.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from .distributed import unwrap
from .objectives.passes import StepOutput, no_observer

WINDOW_STAGES = ("backward", "optimizer step", "EMA update")  # observed after the objective's STAGES


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class NonFiniteGuard:
    """Counts micro-batches dropped for a non-finite loss; too many in a row stops the run."""

    limit: int
    total: int = 0
    in_a_row: int = 0

    def lost(self, step: int) -> None:
        self.total += 1
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise NonFiniteLossError(
                f"{self.in_a_row} micro-batches in a row had a non-finite loss (step {step}); "
                f"stopping. Lower optim.lr, check the data, or raise max_nonfinite_in_a_row."
            )

    def finite(self) -> None:
        self.in_a_row = 0


@dataclass
class WindowResult:
    out: StepOutput  # the window's last finite micro-batch (else its last one), for logging
    stepped: bool  # False: no micro-batch was finite, no update was made
    dropped: int  # micro-batches of this window with a non-finite loss (every rank agrees)
    grad_norms: dict[str, float] = field(default_factory=dict)


def grad_norms(model) -> dict[str, float]:
    """Gradient norms per trainable group (available when the optimizer is not ZeRO-sharded)."""
    groups: dict[str, float] = Counter()
    for name, p in unwrap(model).named_parameters():
        if p.grad is None:
            continue
        group = "lora" if "lora_" in name else "decoder" if "sam_mask_decoder" in name else name.split(".")[0]
        groups[group] += float(p.grad.detach().float().pow(2).sum())
    return {f"grad_norm/{k}": v**0.5 for k, v in groups.items()}


def optimizer_window(
    micro_batches: Iterator[dict],
    forward: Callable[[dict, Callable], StepOutput],
    *,
    model,
    optimizer,
    ema,
    accelerator,
    grad_accum: int,
    grad_clip: float,
    guard: NonFiniteGuard,
    step: int,
    observer=None,
) -> WindowResult:
    """Run `grad_accum` micro-batches (`forward(batch, observer)` -> StepOutput) and one
    optimizer step on their gradients; the EMA follows the step when one was made.

    `model` and `optimizer` are as `accelerator.prepare` returned them; `ema` may be None (no
    teacher to update). `step` is the step being made (0-based), for the error message.
    """
    observe = observer or no_observer
    deepspeed = accelerator.state.deepspeed_plugin is not None
    trainable = [p for p in model.parameters() if p.requires_grad]
    dropped, finite_out, out, norms = 0, None, None, {}
    for _ in range(grad_accum):
        batch = next(micro_batches)
        # Entered for every micro-batch, lost ones too, so Accelerate's window (and DeepSpeed's
        # accumulation boundary, which follows it) stays aligned with this loop's.
        with accelerator.accumulate(model):
            out = forward(batch, observe)
            # Every rank must agree before backward: a rank that skipped alone would hang the
            # others, and one that did not would all-reduce NaN gradients into everyone.
            bad = (~torch.isfinite(out.loss.detach())).float().reshape(1).to(accelerator.device)
            if accelerator.reduce(bad, "max").item() > 0:
                dropped += 1
                guard.lost(step + 1)
                if not (accelerator.sync_gradients and finite_out is not None):
                    continue  # nothing of it reaches the gradients
                # The window's last micro-batch is lost but earlier ones left gradients. One
                # process steps on them as they are; several reduce them (and DeepSpeed steps)
                # inside the boundary's backward, so every rank runs a backward of exactly
                # zero (0 x the trainable weights; the NaN graph is never touched).
                if deepspeed or accelerator.num_processes > 1:
                    with observe("backward"):
                        accelerator.backward(sum(p.sum() for p in trainable) * 0.0)
            else:
                guard.finite()
                finite_out = out
                with observe("backward"):
                    accelerator.backward(out.loss)
            if accelerator.sync_gradients:
                with observe("optimizer step"):
                    if not deepspeed:
                        norms = grad_norms(model)
                        if grad_clip > 0:
                            accelerator.clip_grad_norm_(trainable, grad_clip)
                    optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    stepped = finite_out is not None  # a window with no finite micro-batch makes no update
    if stepped and ema is not None:
        with observe("EMA update"):
            ema.update_if_stepped(model, accelerator)
    return WindowResult(out=finite_out if stepped else out, stepped=stepped, dropped=dropped, grad_norms=norms)
