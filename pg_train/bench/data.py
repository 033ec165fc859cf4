"""Can data loading starve a step? Loader samples/s (synthetic and manifest; 0 and 2 workers)
beside the tiny preset's training samples/s, measured in one run on this machine.

    python -m pg_train.bench.data [--batches 20 --batch-size 2]
"""
from __future__ import annotations

import argparse
import itertools
import tempfile
import time

from pg_train.data import DataConfig, Preprocess, SyntheticPairs, build_loader


def loader_rate(cfg: DataConfig, preprocess: Preprocess, batch_size: int, batches: int) -> float:
    loader = build_loader(cfg, preprocess, batch_size)
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    start = time.perf_counter()
    for _ in itertools.islice(it, batches):
        pass
    return batches * batch_size / (time.perf_counter() - start)


def training_rate(batch_size: int, steps: int) -> float:
    from pg_train.config import load_config
    from pg_train.train import train

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config([], [f"output_dir={out}", f"max_steps={steps}", f"batch_size={batch_size}", "save_every=100000",
                               "tensorboard=false", "progress=false"])
        result = train(cfg)
    times = [r["step_time_s"] for r in result.history[2:]]  # skip warm-up steps
    return batch_size / (sum(times) / len(times))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    preprocess = Preprocess(448, 128)  # the tiny preset's sizes
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        manifest = SyntheticPairs(64, seed=0).export_manifest(tmp)
        for source, extra in (("synthetic", {}), ("manifest", {"manifest": str(manifest)})):
            for workers in (0, 2):
                cfg = DataConfig(source=source, num_samples=64, num_workers=workers, **extra)
                rows.append((f"loader {source}, {workers} workers", loader_rate(cfg, preprocess, args.batch_size, args.batches)))
    train_rate = training_rate(args.batch_size, args.steps)
    print(f"batch size {args.batch_size}, tiny preset sizes (448 px MLLM, 128 px SAM2), 2 CPU cores shared by loader and trainer")
    print(f"{'':34} {'samples/s':>10} {'vs training':>12}")
    for name, rate in rows:
        print(f"{name:34} {rate:>10.1f} {rate / train_rate:>11.1f}x")
    print(f"{'training (tiny, data in-process)':34} {train_rate:>10.1f} {1.0:>11.1f}x")


if __name__ == "__main__":
    main()
