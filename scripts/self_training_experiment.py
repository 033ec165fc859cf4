"""Self-training on a new domain, arm by arm (issue 26): does any objective beat "keep training
supervised on the labelled domain"?

For each seed:
  warm-up   supervised from random weights on labelled domain A (the quick recipe's scenes)
  gate      the warm-up's held-out A cycle − shuffled gIoU must reach --gate: a warm-up whose masks
            ignore the text gives self-training nothing to build on; such seeds are reported and
            get no arms (counted, not silently dropped)
  arms      from the warm-up, --steps steps each, one schedule for all:
    sup_a       supervised on A (the baseline every arm is compared with, seed by seed)
    pg          Pseudo-Gumbel on domain B's pairs (no text)
    pg_sup_a    Pseudo-Gumbel on B + lambda x supervised on A (two data streams)
    pg_kl       Pseudo-Gumbel on B + a KL anchor to the frozen warm-up
    pl          pseudo-labels on B (the teacher's caption as a hard target)
    pl_filter   pseudo-labels on B, confident captions only
    pl_sup_a    pseudo-labels on B + lambda x supervised on A (two data streams)
    oracle_b    supervised on B's ground-truth text (the head-room: what B could give at best)
Every checkpoint is scored on two named held-out sets: A (scenes of seed --eval-seed-a drawn like
A) and B (seed --eval-seed-b drawn like B), with pg_train.evaluate: referring gIoU (ground-truth
text), cycle gIoU (the model's own caption of region 1 segments image 2), shuffled / empty controls.
The table reports each arm's paired difference with sup_a (per seed, then mean and a 95% t
interval over the grounded seeds).

    .venv/bin/python scripts/self_training_experiment.py                        # the measured run
    .venv/bin/python scripts/self_training_experiment.py --seeds 0 --warmup-steps 100 --steps 20 \
        --eval-samples 8 --out /tmp/st_smoke --json /tmp/st_smoke.json --doc ''  # smoke

Runs are launch/train.py subprocesses (at most --jobs at a time, OMP_NUM_THREADS=--threads); a
finished run (final checkpoint) or evaluation (eval.json beside it) in --out is reused, so the
warm-ups are shared by every arm and by reruns. An arm whose config keys this pg_train does not
have is listed as unavailable, not run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pg_vs_supervised import stamp  # commit, date, versions, device, load (scripts/ is on sys.path)

ROOT = Path(__file__).resolve().parent.parent

# Domain A: the quick recipe's scenes (configs/quick_*.yaml: two large plain objects, distinct
# colours out of red/green/blue). Domain B (--domain-b), a shift of it:
#   looks    the same words, other looks (three medium-sized textured objects): B's captions are
#            A's vocabulary, so what B can add is visual
#   colours  new colour words (yellow / purple / cyan): what B can add is language A never saw
#   twins    both objects red: the colour no longer tells them apart, A's shape and place words do
#            (A's captions name them, but A never needed them): what B can add is using known words
DOMAIN_A: list[str] = []
DOMAINS_B = {
    "looks": [
        "data.sizes=[medium]",
        "data.textures=[striped,dotted,checkered]",
        "data.min_objects=3",
        "data.max_objects=3",
    ],
    "colours": ["data.colours=[yellow,purple,cyan]"],
    "twins": ["data.colours=[red]", "data.distinct_colours=false"],
}


@dataclasses.dataclass(frozen=True)
class Arm:
    key: str
    name: str
    # "{A}" / "{B}": the domain's data overrides of `data`; "{labelled:A}" / "{unlabelled:B}": the
    # domain's whole data section as streams.labelled / streams.unlabelled (two data streams)
    overrides: tuple[str, ...]


PG = "objective_kind=pseudo_gumbel"
PL = "objective_kind=pseudo_label"
ARMS = (
    Arm("sup_a", "supervised on A (baseline)", ("objective_kind=supervised", "{A}")),
    Arm("pg", "Pseudo-Gumbel on B", (PG, "{B}")),
    Arm(
        "pg_sup_a",
        "Pseudo-Gumbel on B + supervised on A (two streams, half of each batch)",
        (PG, "streams.enabled=true", "{labelled:A}", "{unlabelled:B}", "streams.labelled_fraction=[[0,0.5]]"),
    ),
    Arm(
        "pg_kl",
        "Pseudo-Gumbel on B + KL anchor to the warm-up (weight 1)",
        (PG, "{B}", "objective.anchor_weight=1.0", "objective.anchor_reference=snapshot"),
    ),
    Arm("pl", "pseudo-labels on B (teacher caption as target)", (PL, "{B}")),
    Arm(
        "pl_sup_a",
        "pseudo-labels on B + supervised on A (two streams, half of each batch)",
        (PL, "streams.enabled=true", "{labelled:A}", "{unlabelled:B}", "streams.labelled_fraction=[[0,0.5]]"),
    ),
    Arm("pl_filter", "pseudo-labels on B, confident half only", (PL, "{B}", "objective.filter_top_fraction=0.5")),
    Arm("oracle_b", "oracle: supervised on B's text", ("objective_kind=supervised", "{B}")),
)
METRICS = ("referring_gIoU", "cycle_gIoU", "shuffled_gIoU", "empty_gIoU")
# (held-out set, number); "text_use" = referring − shuffled gIoU: how much the masks follow the
# right text rather than any text (a model that segments some object regardless scores 0)
TABLE_METRICS = (
    ("B", "referring"),
    ("B", "text_use"),
    ("B", "cycle"),
    ("A", "referring"),
    ("A", "text_use"),
    ("A", "cycle"),
)


def metric(numbers: dict, domain: str, name: str) -> float:
    """One table number from an evaluation's {domain: {kind_gIoU: value}}."""
    d = numbers[domain]
    if name == "text_use":
        return d["referring_gIoU"] - d["shuffled_gIoU"]
    return d[f"{name}_gIoU"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5, 6])
    p.add_argument("--domain-b", default="colours", choices=sorted(DOMAINS_B))
    p.add_argument("--arms", nargs="+", default=[a.key for a in ARMS], choices=[a.key for a in ARMS])
    p.add_argument("--config", default="configs/quick_warmup.yaml", help="model, data A and the warm-up")
    p.add_argument("--warmup-steps", type=int, default=1000)
    p.add_argument("--steps", type=int, default=150, help="optimizer steps of every arm")
    p.add_argument("--lr", type=float, default=3e-4, help="every arm's peak lr (cosine, 10 warm-up steps)")
    p.add_argument("--gate", type=float, default=0.1, help="warm-up's held-out A cycle − shuffled gIoU to go on")
    p.add_argument("--eval-samples", type=int, default=48)
    p.add_argument("--eval-seed-a", type=int, default=20_000, help="held-out A's seed (training uses 0..)")
    p.add_argument("--eval-seed-b", type=int, default=21_000, help="held-out B's seed")
    p.add_argument("--jobs", type=int, default=2, help="subprocesses at a time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per subprocess")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every training run")
    p.add_argument("--out", default="/tmp/self_training", help="run directories (reused when finished)")
    p.add_argument("--json", default="docs/measurements/self_training.json")
    p.add_argument("--doc", default="docs/learning/self_training.md", help="markdown file whose table to rewrite")
    p.add_argument("--plot", default="docs/learning/self_training.png")
    p.add_argument("--note", default="", help="free text for the JSON (e.g. which code trained reused runs)")
    p.add_argument("--eval-one", metavar="CHECKPOINT", help=argparse.SUPPRESS)  # internal: score one checkpoint
    return p.parse_args(argv)


# ---- statistics (no scipy in the environment) ---------------------------------------------------
def t_cdf(x: float, df: int) -> float:
    """Student t CDF by Simpson's rule on the density (smooth; 4,000 intervals: error < 1e-9)."""
    if x < 0:
        return 1.0 - t_cdf(-x, df)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    n = 4000
    h = x / n
    total = 0.0
    for i in range(n + 1):
        t = i * h
        w = 1 if i in (0, n) else (4 if i % 2 else 2)
        total += w * math.exp(log_c - (df + 1) / 2 * math.log1p(t * t / df))
    return 0.5 + total * h / 3


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 0.5) of Student's t with df degrees of freedom, by bisection."""
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def paired_ci(diffs: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the t interval of the mean of paired differences (n >= 2)."""
    n = len(diffs)
    mean = statistics.fmean(diffs)
    half = t_quantile(0.5 + level / 2, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return mean, mean - half, mean + half


# ---- runs ---------------------------------------------------------------------------------------
def final_checkpoint(run: Path, steps: int) -> Path:
    return run / "checkpoints" / f"step-{steps:08d}"


class Slots:
    """At most `n` holders at a time; a free slot goes to the waiter with the lowest priority
    value (the earliest seed), so seeds finish in order rather than all half-way at once."""

    def __init__(self, n: int):
        self.free = n
        self.waiting: list = []
        self.cond = threading.Condition()

    def acquire(self, priority) -> None:
        with self.cond:
            self.waiting.append(priority)
            while not (self.free and min(self.waiting) == priority):
                self.cond.wait()
            self.waiting.remove(priority)
            self.free -= 1

    def release(self) -> None:
        with self.cond:
            self.free += 1
            self.cond.notify_all()


class Runner:
    """Subprocesses, at most --jobs at a time; finished runs are reused."""

    def __init__(self, args):
        self.args = args
        self.slots = Slots(args.jobs)
        self.walls: dict[str, float] = {}

    def _call(self, name: str, cmd: list[str], log: Path, priority: tuple, done=lambda: False) -> int:
        """Run `cmd` in a free slot, unless `done()` says another invocation finished it meanwhile."""
        env = {**os.environ, "OMP_NUM_THREADS": str(self.args.threads), "PYTHONPATH": str(ROOT)}
        self.slots.acquire((*priority, name))
        try:
            if done():
                return 0
            print(f"[self_training] {name}: start", flush=True)
            started = time.perf_counter()
            with log.open("w") as f:
                code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
            self.walls[name] = round(time.perf_counter() - started, 1)
        finally:
            self.slots.release()
        print(f"[self_training] {name}: exit {code} after {self.walls[name]} s", flush=True)
        return code

    def train(self, run: Path, overrides: list[str], steps: int, priority: tuple) -> Path:
        checkpoint = final_checkpoint(run, steps)
        if checkpoint.is_dir():
            return checkpoint
        cmd = [sys.executable, str(ROOT / "launch/train.py"), "--config", str(ROOT / self.args.config)]
        cmd += [*self.args.set, *overrides, f"max_steps={steps}", f"save_every={steps}", "eval_every=0"]
        cmd += ["keep_last=1", f"output_dir={run}", "progress=false", "resume=null", "report=false"]
        run.parent.mkdir(parents=True, exist_ok=True)

        def done() -> bool:
            while (run / ".pg_train.lock").is_file() and not checkpoint.is_dir():
                time.sleep(10)  # another invocation is training it
            if checkpoint.is_dir():
                return True
            if run.exists():  # an unfinished run: start it again
                subprocess.run(["rm", "-rf", str(run)], check=True)
            return False

        code = self._call(run.name, cmd, run.parent / f"{run.name}.log", priority, done)
        if code != 0 or not checkpoint.is_dir():
            raise RuntimeError(f"{run.name} failed (exit {code}); see {run.parent / f'{run.name}.log'}")
        return checkpoint

    def evaluate(self, checkpoint: Path, priority: tuple) -> dict:
        path = checkpoint / eval_name(self.args)
        if not path.is_file():
            cmd = [sys.executable, str(Path(__file__).resolve()), "--eval-one", str(checkpoint)]
            cmd += ["--eval-samples", str(self.args.eval_samples), "--set", *self.args.set]
            cmd += ["--eval-seed-a", str(self.args.eval_seed_a), "--eval-seed-b", str(self.args.eval_seed_b)]
            cmd += ["--domain-b", self.args.domain_b]
            name = f"{checkpoint.parent.parent.name}_{path.stem}"
            log = checkpoint.parent.parent.parent / f"{name}.log"
            if self._call(name, cmd, log, priority, path.is_file) != 0:
                raise RuntimeError(f"evaluation of {checkpoint} failed; see {name}.log")
        return json.loads(path.read_text())


def eval_name(args) -> str:
    """The evaluation's file beside a checkpoint: one per (held-out sets, domain B)."""
    return f"eval_A{args.eval_seed_a}_B{args.eval_seed_b}-{args.domain_b}_n{args.eval_samples}.json"


def domain_data(domain: str, args):
    """The DataConfig of domain A or B (the config's data with the domain's overrides)."""
    from pg_train.config import load_config

    return load_config(
        [ROOT / args.config], [*args.set, *(DOMAIN_A if domain == "A" else DOMAINS_B[args.domain_b])]
    ).data


def eval_one(args) -> int:
    """Score one checkpoint on held-out A and B; writes self_training_eval.json beside it."""
    import torch

    from pg_train.evaluate import evaluate, heldout_batches, load_for_evaluation

    torch.set_num_threads(args.threads)
    checkpoint = Path(args.eval_one)
    model, _cfg, objective = load_for_evaluation(checkpoint, "cpu")
    out = {}
    for domain, seed in (("A", args.eval_seed_a), ("B", args.eval_seed_b)):
        torch.manual_seed(0)
        batches = heldout_batches(model, args.eval_samples, 8, seed=seed, device="cpu", data=domain_data(domain, args))
        numbers = evaluate(model, batches, objective)
        out[domain] = {f"{k}_gIoU": numbers[k]["gIoU"] for k in ("referring", "cycle", "shuffled", "empty")}
    (checkpoint / eval_name(args)).write_text(json.dumps(out, indent=1) + "\n")
    return 0


def arm_overrides(arm: Arm, warm: Path, seed: int, args) -> list[str]:
    schedule = [f"optim.lr={args.lr}", "optim.warmup_steps=10", "optim.min_lr_ratio=0.1"]
    out = [f"seed={seed}", f"model.init_from={warm}", *schedule]
    domains = {"A": DOMAIN_A, "B": DOMAINS_B[args.domain_b]}
    for item in arm.overrides:
        if item in ("{A}", "{B}"):
            out += domains[item[1]]
        elif item.startswith("{") and ":" in item:  # {labelled:A}: the domain's data as a stream's
            stream, domain = item.strip("{}").split(":")
            out += stream_overrides(f"streams.{stream}", domain_data(domain, args))
        else:
            out.append(item)
    return out


def stream_overrides(prefix: str, data) -> list[str]:
    """`data` (a DataConfig) as overrides of the section `prefix` (every field, JSON is YAML)."""
    return [f"{prefix}.{f.name}={json.dumps(getattr(data, f.name))}" for f in dataclasses.fields(data)]


def arm_available(arm: Arm, args) -> str | None:
    """None, or why this pg_train cannot run the arm (a config key it does not know)."""
    from pg_train.config import ConfigError, load_config

    try:
        load_config([ROOT / args.config], arm_overrides(arm, Path("/nonexistent"), 0, args))
    except ConfigError as err:
        return str(err)
    return None


def run_seed(seed: int, arms: list[Arm], runner: Runner, args) -> dict:
    out = Path(args.out)
    order = (args.seeds.index(seed),)
    warm = runner.train(out / f"s{seed}_warmup", [f"seed={seed}"], args.warmup_steps, order)
    record = {"warmup": runner.evaluate(warm, order)}
    gap = record["warmup"]["A"]["cycle_gIoU"] - record["warmup"]["A"]["shuffled_gIoU"]
    record["grounded"] = gap >= args.gate
    print(f"[self_training] seed {seed}: warm-up A cycle − shuffled {gap:+.3f} (gate {args.gate})", flush=True)
    if not record["grounded"]:
        return record

    def one(arm: Arm) -> dict:
        domain = "" if arm.key == "sup_a" else f"-{args.domain_b}"
        run = out / f"s{seed}_{arm.key}{domain}-lr{args.lr:g}"  # steps: the checkpoint's name
        return runner.evaluate(runner.train(run, arm_overrides(arm, warm, seed, args), args.steps, order), order)

    with ThreadPoolExecutor(max_workers=len(arms)) as pool:
        for arm, numbers in zip(arms, pool.map(one, arms)):
            record[arm.key] = numbers
    return record


# ---- reporting ----------------------------------------------------------------------------------
def summarize(results: dict, arms: list[str]) -> dict:
    """Per arm and (domain, metric): mean, and the paired difference with sup_a (mean, 95% CI, n)."""
    seeds = [s for s in results if results[s]["grounded"]]
    summary = {}
    for arm in arms:
        summary[arm] = {}
        for domain, name in TABLE_METRICS:
            values = [metric(results[s][arm], domain, name) for s in seeds]
            entry = {"mean": statistics.fmean(values) if values else None, "n": len(values)}
            if arm != "sup_a" and len(values) >= 2:
                diffs = [
                    metric(results[s][arm], domain, name) - metric(results[s]["sup_a"], domain, name) for s in seeds
                ]
                entry["diff"], entry["ci_low"], entry["ci_high"] = paired_ci(diffs)
                entry["per_seed_diff"] = diffs
            summary[arm][f"{domain}_{name}"] = entry
    return summary


# Arm against arm: (arm, minus arm), paired seed by seed like the table; the oracle rows are the
# head-room self-training left on B
COMPARISONS = (
    ("pl_sup_a", "pg_sup_a"),
    ("pl", "pg"),
    ("pg_sup_a", "pg"),
    ("pl_sup_a", "pl"),
    ("pg_kl", "pg"),
    ("pl_filter", "pl"),
    ("oracle_b", "pl_sup_a"),
    ("oracle_b", "pg_sup_a"),
)
COMPARISON_METRICS = (("B", "referring"), ("B", "text_use"), ("B", "cycle"), ("A", "referring"))


def compare_arms(results: dict, arms: list[str]) -> dict:
    """Paired differences between two arms (e.g. pseudo-labels − Pseudo-Gumbel, oracle − two streams)
    on the grounded seeds: {"a − b": {"B_cycle": {diff, ci_low, ci_high, per_seed_diff}}}."""
    seeds = [s for s in results if results[s]["grounded"]]
    out = {}
    for a, b in COMPARISONS:
        if a not in arms or b not in arms or len(seeds) < 2:
            continue
        out[f"{a} − {b}"] = {}
        for domain, name in COMPARISON_METRICS:
            diffs = [metric(results[s][a], domain, name) - metric(results[s][b], domain, name) for s in seeds]
            low_high = paired_ci(diffs)
            out[f"{a} − {b}"][f"{domain}_{name}"] = dict(zip(("diff", "ci_low", "ci_high"), low_high)) | {
                "per_seed_diff": diffs
            }
    return out


def comparison_table(comparisons: dict) -> str:
    head = " | ".join(f"{d} {m.replace('_', ' ')}" for d, m in COMPARISON_METRICS)
    lines = [f"| comparison | {head} |", "|---" * (1 + len(COMPARISON_METRICS)) + "|"]
    for pair, entries in comparisons.items():
        cells = []
        for d, m in COMPARISON_METRICS:
            e = entries[f"{d}_{m}"]
            text = f"{e['diff']:+.3f} [{e['ci_low']:+.3f}, {e['ci_high']:+.3f}]"
            cells.append(f"**{text}**" if e["ci_low"] > 0 or e["ci_high"] < 0 else text)
        a, b = pair.split(" − ")
        lines.append(f"| `{a}` − `{b}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cell(entry: dict) -> str:
    if "diff" not in entry:
        return f"{entry['mean']:.3f}" if entry["mean"] is not None else "—"
    star = " **↑**" if entry["ci_low"] > 0 else " **↓**" if entry["ci_high"] < 0 else ""
    return f"{entry['mean']:.3f} ({entry['diff']:+.3f} [{entry['ci_low']:+.3f}, {entry['ci_high']:+.3f}]){star}"


def table(summary: dict, arms: list[Arm]) -> str:
    head = " | ".join(f"{d} {m.replace('_', ' ')}" for d, m in TABLE_METRICS)
    lines = [f"| arm | {head} |", "|---" * (1 + len(TABLE_METRICS)) + "|"]
    for arm in arms:
        cells = [cell(summary[arm.key][f"{d}_{m}"]) for d, m in TABLE_METRICS]
        lines.append(f"| {arm.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict, arms: list[Arm], results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [a for a in arms if a.key != "sup_a"]
    fig, axes = plt.subplots(1, len(TABLE_METRICS), figsize=(3.2 * len(TABLE_METRICS), 0.6 * len(others) + 1.8))
    for ax, (domain, name) in zip(axes, TABLE_METRICS):
        for y, arm in enumerate(others):
            entry = summary[arm.key][f"{domain}_{name}"]
            if "diff" not in entry:
                continue
            ax.errorbar(
                entry["diff"],
                y,
                xerr=[[entry["diff"] - entry["ci_low"]], [entry["ci_high"] - entry["diff"]]],
                fmt="o",
                color="black",
                capsize=3,
            )
            ax.scatter(entry["per_seed_diff"], [y + 0.2] * len(entry["per_seed_diff"]), s=10, alpha=0.5)
        ax.axvline(0, color="gray", lw=0.8)
        ax.set_yticks(range(len(others)), [a.name for a in others] if ax is axes[0] else [])
        ax.set_title(f"held-out {domain}: {name.replace('_', ' ')}\narm − supervised on A", fontsize=9)
        ax.invert_yaxis()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def logged_train_seconds(out: Path, seeds: list[int]) -> dict[str, float]:
    """Each training run's own "done: N steps in X s" (its log in --out), whichever invocation ran it."""
    import re

    found = {}
    for log in sorted(out.glob("s*.log")):
        seed = re.match(r"s(\d+)_", log.name)
        done = re.search(r"done: \d+ steps in ([\d.]+) s", log.read_text(errors="replace"))
        if seed and int(seed.group(1)) in seeds and done:
            found[log.stem] = float(done.group(1))
    return found


def write_doc_table(path: Path, text: str, marker: str = "table") -> None:
    """Replace the table between the doc's <!-- table --> markers (the prose around it is the doc's)."""
    begin, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    doc = path.read_text() if path.is_file() else f"{begin}\n{end}\n"
    if begin not in doc or end not in doc:
        raise SystemExit(f"{path}: no {begin} ... {end} markers to put the table between")
    head, rest = doc.split(begin, 1)
    path.write_text(f"{head}{begin}\n{text}\n{end}{rest.split(end, 1)[1]}")


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.eval_one:
        return eval_one(args)
    chosen = [a for a in ARMS if a.key in args.arms]
    if "sup_a" not in args.arms:
        raise SystemExit("--arms must include sup_a (every difference is with it)")
    unavailable = {a.key: why for a in chosen if (why := arm_available(a, args))}
    for key, why in unavailable.items():
        print(f"[self_training] arm {key} unavailable: {why}", flush=True)
    arms = [a for a in chosen if a.key not in unavailable]
    runner = Runner(args)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(args.seeds)) as pool:
        results = dict(zip(args.seeds, pool.map(lambda s: run_seed(s, arms, runner, args), args.seeds)))
    summary = summarize(results, [a.key for a in arms])
    text = table(summary, arms)
    comparisons = compare_arms(results, [a.key for a in arms])
    compared = comparison_table(comparisons)
    grounded = [s for s in args.seeds if results[s]["grounded"]]
    print(text)
    print(compared)
    print(f"[self_training] grounded seeds {grounded} of {args.seeds}")
    record = {
        **stamp(),
        "command": "python scripts/self_training_experiment.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "setup": {
            "config": args.config,
            "domain_a": DOMAIN_A,
            "domain_b": {"name": args.domain_b, "overrides": DOMAINS_B[args.domain_b]},
            "warmup_steps": args.warmup_steps,
            "arm_steps": args.steps,
            "arm_lr": args.lr,
            "gate_cycle_minus_shuffled": args.gate,
            "heldout": {
                "A": {"seed": args.eval_seed_a, "samples": args.eval_samples},
                "B": {"seed": args.eval_seed_b, "samples": args.eval_samples},
            },
            "overrides": args.set,
            "jobs": args.jobs,
            "threads": args.threads,
        },
        "note": args.note,
        "arms": {a.key: {"name": a.name, "overrides": list(a.overrides)} for a in arms},
        "unavailable_arms": unavailable,
        "seeds": args.seeds,
        "grounded_seeds": grounded,
        "results": {str(s): results[s] for s in args.seeds},
        "summary": summary,
        "comparisons": comparisons,
        "wall_s_this_invocation": runner.walls,
        "train_s_per_run": logged_train_seconds(Path(args.out), args.seeds),
        "total_wall_s": round(time.perf_counter() - started, 1),
        "table_markdown": text,
        "comparisons_markdown": compared,
    }
    path = ROOT / args.json
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"[self_training] wrote {path}")
    if len(grounded) >= 2 and args.plot:
        plot(summary, arms, results, ROOT / args.plot)
    if args.doc:
        write_doc_table(ROOT / args.doc, text)
        if comparisons:
            write_doc_table(ROOT / args.doc, compared, marker="comparisons")
    return 0


if __name__ == "__main__":
    sys.exit(main())
