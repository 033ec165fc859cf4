"""Can data loading starve a step? Loader samples/s (synthetic, manifest, and the same pairs as a
Hugging Face parquet dataset, map-style and streaming; 0 and 2 workers) beside the tiny preset's
training samples/s, measured in one run on this machine.

    python -m pg_train.bench.data [--batches 20 --batch-size 2] [--no-training] [--json report.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

from pg_train.data import DataConfig, Preprocess, SyntheticPairs, build_loader


def loader_rate(cfg: DataConfig, preprocess: Preprocess, batch_size: int, batches: int) -> tuple[float, float]:
    """(samples per wall second, samples per CPU second of this process). The CPU rate means
    something only without workers (their CPU is elsewhere), and there it is what stays stable
    when other jobs share the cores: wall time then measures the neighbours as much as the loader."""
    loader = build_loader(cfg, preprocess, batch_size)
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in itertools.islice(it, batches):
        pass
    samples = batches * batch_size
    return samples / (time.perf_counter() - start), samples / (time.process_time() - cpu_start)


def parquet_from_manifest(manifest: Path, directory: Path) -> Path:
    """The manifest's pairs as one parquet file (PNG bytes in Image columns, the caption), the
    way a pair set is published on the hub: the same bytes the manifest reader opens."""
    import datasets

    rows = []
    for line in manifest.read_text().splitlines():
        record = json.loads(line)
        row = {
            key: {"bytes": (manifest.parent / record[key]).read_bytes(), "path": None}
            for key in ("image1", "mask1", "image2", "mask2")
        }
        rows.append({**row, "caption": record["caption"]})
    features = datasets.Features(
        {
            **{key: datasets.Image() for key in ("image1", "mask1", "image2", "mask2")},
            "caption": datasets.Value("string"),
        }
    )
    directory.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(directory / "train-00000-of-00001.parquet"))
    return directory


def training_rate(batch_size: int, steps: int) -> float:
    from pg_train.config import load_config
    from pg_train.train import train

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(
            [],
            [
                f"output_dir={out}",
                f"max_steps={steps}",
                f"batch_size={batch_size}",
                "save_every=100000",
                "tensorboard=false",
                "progress=false",
            ],
        )
        result = train(cfg)
    times = [r["step_time_s"] for r in result.history[2:]]  # skip warm-up steps
    return batch_size / (sum(times) / len(times))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="median of this many interleaved runs per loader")
    parser.add_argument("--no-training", action="store_true", help="loaders only")
    parser.add_argument("--json", help="also write the rates (and the hf / manifest ratios) here")
    args = parser.parse_args(argv)
    preprocess = Preprocess(448, 128)  # the tiny preset's sizes
    hf_columns = {"hf_image": "image1", "hf_mask": "mask1", "hf_image2": "image2", "hf_mask2": "mask2"}
    with tempfile.TemporaryDirectory() as tmp:
        manifest = SyntheticPairs(64, seed=0).export_manifest(tmp)
        parquet = str(parquet_from_manifest(manifest, Path(tmp) / "parquet"))
        sources = (
            ("synthetic", {}),
            ("manifest", {"manifest": str(manifest)}),
            ("hf", {"hf_path": parquet, **hf_columns}),
            ("hf streaming", {"hf_path": parquet, "hf_streaming": True, **hf_columns}),
        )
        # rounds interleave the sources, and each rate is the median over rounds: on a machine
        # others share, a burst of load then lands on one round of every source, not on one source
        runs: dict[str, list[float]] = {}
        cpu_runs: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for name, extra in sources:
                for workers in (0, 2):
                    cfg = DataConfig(source=name.split()[0], num_samples=64, num_workers=workers, **extra)
                    wall, cpu = loader_rate(cfg, preprocess, args.batch_size, args.batches)
                    runs.setdefault(f"loader {name}, {workers} workers", []).append(wall)
                    if workers == 0:
                        cpu_runs.setdefault(f"loader {name}, per CPU second", []).append(cpu)
        rates = {name: statistics.median(values) for name, values in runs.items()}
        cpu_rates = {name: statistics.median(values) for name, values in cpu_runs.items()}
    train_rate = None if args.no_training else training_rate(args.batch_size, args.steps)
    print(
        f"batch size {args.batch_size}, tiny preset sizes (448 px MLLM, 128 px SAM2), 2 CPU cores shared by loader and trainer"
    )
    print(f"{'':34} {'samples/s':>10} {'vs training':>12}")
    for name, rate in rates.items():
        print(f"{name:34} {rate:>10.1f} " + (f"{rate / train_rate:>11.1f}x" if train_rate else f"{'-':>12}"))
    if train_rate:
        print(f"{'training (tiny, data in-process)':34} {train_rate:>10.1f} {1.0:>11.1f}x")
    for name, rate in cpu_rates.items():
        print(f"{name:34} {rate:>10.1f}")
    ratios = {
        f"{hf} / manifest, {w} workers": rates[f"loader {hf}, {w} workers"] / rates[f"loader manifest, {w} workers"]
        for hf in ("hf", "hf streaming")
        for w in (0, 2)
    }
    ratios.update(
        {
            f"{hf} / manifest, per CPU second": cpu_rates[f"loader {hf}, per CPU second"]
            / cpu_rates["loader manifest, per CPU second"]
            for hf in ("hf", "hf streaming")
        }
    )
    for name, ratio in ratios.items():
        print(f"{name:34} {ratio:>10.2f}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "batch_size": args.batch_size,
                    "batches": args.batches,
                    "rounds": args.rounds,
                    "samples_per_s": rates,
                    "runs": runs,
                    "samples_per_cpu_s": cpu_rates,
                    "cpu_runs": cpu_runs,
                    "training_samples_per_s": train_rate,
                    "ratios": ratios,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
