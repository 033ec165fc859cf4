"""Pictures of a run: report.png / report.html from a run directory, and the comparison of runs.

    python -m pg_train.report RUN_DIR [--out DIR]
    python -m pg_train.report --compare NAME=RUN_DIR [NAME=RUN_DIR ...] [--out DIR]

A run's report reads RUN_DIR/metrics.jsonl (and RUN_DIR/heldout_samples.npz when the run saved
its held-out samples) and writes report.png and report.html (the PNG embedded, so the file
stands alone): the training loss, the training mask IoU, the held-out gIoU curves (referring,
cycle and the two controls) against the step, and a gallery of held-out samples — image 1 with
the region the model is asked to describe, the caption it generated, and image 2 with the mask
it predicted from that caption next to the true one. No model is needed: the report can be made
again from the run directory at any time (this module needs numpy and matplotlib, not torch).
At the end of training, `finish_run` saves the samples the trainer computed
(pg_train.gallery.gallery_samples) and writes the report in one call; this module computes no
prediction.

--compare prints a markdown table of several runs' first and last held-out evaluation and writes
DIR/curves.png. A run whose NAME starts with "+" continues the first run (a stage 2 started from
its final checkpoint): its steps are drawn after the first run's last step.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import textwrap
import unicodedata
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib import patheffects
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# Figures are drawn on the Agg canvas directly (FigureCanvasAgg), never through pyplot: no display
# is needed (a cluster node, CI) and the process's pyplot backend, if any, is left alone.

SAMPLES_FILE = "heldout_samples.npz"
KINDS = ("referring", "cycle", "shuffled", "empty")  # pg_train.inference.KINDS (not imported: it pulls in torch)
KIND_STYLE = {  # colour, line style, what the number means
    "referring": ("tab:blue", "-", "the true caption"),
    "cycle": ("tab:orange", "-", "the model's own caption of region 1"),
    "shuffled": ("tab:gray", "--", "control: another sample's caption"),
    "empty": ("black", ":", "control: no caption"),
}
WIDTH_IN, CURVES_IN, GALLERY_ROW_IN, DPI = 16.0, 4.5, 7.0, 100
GALLERY_COLUMNS = 4


# ---- reading ---------------------------------------------------------------------------------------
def read_metrics(run_dir: str | Path) -> list[dict]:
    """RUN_DIR/metrics.jsonl as a list of records (blank lines skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (is {run_dir} a pg_train output directory?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that carry a number under `key` (a skipped step logs
    loss null; the step-0 evaluation logs no training numbers)."""
    points = [(r["step"], float(r[key])) for r in records if isinstance(r.get(key), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def evaluations(records: list[dict]) -> list[dict]:
    """The records of held-out evaluations (those with eval/* numbers), in step order."""
    return [r for r in records if "eval/cycle_gIoU" in r]


def heldout_label(records: list[dict]) -> str:
    """What the run's held-out set is ("manifest pairs.jsonl, n=16", as training logged it in
    `eval/set`); a run from before that was logged: "samples never trained on"."""
    named = [r["eval/set"] for r in evaluations(records) if isinstance(r.get("eval/set"), str)]
    return named[-1] if named else "samples never trained on"


# ---- the held-out samples file (numpy only: no torch, no model) ------------------------------------
SAMPLE_ARRAYS = ("image1", "region1", "image2", "true2", "pred2")  # pg_train.gallery.gallery_samples' arrays
SAMPLE_TEXT = ("caption", "truth")


def save_samples(samples: list[dict], path: str | Path) -> Path:
    """pg_train.gallery.gallery_samples' output as one compressed .npz (each field stacked over
    the samples), so the report can be drawn again without a model."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.stack([np.asarray(s[k]) for s in samples]) if samples else np.zeros(0) for k in SAMPLE_ARRAYS}
    arrays.update({k: np.array([s[k] for s in samples], dtype=str) for k in SAMPLE_TEXT})
    arrays["iou"] = np.array([s["iou"] for s in samples], dtype=np.float64)
    with path.open("wb") as f:
        np.savez_compressed(f, **arrays)
    return path


def load_samples(path: str | Path) -> list[dict]:
    """The samples save_samples wrote (arrays as saved, captions as str, the IoU as float)."""
    with np.load(path, allow_pickle=False) as data:
        fields = {k: data[k] for k in (*SAMPLE_ARRAYS, *SAMPLE_TEXT, "iou")}
    return [
        {
            **{k: fields[k][i] for k in SAMPLE_ARRAYS},
            **{k: str(fields[k][i]) for k in SAMPLE_TEXT},
            "iou": float(fields["iou"][i]),
        }
        for i in range(len(fields["iou"]))
    ]


# ---- the run's figure ------------------------------------------------------------------------------
def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray", wrap=True)


def running_mean(values: list[float], window: int) -> np.ndarray:
    """Mean of each value and the window - 1 before it (fewer at the start)."""
    sums = np.cumsum(np.concatenate([[0.0], values]))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(0, ends - window)
    return (sums[ends] - sums[starts]) / (ends - starts)


def _trend(ax, steps: list[int], values: list[float], colour: str) -> None:
    """A noisy per-batch number's running mean over ~5% of the run (from 20 logged points on)."""
    if len(values) >= 20:
        window = max(5, len(values) // 20)
        ax.plot(steps, running_mean(values, window), color=colour, lw=2, label=f"mean of {window} logged steps")


def _training_panel(ax, records, main, extra, legend_at: str, title: str, ylabel: str, **limits) -> None:
    """One training-curve panel: `main` (key, colour, trend colour, label) with its running mean,
    and `extra` (key, colour, label) when the run logged it."""
    key, colour, trend, label = main
    ax.set_label(key)
    steps, values = series(records, key)
    ax.plot(steps, values, color=colour, lw=1, alpha=0.6, label=label, marker="." if len(steps) < 30 else None)
    _trend(ax, steps, values, trend)
    extra_key, extra_colour, extra_label = extra
    extra_steps, extra_values = series(records, extra_key)
    if extra_values:
        ax.plot(extra_steps, extra_values, color=extra_colour, lw=1, label=extra_label)
    if len(ax.lines) > 1:
        ax.legend(loc=legend_at, fontsize=8)
    if not steps:
        _no_data(ax, f"no training {'loss' if key == 'loss' else 'IoU'} logged")
    ax.set(title=title)
    ax.set(xlabel="optimizer step", ylabel=ylabel, **limits)


def plot_curves(records: list[dict], axes) -> None:
    """The three curve panels on `axes` (loss, training IoU, held-out gIoU)."""
    loss_ax, iou_ax, eval_ax = axes
    _training_panel(
        loss_ax,
        records,
        ("loss", "tab:red", "darkred", "loss"),
        ("lm_loss", "tab:purple", "lm_loss (caption)"),
        "upper right",
        "Training loss\n(the objective on each logged step's batch; lower is better)",
        "loss",
    )
    _training_panel(
        iou_ax,
        records,
        ("iou", "tab:green", "darkgreen", "mask IoU"),
        ("supervised_iou", "tab:olive", "supervised IoU"),
        "upper left",
        "Training mask IoU\n(image 2's predicted vs true mask, on the training batch)",
        "IoU",
        ylim=(0, 1),
    )

    eval_ax.set_label("heldout")
    evals = evaluations(records)
    for kind in KINDS:
        steps, values = series(evals, f"eval/{kind}_gIoU")
        if values:
            colour, style, meaning = KIND_STYLE[kind]
            label = f"{kind}: {meaning} ({values[0]:.2f} → {values[-1]:.2f})"
            eval_ax.plot(steps, values, color=colour, ls=style, marker="o", ms=4, label=label)
    if evals:
        eval_ax.legend(loc="upper left", fontsize=8)
        last = [evals[-1].get(f"eval/{kind}_gIoU") for kind in KINDS]
        if all(isinstance(v, (int, float)) for v in last) and max(last) - min(last) < 1e-3:
            eval_ax.text(  # the lines lie on each other: say why instead of leaving one visible line
                0.98,
                0.04,
                "all four kinds equal at the last evaluation:\nthe masks do not depend on the caption yet",
                ha="right",
                va="bottom",
                transform=eval_ax.transAxes,
                fontsize=9,
                color="tab:red",
            )
    else:
        _no_data(eval_ax, "no held-out evaluation in this run\n(train with eval_every=N)")
    eval_ax.set(title=f"Held-out gIoU ({heldout_label(records)})\nimage 2 segmented from each kind of caption")
    eval_ax.set(xlabel="optimizer step", ylabel="gIoU (mean per-sample IoU)", ylim=(0, 1))
    for ax in axes:
        ax.grid(alpha=0.3)


DRIFT_LINES = (  # key, colour, label (objectives.drift)
    ("drift/agreement", "tab:blue", "caption read = teacher's (token share)"),
    ("drift/text_use", "tab:orange", "text use (loss, other caption − own)"),
    ("drift/grad_share/lm_head", "tab:purple", "lm_head gradient share via caption"),
    ("eval/cycle_minus_shuffled_gIoU", "tab:green", "held-out cycle − shuffled gIoU"),
    ("eval/caption_token_f1", "tab:brown", "held-out caption token F1"),
)


def plot_drift(records: list[dict], ax) -> None:
    """The drift panel (issue 26): whether the captions the segmenter reads stay language and
    whether the masks still depend on them (metrics.jsonl drift/* and eval/* keys)."""
    ax.set_label("drift")
    for key, colour, label in DRIFT_LINES:
        steps, values = series(records, key)
        if values:
            ax.plot(steps, values, color=colour, lw=1, marker="o" if len(steps) < 30 else None, ms=3, label=label)
    if ax.lines:
        ax.legend(loc="best", fontsize=7)
        ax.axhline(0, color="grey", lw=0.5)
    else:
        _no_data(ax, "no drift diagnostics logged\n(train with objective.diagnostics_every=N)")
    ax.set(title="Drift of self-training\n(captions as language; masks that follow them)")
    ax.set(xlabel="optimizer step", ylabel="share / difference")
    ax.grid(alpha=0.3)


def _outline(ax, mask: np.ndarray, colour: str, edge: str = "black", width: float = 2) -> None:
    """The mask's border in `colour` over an `edge`-coloured rim (readable on any object's colour)."""
    mask = np.asarray(mask, bool)
    if mask.any() and not mask.all():
        _stroke(ax.contour(mask.astype(float), levels=[0.5], colors=[colour], linewidths=width), width, edge)


def _red_fill(mask: np.ndarray) -> np.ndarray:
    rgba = np.zeros((*mask.shape, 4))
    rgba[np.asarray(mask, bool)] = (0.9, 0.0, 0.0, 0.45)
    return rgba


def printable(text: str) -> str:
    """A decoded caption as it can be printed: control characters and the replacement character
    of a cut byte sequence (what an untrained model's byte-level tokens decode to) become '·'."""
    return "".join("·" if unicodedata.category(c)[0] == "C" or c == "\ufffd" else c for c in text)


def _wrap(text: str, width: int = 44, lines: int = 3) -> str:
    return "\n".join(textwrap.wrap(text, width, max_lines=lines, placeholder=" …"))


def _stroke(artist, width: float, edge: str = "black") -> None:
    artist.set_path_effects([patheffects.Stroke(linewidth=width + 2, foreground=edge), patheffects.Normal()])


def plot_gallery(samples: list[dict], image1_axes, image2_axes) -> None:
    """Per sample: image 1 with the region outlined (yellow), the model's caption under it, then
    image 2 with the predicted mask (red fill) and the true mask (green outline)."""
    for i, (s, ax1, ax2) in enumerate(zip(samples, image1_axes, image2_axes)):
        ax1.set_label(f"gallery-image1-{i}")
        ax1.imshow(s["image1"])
        _outline(ax1, s["region1"], "yellow")
        ax1.set_title(f"sample {i + 1} — image 1: the region to describe\n(yellow outline)", fontsize=10)
        ax1.set_xlabel(
            f"{_wrap('model: ' + (printable(s['caption']) or '(empty caption)'))}\n\n"
            f"{_wrap('truth: ' + (s['truth'] or '(none)'), lines=2)}",
            fontsize=9,
            loc="left",
            parse_math=False,
        )
        ax2.set_label(f"gallery-image2-{i}")
        ax2.imshow(s["image2"])
        ax2.imshow(_red_fill(s["pred2"]))
        _outline(ax2, s["pred2"], "red", edge="white", width=1.2)  # visible on a red object too
        _outline(ax2, s["true2"], "lime")
        empty = " (predicted nothing)" if not np.asarray(s["pred2"]).any() else ""
        ax2.set_title(
            f"image 2 segmented from that caption\nred = predicted{empty}, green = true; IoU {s['iou']:.2f}",
            fontsize=10,
        )
        for ax in (ax1, ax2):
            ax.set_xticks([])
            ax.set_yticks([])


def figure_size(n_samples: int) -> tuple[float, float]:
    """Inches (× DPI = the PNG's pixels): the curves' row, plus one row of up to four samples each."""
    return WIDTH_IN, CURVES_IN + GALLERY_ROW_IN * math.ceil(n_samples / GALLERY_COLUMNS)


def plot_report(records: list[dict], samples: list[dict] | None = None, title: str = "") -> Figure:
    """The whole report.png as a matplotlib Figure: the curves' row, then the gallery."""
    samples = samples or []
    fig = Figure(figsize=figure_size(len(samples)), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    rows = math.ceil(len(samples) / GALLERY_COLUMNS)
    top, bottom = fig.subfigures(2, 1, height_ratios=(CURVES_IN, GALLERY_ROW_IN * rows)) if rows else (fig, None)
    *curve_axes, drift_ax = top.subplots(1, 4)
    plot_curves(records, curve_axes)
    plot_drift(records, drift_ax)
    last = records[-1]["step"] if records else 0
    top.suptitle(f"{title or 'pg_train run'} — {last} steps", fontsize=14, fontweight="bold")
    if bottom is not None:
        grid = bottom.subplots(2 * rows, GALLERY_COLUMNS, squeeze=False)
        image1 = [grid[2 * (i // GALLERY_COLUMNS), i % GALLERY_COLUMNS] for i in range(len(samples))]
        image2 = [grid[2 * (i // GALLERY_COLUMNS) + 1, i % GALLERY_COLUMNS] for i in range(len(samples))]
        plot_gallery(samples, image1, image2)
        for i in range(len(samples), rows * GALLERY_COLUMNS):
            grid[2 * (i // GALLERY_COLUMNS), i % GALLERY_COLUMNS].set_axis_off()
            grid[2 * (i // GALLERY_COLUMNS) + 1, i % GALLERY_COLUMNS].set_axis_off()
        bottom.suptitle(
            f"Held-out samples ({heldout_label(records)}) at the end of the run: the model captions the yellow "
            "region of image 1 (greedy), then segments image 2 from its own caption (the cycle)",
            fontsize=12,
        )
    return fig


def figure_axes(fig: Figure) -> dict[str, object]:
    """The report's axes by label ("loss", "iou", "heldout", "gallery-image1-0", ...), subfigures included."""
    found, stack = {}, [fig]
    while stack:
        f = stack.pop()
        for ax in f.axes:
            if ax.get_label():
                found[ax.get_label()] = ax
        stack += list(f.subfigs)
    return found


# ---- html --------------------------------------------------------------------------------------------
MEANINGS = {
    "referring": "image 2 segmented from the ground-truth expression",
    "cycle": "the model captions region 1 of image 1, then segments image 2 from its own caption",
    "shuffled": "control: another sample's caption (cycle − shuffled is what captions carry about the object)",
    "empty": "control: no caption at all",
}


def _eval_table(records: list[dict]) -> str:
    evals = evaluations(records)
    if not evals:
        return "<p>No held-out evaluation in this run (train with <code>eval_every=N</code>).</p>"
    first, last = evals[0], evals[-1]
    head = (
        f"<tr><th>kind</th><th>what it measures</th><th>gIoU at step {first['step']}</th>"
        f"<th>gIoU at step {last['step']}</th><th>change</th><th>cIoU at step {first['step']}</th>"
        f"<th>cIoU at step {last['step']}</th></tr>"
    )

    def cell(r, key):
        v = r.get(key)
        return f"{v:.3f}" if isinstance(v, (int, float)) else "–"

    rows = []
    for kind in KINDS:
        g0, g1 = first.get(f"eval/{kind}_gIoU"), last.get(f"eval/{kind}_gIoU")
        change = f"{g1 - g0:+.3f}" if isinstance(g0, (int, float)) and isinstance(g1, (int, float)) else "–"
        rows.append(
            f"<tr><td>{kind}</td><td>{html.escape(MEANINGS[kind])}</td><td>{cell(first, f'eval/{kind}_gIoU')}</td>"
            f"<td>{cell(last, f'eval/{kind}_gIoU')}</td><td>{change}</td><td>{cell(first, f'eval/{kind}_cIoU')}</td>"
            f"<td>{cell(last, f'eval/{kind}_cIoU')}</td></tr>"
        )
    for key, meaning in (
        ("eval/caption_len", "mean length of the model's captions (tokens)"),
        ("eval/caption_sensitivity", "how much SAM2's language embedding moves with the caption (near 0: ignored)"),
    ):
        rows.append(
            f"<tr><td>{key[5:]}</td><td>{html.escape(meaning)}</td><td>{cell(first, key)}</td>"
            f"<td>{cell(last, key)}</td><td></td><td></td><td></td></tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


def render_html(records: list[dict], samples: list[dict], png: bytes, title: str) -> str:
    steps, loss = series(records, "loss")
    summary = f"{records[-1]['step'] if records else 0} steps logged"
    if loss:
        summary += f"; loss {loss[0]:.4f} at step {steps[0]} → {loss[-1]:.4f} at step {steps[-1]}"
    gallery = "".join(
        f"<li><b>model's caption:</b> {html.escape(printable(s['caption'])) or '(empty)'}<br><b>truth:</b> "
        f"{html.escape(s['truth']) or '(none)'}<br>IoU of the mask predicted from the model's caption: {s['iou']:.3f}</li>"
        for s in samples
    )
    gallery = f"<ol>{gallery}</ol>" if samples else "<p>No held-out samples saved for this run.</p>"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1640px;margin:1em auto;padding:0 1em}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.25em .6em;text-align:right}}
td:nth-child(-n+2),th:nth-child(-n+2){{text-align:left}}img{{max-width:100%}}li{{margin:.4em 0}}</style></head>
<body><h1>{html.escape(title)}</h1><p>{html.escape(summary)}</p>
<img alt="loss, training IoU and held-out gIoU curves, and held-out samples" src="data:image/png;base64,{base64.b64encode(png).decode()}">
<h2>Held-out evaluation ({html.escape(heldout_label(records))}): first and last</h2>{_eval_table(records)}
<h2>Held-out samples (the gallery's captions)</h2>{gallery}
</body></html>
"""


def run_title(run_dir: Path) -> str:
    """ "pg_train report: DIR (preset, objective)" from the run's config.yaml when it has one."""
    import yaml

    title = f"pg_train report: {run_dir}"
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        return f"{title} ({cfg['model']['preset']}, {cfg['objective_kind']})"
    except (OSError, KeyError, TypeError, yaml.YAMLError):  # no or another config: the folder alone
        return title


def write_report(
    run_dir: str | Path, out: str | Path | None = None, samples: list[dict] | None = None
) -> tuple[Path, Path]:
    """report.png and report.html of a run directory (into `out`, default the run directory).
    `samples` default: RUN_DIR/heldout_samples.npz when it exists, else curves only."""
    import io

    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir
    records = read_metrics(run_dir)
    if samples is None and (run_dir / SAMPLES_FILE).is_file():
        samples = load_samples(run_dir / SAMPLES_FILE)
    samples = samples or []
    title = run_title(run_dir)
    fig = plot_report(records, samples, title=title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    png = buffer.getvalue()
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.png").write_bytes(png)
    (out / "report.html").write_text(render_html(records, samples, png, title))
    return out / "report.png", out / "report.html"


def finish_run(samples: list[dict], run_dir: str | Path) -> Path:
    """The end of a training run: the held-out `samples` (pg_train.gallery.gallery_samples'
    output, computed by the caller; this module only draws) saved to RUN_DIR/heldout_samples.npz,
    then RUN_DIR/report.png and report.html. With no samples: the curves only. Returns
    report.png's path."""
    run_dir = Path(run_dir)
    save_samples(samples, run_dir / SAMPLES_FILE)
    png, _ = write_report(run_dir, samples=samples)
    return png


# ---- comparing runs (the learning recipe's table and curves) -----------------------------------------
def comparison(specs: list[str]) -> tuple[str, dict[str, list[tuple[int, float, float, float]]]]:
    """The markdown table and each run's (step, cycle, shuffled, referring) held-out gIoU from
    NAME=RUN_DIR specs; a NAME starting with + continues the first run's steps."""
    lines = [
        "| run | steps | cycle gIoU | shuffled gIoU | cycle − shuffled | referring gIoU | cycle at its start |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    curves, base_end = {}, None
    for spec in specs:
        name, sep, run = spec.partition("=")
        if not sep or not run:
            raise SystemExit(f"{spec!r}: expected NAME=RUN_DIR")
        evals = evaluations(read_metrics(run))
        if not evals:
            raise SystemExit(f"{run}: no held-out evaluation in metrics.jsonl (train with eval_every=N)")
        offset = base_end if name.startswith("+") and base_end is not None else 0
        label = name.lstrip("+")
        curves[label] = [
            (offset + r["step"], r["eval/cycle_gIoU"], r["eval/shuffled_gIoU"], r["eval/referring_gIoU"]) for r in evals
        ]
        base_end = curves[label][-1][0] if base_end is None else base_end
        first, last = evals[0], evals[-1]
        lines.append(
            f"| {label} | {last['step']} | {last['eval/cycle_gIoU']:.3f} | {last['eval/shuffled_gIoU']:.3f} | "
            f"{last['eval/cycle_gIoU'] - last['eval/shuffled_gIoU']:+.3f} | {last['eval/referring_gIoU']:.3f} | "
            f"{first['eval/cycle_gIoU']:.3f} |"
        )
    return "\n".join(lines), curves


def plot_comparison(curves: dict[str, list[tuple[int, float, float, float]]]) -> Figure:
    """Left: cycle (solid) and shuffled-control (dashed) gIoU per run; right: referring gIoU."""
    fig = Figure(figsize=(14, 5.5), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    cycle_ax, referring_ax = fig.subplots(1, 2)
    cycle_ax.set_label("cycle")
    referring_ax.set_label("referring")
    colours = matplotlib.color_sequences["tab10"]
    for i, (name, points) in enumerate(curves.items()):
        steps = [p[0] for p in points]
        colour = colours[i % len(colours)]
        cycle_ax.plot(steps, [p[1] for p in points], color=colour, marker="o", ms=3, label=f"{name}: cycle")
        cycle_ax.plot(steps, [p[2] for p in points], color=colour, ls="--", lw=1, label=f"{name}: shuffled")
        referring_ax.plot(steps, [p[3] for p in points], color=colour, marker="o", ms=3, label=name)
    cycle_ax.set(
        title="Held-out cycle gIoU (solid: the model's own caption)\nvs the shuffled-caption control (dashed)",
        xlabel="optimizer step (a continued run's after its first stage)",
        ylabel="gIoU",
        ylim=(0, 1),
    )
    referring_ax.set(
        title="Held-out referring gIoU\n(image 2 segmented from the true caption)",
        xlabel="optimizer step (a continued run's after its first stage)",
        ylabel="gIoU",
        ylim=(0, 1),
    )
    for ax in (cycle_ax, referring_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    return fig


# ---- CLI ---------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pg_train.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", nargs="?", help="a pg_train output directory (with metrics.jsonl)")
    parser.add_argument("--compare", nargs="+", metavar="NAME=RUN_DIR", help="compare runs instead")
    parser.add_argument("--out", help="output folder (default: RUN_DIR; with --compare: the current folder)")
    args = parser.parse_args(argv)
    if bool(args.run_dir) == bool(args.compare):
        parser.error("give either RUN_DIR or --compare NAME=RUN_DIR ...")
    if args.compare:
        table, curves = comparison(args.compare)
        print(table)
        out = Path(args.out or ".")
        out.mkdir(parents=True, exist_ok=True)
        plot_comparison(curves).savefig(out / "curves.png", dpi=DPI)
        print(f"\nwrote {out / 'curves.png'}")
        return 0
    png, page = write_report(args.run_dir, args.out)
    print(f"wrote {png} and {page}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
