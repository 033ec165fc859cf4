"""EMA teacher: an fp32 shadow of the student's trainable tensors, placed where memory allows.

Why a shadow and not a copy: the teacher differs from the student only in its trainable tensors
(LoRA, mlp1, text_hidden_fcs, the SAM2 decoder; embed/lm_head when trainable). The frozen base —
96% of Sa2VA-4B — is the same in both, so it is shared, never copied.

Why fp32: at decay 0.999 an update moves the shadow by 0.001 * (student - shadow); in bf16 (8
bits of mantissa) that step rounds away and the EMA never moves — the public implementation's
teacher stayed at its initial weights.

Placements:
    same          shadow on the training device; swapped into the student's modules to generate.
    cpu           shadow in host memory (pinned when CUDA exists), copied in non-blocking. The
                  update stages the student's tensors in pinned host buffers (in their own
                  dtype: half the PCIe bytes of fp32) and runs the fp32 lerp on the host in
                  chunks over a thread pool (`host_lerp_`): one host thread took ~0.45 s per
                  Sa2VA-4B step; the chunks give bitwise the single-call result. The same pass
                  gives the step log's student-shadow distance (a second pass cost twice as much).
    full:<device> a complete teacher model on another device (e.g. cuda:1, or cpu); its trainable
                  tensors are refreshed from the shadow (kept on that device) before generating.
The EMA knows nothing of data or losses.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .distributed import unwrap


@dataclass(frozen=True)
class Placement:
    kind: str  # "same" | "cpu" | "full"
    device: torch.device | None = None  # only for "full"

    @classmethod
    def parse(cls, text: str) -> "Placement":
        if text in ("same", "cpu"):
            return cls(text)
        if text.startswith("full:"):
            return cls("full", torch.device(text.split(":", 1)[1]))
        raise ValueError(
            f"EMA placement {text!r}: expected 'same', 'cpu' or 'full:<device>' (e.g. full:cuda:1, full:cpu)"
        )


# Elements per host-update task: large enough that a task's overhead (~10 us) is noise, a
# multiple of every SIMD width so chunk edges never move an element off the vectorised loop.
HOST_CHUNK = 1 << 20


def default_host_threads() -> int:
    """Host threads for the `cpu` placement's update: the cores this process may use, at most 8
    (the lerp is memory-bound; more threads than memory channels buy nothing)."""
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _squared_distance(current: torch.Tensor, shadow: torch.Tensor, owned: bool) -> float:
    """sum((current - shadow)^2) of one fp32 chunk (a dot product: one pass, no squares kept);
    `owned`: `current` is a scratch copy that may be overwritten (else it is the student's)."""
    diff = current.sub_(shadow) if owned else torch.sub(current, shadow)
    return float(torch.dot(diff, diff))


def host_lerp_(
    shadow: list[torch.Tensor],
    current: list[torch.Tensor],
    weight: float | None,
    pool: ThreadPoolExecutor | None,
    distance: bool = False,
) -> float | None:
    """shadow[i] <- lerp(shadow[i], current[i].float(), weight) on the host, in HOST_CHUNK slices
    spread over `pool` (None: in this thread). Element-wise, so bitwise `torch._foreach_lerp_`'s
    result whatever the chunking; the bf16 -> fp32 conversion is exact and done per chunk.
    `distance`: also return the L2 distance between `current` and the (updated) shadow, summed
    chunk by chunk in a fixed order while the chunk is in cache (the step's log reads it: a second
    pass over 1 GB of shadow for Sa2VA-4B costs twice the update). `weight` None: no update,
    the distance only (the same chunks and sums, so the value does not depend on the path)."""
    tasks = [
        (s.view(-1), c.reshape(-1), start, min(start + HOST_CHUNK, s.numel()))
        for s, c in zip(shadow, current)
        for start in range(0, s.numel(), HOST_CHUNK)
    ]

    def run(task) -> float:
        s, c, start, end = task
        chunk = c[start:end].to(torch.float32)
        if weight is not None:
            s[start:end].lerp_(chunk, weight)
        return _squared_distance(chunk, s[start:end], owned=c.dtype != torch.float32) if distance else 0.0

    sums = [run(task) for task in tasks] if pool is None else list(pool.map(run, tasks))  # list(): wait, raise
    return math.sqrt(sum(sums)) if distance else None


class EMATeacher:
    def __init__(
        self,
        student,
        decay: float = 0.999,
        placement: str = "same",
        warmup: bool = False,
        allow_nonfinite_state: bool = False,
        host_threads: int | None = None,
    ):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        module = unwrap(student)
        self.decay = decay
        self.warmup = warmup
        self.allow_nonfinite_state = allow_nonfinite_state  # load_state_dict: admit NaN/Inf shadows
        self.placement = Placement.parse(placement)
        self.num_updates = 0
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        if not self.names:
            raise ValueError("the student has no trainable parameters: nothing for an EMA to follow")
        params = self._params(module)
        self.teacher_model = None
        if self.placement.kind == "full":
            device = self.placement.device
            self.teacher_model = copy.deepcopy(module).to(device).eval().requires_grad_(False)
            shadow_device = device
        elif self.placement.kind == "cpu":
            shadow_device = torch.device("cpu")
        else:
            shadow_device = params[0].device
        pin = shadow_device.type == "cpu" and torch.cuda.is_available()
        self.shadow = [self._new_buffer(p, shadow_device, torch.float32, pin).copy_(p.detach()) for p in params]
        self._teacher_synced_at = -1
        self._distance: tuple | None = None  # placement=cpu: (num_updates, student versions) -> distance
        # placement=cpu: the host update's threads (host_threads // torch's intra-op threads
        # workers: each lerp already uses those) and, for a CUDA student, pinned staging buffers
        # in the student's dtype, allocated once.
        self.host_threads = host_threads or default_host_threads()
        workers = self.host_threads // max(1, torch.get_num_threads())
        self._host_pool = (
            ThreadPoolExecutor(workers, thread_name_prefix="pg_train-ema")
            if self.placement.kind == "cpu" and workers > 1
            else None
        )
        self._staging = (
            [self._new_buffer(p, shadow_device, p.dtype, True) for p in params]
            if self.placement.kind == "cpu" and any(p.is_cuda for p in params)
            else None
        )

    @staticmethod
    def _new_buffer(like: torch.Tensor, device: torch.device, dtype: torch.dtype, pin: bool) -> torch.Tensor:
        buffer = torch.empty(like.shape, dtype=dtype, device=device)
        return buffer.pin_memory() if pin else buffer

    def _params(self, module) -> list[torch.nn.Parameter]:
        named = dict(module.named_parameters())
        missing = [n for n in self.names if n not in named]
        if missing:
            raise KeyError(f"EMA: the model lacks tensors the shadow follows: {missing[:5]}")
        return [named[n] for n in self.names]

    # ---- the update --------------------------------------------------------------------------
    def current_decay(self) -> float:
        """The decay for the next update: fixed, or with warm-up min(decay, (1+n)/(10+n)) so
        early teachers follow the fast-changing student more closely."""
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, student) -> None:
        """shadow <- decay * shadow + (1 - decay) * student, in fp32 with one `_foreach` call
        (placement cpu: the same lerp in chunks over host threads, `host_lerp_`).
        Call once per optimizer step (see `update_if_stepped`)."""
        params = self._params(unwrap(student))
        device = self.shadow[0].device
        if self.placement.kind == "cpu":
            distance = self._host_update(params)
            self.num_updates += 1
            self._distance = (self._distance_key(params), distance)
            return
        current = [p.detach().to(device=device, dtype=torch.float32, non_blocking=True) for p in params]
        if device.type == "cpu" and any(p.is_cuda for p in params):
            # placement=cpu: a device-to-host copy with non_blocking=True lands in pinned memory
            # and returns before its bytes have arrived; the host lerp below would read stale
            # memory. Wait once, after every copy is queued (they still overlap one another).
            torch.cuda.current_stream(next(p.device for p in params if p.is_cuda)).synchronize()
        torch._foreach_lerp_(self.shadow, current, 1.0 - self.current_decay())
        self.num_updates += 1

    def _host_current(self, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
        """placement=cpu: the student's tensors on the host (a CUDA student's through the pinned
        staging, non-blocking, one wait after all are queued: the host must not read bytes still
        in flight)."""
        if self._staging is None:
            return [p.detach() for p in params]
        for b, p in zip(self._staging, params):
            b.copy_(p.detach(), non_blocking=True)
        torch.cuda.current_stream(next(p.device for p in params if p.is_cuda)).synchronize()
        return self._staging

    def _host_update(self, params: list[torch.nn.Parameter]) -> float:
        """placement=cpu: the chunked multi-threaded lerp on the host; returns the distance
        between the student and the updated shadow (computed in the same pass)."""
        current = self._host_current(params)
        return host_lerp_(self.shadow, current, 1.0 - self.current_decay(), self._host_pool, distance=True)

    def _distance_key(self, params: list[torch.nn.Parameter]) -> tuple:
        # in-place changes (optimizer step, teacher swap, loading) bump a tensor's version
        return (self.num_updates, tuple(p._version for p in params))

    @torch.no_grad()
    def restart_from(self, student) -> None:
        """shadow <- student, as a new EMA would start: the curriculum's Pseudo-Gumbel stage takes
        the warmed-up student as its teacher, as a second run started from its checkpoint would."""
        for s, p in zip(self.shadow, self._params(unwrap(student))):
            s.copy_(p.detach())
        self.num_updates = 0
        self._teacher_synced_at = -1
        self._distance = None

    def update_if_stepped(self, student, accelerator) -> bool:
        """Update only when the optimizer really stepped: at the end of a gradient-accumulation
        cycle (`sync_gradients`) and not skipped by the loss scaler. Returns whether it did."""
        if not accelerator.sync_gradients or accelerator.optimizer_step_was_skipped:
            return False
        self.update(student)
        return True

    # ---- the teacher ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def as_teacher(self, student):
        """Yield a model that carries the EMA weights, for generation only (no grad).

        same / cpu: the shadow is copied into the student's own trainable tensors, and the
        student's values are restored bitwise on exit (even on error). full: the separate
        teacher model, refreshed from the shadow when it changed.
        """
        if self.teacher_model is not None:
            yield self.synced_copy()
            return
        module = unwrap(student)
        params = self._params(module)
        pin = self.placement.kind == "cpu" and torch.cuda.is_available()
        backup_device = torch.device("cpu") if self.placement.kind == "cpu" else params[0].device
        with torch.no_grad():
            backup = [self._new_buffer(p, backup_device, p.dtype, pin) for p in params]
            for b, p in zip(backup, params):
                b.copy_(p.detach(), non_blocking=True)
            for p, s in zip(params, self.shadow):
                p.copy_(s.to(p.device, non_blocking=True).to(p.dtype))
        try:
            yield module
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup):
                    p.copy_(b.to(p.device, non_blocking=True))
            if params[0].device.type == "cuda":
                torch.cuda.current_stream(params[0].device).synchronize()

    def synced_copy(self):
        """placement=full: the separate teacher model with the current shadow copied in (when it
        changed). Later updates write the shadow only, so the copy may be read while the student
        trains (pg_train.overlap) until the next call."""
        if self.teacher_model is None:
            raise ValueError(f"synced_copy needs ema.placement=full:<device>, this EMA is placed {self.placement.kind}")
        if self._teacher_synced_at != self.num_updates:
            with torch.no_grad():
                for p, s in zip(self._params(self.teacher_model), self.shadow):
                    p.copy_(s.to(p.dtype))
            self._teacher_synced_at = self.num_updates
        return self.teacher_model

    # ---- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "names": list(self.names),
            "shadow": [s.detach().cpu().clone() for s in self.shadow],
        }

    def check_state_dict(self, state: dict, *, allow_nonfinite: bool | None = None) -> None:
        """Raise `CheckpointError` unless `load_state_dict(state)` would load all of it: names,
        shapes, finiteness (NaN/Inf refused unless `allow_nonfinite`, default: the constructor's
        `allow_nonfinite_state`), decay and counters. Resume calls it before anything loads."""
        from .model.io.state_check import CheckpointError, check_state_dict

        where = "EMA state"
        missing_keys = [k for k in ("names", "shadow", "decay", "warmup", "num_updates") if k not in state]
        if missing_keys:
            raise CheckpointError(f"{where}: missing entries {missing_keys}")
        names, shadow = list(state["names"]), list(state["shadow"])
        if len(names) != len(shadow) or len(set(names)) != len(names):
            raise CheckpointError(
                f"{where}: {len(names)} names (distinct: {len(set(names))}) for {len(shadow)} shadow tensors"
            )
        try:
            allow = self.allow_nonfinite_state if allow_nonfinite is None else allow_nonfinite
            check_state_dict(
                dict(zip(self.names, self.shadow)),
                dict(zip(names, shadow)),
                where,
                allow_nonfinite=allow,
                exact_dtype=True,  # the shadow is float32 whatever the placement
            )
        except CheckpointError as err:
            raise CheckpointError(f"{err}\n(the EMA state does not match the model's trainable tensors)") from err
        decay, warmup, num_updates = state["decay"], state["warmup"], state["num_updates"]
        if (
            not (isinstance(decay, (int, float)) and not isinstance(decay, bool) and 0.0 <= decay < 1.0)
            or not isinstance(warmup, bool)
            or not (isinstance(num_updates, int) and not isinstance(num_updates, bool) and num_updates >= 0)
        ):
            raise CheckpointError(
                f"{where}: decay {decay!r} (a float in [0, 1)), warmup {warmup!r} (a bool), num_updates {num_updates!r} (an int >= 0)"
            )

    def load_state_dict(self, state: dict, *, allow_nonfinite: bool | None = None) -> None:
        """All-or-nothing: `check_state_dict` first, so a refused state leaves this EMA bitwise
        as it was (Accelerate's resume calls this with the state alone)."""
        self.check_state_dict(state, allow_nonfinite=allow_nonfinite)
        saved = dict(zip(state["names"], state["shadow"]))
        for name, s in zip(self.names, self.shadow):
            s.copy_(saved[name])
        self.decay = state["decay"]
        self.warmup = state["warmup"]
        self.num_updates = state["num_updates"]
        self._teacher_synced_at = -1
        self._distance = None

    def memory_bytes(self) -> dict[str, int]:
        """Bytes this EMA holds per device: the shadow, plus a full teacher model if placed so."""
        held: dict[str, int] = defaultdict(int)
        for s in self.shadow + (self._staging or []):
            held[str(s.device)] += s.numel() * s.element_size()
        if self.teacher_model is not None:
            for t in list(self.teacher_model.parameters()) + list(self.teacher_model.buffers()):
                held[str(t.device)] += t.numel() * t.element_size()
        return dict(held)

    @staticmethod
    def predicted_bytes(
        student, placement: str, training_device: str = "cuda:0", model_dtype: torch.dtype = torch.bfloat16
    ) -> dict[str, int]:
        """What `memory_bytes` will report for `placement`, without allocating (meta models too).
        `cpu` from a CUDA student: the shadow plus the pinned staging buffers (model dtype)."""
        module = unwrap(student)
        where = Placement.parse(placement)
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        shadow = trainable * 4
        elem = torch.finfo(model_dtype).bits // 8
        if where.kind == "same":
            return {training_device: shadow}
        if where.kind == "cpu":
            return {"cpu": shadow + (trainable * elem if training_device.startswith("cuda") else 0)}
        copy_bytes = sum(
            t.numel() * (elem if t.is_floating_point() else t.element_size())
            for t in list(module.parameters()) + list(module.buffers())
        )
        return {str(where.device): shadow + copy_bytes}

    def distance_to(self, student) -> float:
        """L2 distance between shadow and student (a log metric: is the teacher moving?).
        placement=cpu: computed by the update when the student has not changed since (the log
        right after a step), else by the same chunked sums."""
        params = self._params(unwrap(student))
        if self.placement.kind == "cpu":
            if self._distance is not None and self._distance[0] == self._distance_key(params):
                return self._distance[1]
            return host_lerp_(self.shadow, self._host_current(params), None, self._host_pool, distance=True)
        total = 0.0
        for p, s in zip(params, self.shadow):
            total += float((p.detach().to(s.device, torch.float32) - s).pow(2).sum())
        return total**0.5

    def checksum(self) -> float:
        return float(sum(s.double().sum() for s in self.shadow))
