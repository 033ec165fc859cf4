"""The released Sa2VA Hugging Face checkpoint format: read strictly, write with LoRA merged.

A checkpoint directory holds `config.json`, safetensors weights (`model.safetensors`, or shards
plus `model.safetensors.index.json`) and the tokenizer files. Tensor names are the released
ones: our module names, with LoRA merged away and SAM2's `fuser.layers.N.gamma` stored as
`.g_weight` (transformers used to rename `gamma` on load, so Sa2VA's converter avoided it).

Loading is all-or-nothing: any missing, unexpected or wrongly shaped tensor, a tensor holding
NaN or Inf, an unreadable shard or a config.json whose two descriptions of the model disagree
is an error naming them, raised before a single weight is copied (`state_check.py`). (`strict=False` loading is how a public implementation of this method trained on the
wrong weights without noticing.)
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch

from ..arch.build import apply_lora, build_model, set_trainable
from ..arch.presets import PRESETS, LanguageDims, LoraDims, ModelPreset, VisionDims, preset_from_dict
from ..arch.sa2va import Sa2VAModel
from ..text.tokenizer import load_tokenizer
from .state_check import (
    CheckpointError,
    check_finite,
    check_state_dict,
    check_state_shapes,
    read_safetensors,
    read_safetensors_shapes,
)

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_GAMMA = re.compile(r"^(grounding_encoder\.sam2_model\.memory_encoder\.fuser\.layers\.\d+)\.gamma$")
_G_WEIGHT = re.compile(r"^(grounding_encoder\.sam2_model\.memory_encoder\.fuser\.layers\.\d+)\.g_weight$")


def released_name(name: str) -> str:
    """Our parameter name (LoRA-free) -> the released checkpoint's name."""
    return _GAMMA.sub(r"\1.g_weight", name)


def module_name(name: str) -> str:
    """Released checkpoint name -> our parameter name (before LoRA injection)."""
    return _G_WEIGHT.sub(r"\1.gamma", name)


def to_sa2va_state_dict(model: Sa2VAModel) -> dict[str, torch.Tensor]:
    """The model's weights under the released names, LoRA merged into the base weights.

    Works on the meta device (names and shapes only). Dropout is ignored: merging is
    W + (alpha / r) * B @ A, exactly what peft's merge computes.
    """
    from peft.tuners.lora import LoraLayer

    if getattr(model, "quantized_4bit", False):
        raise ValueError(
            "this model's LLM base is 4-bit (model.quantize_4bit): the released format holds "
            "full-precision weights; load the trained adapters into a model built without quantize_4bit to export"
        )
    merged: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        if isinstance(module, LoraLayer):
            weight = module.get_base_layer().weight.detach()
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
            merged[f"{prefix}.base_layer.weight"] = weight

    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if ".lora_" in name:
            continue
        value = merged.get(name, tensor)
        state[released_name(name.replace(".base_layer.", "."))] = value
    return state


# ---- writing ---------------------------------------------------------------------------------
def _hf_config(preset: ModelPreset, token_ids: dict[str, int], dtype: torch.dtype) -> dict:
    v, lang = preset.vision, preset.language
    return {
        "architectures": ["Sa2VAChatModel"],
        "model_type": "sa2va_chat",
        "template": preset.template,
        "downsample_ratio": v.downsample_ratio,
        "ps_version": "v2",
        "select_layer": -1,
        "force_image_size": v.image_size,
        "dynamic_image_size": v.dynamic_image_size,
        "min_dynamic_patch": v.min_dynamic_patch,
        "max_dynamic_patch": v.max_dynamic_patch,
        "use_thumbnail": v.use_thumbnail,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "llm_config": {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "hidden_size": lang.hidden_size,
            "intermediate_size": lang.intermediate_size,
            "num_hidden_layers": lang.num_layers,
            "num_attention_heads": lang.num_heads,
            "num_key_value_heads": lang.num_kv_heads,
            "vocab_size": lang.vocab_size,
            "rope_theta": lang.rope_theta,
            "rms_norm_eps": lang.rms_norm_eps,
            "max_position_embeddings": lang.max_position_embeddings,
            "tie_word_embeddings": lang.tie_word_embeddings,
            "hidden_act": "silu",
            "eos_token_id": token_ids.get("<|im_end|>"),
        },
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "hidden_size": v.hidden_size,
            "intermediate_size": v.mlp_size,
            "num_hidden_layers": v.num_layers,
            "num_attention_heads": v.num_heads,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "layer_norm_eps": v.layer_norm_eps,
            "qkv_bias": v.qkv_bias,
            "norm_type": "layer_norm",
            "qk_normalization": False,
        },
        # What pg_train needs beyond the released keys (SAM2 dims are implicit there).
        "pg_train": {"preset": preset.to_dict(), "special_token_ids": token_ids},
    }


def save_pretrained(
    model: Sa2VAModel, directory: str | Path, *, dtype: torch.dtype | None = None, max_shard_bytes: int = 4 * 2**30
) -> Path:
    """Write `model` as a released-format checkpoint (LoRA merged, safetensors, tokenizer)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous().clone()
        for k, v in to_sa2va_state_dict(model).items()
    }
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(directory / SINGLE_FILE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(directory / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        (directory / INDEX_FILE).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    preset = dataclasses.replace(model.preset, lora=model.lora or model.preset.lora)
    param_dtype = dtype or next(model.parameters()).dtype
    (directory / CONFIG_NAME).write_text(json.dumps(_hf_config(preset, model.token_ids, param_dtype), indent=2))
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(directory))
    return directory


# ---- reading ---------------------------------------------------------------------------------
def _read_config(directory: Path) -> dict:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a Sa2VA checkpoint directory needs config.json")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: must be a JSON object, got {type(config).__name__}")
    return config


# (released section, released key, pg_train preset section, attribute): the dims both describe.
_RELEASED_DIMS = (
    ("llm_config", "hidden_size", "language", "hidden_size"),
    ("llm_config", "num_hidden_layers", "language", "num_layers"),
    ("llm_config", "num_attention_heads", "language", "num_heads"),
    ("llm_config", "num_key_value_heads", "language", "num_kv_heads"),
    ("llm_config", "intermediate_size", "language", "intermediate_size"),
    ("llm_config", "vocab_size", "language", "vocab_size"),
    ("llm_config", "rope_theta", "language", "rope_theta"),
    ("llm_config", "rms_norm_eps", "language", "rms_norm_eps"),
    ("llm_config", "max_position_embeddings", "language", "max_position_embeddings"),
    ("llm_config", "tie_word_embeddings", "language", "tie_word_embeddings"),
    ("vision_config", "hidden_size", "vision", "hidden_size"),
    ("vision_config", "num_hidden_layers", "vision", "num_layers"),
    ("vision_config", "num_attention_heads", "vision", "num_heads"),
    ("vision_config", "intermediate_size", "vision", "mlp_size"),
    ("vision_config", "image_size", "vision", "image_size"),
    ("vision_config", "patch_size", "vision", "patch_size"),
    ("vision_config", "layer_norm_eps", "vision", "layer_norm_eps"),
    ("vision_config", "qkv_bias", "vision", "qkv_bias"),
    (None, "force_image_size", "vision", "image_size"),
    (None, "downsample_ratio", "vision", "downsample_ratio"),
)


def check_config_sections_agree(config: dict, preset: ModelPreset, path: Path) -> None:
    """config.json describes the model twice when pg_train wrote it: the released `llm_config` /
    `vision_config` (what other tools read) and pg_train's own preset (what we build from). An
    edit to one of them would build a model other than the one the file claims to be; every
    dim present in both must agree."""
    disagreements = []
    for section, key, ours, attribute in _RELEASED_DIMS:
        released = config if section is None else config.get(section)
        if not isinstance(released, dict) or key not in released:
            continue
        theirs, mine = released[key], getattr(getattr(preset, ours), attribute)
        if theirs != mine or isinstance(theirs, bool) != isinstance(mine, bool):
            disagreements.append(
                f"{section + '.' if section else ''}{key} = {theirs!r} but pg_train.preset.{ours}.{attribute} = {mine!r}"
            )
    if disagreements:
        raise CheckpointError(
            f"{path / CONFIG_NAME}: the released config and pg_train's own section disagree "
            f"(which one describes the weights is unknown; fix the file):\n    " + "\n    ".join(disagreements)
        )


def preset_from_config(config: dict, path: Path) -> ModelPreset:
    """Model dims from config.json (see _dims_from_config); the chat template is always the
    released top-level `template` (phi3_chat for Sa2VA-4B): it decides the prompts and the stop
    text of a loaded checkpoint."""
    from ..text.templates import CHAT_TEMPLATES

    preset = _dims_from_config(config, path)
    template = config.get("template", preset.template)
    if template not in CHAT_TEMPLATES:
        raise CheckpointError(
            f"{path / CONFIG_NAME}: template {template!r} is not supported; known: {sorted(CHAT_TEMPLATES)}"
        )
    return dataclasses.replace(preset, template=template, vision=_tiling_from_config(config, preset.vision, path))


TILING_KEYS = {"dynamic_image_size": bool, "min_dynamic_patch": int, "max_dynamic_patch": int, "use_thumbnail": bool}


def _tiling_from_config(config: dict, vision: VisionDims, path: Path) -> VisionDims:
    """The released top-level tiling keys (InternVL's dynamic preprocessing) decide how images
    are cut into views; a key the file lacks keeps the preset's value."""
    values = {}
    for key, kind in TILING_KEYS.items():
        if key in config:
            if type(config[key]) is not kind:
                raise CheckpointError(f"{path / CONFIG_NAME}: {key} must be {kind.__name__}, got {config[key]!r}")
            values[key] = config[key]
    vision = dataclasses.replace(vision, **values)
    if not 1 <= vision.min_dynamic_patch <= vision.max_dynamic_patch:
        raise CheckpointError(
            f"{path / CONFIG_NAME}: needs 1 <= min_dynamic_patch <= max_dynamic_patch, "
            f"got {vision.min_dynamic_patch}, {vision.max_dynamic_patch}"
        )
    return vision


def _dims_from_config(config: dict, path: Path) -> ModelPreset:
    """pg_train's own section when present (checked against the released sections), else the
    released `llm_config` / `vision_config` with SAM2 hiera-large (the only grounding encoder
    Sa2VA ships)."""
    if "pg_train" in config:
        try:
            preset = preset_from_dict(config["pg_train"]["preset"])
        except (KeyError, TypeError) as err:
            raise CheckpointError(
                f"{path / CONFIG_NAME}: pg_train.preset is incomplete ({type(err).__name__}: {err})"
            ) from err
        check_config_sections_agree(config, preset, path)
        return preset
    try:
        llm, vis = config["llm_config"], config["vision_config"]
        language = LanguageDims(
            hidden_size=llm["hidden_size"],
            num_layers=llm["num_hidden_layers"],
            num_heads=llm["num_attention_heads"],
            num_kv_heads=llm["num_key_value_heads"],
            intermediate_size=llm["intermediate_size"],
            vocab_size=llm["vocab_size"],
            rope_theta=llm.get("rope_theta", 1e6),
            rms_norm_eps=llm.get("rms_norm_eps", 1e-6),
            max_position_embeddings=llm.get("max_position_embeddings", 32768),
            tie_word_embeddings=llm.get("tie_word_embeddings", False),
        )
        vision = VisionDims(
            hidden_size=vis["hidden_size"],
            num_layers=vis["num_hidden_layers"],
            num_heads=vis["num_attention_heads"],
            mlp_size=vis["intermediate_size"],
            image_size=vis.get("image_size", config.get("force_image_size", 448)),
            patch_size=vis.get("patch_size", 14),
            layer_norm_eps=vis.get("layer_norm_eps", 1e-6),
            qkv_bias=vis.get("qkv_bias", True),
            downsample_ratio=config.get("downsample_ratio", 0.5),
        )
    except KeyError as err:
        raise CheckpointError(f"{path / CONFIG_NAME}: missing field {err}") from err
    if config.get("ps_version", "v2") != "v2":
        raise CheckpointError(f"{path / CONFIG_NAME}: ps_version {config['ps_version']!r} unsupported (expected 'v2')")
    return ModelPreset(
        name="sa2va-hf",
        vision=vision,
        language=language,
        sam2=PRESETS["sa2va-4b"].sam2,
        template=config.get("template", "phi3_chat"),
    )


def _weight_files(directory: Path) -> dict[str, Path]:
    """tensor name -> file holding it."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: unreadable index ({type(err).__name__}: {err})") from err
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
        files = {name: directory / fname for name, fname in weight_map.items()}
        missing = sorted({str(p) for p in files.values() if not p.is_file()})
        if missing:
            raise CheckpointError(f"{index}: lists shard files that do not exist: {missing}")
        return files
    single = directory / SINGLE_FILE
    if not single.is_file():
        raise CheckpointError(f"{directory}: no {SINGLE_FILE} and no {INDEX_FILE} (only safetensors are read)")
    return {name: single for name in read_safetensors_shapes(single)}


def _by_file(files: dict[str, Path]) -> dict[Path, list[str]]:
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    return by_file


def _read_shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for path, names in _by_file(files).items():
        in_file = read_safetensors_shapes(path)
        absent = [name for name in names if name not in in_file]
        if absent:
            raise CheckpointError(f"{path}: the index maps {absent[:5]} here but the file does not hold them")
        shapes.update({name: in_file[name] for name in names})
    return shapes


def _check_vocab(preset: ModelPreset, shapes: dict[str, tuple], tokenizer, directory: Path) -> None:
    vocab = preset.language.vocab_size
    rows = {
        n: shapes[n][0]
        for n in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight")
        if n in shapes
    }
    problems = [f"{n} has {r} rows" for n, r in rows.items() if r != vocab]
    if len(tokenizer) > vocab:
        problems.append(f"the tokenizer has {len(tokenizer)} tokens")
    if problems:
        raise CheckpointError(
            f"{directory}: vocabulary size mismatch: config.json says {vocab}, but " + "; ".join(problems)
        )


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_declared_dtypes(stored: dict[str, torch.Tensor], declared: str | None, directory: Path) -> None:
    """Floating tensors in the dtype config.json declares (`torch_dtype`), or float32 (the
    modules transformers keeps in full precision); without a declaration, one of the three
    checkpoint dtypes. A float64 tensor (or float16 in a bfloat16 file) was not written by the
    tools that wrote the rest: refused, named, before anything loads."""
    if declared is not None and declared not in _DTYPES:
        raise CheckpointError(f"{directory / CONFIG_NAME}: torch_dtype {declared!r}; expected one of {sorted(_DTYPES)}")
    allowed = {_DTYPES[declared], torch.float32} if declared else set(_DTYPES.values())
    wrong = [f"{n}: {t.dtype}" for n, t in stored.items() if t.is_floating_point() and t.dtype not in allowed]
    if wrong:
        shown = "\n    ".join(sorted(wrong)[:30])
        raise CheckpointError(
            f"{directory}: {len(wrong)} tensors in a dtype the checkpoint does not declare "
            f"(config.json torch_dtype {declared!r}; allowed {sorted(str(d) for d in allowed)}; nothing was loaded):\n    {shown}"
        )


def from_pretrained(
    directory: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    lora: LoraDims | None | bool = True,
    template: str = "sa2va",
    quantize_4bit: bool = False,
    allow_nonfinite: bool = False,
) -> Sa2VAModel:
    """Load a released-format Sa2VA checkpoint strictly, then add fresh LoRA adapters.

    The weights are loaded into the plain model *before* LoRA wrapping (the released weights
    have LoRA merged in), cast to `dtype`. Fresh adapters start with B = 0, so the loaded model's
    outputs are unchanged by them. A tensor holding NaN or Inf is refused unless
    `allow_nonfinite` (`model.allow_nonfinite_weights`).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    config = _read_config(directory)
    preset = preset_from_config(config, directory)
    tokenizer = load_tokenizer(directory)
    files = _weight_files(directory)
    shapes = _read_shapes(files)
    _check_vocab(preset, shapes, tokenizer, directory)

    expected_ids = config.get("pg_train", {}).get("special_token_ids") or preset.special_token_ids
    preset = dataclasses.replace(preset, special_token_ids=expected_ids)
    model = build_model(preset, device=device, dtype=dtype, lora=False, tokenizer=tokenizer, template=template)
    expected = {released_name(n): tuple(t.shape) for n, t in model.state_dict().items()}
    check_state_shapes(expected, shapes, directory)

    targets = model.state_dict()
    stored = {}
    for path, names in _by_file(files).items():
        stored.update({module_name(name): tensor for name, tensor in read_safetensors(path, names).items()})
    check_state_dict(targets, stored, directory, allow_nonfinite=True)  # names, shapes, dtype kinds as stored
    check_declared_dtypes(stored, config.get("torch_dtype"), directory)
    state = {name: tensor.to(device=targets[name].device, dtype=targets[name].dtype) for name, tensor in stored.items()}
    del stored
    # Finiteness after the cast: a float32 value beyond float16's range becomes Inf only here.
    check_finite(state, directory, allow_nonfinite=allow_nonfinite)
    model.load_state_dict(state, strict=True)

    if quantize_4bit:
        from ..arch.quantize import quantize_llm_base_4bit

        quantize_llm_base_4bit(model, compute_dtype=dtype)
    lora_dims = preset.lora if lora is True else (lora or None)
    if lora_dims is not None:
        with torch.device(device):
            apply_lora(model, lora_dims)
        for param in model.parameters():  # the new adapters in the model's dtype (4-bit storage untouched)
            if param.is_floating_point():
                param.data = param.data.to(dtype)
    model.lora = lora_dims
    model.quantized_4bit = quantize_4bit
    set_trainable(model, lora_dims)
    return model
