"""Properties a mutation pass over the objective, the EMA and the training loop found unguarded
(issue 16), each checked against an independent computation: a closed form, hand-computed
values, or the model's own untrimmed forward. Each test is named for the property and fails on
the mutant of scripts/mutation_test.py that breaks it."""

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import accelerate_launch, with_lora_weights
from test_pseudo_gumbel import make_step_batch
from test_train import FAST, metrics

import pg_train.objectives.pseudo_gumbel as pg
from pg_train.config import load_config, objective_for
from pg_train.distributed import unwrap
from pg_train.ema import EMATeacher
from pg_train.model import build_model, get_preset
from pg_train.model.text.templates import TEMPLATE_SETS
from pg_train.objectives.passes import forward_mask_with_text_embeds, mask_loss, resize_target
from pg_train.objectives.pseudo_gumbel import pseudo_gumbel_step
from pg_train.objectives.settings import PseudoGumbelConfig
from pg_train.train import REQUEUE_EXIT_CODE, build_student, train

LN2, LN3 = math.log(2), math.log(3)


# ---- step 6: the loss ---------------------------------------------------------------------------
def two_sample_case() -> tuple[torch.Tensor, torch.Tensor]:
    """Sample 0: probabilities 0.5, 0.75 / 0.25, 0.5 against target 1, 1 / 0, 0. Sample 1:
    probabilities 0.5 everywhere against an empty target."""
    logits = torch.tensor([[[0.0, LN3], [-LN3, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    return logits, target


# By hand, Dice with Sa2VA's +1 smoothing, 1 - (2 sum(p t) + 1) / (sum p + sum t + 1):
#   sample 0: sum(p t) = 0.5 + 0.75 = 1.25, sum p = 2, sum t = 2  ->  1 - 3.5 / 5 = 0.3
#   sample 1: sum(p t) = 0,                 sum p = 2, sum t = 0  ->  1 - 1 / 3   = 2/3
# BCE, the mean of -[t log p + (1 - t) log(1 - p)] over the four pixels:
#   sample 0: (ln 2 + ln 4/3 + ln 4/3 + ln 2) / 4 = (ln 2 + ln 4/3) / 2;  sample 1: ln 2
DICE = (0.3, 2 / 3)
BCE = ((LN2 + math.log(4 / 3)) / 2, LN2)


def test_dice_probabilities_and_bce_equal_the_hand_computed_values():
    logits, target = two_sample_case()
    out = mask_loss(logits, target, bce_weight=2.0, dice_weight=0.5)
    # Dice of the logits themselves would give 1 - (2 ln 3 + 1) / 3 and 2/3; a denominator
    # without the +1, 1 - 3.5 / 4 and 1 (so sample 0 tells a wrong denominator apart).
    assert out["dice"].tolist() == pytest.approx(DICE, abs=1e-6)
    assert out["bce"].tolist() == pytest.approx(BCE, abs=1e-6)


def test_batch_mean_loss_is_the_mean_of_the_per_sample_weighted_terms():
    logits, target = two_sample_case()
    expected = sum(2.0 * b + 0.5 * d for b, d in zip(BCE, DICE)) / 2
    assert float(mask_loss(logits, target, 2.0, 0.5)["loss"]) == pytest.approx(expected, abs=1e-6)
    # a batch of one sample twice has that sample's loss, not twice it
    twice = mask_loss(logits[:1].expand(2, -1, -1), target[:1].expand(2, -1, -1), 2.0, 0.5)["loss"]
    assert float(twice) == pytest.approx(2.0 * BCE[0] + 0.5 * DICE[0], abs=1e-6)


def test_batch_mean_loss_of_the_step_from_its_mask_logits():
    """The step's loss is the batch mean of 2 BCE + 0.5 Dice of its own mask logits against
    the area-downsampled mask 2, written out here with plain torch."""
    student = with_lora_weights(build_model("tiny", seed=0))
    batch = make_step_batch(student, batch_size=2)
    with torch.no_grad():
        out = pseudo_gumbel_step(
            student, copy.deepcopy(student).eval(), batch, PseudoGumbelConfig(max_caption_len=4, topk=8)
        )
    side = out.mask_logits.shape[-1]
    target = F.adaptive_avg_pool2d(batch["masks2"][:, None].float(), side)[:, 0].flatten(1)
    logits = out.mask_logits.float().flatten(1)
    p = torch.sigmoid(logits)
    bce = -(target * F.logsigmoid(logits) + (1 - target) * F.logsigmoid(-logits)).mean(1)
    dice = 1 - (2 * (p * target).sum(1) + 1) / (p.sum(1) + target.sum(1) + 1)
    per_sample = 2.0 * bce + 0.5 * dice
    assert per_sample[0] != pytest.approx(float(per_sample[1]))  # the two samples differ, so sum != mean
    torch.testing.assert_close(out.loss, per_sample.mean(), rtol=1e-5, atol=1e-6)


# ---- step 5: the [SEG] row ------------------------------------------------------------------------
def test_seg_row_is_the_hidden_state_of_the_prompts_seg_token():
    """Pass 2 reads the final hidden state at the [SEG] token's row: compare with the untrimmed
    decoder run on the assembled sequence, the row located by searching the ids for [SEG]."""
    model = with_lora_weights(build_model("tiny", seed=0)).eval()
    batch = make_step_batch(model, batch_size=2)
    T, D = 5, model.preset.language.hidden_size
    caption_embeds = torch.randn(2, T, D, generator=torch.Generator().manual_seed(3))
    lengths = torch.tensor([5, 3])  # one padded caption: the row must not depend on padding
    with torch.no_grad():
        masks, seg_hidden = forward_mask_with_text_embeds(
            model, batch["pixel_values2"], batch["sam_pixel_values2"], caption_embeds, lengths, return_seg_hidden=True
        )
        prefix_ids = torch.tensor(model.prompts.segment_prefix()).expand(2, -1)
        suffix_ids = torch.tensor(model.prompts.segment_suffix()[0]).expand(2, -1)
        ids = torch.cat([prefix_ids, torch.full((2, T), -1), suffix_ids], 1)[0].tolist()
        seg_rows = [i for i, t in enumerate(ids) if t == model.seg_token_id]
        assert len(seg_rows) == 1
        embeds = torch.cat(
            [
                model.embed_with_images(prefix_ids, model.extract_feature(batch["pixel_values2"]), None),
                caption_embeds,
                model.embed_tokens()(suffix_ids),
            ],
            1,
        )
        attention = torch.cat(
            [
                torch.ones_like(prefix_ids),
                (torch.arange(T)[None] < lengths[:, None]).long(),
                torch.ones_like(suffix_ids),
            ],
            1,
        )
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        hidden = model.language_model.model(
            inputs_embeds=embeds, attention_mask=attention, position_ids=positions
        ).last_hidden_state
        expected = hidden[:, seg_rows[0]]
        torch.testing.assert_close(seg_hidden, expected, rtol=1e-5, atol=1e-5)
        for neighbour in (seg_rows[0] - 1, seg_rows[0] + 1):  # the test can tell a row off by one
            assert (hidden[:, neighbour] - expected).abs().max() > 1e-3
        torch.testing.assert_close(
            masks, model.predict_masks(expected, batch["sam_pixel_values2"]), rtol=1e-4, atol=1e-5
        )


@pytest.mark.parametrize("template", sorted(TEMPLATE_SETS))
def test_single_seg_in_the_segmentation_prompt_and_it_is_the_answers(template):
    """SPEC §3.7: the seed's suffix had two [SEG]; ours has one, in the answer, and pass 2's
    index points at it."""
    model = build_model("tiny", seed=0, template=template)
    seg = model.seg_token_id
    suffix, seg_index = model.prompts.segment_suffix()
    assert model.prompts.segment_prefix().count(seg) == 0
    assert suffix.count(seg) == 1 and suffix[seg_index] == seg
    answer = model.tokenizer.decode(suffix[:seg_index])
    assert "<|assistant|>" in answer, answer  # the [SEG] is in the assistant's answer, not in the request


# ---- step 3: pass 1 reads the masked caption --------------------------------------------------
def test_pass1_uses_masked_caption(monkeypatch):
    student = with_lora_weights(build_model("tiny", seed=0))
    teacher = copy.deepcopy(student).eval()
    batch = make_step_batch(student, batch_size=2)
    fed = []
    real = pg.forward_for_logits

    def spy(student, pixel_values, region_cells, caption_ids, *args, **kwargs):
        fed.append(caption_ids.clone())
        return real(student, pixel_values, region_cells, caption_ids, *args, **kwargs)

    monkeypatch.setattr(pg, "forward_for_logits", spy)
    cfg = PseudoGumbelConfig(max_caption_len=8, min_caption_len=8, topk=16, mask_ratio=0.5)
    with torch.no_grad():
        out = pseudo_gumbel_step(student, teacher, batch, cfg)
    assert len(fed) == 1
    replaced = out.masked_ids != out.caption_ids
    assert replaced.any() and torch.equal(
        replaced, out.replaced & replaced
    )  # masking changed some tokens, only where it says
    assert torch.equal(fed[0], out.masked_ids)  # pass 1 saw them, not the teacher's caption


# ---- the EMA follows the optimizer step ---------------------------------------------------------
def test_ema_after_optimizer_step_in_the_training_loop(tmp_path):
    """One optimizer step at decay 0.5: the shadow is (w0 + w1) / 2 with w0 the initial and w1
    the stepped weights. Updated before the step it would still be w0."""
    cfg = load_config([], [*FAST, f"output_dir={tmp_path}", "max_steps=1", "ema.decay=0.5", "save_every=100"])
    initial = {n: p.detach().clone() for n, p in build_student(cfg).named_parameters() if p.requires_grad}
    result = train(cfg)
    stepped = dict(unwrap(result.model).named_parameters())
    moved = 0
    for name, shadow in zip(result.ema.names, result.ema.shadow):
        w0, w1 = initial[name].float(), stepped[name].detach().float()
        torch.testing.assert_close(shadow, 0.5 * w0 + 0.5 * w1, rtol=0, atol=1e-7, msg=name)
        moved += int(not torch.equal(w0, w1))
    assert moved > 0  # the step changed weights, so before and after are told apart


@pytest.mark.parametrize("sync, skipped, updates", [(True, False, True), (False, False, False), (True, True, False)])
def test_ema_after_optimizer_step_only_when_the_optimizer_stepped(sync, skipped, updates):
    """update_if_stepped moves the shadow only at an accumulation boundary whose step was not
    skipped (a skipped fp16 step leaves the weights as they were)."""
    student = build_model("tiny", seed=0)
    ema = EMATeacher(student, decay=0.75)
    before = [s.clone() for s in ema.shadow]
    with torch.no_grad():
        for p in student.parameters():
            if p.requires_grad:
                p.add_(1.0)
    assert (
        ema.update_if_stepped(student, SimpleNamespace(sync_gradients=sync, optimizer_step_was_skipped=skipped))
        is updates
    )
    params = dict(student.named_parameters())
    for name, old, new in zip(ema.names, before, ema.shadow):
        expected = 0.75 * old + 0.25 * params[name].detach() if updates else old
        torch.testing.assert_close(new, expected, rtol=0, atol=1e-6, msg=name)
    assert ema.num_updates == int(updates)


# ---- resume restores the random streams -------------------------------------------------------
RANDOM = ["model.lora_dropout=0.1", "objective.do_sample=true", "objective.temperature=1.5"]


def test_resume_restores_rng_with_dropout_and_a_sampling_teacher(tmp_path):
    """LoRA dropout and teacher sampling draw from the global RNG every step; stopped after step 3
    (mid-epoch: 4 batches per epoch) and resumed, the run must equal an uninterrupted one bitwise,
    across the epoch boundary too. A resume that re-seeded instead of restoring, or a data
    iterator that drew its seed from the global RNG, shifts the streams from step 4 on."""
    args = [*FAST, *RANDOM, "data.num_samples=8", "max_steps=6", "save_every=100"]
    full = train(load_config([], [*args, f"output_dir={tmp_path / 'full'}"]))
    cut = train(load_config([], [*args, f"output_dir={tmp_path / 'cut'}", "stop_at_step=3"]))
    assert cut.exit_code == REQUEUE_EXIT_CODE
    resumed = train(load_config([], [*args, f"output_dir={tmp_path / 'cut'}", "resume=auto"]))
    assert unwrap(full.model).language_model.model.layers[0].self_attn.q_proj.lora_dropout.default.p == 0.1
    losses = [r["loss"] for r in metrics(tmp_path / "full")]
    assert len(set(losses)) == len(losses) == 6
    assert [r["loss"] for r in metrics(tmp_path / "cut")] == losses
    assert [r["caption_len_mean"] for r in metrics(tmp_path / "cut")] == [
        r["caption_len_mean"] for r in metrics(tmp_path / "full")
    ]
    ours, theirs = dict(unwrap(resumed.model).named_parameters()), dict(unwrap(full.model).named_parameters())
    assert all(torch.equal(ours[n], theirs[n]) for n in resumed.ema.names)
    assert all(torch.equal(a, b) for a, b in zip(resumed.ema.shadow, full.ema.shadow))
    assert resumed.loader.epoch == full.loader.epoch == 1


@pytest.mark.slow
def test_resume_restores_rng_per_rank_under_zero2_with_dropout_and_sampling(tmp_path):
    """The issue's reproduction: 2-process ZeRO-2, LoRA dropout 0.1 and a sampling teacher,
    killed after step 4 and resumed; losses, weights and EMA equal the uninterrupted run's."""
    args = [*FAST, *RANDOM, "max_steps=7", "save_every=100"]
    accelerate_launch("tests/dist/train_probe.py", str(tmp_path / "full"), f"output_dir={tmp_path / 'full_run'}", *args)
    accelerate_launch(
        "tests/dist/train_probe.py",
        str(tmp_path / "cut"),
        f"output_dir={tmp_path / 'cut_run'}",
        *args,
        "stop_at_step=4",
    )
    accelerate_launch(
        "tests/dist/train_probe.py",
        str(tmp_path / "resumed"),
        f"output_dir={tmp_path / 'cut_run'}",
        *args,
        "resume=auto",
    )
    assert [r["loss"] for r in metrics(tmp_path / "cut_run")] == [r["loss"] for r in metrics(tmp_path / "full_run")]
    for rank in (0, 1):
        full = json.loads((tmp_path / f"full.rank{rank}.json").read_text())
        resumed = json.loads((tmp_path / f"resumed.rank{rank}.json").read_text())
        assert resumed["trainable_bytes_hash"] == full["trainable_bytes_hash"]
        assert resumed["ema_checksum"] == full["ema_checksum"]


# ---- real-scale defaults ------------------------------------------------------------------------
def test_preset_defaults_for_topk_and_caption_length_follow_the_preset_unless_set(tmp_path):
    def objective(*overrides, files=()):
        o = load_config(list(files), list(overrides)).objective
        return o.topk, o.max_caption_len

    assert objective("model.preset=sa2va-4b") == (128, 64)  # SPEC §3
    assert (
        objective() == objective("model.preset=tiny") == objective("model.preset=tiny-112") == (64, 24)
    )  # the default job as before
    assert objective("model.preset=sa2va-4b", "objective.topk=32") == (32, 64)
    assert objective("objective.max_caption_len=16", "model.preset=sa2va-4b") == (128, 16)  # order does not matter
    (tmp_path / "a.yaml").write_text("model:\n  preset: sa2va-4b\nobjective:\n  topk: 200\n")
    assert objective(files=[tmp_path / "a.yaml"]) == (200, 64)
    assert objective("model.preset=tiny", files=[tmp_path / "a.yaml"]) == (200, 24)


def test_preset_defaults_follow_a_checkpoint_and_reach_evaluate_and_memcheck(tmp_path, monkeypatch):
    from pg_train.memcheck.args import parse_args
    from pg_train.memcheck.cli import deployment_from
    from pg_train.model import save_pretrained

    save_pretrained(build_model("tiny", seed=0), tmp_path / "tiny")
    assert objective_for(get_preset("sa2va-4b")) == PseudoGumbelConfig(topk=128, max_caption_len=64)
    # a checkpoint's preset wins over model.preset, which its config.json overrides anyway
    cfg = load_config([], [f"model.checkpoint={tmp_path / 'tiny'}", "model.preset=sa2va-4b"])
    assert (cfg.objective.topk, cfg.objective.max_caption_len) == (64, 24)
    # a pg_train checkpoint written before presets carried the defaults: its registry preset's
    config = json.loads((tmp_path / "tiny" / "config.json").read_text())
    del config["pg_train"]["preset"]["objective"]
    (tmp_path / "tiny" / "config.json").write_text(json.dumps(config))
    cfg = load_config([], [f"model.checkpoint={tmp_path / 'tiny'}", "model.preset=sa2va-4b"])
    assert (cfg.objective.topk, cfg.objective.max_caption_len) == (64, 24)

    for argv, cfg, expected in (
        ([], None, (128, 64)),
        (["--preset", "tiny"], None, (64, 24)),
        ([], load_config([], ["model.preset=sa2va-4b"]), (128, 64)),
    ):
        d = deployment_from(parse_args(argv), cfg)
        assert (d.topk, d.caption_len) == expected, argv

    import pg_train.evaluate as evaluate

    seen = {}

    class Stop(Exception):
        pass

    def capture(model, batches, objective, **kwargs):
        seen["objective"] = objective
        raise Stop

    monkeypatch.setattr(
        evaluate, "load_checkpoint", lambda path, device: (SimpleNamespace(preset=get_preset("sa2va-4b")), None)
    )
    monkeypatch.setattr(evaluate, "batches_of", lambda *args, **kwargs: [])
    monkeypatch.setattr(evaluate, "evaluate", capture)
    with pytest.raises(Stop):
        evaluate.main(["--checkpoint", str(tmp_path), "--output", str(tmp_path / "eval")])
    assert (seen["objective"].topk, seen["objective"].max_caption_len) == (128, 64)


# ---- further properties the mutation run found unguarded ----------------------------------------
def test_target_is_the_area_fraction_of_each_decoder_pixel():
    masks = torch.zeros(1, 128, 128)
    masks[0, 1:3, 1:3] = 1  # 4 of the 16 pixels of decoder cell (0, 0), none of its corner pixel
    masks[0, 64:] = 1
    small = resize_target(masks, (32, 32))
    assert float(small[0, 0, 0]) == 0.25
    assert small[0, 16:].eq(1).all() and small[0, 1:16].eq(0).all() and small[0, 0, 1:].eq(0).all()


def test_mask_iou_of_an_empty_prediction_of_an_empty_target_is_one():
    from pg_train.objectives.passes import mask_iou

    assert mask_iou(torch.full((2, 4, 4), -1.0), torch.zeros(2, 4, 4)).tolist() == [1.0, 1.0]


def test_teacher_caption_ends_at_eos_once_the_minimum_length_is_reached():
    from pg_train.model.text.regions import region_cells
    from pg_train.objectives.teacher import generate_pseudo_tokens_with_ema

    model = build_model("tiny", seed=0).eval()
    eos = torch.tensor([model.eos_token_id])
    model.language_model.lm_head.register_forward_hook(lambda module, inputs, logits: logits.index_fill(-1, eos, 1e4))
    batch = make_step_batch(model, batch_size=2)
    cells, _ = region_cells(batch["region_masks1"], model.grid_size)
    captions, lengths = generate_pseudo_tokens_with_ema(
        model, batch["pixel_values1"], cells, PseudoGumbelConfig(max_caption_len=8, min_caption_len=2)
    )
    assert lengths.tolist() == [2, 2] and captions.shape[1] == 2


def test_gumbel_noise_does_not_reuse_the_masking_streams_numbers(monkeypatch):
    """Masking (stream 0) and Gumbel noise (stream 1) are independent per sample: were they one
    stream, whether token t is replaced would be tied to the noise of the same numbers."""
    from pg_train.objectives.pseudo_gumbel import sample_generators

    student = build_model("tiny", seed=0)
    batch = make_step_batch(student, batch_size=2)
    seen = {}
    real = pg.topk_gumbel_softmax

    def spy(caption_logits, weight, special, uniform, *args, **kwargs):
        seen["uniform"] = uniform.clone()
        return real(caption_logits, weight, special, uniform, *args, **kwargs)

    monkeypatch.setattr(pg, "topk_gumbel_softmax", spy)
    with torch.no_grad():
        out = pseudo_gumbel_step(
            student, student, batch, PseudoGumbelConfig(max_caption_len=4, min_caption_len=4, topk=8)
        )
    T = out.caption_ids.shape[1]
    masking = torch.stack([torch.rand(T, 2, generator=g) for g in sample_generators(batch["sample_seeds"], 0)])
    assert not torch.isin(seen["uniform"].flatten(), masking.flatten()).any()


def test_lr_schedule_warms_up_linearly_then_decays_by_cosine_to_its_floor():
    from pg_train.train import lr_at

    cfg = load_config([], ["optim.lr=1.0", "optim.warmup_steps=4", "optim.min_lr_ratio=0.1", "max_steps=14"])
    assert [lr_at(step, cfg) for step in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    # after warm-up: 0.1 + 0.9 * (1 + cos(pi * progress)) / 2, progress (step - 4) / 10
    assert [lr_at(step, cfg) for step in (4, 9, 14)] == pytest.approx([1.0, 0.55, 0.1])


def test_full_placement_teacher_carries_the_shadow_after_every_update():
    student = build_model("tiny", seed=0)
    ema = EMATeacher(student, decay=0.5, placement="full:cpu")
    for _ in range(2):
        with torch.no_grad():
            for p in student.parameters():
                if p.requires_grad:
                    p.add_(1.0)
        ema.update(student)
        with ema.as_teacher(student) as teacher:
            held = dict(teacher.named_parameters())
            assert all(torch.equal(held[name], shadow) for name, shadow in zip(ema.names, ema.shadow))


def test_init_from_is_strict_about_tensor_names(tmp_path):
    """model.init_from refuses a checkpoint that lacks a tensor of the model (a non-strict load
    would start the stage with that tensor at its random initial value)."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in build_student(load_config([], [])).state_dict().items()}
    state.pop("text_hidden_fcs.2.bias")
    (tmp_path / "step").mkdir()
    save_file(state, str(tmp_path / "step" / "model.safetensors"))
    with pytest.raises(Exception, match=r"text_hidden_fcs\.2\.bias"):
        build_student(load_config([], [f"model.init_from={tmp_path / 'step'}"]))
