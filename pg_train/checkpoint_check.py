"""A training checkpoint, validated completely before any of it loads; the live training state,
checked finite before it is saved.

Resume used to trust the optimizer state: a NaN Adam moment resumed with exit 0 and wrote NaN
weights, EMA and fp32 master copies into every later checkpoint; a wrong-shaped one crashed at the
first step naming no file. `check_training_checkpoint` reads everything this rank will load —
model weights, EMA, optimizer state (ZeRO partitions and fp32 master copies too), trainer and data
state, random states — and every other file the checkpoint holds (readable; floating tensors
finite), and raises `CheckpointError` naming the file and tensor. `nonfinite_training_state` is
the cheap check before a save (one sum per tensor), so a checkpoint is only ever written from
finite state and `keep_last` rotation never replaces a good checkpoint with a poisoned one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from .checkpointing import check_resume_weights, load_trainer_state, rng_state, set_rng_state
from .distributed import unwrap
from .model.io.state_check import CheckpointError, nonfinite_report, read_safetensors

# Files one rank wrote for itself (its optimizer partition, its data position and random
# streams): each rank checks its own; everything else is checked by every rank.
_RANK_FILE = re.compile(r"(?:_rank(\d+)\.|random_states_(\d+)\.pkl$|zero_pp_rank_(\d+)_)")
_TENSOR_FILES = (".pt", ".bin", ".pkl", ".pth")
# read and checked completely by check_resume_weights (names, shapes, dtypes, finiteness): not read twice
CHECKED_IN_FULL = {"model.safetensors", "pytorch_model/mp_rank_00_model_states.pt", "custom_checkpoint_0.pkl"}


def optimizer_chain(optimizer) -> list:
    """The optimizer as Accelerate returned it and every optimizer it wraps (Accelerate's
    wrapper -> DeepSpeed's ZeRO optimizer -> the torch optimizer), outermost first."""
    chain = [optimizer]
    while hasattr(chain[-1], "optimizer") and chain[-1].optimizer is not chain[-1]:
        chain.append(chain[-1].optimizer)
    return chain


def _zero_optimizer(optimizer):
    return next((o for o in optimizer_chain(optimizer) if hasattr(o, "single_partition_of_fp32_groups")), None)


def tensors_in(obj, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(dotted path, tensor) for every tensor inside nested dicts / lists / tuples."""
    if isinstance(obj, torch.Tensor):
        yield prefix or "<tensor>", obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors_in(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors_in(v, f"{prefix}[{i}]")


def nonfinite_training_state(model, ema, optimizer) -> list[str]:
    """'what: tensor: N NaN, M Inf of T' for the model's weights, the EMA shadow, every
    optimizer state tensor and (ZeRO) this rank's fp32 master partitions holding NaN/Inf."""
    found = [f"weights: {r}" for r in nonfinite_report(dict(unwrap(model).named_parameters()))]
    if ema is not None:
        found += [f"EMA shadow: {r}" for r in nonfinite_report(dict(zip(ema.names, ema.shadow)))]
    for opt in optimizer_chain(optimizer):
        state = getattr(opt, "state", None)
        if isinstance(state, dict) and type(opt).__name__ != "AcceleratedOptimizer":
            found += [f"optimizer state: {r}" for r in nonfinite_report(dict(tensors_in(list(state.values()))))]
        fp32 = getattr(opt, "single_partition_of_fp32_groups", None)
        if fp32:
            found += [f"fp32 master copy: {r}" for r in nonfinite_report(dict(tensors_in(list(fp32))))]
    return found


def state_bytes(model, ema, optimizer) -> int:
    """About what a checkpoint of this rank's state takes on disk: the model's tensors, the EMA
    shadow (twice: the pickle and ema.safetensors) and every optimizer state tensor."""
    tensors = list(unwrap(model).state_dict().values())
    if ema is not None:
        tensors += list(ema.shadow) * 2
    for opt in optimizer_chain(optimizer):
        state = getattr(opt, "state", None)
        if isinstance(state, dict) and type(opt).__name__ != "AcceleratedOptimizer":
            tensors += [t for _, t in tensors_in(list(state.values()))]
        tensors += list(getattr(opt, "single_partition_of_fp32_groups", None) or [])
    return sum(t.numel() * t.element_size() for t in tensors)


# ---- reading a checkpoint ------------------------------------------------------------------------
def _load(path: Path):
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text())
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(f"{path}: unreadable ({type(err).__name__}: {err}); nothing was loaded") from err


def _refuse_nonfinite(path: Path, obj, what: str = "") -> None:
    report = nonfinite_report(dict(tensors_in(obj)))
    if report:
        raise CheckpointError(
            f"{path}: {len(report)} {what}tensors hold NaN or Inf (nothing was loaded):\n    "
            + "\n    ".join(report[:30])
        )


def _rank_of(path: Path) -> int | None:
    m = _RANK_FILE.search(path.name)
    return None if m is None else int(next(g for g in m.groups() if g is not None))


def check_every_file(checkpoint: Path, rank: int, allow_nonfinite: bool) -> None:
    """Every file of the checkpoint this rank reads (shared ones and its own): readable, and
    its floating tensors finite. Generic, so a file a later pg_train adds is covered too."""
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        owner = _rank_of(path)
        if (owner is not None and owner != rank) or str(path.relative_to(checkpoint)) in CHECKED_IN_FULL:
            continue
        if path.suffix == ".safetensors":
            tensors = read_safetensors(path)
        elif path.suffix in _TENSOR_FILES or path.suffix == ".json":
            tensors = _load(path)
        else:
            continue
        if not allow_nonfinite:
            _refuse_nonfinite(path, tensors)


def check_optimizer_state(checkpoint: Path, model, optimizer, rank: int, world_size: int) -> None:
    """The optimizer state this rank loads matches the optimizer it loads into: torch AdamW's
    moments the shape and dtype of their parameter (named), a ZeRO partition the size, dtype and
    partition count of this run's."""
    zero = _zero_optimizer(optimizer)
    if zero is not None:
        files = sorted((checkpoint / "pytorch_model").glob(f"*zero_pp_rank_{rank}_mp_rank_*_optim_states.pt"))
        if len(files) != 1:
            raise CheckpointError(
                f"{checkpoint / 'pytorch_model'}: expected one optimizer partition of rank {rank}, found {[f.name for f in files]}"
            )
        _check_zero_partition(files[0], zero, world_size)
        return
    path = checkpoint / "optimizer.bin"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (the optimizer state of a checkpoint without DeepSpeed)")
    base = optimizer_chain(optimizer)[-1]
    if isinstance(base, torch.optim.AdamW):
        names = {id(p): n for n, p in unwrap(model).named_parameters()}
        _check_adamw_state(path, _load(path), base, names)


def _check_adamw_state(path: Path, saved, optimizer: torch.optim.Optimizer, names: dict[int, str]) -> None:
    if not (
        isinstance(saved, dict) and isinstance(saved.get("state"), dict) and isinstance(saved.get("param_groups"), list)
    ):
        raise CheckpointError(f"{path}: not an optimizer state (a dict of 'state' and 'param_groups')")
    groups = optimizer.param_groups
    if [len(g.get("params", ())) for g in saved["param_groups"]] != [len(g["params"]) for g in groups]:
        raise CheckpointError(
            f"{path}: parameter groups of {[len(g.get('params', ())) for g in saved['param_groups']]} tensors, "
            f"this optimizer has {[len(g['params']) for g in groups]} (another model or trainable set?)"
        )
    params = {i: p for g_saved, g in zip(saved["param_groups"], groups) for i, p in zip(g_saved["params"], g["params"])}
    problems = []
    for index, entry in saved["state"].items():
        param = params.get(index)
        if param is None or not isinstance(entry, dict):
            problems.append(f"state {index!r}: no such parameter in the saved groups")
            continue
        for key, value in entry.items():
            where = f"{names.get(id(param), f'parameter {index}')} ({key})"
            if key == "step":
                if not (isinstance(value, (int, float)) or (torch.is_tensor(value) and value.numel() == 1)):
                    problems.append(f"{where}: a step count, got {type(value).__name__}")
            elif not torch.is_tensor(value):
                problems.append(f"{where}: not a tensor ({type(value).__name__})")
            elif tuple(value.shape) != tuple(param.shape) or value.dtype != param.dtype:
                problems.append(
                    f"{where}: {value.dtype} {list(value.shape)}, parameter {param.dtype} {list(param.shape)}"
                )
    if problems:
        raise CheckpointError(
            f"{path}: optimizer state does not match this optimizer (nothing was loaded):\n    "
            + "\n    ".join(problems[:30])
        )


def _check_zero_partition(path: Path, zero, world_size: int) -> None:
    saved = _load(path)
    try:
        osd = saved["optimizer_state_dict"]
        fp32, base, paddings = (
            osd["single_partition_of_fp32_groups"],
            osd["base_optimizer_state"],
            osd["group_paddings"],
        )
        count = osd["partition_count"]
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: not a DeepSpeed ZeRO optimizer partition (missing {err})") from err
    ours = zero.single_partition_of_fp32_groups
    counts = count if isinstance(count, list) else [count]
    problems = []
    if any(c != world_size for c in counts):
        problems.append(f"partition count {count}, this run has {world_size} processes")
    if len(fp32) != len(ours):
        problems.append(f"{len(fp32)} parameter groups, this optimizer has {len(ours)}")
    for i, (stored, mine) in enumerate(zip(fp32, ours)):
        pad = paddings[i] if i < len(paddings) else 0
        if (
            not torch.is_tensor(stored)
            or stored.dtype != mine.dtype
            or stored.numel() not in (mine.numel(), mine.numel() - pad)
        ):
            problems.append(
                f"fp32 master copy of group {i}: {getattr(stored, 'dtype', type(stored).__name__)} "
                f"{list(getattr(stored, 'shape', []))}, this partition {mine.dtype} {list(mine.shape)}"
            )
    for index, entry in (base.get("state", {}) if isinstance(base, dict) else {}).items():
        mine = ours[index] if isinstance(index, int) and index < len(ours) else None
        for key, value in entry.items() if isinstance(entry, dict) else ():
            if key == "step" or not torch.is_tensor(value):
                continue
            if mine is None or tuple(value.shape) != tuple(mine.shape) or value.dtype != mine.dtype:
                problems.append(
                    f"group {index} ({key}): {value.dtype} {list(value.shape)}, this partition "
                    f"{getattr(mine, 'dtype', None)} {list(getattr(mine, 'shape', []))}"
                )
    if problems:
        raise CheckpointError(
            f"{path}: ZeRO optimizer partition does not match this run (nothing was loaded):\n    "
            + "\n    ".join(problems)
        )


def check_rng_state(path: Path, saved, set_state: Callable[[dict], None], get_state: Callable[[], dict]) -> None:
    """The saved random state loads: tried for real (set, then this process's state put back),
    so whatever the setter would reject is refused before anything else is loaded."""
    current = get_state()
    try:
        set_state(saved)
    except Exception as err:
        raise CheckpointError(f"{path}: random state does not load ({type(err).__name__}: {err})") from err
    finally:
        set_state(current)


def check_training_checkpoint(
    checkpoint: Path,
    *,
    model,
    optimizer,
    ema,
    check_trainer_state: Callable[[dict], None],
    rank: int,
    world_size: int,
    allow_nonfinite: bool = False,
) -> None:
    """Everything this rank will load from `checkpoint`, or `CheckpointError` naming file and
    tensor: model weights and EMA (names, shapes, exact dtypes, finite), optimizer state,
    trainer and data state (`check_trainer_state`, e.g. TrainState.check_state_dict), random
    states; and every other file: readable, finite."""
    if not checkpoint.is_dir():
        raise CheckpointError(f"{checkpoint}: not a checkpoint directory")
    check_resume_weights(checkpoint, unwrap(model), ema, allow_nonfinite=allow_nonfinite)
    check_optimizer_state(checkpoint, model, optimizer, rank, world_size)
    try:
        trainer_state = load_trainer_state(checkpoint, rank)
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{checkpoint / f'trainer_state_rank{rank}.json'}: {err}") from err
    try:
        check_trainer_state(trainer_state)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{checkpoint / f'trainer_state_rank{rank}.json'}: {err}") from err
    rng = checkpoint / f"rng_state_rank{rank}.pt"
    if rng.is_file():
        check_rng_state(rng, _load(rng), set_rng_state, rng_state)
    check_every_file(checkpoint, rank, allow_nonfinite)
