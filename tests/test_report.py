"""pg_train.report: report.png / report.html of a run directory, the held-out gallery, and the
comparison of runs (the learning recipe's table and curves)."""

import base64
import json

import numpy as np
import pytest
from PIL import Image

from pg_train.evaluate import heldout_batches
from pg_train.gallery import gallery_samples
from pg_train.objectives.settings import PseudoGumbelConfig
from pg_train.report import (
    comparison,
    figure_axes,
    finish_run,
    load_samples,
    main,
    plot_comparison,
    plot_report,
    printable,
    read_metrics,
    running_mean,
    save_samples,
)

# Hand-written metrics.jsonl: the step-0 evaluation (no training numbers), four logged steps (step
# 3 skipped: loss null), held-out evaluations at steps 0, 2 and 4.
EVAL = {
    0: {"referring": 0.10, "cycle": 0.05, "shuffled": 0.04, "empty": 0.02},
    2: {"referring": 0.30, "cycle": 0.20, "shuffled": 0.10, "empty": 0.03},
    4: {"referring": 0.60, "cycle": 0.45, "shuffled": 0.15, "empty": 0.05},
}
LOSS = {1: 1.8, 2: 1.5, 3: None, 4: 1.1}
IOU = {1: 0.1, 2: 0.2, 3: 0.25, 4: 0.4}


def eval_numbers(step: int) -> dict:
    record = {}
    for kind, g in EVAL[step].items():
        record[f"eval/{kind}_gIoU"] = g
        record[f"eval/{kind}_cIoU"] = g + 0.01
    return {**record, "eval/caption_len": 10.0 + step, "eval/caption_sensitivity": 0.5}


def write_metrics(run_dir, steps=(1, 2, 3, 4)):
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [{"step": 0, **eval_numbers(0)}]
    for s in steps:
        record = {"step": s, "loss": LOSS[s], "iou": IOU[s], "lr": 1e-4 * s}
        if s in EVAL:
            record.update(eval_numbers(s))
        lines.append(record)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return run_dir


def test_report_png_html_and_the_panels_data(tmp_path, capsys):
    run = write_metrics(tmp_path / "run")
    assert main([str(run)]) == 0
    assert "report.png" in capsys.readouterr().out
    png = (run / "report.png").read_bytes()
    with Image.open(run / "report.png") as image:
        assert image.format == "PNG" and image.size == (1600, 450)  # curves only: 16 x 4.5 in at 100 dpi
        assert len(set(image.convert("RGB").getdata())) > 50  # something was drawn
    page = (run / "report.html").read_text()
    assert f"data:image/png;base64,{base64.b64encode(png).decode()}" in page  # stands alone
    assert "gIoU at step 0" in page and "gIoU at step 4" in page
    assert "<td>cycle</td>" in page and "<td>0.050</td><td>0.450</td><td>+0.400</td>" in page
    assert "<td>referring</td>" in page and "<td>0.100</td><td>0.600</td><td>+0.500</td>" in page
    assert "No held-out samples" in page

    axes = figure_axes(plot_report(read_metrics(run)))
    assert set(axes) == {"loss", "iou", "heldout", "drift"}
    assert not axes["drift"].lines and "no drift diagnostics" in axes["drift"].texts[0].get_text()
    loss = axes["loss"]
    assert loss.get_title().startswith("Training loss") and loss.get_xlabel() == "optimizer step"
    assert list(loss.lines[0].get_xdata()) == [1, 2, 4]  # the skipped step and the step-0 evaluation left out
    assert list(loss.lines[0].get_ydata()) == [1.8, 1.5, 1.1]
    iou = axes["iou"]
    assert iou.get_title().startswith("Training mask IoU") and iou.get_ylabel() == "IoU"
    assert list(iou.lines[0].get_xdata()) == [1, 2, 3, 4] and list(iou.lines[0].get_ydata()) == [0.1, 0.2, 0.25, 0.4]
    heldout = axes["heldout"]
    assert heldout.get_title().startswith("Held-out gIoU")
    labels = [line.get_label().split(":")[0] for line in heldout.lines]
    assert labels == ["referring", "cycle", "shuffled", "empty"]
    for kind, line in zip(labels, heldout.lines):
        assert list(line.get_xdata()) == [0, 2, 4]
        assert list(line.get_ydata()) == [EVAL[s][kind] for s in (0, 2, 4)]
    assert "(0.05 → 0.45)" in heldout.lines[1].get_label()
    assert not heldout.texts  # the kinds differ: no "masks do not depend on the caption" note


def test_report_of_a_run_without_evaluation_or_loss_says_so(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": None, "iou": 0.0}) + "\n")
    fig = plot_report(read_metrics(run))
    axes = figure_axes(fig)
    assert "no held-out evaluation" in axes["heldout"].texts[0].get_text()
    assert "no training loss" in axes["loss"].texts[0].get_text()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 0, **{f"eval/{k}_gIoU": 0.2 for k in EVAL[0]}}) + "\n")
    note = figure_axes(plot_report(read_metrics(run)))["heldout"].texts
    assert "do not depend on the caption" in note[0].get_text()
    assert main([str(run), "--out", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere" / "report.png").is_file() and not (run / "report.png").exists()
    with pytest.raises(FileNotFoundError):
        read_metrics(tmp_path / "nothing")


def test_gallery_samples_round_trip_and_the_gallery_panels(tmp_path, tiny_model):
    cfg = PseudoGumbelConfig(max_caption_len=6)
    batches = heldout_batches(tiny_model, samples=2, batch_size=2, seed=7, device="cpu")
    samples = gallery_samples(tiny_model, batches, cfg, n=2)
    assert len(samples) == 2 and tiny_model.training is False
    for s in samples:
        assert s["image1"].shape == s["image2"].shape == (224, 224, 3) and s["image1"].dtype == np.uint8
        assert s["region1"].shape == s["true2"].shape == s["pred2"].shape == (224, 224)
        assert s["region1"].any() and s["true2"].any() and 0.0 <= s["iou"] <= 1.0
        assert s["truth"] and isinstance(s["caption"], str)
    path = save_samples(samples, tmp_path / "samples.npz")
    loaded = load_samples(path)
    assert len(loaded) == 2
    for a, b in zip(samples, loaded):
        for key in ("image1", "region1", "image2", "true2", "pred2"):
            assert np.array_equal(a[key], b[key]) and a[key].dtype == b[key].dtype
        assert (a["caption"], a["truth"], a["iou"]) == (b["caption"], b["truth"], b["iou"])

    run = write_metrics(tmp_path / "run")
    png = finish_run(samples, run)
    assert png == run / "report.png"
    with Image.open(png) as image:
        assert image.size == (1600, 1150)  # curves + one gallery row (4.5 + 7 in)
    saved = load_samples(run / "heldout_samples.npz")
    assert [s["caption"] for s in saved] == [s["caption"] for s in samples]
    page = (run / "report.html").read_text()
    assert all(s["truth"] in page for s in samples)

    fig = plot_report(read_metrics(run), saved)
    axes = figure_axes(fig)
    gallery = sorted(k for k in axes if k.startswith("gallery"))
    assert gallery == ["gallery-image1-0", "gallery-image1-1", "gallery-image2-0", "gallery-image2-1"]
    for i, s in enumerate(saved):
        image1, image2 = axes[f"gallery-image1-{i}"], axes[f"gallery-image2-{i}"]
        assert np.array_equal(image1.images[0].get_array(), s["image1"])
        assert np.array_equal(image2.images[0].get_array(), s["image2"])
        assert image1.get_xlabel().startswith("model: ") and f"truth: {s['truth'][:20]}" in image1.get_xlabel()
        assert f"IoU {s['iou']:.2f}" in image2.get_title()
        assert (image2.images[1].get_array()[..., 3] > 0).sum() == s["pred2"].sum()  # the red fill is the prediction


def test_finish_run_without_heldout_batches_draws_the_curves_only(tmp_path):
    run = write_metrics(tmp_path / "run")
    png = finish_run([], run)
    assert load_samples(run / "heldout_samples.npz") == []
    with Image.open(png) as image:
        assert image.size == (1600, 450)
    assert main([str(run)]) == 0  # on demand again from the run directory: the empty samples file reads


def test_running_mean_of_hand_made_numbers():
    assert running_mean([1.0, 3.0, 5.0, 7.0], 2).tolist() == [1.0, 2.0, 4.0, 6.0]
    assert running_mean([2.0, 4.0, 6.0], 5).tolist() == [2.0, 3.0, 4.0]


def test_printable_replaces_control_characters_of_an_untrained_caption():
    assert printable("a\x1e b\ufffd c") == "a· b· c" and printable("the red circle") == "the red circle"


def write_eval_run(directory, evals):
    directory.mkdir(parents=True)
    lines = [{"step": s, "loss": 1.0} for s, _, _ in evals]  # training lines without eval are skipped
    lines += [
        {"step": s, "eval/cycle_gIoU": c, "eval/shuffled_gIoU": sh, "eval/referring_gIoU": c + 0.01}
        for s, c, sh in evals
    ]
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_compare_runs_table_and_curves(tmp_path, capsys):
    write_eval_run(tmp_path / "a", [(0, 0.08, 0.08), (100, 0.5, 0.3)])
    write_eval_run(tmp_path / "b", [(0, 0.5, 0.3), (50, 0.7, 0.25)])
    specs = [f"warm={tmp_path / 'a'}", f"+pg={tmp_path / 'b'}"]
    assert main(["--compare", *specs, "--out", str(tmp_path / "docs")]) == 0
    out = capsys.readouterr().out
    assert "| warm | 100 | 0.500 | 0.300 | +0.200 | 0.510 | 0.080 |" in out
    assert "| pg | 50 | 0.700 | 0.250 | +0.450 | 0.710 | 0.500 |" in out
    with Image.open(tmp_path / "docs" / "curves.png") as image:
        assert image.format == "PNG" and image.size == (1400, 550)

    _, curves = comparison(specs)
    axes = figure_axes(plot_comparison(curves))
    cycle = axes["cycle"].lines
    assert [line.get_label() for line in cycle] == ["warm: cycle", "warm: shuffled", "pg: cycle", "pg: shuffled"]
    assert list(cycle[2].get_xdata()) == [100, 150]  # "+pg" continues warm's steps
    assert list(cycle[2].get_ydata()) == [0.5, 0.7] and list(cycle[3].get_ydata()) == [0.3, 0.25]
    assert list(axes["referring"].lines[0].get_ydata()) == [0.09, 0.51]
    with pytest.raises(SystemExit):
        main(["--compare", "no-equals-sign"])
