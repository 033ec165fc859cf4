"""The training loop: build -> prepare -> for step: batch -> pseudo_gumbel_step -> backward ->
optimizer step -> EMA -> log -> checkpoint. Read top to bottom; `launch/train.py` is the CLI.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import yaml

from .accel import build_accelerator, configure_environment
from .builders import (  # noqa: F401 (lora_from_config, unfreeze_extra, load_training_weights: importable from here too)
    build_optimizer,
    build_student,
    load_training_weights,
    lora_from_config,
    unfreeze_extra,
)
from .checkpointing import (
    check_resume_weights,
    load_rng_state,
    load_trainer_state,
    newest_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from .config import TrainConfig, to_dict
from .data import build_loader
from .data.loader import batch_to_device, preprocess_for
from .distributed import unwrap
from .ema import EMATeacher
from .pseudo_gumbel import pseudo_gumbel_step
from .supervised import supervised_step

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after a checkpoint; requeue and resume


class NonFiniteLossError(RuntimeError):
    pass


@dataclasses.dataclass
class TrainResult:
    """What a run leaves behind in-process (the CLI only uses `exit_code`)."""

    exit_code: int
    step: int
    history: list
    model: object = None
    optimizer: object = None
    ema: object = None
    loader: object = None


def objective_step(model, ema, batch: dict, cfg: TrainConfig):
    """The configured objective's forward: Pseudo-Gumbel, supervised (ground-truth text), or both."""
    if cfg.objective_kind == "supervised":
        return supervised_step(model, batch, cfg.objective, cfg.supervised)
    out = pseudo_gumbel_step(model, ema, batch, cfg.objective)
    if cfg.objective_kind == "mixed":
        sup = supervised_step(model, batch, cfg.objective, cfg.supervised)
        out.loss = out.loss + cfg.supervised.mix_weight * sup.loss
        out.metrics["loss"] = out.loss.detach()
        out.metrics["lm_loss"] = sup.metrics["lm_loss"]
        out.metrics["supervised_iou"] = sup.metrics["iou"]
    return out


def held_out_evaluation(model, heldout: list[dict], cfg: TrainConfig) -> dict[str, float]:
    """pg_train.evaluate's numbers on the held-out batches, as `eval/*` metrics."""
    from .evaluate import KINDS, evaluate

    numbers = evaluate(model, heldout, cfg.objective)
    record = {f"eval/{kind}_{m}": numbers[kind][m] for kind in KINDS for m in ("cIoU", "gIoU")}
    record["eval/caption_len"] = numbers["captions"]["mean_length"]
    record["eval/caption_sensitivity"] = numbers["language_embedding"]["ratio"]
    return record


def write_record(record: dict, metrics_path: Path, tracker=None) -> None:
    """One metrics.jsonl line; its numbers also to TensorBoard when a tracker (the accelerator) is given."""
    with metrics_path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    if tracker is not None:
        tracker.log(
            {k: v for k, v in record.items() if isinstance(v, (int, float)) and v is not None}, step=record["step"]
        )


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio at max_steps (a function of the
    step, so resuming needs no scheduler state)."""
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = min(1.0, (step - o.warmup_steps) / max(1, cfg.max_steps - o.warmup_steps))
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def grad_norms(model) -> dict[str, float]:
    """Gradient norms per trainable group (available when the optimizer is not ZeRO-sharded)."""
    groups: dict[str, float] = Counter()
    for name, p in unwrap(model).named_parameters():
        if p.grad is None:
            continue
        group = "lora" if "lora_" in name else "decoder" if "sam_mask_decoder" in name else name.split(".")[0]
        groups[group] += float(p.grad.detach().float().pow(2).sum())
    return {f"grad_norm/{k}": v**0.5 for k, v in groups.items()}


class StopFlag:
    """SIGTERM / SIGUSR1 ask the run to finish its current optimizer step, checkpoint and exit."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True


def train(cfg: TrainConfig) -> TrainResult:
    configure_environment()
    # cuDNN attention builds a graph per new sequence shape on the host, and this objective's
    # shapes change every step (region size, caption length, KV length while decoding): on an
    # H200 it made a Sa2VA-4B step 1.6x slower (README, "The whole step").
    torch.backends.cuda.enable_cudnn_sdp(cfg.cudnn_attention)
    out_dir = Path(cfg.output_dir)
    accelerator = build_accelerator(
        gradient_accumulation_steps=cfg.grad_accum,
        micro_batch_size=cfg.batch_size,
        gradient_clipping=cfg.optim.grad_clip,
        log_with="tensorboard" if cfg.tensorboard else None,
        project_dir=str(out_dir),
    )
    main = accelerator.is_main_process
    say = accelerator.print
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    deepspeed = accelerator.state.deepspeed_plugin is not None
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    say(
        f"[pg_train] {accelerator.num_processes} process(es) on {accelerator.device}"
        f"{' with DeepSpeed ZeRO-' + str(accelerator.state.deepspeed_plugin.zero_stage) if deepspeed else ''}; output in {out_dir}"
    )

    # ---- build ------------------------------------------------------------------------------
    model = build_student(cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    say(
        f"[pg_train] model {model.preset.name}: {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{sum(p.numel() for p in trainable):,} trainable"
    )
    optimizer = build_optimizer(trainable, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = EMATeacher(
        model,
        decay=cfg.ema.decay,
        placement=cfg.ema.placement,
        warmup=cfg.ema.warmup,
        allow_nonfinite_state=cfg.model.allow_nonfinite_weights,
    )
    accelerator.register_for_checkpointing(ema)
    module = unwrap(model)
    loader = build_loader(
        cfg.data,
        preprocess_for(module.preset),
        cfg.batch_size,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        seed=cfg.seed,
    )
    heldout = []
    if cfg.eval_every:
        from .evaluate import heldout_batches

        # Held-out synthetic scenes drawn like the training ones (sizes, colours, object counts), another seed.
        heldout = heldout_batches(
            module,
            cfg.eval_samples,
            max(2, cfg.batch_size),
            seed=cfg.seed + 10_000,
            device=accelerator.device,
            data=cfg.data,
        )
    if cfg.tensorboard:
        flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in _flatten(to_dict(cfg)).items()}
        accelerator.init_trackers("tensorboard", config=flat)

    # ---- resume -----------------------------------------------------------------------------
    step, nonfinite_total, nonfinite_in_a_row = 0, 0, 0
    checkpoint = newest_checkpoint(out_dir) if cfg.resume == "auto" else Path(cfg.resume) if cfg.resume else None
    if cfg.resume == "auto" and checkpoint is None:
        say("[pg_train] --resume auto: no complete checkpoint yet, starting from step 0")
    if checkpoint is not None:
        check_resume_weights(
            checkpoint, module, ema, allow_nonfinite=cfg.model.allow_nonfinite_weights
        )  # before anything is copied
        accelerator.load_state(str(checkpoint))
        state = load_trainer_state(checkpoint, accelerator.process_index)
        step, nonfinite_total = state["step"], state["nonfinite_total"]
        loader.load_state_dict(state["data"])
        saved_rng = load_rng_state(checkpoint, accelerator.process_index)
        if saved_rng is None:
            say(
                f"[pg_train] {checkpoint} has no rng_state_rank*.pt (an older pg_train): random streams rest on Accelerate's copy"
            )
        else:  # the last thing before the first step, so nothing drawn while resuming shifts dropout or sampling
            set_rng_state(saved_rng)
        say(f"[pg_train] resumed from {checkpoint} at step {step}")
    metrics_path = out_dir / "metrics.jsonl"
    if main and metrics_path.exists():  # drop lines of steps the resumed run will redo
        kept = [line for line in metrics_path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        metrics_path.write_text("".join(line + "\n" for line in kept))

    def trainer_state() -> dict:
        return {
            "step": step,
            "nonfinite_total": nonfinite_total,
            "data": loader.state_dict(),
            "ema_updates": ema.num_updates,
        }

    # ---- loop -------------------------------------------------------------------------------
    stop = StopFlag()
    from tqdm.auto import tqdm

    progress = tqdm(
        total=cfg.max_steps,
        initial=step,
        disable=not (main and cfg.progress),
        dynamic_ncols=True,
        desc="train",
        mininterval=0.1 if sys.stderr.isatty() else 10.0,  # a log file gets a line every 10 s, not every step
    )
    batches = iter(loader)
    history = []
    if cfg.eval_every and step == 0:  # the starting point, so a run shows what training changed
        record = {"step": 0, **held_out_evaluation(model, heldout, cfg)}  # every rank evaluates, as in the loop
        if main:
            write_record(record, metrics_path, accelerator if cfg.tensorboard else None)
    started = time.perf_counter()
    first_step = step
    while step < cfg.max_steps:
        step_start = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        dropped = 0  # micro-batches of this window with a non-finite loss (every rank agrees)
        finite_out = None  # the window's last finite micro-batch, for logging
        norms: dict[str, float] = {}
        for _ in range(cfg.grad_accum):
            batch = next(batches)
            inputs = batch_to_device(batch, accelerator.device)
            inputs["captions"] = batch["captions"]
            # Entered for every micro-batch, lost ones too, so Accelerate's window (and DeepSpeed's
            # accumulation boundary, which follows it) stays aligned with this loop's.
            with accelerator.accumulate(model):
                out = objective_step(model, ema, inputs, cfg)
                # Every rank must agree before backward: a rank that skipped alone would hang the
                # others, and one that did not would all-reduce NaN gradients into everyone.
                bad = (~torch.isfinite(out.loss.detach())).float().reshape(1).to(accelerator.device)
                if accelerator.reduce(bad, "max").item() > 0:
                    dropped += 1
                    nonfinite_total += 1
                    nonfinite_in_a_row += 1
                    if nonfinite_in_a_row >= cfg.max_nonfinite_in_a_row:
                        raise NonFiniteLossError(
                            f"{nonfinite_in_a_row} micro-batches in a row had a non-finite loss (step {step + 1}); "
                            f"stopping. Lower optim.lr, check the data, or raise max_nonfinite_in_a_row."
                        )
                    if not (accelerator.sync_gradients and finite_out is not None):
                        continue  # nothing of it reaches the gradients
                    # The window's last micro-batch is lost but earlier ones left gradients. One
                    # process steps on them as they are; several reduce them (and DeepSpeed steps)
                    # inside the boundary's backward, so every rank runs a backward of exactly
                    # zero (0 x the trainable weights; the NaN graph is never touched).
                    if deepspeed or accelerator.num_processes > 1:
                        accelerator.backward(sum(p.sum() for p in trainable) * 0.0)
                else:
                    nonfinite_in_a_row = 0
                    finite_out = out
                    accelerator.backward(out.loss)
                if accelerator.sync_gradients:
                    if not deepspeed:
                        norms = grad_norms(model)
                        if cfg.optim.grad_clip > 0:
                            accelerator.clip_grad_norm_(trainable, cfg.optim.grad_clip)
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        stepped = finite_out is not None  # a window with no finite micro-batch makes no update
        if stepped:
            ema.update_if_stepped(model, accelerator)
        out = finite_out if finite_out is not None else out  # log the last finite micro-batch
        step += 1

        # ---- evaluate and log ------------------------------------------------------------------
        evaluation = {}
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            evaluation = held_out_evaluation(model, heldout, cfg)
        if step % cfg.log_every == 0 or step == cfg.max_steps or evaluation:
            keys = ("loss", "bce", "dice", "iou", "caption_len_mean", "replaced_fraction", "region_k_mean")
            local = torch.stack([out.metrics[k].float().reshape(()) for k in keys]).to(accelerator.device)
            mean = accelerator.reduce(local, "mean") if accelerator.num_processes > 1 else local
            record = {"step": step, **{k: float(v) for k, v in zip(keys, mean)}}
            record.update({k: float(out.metrics[k]) for k in ("lm_loss", "supervised_iou") if k in out.metrics})
            if not stepped:
                record.update(loss=None, bce=None, dice=None)
            record.update(
                lr=lr,
                skipped_nonfinite=dropped,
                nonfinite_total=nonfinite_total,
                region_k_min=int(out.region_k.min()),
                region_k_max=int(out.region_k.max()),
                region_fallbacks=int(out.region_fallback.sum()),
                caption_len_min=int(out.caption_lengths.min()),
                caption_len_max=int(out.caption_lengths.max()),
                ema_distance=ema.distance_to(model),
                ema_updates=ema.num_updates,
                skipped_samples=dict(loader.skip_counts),
                epoch=loader.epoch,
                step_time_s=time.perf_counter() - step_start,
            )
            record["samples_per_s"] = (
                cfg.batch_size * cfg.grad_accum * accelerator.num_processes / record["step_time_s"]
            )
            if out.text_embeds.grad is not None:
                record["grad_norm/text_embeds"] = float(out.text_embeds.grad.float().norm())
            record.update(norms)
            record.update(evaluation)
            if deepspeed and hasattr(model, "get_global_grad_norm"):
                global_norm = model.get_global_grad_norm()
                record["grad_norm/global"] = float(global_norm) if global_norm is not None else None
            if main:
                write_record(record, metrics_path, accelerator if cfg.tensorboard else None)
            history.append(record)
            progress.set_postfix(
                loss=f"{record['loss']:.3f}" if record["loss"] is not None else "skip",
                iou=f"{record['iou']:.3f}",
                refresh=False,
            )
        progress.update(1)

        # ---- checkpoint / stop ------------------------------------------------------------------
        requested = stop.requested or (cfg.stop_at_step is not None and step >= cfg.stop_at_step)
        stop_now = accelerator.reduce(torch.tensor([float(requested)], device=accelerator.device), "max").item() > 0
        if step % cfg.save_every == 0 or step == cfg.max_steps or stop_now:
            path = save_checkpoint(accelerator, out_dir, step, trainer_state(), cfg.keep_last)
            progress.write(f"[pg_train] checkpoint {path}") if main else None
        if stop_now:
            progress.close()
            say(
                f"[pg_train] stop requested by signal: checkpointed at step {step}; exiting with {REQUEUE_EXIT_CODE} (requeue and resume)"
            )
            accelerator.end_training()
            return TrainResult(REQUEUE_EXIT_CODE, step, history, model, optimizer, ema, loader)

    progress.close()
    elapsed = time.perf_counter() - started
    accelerator.end_training()
    if main:
        _summary(history, step - first_step, elapsed, loader, nonfinite_total, out_dir)
    return TrainResult(0, step, history, model, optimizer, ema, loader)


def _summary(history, steps, elapsed, loader, nonfinite_total, out_dir) -> None:
    tail = [r for r in history[-10:] if r["loss"] is not None]
    mean = lambda key: sum(r[key] for r in tail) / max(1, len(tail))  # noqa: E731
    lines = [
        f"[pg_train] done: {steps} steps in {elapsed:.1f} s ({steps / max(elapsed, 1e-9):.2f} steps/s)",
        f"[pg_train] last {len(tail)} steps: loss {mean('loss'):.4f}, mask IoU {mean('iou'):.3f}, caption length {mean('caption_len_mean'):.1f}",
        f"[pg_train] skipped samples: {dict(loader.skip_counts) or 'none'}; non-finite micro-batches dropped: {nonfinite_total}",
        f"[pg_train] metrics: {out_dir / 'metrics.jsonl'}; checkpoints: {out_dir / 'checkpoints'}",
    ]
    print("\n".join(lines), flush=True)


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


if __name__ == "__main__":
    sys.exit("run training with: accelerate launch launch/train.py [--config F] [key=value ...]")
