"""Training configuration: plain dataclasses, YAML files and `key=value` overrides.

Every key is checked before anything is built: an unknown key, a value of the wrong type or an
impossible combination is an error that names the key.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .data import SOURCES, DataConfig
from .data.heldout import EvalConfig
from .model.arch.presets import PRESETS, ModelPreset
from .objectives.settings import PseudoGumbelConfig
from .objectives.supervised import SupervisedConfig


class ConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    preset: str = "tiny"  # tiny | tiny-112 | bench | sa2va-4b
    checkpoint: str | None = None  # a released-format Sa2VA directory to start from
    # A training checkpoint (runs/x/checkpoints/step-N) whose weights start this run, loaded
    # strictly; unlike `resume`, step, optimizer, EMA and data order start fresh (a new stage).
    init_from: str | None = None
    # Load checkpoint / init_from / resume weights (and the EMA shadow) holding NaN or Inf
    # instead of refusing them: a run would train on NaN from step 1, so only for inspection.
    allow_nonfinite_weights: bool = False
    template: str = "sa2va"  # prompt wording set: sa2va (the released model's questions) | seed (the design note's)
    # The chat template (phi3_chat | qwen_chat | internlm2_chat); None: the checkpoint's
    # config.json "template" (the preset's, phi3_chat, without a checkpoint).
    chat_template: str | None = None
    # InternVL dynamic tiling; None: the checkpoint's config.json values (sa2va-4b: on, 1..12
    # tiles + thumbnail; tiny presets: off, one 448-px view).
    dynamic_image_size: bool | None = None
    min_dynamic_patch: int | None = None
    max_dynamic_patch: int | None = None
    use_thumbnail: bool | None = None
    # Where the tiling keys come from: `config` (the checkpoint's config.json, then the keys
    # above) or `official` (what the official predict_forward hard-codes whatever config.json
    # says: tiling on, 1..12 tiles, thumbnail). docs/fidelity.md.
    tiling: str = "config"
    # Caption stop rule: `contains` (stop at the first end text anywhere in the caption's
    # bytes) or `official` (the official StopWordStoppingCriteria: newlines removed, the text
    # ends with one of the template's stop words; qwen_chat also stops on <|endoftext|>).
    stop_rule: str = "contains"
    # Special-token strings inside caption text (`[SEG] word`): `text` (plain text, as typed)
    # or `ids` (their added-token ids, as the official whole-string encoding gives; the image
    # and region slot tokens stay text). docs/fidelity.md.
    caption_special_tokens: str = "text"
    # Arithmetic of SAM2's input normalisation: float32 (the official training's) or bfloat16
    # (the official HF inference's); None: the checkpoint's / preset's (float32).
    sam2_normalise: str | None = None
    lora_r: int | None = None  # None: the preset's LoRA
    lora_alpha: int | None = None
    lora_dropout: float | None = None
    lora_targets: list[str] | None = None
    train_embed_tokens: bool = False
    train_lm_head: bool = False
    gradient_checkpointing: bool = False
    quantize_4bit: bool = False  # QLoRA: frozen LLM projections in NF4 (bitsandbytes)
    # The LLM's last layer only on the rows whose output is read (pg_train.model.arch.decoder): the
    # same values in exact arithmetic; in bf16 a smaller GEMM may round differently (docs/benchmarks.md)
    trim_last_layer: bool = True
    # Extra parameter-name prefixes to train, e.g. ["vision_model.", "grounding_encoder.sam2_model.image_encoder."]:
    # a tiny preset's random frozen encoders may be unable to learn; the real recipe keeps them frozen.
    extra_trainable: list[str] = field(default_factory=list)


@dataclass
class EMAConfig:
    decay: float = 0.999
    placement: str = "same"  # same | cpu | full:<device>
    warmup: bool = False
    # k: each optimizer step updates one of k fixed shards of the tensors (balanced by elements)
    # with the k steps' compounded decay: the same time constant, 1/k of the update's work, a
    # teacher up to k-1 steps staler per tensor (pg_train.ema). 1: every tensor every step.
    update_stages: int = 1
    # full:<device> only: the teacher captions the next micro-batch while the student trains on
    # this one (a teacher one update older; pg_train.overlap)
    overlap: bool = False


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | adamw8bit (bitsandbytes)
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # 0 disables


@dataclass
class CurriculumConfig:
    """objective_kind=curriculum: a supervised warm-up, then Pseudo-Gumbel from it, in one run. A
    shorthand: load_config expands it into the two-stream schedule (expand_curriculum), so the
    curriculum and the two streams are one mechanism."""

    supervised_steps: int = 0  # optimizer steps of the supervised stage; the rest are Pseudo-Gumbel
    supervised_fraction: float = 0.0  # or this fraction of max_steps (when supervised_steps is 0)
    lr: float | None = None  # Pseudo-Gumbel stage's peak lr (its own warm-up and cosine); None: optim.lr
    restart_ema: bool = True  # the teacher starts as the warmed-up student (as a second run would)
    # After the switch (defaults: the one-stream curriculum, every sample self-trained):
    objective: str = "pseudo_gumbel"  # the self-training objective: pseudo_gumbel | pseudo_label
    labelled_fraction: float = 0.0  # the labelled share of each batch (two streams of data:)
    supervised_weight: float = 1.0  # lambda on that labelled share (used when labelled_fraction > 0)
    gate_min_gap: float | None = None  # self-training waits for the grounding gate (streams.gate_min_gap)


@dataclass
class StreamsConfig:
    """Two data streams (issue 26; pg_train.data.streams): labelled pairs (their text is the
    supervised objective's) and unlabelled pairs (any source; text unused). Each micro-batch of
    batch_size samples takes labelled_fraction of them from the labelled stream; the loss is
    self_weight x self-training (objective_kind: pseudo_gumbel | pseudo_label) on the unlabelled
    part + supervised_weight (lambda) x supervised on the labelled part. Schedules are
    [[from_step, value], ...], piecewise constant (objectives.schedule). The curriculum is
    labelled_fraction [[0, 1], [S, 0]], supervised_weight [[0, 1], [S, 0]], self_weight [[0, 0], [S, 1]]
    over two streams of `data:` (objective_kind: curriculum expands to exactly that)."""

    enabled: bool = False
    labelled: DataConfig = field(default_factory=lambda: DataConfig(num_samples=256))
    unlabelled: DataConfig = field(default_factory=lambda: DataConfig(num_samples=256, sample_offset=256))
    labelled_fraction: list[list[float]] = field(default_factory=lambda: [[0, 0.5]])
    supervised_weight: list[list[float]] = field(default_factory=lambda: [[0, 1.0]])
    self_weight: list[list[float]] = field(default_factory=lambda: [[0, 1.0]])
    # Grounding gate: self-training (self_weight) counts only once a held-out evaluation's
    # cycle - shuffled gIoU reached this (null: no gate); until then only the labelled stream
    # trains. Needs eval_every > 0; the run says when the gate opens.
    gate_min_gap: float | None = None
    # The self-training stage begins where self_weight first turns > 0 after weighing 0 from step 0
    # (the curriculum's switch). self_training_lr: the lr schedule restarts there (its own warm-up
    # and cosine, this peak; the stage before ends its cosine there), as a second run would; null:
    # one schedule over the run. restart_ema: the EMA teacher restarts there as the warmed-up student.
    self_training_lr: float | None = None
    restart_ema: bool = False


def supervised_steps(cfg) -> int:
    """A curriculum's supervised steps: curriculum.supervised_steps, else its fraction of max_steps,
    kept inside the run so any `--max-steps >= 1` runs every config (a smoke test of 1 or 2 steps):
    a fraction gives at least one step of each stage where the run has two steps or more (one step:
    the supervised one), and a number of steps beyond max_steps makes the whole run the supervised
    stage."""
    c, total = cfg.curriculum, cfg.max_steps
    if c.supervised_steps:
        return min(c.supervised_steps, total)
    if c.supervised_fraction <= 0:
        return 0
    return min(max(1, round(c.supervised_fraction * total)), max(1, total - 1))


@dataclass
class TrainConfig:
    seed: int = 0
    output_dir: str = "runs/default"
    max_steps: int = 200
    batch_size: int = 2  # per process, per micro-step
    grad_accum: int = 1
    log_every: int = 1
    save_every: int = 50
    keep_last: int = 3
    max_nonfinite_in_a_row: int = 5  # dropped (non-finite) micro-batches in a row before the run stops
    resume: str | None = None  # None | auto | <checkpoint dir>
    stop_at_step: int | None = None  # behave as if preempted after this step (checkpoint, exit 75)
    # Where metrics.jsonl's numbers also go, through Accelerate's trackers: any of TRACKERS
    # (tensorboard: OUTPUT_DIR/tensorboard/; the others need their package: pip install 'pg_train[wandb]', ...)
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    tracker_project: str = (
        "pg_train"  # the project / experiment name W&B, MLflow, Comet, Aim and ClearML file the run under
    )
    tensorboard: bool = True  # false: no TensorBoard even when listed in trackers (the older switch; prefer trackers)
    progress: bool = True
    objective_kind: str = "pseudo_gumbel"  # pseudo_gumbel | pseudo_label | supervised | mixed | curriculum
    eval_every: int = 0  # optimizer steps between held-out evaluations (0: off)
    eval_samples: int = 16  # held-out samples evaluated (the set: the eval: section, docs/evaluation.md)
    report: bool = True  # report.png / report.html (curves, held-out gallery) in output_dir at the end
    cudnn_attention: bool = False  # CUDA: allow SDPA's cuDNN backend (slow for shapes that change every step)
    model: ModelConfig = field(default_factory=ModelConfig)
    supervised: SupervisedConfig = field(default_factory=SupervisedConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    streams: StreamsConfig = field(default_factory=StreamsConfig)
    # the default preset's objective defaults; load_config re-applies the chosen preset's
    objective: PseudoGumbelConfig = field(default_factory=lambda: objective_for(PRESETS[ModelConfig.preset]))
    ema: EMAConfig = field(default_factory=EMAConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(num_samples=256))
    # the held-out set: named here, or (nothing named) carved out of the training data when
    # eval_every > 0; synthetic runs: scenes of another seed (pg_train/data/heldout.py)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Accelerate's tracker name -> the module it imports (the pyproject extra is the tracker's name).
TRACKERS = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "comet_ml": "comet_ml",
    "aim": "aim",
    "clearml": "clearml",
}


def active_trackers(cfg: TrainConfig) -> list[str]:
    """The trackers a run logs to: `trackers`, without tensorboard when `tensorboard` is false."""
    return [name for name in cfg.trackers if name != "tensorboard" or cfg.tensorboard]


def check_trackers(cfg: TrainConfig) -> None:
    """An unknown tracker, or one whose package is not installed, is a configuration error (not a
    failure after the model is built)."""
    import importlib.util

    for name in cfg.trackers:
        if name not in TRACKERS:
            raise ConfigError(f"trackers: unknown tracker {name!r}; known: {', '.join(TRACKERS)}")
    for name in active_trackers(cfg):
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ConfigError(
                f"trackers: {name!r} needs the {TRACKERS[name]} package: pip install 'pg_train[{name}]' "
                "(or drop it from trackers)"
            )


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp, key: str):
    """Check (and gently convert: int -> float) `value` against the annotation `tp`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(o) for o in options)}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_type, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def _apply(obj, values: dict, prefix: str = "") -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key {dotted!r}; known keys here: {sorted(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value, f"{dotted}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], dotted))


def parse_override(text: str) -> dict:
    """`a.b.c=value` -> {"a": {"b": {"c": value}}}; the value is read as YAML (numbers, bools, lists)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    if raw.strip().lower() in ("none", "null", "~"):
        value = None
    nested: dict = {}
    node = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def objective_for(preset: ModelPreset) -> PseudoGumbelConfig:
    """The objective with `preset`'s scale-dependent defaults (presets.ObjectiveDefaults): what
    a run gets when its config does not set them, and what `evaluate` and memcheck use for a
    model without a training config, so all three agree."""
    return PseudoGumbelConfig(**dataclasses.asdict(preset.objective))


def model_preset(m: ModelConfig) -> ModelPreset | None:
    """The preset the run's model will have: the checkpoint's (its config.json) when
    `model.checkpoint` is set, else the registry's; None when neither can be read here (the
    model build then reports the problem with its context)."""
    if m.checkpoint:
        from .model.io.checkpoint import preset_from_config

        try:
            return preset_from_config(json.loads((Path(m.checkpoint) / "config.json").read_text()), Path(m.checkpoint))
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return PRESETS.get(m.preset)


def _keys_set(values: dict, prefix: str = "") -> set[str]:
    """The dotted keys a YAML mapping or an override sets ({"objective": {"topk": 9}} -> objective, objective.topk)."""
    keys = set()
    for key, value in values.items():
        keys.add(f"{prefix}{key}")
        if isinstance(value, dict):
            keys |= _keys_set(value, f"{prefix}{key}.")
    return keys


def apply_preset_defaults(cfg: TrainConfig, keys_set: set[str]) -> None:
    """Objective keys of presets.ObjectiveDefaults that the user did not set follow the model's
    preset (a Sa2VA-4B run must not inherit the tiny preset's top-k 64 and 24-token captions)."""
    preset = model_preset(cfg.model)
    if preset is None:
        return
    for f in dataclasses.fields(preset.objective):
        if f"objective.{f.name}" not in keys_set:
            setattr(cfg.objective, f.name, getattr(preset.objective, f.name))


def load_config(files: list[str | Path] = (), overrides: list[str] = ()) -> TrainConfig:
    cfg = TrainConfig()
    keys_set: set[str] = set()
    for path in files:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from err
        try:
            _apply(cfg, values)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from err
        keys_set |= _keys_set(values)
    for text in overrides:
        values = parse_override(text)
        _apply(cfg, values)
        keys_set |= _keys_set(values)
    apply_preset_defaults(cfg, keys_set)
    expand_curriculum(cfg, keys_set)
    validate(cfg)
    return cfg


def curriculum_schedule(switch: int, labelled_fraction: float = 0.0, supervised_weight: float = 1.0) -> dict:
    """The two-stream schedules of a curriculum that switches at optimizer step `switch`: every
    sample labelled and supervised before it; from it, self-training on the unlabelled share and
    (labelled_fraction > 0) lambda = supervised_weight x supervised on the labelled share."""
    return {
        "labelled_fraction": [[0, 1.0], [switch, labelled_fraction]],
        "supervised_weight": [[0, 1.0], [switch, supervised_weight if labelled_fraction else 0.0]],
        "self_weight": [[0, 0.0], [switch, 1.0]],
    }


def expand_curriculum(cfg: TrainConfig, keys_set: set[str]) -> None:
    """objective_kind: curriculum -> curriculum.objective (Pseudo-Gumbel by default) over two
    streams of `data:` (one shuffled order, pg_train.data.streams) with curriculum_schedule at
    supervised_steps(cfg), the lr restarting at the switch from curriculum.lr (else optim.lr), the
    teacher restarting there when curriculum.restart_ema, and curriculum.gate_min_gap as the
    grounding gate: the same run as the explicit schedule, bit for bit. A config that also sets
    streams.* is refused naming the key (the shorthand writes them)."""
    if cfg.objective_kind != "curriculum":
        return
    c = cfg.curriculum
    checks = [
        (c.supervised_steps >= 0, "curriculum.supervised_steps", "must be >= 0 (0: supervised_fraction)"),
        (0.0 <= c.supervised_fraction < 1.0, "curriculum.supervised_fraction", "must be in [0, 1)"),
        (c.lr is None or c.lr > 0, "curriculum.lr", "must be > 0 (or null: optim.lr)"),
        (
            c.objective in ("pseudo_gumbel", "pseudo_label"),
            "curriculum.objective",
            "must be pseudo_gumbel or pseudo_label",
        ),
        (0.0 <= c.labelled_fraction < 1.0, "curriculum.labelled_fraction", "must be in [0, 1)"),
        (
            c.supervised_weight > 0 or not c.labelled_fraction,
            "curriculum.supervised_weight",
            "must be > 0 with curriculum.labelled_fraction > 0 (labelled samples that weigh nothing)",
        ),
        (
            c.gate_min_gap is None or cfg.eval_every > 0,
            "curriculum.gate_min_gap",
            "the grounding gate reads held-out evaluations: needs eval_every > 0",
        ),
        (
            c.gate_min_gap is None or c.labelled_fraction > 0,
            "curriculum.gate_min_gap",
            "needs curriculum.labelled_fraction > 0 (while the gate is closed only the labelled stream trains)",
        ),
        (
            supervised_steps(cfg) > 0,
            "curriculum.supervised_steps",
            "(or curriculum.supervised_fraction) must be > 0 with objective_kind=curriculum",
        ),
        (
            has_text(cfg.data),
            "data.source",
            f"objective_kind=curriculum's supervised warm-up needs pairs with text; {cfg.data.source!r} as configured has none",
        ),
    ]
    for ok, key, message in checks:
        if not ok:
            raise ConfigError(f"{key}: {message}")
    conflicts = sorted(k for k in keys_set if k == "streams" or k.startswith("streams."))
    leaves = [k for k in conflicts if not any(other.startswith(k + ".") for other in conflicts)]
    if leaves:
        raise ConfigError(
            f"{leaves[0]}: objective_kind=curriculum is shorthand for a two-stream schedule and sets streams.* "
            f"itself (set here: {', '.join(leaves)}); drop them, or write the schedule out under streams: "
            "with objective_kind=pseudo_gumbel (docs/design.md, 'The curriculum')"
        )
    s = cfg.streams
    s.enabled, s.labelled, s.unlabelled = True, dataclasses.replace(cfg.data), dataclasses.replace(cfg.data)
    for name, points in curriculum_schedule(supervised_steps(cfg), c.labelled_fraction, c.supervised_weight).items():
        setattr(s, name, points)
    s.self_training_lr, s.restart_ema, s.gate_min_gap = c.lr or cfg.optim.lr, c.restart_ema, c.gate_min_gap
    cfg.objective_kind = c.objective


def validate(cfg: TrainConfig) -> None:
    """Combinations that cannot work, caught before any model is built."""
    from .data.images import NORMALISE_DTYPES
    from .ema import Placement
    from .model.arch.presets import PRESETS
    from .model.text.regions import EMPTY_REGION_POLICIES, REGION_RULES
    from .model.text.stopping import STOP_RULES
    from .model.text.templates import CAPTION_SPECIAL_TOKENS, CHAT_TEMPLATES, TEMPLATE_SETS

    checks = [
        (
            cfg.model.preset in PRESETS or cfg.model.checkpoint,
            "model.preset",
            f"unknown preset {cfg.model.preset!r}; known: {sorted(PRESETS)}",
        ),
        (
            cfg.model.template in TEMPLATE_SETS,
            "model.template",
            f"unknown template set {cfg.model.template!r}; known: {sorted(TEMPLATE_SETS)}",
        ),
        (cfg.max_steps >= 1, "max_steps", "must be >= 1"),
        (cfg.batch_size >= 1, "batch_size", "must be >= 1"),
        (cfg.grad_accum >= 1, "grad_accum", "must be >= 1"),
        (cfg.save_every >= 1, "save_every", "must be >= 1"),
        (cfg.keep_last >= 1, "keep_last", "must be >= 1"),
        (0.0 <= cfg.objective.mask_ratio <= 1.0, "objective.mask_ratio", "must be in [0, 1]"),
        (cfg.objective.tau > 0, "objective.tau", "must be > 0"),
        (cfg.objective.topk >= 1, "objective.topk", "must be >= 1"),
        (
            1 <= cfg.objective.min_caption_len <= cfg.objective.max_caption_len,
            "objective.min_caption_len",
            "must be in [1, objective.max_caption_len]",
        ),
        (
            cfg.objective.empty_region_policy in EMPTY_REGION_POLICIES,
            "objective.empty_region_policy",
            f"must be one of {EMPTY_REGION_POLICIES}",
        ),
        (
            cfg.model.chat_template is None or cfg.model.chat_template in CHAT_TEMPLATES,
            "model.chat_template",
            f"unknown chat template {cfg.model.chat_template!r}; known: {sorted(CHAT_TEMPLATES)}",
        ),
        (
            1 <= (cfg.model.min_dynamic_patch or 1) <= (cfg.model.max_dynamic_patch or 12),
            "model.min_dynamic_patch",
            "needs 1 <= min_dynamic_patch <= max_dynamic_patch",
        ),
        (
            cfg.model.tiling in ("config", "official"),
            "model.tiling",
            "must be 'config' (the checkpoint's config.json) or 'official' (predict_forward's 1..12 + thumbnail)",
        ),
        (
            cfg.model.tiling != "official"
            or all(
                getattr(cfg.model, k) is None
                for k in ("dynamic_image_size", "min_dynamic_patch", "max_dynamic_patch", "use_thumbnail")
            ),
            "model.tiling",
            "'official' fixes the tiling keys (on, 1..12, thumbnail): leave model.dynamic_image_size, "
            "min_dynamic_patch, max_dynamic_patch and use_thumbnail unset",
        ),
        (
            cfg.model.stop_rule in STOP_RULES,
            "model.stop_rule",
            f"must be one of {list(STOP_RULES)}",
        ),
        (
            cfg.model.caption_special_tokens in CAPTION_SPECIAL_TOKENS,
            "model.caption_special_tokens",
            f"must be one of {list(CAPTION_SPECIAL_TOKENS)}",
        ),
        (
            cfg.model.sam2_normalise is None or cfg.model.sam2_normalise in NORMALISE_DTYPES,
            "model.sam2_normalise",
            f"must be one of {sorted(NORMALISE_DTYPES)} or null",
        ),
        (
            cfg.objective.region_rule in REGION_RULES,
            "objective.region_rule",
            "must be 'nearest' (the released model's) or 'coverage'",
        ),
        (0.0 <= cfg.ema.decay < 1.0, "ema.decay", "must be in [0, 1)"),
        (cfg.ema.update_stages >= 1, "ema.update_stages", "must be an integer >= 1 (1: every tensor every step)"),
        (
            not cfg.ema.overlap or cfg.ema.placement.startswith("full:"),
            "ema.overlap",
            "needs ema.placement=full:<device> (a teacher copy the student's step does not touch)",
        ),
        (
            not cfg.ema.overlap or (cfg.objective_kind in ("pseudo_gumbel", "mixed") and not cfg.streams.enabled),
            "ema.overlap",
            "needs objective_kind pseudo_gumbel or mixed (the objectives with a teacher) and one data stream",
        ),
        (
            not (cfg.ema.overlap and cfg.objective.do_sample),
            "ema.overlap",
            "decodes greedily only (sampling in the teacher's thread would share the student's random stream)",
        ),
        (len(cfg.optim.betas) == 2, "optim.betas", "must be two numbers"),
        (cfg.optim.lr > 0, "optim.lr", "must be > 0"),
        (cfg.optim.name in ("adamw", "adamw8bit"), "optim.name", "must be adamw or adamw8bit"),
        (
            cfg.objective_kind in OBJECTIVE_KINDS,
            "objective_kind",
            "must be pseudo_gumbel, pseudo_label, supervised, mixed or curriculum",
        ),
        (
            cfg.objective_kind != "curriculum",
            "objective_kind",
            "curriculum is a shorthand load_config expands (expand_curriculum); this config was not loaded by it",
        ),
        (cfg.eval_every >= 0 and cfg.eval_samples >= 1, "eval_every", "eval_every must be >= 0 and eval_samples >= 1"),
        (cfg.data.source in SOURCES, "data.source", f"must be one of {', '.join(SOURCES)}"),
        (
            cfg.data.source != "refer" or (cfg.data.refer_dir and cfg.data.coco_images),
            "data.refer_dir",
            "data.refer_dir and data.coco_images (the train2014 folder) are required when data.source=refer",
        ),
        (
            cfg.data.refer_split_by in (None, "unc", "umd", "google"),
            "data.refer_split_by",
            "must be unc, umd, google or null",
        ),
        (cfg.data.refer_pairs in ("sentence", "ref"), "data.refer_pairs", "must be sentence or ref"),
        (cfg.data.source != "hf" or cfg.data.hf_path, "data.hf_path", "required when data.source=hf"),
        (
            (cfg.data.hf_image2 is None) == (cfg.data.hf_mask2 is None),
            "data.hf_image2",
            "data.hf_image2 and data.hf_mask2 go together",
        ),
        (cfg.data.source != "video" or cfg.data.video_dir, "data.video_dir", "required when data.source=video"),
        (
            (cfg.data.source == "video") == (cfg.data.pairing == "other_frame"),
            "data.pairing",
            "other_frame is the pairing of data.source=video (and only of it)",
        ),
        (
            cfg.data.pairing in ("same", "augment", "other_frame"),
            "data.pairing",
            "must be same, augment or other_frame",
        ),
        (
            cfg.data.video_frame_distance >= 1 and cfg.data.sav_ann_every >= 1,
            "data.video_frame_distance",
            "video_frame_distance and sav_ann_every must be >= 1",
        ),
        (cfg.data.source != "manifest" or cfg.data.manifest, "data.manifest", "required when data.source=manifest"),
        (cfg.data.max_image_pixels >= 1, "data.max_image_pixels", "must be >= 1"),
        (
            cfg.data.source != "coco" or (cfg.data.coco_instances and cfg.data.coco_images),
            "data.coco_instances",
            "data.coco_instances and data.coco_images are required when data.source=coco",
        ),
        (
            cfg.resume in (None, "auto") or Path(cfg.resume).is_dir(),
            "resume",
            f"{cfg.resume!r} is neither 'auto' nor an existing checkpoint directory",
        ),
        # every other number a run divides by, counts with or feeds to a distribution
        (cfg.log_every >= 1, "log_every", "must be >= 1"),
        (cfg.max_nonfinite_in_a_row >= 1, "max_nonfinite_in_a_row", "must be >= 1"),
        (cfg.stop_at_step is None or cfg.stop_at_step >= 1, "stop_at_step", "must be >= 1 or null"),
        (cfg.model.lora_r is None or cfg.model.lora_r >= 1, "model.lora_r", "must be >= 1 or null (the preset's)"),
        (
            cfg.model.lora_alpha is None or cfg.model.lora_alpha > 0,
            "model.lora_alpha",
            "must be > 0 or null (the preset's)",
        ),
        (
            cfg.model.lora_dropout is None or 0.0 <= cfg.model.lora_dropout < 1.0,
            "model.lora_dropout",
            "must be in [0, 1) or null (the preset's)",
        ),
        (cfg.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0"),
        (all(0.0 <= b < 1.0 for b in cfg.optim.betas), "optim.betas", "each must be in [0, 1)"),
        (cfg.optim.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0"),
        (0.0 <= cfg.optim.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "must be in [0, 1]"),
        (cfg.optim.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)"),
        (cfg.objective.temperature > 0, "objective.temperature", "must be > 0"),
        (
            cfg.objective.static_cache is not False or not cfg.objective.cuda_graphs,
            "objective.cuda_graphs",
            "needs objective.static_cache=true (a graph replays fixed shapes)",
        ),
        (cfg.objective.sample_top_k >= 0, "objective.sample_top_k", "must be >= 0 (0: the whole vocabulary)"),
        (
            cfg.objective.bce_weight >= 0 and cfg.objective.dice_weight >= 0,
            "objective.bce_weight",
            "bce_weight and dice_weight must be >= 0",
        ),
        (0.0 <= cfg.objective.region_threshold <= 1.0, "objective.region_threshold", "must be in [0, 1]"),
        (
            min(
                cfg.supervised.lm_weight,
                cfg.supervised.seg_weight,
                cfg.supervised.mix_weight,
                cfg.supervised.summary_weight,
            )
            >= 0,
            "supervised.lm_weight",
            "supervised weights (lm, seg, mix, summary) must be >= 0",
        ),
        (
            cfg.data.num_samples >= 1 and cfg.data.image_size >= 16,
            "data.num_samples",
            "num_samples must be >= 1 and image_size >= 16",
        ),
        (
            1 <= cfg.data.min_objects <= cfg.data.max_objects,
            "data.min_objects",
            "needs 1 <= min_objects <= max_objects",
        ),
        (
            cfg.data.min_pixels >= 1 and cfg.data.num_workers >= 0,
            "data.min_pixels",
            "min_pixels must be >= 1 and num_workers >= 0",
        ),
        (cfg.data.hf_shuffle_buffer >= 1, "data.hf_shuffle_buffer", "must be >= 1"),
        (cfg.data.sample_offset >= 0, "data.sample_offset", "must be >= 0"),
        (
            cfg.eval.split is None or cfg.data.source in ("refer", "hf"),
            "eval.split",
            f"names a split of data.source=refer or hf; data.source is {cfg.data.source}",
        ),
        (
            cfg.eval.video_dir is None or cfg.data.source == "video",
            "eval.video_dir",
            f"is a held-out set of data.source=video; data.source is {cfg.data.source}",
        ),
        (
            cfg.eval.seed is None or cfg.data.source == "synthetic",
            "eval.seed",
            f"is the held-out seed of synthetic scenes; data.source is {cfg.data.source}",
        ),
        (
            cfg.eval.manifest is None or Path(cfg.eval.manifest).is_file(),
            "eval.manifest",
            f"{cfg.eval.manifest!r} is not a file",
        ),
        (
            sum(x is not None for x in (cfg.eval.manifest, cfg.eval.split, cfg.eval.video_dir)) <= 1,
            "eval",
            "name one held-out set: eval.manifest, eval.split or eval.video_dir",
        ),
    ]
    checks += self_training_checks(cfg)
    for ok, key, message in checks:
        if not ok:
            raise ConfigError(f"{key}: {message}")
    check_trackers(cfg)
    try:
        Placement.parse(cfg.ema.placement)
    except ValueError as err:
        raise ConfigError(f"ema.placement: {err}") from err


OBJECTIVE_KINDS = ("pseudo_gumbel", "pseudo_label", "supervised", "mixed", "curriculum")


def has_text(data: DataConfig) -> bool:
    """Whether `data`'s source can give its pairs a text, as far as the config tells: video never
    does, hf needs hf_caption, coco needs coco_refs (its captions are the refs' expressions);
    synthetic, refer and manifest records carry one (a manifest record without one trains with
    an empty caption)."""
    if data.source == "video":
        return False
    if data.source == "hf":
        return data.hf_caption is not None
    if data.source == "coco":
        return data.coco_refs is not None
    return True


def self_training_checks(cfg) -> list[tuple[bool, str, str]]:
    """The self-training switches and the two streams (issue 26): combinations that cannot work."""
    from .objectives.schedule import breakpoints, first_rise, schedule_at, schedule_problem

    o, s = cfg.objective, cfg.streams
    checks = [
        (
            o.segmenter_reads in ("gumbel", "argmax", "teacher"),
            "objective.segmenter_reads",
            "must be gumbel, argmax or teacher",
        ),
        (o.anchor_weight >= 0, "objective.anchor_weight", "must be >= 0"),
        (
            not o.anchor_weight or o.anchor_reference is not None,
            "objective.anchor_reference",
            "objective.anchor_weight > 0 needs a reference to anchor to: base (LoRA adapters disabled) or snapshot",
        ),
        (
            o.anchor_reference in (None, "base", "snapshot"),
            "objective.anchor_reference",
            "must be base, snapshot or null",
        ),
        (
            o.anchor_reference != "base" or (cfg.model.lora_r is None or cfg.model.lora_r >= 1),
            "objective.anchor_reference",
            "base needs LoRA adapters",
        ),
        (
            o.anchor_reference != "base"
            or not (cfg.model.train_lm_head or cfg.model.train_embed_tokens or cfg.model.extra_trainable),
            "objective.anchor_reference",
            "base is the model with its LoRA adapters off, which is not frozen when model.train_lm_head, "
            "train_embed_tokens or extra_trainable train other tensors; use snapshot",
        ),
        (0.0 < o.filter_top_fraction <= 1.0, "objective.filter_top_fraction", "must be in (0, 1]"),
        (o.diagnostics_every >= 0, "objective.diagnostics_every", "must be >= 0 (0: off)"),
    ]
    if not s.enabled:
        return checks + [
            (s.gate_min_gap is None, "streams.gate_min_gap", "needs streams.enabled=true"),
            (s.self_training_lr is None, "streams.self_training_lr", "needs streams.enabled=true"),
            (not s.restart_ema, "streams.restart_ema", "needs streams.enabled=true"),
        ]
    for name, high in (("labelled_fraction", 1.0), ("supervised_weight", float("inf")), ("self_weight", float("inf"))):
        problem = schedule_problem(getattr(s, name), 0.0, high)
        checks.append((problem is None, f"streams.{name}", problem or ""))
        if problem is not None:
            return checks
    at = breakpoints(s.labelled_fraction, s.supervised_weight, s.self_weight)
    lab = [schedule_at(s.labelled_fraction, t) for t in at]
    checks += [
        (
            cfg.objective_kind in ("pseudo_gumbel", "pseudo_label"),
            "objective_kind",
            "with streams.enabled, the self-training objective of the unlabelled stream: pseudo_gumbel or pseudo_label",
        ),
        (
            has_text(s.labelled),
            "streams.labelled.source",
            f"the labelled stream needs pairs with text; source {s.labelled.source!r} as configured has none",
        ),
        (
            all(f > 0 for f, t in zip(lab, at) if schedule_at(s.supervised_weight, t) > 0),
            "streams.labelled_fraction",
            "is 0 at a step where streams.supervised_weight (lambda) needs labelled samples",
        ),
        (
            all(f < 1 for f, t in zip(lab, at) if schedule_at(s.self_weight, t) > 0),
            "streams.labelled_fraction",
            "is 1 at a step where streams.self_weight needs unlabelled samples",
        ),
        (
            all(schedule_at(s.self_weight, t) > 0 or schedule_at(s.supervised_weight, t) > 0 for t in at),
            "streams.self_weight",
            "and streams.supervised_weight are both 0 at some step: nothing would train",
        ),
        (
            s.gate_min_gap is None or all(schedule_at(s.supervised_weight, t) > 0 for t in at),
            "streams.supervised_weight",
            "must be > 0 throughout with streams.gate_min_gap (only the labelled stream trains while the gate is closed)",
        ),
        (
            s.gate_min_gap is None or cfg.eval_every > 0,
            "streams.gate_min_gap",
            "the grounding gate reads held-out evaluations: needs eval_every > 0",
        ),
        (
            s.self_training_lr is None or s.self_training_lr > 0,
            "streams.self_training_lr",
            "must be > 0 (or null: one lr schedule over the run)",
        ),
    ]
    stage = "needs a self-training stage to begin: streams.self_weight 0 at step 0 and > 0 from a later step"
    checks += [
        (s.self_training_lr is None or first_rise(s.self_weight) is not None, "streams.self_training_lr", stage),
        (not s.restart_ema or first_rise(s.self_weight) is not None, "streams.restart_ema", stage),
    ]
    return checks


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
