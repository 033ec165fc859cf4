"""Top-k straight-through Gumbel-softmax: ours vs the design note's dense version.

    python -m pg_train.bench.gumbel [--batch 16 --length 256 --topk 512 --dim 2048]

Each (variant, dtype) runs in a fresh process: forward + backward of the Gumbel step alone
(caption logits [B, T, V] and the embedding matrix [V, D] are its inputs), timed, with the peak
memory above the inputs and the bytes autograd saves for backward. The naive version gathers
[B, T, k, D] (17 GB in fp32 at the default sizes, twice); when that cannot fit in this
machine's memory both variants are measured side by side at the largest batch that fits, and
ours is also run at the requested batch.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

import psutil
import torch

from pg_train.bench.memory import PeakMemory, SavedTensorBytes
from pg_train.objectives.pseudo_gumbel import sample_generators, topk_gumbel_softmax, uniform_noise

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def naive_topk_gumbel_softmax(logits, weight, special, uniform, tau, topk, first_rows=None):
    """The design note's step 4: dense [B, T, k, D] gather and soft mixture (reference only).
    `first_rows`: the embedding rows of caption position 0's ids, as in topk_gumbel_softmax."""
    logits = logits.masked_fill(special, float("-inf"))
    values, ids = logits.topk(topk, dim=-1)
    gumbel = -torch.log(-torch.log(uniform.to(values.device) + 1e-10) + 1e-10)
    y_soft = torch.softmax((values.float() + gumbel) / tau, dim=-1)
    index = y_soft.argmax(-1, keepdim=True)
    y_hard = torch.zeros_like(y_soft).scatter_(-1, index, 1.0)
    y = (y_hard - y_soft.detach() + y_soft).to(weight.dtype)
    rows = ids
    if first_rows is not None and ids.shape[1]:
        rows = torch.cat([first_rows.to(ids.device)[ids[:, :1]], ids[:, 1:]], dim=1)
    return (y.unsqueeze(-1) * weight[rows]).sum(-2), ids.gather(-1, index).squeeze(-1)


def _measure(variant: str, dtype_name: str, B: int, T: int, k: int, D: int, V: int, repeats: int, device: str, queue):
    torch.manual_seed(0)
    dtype = DTYPES[dtype_name]
    logits = torch.randn(B, T, V, device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(V, D, device=device, dtype=dtype) * 0.02).requires_grad_()
    special = torch.zeros(V, dtype=torch.bool, device=device)
    special[-36:] = True
    uniform = uniform_noise(sample_generators(torch.arange(B), 1), T, k).to(device)
    upstream = torch.randn(B, T, D, device=device, dtype=dtype)
    times, peaks, saved = [], [], 0
    for _ in range(repeats):
        logits.grad = weight.grad = None
        with PeakMemory(device) as peak:
            start = time.perf_counter()
            with SavedTensorBytes(exclude=(logits, weight)) as saved_bytes:
                if variant == "ours":
                    embeds, _ = topk_gumbel_softmax(logits, weight, special, uniform, tau=0.7, topk=k)
                else:
                    embeds, _ = naive_topk_gumbel_softmax(logits, weight, special, uniform, 0.7, k)
            (embeds.float() * upstream.float()).sum().backward()
            if device != "cpu":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        peaks.append(peak.peak_bytes)
        saved = saved_bytes.bytes
        del embeds
    queue.put({"time_s": statistics.median(times), "peak_bytes": max(peaks), "saved_bytes": saved})


def measure(variant, dtype_name, B, T, k, D, V, repeats, device):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(variant, dtype_name, B, T, k, D, V, repeats, device, queue))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        return None
    return queue.get()


def naive_bytes(B, T, k, D, V, elem):
    """Rough peak of the naive variant: two dense [B,T,k,D] tensors plus three logits-sized ones."""
    return 2 * B * T * k * D * elem + 3 * B * T * V * 4


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--topk", type=int, default=512)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=151_679)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    T, k, D, V = args.length, args.topk, args.dim, args.vocab
    budget = (psutil.virtual_memory().available if args.device == "cpu" else torch.cuda.mem_get_info()[0]) * 0.8
    print(f"top-k ST Gumbel, T={T} k={k} D={D} V={V} on {args.device}; {args.repeats} repeats, median time")
    header = f"{'dtype':5} {'B':>3} {'variant':7} {'fwd+bwd s':>10} {'peak MB':>10} {'saved MB':>10}"
    print(header)
    print("-" * len(header))
    for dtype_name in args.dtypes.split(","):
        elem = torch.finfo(DTYPES[dtype_name]).bits // 8
        side_by_side = args.batch
        while side_by_side > 1 and naive_bytes(side_by_side, T, k, D, V, elem) > budget:
            side_by_side //= 2
        rows = {}
        for variant in ("naive", "ours"):
            rows[variant] = measure(variant, dtype_name, side_by_side, T, k, D, V, args.repeats, args.device)
            r = rows[variant]
            if r is None:
                print(f"{dtype_name:5} {side_by_side:>3} {variant:7} {'failed (out of memory?)':>32}")
                continue
            print(
                f"{dtype_name:5} {side_by_side:>3} {variant:7} {r['time_s']:>10.3f} {r['peak_bytes'] / 2**20:>10.0f} {r['saved_bytes'] / 2**20:>10.0f}"
            )
        if rows["naive"] and rows["ours"]:
            n, o = rows["naive"], rows["ours"]
            print(
                f"{dtype_name:5} {side_by_side:>3} naive/ours: peak memory {n['peak_bytes'] / max(o['peak_bytes'], 1):.1f}x, "
                f"saved for backward {n['saved_bytes'] / max(o['saved_bytes'], 1):.1f}x, time {n['time_s'] / o['time_s']:.2f}x"
            )
        if side_by_side != args.batch:
            print(
                f"{dtype_name:5}      naive at B={args.batch} needs ~{naive_bytes(args.batch, T, k, D, V, elem) / 2**30:.0f} GiB "
                f"(> {budget / 2**30:.0f} GiB usable here): measured side by side at B={side_by_side}"
            )
            r = measure("ours", dtype_name, args.batch, T, k, D, V, args.repeats, args.device)
            if r:
                print(
                    f"{dtype_name:5} {args.batch:>3} {'ours':7} {r['time_s']:>10.3f} {r['peak_bytes'] / 2**20:>10.0f} {r['saved_bytes'] / 2**20:>10.0f}"
                )


if __name__ == "__main__":
    main()
