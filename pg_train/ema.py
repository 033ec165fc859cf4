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
                  gives the step log's student-shadow distance (a second pass cost twice as much)
                  and refreshes a student-dtype mirror of the shadow, so swapping the teacher in
                  moves bf16 bytes already rounded, and the staging buffers double as the
                  student's backup during the swap (no allocation per generation).
    full:<device> a complete teacher model on another device (e.g. cuda:1, or cpu); its trainable
                  tensors are refreshed from the shadow (kept on that device) before generating.

Staged updates (`update_stages` k, any placement): the tensors are split once into k shards of
about equal elements; optimizer step n updates shard n mod k only, with the product of the k
per-step decays since that shard's last update (d^k without warm-up). Each tensor's shadow is
then exactly the every-step EMA of a student held constant between its samples: the same time
constant, a teacher up to k-1 steps staler per tensor, and 1/k of the host work per step (the
`cpu` placement's update is a memory-bound stream over the shadow: no thread count takes one
full pass under the memory floor). Prior art: `update_every` of lucidrains' ema-pytorch (README:
"how often to actually update, to save on compute"), which keeps beta per update and so
stretches the time constant k-fold; here the decay is compounded to keep it, and the tensors
are spread over the k steps instead of all updated on every k-th.
The EMA knows nothing of data or losses.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
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


def shard_tensors(sizes: Sequence[int], stages: int) -> list[list[int]]:
    """`stages` shards of the tensor indices 0..len(sizes)-1, balanced by elements and fixed by
    the sizes alone (largest first, each to the lightest shard, ties to the lowest index), so a
    resumed run rebuilds the same shards. Each shard lists its indices in the student's order;
    with more stages than tensors some shards are empty (their steps update nothing)."""
    if not (isinstance(stages, int) and not isinstance(stages, bool) and stages >= 1):
        raise ValueError(f"EMA update_stages must be an integer >= 1, got {stages!r}")
    shards: list[list[int]] = [[] for _ in range(stages)]
    load = [0] * stages
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        lightest = min(range(stages), key=lambda j: (load[j], j))
        shards[lightest].append(i)
        load[lightest] += sizes[i]
    return [sorted(shard) for shard in shards]


def _chunks(tensors: Sequence[torch.Tensor]) -> list[tuple[int, int, int]]:
    """(tensor index, start, end) of the HOST_CHUNK-element slices of flat tensors."""
    return [
        (i, start, min(start + HOST_CHUNK, t.numel()))
        for i, t in enumerate(tensors)
        for start in range(0, t.numel(), HOST_CHUNK)
    ]


def _run(pool: ThreadPoolExecutor | None, fn, tasks: list) -> list:
    return [fn(task) for task in tasks] if pool is None else list(pool.map(fn, tasks))  # list(): wait, raise


def _squared_distance(current: torch.Tensor, shadow: torch.Tensor, owned: bool) -> float:
    """sum((current - shadow)^2) of one fp32 chunk (a dot product: one pass, no squares kept);
    `owned`: `current` is a scratch copy that may be overwritten (else it is the student's)."""
    diff = current.sub_(shadow) if owned else torch.sub(current, shadow)
    return float(torch.dot(diff, diff))


def host_lerp_(
    shadow: list[torch.Tensor],
    current: list[torch.Tensor],
    weight: float | Sequence[float] | None,
    pool: ThreadPoolExecutor | None,
    distance: bool = False,
    mirror: Sequence[torch.Tensor | None] | None = None,
) -> float | None:
    """shadow[i] <- lerp(shadow[i], current[i].float(), weight) on the host, in HOST_CHUNK slices
    spread over `pool` (None: in this thread). Element-wise, so bitwise `torch._foreach_lerp_`'s
    result whatever the chunking; the bf16 -> fp32 conversion is exact and done per chunk.
    `weight`: one for every tensor or one per tensor; None: no update, the distance only (the
    same chunks and sums, so the value does not depend on the path).
    `distance`: also return the SQUARED L2 distance between `current` and the (updated) shadow,
    summed chunk by chunk in a fixed order while the chunk is in cache (the step's log reads it:
    a second pass over 1 GB of shadow for Sa2VA-4B costs twice the update).
    `mirror`: per tensor None or a buffer in the student's dtype that gets each updated chunk's
    rounding while it is in cache (the teacher's weights, ready for the swap)."""
    weights = list(weight) if isinstance(weight, (list, tuple)) else [weight] * len(shadow)
    flat_s = [s.view(-1) for s in shadow]
    flat_c = [c.reshape(-1) for c in current]
    flat_m = [None if m is None else m.view(-1) for m in (mirror or [None] * len(shadow))]

    def run(task) -> float:
        i, start, end = task
        s, chunk = flat_s[i][start:end], flat_c[i][start:end].to(torch.float32)
        if weights[i] is not None:
            s.lerp_(chunk, weights[i])
            if flat_m[i] is not None:
                flat_m[i][start:end].copy_(s)
        return _squared_distance(chunk, s, owned=flat_c[i].dtype != torch.float32) if distance else 0.0

    sums = _run(pool, run, _chunks(flat_s))
    return sum(sums, 0.0) if distance else None


def host_copy_(dst: list[torch.Tensor], src: list[torch.Tensor], pool: ThreadPoolExecutor | None) -> None:
    """dst[i].copy_(src[i]) (rounding to dst's dtype): host-to-host pairs in HOST_CHUNK slices over
    `pool` (a memory-bound copy one thread does not saturate); a pair with a device end as one
    non-blocking copy (a DMA: no host work to share; the caller waits where it must)."""
    host = [(d.view(-1), s.reshape(-1)) for d, s in zip(dst, src) if d.device.type == s.device.type == "cpu"]
    for d, s in zip(dst, src):
        if not d.device.type == s.device.type == "cpu":
            d.copy_(s, non_blocking=True)

    def run(task) -> None:
        i, start, end = task
        host[i][0][start:end].copy_(host[i][1][start:end])

    _run(pool, run, _chunks([d for d, _ in host]))


class EMATeacher:
    def __init__(
        self,
        student,
        decay: float = 0.999,
        placement: str = "same",
        warmup: bool = False,
        allow_nonfinite_state: bool = False,
        host_threads: int | None = None,
        update_stages: int = 1,
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
        # staged updates: optimizer step n updates shards[n % update_stages]; per tensor, the
        # update (0-based count) that last wrote it (-1: the start value) fixes the decay it gets
        self.update_stages = update_stages
        self.shards = shard_tensors([p.numel() for p in params], update_stages)
        self.updated_at = [-1] * len(params)
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
        self._forget_distance()
        # placement=cpu: the host update's threads (host_threads // torch's intra-op threads
        # workers: each lerp already uses those); host buffers in the student's dtype, allocated
        # once (pinned for a CUDA student): the staging (the update's copy of the student, and the
        # student's backup while the teacher is swapped in) and the mirror (the shadow rounded to
        # the student's dtype: the teacher's weights; None where the student is fp32).
        self.host_threads = host_threads or default_host_threads()
        workers = self.host_threads // max(1, torch.get_num_threads())
        cpu = self.placement.kind == "cpu"
        self._host_pool = (
            ThreadPoolExecutor(workers, thread_name_prefix="pg_train-ema") if cpu and workers > 1 else None
        )
        on_cuda = any(p.is_cuda for p in params)
        self._staging = [self._new_buffer(p, shadow_device, p.dtype, on_cuda) for p in params] if cpu else None
        self._mirror = (
            [None if p.dtype == torch.float32 else self._new_buffer(p, shadow_device, p.dtype, on_cuda) for p in params]
            if cpu
            else None
        )
        self._refresh_mirror()
        self._staged: list[tuple | None] = [None] * len(params)  # placement=cpu: whose values `_staging` holds

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
    def step_decay(self, n: int) -> float:
        """The every-step EMA's decay at optimizer step n: fixed, or with warm-up
        min(decay, (1+n)/(10+n)) so early teachers follow the fast-changing student more closely."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + n) / (10 + n))

    def _decay_since(self, last: int, n: int) -> float:
        """The decay an update at step n applies to a tensor last written by update `last` (-1:
        the start value): the product of the per-step decays of steps last+1..n, in order — what
        the every-step EMA applies over those steps to a student held constant."""
        return math.prod(self.step_decay(m) for m in range(last + 1, n + 1))

    def current_decay(self) -> float:
        """The decay of the next update for a tensor of its shard (each tensor once the first
        cycle is over): one step's `step_decay` with update_stages 1, else the product over the
        update_stages steps since that shard's last update (decay^update_stages without warm-up)."""
        n = self.num_updates
        return self._decay_since(max(-1, n - self.update_stages), n)

    @torch.no_grad()
    def update(self, student) -> None:
        """shadow <- decay * shadow + (1 - decay) * student in fp32, for this step's shard (every
        tensor with update_stages 1), with one `_foreach` call per distinct decay (placement cpu:
        the same lerp in chunks over host threads, `host_lerp_`, with the distance fused).
        Call once per optimizer step (see `update_if_stepped`)."""
        params = self._params(unwrap(student))
        n = self.num_updates
        shard = self.shards[n % self.update_stages]
        weights = [1.0 - self._decay_since(self.updated_at[i], n) for i in shard]
        if self.placement.kind == "cpu":
            self._squares[n % self.update_stages] = self._host_update(params, shard, weights)
        else:
            device = self.shadow[0].device
            current = {i: params[i].detach().to(device=device, dtype=torch.float32, non_blocking=True) for i in shard}
            if device.type == "cpu" and any(params[i].is_cuda for i in shard):
                # placement=full:cpu: a device-to-host copy with non_blocking=True lands in pinned
                # memory and returns before its bytes have arrived; the lerp below would read stale
                # memory. Wait once, after every copy is queued (they still overlap one another).
                torch.cuda.current_stream(next(p.device for p in params if p.is_cuda)).synchronize()
            for weight in dict.fromkeys(weights):  # one group unless update_stages changed mid-run
                group = [i for i, w in zip(shard, weights) if w == weight]
                torch._foreach_lerp_([self.shadow[i] for i in group], [current[i] for i in group], weight)
        for i in shard:
            self.updated_at[i] = n
        self.num_updates += 1
        if self.placement.kind == "cpu":
            # staged by this update: valid until the next optimizer step (then the next update)
            self._note_staged(params, [i for i in shard if params[i].is_cuda])
            if len(shard) == len(params):  # the distance_to of now, free
                self._distance = (self._distance_key(params), math.sqrt(self._squares[n % self.update_stages]))

    def _student_key(self, p: torch.Tensor) -> tuple:
        """While this is unchanged, the staging holds tensor `p`'s values. In-place torch ops
        (a torch optimizer, the swap's restore, loading) bump the version; the update count
        covers optimizer steps that write without bumping it (DeepSpeed's flat buffers,
        bitsandbytes' kernels, `.data`): each is followed by an update before the next swap."""
        return (self.num_updates, p.data_ptr(), p._version)

    def _note_staged(self, params: list[torch.nn.Parameter], indices: Iterable[int]) -> None:
        """placement=cpu: the staging buffers of `indices` now hold the student's values."""
        for i in indices:
            self._staged[i] = self._student_key(params[i])

    def _host_current(self, params: list[torch.nn.Parameter], indices: Sequence[int]) -> list[torch.Tensor]:
        """placement=cpu: the student's tensors `indices` on the host: a CPU tensor itself, a CUDA
        one through its pinned staging buffer (non-blocking, one wait after all are queued: the
        host must not read bytes still in flight; the swap then need not copy them again)."""
        on_cuda = [i for i in indices if params[i].is_cuda]
        host_copy_([self._staging[i] for i in on_cuda], [params[i].detach() for i in on_cuda], None)
        if on_cuda:
            torch.cuda.current_stream(params[on_cuda[0]].device).synchronize()
        self._note_staged(params, on_cuda)
        return [self._staging[i] if params[i].is_cuda else params[i].detach() for i in indices]

    def _host_update(self, params: list[torch.nn.Parameter], shard: list[int], weights: list[float]) -> float:
        """placement=cpu: the chunked multi-threaded lerp on the host over `shard`, refreshing the
        mirror's chunks; returns the squared distance between the shard's student tensors and their
        updated shadow (computed in the same pass)."""
        return host_lerp_(
            [self.shadow[i] for i in shard],
            self._host_current(params, shard),
            weights,
            self._host_pool,
            distance=True,
            mirror=[self._mirror[i] for i in shard],
        )

    def _refresh_mirror(self) -> None:
        """placement=cpu: the mirror <- the shadow rounded to the student's dtype (after a start,
        a restart or a load: the update keeps it current chunk by chunk)."""
        mirrors = [(m, s) for m, s in zip(self._mirror or [], self.shadow) if m is not None]
        host_copy_([m for m, _ in mirrors], [s for _, s in mirrors], self._host_pool)

    def _forget_distance(self) -> None:
        """The shadow changed outside an update: no cached distance may be read again."""
        self._distance: tuple | None = None  # placement=cpu: (key, distance) when one update covered every tensor
        self._squares: list[float | None] = [None] * self.update_stages  # placement=cpu: per shard, its last update's

    def _distance_key(self, params: list[torch.nn.Parameter]) -> tuple:
        return (self.num_updates, tuple(p._version for p in params))

    @torch.no_grad()
    def restart_from(self, student) -> None:
        """shadow <- student, as a new EMA would start: the curriculum's Pseudo-Gumbel stage takes
        the warmed-up student as its teacher, as a second run started from its checkpoint would."""
        for s, p in zip(self.shadow, self._params(unwrap(student))):
            s.copy_(p.detach())
        self._refresh_mirror()
        self.num_updates = 0
        self.updated_at = [-1] * len(self.names)
        self._teacher_synced_at = -1
        self._forget_distance()
        self._staged = [None] * len(self.names)  # the update count restarts: old keys could recur

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

        same / cpu: the shadow, rounded to the student's dtype, is copied into the student's own
        trainable tensors (in place: CUDA graphs captured on them stay valid), and the student's
        values are restored bitwise on exit (even on error). full: the separate teacher model,
        refreshed from the shadow when it changed.
        same: the backup is a device clone each call (the caching allocator serves it again; held
        between calls it would raise device memory outside generation); the rounding happens in
        the copy itself, no fp32 temporary.
        cpu: no allocation: the backup is the staging buffers, copied only where they do not
        already hold the student's values (the update staged them and nothing changed the student
        since: the next step's generation with update_stages 1); the teacher's values come from
        the mirror, already rounded (bf16 over PCIe, not fp32).
        """
        if self.teacher_model is not None:
            yield self.synced_copy()
            return
        module = unwrap(student)
        params = self._params(module)
        targets = [p.detach() for p in params]  # shares storage and version counter
        with torch.no_grad():
            if self.placement.kind == "cpu":
                backup = self._hold_student(params)
                teacher = [s if m is None else m for s, m in zip(self.shadow, self._mirror)]
            else:
                backup, teacher = [t.clone() for t in targets], self.shadow
            host_copy_(targets, teacher, self._host_pool)
        try:
            yield module
        finally:
            with torch.no_grad():
                host_copy_(targets, backup, self._host_pool)
            if params[0].device.type == "cuda":
                torch.cuda.current_stream(params[0].device).synchronize()
            if self.placement.kind == "cpu":  # the staging holds the restored student's values
                self._note_staged(params, range(len(params)))

    def _hold_student(self, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
        """placement=cpu: the staging buffers holding the student's values, copied only where
        they do not already (a CUDA student's copies stay queued: the host never reads them
        before the swap's final wait)."""
        stale = [i for i, p in enumerate(params) if self._staged[i] != self._student_key(p)]
        host_copy_([self._staging[i] for i in stale], [params[i].detach() for i in stale], self._host_pool)
        return self._staging

    def synced_copy(self):
        """placement=full: the separate teacher model with the current shadow copied in (when it
        changed). Later updates write the shadow only, so the copy may be read while the student
        trains (pg_train.overlap) until the next call. Only the tensors written since the last
        sync are copied (update `_teacher_synced_at` or later; all after a start, restart or load,
        when it is -1): with update_stages k, about 1/k of them per step."""
        if self.teacher_model is None:
            raise ValueError(f"synced_copy needs ema.placement=full:<device>, this EMA is placed {self.placement.kind}")
        if self._teacher_synced_at != self.num_updates:
            with torch.no_grad():
                for p, s, written in zip(self._params(self.teacher_model), self.shadow, self.updated_at):
                    if written >= self._teacher_synced_at:
                        p.copy_(s.to(p.dtype))
            self._teacher_synced_at = self.num_updates
        return self.teacher_model

    # ---- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "updated_at": dict(zip(self.names, self.updated_at)),
            "log_squares": list(self._squares),  # placement cpu, k > 1: the log's per-shard terms
            "names": list(self.names),
            "shadow": [s.detach().cpu().clone() for s in self.shadow],
        }

    def check_state_dict(self, state: dict, *, allow_nonfinite: bool | None = None) -> None:
        """Raise `CheckpointError` unless `load_state_dict(state)` would load all of it: names,
        shapes, finiteness (NaN/Inf refused unless `allow_nonfinite`, default: the constructor's
        `allow_nonfinite_state`), decay and counters (`updated_at`, the update that last wrote each
        tensor, and `log_squares`, the step log's per-shard terms, are optional: a checkpoint written
        before staged updates had every tensor written by the last update). Resume calls it before
        anything loads."""
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
        updated_at = state.get("updated_at")
        if updated_at is not None and not (
            isinstance(updated_at, dict)
            and set(updated_at) == set(names)
            and all(
                isinstance(v, int) and not isinstance(v, bool) and -1 <= v < num_updates for v in updated_at.values()
            )
        ):
            raise CheckpointError(
                f"{where}: updated_at must map each of the {len(names)} tensor names to the update that last wrote it "
                f"(an int in [-1, num_updates={num_updates})), got {type(updated_at).__name__}"
            )
        squares = state.get("log_squares")
        if squares is not None and not (
            isinstance(squares, list) and all(v is None or (isinstance(v, float) and v >= 0) for v in squares)
        ):
            raise CheckpointError(f"{where}: log_squares must be a list of floats >= 0 or null, got {squares!r}")

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
        written = state.get("updated_at") or dict.fromkeys(self.names, self.num_updates - 1)
        self.updated_at = [written[name] for name in self.names]
        self._refresh_mirror()
        self._teacher_synced_at = -1
        self._forget_distance()
        self._staged = [None] * len(self.names)  # the update count jumps: old keys could recur
        if len(state.get("log_squares") or ()) == self.update_stages:  # else written with other stages
            self._squares = list(state["log_squares"])

    def memory_bytes(self) -> dict[str, int]:
        """Bytes this EMA holds per device: the shadow (placement cpu: with the staging and the
        mirror), plus a full teacher model if placed so."""
        held: dict[str, int] = defaultdict(int)
        for s in self.shadow + (self._staging or []) + [m for m in self._mirror or [] if m is not None]:
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
        `cpu`: the shadow plus the staging buffers and, for a student not in fp32, the mirror (both
        in the model's dtype, pinned for a CUDA student)."""
        module = unwrap(student)
        where = Placement.parse(placement)
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        shadow = trainable * 4
        elem = torch.finfo(model_dtype).bits // 8
        if where.kind == "same":
            return {training_device: shadow}
        if where.kind == "cpu":
            return {"cpu": shadow + trainable * elem * (1 if model_dtype == torch.float32 else 2)}
        copy_bytes = sum(
            t.numel() * (elem if t.is_floating_point() else t.element_size())
            for t in list(module.parameters()) + list(module.buffers())
        )
        return {str(where.device): shadow + copy_bytes}

    def distance_to(self, student) -> float:
        """L2 distance between shadow and student (a log metric: is the teacher moving?).
        placement=cpu: computed by the update when it covered every tensor and the student has
        not changed since (the log right after a step), else by the same chunked sums."""
        params = self._params(unwrap(student))
        if self.placement.kind == "cpu":
            if self._distance is not None and self._distance[0] == self._distance_key(params):
                return self._distance[1]
            every = range(len(params))
            return math.sqrt(host_lerp_(self.shadow, self._host_current(params, every), None, self._host_pool, True))
        total = 0.0
        for p, s in zip(params, self.shadow):
            total += float((p.detach().to(s.device, torch.float32) - s).pow(2).sum())
        return total**0.5

    def log_distance(self, student) -> float:
        """The step log's `ema_distance`: `distance_to`, except for placement cpu with
        update_stages k > 1, where a pass over every tensor would cost k times the staged update.
        There it is the root of the sum of each shard's squared distance as the shard's own last
        update measured it (in its pass, free): each term up to k-1 steps old, like that shard's
        teacher (checkpoints carry the terms). A shard not updated since the start or a restart is
        measured now, once."""
        if self.placement.kind != "cpu" or self.update_stages == 1:
            return self.distance_to(student)
        params = self._params(unwrap(student))
        for j, shard in enumerate(self.shards):
            if self._squares[j] is None:
                current = self._host_current(params, shard)
                shadow = [self.shadow[i] for i in shard]
                self._squares[j] = host_lerp_(shadow, current, None, self._host_pool, distance=True)
        return math.sqrt(sum(self._squares))

    def checksum(self) -> float:
        return float(sum(s.double().sum() for s in self.shadow))
