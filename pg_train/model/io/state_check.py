"""Validate a state dict against what it will be loaded into, completely, before copying anything.

`nn.Module.load_state_dict(strict=True)` copies every matching tensor and only then raises on
a missing or mis-shaped one, so a refused checkpoint has already overwritten part of the model
(an adversarial review counted 311 of 406 tensors changed after the error). Every loader in
pg_train (released checkpoints, `model.init_from`, resume, the EMA shadow) therefore checks
names, shapes, dtype kinds and finiteness here first and copies only when all of it holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint that does not match the model it should load into (nothing was loaded)."""


def _list(items: list[str], limit: int = 30) -> str:
    shown = "\n    ".join(items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n    {shown}{more}"


def _kind(dtype: torch.dtype) -> str:
    """floating / complex / bool / integer: `copy_` converts silently between kinds (a float
    checkpoint into an int64 step counter truncates), so a kind change is a mismatch."""
    if dtype.is_floating_point:
        return "floating"
    if dtype.is_complex:
        return "complex"
    if dtype == torch.bool:
        return "bool"
    return "integer"


def check_state_shapes(expected: Mapping[str, tuple], found: Mapping[str, tuple], where: str | Path) -> None:
    """Raise one error listing every missing, unexpected and wrongly shaped tensor."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(n for n in set(expected) & set(found) if tuple(expected[n]) != tuple(found[n]))
    if not (missing or unexpected or wrong):
        return
    parts = [f"{where}: checkpoint does not match the model (nothing was loaded)"]
    if missing:
        parts.append(f"  {len(missing)} missing tensors:" + _list([f"{n} {list(expected[n])}" for n in missing]))
    if unexpected:
        parts.append(f"  {len(unexpected)} unexpected tensors:" + _list([f"{n} {list(found[n])}" for n in unexpected]))
    if wrong:
        parts.append(
            f"  {len(wrong)} tensors with the wrong shape:"
            + _list([f"{n}: checkpoint {list(found[n])}, model {list(expected[n])}" for n in wrong])
        )
    raise CheckpointError("\n".join(parts))


def nonfinite_report(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """'name: N NaN, M Inf of T' for every floating tensor holding a non-finite value."""
    found = []
    for name, tensor in tensors.items():
        if not (tensor.is_floating_point() or tensor.is_complex()) or tensor.device.type == "meta":
            continue
        # A finite sum proves every element finite (NaN and +-Inf propagate through a sum); an
        # overflowing sum of finite values only sends the tensor to the exact count below.
        # Measured on this CPU (1 thread, bf16): 2.85 G elements/s against 0.04 for isfinite().all().
        if bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all()):
            continue
        nan = int(torch.isnan(tensor).sum())
        inf = int(torch.isinf(tensor).sum())
        found.append(f"{name}: {nan} NaN, {inf} Inf of {tensor.numel()}")
    return found


def check_finite(tensors: Mapping[str, torch.Tensor], where: str | Path, *, allow_nonfinite: bool = False) -> None:
    """Refuse NaN/Inf weights, naming each tensor: a model that loads them trains on NaN from
    its first step, far from the file that caused it. `allow_nonfinite` is the explicit opt-in
    (`model.allow_nonfinite_weights`)."""
    if not allow_nonfinite:
        _refuse_nonfinite(nonfinite_report(tensors), where)


def _refuse_nonfinite(report: list[str], where: str | Path) -> None:
    if report:
        raise CheckpointError(
            f"{where}: {len(report)} tensors hold NaN or Inf values (nothing was loaded; "
            f"model.allow_nonfinite_weights=true loads them anyway):" + _list(report)
        )


def _refuse_wrong_kinds(wrong_kind: list[str], where: str | Path) -> None:
    if wrong_kind:
        raise CheckpointError(
            f"{where}: {len(wrong_kind)} tensors of the wrong dtype kind (nothing was loaded):"
            + _list(sorted(wrong_kind))
        )


def _kind_mismatch(name: str, stored: torch.dtype, expected: torch.dtype, exact: bool = False) -> list[str]:
    """A dtype the model cannot hold as stored: another kind always; with `exact` (a layout
    that declares the dtype: a training checkpoint holds what the model held) any other dtype."""
    differs = stored != expected if exact else _kind(stored) != _kind(expected)
    return [f"{name}: checkpoint {stored}, model {expected}"] if differs else []


def as_loaded(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The tensor as the model will hold it: finiteness is a property of the value after the
    cast (a float64 or float32 value beyond the target's range becomes Inf only there)."""
    if tensor.dtype == dtype or not tensor.is_floating_point() or not dtype.is_floating_point:
        return tensor
    return tensor.to(dtype)


def check_state_dict(
    expected: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    where: str | Path,
    *,
    allow_nonfinite: bool = False,
    exact_dtype: bool = False,
) -> None:
    """Everything that would make `load_state_dict` fail or load something wrong: names,
    shapes, dtype kinds (floating vs integer vs bool; with `exact_dtype` the dtype itself) and
    finiteness after the cast to the model's dtype, each listed by name."""
    not_tensors = sorted(n for n, t in state.items() if not isinstance(t, torch.Tensor))
    if not_tensors:
        raise CheckpointError(f"{where}: entries that are not tensors (nothing was loaded):" + _list(not_tensors))
    check_state_shapes(
        {n: tuple(t.shape) for n, t in expected.items()}, {n: tuple(t.shape) for n, t in state.items()}, where
    )
    _refuse_wrong_kinds(
        [m for n in expected for m in _kind_mismatch(n, state[n].dtype, expected[n].dtype, exact_dtype)], where
    )
    if not allow_nonfinite:
        _refuse_nonfinite(
            [r for n, t in state.items() for r in nonfinite_report({n: as_loaded(t, expected[n].dtype)})], where
        )


def load_state_dict_checked(
    module: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    where: str | Path,
    *,
    allow_nonfinite: bool = False,
    exact_dtype: bool = False,
) -> None:
    """`module.load_state_dict(state, strict=True)`, but all-or-nothing: validated completely
    first (`check_state_dict`), so a refused checkpoint leaves every weight bitwise unchanged."""
    check_state_dict(module.state_dict(), state, where, allow_nonfinite=allow_nonfinite, exact_dtype=exact_dtype)
    module.load_state_dict(state, strict=True)


def _unreadable(path: Path, err: Exception) -> CheckpointError:
    return CheckpointError(f"{path}: unreadable safetensors file ({type(err).__name__}: {err})")


def read_safetensors(path: str | Path, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file (all, or `names`), with any failure of the library
    (truncated file, garbage header, a name it does not hold) reported naming the file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: safetensors file missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            present = set(f.keys())
            absent = sorted(set(names or ()) - present)
            if absent:
                raise CheckpointError(
                    f"{path}: the file does not hold {len(absent)} tensors it should:" + _list(absent)
                )
            return {name: f.get_tensor(name) for name in (names if names is not None else sorted(present))}
    except CheckpointError:
        raise
    except Exception as err:  # SafetensorError, OSError, ...: the library's message names no file
        raise _unreadable(path, err) from err


def read_safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header (no data read), failures naming the file."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as err:
        raise _unreadable(path, err) from err


def check_safetensors_file(
    path: str | Path, expected: Mapping[str, torch.Tensor], *, allow_nonfinite: bool = False, exact_dtype: bool = False
) -> None:
    """`check_state_dict` for a file too large to hold twice: the header's names and shapes
    first, then one tensor at a time (dtype, finiteness after the cast), none of them kept."""
    from safetensors import safe_open

    path = Path(path)
    check_state_shapes({n: tuple(t.shape) for n, t in expected.items()}, read_safetensors_shapes(path), path)
    wrong_kind, nonfinite = [], []
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                wrong_kind += _kind_mismatch(name, tensor.dtype, expected[name].dtype, exact_dtype)
                if not allow_nonfinite:
                    nonfinite += nonfinite_report({name: as_loaded(tensor, expected[name].dtype)})
    except Exception as err:
        raise _unreadable(path, err) from err
    _refuse_wrong_kinds(wrong_kind, path)
    _refuse_nonfinite(nonfinite, path)
