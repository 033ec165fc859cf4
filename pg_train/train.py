"""The training loop, as named phases: set_up -> restore -> loop of (optimizer_window -> record ->
evaluate -> checkpoint/stop) -> finish. Read top to bottom; `launch/train.py` is the CLI.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import time
from pathlib import Path

import torch
import yaml

from . import exit_codes
from .accel import build_accelerator, configure_environment
from .builders import (  # noqa: F401 (lora_from_config, unfreeze_extra, load_training_weights: importable from here too)
    build_optimizer,
    build_student,
    load_training_weights,
    lora_from_config,
    unfreeze_extra,
)
from .checkpoint_check import check_training_checkpoint, nonfinite_training_state, state_bytes
from .checkpointing import (
    checkpoint_root,
    complete_checkpoints,
    load_rng_state,
    load_trainer_state,
    save_checkpoint,
    set_rng_state,
)
from .config import ConfigError, TrainConfig, active_trackers, to_dict
from .data import build_loader
from .data.loader import batch_to_device, preprocess_for
from .data.streams import TwoStreams
from .distributed import unwrap
from .ema import EMATeacher
from .model.io.state_check import CheckpointError
from .objectives.anchor import adapters_disabled
from .objectives.mix import labelled_share, objective_kind_at, objective_step, self_training_start
from .overlap import OverlappedTeacher
from .precision import follow_accelerator
from .run_lock import OutputDirLocked, OutputLock, acquire
from .window import NonFiniteGuard, NonFiniteLossError, WindowResult, grad_norms, optimizer_window  # noqa: F401

REQUEUE_EXIT_CODE = exit_codes.REQUEUE  # stopped by SIGTERM/SIGUSR1 after a checkpoint; requeue and resume


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


@dataclasses.dataclass
class GroundingGate:
    """streams.gate_min_gap: self-training counts only once a held-out evaluation's cycle -
    shuffled gIoU reached `min_gap` (the model's own captions ground better than another
    scene's); open from the start without a threshold. Saved with every checkpoint."""

    min_gap: float | None
    open: bool = True

    def __post_init__(self):
        self.open = self.min_gap is None

    def update(self, evaluation: dict) -> float | None:
        """Open on an evaluation whose gap reaches the threshold; the gap when it just opened."""
        if self.open or "eval/cycle_gIoU" not in evaluation:
            return None
        gap = evaluation["eval/cycle_gIoU"] - evaluation["eval/shuffled_gIoU"]
        self.open = gap >= self.min_gap
        return gap if self.open else None


@dataclasses.dataclass
class Run:
    """What set_up builds and every phase reads: the prepared model and optimizer, the teacher,
    the data and where the run writes."""

    cfg: TrainConfig
    accelerator: object
    model: object  # as accelerator.prepare returned it (DDP / DeepSpeed engine or the module)
    optimizer: object
    ema: EMATeacher
    loader: object
    heldout: list  # held-out batches for evaluation (empty: eval_every=0)
    out_dir: Path
    lock: OutputLock | None = None  # the output directory's (main process); released by `train` on every exit
    heldout_set: object = None  # data.heldout.HeldOut: what those batches are (source, split, n)
    gate: GroundingGate = dataclasses.field(default_factory=lambda: GroundingGate(None))
    snapshot: EMATeacher | None = None  # objective.anchor_reference=snapshot: the frozen reference

    def reference(self):
        """The KL anchor's reference, as objectives.anchor takes it (None: no anchor)."""
        kind = self.cfg.objective.anchor_reference
        if not self.cfg.objective.anchor_weight or kind is None:
            return None
        return adapters_disabled if kind == "base" else self.snapshot.as_teacher

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / "metrics.jsonl"

    def say(self, text: str) -> None:
        self.accelerator.print(f"[pg_train] {text}")


@dataclasses.dataclass
class TrainState:
    """What the loop carries from step to step; `state_dict()` is what each checkpoint saves
    beside the model, optimizer, EMA and RNG states."""

    loader: object
    ema: EMATeacher
    guard: NonFiniteGuard
    gate: GroundingGate
    step: int = 0
    history: list = dataclasses.field(default_factory=list)
    overlap: OverlappedTeacher | None = None  # ema.overlap: the batch in flight is part of the state
    restored_captions: dict | None = None  # ema.overlap: the in-flight batch's captions, from a checkpoint

    def state_dict(self) -> dict:
        data = self.overlap.state_dict() if self.overlap else {"data": self.loader.state_dict(), "captions": None}
        return {
            "gate_open": self.gate.open,
            "step": self.step,
            "nonfinite_total": self.guard.total,
            "data": data["data"],
            "teacher_captions": data["captions"],
            "ema_updates": self.ema.num_updates,
        }

    def check_state_dict(self, state: dict) -> None:
        """ValueError naming the field unless `load_state_dict(state)` loads all of it."""
        for key in ("step", "nonfinite_total", "ema_updates"):
            value = state.get(key)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
                raise ValueError(f"{key}={value!r}: expected an int >= 0")
        if "data" not in state:
            raise ValueError("no data position ('data')")
        self.loader.check_state_dict(state["data"])
        if state.get("teacher_captions") is not None and not isinstance(state["teacher_captions"], dict):
            raise ValueError(f"teacher_captions: a dict or null, got {type(state['teacher_captions']).__name__}")

    def load_state_dict(self, state: dict) -> None:
        self.check_state_dict(state)
        self.step, self.guard.total = state["step"], state["nonfinite_total"]
        self.loader.load_state_dict(state["data"])
        self.restored_captions = state.get("teacher_captions")
        self.gate.open = state.get("gate_open", self.gate.open)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio at the end (a function of the step,
    so resuming needs no scheduler state). With streams.self_training_lr, the self-training stage
    (a curriculum's Pseudo-Gumbel stage) has its own warm-up and cosine from that peak, as a
    second run would, and the stage before ends its cosine where it begins."""
    o, peak, start, end = cfg.optim, cfg.optim.lr, 0, cfg.max_steps
    switch = self_training_start(cfg) if cfg.streams.self_training_lr is not None else None
    if switch is not None:
        if step < switch:
            end = switch
        else:
            start, peak = switch, cfg.streams.self_training_lr
    step, steps = step - start, end - start
    if step < o.warmup_steps:
        return peak * (step + 1) / o.warmup_steps
    progress = min(1.0, (step - o.warmup_steps) / max(1, steps - o.warmup_steps))
    return peak * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def training_inputs(batch: dict, device) -> dict:
    """A loader batch as the objectives take it: its tensors on `device`, the captions (text) as they are."""
    return {**batch_to_device(batch, device), "captions": batch["captions"]}


def micro_batches(run: Run, state: TrainState):
    """The objective's inputs, batch after batch; with ema.overlap, captioned one step ahead by
    the teacher in a background thread (pg_train.overlap)."""
    to_inputs = lambda batch: training_inputs(batch, run.accelerator.device)  # noqa: E731
    if run.cfg.streams.enabled:
        return ({k: None if b is None else to_inputs(b) for k, b in pair.items()} for pair in run.loader)
    if not run.cfg.ema.overlap:
        return (to_inputs(batch) for batch in run.loader)
    state.overlap = OverlappedTeacher(run.loader, to_inputs, run.ema, run.cfg.objective, state.restored_captions)
    return state.overlap


# ---- records ------------------------------------------------------------------------------------
def held_out_evaluation(model, heldout: list[dict], cfg: TrainConfig, heldout_set=None) -> dict[str, float | str]:
    """pg_train.evaluate's numbers on the held-out batches, as `eval/*` metrics, with what the
    set is (`eval/set`: source, split, n) and how many samples were scored (`eval/samples`)."""
    from .evaluate import KINDS, evaluate

    numbers = evaluate(model, heldout, cfg.objective)
    record = {f"eval/{kind}_{m}": numbers[kind][m] for kind in KINDS for m in ("cIoU", "gIoU")}
    record["eval/caption_len"] = numbers["captions"]["mean_length"]
    record["eval/caption_sensitivity"] = numbers["language_embedding"]["ratio"]
    record["eval/samples"] = numbers["samples"]
    if heldout_set is not None:
        record["eval/set"] = heldout_set.label()
    record["eval/cycle_minus_shuffled_gIoU"] = numbers["cycle_minus_shuffled_gIoU"]  # drift (issue 26)
    record["eval/caption_token_f1"] = numbers["captions"]["token_f1"]
    record["eval/caption_exact"] = numbers["captions"]["exact"]
    return record


def write_record(record: dict, metrics_path: Path, tracker=None) -> None:
    """One metrics.jsonl line; its numbers also to TensorBoard when a tracker (the accelerator) is given."""
    with metrics_path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    if tracker is not None:
        tracker.log(
            {k: v for k, v in record.items() if isinstance(v, (int, float)) and v is not None}, step=record["step"]
        )


def step_record(run: Run, state: TrainState, window: WindowResult, lr: float, seconds: float) -> dict:
    """The metrics.jsonl line of a step: every number the objective declared in its `metrics`
    (averaged over ranks), then the step's own: lr, non-finite drops, region and caption ranges,
    the EMA, the data and the time."""
    out, accelerator, cfg = window.out, run.accelerator, run.cfg
    keys = sorted(out.metrics)
    local = torch.stack([out.metrics[k].float().reshape(()) for k in keys]).to(accelerator.device)
    mean = accelerator.reduce(local, "mean") if accelerator.num_processes > 1 else local
    record = {"step": state.step, "objective": objective_kind_at(state.step - 1, cfg, run.gate.open)}
    record.update({k: float(v) for k, v in zip(keys, mean)})
    if not window.stepped:
        record.update(loss=None, bce=None, dice=None)
    record.update(
        lr=lr,
        skipped_nonfinite=window.dropped,
        nonfinite_total=state.guard.total,
        region_k_min=int(out.region_k.min()),
        region_k_max=int(out.region_k.max()),
        region_fallbacks=int(out.region_fallback.sum()),
        caption_len_min=int(out.caption_lengths.min()),
        caption_len_max=int(out.caption_lengths.max()),
        ema_distance=run.ema.log_distance(run.model),
        ema_updates=run.ema.num_updates,
        skipped_samples=dict(run.loader.skip_counts),
        epoch=run.loader.epoch,
        step_time_s=seconds,
        samples_per_s=cfg.batch_size * cfg.grad_accum * accelerator.num_processes / seconds,
    )
    if cfg.streams.gate_min_gap is not None:
        record["gate_open"] = int(run.gate.open)
    if out.text_embeds.retains_grad and out.text_embeds.grad is not None:  # pseudo-label / supervised: no retained grad
        record["grad_norm/text_embeds"] = float(out.text_embeds.grad.float().norm())
    record.update(window.grad_norms)
    if hasattr(run.model, "get_global_grad_norm"):  # DeepSpeed: the norms are sharded; it has the global one
        global_norm = run.model.get_global_grad_norm()
        record["grad_norm/global"] = float(global_norm) if global_norm is not None else None
    return record


class StopFlag:
    """SIGTERM / SIGUSR1 ask the run to finish its current optimizer step, checkpoint and exit."""

    def __init__(self):
        from .job import stop_requested_early

        self.requested = stop_requested_early()  # asked while the CLI was still starting up
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True


# ---- the phases ---------------------------------------------------------------------------------
def set_up(cfg: TrainConfig) -> Run:
    """Accelerator, student, optimizer, EMA teacher, data and held-out batches; the resolved config
    written to the output directory."""
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
        log_with=tracker_list(cfg, out_dir) or None,
        project_dir=str(out_dir),
    )
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    lock = claim_output_dir(accelerator, out_dir)
    try:
        return _build(cfg, accelerator, out_dir, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def tracker_list(cfg: TrainConfig, out_dir: Path) -> list:
    """Accelerate's `log_with`: TensorBoard as a tracker of our own making, so its events stay in
    OUTPUT_DIR/tensorboard/ whatever the project name; the others by name, filed under
    cfg.tracker_project."""
    from accelerate.tracking import TensorBoardTracker

    return [
        TensorBoardTracker("tensorboard", out_dir) if name == "tensorboard" else name for name in active_trackers(cfg)
    ]


def claim_output_dir(accelerator, out_dir: Path) -> OutputLock | None:
    """The main process takes the output directory's lock before anything is written there;
    every rank learns whether it did, so all of them refuse together (OutputDirLocked)."""
    lock, refusal = None, None
    if accelerator.is_main_process:
        try:
            lock = acquire(out_dir, say=accelerator.print)
        except OutputDirLocked as err:
            refusal = err
    flag = torch.tensor([float(refusal is not None)], device=accelerator.device)
    if accelerator.num_processes > 1 and accelerator.reduce(flag, "max").item() > 0 and refusal is None:
        if lock is not None:
            lock.release()
        raise OutputDirLocked(f"{out_dir} is in use by another run (refused by the main process)")
    if refusal is not None:
        raise refusal
    return lock


def open_data(cfg: TrainConfig):
    """The training source and the held-out set (the eval: section's, else carved out of the
    training data when eval_every > 0). A source that cannot be opened as configured (a path that
    is not there, a Hugging Face column the dataset lacks, a split it does not have) is a
    configuration error (exit 2), raised before the model is built."""
    from .data.heldout import split_run_data

    try:
        return split_run_data(cfg.data, cfg.eval, cfg.seed, cfg.eval_samples, carve_out=bool(cfg.eval_every))
    except (ValueError, OSError, KeyError) as err:
        raise ConfigError(f"data (source {cfg.data.source}): {err}") from err


def _build(cfg: TrainConfig, accelerator, out_dir: Path, lock: OutputLock | None) -> Run:
    plugin = accelerator.state.deepspeed_plugin
    if accelerator.is_main_process:
        (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    accelerator.print(
        f"[pg_train] {accelerator.num_processes} process(es) on {accelerator.device}"
        f"{' with DeepSpeed ZeRO-' + str(plugin.zero_stage) if plugin else ''}; output in {out_dir}"
    )
    train_source, heldout_set = open_data(cfg)  # before the model: a data mistake costs no model build
    model = build_student(cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    accelerator.print(
        f"[pg_train] model {model.preset.name}: {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{sum(p.numel() for p in trainable):,} trainable"
    )
    model, optimizer = accelerator.prepare(model, build_optimizer(trainable, cfg))
    follow_accelerator(model, accelerator)  # the teacher computes in the student's dtype
    ema = EMATeacher(
        model,
        decay=cfg.ema.decay,
        placement=cfg.ema.placement,
        warmup=cfg.ema.warmup,
        update_stages=cfg.ema.update_stages,
        allow_nonfinite_state=cfg.model.allow_nonfinite_weights,
    )
    accelerator.register_for_checkpointing(ema)
    module = unwrap(model)
    gate, snapshot = GroundingGate(cfg.streams.gate_min_gap), None
    if cfg.objective.anchor_weight and cfg.objective.anchor_reference == "snapshot":
        snapshot = EMATeacher(model, decay=0.0)  # never updated: the trainable tensors as they start
        accelerator.register_for_checkpointing(snapshot)
    shard = {"rank": accelerator.process_index, "world_size": accelerator.num_processes, "seed": cfg.seed}
    if cfg.streams.enabled:
        loader = TwoStreams(
            *stream_loaders(cfg, preprocess_for(module.preset), shard, train_source),
            cfg.batch_size,
            lambda step: labelled_share(cfg, step, gate.open),
            cfg.grad_accum,
        )
    else:
        loader = build_loader(cfg.data, preprocess_for(module.preset), cfg.batch_size, **shard, source=train_source)
    heldout = []
    if cfg.eval_every:
        from .evaluate import batches_of

        heldout = batches_of(module, heldout_set, max(2, cfg.batch_size), accelerator.device, cfg.eval_samples)
        accelerator.print(f"[pg_train] held-out set: {heldout_set.label()}")
        if accelerator.is_main_process:
            (out_dir / "heldout.json").write_text(json.dumps(heldout_set.description, indent=2) + "\n")
    if active_trackers(cfg):
        flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in _flatten(to_dict(cfg)).items()}
        accelerator.init_trackers(cfg.tracker_project, config=flat)
    return Run(cfg, accelerator, model, optimizer, ema, loader, heldout, out_dir, lock, heldout_set, gate, snapshot)


def stream_loaders(cfg: TrainConfig, preprocess, shard: dict, train_source) -> tuple:
    """The labelled and the unlabelled stream's loaders, one sample per batch (a stream's position
    is a sample count). A stream whose section equals `data:` reads the run's training source
    (the held-out set carved out of it); two streams with equal sections are one loader (one
    shuffled order both draw from: a curriculum's warm-up and its Pseudo-Gumbel stage continue
    one order, as with one stream)."""
    s = cfg.streams

    def loader(data):
        return build_loader(data, preprocess, 1, **shard, source=train_source if data == cfg.data else None)

    labelled = loader(s.labelled)
    return labelled, labelled if s.unlabelled == s.labelled else loader(s.unlabelled)


def restore(run: Run) -> TrainState:
    """Step 0, or the state of the checkpoint `cfg.resume` names (`auto`: the newest complete one
    that validates, saying which were skipped and why), validated completely on every rank
    before anything is copied; metrics.jsonl lines of steps to be redone are dropped."""
    cfg, accelerator = run.cfg, run.accelerator
    state = TrainState(run.loader, run.ema, NonFiniteGuard(cfg.max_nonfinite_in_a_row), run.gate)
    checkpoint = resumable_checkpoint(run, state)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        state.load_state_dict(load_trainer_state(checkpoint, accelerator.process_index))
        saved_rng = load_rng_state(checkpoint, accelerator.process_index)
        if saved_rng is None:
            run.say(
                f"{checkpoint} has no rng_state_rank*.pt (an older pg_train): random streams rest on Accelerate's copy"
            )
        else:  # the last thing before the first step, so nothing drawn while resuming shifts dropout or sampling
            set_rng_state(saved_rng)
        run.say(f"resumed from {checkpoint} at step {state.step}")
    if run.main and run.metrics_path.exists():  # drop lines of steps the resumed run will redo
        lines = run.metrics_path.read_text().splitlines()
        kept = [line for line in lines if line and json.loads(line)["step"] <= state.step]
        run.metrics_path.write_text("".join(line + "\n" for line in kept))
    return state


def refusal(run: Run, state: TrainState, checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed (on any rank), or None: every rank validates what it
    will load (`check_training_checkpoint`) and all learn the verdict, so all pick the same one."""
    reason = None
    try:
        check_training_checkpoint(
            checkpoint,
            model=run.model,
            optimizer=run.optimizer,
            ema=run.ema,
            check_trainer_state=state.check_state_dict,
            rank=run.accelerator.process_index,
            world_size=run.accelerator.num_processes,
            allow_nonfinite=run.cfg.model.allow_nonfinite_weights,
        )
    except CheckpointError as err:
        reason = str(err)
    flag = torch.tensor([float(reason is not None)], device=run.accelerator.device)
    if run.accelerator.num_processes > 1 and run.accelerator.reduce(flag, "max").item() > 0 and reason is None:
        reason = f"{checkpoint}: refused by another rank (its message says why)"
    return reason


def resumable_checkpoint(run: Run, state: TrainState) -> Path | None:
    """`resume=PATH`: that checkpoint, validated (CheckpointError if refused). `resume=auto`:
    the newest complete checkpoint that validates, each newer one skipped with its reason; an
    error if checkpoints exist but none validates (starting over would discard them silently)."""
    cfg = run.cfg
    if not cfg.resume:
        return None
    if cfg.resume != "auto":
        reason = refusal(run, state, Path(cfg.resume))
        if reason is not None:
            raise CheckpointError(reason)
        return Path(cfg.resume)
    found = complete_checkpoints(run.out_dir)
    if not found:
        run.say("--resume auto: no complete checkpoint yet, starting from step 0")
        return None
    skipped = []
    for checkpoint in reversed(found):
        reason = refusal(run, state, checkpoint)
        if reason is None:
            return checkpoint
        skipped.append(reason)
        run.say(f"--resume auto: skipping {checkpoint.name}: {reason}")
    raise CheckpointError(
        f"--resume auto: none of the {len(found)} checkpoints in {checkpoint_root(run.out_dir)} validates "
        f"(move them away to start over):\n" + "\n".join(skipped)
    )


def evaluate_if_due(run: Run, state: TrainState) -> dict:
    """Held-out evaluation every eval_every steps, at the last step, and at step 0 (the starting
    point, so a run shows what training changed). Every rank evaluates."""
    every, step = run.cfg.eval_every, state.step
    if every and (step % every == 0 or step == run.cfg.max_steps):
        return held_out_evaluation(run.model, run.heldout, run.cfg, run.heldout_set)
    return {}


class NonFiniteStateError(RuntimeError):
    """The model, EMA or optimizer state holds NaN/Inf: no checkpoint is written from it."""


def refuse_nonfinite_state(run: Run, state: TrainState) -> None:
    """Before a save: weights, EMA shadow, optimizer moments (and ZeRO's fp32 master copies)
    finite on every rank, one sum per tensor; otherwise stop without writing, so the newest
    checkpoint (kept by rotation) stays the last good one. `model.allow_nonfinite_weights`
    (inspection only) saves anyway."""
    if run.cfg.model.allow_nonfinite_weights:
        return
    report = nonfinite_training_state(run.model, run.ema, run.optimizer)
    flag = torch.tensor([float(bool(report))], device=run.accelerator.device)
    if run.accelerator.num_processes > 1:
        flag = run.accelerator.reduce(flag, "max")
    if flag.item() > 0:
        detail = ":\n    " + "\n    ".join(report[:30]) if report else " (on another rank; its message names them)"
        raise NonFiniteStateError(
            f"step {state.step}: the training state holds NaN or Inf, so no checkpoint is written "
            f"(the newest in {checkpoint_root(run.out_dir)} is the last good one){detail}"
        )


def checkpoint_or_stop(run: Run, state: TrainState, stop: StopFlag, progress) -> bool:
    """Checkpoint when due, or when a stop was requested on any rank; True: stop now."""
    cfg = run.cfg
    requested = stop.requested or (cfg.stop_at_step is not None and state.step >= cfg.stop_at_step)
    flag = torch.tensor([float(requested)], device=run.accelerator.device)
    stop_now = run.accelerator.reduce(flag, "max").item() > 0
    if state.step % cfg.save_every == 0 or state.step == cfg.max_steps or stop_now:
        refuse_nonfinite_state(run, state)
        path = save_checkpoint(
            run.accelerator,
            run.out_dir,
            state.step,
            state.state_dict(),
            cfg.keep_last,
            ema=run.ema,
            needed_bytes=state_bytes(run.model, run.ema, run.optimizer),
        )
        if run.main:
            progress.write(f"[pg_train] checkpoint {path}")
    return stop_now


def begin_stage_if_due(run: Run, state: TrainState, progress) -> None:
    """Where the self-training stage begins (streams.self_weight turns > 0; a curriculum's switch):
    with streams.restart_ema its teacher is the warmed-up student, and the anchor's snapshot is taken."""
    cfg = run.cfg
    if state.step != self_training_start(cfg):
        return
    if cfg.streams.restart_ema:
        run.ema.restart_from(run.model)
    if run.snapshot is not None:
        run.snapshot.restart_from(run.model)
    if run.main:  # status lines: the main process's, once
        kind = {"pseudo_gumbel": "Pseudo-Gumbel", "pseudo_label": "pseudo-labels"}[cfg.objective_kind]
        also = " + supervised" if objective_kind_at(state.step, cfg).endswith("+supervised") else ""
        then = "from here" if run.gate.open else "once the grounding gate opens (supervised until then)"
        progress.write(f"[pg_train] step {state.step}: supervised warm-up done, {kind}{also} {then}")


def open_gate_if_due(run: Run, state: TrainState, evaluation: dict, progress) -> None:
    """The grounding gate opens on the first evaluation whose cycle - shuffled gap reaches
    streams.gate_min_gap; the run says so, and the anchor's snapshot is taken then."""
    gap = run.gate.update(evaluation)
    if gap is not None:
        if run.snapshot is not None:
            run.snapshot.restart_from(run.model)
        if run.main:
            progress.write(
                f"[pg_train] step {state.step}: grounding gate open (held-out cycle - shuffled gIoU {gap:.3f} >= "
                f"{run.cfg.streams.gate_min_gap}), self-training from here"
            )


def log_step(run: Run, state: TrainState, window: WindowResult, lr: float, seconds: float, evaluation: dict, progress):
    """The step's record to metrics.jsonl (and TensorBoard) every log_every steps, at the last
    step and with every evaluation; the progress bar's loss and IoU."""
    cfg = run.cfg
    if not (state.step % cfg.log_every == 0 or state.step == cfg.max_steps or evaluation):
        return
    record = {**step_record(run, state, window, lr, seconds), **evaluation}
    if run.main:
        write_record(record, run.metrics_path, run.accelerator if active_trackers(cfg) else None)
    state.history.append(record)
    loss = "skip" if record["loss"] is None else f"{record['loss']:.3f}"
    progress.set_postfix(loss=loss, iou=f"{record['iou']:.3f}", refresh=False)


def train(cfg: TrainConfig) -> TrainResult:
    """set_up -> restore -> the loop -> finish; the output directory's lock is released on every
    way out (a stop, an error, the end)."""
    stop = StopFlag()  # first: a SIGTERM while the model is built still ends in a checkpoint and 75
    run = set_up(cfg)
    try:
        return _train(run, stop)
    finally:
        if run.lock is not None:
            run.lock.release()


def _train(run: Run, stop: StopFlag) -> TrainResult:
    cfg = run.cfg
    state = restore(run)
    if state.step >= cfg.max_steps:  # resuming a finished run: nothing to train
        finish(run, state)
        if run.main:
            print("\n".join(already_finished(state.step, cfg.max_steps, run.out_dir)), flush=True)
        return TrainResult(0, state.step, state.history, run.model, run.optimizer, run.ema, run.loader)
    from tqdm.auto import tqdm

    progress = tqdm(
        total=cfg.max_steps,
        initial=state.step,
        disable=not (run.main and cfg.progress),
        dynamic_ncols=True,
        desc="train",
        mininterval=0.1 if sys.stderr.isatty() else 10.0,  # a log file gets a line every 10 s, not every step
    )
    if cfg.eval_every and state.step == 0:  # the starting point, so a run shows what training changed
        record = {
            "step": 0,
            **held_out_evaluation(run.model, run.heldout, cfg, run.heldout_set),
        }  # every rank evaluates
        if run.main:
            write_record(record, run.metrics_path, run.accelerator if active_trackers(cfg) else None)
        open_gate_if_due(run, state, record, progress)
    if not run.gate.open:
        run.say(
            f"grounding gate closed: only the labelled stream trains until held-out cycle - shuffled gIoU "
            f">= {cfg.streams.gate_min_gap}"
        )
    batches = micro_batches(run, state)
    started, first_step = time.perf_counter(), state.step
    while state.step < cfg.max_steps:
        step_start, lr = time.perf_counter(), lr_at(state.step, cfg)
        kind = objective_kind_at(state.step, cfg, run.gate.open)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        begin_stage_if_due(run, state, progress)
        window = optimizer_window(
            batches,
            lambda batch, observer: objective_step(
                run.model, run.ema, batch, cfg, kind, observer, run.reference(), state.step, run.gate.open
            ),
            model=run.model,
            optimizer=run.optimizer,
            ema=run.ema,
            accelerator=run.accelerator,
            grad_accum=cfg.grad_accum,
            grad_clip=cfg.optim.grad_clip,
            guard=state.guard,
            step=state.step,
        )
        state.step += 1
        evaluation = evaluate_if_due(run, state)
        open_gate_if_due(run, state, evaluation, progress)
        log_step(run, state, window, lr, time.perf_counter() - step_start, evaluation, progress)
        progress.update(1)
        if checkpoint_or_stop(run, state, stop, progress):
            progress.close()
            run.say(f"stop requested: checkpointed at step {state.step}; exiting with {REQUEUE_EXIT_CODE} (requeue)")
            finish(run, state)
            return TrainResult(
                REQUEUE_EXIT_CODE, state.step, state.history, run.model, run.optimizer, run.ema, run.loader
            )
    progress.close()
    elapsed = time.perf_counter() - started
    finish(run, state)
    if run.main:
        _summary(state.history, state.step - first_step, elapsed, run.loader, state.guard.total, run.out_dir)
        if cfg.report:
            from .gallery import gallery_samples
            from .report import finish_run

            samples = gallery_samples(unwrap(run.model), run.heldout, cfg.objective) if run.heldout else []
            print(f"[pg_train] report: {finish_run(samples, run.out_dir)}")
    return TrainResult(0, state.step, state.history, run.model, run.optimizer, run.ema, run.loader)


def finish(run: Run, state: TrainState) -> None:
    """The teacher's thread joined, the trackers ended."""
    if state.overlap is not None:
        state.overlap.close()
    run.accelerator.end_training()


HELD_OUT_MEANING = {
    "referring": "ground-truth description -> mask (referring segmentation)",
    "cycle": "the model's own caption of region 1 -> mask in image 2 (what self-training trains)",
    "shuffled": "another sample's description -> mask (control: what masks get without the right text)",
    "empty": "no text -> mask (control)",
}


def held_out_summary(metrics_path: Path) -> list[str]:
    """Held-out gIoU at the first and the last evaluation of metrics.jsonl, with what each means;
    referring/cycle above the controls is what grounding (masks that follow the text) looks like."""
    if not metrics_path.exists():
        return []
    evals = [r for r in map(json.loads, metrics_path.read_text().splitlines()) if "eval/cycle_gIoU" in r]
    if not evals:
        return []
    first, last = evals[0], evals[-1]
    on = f" on {last['eval/set']}" if "eval/set" in last else ""
    lines = [f"[pg_train] held-out gIoU (mean per-sample mask IoU){on}, step {first['step']} -> step {last['step']}:"]
    for kind, meaning in HELD_OUT_MEANING.items():
        a, b = first[f"eval/{kind}_gIoU"], last[f"eval/{kind}_gIoU"]
        lines.append(f"[pg_train]   {kind:9} {a:.3f} -> {b:.3f} ({b - a:+.3f})  {meaning}")
    return lines


def already_finished(step: int, max_steps: int, out_dir: Path) -> list[str]:
    """What resuming a finished run prints: that there is nothing to do and the run's last numbers
    (not a summary of zero steps, which reads like a failure)."""
    lines = [
        f"[pg_train] already finished: the checkpoint is at step {step}, max_steps is {max_steps}; nothing to do "
        "(a larger --max-steps trains on from it)"
    ]
    path = Path(out_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []
    trained = [r for r in records if r.get("loss") is not None]
    if trained:
        r = trained[-1]
        lines.append(f"[pg_train] last logged step {r['step']}: loss {r['loss']:.4f}, mask IoU {r['iou']:.3f}")
    lines += held_out_summary(path)
    lines.append(f"[pg_train] metrics: {path}; checkpoints: {Path(out_dir) / 'checkpoints'}")
    return lines


def _summary(history, steps, elapsed, loader, nonfinite_total, out_dir) -> None:
    tail = [r for r in history[-10:] if r["loss"] is not None]
    mean = lambda key: sum(r[key] for r in tail) / max(1, len(tail))  # noqa: E731
    lines = [
        f"[pg_train] done: {steps} steps in {elapsed:.1f} s ({steps / max(elapsed, 1e-9):.2f} steps/s)",
        f"[pg_train] last {len(tail)} steps: loss {mean('loss'):.4f}, mask IoU {mean('iou'):.3f}, caption length {mean('caption_len_mean'):.1f}",
        *held_out_summary(Path(out_dir) / "metrics.jsonl"),
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
