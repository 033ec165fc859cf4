"""A whole Pseudo-Gumbel training step, stage by stage: ours vs the design note's literal step.

    python -m pg_train.bench.step [--preset tiny|bench|sa2va-4b] [--batch N] [--steps 3]
                                  [--caption-lens 64,16] [--gradient-checkpointing]
                                  [--variants ours,nographs,eagerbuckets,exactshapes,dynamic,untrimmed,seed]
                                  [--sync-debug]

Batch: memcheck's prediction is asked first (pg_train.bench.fit): without --batch the largest
batch predicted to fit the device is used; a --batch predicted not to fit is refused with the
prediction printed (exit 2; --no-fit-check runs it anyway).

Variants (VARIANTS): `ours` is our step with the teacher decoding through the static cache and the
bucketed step replayed from CUDA graphs (objective.static_cache + cuda_graphs; off CUDA the same
step runs eagerly, with exact shapes); `nographs` the static cache without graphs; `dynamic` the
dynamic cache (training's default); `untrimmed` ours with the last decoder layer run on every row
(pg_train.model.arch.decoder), to show what that one optimisation is worth on the preset at hand; `seed`
the design note's literal step (its teacher decodes with the dynamic cache). Two variants locate a
bf16 divergence between `ours` and `nographs` (issue 28): `eagerbuckets` is `ours` with nothing
captured (the same padded bucket shapes, every step eager: equal to `ours` if replay is exact) and
`exactshapes` is `ours` with unpadded buckets (graph_decode.EXACT: equal to `nographs` if the
padding is what changes the bf16 results). Each variant's first-step captions are compared with
`ours`' (first differing position per row). With two or more caption lengths the summary gives
each variant's marginal decoding cost per token: the teacher stage's difference between the
longest and the shortest captions over their difference in tokens (vision tower and prefill
cancel out). Captions are forced to
each length of --caption-lens (min = max), so teacher ms/token (the teacher stage, vision tower and
prefill included, over the caption tokens) counts exactly that many tokens. Every variant starts
from identical weights (same seed) and runs the same batches with the same
per-sample noise, each in a fresh process of this command (on CPU, a process that already ran
the other variant keeps its freed heap, which would bias the second one's RSS); the first step of each is checked for
equal teacher captions and equal loss, and the timings are medians over the steps after the
first (warm-up). Stages: teacher generation, masking, pass 1, Gumbel, pass 2, loss, backward,
optimizer, EMA update; `vision` and `sam2 encoder` are the time inside the passes spent in
those towers (forward hooks), shown as parts of the stages that contain them.
Memory: on CUDA the allocator's peak over a step (everything resident: weights, teacher, Adam
state, activations); on CPU the exact bytes of persistent state (weights + teacher + optimizer
state, by tensor storage) plus the peak RSS growth during a step (sampled every millisecond).
MFU (CUDA only): model FLOPs counted as 2 x parameters x tokens for each forward matmul (LLM,
lm_head rows actually computed, vision tower, SAM2 ignored) and 2x that for backward through
the trainable path, over the step time and the card's dense bf16 peak given by --peak-tflops.
--sync-debug (CUDA only): one more step after the timed ones under
torch.cuda.set_sync_debug_mode("warn"); the warnings (host syncs) are counted per stage through
the phase observer (the clock's own synchronisations excepted) with their most frequent call sites.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import multiprocessing as mp
import statistics
import time
import warnings
from collections import Counter, defaultdict

import torch

from ..ema import EMATeacher
from ..memcheck.measure import build_batch, optimizer_tensors, storage_bytes
from ..model import build_offline
from ..objectives.pseudo_gumbel import STAGES as OBJECTIVE_STAGES
from ..objectives.settings import PseudoGumbelConfig
from .memory import PeakMemory

STAGES = (*OBJECTIVE_STAGES, "backward", "optimizer", "ema")  # teacher, mask, pass1, gumbel, pass2, loss, ...
PARTS = ("vision", "sam2_encoder")
# name -> the teacher's decoding settings (PseudoGumbelConfig fields); `untrimmed` is `ours` with
# every layer on every row, `seed` the literal step (pg_train.bench.seed_step).
VARIANTS = {
    "ours": {"static_cache": True, "cuda_graphs": True},
    "eagerbuckets": {"static_cache": True, "cuda_graphs": True},  # nothing captured (VARIANT_SETUP)
    "exactshapes": {"static_cache": True, "cuda_graphs": True},  # unpadded buckets (VARIANT_SETUP)
    "nographs": {"static_cache": True, "cuda_graphs": False},
    "dynamic": {"static_cache": False, "cuda_graphs": False},
    "untrimmed": {"static_cache": True, "cuda_graphs": True},
    "seed": {"static_cache": False, "cuda_graphs": False},
}


def _no_capture() -> None:
    from ..model.decoding import graph_decode

    graph_decode.CAPTURERS.pop("cuda", None)


def _exact_shapes() -> None:
    from ..model.decoding import graph_decode

    graph_decode.POLICIES["cuda"] = graph_decode.EXACT


# Run in the variant's own process before anything else (each variant has a fresh process).
VARIANT_SETUP = {"eagerbuckets": _no_capture, "exactshapes": _exact_shapes}


class SyncDebug:
    """Host syncs of one step: torch.cuda.set_sync_debug_mode("warn") while `active()`, the
    warnings counted per stage (`stage(name)`, entered by StageClock) and per call site."""

    MESSAGE = "synchronizing"

    def __init__(self):
        self.caught: list | None = None
        self.per_stage: Counter = Counter()
        self.sites: Counter = Counter()
        self.total = 0

    @contextlib.contextmanager
    def active(self):
        previous = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.caught = caught
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield self
            finally:
                torch.cuda.set_sync_debug_mode(previous)
                self.caught = None
        syncs = [w for w in caught if self.MESSAGE in str(w.message)]
        self.total += len(syncs)
        self.sites.update(f"{w.filename}:{w.lineno}" for w in syncs)

    def _count(self) -> int:
        return sum(self.MESSAGE in str(w.message) for w in self.caught) if self.caught is not None else 0

    @contextlib.contextmanager
    def stage(self, name: str):
        before = self._count()
        try:
            yield
        finally:
            self.per_stage[name] += self._count() - before

    @contextlib.contextmanager
    def paused(self):
        """The benchmark's own synchronisations are not the step's."""
        if self.caught is None:
            yield
            return
        torch.cuda.set_sync_debug_mode(0)
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("warn")

    def report(self, top: int = 12) -> dict:
        staged = sum(self.per_stage.values())
        return {
            "total": self.total,
            "per_stage": dict(self.per_stage),
            "outside_stages": self.total - staged,
            "top_sites": self.sites.most_common(top),
        }


class StageClock:
    """Accumulates wall time per named stage (synchronising CUDA around each); `clock(stage)` is
    also the phase observer handed to pseudo_gumbel_step, so the production step is timed as it is.
    With `sync_debug` (a SyncDebug) the host syncs inside each stage are counted too."""

    def __init__(self, device: torch.device, sync_debug: SyncDebug | None = None):
        self.device = device
        self.times: dict[str, float] = defaultdict(float)
        self.sync_debug = sync_debug

    def _sync(self):
        if self.device.type == "cuda":
            with self.sync_debug.paused() if self.sync_debug is not None else contextlib.nullcontext():
                torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, name: str):
        self._sync()
        start = time.perf_counter()
        try:
            with self.sync_debug.stage(name) if self.sync_debug is not None else contextlib.nullcontext():
                yield
        finally:
            self._sync()
            self.times[name] += time.perf_counter() - start

    def watch(self, module: torch.nn.Module, name: str) -> list:
        """Time every forward of `module` under `name` (a part of whichever stage runs it)."""
        starts = []

        def pre(_m, _i):
            self._sync()
            starts.append(time.perf_counter())

        def post(_m, _i, _o):
            self._sync()
            self.times[name] += time.perf_counter() - starts.pop()

        return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


def make_batches(model, batch_size: int, steps: int, device, pairing: str = "augment") -> list[dict]:
    batches = []
    for step in range(steps):
        batch = build_batch(model, batch_size, device, seed=step, pairing=pairing)
        batch["sample_seeds"] = torch.arange(batch_size) + 1000 * step
        batches.append(batch)
    return batches


def persistent_bytes(model, optimizer, teacher) -> int:
    """Bytes of the distinct storages a step keeps between steps: weights, optimizer state and
    the teacher (an EMA shadow, plus its model for `full:` placement, or a full copy)."""

    def module_tensors(module):
        return list(module.parameters()) + list(module.buffers())

    tensors = module_tensors(model) + optimizer_tensors(optimizer)
    if isinstance(teacher, EMATeacher):
        tensors += teacher.shadow + (module_tensors(teacher.teacher_model) if teacher.teacher_model is not None else [])
    else:
        tensors += module_tensors(teacher)
    return storage_bytes(tensors)


def run_variant(variant: str, args, device: torch.device, dtype: torch.dtype) -> dict:
    """One variant's report (VARIANTS), captions of `args.caption_len` tokens."""
    return _run_variant(variant, args, device, dtype)


def _run_variant(variant: str, args, device: torch.device, dtype: torch.dtype) -> dict:
    from ..model.decoding import graph_decode
    from ..objectives.pseudo_gumbel import pseudo_gumbel_step
    from .seed_step import full_copy_ema_update, seed_literal_step

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: expected one of {', '.join(VARIANTS)}")
    torch.manual_seed(0)
    if variant in VARIANT_SETUP:
        VARIANT_SETUP[variant]()
    model = build_offline(args.preset, device=str(device), dtype=dtype, seed=0)
    model.trim_last_layer = variant != "untrimmed"  # untrimmed: what the trim is worth
    if getattr(args, "gradient_checkpointing", False):
        from ..model import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    sync_debug = getattr(args, "sync_debug", False) and device.type == "cuda"
    batches = make_batches(model, args.batch, args.steps + sync_debug, device, getattr(args, "pairing", "augment"))
    cfg = PseudoGumbelConfig(
        max_caption_len=args.caption_len, min_caption_len=args.caption_len, topk=args.topk, **VARIANTS[variant]
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    if variant != "seed":
        teacher = EMATeacher(model, decay=0.999, placement="same")
    else:
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
    clock = StageClock(device)
    hooks = clock.watch(model.vision_model, "vision") + clock.watch(
        model.grounding_encoder.sam2_model.image_encoder, "sam2_encoder"
    )
    if variant == "seed":
        hooks += clock.watch(teacher.vision_model, "vision")

    def one_step(batch) -> dict:
        if variant != "seed":
            out = pseudo_gumbel_step(model, teacher, batch, cfg, observer=clock)
            result = {
                "loss": out.loss,
                "caption_ids": out.caption_ids,
                "caption_lengths": out.caption_lengths,
                "hard_ids": out.hard_ids,
            }
        else:
            result = seed_literal_step(model, teacher, batch, cfg, clock)
        with clock("backward"):
            result["loss"].backward()
        with clock("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        with clock("ema"):
            teacher.update(model) if variant != "seed" else full_copy_ema_update(teacher, model, 0.999)
        return result

    decoding_before = dict(graph_decode.STATS)
    steps, first = [], None
    peak_bytes = []
    for batch in batches[: args.steps]:
        clock.times.clear()
        gc.collect()
        with PeakMemory(device) as peak:
            start = time.perf_counter()
            result = one_step(batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            total = time.perf_counter() - start
        peak_bytes.append(peak.peak_bytes)
        if first is None:
            first = {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in result.items()}
        steps.append({"total": total, **dict(clock.times)})
        del result
    decoding = {k: v - decoding_before.get(k, 0) for k, v in graph_decode.STATS.items()}
    syncs = None
    if sync_debug:  # one more step, not timed: warnings cost host time
        clock.sync_debug = SyncDebug()
        with clock.sync_debug.active():
            one_step(batches[-1])
        syncs = clock.sync_debug.report()
        clock.sync_debug = None
    for h in hooks:
        h.remove()
    persistent = persistent_bytes(model, optimizer, teacher)
    timed = steps[1:] or steps
    median = {k: statistics.median(s.get(k, 0.0) for s in timed) for k in ("total",) + STAGES + PARTS}
    report = {
        "variant": variant,
        "caption_len": args.caption_len,
        "decoding": dict(VARIANTS[variant]),
        "times_s": median,
        "teacher_ms_per_token": 1000 * median["teacher"] / args.caption_len,
        "first_loss": float(first["loss"]),
        "first_captions": first["caption_ids"].tolist(),
        "first_hard_ids": first["hard_ids"].tolist(),
        "samples_per_s": args.batch / median["total"],
        "persistent_bytes": persistent,
        "step_peak_bytes": max(peak_bytes[1:] or peak_bytes),
        "decode_stats": decoding,  # graph captures / replays / eager steps over the timed steps
    }
    if syncs is not None:
        report["sync_debug"] = syncs
    if device.type == "cuda":
        report["peak_bytes"] = torch.cuda.max_memory_allocated(device)  # absolute: everything resident
        views = float(batches[0]["num_views1"].float().mean())
        report["image_views"] = views
        report["mfu"] = (
            model_flops(model, args.batch, args.caption_len, views) / median["total"] / (args.peak_tflops * 1e12)
        )
    else:
        report["peak_bytes"] = persistent + report["step_peak_bytes"]
    model = optimizer = teacher = batches = None  # (one_step holds them too) freed before the next variant
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return report


def _run_here(variant, args, device, dtype) -> dict | str:
    """One variant's report in this process, or the failure as text (the parent prints it and
    exits 1)."""
    from ..precision import enable_tf32

    enable_tf32()  # as training's accelerator does
    if args.no_cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        return run_variant(variant, args, torch.device(device), dtype)
    except Exception:
        import traceback

        return f"{variant} failed:\n{traceback.format_exc()}"


def _run_in_child(queue, variant, args, device, dtype) -> None:
    queue.put(_run_here(variant, args, device, dtype))


def model_flops(model, batch: int, caption_len: int, views: float = 1.0) -> float:
    """Analytic FLOPs of one step: 2 * params * tokens for each matmul-dominated forward, with
    the backward counted as 2x the forward of pass 1 and pass 2 (activation gradients flow
    through the frozen LLM; weight gradients exist only for the small trainable part, so this
    over-counts slightly). The teacher's generation: prompt + caption_len tokens through the LLM.
    `views`: MLLM views per image (InternVL tiling: 256 image tokens and one ViT pass each)."""
    lm = model.language_model.model
    llm_params = sum(p.numel() for n, p in lm.named_parameters() if "embed_tokens" not in n)
    vision_params = sum(p.numel() for p in model.vision_model.parameters())
    D, V = model.preset.language.hidden_size, model.preset.language.vocab_size
    extra_image_tokens = (views - 1) * model.preset.vision.num_image_tokens
    region = len(model.prompts.region_prompt(8)) + extra_image_tokens
    segment = (
        len(model.prompts.segment_prefix()) + extra_image_tokens + caption_len + len(model.prompts.segment_suffix()[0])
    )
    vision_tokens = ((model.preset.vision.image_size // model.preset.vision.patch_size) ** 2 + 1) * views
    per_sample = (
        2 * llm_params * (region + caption_len)  # teacher generation (prefill + decode, KV cache)
        + 2 * D * V * caption_len  # teacher lm_head rows
        + 3 * 2 * llm_params * (region + caption_len)  # pass 1 forward + backward
        + 3 * 2 * D * V * caption_len  # pass 1 lm_head rows forward + backward
        + 3 * 2 * llm_params * segment  # pass 2 forward + backward
        + 3 * 2 * vision_params * vision_tokens  # vision tower (three image passes)
    )
    return float(per_sample * batch)


def print_table(reports: dict[str, dict], args, device) -> None:
    """Stage times of each variant and seed/variant ratios; `reports` holds "seed" and any of the
    other VARIANTS, all with captions of `args.caption_len` tokens."""
    seed = reports["seed"]
    mine = [name for name in VARIANTS if name in reports and name != "seed"]
    print(
        f"\n{args.preset} preset, batch {args.batch}, captions {args.caption_len} tokens, top-k {args.topk}, pairing {getattr(args, 'pairing', 'augment')}, {device}"
        f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else f', {torch.get_num_threads()} threads'}; "
        f"median of {max(1, args.steps - 1)} step(s) after a warm-up step"
        f"{'; cuDNN attention off' if args.no_cudnn_attention else ''}"
    )
    print(
        f"{'stage':16}"
        + "".join(f" {name + ' s':>12}" for name in mine + ["seed"])
        + "".join(f" {'seed/' + name:>15}" for name in mine)
    )

    def row(label, values, ratios, note=""):
        print(f"{label:16}" + "".join(f" {v:12.3f}" for v in values) + "".join(f" {r:15.2f}" for r in ratios) + note)

    for stage in STAGES + PARTS + ("total",):
        values = [reports[name]["times_s"][stage] for name in mine + ["seed"]]
        label = f"  ({stage} part)" if stage in PARTS else stage
        row(label, values, [values[-1] / v if v > 0 else float("nan") for v in values[:-1]])
    row(
        "samples/s",
        [reports[n]["samples_per_s"] for n in mine + ["seed"]],
        [reports[n]["samples_per_s"] / seed["samples_per_s"] for n in mine],
    )
    ms = [reports[n]["teacher_ms_per_token"] for n in mine + ["seed"]]
    row(
        "teacher ms/tok",
        ms,
        [ms[-1] / v if v > 0 else float("nan") for v in ms[:-1]],
        "   (teacher stage / caption tokens)",
    )
    gib = 2**30

    def memory_row(label, key, note=""):
        values = [reports[n][key] / gib for n in mine + ["seed"]]
        row(label, values, [values[-1] / max(v, 1e-12) for v in values[:-1]], note)

    if device.type == "cpu":
        memory_row("persistent GiB", "persistent_bytes", "   (weights + teacher + Adam state)")
        memory_row("step RSS GiB", "step_peak_bytes", "   (peak RSS growth during a step)")
    memory_row("peak GiB", "peak_bytes")
    if "mfu" in seed:
        print(
            f"{'MFU':16}"
            + "".join(f" {reports[n]['mfu']:12.1%}" for n in mine + ["seed"])
            + f"   (analytic FLOPs / {args.peak_tflops} TFLOP/s)"
        )
    else:
        print(f"{'MFU':16} (CUDA only: FLOPs over the card's peak)")
    for name in mine:
        d = reports[name].get("decode_stats", {})
        if d:
            print(
                f"{name} decoding steps: {d.get('replays', 0)} graph replays ({d.get('captures', 0)} captures), "
                f"{d.get('eager_steps', 0) + d.get('warmup_steps', 0)} eager"
                f"{', ' + str(d['capture_failures']) + ' capture failures' if d.get('capture_failures') else ''}"
            )
    for name in mine:
        r = reports[name]
        print(
            f"first step, same weights and noise, {name} vs seed: captions equal {r['first_captions'] == seed['first_captions']}, "
            f"Gumbel picks equal {r['first_hard_ids'] == seed['first_hard_ids']}, loss {r['first_loss']:.6f} vs {seed['first_loss']:.6f} "
            f"(|diff| {abs(r['first_loss'] - seed['first_loss']):.1e})"
        )
    if "ours" in reports:
        for name in [n for n in mine + ["seed"] if n != "ours"]:
            print(f"first step, {name} vs ours: {caption_divergence(reports['ours'], reports[name])}")
    for name in mine + ["seed"]:
        if "sync_debug" in reports[name]:
            print_sync_debug(name, reports[name]["sync_debug"])


def caption_divergence(a: dict, b: dict) -> str:
    """Where two reports' first-step captions part: 'equal', or each differing row's first
    differing position (token index) and the ids there."""
    rows = []
    for row, (x, y) in enumerate(zip(a["first_captions"], b["first_captions"])):
        if x != y:
            at = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
            rows.append(
                f"row {row} from token {at} ({x[at] if at < len(x) else '-'} vs {y[at] if at < len(y) else '-'})"
            )
    return "captions equal" if not rows else "captions differ: " + "; ".join(rows)


def marginal_ms_per_token(by_len: dict[int, dict[str, dict]]) -> dict[str, float]:
    """Per variant: (teacher stage at the longest captions - at the shortest) / (their token
    difference), in ms: what one more decoded token costs, without the vision tower and prefill."""
    if len(by_len) < 2:
        return {}
    short, long = min(by_len), max(by_len)
    return {
        name: 1000 * (by_len[long][name]["times_s"]["teacher"] - r["times_s"]["teacher"]) / (long - short)
        for name, r in by_len[short].items()
        if name in by_len[long]
    }


def print_sync_debug(name: str, syncs: dict) -> None:
    stages = ", ".join(f"{stage} {n}" for stage, n in syncs["per_stage"].items() if n)
    outside = f", {syncs['outside_stages']} between stages" if syncs["outside_stages"] else ""
    print(
        f"{name}: {syncs['total']} host syncs in one step (sync debug mode): {stages or 'none in the stages'}{outside}"
    )
    for site, n in syncs["top_sites"]:
        print(f"    {n:5d}  {site}")


def print_summary(by_len: dict[int, dict[str, dict]]) -> None:
    """One line per caption length and variant: the figures issue 19 asks for, then each
    variant's marginal decoding cost per token (two or more lengths)."""
    print(
        f"\n{'captions':>8} {'variant':>10} {'step s':>9} {'samples/s':>10} {'teacher ms/tok':>15} {'MFU':>7} {'vs seed':>8}"
    )
    for length, reports in by_len.items():
        seed = reports.get("seed")
        for name in [n for n in VARIANTS if n in reports]:
            r = reports[name]
            mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
            ratio = f"{seed['times_s']['total'] / r['times_s']['total']:.2f}x" if seed else "-"
            print(
                f"{length:8d} {name:>10} {r['times_s']['total']:9.3f} {r['samples_per_s']:10.2f} "
                f"{r['teacher_ms_per_token']:15.2f} {mfu:>7} {ratio:>8}"
            )
    for name, ms in marginal_ms_per_token(by_len).items():
        print(f"marginal decoding cost, {name}: {ms:.2f} ms per token ({min(by_len)} -> {max(by_len)} tokens)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pg_train.bench.step", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny", choices=("tiny", "tiny-112", "bench", "sa2va-4b"))
    parser.add_argument(
        "--batch", type=int, help="per step (default: the largest memcheck predicts to fit, pg_train.bench.fit)"
    )
    parser.add_argument(
        "--no-fit-check", action="store_true", help="run a --batch even when memcheck predicts it does not fit"
    )
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute the LLM layers in backward (every variant)"
    )
    parser.add_argument("--steps", type=int, default=3, help="steps per variant; the first is a warm-up")
    parser.add_argument(
        "--caption-len", type=int, default=64, help="teacher captions are forced to this length (min = max)"
    )
    parser.add_argument(
        "--caption-lens", help="comma list of caption lengths, each benchmarked in turn (overrides --caption-len)"
    )
    parser.add_argument("--topk", type=int, default=128)
    parser.add_argument(
        "--pairing",
        default="augment",
        choices=("augment", "same"),
        help="image 2 = an augmented view of image 1, or image 1 itself (ours then runs the ViT once per step)",
    )
    parser.add_argument("--dtype", default=None, help="fp32 | bf16 (default: fp32 on CPU, bf16 on CUDA)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the card (H100/H200 SXM: 989)"
    )
    parser.add_argument(
        "--variants",
        default="ours,seed",
        help=f"comma list of {', '.join(VARIANTS)} (see above)",
    )
    parser.add_argument(
        "--sync-debug",
        action="store_true",
        help="CUDA: count host syncs per stage in one extra step (torch.cuda.set_sync_debug_mode('warn'))",
    )
    parser.add_argument(
        "--no-cudnn-attention",
        action="store_true",
        help="CUDA: keep SDPA off the cuDNN backend (it builds a graph per new shape, on the host)",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run every variant in this process instead of a fresh one each (start-up costs one import; "
        "on CPU a later variant's RSS is biased by the earlier one's freed heap): for dry runs",
    )
    parser.add_argument("--json", help="write both reports here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}: expected {', '.join(VARIANTS)}")
    lengths = [int(x) for x in args.caption_lens.split(",")] if args.caption_lens else [args.caption_len]
    if args.batch is None or not args.no_fit_check:
        from .fit import choose_batch

        batch, fits = choose_batch(
            args.preset,
            args.batch,
            caption_len=max(lengths),
            topk=args.topk,
            gradient_checkpointing=args.gradient_checkpointing,
            dtype=dtype,
            device=device,
        )
        for fit in fits:
            print(fit.describe())
        if batch is None:
            print("refused: no batch predicted to fit" if args.batch is None else f"refused: batch {args.batch}")
            return 2
        args.batch = batch
        print(f"batch {batch}", flush=True)
    if args.sync_debug and device.type != "cuda":
        print("--sync-debug: CUDA only (set_sync_debug_mode); ignored on", device)
    by_len: dict[int, dict[str, dict]] = {}
    failed = []
    context = mp.get_context("spawn")
    for length in lengths:
        run_args = argparse.Namespace(**{**vars(args), "caption_len": length})
        reports = by_len[length] = {}
        for variant in variants:
            print(f"running {variant}, captions of {length} tokens ...", flush=True)
            if args.in_process:
                result = _run_here(variant, run_args, str(device), dtype)
            else:
                queue = context.Queue()
                process = context.Process(target=_run_in_child, args=(queue, variant, run_args, str(device), dtype))
                process.start()
                result = _child_result(queue, process, variant)
                process.join()
            if isinstance(result, str):  # reported, and the other runs still made (exit code 1 at the end)
                print(result, flush=True)
                failed.append(f"{variant}@{length}")
                continue
            reports[variant] = result
            write_json(args, device, lengths, by_len, failed)  # after every run: a killed job keeps what it had
        if "seed" in reports and len(reports) > 1:
            print_table(reports, run_args, device)
    if len(by_len) > 1 or len(variants) > 2:
        print_summary(by_len)
    write_json(args, device, lengths, by_len, failed)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


def _child_result(queue, process, variant: str):
    import queue as queues

    while True:
        try:
            return queue.get(timeout=5)
        except queues.Empty:
            if not process.is_alive():
                return f"{variant} failed: its process ended (exit code {process.exitcode}) without a report"


def write_json(args, device, lengths, by_len, failed) -> None:
    if not args.json:
        return
    out = {"args": vars(args), "device": str(device), "caption_lens": lengths, "failed": failed}
    out["by_caption_len"] = {str(length): reports for length, reports in by_len.items()}
    out["marginal_decode_ms_per_token"] = marginal_ms_per_token(by_len)
    if len(lengths) == 1:
        out.update(by_len[lengths[0]])  # the one length's reports at the top, as before
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    raise SystemExit(main())
