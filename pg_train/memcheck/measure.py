"""Measure a few real steps phase by phase, account for every tensor, and run the audits.

Each step is `pg_train.window.optimizer_window`, the optimizer step training runs, with the
forward training calls for the kind of step measured (`objectives.mix.objective_step`: the
supervised warm-up, the two-stream step, ...; without a training config `pseudo_gumbel_step`
itself), observed stage by stage (each stage a measured phase: the objective's stages, each
part's named `part: stage` when a step runs several, then backward, the optimizer step and the EMA
update). The audits therefore see the production step's outputs: a detach, a teacher without the EMA weights,
frozen LoRA or checkpointing that is off in the real code fails them. `inject` reproduces the
design note's three suspected bugs on purpose (through hooks and arguments, not by patching), to
show that the audits catch them; `frozen-vit-keeps-graph` is a memory leak the activation check
(not an audit) must catch.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..bench.memory import PeakMemory, SavedTensorBytes
from ..distributed import unwrap
from ..ema import EMATeacher
from ..model.decoding import graph_decode
from ..objectives.mix import objective_step
from ..objectives.pseudo_gumbel import pseudo_gumbel_step
from ..objectives.settings import PseudoGumbelConfig
from .bugs import BUGS  # noqa: F401  (memcheck.BUGS, measure.BUGS: the injectable bugs)
from .predict import gradient_free
from .steps import StepKind

if TYPE_CHECKING:
    from ..config import TrainConfig


@dataclass
class Audit:
    name: str
    passed: bool
    evidence: list[str] = field(default_factory=list)


@dataclass
class Measurement:
    device: str
    static: dict[str, int] = field(default_factory=dict)  # component -> bytes held (exact)
    phases: dict[str, dict] = field(default_factory=dict)  # phase -> {"s", "peak_bytes", ...}
    peak_bytes: int = 0  # highest memory seen during the measured step, above the step's start (CPU) or absolute (CUDA)
    first_step_growth: int = 0  # CPU: RSS growth over the first step (gradients and optimizer state are allocated then)
    audits: list[Audit] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    stages: list[str] = field(default_factory=list)  # the stages the objective reported, in order (last step)
    step: str = "pseudo_gumbel"  # the kind of step measured (StepKind.label)


def storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or not torch.is_tensor(t) or t.device.type == "meta":
            continue
        key = (t.device, t.untyped_storage().data_ptr())
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def zero_optimizer(optimizer):
    """DeepSpeed's ZeRO optimizer inside Accelerate's wrapper, or None."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if inner is not None and hasattr(inner, "single_partition_of_fp32_groups") else None


def optimizer_tensors(optimizer) -> list[torch.Tensor]:
    """Everything the optimizer holds for training: its state, and under ZeRO the fp32 master
    partition of this rank."""
    zero = zero_optimizer(optimizer)
    inner = zero.optimizer if zero is not None else getattr(optimizer, "optimizer", optimizer)
    tensors = [v for state in inner.state.values() for v in state.values() if torch.is_tensor(v)]
    if zero is not None:
        tensors += list(zero.single_partition_of_fp32_groups)
    return tensors


def tensor_accounting(model, optimizer, ema) -> dict[str, int]:
    """Exact bytes of the unique storages each component holds. Under ZeRO the reduced gradient
    partitions are released by DeepSpeed's own step, so gradients are not counted there."""
    params = list(model.parameters())
    counted = {
        "frozen weights": storage_bytes(p for p in params if not p.requires_grad),
        "buffers": storage_bytes(model.buffers()),
        "trainable weights": storage_bytes(p for p in params if p.requires_grad),
        "gradients": storage_bytes(p.grad for p in params),
        "optimizer state": storage_bytes(optimizer_tensors(optimizer)),
        "EMA": sum(ema.memory_bytes().values()) if ema is not None else 0,
    }
    buckets = sum(b.nbytes() for b in graph_decode.buckets_of(unwrap(model).language_model))
    if buckets:  # fast decoding: the static KV cache and buffers kept between steps
        counted["decoding buckets"] = buckets
    if zero_optimizer(optimizer) is not None:
        del counted["gradients"]
    return counted


class _Phase:
    """Time, memory peak above entry, and (exactly) the bytes autograd saves for backward."""

    def __init__(self, measurement: Measurement, name: str, device: torch.device, params: tuple = ()):
        self.m, self.name, self.device, self.params = measurement, name, device, params

    def __enter__(self):
        self.saved = SavedTensorBytes(exclude=self.params).__enter__()
        self.meter = PeakMemory(self.device).__enter__()
        self.start = time.perf_counter()
        self.entry = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else None
        return self

    def __exit__(self, *exc):
        self.meter.__exit__(*exc)
        self.saved.__exit__(*exc)
        record = {
            "s": round(time.perf_counter() - self.start, 4),
            "peak_above_entry": self.meter.peak_bytes,
            "saved_for_backward": self.saved.bytes,
        }
        if self.device.type == "cuda":
            record["peak_allocated"] = self.entry + self.meter.peak_bytes
            record["reserved"] = torch.cuda.memory_reserved(self.device)
            free, total = torch.cuda.mem_get_info(self.device)
            record["non_pytorch"] = (total - free) - torch.cuda.memory_reserved(self.device)
        self.m.phases[self.name] = record
        return False


def build_step_batch(model, kind: StepKind, streams: bool, device: torch.device, seed: int = 0) -> dict:
    """The inputs of one micro-batch of `kind`: with two streams {"labelled", "unlabelled"} of
    their samples (None for a part the step does not run), as pg_train.data.streams yields them;
    else one batch (every part of a step reads the same samples)."""
    if not streams:
        return build_batch(model, kind.parts[0][1], device, seed)
    samples = dict(kind.parts)
    labelled, unlabelled = samples.get("supervised", 0), sum(n for o, n in kind.parts if o != "supervised")
    return {
        "labelled": build_batch(model, labelled, device, seed) if labelled else None,
        "unlabelled": build_batch(model, unlabelled, device, seed + 1) if unlabelled else None,
    }


def with_seeds(batch: dict, offset: int) -> dict:
    """The batch (or each stream's part) with fixed per-sample seeds."""
    if "labelled" in batch:
        return {name: with_seeds(part, offset) if part is not None else None for name, part in batch.items()}
    return {**batch, "sample_seeds": torch.arange(batch["region_masks1"].shape[0]) + offset}


def batch_samples(batch: dict) -> int:
    parts = (
        [batch[k] for k in ("labelled", "unlabelled") if batch.get(k) is not None] if "labelled" in batch else [batch]
    )
    return sum(part["region_masks1"].shape[0] for part in parts)


def build_batch(model, batch_size: int, device: torch.device, seed: int = 0, pairing: str = "augment") -> dict:
    """Real preprocessing of synthetic pairs at the preset's sizes (`pairing`: see DataConfig)."""
    from ..data import PairDataset, SyntheticPairs, collate_pairs
    from ..data.loader import batch_to_device, preprocess_for

    preset = model.preset
    preprocess = preprocess_for(preset)
    # A tiling preset sees the 1024-px inputs of SPEC §2 as 9 tiles + thumbnail (as memcheck's
    # prediction assumes by default); untiled presets keep the scenes' native 448 px.
    image_size = 1024 if preprocess.tiling.dynamic else 448
    dataset = PairDataset(SyntheticPairs(batch_size, seed=seed, pairing=pairing, image_size=image_size), preprocess)
    batch = collate_pairs([dataset[i] for i in range(batch_size)])
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    return {**batch_to_device(batch, device, dtype), "captions": batch["captions"]}  # the supervised objective's text


PHASES = {  # the objectives' stages -> memcheck's phase names (predict's for the passes)
    "teacher": "teacher generation",
    "mask": "masking",
    "pass1": "pass 1 (caption logits)",
    "gumbel": "gumbel",
    "pass2": "pass 2 (segment)",
    "loss": "loss",
}


def _detach_pass2_input(module, args, kwargs):
    """`--inject detach-text-embeds`: a forward pre-hook on the student that cuts pass 2's caption
    embeddings off the graph (a hook, so the step measured is still the production one)."""
    if kwargs.get("mode") == "segment":
        kwargs = {**kwargs, "caption_embeds": kwargs["caption_embeds"].detach()}
    return args, kwargs


class _FrozenTowerGraph:
    """`--inject frozen-vit-keeps-graph`: a leak the activation check must catch (no audit does).
    The frozen vision tower runs with grad enabled on pixels that require grad (as when the
    no-grad guard of a frozen tower is lost and an input asks for a gradient): it keeps every
    activation for backward though none of its tensors trains."""

    def __init__(self, tower: torch.nn.Module):
        self.grad = []
        self.hooks = [
            tower.register_forward_pre_hook(self._enter),
            tower.register_forward_hook(self._exit),
        ]

    def _enter(self, module, args):
        self.grad.append(torch.enable_grad())
        self.grad[-1].__enter__()
        return (args[0].detach().requires_grad_(True), *args[1:])

    def _exit(self, module, args, output):
        self.grad.pop().__exit__(None, None, None)

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


class _TeacherProbe:
    """Inside the teacher stage: at the first lm_head call of whichever model generates
    (the student with the EMA swapped in, or a separate teacher), whether its trainable tensors
    hold the shadow's values. Compared by value, tensor by tensor (no copy of the weights)."""

    def __init__(self, ema: EMATeacher, model):
        self.ema, self.model, self.seen = ema, model, None

    def _differs(self, root) -> list[str]:
        named = dict(root.named_parameters())
        return [
            n
            for n, s in zip(self.ema.names, self.ema.shadow)
            if not torch.equal(named[n].detach(), s.to(named[n].device, named[n].dtype))
        ]

    def __enter__(self):
        self.shadow_vs_student = len(self._differs(self.model))  # before the swap: does the check say anything?
        roots = [self.model] + ([self.ema.teacher_model] if self.ema.teacher_model is not None else [])
        self.hooks = [root.language_model.lm_head.register_forward_pre_hook(self._hook(root)) for root in roots]
        return self

    def _hook(self, root):
        def probe(_module, _args):
            if self.seen is None:
                self.seen = {
                    "model": "the student" if root is self.model else "the separate teacher",
                    "not_shadow": self._differs(root),
                }

        return probe

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()
        return False


def decoder_layers(model) -> list[torch.nn.Module]:
    return [mod for mod in model.language_model.modules() if type(mod).__name__.endswith("DecoderLayer")]


class _SkippedStep:
    """--inject no-optimizer-step: the optimizer with a step that does nothing (the bug the
    optimizer audit must catch); everything else is the real optimizer's."""

    def __init__(self, optimizer):
        self.optimizer, self.param_groups = optimizer, optimizer.param_groups

    def step(self, *args, **kwargs) -> None:
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)


def measure(
    model,
    optimizer,
    ema: EMATeacher | None,
    cfg: PseudoGumbelConfig,
    batch: dict,
    steps: int = 2,
    inject: tuple[str, ...] = (),
    accelerator=None,
    gradient_checkpointing: bool = False,
    grad_clip: float = 0.0,
    kind: StepKind | None = None,
    train_cfg: TrainConfig | None = None,
) -> Measurement:
    """Run `steps` training steps; phases and audits come from the last one (the first warms up).

    Each step is `pg_train.window.optimizer_window` — the optimizer step training runs: forward
    (`pseudo_gumbel_step` itself; with `train_cfg`, a TrainConfig whose objective is `cfg`, the
    step of `kind` as training calls it: objectives.mix.objective_step at optimizer step
    kind.step, `batch` from build_step_batch), the ranks' non-finite agreement, backward, clipping, the
    optimizer step and the EMA update — observed stage by stage, each stage a measured phase.
    `model` and `optimizer` may be prepared by `accelerator` (DeepSpeed): the passes go through
    the wrapper and attributes are read from the module inside. Without an accelerator, a
    single-process one is made. `gradient_checkpointing`: requested (audited: the LLM layers
    must be recomputed in backward). `grad_clip`: as training's optim.grad_clip.
    """
    from ..accel import build_accelerator
    from ..window import NonFiniteGuard, optimizer_window

    accelerator = accelerator or build_accelerator(micro_batch_size=batch_samples(batch))
    student = model
    model = unwrap(model)
    device = next(model.parameters()).device
    m = Measurement(device=str(device), step=kind.label if kind is not None else "pseudo_gumbel")
    parts = [objective for objective, _ in kind.parts] if kind is not None else ["pseudo_gumbel"]
    teacher = ema if ema is not None else model  # "no-ema": the student teaches itself
    named = dict(model.named_parameters())
    trainable = {n: p for n, p in named.items() if p.requires_grad}
    pass1_params = {n: p for n, p in trainable.items() if "lora_" in n or n.startswith("mlp1.")}
    frozen_lora = [n for n, p in named.items() if "lora_" in n and not p.requires_grad]
    params = tuple(model.parameters()) + tuple(model.buffers())
    layers = decoder_layers(model)
    layer_calls = [0]
    # Counted at the layer's first module, before it runs: checkpointing replays the layer's forward
    # (not the layer's own hooks) and stops the replay once the tensors backward needs are back.
    hooks = [
        getattr(layer, "input_layernorm", layer).register_forward_pre_hook(
            lambda *_: layer_calls.__setitem__(0, layer_calls[0] + 1)
        )
        for layer in layers
    ]
    if "detach-text-embeds" in inject:
        hooks.append(model.register_forward_pre_hook(_detach_pass2_input, with_kwargs=True))
    if "frozen-vit-keeps-graph" in inject:
        hooks.append(_FrozenTowerGraph(model.vision_model))
    stepping = _SkippedStep(optimizer) if "no-optimizer-step" in inject else optimizer

    probe = None
    try:
        for step in range(steps):
            last = step == steps - 1
            m.phases, m.stages = {}, []
            has_teacher = kind is None or kind.has_teacher
            probe = _TeacherProbe(ema, model) if (last and ema is not None and has_teacher) else None
            seen = {"part": 0, "stages": set()}  # what the observer saw of this step, for the audits

            @contextlib.contextmanager
            def observer(stage):
                name = PHASES.get(stage, stage)
                if stage in PHASES:
                    m.stages.append(stage)
                    if stage in seen["stages"]:  # a stage seen again: the step's next part (objective) begins
                        seen["part"], seen["stages"] = seen["part"] + 1, set()
                    seen["stages"].add(stage)
                    if len(parts) > 1:
                        name = f"{parts[min(seen['part'], len(parts) - 1)]}: {name}"
                if stage == "backward":
                    seen["layers_before_backward"] = layer_calls[0]
                if stage == "optimizer step" and last and ema is not None:
                    seen["shadow_before"] = [s.detach().clone() for s in ema.shadow]
                with (
                    _Phase(m, name, device, params),
                    probe if stage == "teacher" and probe is not None else contextlib.nullcontext(),
                ):
                    yield
                if stage == "backward":
                    seen["recomputed"] = layer_calls[0] - seen["layers_before_backward"]
                if stage == "optimizer step" and last:
                    m.static = tensor_accounting(model, optimizer, ema)  # gradients still held, as at the peak

            def forward(inputs, observe):
                if train_cfg is None:
                    out = pseudo_gumbel_step(student, teacher, inputs, cfg, observer=observe)
                else:
                    out = objective_step(student, teacher, inputs, train_cfg, None, observe, None, kind.step)
                if last:  # before backward frees the graph
                    through_text = parts[0] == "pseudo_gumbel"  # the step's output is Pseudo-Gumbel's
                    m.audits.append(
                        _audit_gradients(out.loss, out.text_embeds, pass1_params, ema, frozen_lora, through_text)
                    )
                return out

            overall = PeakMemory(device).__enter__()
            window = optimizer_window(
                iter([with_seeds(batch, 1000 * step)]),
                forward,
                model=student,
                optimizer=stepping,
                ema=ema,
                accelerator=accelerator,
                grad_accum=1,
                grad_clip=grad_clip,
                guard=NonFiniteGuard(limit=steps + 1),
                step=step,
                observer=observer,
            )
            overall.__exit__(None, None, None)
            if step == 0:
                m.first_step_growth = overall.peak_bytes
            m.losses.append(float(window.out.loss.detach()))
            if last:
                m.peak_bytes = (
                    overall.peak_bytes if device.type != "cuda" else max(p["peak_allocated"] for p in m.phases.values())
                )
                m.audits.insert(0, _audit_ema(ema, model, seen.get("shadow_before"), probe))
                m.audits.append(
                    _audit_zero_partition(optimizer, trainable)
                    if zero_optimizer(optimizer) is not None
                    else _audit_optimizer(optimizer, trainable)
                )
                m.audits.append(_audit_checkpointing(gradient_checkpointing, layers, seen.get("recomputed", 0)))
            del window
    finally:
        for h in hooks:
            h.remove()
    return m


def _audit_checkpointing(requested: bool, layers: list, recomputed: int) -> Audit:
    """Gradient checkpointing, when requested, must really recompute the LLM layers in backward
    (a flag that was never set shows otherwise only as activations out of tolerance)."""
    flagged = sum(bool(getattr(layer, "gradient_checkpointing", False)) for layer in layers)
    audit = Audit("gradient checkpointing is on where requested", False)
    audit.evidence.append(
        f"requested: {'yes' if requested else 'no'}; {flagged}/{len(layers)} LLM decoder layers flagged; "
        f"{recomputed} layer forwards recomputed in backward"
    )
    if requested and (flagged < len(layers) or recomputed == 0):
        audit.evidence.append(
            "gradient checkpointing requested but off: the LLM layers' activations are kept, not recomputed"
        )
    audit.passed = not requested or (bool(layers) and flagged == len(layers) and recomputed > 0)
    return audit


def _audit_ema(ema: EMATeacher | None, model, shadow_before, probe: _TeacherProbe | None = None) -> Audit:
    audit = Audit(
        "EMA exists, is fp32, follows the trainable tensors, moves by the decay rule and is the teacher's weights",
        False,
    )
    if ema is None:
        audit.evidence.append("no EMA object: the teacher is the student itself (EMA absent)")
        return audit
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    checks = {
        "holds exactly the trainable tensors": ema.names == trainable,
        "shadow is fp32": all(s.dtype == torch.float32 for s in ema.shadow),
        "holds bytes": sum(ema.memory_bytes().values()) > 0,
    }
    # One update: shadow_after == d * shadow_before + (1 - d) * student
    decay = ema.decay if not ema.warmup else min(ema.decay, ema.num_updates / (9 + ema.num_updates))
    named = dict(model.named_parameters())
    worst, moved, gap = 0.0, 0.0, 0.0
    for name, before, after in zip(ema.names, shadow_before, ema.shadow):
        student = named[name].detach().to(before.device, torch.float32)
        expected = decay * before + (1 - decay) * student
        worst = max(worst, float((after - expected).abs().max()))
        moved = max(moved, float((after - before).abs().max()))
        gap = max(gap, float((student - before).abs().max()))
    # A shadow that equals an unchanged student cannot move; that is the optimizer's audit to flag.
    checks["moves by the decay rule"] = worst <= 1e-5 and (moved > 0 or gap == 0)
    if probe is not None:
        seen = probe.seen or {
            "model": "no model (the teacher stage never reached an lm_head)",
            "not_shadow": list(ema.names),
        }
        swapped = not seen["not_shadow"]
        checks["the teacher generates with the shadow's weights (swapped in)"] = swapped and probe.seen is not None
        audit.evidence.append(
            f"teacher stage: {seen['model']} generated; {len(seen['not_shadow'])}/{len(ema.names)} trainable tensors differ "
            f"from the shadow ({probe.shadow_vs_student} differed between shadow and student before the stage)"
        )
        if not swapped and probe.shadow_vs_student:
            audit.evidence.append(
                "the teacher is the student's current weights: the EMA shadow was not swapped in (no swap)"
            )
    audit.evidence.append(
        f"placement {ema.placement.kind}, {ema.memory_bytes()} bytes, decay {ema.decay}, {len(ema.names)} tensors"
    )
    audit.evidence.append(
        f"largest move in the checked update {moved:.3e}, largest deviation from the decay rule {worst:.3e}"
    )
    audit.evidence += [f"{'ok  ' if ok else 'FAIL'} {what}" for what, ok in checks.items()]
    audit.passed = all(checks.values())
    return audit


def _audit_gradients(
    loss, text_embeds, pass1_params: dict, ema, frozen_lora: list[str] = (), through_text: bool = True
) -> Audit:
    """On the step's own outputs: the mask loss reaches text_embeds (the Gumbel output), and
    through it every LoRA adapter and mlp1 tensor of pass 1; the teacher gets nothing.
    `through_text=False` (a step whose segmenter reads given text: supervised, pseudo-labels):
    the step's loss (caption cross-entropy + mask loss) reaches them directly."""
    what = "through text_embeds" if through_text else "from the caption and mask losses"
    audit = Audit(f"gradients reach LoRA and mlp1 {what}, none reach the teacher", False)
    if frozen_lora and not any("lora_" in n for n in pass1_params):
        audit.evidence.append(f"LoRA adapters frozen: {len(frozen_lora)} LoRA tensors in the model, none requires grad")
    names = list(pass1_params)
    params = [pass1_params[n] for n in names]
    if through_text:
        if not text_embeds.requires_grad:
            audit.evidence.append(
                "text_embeds does not require grad: the mask loss cannot reach the first pass (detached)"
            )
            return audit
        (grad_embeds,) = torch.autograd.grad(loss, text_embeds, retain_graph=True, allow_unused=True)
        if grad_embeds is None:
            audit.evidence.append(
                "the mask loss does not depend on text_embeds: detached between the Gumbel output and the loss"
            )
            return audit
        grads = (
            torch.autograd.grad(text_embeds, params, grad_outputs=grad_embeds, retain_graph=True, allow_unused=True)
            if names
            else []
        )
        audit.evidence.append(f"|dL/d text_embeds| = {float(grad_embeds.norm()):.3e}")
    else:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) if names else []
    reached = {n for n, g in zip(names, grads) if g is not None and bool(g.abs().sum() > 0)}
    # An adapter is reached when A or B gets a gradient: while B is still 0 (initialisation,
    # before the first optimizer step) A's gradient is exactly 0 by construction.
    adapters: dict[str, bool] = {}
    for n in names:
        if "lora_" in n:
            key = n.split(".lora_")[0]
            adapters[key] = adapters.get(key, False) or n in reached
    lora = list(adapters)
    mlp1 = [n for n in names if n.startswith("mlp1.")]
    teacher_grads = 0
    if ema is not None:
        teacher_grads += sum(1 for s in ema.shadow if s.requires_grad or s.grad is not None)
        if ema.teacher_model is not None:
            teacher_grads += sum(1 for p in ema.teacher_model.parameters() if p.grad is not None or p.requires_grad)
    audit.evidence.append(
        f"{what}: {sum(adapters.values())}/{len(lora)} LoRA adapters, {sum(n in reached for n in mlp1)}/{len(mlp1)} mlp1 tensors non-zero"
    )
    audit.evidence.append(f"teacher tensors that require or hold a gradient: {teacher_grads}")
    audit.passed = (
        bool(lora)
        and all(adapters.values())
        and all(n in reached for n in mlp1)
        and teacher_grads == 0
        and (not through_text or float(grad_embeds.abs().sum()) > 0)
    )
    return audit


def _audit_zero_partition(optimizer, trainable: dict) -> Audit:
    """Under ZeRO: this rank's fp32 master partition and Adam moments each hold 1/N of the
    trainable parameters (DeepSpeed pads partitions to an alignment, hence the tolerance)."""
    import torch.distributed as dist

    zero = zero_optimizer(optimizer)
    world = dist.get_world_size() if dist.is_initialized() else 1
    total = sum(p.numel() for p in trainable.values())
    master = sum(t.numel() for t in zero.single_partition_of_fp32_groups)
    moments = [
        t.numel() for s in zero.optimizer.state.values() for k, t in s.items() if torch.is_tensor(t) and t.dim() > 0
    ]
    share = total / world
    audit = Audit(f"optimizer state is partitioned: this rank holds 1/{world} of it (ZeRO)", False)
    audit.evidence.append(
        f"{total:,} trainable parameters; this rank: fp32 master {master:,}, moments {moments} (1/{world} = {share:,.0f})"
    )
    within = lambda n: 0.99 * share <= n <= 1.01 * share + 64  # noqa: E731
    audit.passed = within(master) and len(moments) >= 2 and all(within(n) for n in moments)
    if not moments:
        audit.evidence.append("no optimizer state at all: the optimizer never stepped")
    return audit


def _audit_optimizer(optimizer, trainable: dict) -> Audit:
    audit = Audit("optimizer holds state for every trainable tensor that gets a gradient", False)
    inner = getattr(optimizer, "optimizer", optimizer)
    expected = {n: p for n, p in trainable.items() if not gradient_free(n)}
    with_state = [n for n, p in expected.items() if len(inner.state.get(p, {})) > 0]
    state_bytes = storage_bytes(v for s in inner.state.values() for v in s.values() if torch.is_tensor(v))
    audit.evidence.append(
        f"{len(with_state)}/{len(expected)} trainable tensors have optimizer state ({state_bytes:,} bytes); "
        f"{len(trainable) - len(expected)} more (SAM2's IoU and object-score heads) never get a gradient by design"
    )
    if not with_state:
        audit.evidence.append(
            "no optimizer state at all: the optimizer never stepped (or was never given the parameters)"
        )
    missing = [n for n in expected if n not in with_state]
    grouped = {id(p) for group in inner.param_groups for p in group["params"]}
    ungrouped = [n for n, p in trainable.items() if id(p) not in grouped]
    if ungrouped:
        audit.evidence.append(f"{len(ungrouped)} trainable tensors are in no optimizer group: {ungrouped[:5]}")
    if with_state and missing:
        audit.evidence.append(f"without state: {missing[:5]}")
    audit.passed = bool(expected) and not missing and not ungrouped
    return audit


def teacher_prompt(model, batch: dict, objective) -> int:
    """The teacher's prompt length for `batch` (the measured run's decoding bucket is predicted
    for it): the region prompts the teacher builds, left-padded to the longest."""
    from ..objectives.passes import batch_region_cells, region_prompts

    cells, _ = batch_region_cells(batch, model.grid_size, objective)
    return region_prompts(model, cells, batch.get("num_views1"))[0].shape[1]


def text_tokens(model, batch: dict | None, objective) -> int | None:
    """The ground-truth caption tokens the supervised objective reads from `batch` (its
    caption cross-entropy's targets, padded to the longest); None without a batch or captions."""
    from ..objectives.passes import tokenize_captions

    if batch is None or not batch.get("captions"):
        return None
    return tokenize_captions(model, batch["captions"], objective.max_caption_len, form="answer_end")[0].shape[1]
