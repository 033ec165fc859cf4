"""Mutation testing of the objective, the EMA and the training window: can the tests fail?

    .venv/bin/python scripts/mutation_test.py                 # every mutant, fast test files, -x
    .venv/bin/python scripts/mutation_test.py --only loss-sum-over-batch --only dice-on-logits
    .venv/bin/python scripts/mutation_test.py --list          # names, files and test files only
    .venv/bin/python scripts/mutation_test.py --tree HEAD     # mutate a commit (any git revision), not the working tree

A passing suite is evidence only if it can fail. Each mutant below is one small, plausible bug
(a snippet of a file and its replacement) in the objectives (pg_train/objectives/: pseudo_gumbel.py, the
shared passes.py, teacher.py), pg_train/ema.py or the
training window (pg_train/window.py) and loop (pg_train/train.py) (plus the [SEG] suffix of templates.py and the data
iterator's generator, the two places those properties live). For each mutant the repository is
copied to a temporary directory (the files `git ls-files` lists, tracked and untracked-but-not-
ignored, with their working-tree content; or `git archive REV` with --tree REV), the mutant is
applied to the copy only, and its test files run there with this repository's .venv python:
`python -m pytest -q -x -p no:cacheprovider -m "not slow"` from inside the copy, with
PYTHONPATH=<copy>, so the copy's pg_train is imported and not the editable install of the
checkout. The checkout is never written to (others run tests in it). Before the mutants: the
copy's `import pg_train` must resolve inside the copy, the unmutated copy must pass every test
file used (else a kill would mean nothing), and a sanity mutant must be killed.

A mutant is killed when pytest fails (exit 1, or 2 for an error while collecting), survived when
it passes (exit 0). The result (per mutant: status, seconds, the first failing test; the kill
rate; git commit, date, versions, command) goes to docs/measurements/mutation_test.json, or --json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = REPO / ".venv" / "bin" / "python"

# Test files per mutated file, fastest first (with -x a kill usually comes from the first).
TESTS = {
    # test_ema.py: the EMA teacher's tests run step 1 (generation) too
    "pg_train/objectives/pseudo_gumbel.py": (
        "tests/test_properties.py",
        "tests/test_pseudo_gumbel.py",
        "tests/test_ema.py",
    ),
    "pg_train/objectives/passes.py": ("tests/test_properties.py", "tests/test_pseudo_gumbel.py", "tests/test_ema.py"),
    "pg_train/objectives/teacher.py": ("tests/test_properties.py", "tests/test_pseudo_gumbel.py", "tests/test_ema.py"),
    "pg_train/model/text/templates.py": ("tests/test_properties.py", "tests/test_pseudo_gumbel.py"),
    "pg_train/ema.py": ("tests/test_properties.py", "tests/test_ema.py"),
    "pg_train/train.py": ("tests/test_properties.py", "tests/test_train.py"),
    "pg_train/window.py": ("tests/test_properties.py", "tests/test_train.py", "tests/test_audits.py"),
    "pg_train/builders.py": ("tests/test_properties.py", "tests/test_train.py"),
    "pg_train/data/loader.py": ("tests/test_properties.py", "tests/test_data.py"),
}


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    original: str | tuple[str, ...]  # alternatives: the first one present in the file is replaced
    replacement: str | tuple[str, ...]  # one per alternative
    tests: tuple[str, ...] = ()  # default: TESTS[file]
    slow: bool = False  # run the selected tests without -m "not slow"
    sanity: bool = False  # must be killed, or the copy is not what the tests import

    def alternatives(self) -> list[tuple[str, str]]:
        originals = (self.original,) if isinstance(self.original, str) else self.original
        replacements = (self.replacement,) if isinstance(self.replacement, str) else self.replacement
        return list(zip(originals, replacements, strict=True))

    def test_files(self) -> tuple[str, ...]:
        return self.tests or TESTS[self.file]


PG, PASSES, TEACHER = (
    "pg_train/objectives/pseudo_gumbel.py",
    "pg_train/objectives/passes.py",
    "pg_train/objectives/teacher.py",
)
EMA, TRAIN, WINDOW = "pg_train/ema.py", "pg_train/train.py", "pg_train/window.py"
# issue 27's test files
RL, RV, JS, PIN = (
    "tests/test_run_lock.py",
    "tests/test_resume_validation.py",
    "tests/test_job_signals.py",
    "tests/test_pinning.py",
)

MUTANTS = [
    Mutant(
        "sanity-mask-loss-raises",
        PASSES,
        "    loss = (bce_weight * bce + dice_weight * dice).mean()\n",
        "    raise RuntimeError('mutation_test sanity mutant')\n",
        sanity=True,
    ),
    # ---- step 6: the loss
    Mutant("dice-on-logits", PASSES, "    prob = logits.sigmoid()\n", "    prob = logits\n"),
    Mutant(
        "dice-denominator-without-smoothing",
        PASSES,
        "/ (prob.sum(1) + target.sum(1) + 1)",
        "/ (prob.sum(1) + target.sum(1))",
    ),
    Mutant(
        "dice-denominator-squared-probabilities",
        PASSES,
        "/ (prob.sum(1) + target.sum(1) + 1)",
        "/ ((prob ** 2).sum(1) + target.sum(1) + 1)",
    ),
    Mutant(
        "loss-sum-over-batch",
        PASSES,
        "    loss = (bce_weight * bce + dice_weight * dice).mean()\n",
        "    loss = (bce_weight * bce + dice_weight * dice).sum()\n",
    ),
    Mutant(
        "loss-weights-swapped",
        PASSES,
        "    loss = (bce_weight * bce + dice_weight * dice).mean()\n",
        "    loss = (dice_weight * bce + bce_weight * dice).mean()\n",
    ),
    Mutant(
        "target-nearest-instead-of-area",
        PASSES,
        "    return F.adaptive_avg_pool2d(masks.float().clamp(0, 1)[:, None], size)[:, 0]\n",
        "    return F.interpolate(masks.float().clamp(0, 1)[:, None], size=size, mode='nearest')[:, 0]\n",
    ),
    Mutant(
        "iou-empty-vs-empty-scores-zero",
        PASSES,
        "    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))\n",
        "    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(union))\n",
    ),
    # ---- step 5: the [SEG] row
    Mutant(
        "seg-row-one-early", PASSES, ("caption_mask, suffix, seg_index\n",), ("caption_mask, suffix, seg_index - 1\n",)
    ),
    Mutant(
        "seg-row-one-late", PASSES, ("caption_mask, suffix, seg_index\n",), ("caption_mask, suffix, seg_index + 1\n",)
    ),
    Mutant(
        "two-seg-suffix-reads-the-first",
        "pg_train/model/text/templates.py",
        "        ids = self._segment_after_caption + [self.seg] + self._segment_after_seg\n        return ids, len(self._segment_after_caption)\n",
        "        ids = [self.seg] + self._segment_after_caption + [self.seg] + self._segment_after_seg\n        return ids, 0\n",
    ),
    Mutant(
        "pass2-padded-caption-slots-attended",
        PASSES,
        "    caption_mask = (torch.arange(T, device=device)[None] < caption_lengths[:, None]).long()\n    return prefix",
        "    caption_mask = torch.ones(B, T, dtype=torch.long, device=device)\n    return prefix",
    ),  # pass 2's caption mask
    # ---- step 3: pass 1
    Mutant(
        "pass1-unmasked-caption",
        PG,
        'student, batch["pixel_values1"], cells, masked_ids, caption_lengths, views1',
        'student, batch["pixel_values1"], cells, caption_ids, caption_lengths, views1',
    ),
    Mutant("pass1-logit-rows-one-late", PASSES, "first_row=P - 1,\n", "first_row=P,\n"),
    # ---- step 2: masking
    Mutant(
        "masking-ratio-inverted",
        PG,
        "    replaced = (draws[..., 0] < mask_ratio) & real\n",
        "    replaced = (draws[..., 0] >= mask_ratio) & real\n",
    ),
    Mutant(
        "masking-touches-padding",
        PG,
        "    replaced = (draws[..., 0] < mask_ratio) & real\n",
        "    replaced = draws[..., 0] < mask_ratio\n",
    ),
    Mutant(
        "masking-draws-special-ids",
        PG,
        "    ordinary = (~special).nonzero().flatten()\n",
        "    ordinary = torch.arange(special.numel())\n",
    ),
    Mutant(
        "masking-and-gumbel-share-a-stream",
        PG,
        "            sample_generators(seeds, 1), caption_logits.shape[1]",
        "            sample_generators(seeds, 0), caption_logits.shape[1]",
    ),
    Mutant("sample-seeds-ignored", PG, '    seeds = batch.get("sample_seeds")\n', "    seeds = None\n"),
    # ---- step 4: Gumbel
    Mutant(
        "gumbel-special-ids-allowed",
        PG,
        '    logits = caption_logits.masked_fill(special.to(caption_logits.device), float("-inf"))\n',
        "    logits = caption_logits\n",
    ),
    Mutant(
        "gumbel-noise-subtracted",
        PG,
        "F.softmax((top_values.float() + gumbel) / tau, dim=-1)",
        "F.softmax((top_values.float() - gumbel) / tau, dim=-1)",
    ),
    Mutant(
        "gumbel-tau-multiplies",
        PG,
        "F.softmax((top_values.float() + gumbel) / tau, dim=-1)",
        "F.softmax((top_values.float() + gumbel) * tau, dim=-1)",
    ),
    Mutant(
        "straight-through-embedding-grad-to-top1",
        PG,
        "index_add_(0, hard_ids, grad_out.to(weight.dtype))",
        "index_add_(0, topk_ids[:, 0], grad_out.to(weight.dtype))",
    ),
    Mutant(
        "straight-through-soft-grad-sign",
        PG,
        "                    torch.bmm(gathered, grad_out",
        "                    -torch.bmm(gathered, grad_out",
    ),
    # ---- step 1: the teacher
    Mutant(
        "teacher-generates-in-train-mode",
        TEACHER,
        # the generation's `with` (teacher_confidence opens the same one; its next line differs)
        "    with teacher_model(teacher, student) as model, _eval_mode(unwrap(model)), compute_autocast(unwrap(model)):\n"
        "        model = unwrap(model)  # computes in the student's dtype (pg_train.precision)\n",
        "    with teacher_model(teacher, student) as model, compute_autocast(unwrap(model)):\n"
        "        model = unwrap(model)  # computes in the student's dtype (pg_train.precision)\n",
        tests=("tests/test_ema.py::test_teacher_generates_without_dropout_and_restores_train_mode",),
    ),
    Mutant(
        "teacher-cannot-end-with-eos",
        TEACHER,
        "        suppress[model.eos_token_id] = False  # eos is how a caption ends\n",
        "",
    ),
    # ---- the EMA
    Mutant(
        "ema-lerp-weight-is-decay",
        EMA,
        "weights = [1.0 - self._decay_since(self.updated_at[i], n) for i in shard]",
        "weights = [self._decay_since(self.updated_at[i], n) for i in shard]",
    ),
    Mutant(
        "ema-warmup-off-by-one",
        EMA,
        "return min(self.decay, (1 + n) / (10 + n))",
        "return min(self.decay, (2 + n) / (10 + n))",
    ),
    Mutant(
        "ema-ignores-skipped-optimizer-step",
        EMA,
        "if not accelerator.sync_gradients or accelerator.optimizer_step_was_skipped:",
        "if not accelerator.sync_gradients:",
    ),
    Mutant(
        "ema-updates-every-micro-batch",
        EMA,
        "if not accelerator.sync_gradients or accelerator.optimizer_step_was_skipped:",
        "if accelerator.optimizer_step_was_skipped:",
    ),
    Mutant(
        "ema-shadow-in-model-dtype",
        EMA,
        "self._new_buffer(p, shadow_device, torch.float32, pin)",
        "self._new_buffer(p, shadow_device, p.dtype, pin)",
    ),
    Mutant(
        "ema-full-teacher-refreshed-once",
        EMA,
        "if self._teacher_synced_at != self.num_updates:",
        "if self._teacher_synced_at < 0:",
    ),
    Mutant(
        "ema-swap-not-restored",
        EMA,
        "                host_copy_(targets, backup, self._host_pool)\n",
        "                pass\n",
    ),
    Mutant("ema-load-keeps-update-count", EMA, '        self.num_updates = state["num_updates"]\n', ""),
    Mutant(
        "ema-stages-decay-not-compounded",
        EMA,
        "return math.prod(self.step_decay(m) for m in range(last + 1, n + 1))",
        "return self.step_decay(n)",
        tests=("tests/test_ema_stages.py",),
    ),
    Mutant(
        "ema-stages-resume-forgets-last-updates",
        EMA,
        'written = state.get("updated_at") or dict.fromkeys(self.names, self.num_updates - 1)',
        "written = dict.fromkeys(self.names, self.num_updates - 1)",
        tests=("tests/test_ema_stages.py",),
    ),
    Mutant(
        "ema-swap-backup-never-recopied",
        EMA,
        "stale = [i for i, p in enumerate(params) if self._staged[i] != self._student_key(p)]",
        "stale = []",
        tests=("tests/test_ema_stages.py",),
    ),
    Mutant(
        "ema-swap-trusts-versions-alone",
        EMA,
        "        return (self.num_updates, p.data_ptr(), p._version)\n",
        "        return (p.data_ptr(), p._version)\n",
        tests=("tests/test_ema_stages.py",),
    ),
    Mutant(
        "ema-mirror-not-refreshed-by-update",
        EMA,
        "                flat_m[i][start:end].copy_(s)\n",
        "                pass\n",
        tests=("tests/test_ema_stages.py",),
    ),
    # ---- the training window
    Mutant(
        "ema-before-optimizer-step",
        WINDOW,
        "                    optimizer.step()\n            optimizer.zero_grad(set_to_none=True)\n"
        "    stepped = finite_out is not None  # a window with no finite micro-batch makes no update\n"
        '    if stepped and ema is not None:\n        with observe("EMA update"):\n'
        "            ema.update_if_stepped(model, accelerator)\n",
        "                    ema.update_if_stepped(model, accelerator)\n                    optimizer.step()\n"
        "            optimizer.zero_grad(set_to_none=True)\n"
        "    stepped = finite_out is not None  # a window with no finite micro-batch makes no update\n",
    ),
    Mutant(
        "ema-updates-without-a-step",
        WINDOW,
        "    if stepped and ema is not None:\n",
        "    if ema is not None:\n",
    ),
    Mutant(
        "init-from-not-strict",
        "pg_train/checkpoint_files.py",  # load_training_weights (model.init_from), from builders.py
        "        load_state_dict_checked(model, state, where, allow_nonfinite=allow_nonfinite, exact_dtype=exact)\n",
        "        model.load_state_dict(state, strict=False)\n",
        tests=("tests/test_checkpoint_hardening.py::test_init_from_no_partial_load",),
    ),
    Mutant(
        "ema-distance-cached-across-student-changes",
        "pg_train/ema.py",  # the log's distance, fused into the cpu placement's update
        "        return (self.num_updates, tuple(p._version for p in params))\n",
        "        return (self.num_updates,)\n",
        tests=("tests/test_ema.py::test_cpu_placement_distance_fused_into_the_update_is_the_distance_and_never_stale",),
    ),
    Mutant(
        "memcheck-trained-vit-not-predicted",
        "pg_train/memcheck/predict.py",
        "        return vision_tower_saved(self.module, B * self.views, self.e)\n",
        "        return 0\n",
        tests=("tests/test_memcheck.py::test_tower_activations_are_predicted_only_when_the_towers_train",),
    ),
    Mutant(
        "resume-reseeds-instead-of-restoring",
        TRAIN,
        "            set_rng_state(saved_rng)\n",
        "            from accelerate.utils import set_seed as reseed\n            reseed(cfg.seed)\n",
    ),
    Mutant(
        "resume-skips-data-position", TRAIN, '        self.loader.load_state_dict(state["data"])\n', "        pass\n"
    ),
    Mutant(
        "resume-drops-its-checkpoint-step-metrics",
        TRAIN,
        'json.loads(line)["step"] <= state.step]',
        'json.loads(line)["step"] < state.step]',
    ),
    Mutant(
        "warmup-lr-starts-at-zero",
        TRAIN,
        "        return peak * (step + 1) / o.warmup_steps\n",
        "        return peak * step / o.warmup_steps\n",
    ),
    Mutant(
        "cosine-decays-to-zero",
        TRAIN,
        "peak * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5",
        "peak * (0.0 + (1 - o.min_lr_ratio) * 0.5",
    ),
    Mutant(
        "stop-without-checkpoint",
        TRAIN,
        "if state.step % cfg.save_every == 0 or state.step == cfg.max_steps or stop_now:",
        "if state.step % cfg.save_every == 0 or state.step == cfg.max_steps:",
    ),
    # ("min" instead of "max" is no bug: Accelerate's reduce sums for every reduction but "max")
    Mutant(
        "nonfinite-dropped-only-when-every-rank-agrees",
        WINDOW,
        'if accelerator.reduce(bad, "max").item() > 0:',
        'if accelerator.reduce(bad, "mean").item() >= 1:',
        tests=("tests/test_train.py::test_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank_under_zero2",),
        slow=True,
    ),
    Mutant(
        "data-iterator-seeded-from-global-rng",
        "pg_train/data/loader.py",
        " generator=self.iterator_generator(self.epoch),",
        "",
    ),
    # ---- issue 27: the job's own state, its own processes, nothing lost
    Mutant(
        "lock-create-overwrites",
        "pg_train/run_lock.py",
        "os.O_CREAT | os.O_EXCL | os.O_WRONLY",
        "os.O_CREAT | os.O_TRUNC | os.O_WRONLY",
        tests=(f"{RL}::test_second_acquire_is_refused_naming_the_owner_and_release_frees_it",),
    ),
    Mutant(
        "stale-lock-never-recovered",
        "pg_train/run_lock.py",
        'return f"its owner ({_describe(holder)}) is no longer running"',
        "return None",
        tests=(f"{RL}::test_stale_lock_of_a_dead_owner_is_taken_over",),
    ),
    Mutant(
        "stale-lock-by-pid-alone",
        "pg_train/run_lock.py",
        "is_running(pid, start if isinstance(start, int) else None)",
        "is_running(pid, None)",
        tests=(f"{RL}::test_a_reused_pid_does_not_keep_a_lock_alive",),
    ),
    Mutant(
        "lock-kept-after-an-error",
        TRAIN,
        "        if run.lock is not None:\n            run.lock.release()\n",
        "        pass\n",
        tests=(f"{RL}::test_lock_is_released_when_the_run_fails",),
    ),
    Mutant(
        "optimizer-state-shapes-unchecked",
        "pg_train/checkpoint_check.py",
        "    check_optimizer_state(checkpoint, model, optimizer, rank, world_size)\n",
        "",
        tests=(f"{RV}::test_tampered_optimizer_state_is_refused_named_and_nothing_loads[moment_wrong_shape]",),
    ),
    Mutant(
        "optimizer-moments-finiteness-unchecked",
        "pg_train/checkpoint_check.py",
        '"custom_checkpoint_0.pkl"}',
        '"custom_checkpoint_0.pkl", "optimizer.bin"}',
        tests=(f"{RV}::test_tampered_optimizer_state_is_refused_named_and_nothing_loads[moment_nan]",),
    ),
    Mutant(
        "rng-state-not-validated",
        "pg_train/checkpoint_check.py",
        "        check_rng_state(rng, _load(rng), set_rng_state, rng_state)\n",
        "        pass\n",
        tests=(f"{RV}::test_every_file_resume_reads_is_validated_first[rng_state_rank0.pt]",),
    ),
    Mutant(
        "data-position-unchecked",
        "pg_train/data/loader.py",
        '        if wrong:\n            raise ValueError(f"data state:',
        '        if False:\n            raise ValueError(f"data state:',
        tests=(f"{RV}::test_data_position_from_another_seed_is_refused",),
    ),
    Mutant(
        "resume-auto-no-fallback",
        TRAIN,
        "        skipped.append(reason)\n",
        "        raise CheckpointError(reason)\n",
        tests=(f"{RV}::test_resume_auto_falls_back_to_the_newest_checkpoint_that_validates",),
    ),
    Mutant(
        "checkpoint-written-from-nonfinite-state",
        TRAIN,
        "        refuse_nonfinite_state(run, state)\n",
        "",
        tests=(f"{RV}::test_nonfinite_state_is_never_checkpointed_and_the_last_good_one_survives[weights]",),
    ),
    Mutant(
        "presave-check-skips-optimizer-moments",
        "pg_train/checkpoint_check.py",
        '            found += [f"optimizer state: {r}" for r in nonfinite_report(dict(tensors_in(list(state.values()))))]\n',
        "            pass\n",
        tests=(f"{RV}::test_nonfinite_state_is_never_checkpointed_and_the_last_good_one_survives[exp_avg_sq]",),
    ),
    Mutant(
        "presave-check-skips-fp32-master-copies",
        "pg_train/checkpoint_check.py",
        '            found += [f"fp32 master copy: {r}" for r in nonfinite_report(dict(tensors_in(list(fp32))))]\n',
        "            pass\n",
        tests=(f"{RV}::test_fp32_master_partitions_are_checked_before_a_save",),
    ),
    Mutant(
        "finiteness-checked-before-the-cast",
        "pg_train/model/io/state_check.py",
        "nonfinite_report({n: as_loaded(t, expected[n].dtype)})",
        "nonfinite_report({n: t})",
        tests=(f"{RV}::test_float64_beyond_float32_range_is_refused_after_the_cast",),
    ),
    Mutant(
        "training-checkpoint-dtype-kind-only",
        "pg_train/checkpointing.py",
        "check_safetensors_file(single, expected, allow_nonfinite=allow_nonfinite, exact_dtype=True)",
        "check_safetensors_file(single, expected, allow_nonfinite=allow_nonfinite, exact_dtype=False)",
        tests=(f"{RV}::test_training_checkpoint_weight_in_another_dtype_is_refused_on_resume",),
    ),
    Mutant(
        "released-dtype-not-checked-against-config",
        "pg_train/model/io/checkpoint.py",
        '    check_declared_dtypes(stored, config.get("torch_dtype"), directory)\n',
        "",
        tests=(f"{RV}::test_released_checkpoint_dtypes_follow_config_torch_dtype",),
    ),
    Mutant(
        "job-signal-by-pid-alone",
        "pg_train/job.py",
        "isinstance(pid, int) and is_running(pid, start)",
        "isinstance(pid, int) and is_running(pid, None)",
        tests=(f"{JS}::test_signal_reaches_only_the_processes_the_job_registered",),
    ),
    Mutant(
        "launcher-exit-code-is-accelerates",
        "pg_train/launcher.py",
        "        if len(set(recorded)) == 1:\n            return recorded[0]\n",
        "        if len(set(recorded)) == 1:\n            return launcher_code or recorded[0]\n",
        tests=(JS,),
    ),
    Mutant(
        "bad-sample-raised-inside-the-worker",
        "pg_train/data/loader.py",
        "            if not self.strict:\n                raise\n",
        "            raise\n",
        tests=("tests/test_strict_workers.py",),
    ),
    Mutant(
        "bad-sample-pickles-from-its-message",
        "pg_train/data/types.py",
        "        return (BadSample, (self.reason, self.where, self.detail))\n",
        "        return super().__reduce__()\n",
        tests=("tests/test_strict_workers.py::test_bad_sample_pickles_with_reason_file_and_line",),
    ),
    Mutant(
        "disk-full-not-said",
        "pg_train/disk_space.py",
        "        full = is_disk_full(err) or",
        "        full = False and",
        tests=("tests/test_disk_full.py::test_injected_enospc_while_checkpointing_exits_74_naming_path_and_sizes",),
    ),
    Mutant(
        "teacher-ignores-its-end-text",
        TEACHER,
        "            stop=model.prompts.stop,\n",
        "            stop=None,\n",
        tests=(f"{PIN}::test_teacher_caption_stops_at_the_end_text_and_drops_it",),
    ),
    Mutant(
        "normalisation-std-changed",
        "pg_train/data/images.py",
        "IMAGENET_STD = (0.229, 0.224, 0.225)",
        "IMAGENET_STD = (0.229, 0.229, 0.229)",
        tests=(f"{PIN}::test_image_normalisation_is_the_released_models_imagenet_constants",),
    ),
    Mutant(
        "later-shards-finiteness-unchecked",
        "pg_train/model/io/checkpoint.py",
        "    check_finite(state, directory, allow_nonfinite=allow_nonfinite)\n",
        "    check_finite(dict(list(state.items())[:2]), directory, allow_nonfinite=allow_nonfinite)\n",
        tests=(f"{PIN}::test_nonfinite_value_in_any_shard_is_refused_naming_it",),
    ),
    Mutant(
        "numpy-rng-not-restored",
        "pg_train/checkpointing.py",
        "    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))\n",
        "",
        tests=(f"{PIN}::test_resume_restores_python_numpy_and_torch_random_state",),
    ),
    Mutant(
        "python-rng-not-restored",
        "pg_train/checkpointing.py",
        '    random.setstate(state["python"])\n',
        "",
        tests=(f"{PIN}::test_resume_restores_python_numpy_and_torch_random_state",),
    ),
]


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout


def make_base_copy(tree: str, into: Path) -> None:
    """The repository's files (no .git, no .venv) under `into`: the working tree's, or revision `tree`'s."""
    if tree != "worktree":
        archive = subprocess.run(["git", "archive", tree], cwd=REPO, capture_output=True, check=True).stdout
        tarfile.open(fileobj=io.BytesIO(archive)).extractall(into, filter="data")
        return
    names = git("ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    for name in filter(None, names):
        source = REPO / name
        if source.is_file():  # a tracked file deleted in the working tree is left out
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, into / name)


def apply(mutant: Mutant, root: Path) -> None:
    path = root / mutant.file
    if not path.is_file():
        raise LookupError(f"{mutant.file} does not exist in this tree")
    text = path.read_text()
    for original, replacement in mutant.alternatives():
        if text.count(original) == 1:
            path.write_text(text.replace(original, replacement))
            return
    raise LookupError(f"{mutant.file}: none of the mutant's snippets occurs exactly once (has the file changed?)")


def environment(root: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(root),
        "TORCH_EXTENSIONS_DIR": str(REPO / ".venv" / "torch_extensions"),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def run_pytest(root: Path, tests: tuple[str, ...], slow: bool, timeout: float) -> tuple[int | None, str]:
    cmd = [
        str(PYTHON),
        "-m",
        "pytest",
        "-q",
        "-x",
        "-p",
        "no:cacheprovider",
        *([] if slow else ["-m", "not slow"]),
        *tests,
    ]
    try:
        proc = subprocess.run(cmd, cwd=root, env=environment(root), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, "timeout"
    return proc.returncode, proc.stdout + proc.stderr


def first_failure(output: str) -> str:
    found = re.search(r"^(FAILED|ERROR) (\S+)", output, re.MULTILINE)
    return found.group(2) if found else ""


def check_import(root: Path) -> str:
    """Where the copy's `import pg_train` resolves (must be inside the copy)."""
    proc = subprocess.run(
        [str(PYTHON), "-c", "import pg_train; print(pg_train.__file__)"],
        cwd=root,
        env=environment(root),
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout.strip()


def run_mutant(mutant: Mutant, base: Path, work: Path, timeout: float) -> dict:
    root = work / re.sub(r"[^a-z0-9-]", "-", mutant.name)
    shutil.copytree(base, root)
    record = {"name": mutant.name, "file": mutant.file, "tests": list(mutant.test_files()), "sanity": mutant.sanity}
    started = time.perf_counter()
    try:
        apply(mutant, root)
    except LookupError as err:
        record.update(status="not-applied", detail=str(err), seconds=0.0)
        shutil.rmtree(root, ignore_errors=True)
        return record
    rc, output = run_pytest(root, mutant.test_files(), mutant.slow, timeout)
    status = {0: "survived", 1: "killed", 2: "killed"}.get(rc, "timeout" if rc is None else f"error (pytest exit {rc})")
    record.update(
        status=status, seconds=round(time.perf_counter() - started, 1), killed_by=first_failure(output), exit_code=rc
    )
    if status.startswith("error"):
        record["detail"] = output[-2000:]
    shutil.rmtree(root, ignore_errors=True)
    return record


def versions() -> dict[str, str]:
    proc = subprocess.run(
        [
            str(PYTHON),
            "-c",
            "import torch, pytest, transformers, accelerate; "
            "print(torch.__version__, pytest.__version__, transformers.__version__, accelerate.__version__)",
        ],
        capture_output=True,
        text=True,
    )
    names = ("torch", "pytest", "transformers", "accelerate")
    return {"python": platform.python_version(), **dict(zip(names, proc.stdout.split()))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", default=[], help="run only the named mutant (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument(
        "--tree", default="worktree", help="'worktree' (default: the files as they are now) or a git revision to copy"
    )
    parser.add_argument(
        "--timeout", type=float, default=1200, help="seconds per pytest run (a timeout counts as killed)"
    )
    parser.add_argument("--skip-baseline", action="store_true", help="do not first run the unmutated copy's test files")
    parser.add_argument("--json", type=Path, default=REPO / "docs" / "measurements" / "mutation_test.json")
    args = parser.parse_args(argv)

    mutants = [m for m in MUTANTS if not args.only or m.name in args.only or m.sanity]
    unknown = set(args.only) - {m.name for m in MUTANTS}
    if unknown:
        parser.error(f"unknown mutants {sorted(unknown)}; --list shows them")
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:45} {m.file:30} {' '.join(m.test_files())}")
        return 0

    result = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git("rev-parse", "HEAD" if args.tree == "worktree" else args.tree).strip(),
        "tree": args.tree,
        "working_tree_changes": git("status", "--porcelain", "--untracked-files=no").splitlines()
        if args.tree == "worktree"
        else [],
        "versions": versions(),
        "mutants": [],
    }
    with tempfile.TemporaryDirectory(prefix="pg_mutation_") as tmp:
        work = Path(tmp)
        base = work / "base"
        base.mkdir()
        make_base_copy(args.tree, base)
        where = check_import(base)
        if not Path(where).resolve().is_relative_to(base.resolve()):
            sys.exit(f"the copy imports pg_train from {where}, not from the copy: mutants would not be tested")
        print(f"[mutation] copy of the {args.tree} in {base}; pg_train imported from {where}", flush=True)
        if not args.skip_baseline:
            files = tuple(dict.fromkeys(t for m in mutants if not m.slow for t in m.test_files()))
            started = time.perf_counter()
            rc, output = run_pytest(base, files, False, args.timeout * 2)
            result["baseline"] = {
                "tests": list(files),
                "exit_code": rc,
                "seconds": round(time.perf_counter() - started, 1),
            }
            print(f"[mutation] baseline (no mutant): pytest exit {rc} in {result['baseline']['seconds']} s", flush=True)
            if rc != 0:
                print(output[-4000:])
                sys.exit(
                    "the unmutated copy fails its tests: fix that first (or copy a commit that passes: --tree REV)"
                )
        for mutant in mutants:
            record = run_mutant(mutant, base, work, args.timeout)
            result["mutants"].append(record)
            print(
                f"[mutation] {record['status']:12} {mutant.name:45} {record['seconds']:7.1f} s  {record.get('killed_by', '')}",
                flush=True,
            )
            if mutant.sanity and record["status"] != "killed":
                sys.exit(f"sanity mutant {mutant.name} was {record['status']}: the tests do not exercise the copy")
            args.json.parent.mkdir(parents=True, exist_ok=True)  # so far (an interrupted run keeps what it measured)
            args.json.write_text(json.dumps({**result, "partial": True}, indent=2) + "\n")

    counted = [r for r in result["mutants"] if not r["sanity"] and r["status"] != "not-applied"]
    killed = [r for r in counted if r["status"] in ("killed", "timeout")]
    result.update(
        killed=len(killed),
        total=len(counted),
        kill_rate=round(len(killed) / max(1, len(counted)), 3),
        survived=[r["name"] for r in counted if r["status"] == "survived"],
        not_applied=[r["name"] for r in result["mutants"] if r["status"] == "not-applied"],
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"[mutation] killed {len(killed)} / {len(counted)} ({100 * result['kill_rate']:.0f}%); survived: {result['survived'] or 'none'}; "
        f"not applied: {result['not_applied'] or 'none'}; wrote {args.json}"
    )
    return 0 if not result["survived"] else 1


if __name__ == "__main__":
    sys.exit(main())
