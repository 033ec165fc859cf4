"""The predicted memory budget of one training process, from the real module tree on `meta`.

Static components (weights, gradients, optimizer state, EMA) are exact byte counts of the
tensors the run will hold. Activations are estimated per phase from the model's dimensions
(what autograd keeps per token and layer); the peak is the largest phase on top of the static
components, not the sum of everything.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch

from ..distributed import unwrap
from ..ema import EMATeacher
from .steps import StepKind, pseudo_gumbel_only

GiB = 2**30
CUDA_CONTEXT_BYTES = int(0.5 * GiB)  # CUDA context + cuBLAS/cuDNN workspaces, outside PyTorch's allocator


@dataclass
class Deployment:
    """What the run looks like, as far as memory is concerned."""

    batch_size: int = 1
    caption_len: int = 64
    region_cells: int = 32  # K, typical visual-prompt length
    image_size: tuple[int, int] = (1024, 1024)  # input images (width, height): the views a tiling preset cuts them into
    topk: int = 128
    world_size: int = 1
    zero_stage: int = 0  # 0: no DeepSpeed (single process / DDP), 2: ZeRO-2
    offload_optimizer: bool = False
    optimizer: str = "adamw"  # adamw | adamw8bit
    ema_placement: str = "same"
    gradient_checkpointing: bool = False
    dtype: str = "bf16"  # the model's weights: bf16 (GPU) or fp32 (CPU)
    device: str = "cuda:0"
    reduce_bucket_size: int = 200_000_000
    allgather_bucket_size: int = 200_000_000
    overlap_comm: bool = True
    # teacher decoding through the static KV cache (+ CUDA graphs on CUDA): one bucket of the
    # shape the deployment's batch and prompt round to (pg_train.model.decoding.graph_decode)
    fast_decoding: bool = False
    decode_prompt: int | None = None  # the teacher's prompt length; None: estimated from views and K
    # The kinds of step the run trains (memcheck.steps.step_kinds); none: Pseudo-Gumbel over batch_size
    steps: tuple[StepKind, ...] = ()
    text_len: int | None = None  # ground-truth caption tokens the supervised objective reads; None: caption_len

    def step_kinds(self) -> tuple[StepKind, ...]:
        return self.steps or (pseudo_gumbel_only(self.batch_size),)

    @property
    def elem(self) -> int:
        return 2 if self.dtype == "bf16" else 4


@dataclass
class Row:
    component: str
    device: str
    bytes: int
    note: str = ""


@dataclass
class Prediction:
    deployment: Deployment
    static: list[Row] = field(default_factory=list)
    phases: dict[str, dict[str, int]] = field(
        default_factory=dict
    )  # per phase: saved / transient / total activation bytes
    host: list[Row] = field(default_factory=list)
    views: int = 1  # MLLM views per image (InternVL tiling)
    steps: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)  # step kind's label -> its phases
    peak_step: str = ""  # the step kind whose phases (`phases`) set the peak

    def static_bytes(self, device: str | None = None) -> int:
        return sum(r.bytes for r in self.static if device is None or r.device == device)

    def component(self, name: str) -> int:
        return sum(r.bytes for r in self.static if r.component == name)

    def rows_note(self, name: str) -> str:
        return "; ".join(r.note for r in self.static + self.host if r.component == name and r.note)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda name: self.phases[name]["total"])

    @property
    def peak_bytes(self) -> int:
        return self.static_bytes(self.deployment.device) + self.phases[self.peak_phase]["total"]

    def to_dict(self) -> dict:
        return {
            "deployment": asdict(self.deployment),
            "static": [asdict(r) for r in self.static],
            "host": [asdict(r) for r in self.host],
            "phases": dict(self.phases),
            "peak_phase": self.peak_phase,
            "peak_bytes": self.peak_bytes,
            "steps": {label: dict(phases) for label, phases in self.steps.items()},
            "peak_step": self.peak_step,
        }

    def for_step(self, label: str) -> Prediction:
        """This prediction with one step kind's phases (its peak, its activations)."""
        return replace(self, phases=self.steps[label], peak_step=label)


def _nbytes(t: torch.Tensor, elem: int) -> int:
    if t.dtype == torch.uint8:  # 4-bit storage, packed two per byte (quant state is small)
        return t.numel()
    return t.numel() * (elem if t.is_floating_point() else t.element_size())


def optimizer_state_bytes(trainable: int, n_tensors: int, d: Deployment) -> tuple[int, str]:
    """Bytes of optimizer state for `trainable` parameters in `n_tensors` tensors."""
    if d.zero_stage >= 1:
        # fp32 master copy + Adam moments (fp32, or 1 byte each with bitsandbytes), split 1/N
        moments = 2 if d.optimizer == "adamw8bit" else 8
        return (
            4 + moments
        ) * trainable // d.world_size, f"fp32 master + Adam moments, 1/{d.world_size} (ZeRO-{d.zero_stage})"
    if d.optimizer == "adamw8bit":
        return 2 * trainable + 4 * n_tensors, "two 8-bit moments (bitsandbytes) + step counters"
    # torch AdamW: moments in the parameter dtype, plus a 4-byte step counter per tensor
    return 2 * d.elem * trainable + 4 * n_tensors, "Adam moments in the weights' dtype + step counters"


def gradient_bytes(trainable: int, d: Deployment) -> tuple[int, str]:
    if d.zero_stage >= 2:
        # reduced gradients kept only for this rank's partition (param dtype + fp32 copy for
        # the optimizer) + the reduce buckets (two with overlap_comm) and the allgather bucket.
        buckets = (
            d.reduce_bucket_size * d.elem * (2 if d.overlap_comm else 1)
            + min(d.allgather_bucket_size, trainable) * d.elem
        )
        return (d.elem + 4) * trainable // d.world_size + min(
            buckets, 3 * trainable * d.elem
        ), "partition + reduce/allgather buckets"
    return d.elem * trainable, "full gradients of the trainable tensors"


def predict(model, d: Deployment) -> Prediction:
    """The budget for `model` (any device, `meta` included) deployed as `d`."""
    module = unwrap(model)
    pred = Prediction(d, views=image_views(module.preset, d))
    frozen_by_dtype: dict[str, int] = {}
    trainable, n_trainable, with_grad, n_with_grad = 0, 0, 0, 0
    for name, p in module.named_parameters():
        if p.requires_grad:
            trainable += p.numel()
            n_trainable += 1
            if not gradient_free(name):
                with_grad += p.numel()
                n_with_grad += 1
        else:
            key = "4-bit" if p.dtype == torch.uint8 else d.dtype if p.is_floating_point() else str(p.dtype)
            frozen_by_dtype[key] = frozen_by_dtype.get(key, 0) + _nbytes(p, d.elem)
    buffers = sum(_nbytes(b, d.elem) for b in module.buffers())
    dev = d.device
    for dtype, nbytes in sorted(frozen_by_dtype.items()):
        pred.static.append(Row("frozen weights", dev, nbytes, dtype))
    pred.static.append(Row("buffers", dev, buffers))
    pred.static.append(Row("trainable weights", dev, trainable * d.elem, f"{trainable:,} parameters"))
    # ZeRO allocates for every trainable tensor; torch only for those that get a gradient.
    grads, note = gradient_bytes(trainable if d.zero_stage else with_grad, d)
    pred.static.append(Row("gradients", dev, grads, note))
    optim, note = optimizer_state_bytes(
        trainable if d.zero_stage else with_grad, n_trainable if d.zero_stage else n_with_grad, d
    )
    (pred.host if d.offload_optimizer else pred.static).append(
        Row("optimizer state", "cpu" if d.offload_optimizer else dev, optim, note)
    )
    for where, nbytes in EMATeacher.predicted_bytes(
        module, d.ema_placement, training_device=dev, model_dtype=torch.bfloat16 if d.elem == 2 else torch.float32
    ).items():
        row = Row("EMA", where, nbytes, d.ema_placement)
        (pred.static if where == dev else pred.host).append(row)
    if d.fast_decoding:
        pred.static.extend(decode_bucket_rows(module, d))
    if dev.startswith("cuda"):
        pred.static.append(
            Row("CUDA context", dev, CUDA_CONTEXT_BYTES, "driver, cuBLAS workspace; outside the allocator")
        )
    pred.steps = {kind.label: step_phases(module, d, kind) for kind in d.step_kinds()}
    pred.peak_step = max(pred.steps, key=lambda label: max(p["total"] for p in pred.steps[label].values()))
    pred.phases = pred.steps[pred.peak_step]
    return pred


def teacher_prompt_len(module, d: Deployment) -> int:
    """The teacher's prompt: the given length, else the image tokens of the deployment's views
    plus the template text (~40 tokens) and K region cells."""
    if d.decode_prompt is not None:
        return d.decode_prompt
    return module.preset.vision.num_image_tokens * image_views(module.preset, d) + 40 + d.region_cells


def decode_bucket_rows(module, d: Deployment) -> list[Row]:
    """The fast decoding's bucket: its static KV cache and buffers (exact for the bucket's
    shape), and on CUDA the captured step's private pool (an estimate). Kept between steps, so
    static. One bucket per (batch, prompt) bucket met; prompts whose lengths round differently
    (other view counts or region sizes) add one each, up to the policy's max_buckets (LRU)."""
    from ..model.decoding import graph_decode

    policy = graph_decode.policy_for(torch.device(d.device.split(":")[0]))
    config = module.language_model.config
    batch, prompt = policy.batch(d.batch_size), policy.prompt(teacher_prompt_len(module, d))
    shape = f"bucket batch {batch} x prompt {prompt} + {d.caption_len} (up to {policy.max_buckets} buckets)"
    rows = [
        Row(
            "decoding buckets",
            d.device,
            graph_decode.kv_cache_bytes(config, batch, prompt + d.caption_len, d.elem)
            + graph_decode.buffer_bytes(batch, prompt, d.caption_len, config.vocab_size),
            f"static KV cache + buffers, {shape}",
        )
    ]
    if d.device.startswith("cuda"):
        rows.append(
            Row(
                "graph pools",
                d.device,
                graph_decode.step_pool_bytes(config, batch, prompt + d.caption_len, d.elem),
                "captured decoding step's private pool, estimated",
            )
        )
    return rows


def _lora(module):
    return getattr(module, "lora", None)


# Trainable heads the loss never reaches: SAM2 picks the best of 3 masks by predicted IoU with an
# argmax (no gradient to the IoU head) and the object-score head's output is unused. They hold
# weights (and ZeRO partitions) but never a gradient or torch optimizer state.
GRADIENT_FREE = ("sam_mask_decoder.iou_prediction_head.", "sam_mask_decoder.pred_obj_score_head.")


def gradient_free(name: str) -> bool:
    return any(part in name for part in GRADIENT_FREE)


def saved_per_token_layer(module, elem: int) -> int:
    """Bytes autograd keeps per token and decoder layer in a training forward.

    Measured structure (elements): ~11h (norm inputs/outputs in fp32 for RMSNorm, q/k/v/o and
    attention inputs/outputs, residuals) + 5I (MLP gate, up, activation, product, down input) +
    7r (LoRA A outputs), plus 6h for LoRA's dropout copies when dropout > 0. Calibrated on the
    tiny preset on CPU and on Sa2VA-4B on an H200 (docs/measurements); an estimate, ±20%.
    """
    lang = module.preset.language
    lora = _lora(module)
    r = lora.r if lora else 0
    dropout = 6 * lang.hidden_size if (lora and lora.dropout > 0) else 0
    return (11 * lang.hidden_size + 5 * lang.intermediate_size + 7 * r + dropout) * elem


def _trains(module) -> bool:
    return any(p.requires_grad for p in module.parameters())


STATS = 4  # LayerNorm mean/rstd and attention log-sum-exp: kept in fp32 whatever the weights' dtype


def vision_tower_saved(module, images: int, elem: int) -> int:
    """Bytes the InternViT keeps for backward over `images` views (0 while it is frozen, as in
    Sa2VA; the default job trains it). From the first layer with a trainable tensor on (all of
    them when the patch embedding trains, which also keeps its pixel input). Measured structure
    per token and layer (CPU, SDPA): 10h (norm inputs/outputs, q/k/v, attention output, proj and
    layer-scale inputs, fc2 output) + 2I (fc1 output, GELU output) in the weights' dtype, and
    fp32 statistics (two LayerNorms' mean/rstd, one log-sum-exp per head)."""
    vision = module.vision_model
    vis = module.preset.vision
    layers = list(vision.encoder.layers)
    embedding = _trains(vision.embeddings)
    first = 0 if embedding else next((i for i, layer in enumerate(layers) if _trains(layer)), len(layers))
    tokens = (vis.image_size // vis.patch_size) ** 2 + 1  # patches + CLS
    per_token_layer = (10 * vis.hidden_size + 2 * vis.mlp_size) * elem + (vis.num_heads + 4) * STATS
    pixels = 3 * vis.image_size**2 * elem if vision.embeddings.patch_embedding.weight.requires_grad else 0
    return images * (tokens * (len(layers) - first) * per_token_layer + pixels)


def sam_encoder_saved(module, images: int, elem: int) -> int:
    """Bytes SAM2's Hiera image encoder keeps for backward over `images` images (0 while frozen,
    as in Sa2VA; the default job trains it), walking the real blocks: N tokens of C channels
    (N halves per side at each pooling block). Measured structure (CPU): a block keeps ~16C per
    token (MLP ratio 4: fc1 and GELU outputs 8C; norms, q/k/v, window copies, projections 8C)
    plus fp32 statistics; a pooling block ~19 C_in per input token (the projection and the
    pooling of q and of the shortcut at the input resolution). The FPN neck's inputs are the
    blocks' own outputs (already counted). The patch embedding keeps the pixels when it trains."""
    encoder = module.grounding_encoder.sam2_model.image_encoder
    trunk = encoder.trunk
    if not _trains(encoder):
        return 0
    size = module.preset.sam2.image_size
    side = size // 4  # Hiera's patch embedding: stride 4
    total = 3 * size**2 * elem if _trains(trunk.patch_embed) else 0
    for block in trunk.blocks:
        tokens_in = side * side
        if block.pool is not None:
            side //= 2
            total += 19 * tokens_in * block.dim * elem + (4 + block.attn.num_heads) * side * side * STATS
        else:
            total += 16 * tokens_in * block.dim_out * elem + (4 + block.attn.num_heads) * tokens_in * STATS
    return images * total


def image_views(preset, d: Deployment) -> int:
    """Views per image the preset's tiling gives for the deployment's image size (1 untiled)."""
    from ..data.loader import preprocess_for

    return preprocess_for(preset).tiling.num_views(*d.image_size)


class Activations:
    """What autograd keeps (`saved`) and the temporaries at a phase's peak (`transient`) for each
    objective's passes over B samples, from the model's dimensions and the deployment's."""

    def __init__(self, module, d: Deployment):
        self.module, self.d = module, d
        lang, vis, sam = module.preset.language, module.preset.vision, module.preset.sam2
        self.h, self.layers, self.V, self.e = lang.hidden_size, lang.num_layers, lang.vocab_size, d.elem
        self.views = image_views(module.preset, d)
        self.image_tokens = vis.num_image_tokens * self.views  # InternVL tiling: 256 tokens per view
        self.prompt = self.image_tokens + 40 + d.region_cells  # template text ~40 tokens
        self.per_layer = saved_per_token_layer(module, self.e)
        self.kv = 2 * self.layers * lang.num_kv_heads * (self.h // lang.num_heads) * self.e
        # per sample: mlp1 keeps its LayerNorm/Linear/GELU inputs for the image tokens of each pass
        self.mlp1 = self.image_tokens * (3 * vis.shuffled_size + 3 * self.h) * self.e
        self.vit_transient = self.views * (vis.image_size // vis.patch_size) ** 2 * (vis.hidden_size * 6 + vis.mlp_size)
        self.vit_transient *= self.e
        self.sam_transient = (sam.image_size // 4) ** 2 * sam.embed_dim * 12 * self.e
        self.decoder = (sam.image_size // 4) ** 2 * (sam.d_model // 8) * 6 * self.e

    def last_layer(self, tokens: int, rows_read: int) -> int:
        # The last layer runs only on the rows read (pg_train.model.arch.decoder): full activations
        # for those, ~4h per other row (its norm input and output, keys, values); never checkpointed.
        return rows_read * self.per_layer + (tokens - rows_read) * 4 * self.h * self.e

    def llm(self, tokens: int, rows_read: int) -> int:
        per_token = self.h * self.e if self.d.gradient_checkpointing else self.per_layer  # checkpointed: one state
        return (self.layers - 1) * tokens * per_token + self.last_layer(tokens, rows_read)

    def vit(self, B: int) -> int:
        """The InternViT's activations over B samples' views (0 while frozen; never checkpointed)."""
        return vision_tower_saved(self.module, B * self.views, self.e)

    def pass1(self, B: int, T: int) -> int:
        """Caption logits of T tokens after the region prompt."""
        return self.llm(B * (self.prompt + T), B * T) + B * self.mlp1 + B * T * self.h * self.e + self.vit(B)

    def pass2(self, B: int, T: int) -> int:
        """Segmentation of image 2 from T caption slots."""
        segment = self.image_tokens + 30 + T
        towers = self.vit(B) + sam_encoder_saved(self.module, B, self.e)  # trained towers: never checkpointed
        return self.llm(B * segment, B) + B * (self.mlp1 + self.decoder) + towers

    def part(self, objective: str, B: int) -> list[tuple[str, int, int]]:
        """(phase, bytes it adds to what autograd keeps, transient) of one objective over B samples."""
        T = self.d.caption_len if objective != "supervised" else (self.d.text_len or self.d.caption_len)
        logits = B * T * self.V * self.e
        vit = B * self.vit_transient
        teacher = ("teacher generation", 0, B * (self.prompt + T) * self.kv + B * self.V * 4 + vit)
        pass2 = ("pass 2 (segment)", self.pass2(B, T), B * max(self.vit_transient, self.sam_transient))
        if objective == "pseudo_gumbel":
            gumbel = B * T * self.d.topk * (4 + 8)  # y_soft (fp32) and top-k ids (int64)
            return [
                teacher,
                ("pass 1 (caption logits)", self.pass1(B, T), 2 * logits + vit),
                ("gumbel", gumbel, 2 * logits),
                pass2,
            ]
        # the caption cross-entropy keeps its fp32 log-probabilities [B, T, V]
        log_probs = B * T * self.V * 4
        pass1 = ("pass 1 (caption logits)", self.pass1(B, T) + log_probs, 2 * logits + log_probs + vit)
        return ([teacher] if objective == "pseudo_label" else []) + [pass1, pass2]

    def backward(self, objective: str, B: int) -> int:
        """Backward's temporaries: the logits' gradient, and a recomputed layer when checkpointing."""
        T = self.d.caption_len if objective != "supervised" else (self.d.text_len or self.d.caption_len)
        recompute = (
            self.per_layer * B * max(self.prompt + T, self.image_tokens + 30 + T)
            if self.d.gradient_checkpointing
            else 0
        )
        return B * T * self.V * self.e + recompute


def step_phases(module, d: Deployment, kind: StepKind) -> dict[str, dict[str, int]]:
    """Per phase of one kind of step, its parts in the order it runs them (named `part: phase`
    when it has several): `saved` = bytes autograd holds for backward at the end of the phase
    (cumulative: every pass's graph is alive until backward), `transient` = temporaries at the
    phase's peak, `total` = saved + transient."""
    activations = Activations(module, d)
    phases, saved, backward = {}, 0, 0
    for objective, samples in kind.parts:
        for phase, kept, transient in activations.part(objective, samples):
            saved += kept
            phases[f"{objective}: {phase}" if len(kind.parts) > 1 else phase] = (saved, transient)
        backward = max(backward, activations.backward(objective, samples))
    phases["backward"] = (saved, backward)
    return {
        name: {"saved": kept, "transient": transient, "total": kept + transient}
        for name, (kept, transient) in phases.items()
    }


def activation_phases(module, d: Deployment) -> dict[str, dict[str, int]]:
    """The phases of the deployment's Pseudo-Gumbel step (the step without a training config)."""
    return step_phases(module, d, pseudo_gumbel_only(d.batch_size))


SEED_TABLE_GB = [  # the design note's hand estimate (问题3), per GPU, in GB
    ("vision encoder (frozen)", 2.0),
    ("LLM with LoRA", 8.0),
    ("SAM2 encoder (frozen)", 3.0),
    ("SAM2 decoder", 1.0),
    ("projectors", 1.0),
    ("EMA full copy", 15.0),
    ("gradients", 4.0),
    ("optimizer states", 8.0),
    ("activations", 4.0),
]


def alternative_estimates(model, d: Deployment) -> dict[str, int]:
    """What two common rules of thumb would say, to show why they differ from `predict`."""
    module = unwrap(model)
    total = sum(p.numel() for p in module.parameters())
    return {
        "weights x dtype (all parameters, bf16)": total * 2,
        f"DeepSpeed ZeRO-2 formula (2P + 18P/N, N={d.world_size}, all parameters trainable)": 2 * total
        + 18 * total // max(1, d.world_size),
        "design note (43-47 GB table, midpoint)": int(45e9),
    }
