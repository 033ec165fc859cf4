"""pg_train/objectives (issue 26): the self-training switches at their neutral values are today's
Pseudo-Gumbel step (a step recorded from git main before they existed), the KL anchor's gradient,
the confidence filter and the grounding gate's counts, the pseudo-label objective, the two data
streams' ratio and resume, and the configurations that cannot work."""

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import DATA_DIR, REPO, with_lora_weights
from test_pseudo_gumbel import make_step_batch

from pg_train.config import ConfigError, load_config
from pg_train.data.loader import PairLoader
from pg_train.data.streams import TwoStreams, labelled_count
from pg_train.model import build_model
from pg_train.objectives.anchor import adapters_disabled, caption_kl, keep_confident, reference_caption_logits
from pg_train.objectives.passes import forward_for_logits
from pg_train.objectives.pseudo_gumbel import pseudo_gumbel_step
from pg_train.objectives.pseudo_label import pseudo_label_step
from pg_train.objectives.schedule import schedule_at
from pg_train.objectives.settings import PseudoGumbelConfig
from pg_train.objectives.supervised import SupervisedConfig
from pg_train.objectives.teacher import token_logprob

sys.path.insert(0, str(DATA_DIR))
import pg_step_reference  # noqa: E402

NEUTRAL = {  # every switch of issue 26 at its neutral value, spelled out
    "segmenter_reads": "gumbel",
    "caption_grad": True,
    "anchor_weight": 0.0,
    "anchor_reference": None,
    "filter_min_logprob": None,
    "filter_top_fraction": 1.0,
    "diagnostics_every": 0,
    "mask_ratio": 0.25,
}


# ---- neutral switches == the step before them ---------------------------------------------------
def test_neutral_switches_equal_the_recorded_step_bit_for_bit():
    """tests/data/pg_step_reference.json was written by git main a5bdfcd's pseudo_gumbel_step
    (before the switches): the same loss bits and the same SHA-256 of every gradient."""
    recorded = json.loads((DATA_DIR / "pg_step_reference.json").read_text())
    if pg_step_reference.canary() != recorded["canary"]:
        pytest.skip("this machine's kernels round the untouched segmentation pass differently from the recording's")
    cfg = PseudoGumbelConfig(**recorded["config"], **NEUTRAL)
    now = pg_step_reference.reference_step(pseudo_gumbel_step, cfg)
    assert now["caption_ids"] == recorded["caption_ids"]
    assert now["loss"] == recorded["loss"]
    assert now["grads"] == recorded["grads"]


def test_a_switch_off_neutral_changes_the_recorded_step():
    """The comparison above can fail: the argmax caption changes loss or gradients."""
    recorded = json.loads((DATA_DIR / "pg_step_reference.json").read_text())
    cfg = PseudoGumbelConfig(**recorded["config"], **{**NEUTRAL, "caption_grad": False})
    now = pg_step_reference.reference_step(pseudo_gumbel_step, cfg)
    assert now["grads"] != recorded["grads"]


# ---- KL anchor -----------------------------------------------------------------------------------
def test_kl_anchor_matches_torch_kl_div_and_its_gradient_finite_differences_in_fp64():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    reference = torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    lengths = torch.tensor([3, 2])
    kl = caption_kl(student, reference, lengths)
    # torch's own KL: kl_div(input=log q, target=log p, log_target) = p (log p - log q)
    per_token = F.kl_div(reference.log_softmax(-1), student.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    expected = torch.stack([per_token[0].mean(), per_token[1, :2].mean()])
    torch.testing.assert_close(kl, expected, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda s: caption_kl(s, reference, lengths), (student,), eps=1e-6, atol=1e-8)
    assert float(caption_kl(reference, reference, lengths).abs().max()) < 1e-12  # no pull at the reference


def test_base_reference_disables_lora_adapters_without_a_copy_and_restores_them():
    model = with_lora_weights(build_model("tiny", seed=0))
    batch = make_step_batch(model, batch_size=2)
    from pg_train.model.text.regions import region_cells

    cells, _ = region_cells(batch["region_masks1"], model.grid_size)
    ids, lengths = torch.tensor([[5, 6, 7], [8, 9, 0]]), torch.tensor([3, 2])
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    def run(m):
        return forward_for_logits(m, batch["pixel_values1"], cells, ids, lengths)

    base = reference_caption_logits(adapters_disabled, model, run)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    plain = build_model("tiny", seed=0).eval()  # the same base weights, LoRA B = 0: the adapters add nothing
    with torch.no_grad():
        torch.testing.assert_close(base, run(plain), rtol=0, atol=0)
        assert not torch.equal(run(model.eval()), base)  # adapters on again


def test_anchored_step_adds_beta_times_the_kl_to_its_reference():
    student = with_lora_weights(build_model("tiny", seed=0))
    teacher = with_lora_weights(build_model("tiny", seed=1)).eval()
    batch = make_step_batch(student, batch_size=2, seed=3)
    base = PseudoGumbelConfig(max_caption_len=8, topk=16)
    plain = pseudo_gumbel_step(student, teacher, batch, base)
    anchored = pseudo_gumbel_step(
        student,
        teacher,
        batch,
        PseudoGumbelConfig(max_caption_len=8, topk=16, anchor_weight=0.5),
        reference=adapters_disabled,
    )
    kl = anchored.metrics["anchor_kl"]
    assert float(kl) > 0
    torch.testing.assert_close(anchored.loss, plain.loss + 0.5 * kl, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="anchor_reference"):
        pseudo_gumbel_step(student, teacher, batch, PseudoGumbelConfig(max_caption_len=8, topk=16, anchor_weight=0.5))


# ---- confidence filter, pseudo-labels, segmenter's caption -----------------------------------------
def test_confidence_filter_keeps_the_threshold_and_the_top_fraction():
    confidence = torch.tensor([-0.5, -2.0, -0.1, -1.0, -3.0, -0.1])
    assert keep_confident(confidence, -1.0, 1.0).tolist() == [True, False, True, True, False, True]
    assert keep_confident(confidence, None, 0.5).tolist() == [True, False, True, False, False, True]
    assert keep_confident(confidence, -0.2, 0.5).tolist() == [False, False, True, False, False, True]
    assert keep_confident(torch.linspace(0, -1, 10), None, 0.3).sum() == 3  # 0.3 x 10 is 3, not 4


def test_filtered_step_counts_drops_and_trains_on_the_kept_sample_only():
    student = with_lora_weights(build_model("tiny", seed=0))
    teacher = with_lora_weights(build_model("tiny", seed=1)).eval()
    batch = make_step_batch(student, batch_size=2, seed=3)
    cfg = PseudoGumbelConfig(max_caption_len=8, topk=16, filter_top_fraction=0.5)
    out = pseudo_gumbel_step(student, teacher, batch, cfg)
    assert (float(out.metrics["filter_kept"]), float(out.metrics["filter_dropped"])) == (1.0, 1.0)
    # the teacher's own confidence, recomputed: the mean log-prob of its caption, teacher-forced
    from pg_train.model.text.regions import region_cells

    cells, _ = region_cells(batch["region_masks1"], student.grid_size)
    with torch.no_grad():
        logits = forward_for_logits(teacher, batch["pixel_values1"], cells, out.caption_ids, out.caption_lengths)
    confidence = token_logprob(logits, out.caption_ids, out.caption_lengths)
    kept = int(confidence.argmax())
    assert float(out.metrics["teacher_confidence"]) == pytest.approx(float(confidence.mean()), abs=1e-5)
    per_sample = cfg.bce_weight * out.bce + cfg.dice_weight * out.dice
    torch.testing.assert_close(out.loss, per_sample[kept])


def test_pseudo_label_step_is_caption_cross_entropy_plus_segmentation_from_the_teacher_caption():
    student = with_lora_weights(build_model("tiny", seed=0))
    teacher = with_lora_weights(build_model("tiny", seed=1)).eval()
    batch = make_step_batch(student, batch_size=2, seed=3)
    cfg = PseudoGumbelConfig(max_caption_len=8, topk=16)
    out = pseudo_label_step(student, teacher, batch, cfg, SupervisedConfig(lm_weight=1.0, seg_weight=1.0))
    from pg_train.model.text.regions import region_cells

    cells, _ = region_cells(batch["region_masks1"], student.grid_size)
    logits = forward_for_logits(student, batch["pixel_values1"], cells, out.caption_ids, out.caption_lengths)
    ce = [  # torch's cross-entropy per sample over its real tokens
        F.cross_entropy(logits[b, : int(n)].float(), out.caption_ids[b, : int(n)])
        for b, n in enumerate(out.caption_lengths)
    ]
    torch.testing.assert_close(out.metrics["lm_loss"], torch.stack(ce).mean().detach(), rtol=1e-5, atol=1e-5)
    seg = (cfg.bce_weight * out.bce + cfg.dice_weight * out.dice).mean()
    torch.testing.assert_close(out.loss, torch.stack(ce).mean() + seg, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in student.named_parameters() if "lora" in n)


@pytest.mark.parametrize("reads", ["argmax", "teacher"])
def test_segmenter_reads_the_students_argmax_or_the_teachers_caption(reads):
    student = with_lora_weights(build_model("tiny", seed=0))
    teacher = with_lora_weights(build_model("tiny", seed=1)).eval()
    batch = make_step_batch(student, batch_size=2, seed=3)
    cfg = PseudoGumbelConfig(max_caption_len=8, topk=16, segmenter_reads=reads)
    out = pseudo_gumbel_step(student, teacher, batch, cfg)
    from pg_train.model.text.regions import region_cells

    cells, _ = region_cells(batch["region_masks1"], student.grid_size)
    if reads == "argmax":
        with torch.no_grad():
            logits = forward_for_logits(student, batch["pixel_values1"], cells, out.masked_ids, out.caption_lengths)
        logits = logits.masked_fill(student.special_id_mask, float("-inf"))
        assert torch.equal(out.hard_ids, logits.argmax(-1))
    else:
        from pg_train.objectives.passes import answer_caption_embeds

        embeds, _ = answer_caption_embeds(student, out.caption_ids, out.caption_lengths)
        assert torch.equal(out.text_embeds.detach(), embeds.detach())
        out.loss.backward()
        assert student.language_model.lm_head.weight.grad is None  # nothing reaches the captioner's head


# ---- two data streams ---------------------------------------------------------------------------
class CountingPairs(torch.utils.data.Dataset):
    """A source of n tiny pairs whose caption names the stream and index (for the stream tests)."""

    def __init__(self, n: int, name: str):
        self.n, self.name = n, name

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        image = torch.full((1, 3, 2, 2), float(index))
        return {
            "pixel_values1": image,
            "num_views1": torch.tensor(1),
            "region_masks1": torch.ones(2, 2),
            "region_nearest1": torch.ones(2, 2, dtype=torch.bool),
            "region_coverage1": torch.ones(2, 2),
            "pixel_values2": image,
            "num_views2": torch.tensor(1),
            "sam_pixel_values2": torch.zeros(3, 2, 2),
            "masks2": torch.ones(2, 2),
            "caption": f"{self.name}{index}",
            "index": index,
            "skipped": [],
        }


def two_streams(fraction, batch_size=4, grad_accum=1, rank=0, world_size=1):
    loaders = [
        PairLoader(CountingPairs(n, name), 1, rank=rank, world_size=world_size, seed=7)
        for n, name in ((10, "L"), (13, "U"))
    ]
    return TwoStreams(*loaders, batch_size, fraction, grad_accum)


def captions(micro_batch: dict) -> list[str]:
    return [c for part in ("labelled", "unlabelled") if micro_batch[part] for c in micro_batch[part]["captions"]]


def test_stream_ratio_holds_over_many_steps_and_follows_its_schedule():
    streams = two_streams(lambda step: schedule_at([[0, 0.3], [500, 0.75]], step), batch_size=3, grad_accum=2)
    counts = {"labelled": [], "unlabelled": []}
    it = iter(streams)
    for _ in range(2000):  # 1000 optimizer steps
        batch = next(it)
        for part in counts:
            counts[part].append(len(batch[part]["captions"]) if batch[part] else 0)
        assert counts["labelled"][-1] + counts["unlabelled"][-1] == 3
        assert all(c.startswith("L") for c in (batch["labelled"] or {"captions": []})["captions"])
    first, second = sum(counts["labelled"][:1000]), sum(counts["labelled"][1000:])
    assert abs(first - 0.3 * 3 * 1000) <= 1 and abs(second - 0.75 * 3 * 1000) <= 1
    assert labelled_count(0.0, 0.3, 10) == (3, pytest.approx(0.0, abs=1e-9))


def test_both_streams_resume_bitwise_from_their_state():
    fraction = lambda step: 0.5  # noqa: E731
    full = iter(two_streams(fraction, batch_size=3))
    expected = [captions(next(full)) for _ in range(30)]
    cut = two_streams(fraction, batch_size=3)
    it = iter(cut)
    first = [captions(next(it)) for _ in range(11)]
    resumed = two_streams(fraction, batch_size=3)
    resumed.load_state_dict(json.loads(json.dumps(cut.state_dict())))  # as a checkpoint stores it
    it = iter(resumed)
    assert first + [captions(next(it)) for _ in range(19)] == expected
    # rank sharding: two ranks draw disjoint samples of each stream within an epoch
    ranks = [iter(two_streams(fraction, batch_size=2, rank=r, world_size=2)) for r in (0, 1)]
    drawn = [[c for _ in range(2) for c in captions(next(it))] for it in ranks]
    assert not set(drawn[0]) & set(drawn[1])


# ---- configurations that cannot work ------------------------------------------------------------
STREAMS = ["streams.enabled=true", "streams.labelled_fraction=[[0, 0.5]]"]


@pytest.mark.parametrize(
    "overrides, key",
    [
        ([*STREAMS, "streams.labelled.source=video", "streams.labelled.video_dir=/x"], "streams.labelled.source"),
        (
            [*STREAMS, "streams.labelled.source=hf", "streams.labelled.hf_path=/x", "streams.labelled.hf_caption=null"],
            "streams.labelled.source",
        ),
        (["streams.enabled=true", "streams.labelled_fraction=[[0, 0.5], [10, 0.0]]"], "streams.labelled_fraction"),
        (["streams.enabled=true", "streams.labelled_fraction=[[0, 1.0]]"], "streams.labelled_fraction"),
        (["objective.anchor_weight=0.1"], "objective.anchor_reference"),
        (
            ["objective.anchor_weight=0.1", "objective.anchor_reference=base", "model.train_lm_head=true"],
            "objective.anchor_reference",
        ),
        (["streams.gate_min_gap=0.1"], "streams.gate_min_gap"),
        ([*STREAMS, "streams.gate_min_gap=0.1", "eval_every=0"], "streams.gate_min_gap"),
        ([*STREAMS, "objective_kind=supervised"], "objective_kind"),
        (["objective.segmenter_reads=caption"], "objective.segmenter_reads"),
    ],
)
def test_configurations_that_cannot_work_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=rf"^{key}:"):
        load_config([], overrides)


def test_refusal_from_the_cli_exits_2_before_building_anything(tmp_path):
    proc = subprocess.run(
        [sys.executable, "launch/train.py", "--output-dir", str(tmp_path / "run"), "objective.anchor_weight=0.1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "objective.anchor_reference" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_schedule_is_piecewise_constant():
    points = [[0, 1.0], [675, 0.0]]
    assert [schedule_at(points, s) for s in (0, 674, 675, 900)] == [1.0, 1.0, 0.0, 0.0]
    assert math.isclose(schedule_at([[0, 0.25]], 10**6), 0.25)


@pytest.mark.slow
def test_both_streams_resume_bitwise_under_zero2_on_two_processes(tmp_path):
    from conftest import accelerate_launch
    from test_train import FAST, metrics

    from pg_train.train import REQUEUE_EXIT_CODE

    args = [
        *FAST,
        "max_steps=3",
        "save_every=100",
        "grad_accum=2",
        "streams.enabled=true",
        "streams.labelled_fraction=[[0, 0.5], [1, 0.75]]",
        "streams.labelled.num_samples=24",
        "streams.unlabelled.num_samples=24",
        "streams.unlabelled.sample_offset=24",
    ]
    accelerate_launch("tests/dist/train_probe.py", str(tmp_path / "full"), f"output_dir={tmp_path / 'full_run'}", *args)
    accelerate_launch(
        "tests/dist/train_probe.py",
        str(tmp_path / "cut"),
        f"output_dir={tmp_path / 'cut_run'}",
        *args,
        "stop_at_step=2",
    )
    assert json.loads((tmp_path / "cut.rank0.json").read_text())["exit_code"] == REQUEUE_EXIT_CODE
    accelerate_launch(
        "tests/dist/train_probe.py",
        str(tmp_path / "resumed"),
        f"output_dir={tmp_path / 'cut_run'}",
        *args,
        "resume=auto",
    )
    full = [json.loads((tmp_path / f"full.rank{r}.json").read_text()) for r in (0, 1)]
    resumed = [json.loads((tmp_path / f"resumed.rank{r}.json").read_text()) for r in (0, 1)]
    lines = metrics(tmp_path / "full_run")
    # the window's last micro-batch: 1 + 1 of 2 at 0.5; 1 then 2 at 0.75 (the remainder carried over)
    assert [(r["labelled_samples"], r["unlabelled_samples"]) for r in lines] == [(1, 1), (2, 0), (2, 0)]
    assert [r["loss"] for r in metrics(tmp_path / "cut_run")] == [r["loss"] for r in lines]
    for f, r in zip(full, resumed):
        assert r["trainable_bytes_hash"] == f["trainable_bytes_hash"]
        assert r["consumed"] == f["consumed"]  # both streams' positions, per rank
    assert not set(full[0]["consumed"]["labelled"]) & set(full[1]["consumed"]["labelled"])


# ---- drift diagnostics --------------------------------------------------------------------------
def test_drift_diagnostics_of_a_step():
    from pg_train.objectives.drift import drift_diagnostics, token_f1

    student = with_lora_weights(build_model("tiny", seed=0))
    teacher = with_lora_weights(build_model("tiny", seed=1)).eval()
    batch = make_step_batch(student, batch_size=2, seed=3)
    cfg = PseudoGumbelConfig(max_caption_len=8, topk=16)
    rng = torch.get_rng_state()
    out = pseudo_gumbel_step(student, teacher, batch, cfg, diagnose=True)
    drift = drift_diagnostics(student, batch, out, cfg)
    assert torch.equal(torch.get_rng_state(), rng)  # no random draw: the training's streams are untouched
    n = out.caption_lengths
    same = sum(int((out.hard_ids[b, : n[b]] == out.caption_ids[b, : n[b]]).sum()) for b in range(2))
    assert float(drift["drift/agreement"]) == pytest.approx(same / int(n.sum()))
    assert float(out.metrics["drift/teacher_ref_loss"]) > 0 and float(out.metrics["drift/teacher_confidence"]) < 0
    assert set(drift) >= {"drift/text_use", "drift/iou_own_caption", "drift/iou_teacher_caption"}
    assert drift["drift/text_use"].isfinite()
    # gradient through the caption path: none reaches SAM2's decoder, some the LLM's LoRA
    assert float(drift["drift/grad_share/sam2"]) == 0.0
    assert 0.0 < float(drift["drift/grad_share/llm"]) <= 1.0
    out.loss.backward()  # the step's own backward still works on the retained graph
    assert any(p.grad is not None for n, p in student.named_parameters() if "lora" in n)
    assert token_f1("the red square", "The red circle.") == pytest.approx(2 / 3)
    assert token_f1("", "") == 1.0 and token_f1("blue", "red") == 0.0


def test_a_pseudo_label_step_records_the_teacher_side_drift():
    """The teacher's confidence (mean token log-prob of its caption, recomputed here from the
    teacher's logits) and its captions' loss under the frozen reference, on a pseudo-label step as
    on a Pseudo-Gumbel one; the segmenter read the teacher's caption, so agreement is 1."""
    from pg_train.model.text.regions import region_cells
    from pg_train.objectives.drift import drift_diagnostics

    student = with_lora_weights(build_model("tiny", seed=0))
    teacher = with_lora_weights(build_model("tiny", seed=1)).eval()
    batch = make_step_batch(student, batch_size=2, seed=3)
    cfg = PseudoGumbelConfig(max_caption_len=8, topk=16)
    out = pseudo_label_step(student, teacher, batch, cfg, SupervisedConfig(), diagnose=True)
    cells, _ = region_cells(batch["region_masks1"], student.grid_size, cfg.region_threshold, rule=cfg.region_rule)
    ids, n = out.caption_ids, out.caption_lengths
    with torch.no_grad():
        logits = forward_for_logits(teacher, batch["pixel_values1"], cells, ids, n).float()
    logp = F.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)
    per_caption = torch.stack([logp[b, : n[b]].mean() for b in range(2)])
    assert float(out.metrics["drift/teacher_confidence"]) == pytest.approx(float(per_caption.mean()), abs=1e-5)
    assert float(out.metrics["drift/teacher_ref_loss"]) > 0
    pg = pseudo_gumbel_step(student, teacher, batch, cfg, diagnose=True)  # the same greedy teacher captions
    for key in ("drift/teacher_confidence", "drift/teacher_ref_loss"):
        assert float(out.metrics[key]) == pytest.approx(float(pg.metrics[key]), abs=1e-6), key
    drift = drift_diagnostics(student, batch, out, cfg, reads="teacher")
    assert float(drift["drift/agreement"]) == 1.0 and drift["drift/text_use"].isfinite()
    assert float(drift["drift/iou_own_caption"]) == pytest.approx(float(drift["drift/iou_teacher_caption"]))


@pytest.mark.slow
def test_grad_share_on_two_processes_is_that_of_the_summed_gradient(tmp_path):
    """2 processes (ZeRO-2) of 2 samples each record the caption-path gradient shares of their
    summed gradient: those of one process training the same 4 samples as one batch."""
    from conftest import accelerate_launch
    from test_train import FAST, metrics

    from pg_train.train import train

    args = [*FAST, "max_steps=1", "save_every=100", "objective.diagnostics_every=1", "model.train_lm_head=true"]
    accelerate_launch("tests/dist/train_probe.py", str(tmp_path / "two"), f"output_dir={tmp_path / 'two_run'}", *args)
    train(load_config([], [*args, "batch_size=4", f"output_dir={tmp_path / 'one_run'}"]))
    two, one = metrics(tmp_path / "two_run")[0], metrics(tmp_path / "one_run")[0]
    shares = sorted(k for k in one if k.startswith("drift/grad_share/"))
    assert "drift/grad_share/lm_head" in shares and 0 < one["drift/grad_share/lm_head"] <= 1
    for key in shares:
        assert two[key] == pytest.approx(one[key], rel=1e-3, abs=1e-6), key


def test_the_default_job_records_drift_diagnostics():
    import yaml

    job = yaml.safe_load((REPO / "pg_train" / "default_job.yaml").read_text())
    assert job["objective"]["diagnostics_every"] >= 1


@pytest.mark.slow
def test_default_job_metrics_hold_the_drift_keys_and_report_draws_them(tmp_path):
    from pg_train.report import figure_axes, plot_report, read_metrics
    from pg_train.train import train

    cfg = load_config(
        [REPO / "pg_train" / "default_job.yaml"],
        [
            f"output_dir={tmp_path}",
            "max_steps=2",
            "eval_every=2",
            "eval_samples=4",
            "objective.diagnostics_every=1",
            "progress=false",
            "tensorboard=false",
            "report=false",
            "data.num_samples=16",
        ],
    )
    train(cfg)
    records = read_metrics(tmp_path)
    pg_step = next(r for r in records if r.get("objective") == "pseudo_label+supervised")
    for key in (
        "agreement",
        "teacher_confidence",
        "teacher_ref_loss",
        "text_use",
        "iou_own_caption",
        "iou_teacher_caption",
        "iou_shuffled_caption",
        "grad_share/lm_head",
    ):
        assert f"drift/{key}" in pg_step, key
    last = records[-1]
    for key in ("eval/cycle_minus_shuffled_gIoU", "eval/caption_token_f1", "eval/caption_exact"):
        assert key in last
    assert figure_axes(plot_report(records))["drift"].lines


# ---- grounding gate ------------------------------------------------------------------------------
def test_grounding_gate_opens_on_the_first_evaluation_that_reaches_the_gap_and_stays_open():
    from pg_train.objectives.mix import labelled_share, stream_weights
    from pg_train.train import GroundingGate

    gate = GroundingGate(0.1)
    assert not gate.open and gate.update({}) is None
    assert gate.update({"eval/cycle_gIoU": 0.50, "eval/shuffled_gIoU": 0.45}) is None and not gate.open
    assert gate.update({"eval/cycle_gIoU": 0.60, "eval/shuffled_gIoU": 0.40}) == pytest.approx(0.2) and gate.open
    assert gate.update({"eval/cycle_gIoU": 0.0, "eval/shuffled_gIoU": 0.5}) is None and gate.open
    assert GroundingGate(None).open
    cfg = load_config([], [*STREAMS, "streams.gate_min_gap=0.1", "eval_every=5"])
    assert stream_weights(cfg, 0, gate_open=False) == (0.0, 1.0) and labelled_share(cfg, 0, gate_open=False) == 1.0
    assert stream_weights(cfg, 0, gate_open=True) == (1.0, 1.0) and labelled_share(cfg, 0, gate_open=True) == 0.5


@pytest.mark.slow
def test_a_closed_gate_trains_the_labelled_stream_only_and_says_so(tmp_path, capsys):
    from test_train import FAST, metrics

    from pg_train.train import train

    cfg = load_config(
        [],
        [
            *FAST,
            f"output_dir={tmp_path}",
            "max_steps=2",
            *STREAMS,
            "streams.gate_min_gap=2.0",
            "eval_every=1",
            "eval_samples=2",
            "streams.labelled.num_samples=8",
            "streams.unlabelled.num_samples=8",
        ],
    )
    train(cfg)
    assert "grounding gate closed" in capsys.readouterr().out
    steps = [r for r in metrics(tmp_path) if r["step"] > 0 and "loss" in r]
    assert [(r["gate_open"], r["labelled_samples"], r["unlabelled_samples"], r["self_weight"]) for r in steps] == [
        (0, 2, 0, 0.0)
    ] * 2
