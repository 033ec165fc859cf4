"""memcheck's work behind `python -m pg_train.memcheck` (the command line: memcheck/args.py): the
prediction from the real module tree on `meta`, the measured run of the steps the configuration
trains, the audits, the printed tables and the JSON report. Imports torch and the model: the
command's `--help` and usage errors never load this module."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from ..accel import configure_environment

configure_environment()

import torch  # noqa: E402

from ..model.decoding.generate import fast_decoding  # noqa: E402
from .measure import build_step_batch, measure, teacher_prompt, text_tokens  # noqa: E402
from .predict import SEED_TABLE_GB, Deployment, alternative_estimates, predict  # noqa: E402
from .steps import step_kinds  # noqa: E402

GB = 1e9


def fmt(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / GB:8.3f} GB" if abs(nbytes) >= 1e7 else f"{nbytes / 1e6:8.3f} MB"


def parse_image_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--image-size: expected WIDTHxHEIGHT, got {text!r}") from None
    if width < 1 or height < 1:
        raise SystemExit(f"--image-size: expected positive sizes, got {text!r}")
    return width, height


def deployment_from(args, cfg) -> Deployment:
    if cfg is None:  # no training config: the predicted preset's objective defaults, as training would use
        from ..config import objective_for
        from ..model.arch.presets import get_preset

        objective = objective_for(get_preset(args.preset or "sa2va-4b"))
    else:
        objective = cfg.objective
    return Deployment(
        batch_size=args.batch_size or (cfg.batch_size if cfg else 1),
        caption_len=args.caption_len or objective.max_caption_len,
        image_size=parse_image_size(args.image_size),
        topk=objective.topk,
        world_size=args.world_size,
        zero_stage=args.zero_stage,
        offload_optimizer=args.offload,
        optimizer=cfg.optim.name if cfg else "adamw",
        ema_placement=args.ema_placement or (cfg.ema.placement if cfg else "same"),
        gradient_checkpointing=args.gradient_checkpointing or bool(cfg and cfg.model.gradient_checkpointing),
        fast_decoding=fast_decoding(objective.static_cache, objective.cuda_graphs, torch.device("cuda"))[0],
        steps=step_kinds(cfg, args.batch_size or (cfg.batch_size if cfg else 1)),
    )


def build(preset: str, cfg, device: str, dtype: torch.dtype):
    from ..model import build_model, build_offline

    kwargs = {}
    if cfg is not None:
        from ..builders import lora_from_config

        kwargs.update(lora=lora_from_config(cfg.model, preset), quantize_4bit=cfg.model.quantize_4bit)
    # On meta nothing runs, so the preset keeps its real special ids; otherwise the tiny tokenizer stands in.
    builder = build_model if device == "meta" else build_offline
    model = builder(preset, device=device, dtype=dtype, seed=0, **kwargs)
    if cfg is not None:
        from ..builders import unfreeze_extra

        unfreeze_extra(model, cfg.model.extra_trainable)
    return model


def print_prediction(title: str, pred, alternatives: dict | None = None) -> None:
    d = pred.deployment
    print(f"\n== {title}")
    print(
        f"   batch {d.batch_size}/process, captions {d.caption_len} tokens, {d.world_size} process(es), "
        f"{'ZeRO-' + str(d.zero_stage) if d.zero_stage else 'no ZeRO'}{' + optimizer offload' if d.offload_optimizer else ''}, "
        f"EMA {d.ema_placement}, {d.dtype}, grad. checkpointing {'on' if d.gradient_checkpointing else 'off'}"
    )
    print(
        f"   images {d.image_size[0]}x{d.image_size[1]}: {pred.views} view(s) per image (InternVL tiling when the preset has it)"
    )
    print(f"   {'component':22} {'device':8} {'bytes':>12}  note")
    for r in pred.static + pred.host:
        print(f"   {r.component:22} {r.device:8} {fmt(r.bytes):>12}  {r.note}")
    static = pred.static_bytes(d.device)
    print(f"   {'static on ' + d.device:31} {fmt(static):>12}")
    for label, phases in pred.steps.items():
        if len(pred.steps) > 1:
            print(f"   step {label}{'  <- sets the peak' if label == pred.peak_step else ''}")
        for phase, act in phases.items():
            print(
                f"   phase {phase:40} {fmt(act['saved']):>12} saved + {fmt(act['transient']).strip():>11} transient -> {fmt(static + act['total']).strip()} in use"
            )
    kinds = f" in step {pred.peak_step}" if len(pred.steps) > 1 else ""
    print(f"   predicted peak: {fmt(pred.peak_bytes).strip()} ({pred.peak_phase}{kinds})")
    if alternatives:
        print("   beside it:")
        for name, nbytes in alternatives.items():
            print(f"     {name:80} {fmt(nbytes):>12}")


def print_seed_comparison(pred, model) -> None:
    """The design note's hand estimate line by line, beside what the module tree holds."""
    e = pred.deployment.elem

    def params(prefix: str) -> int:
        return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))

    def weights(count: int) -> str:
        return f"{count / 1e6:,.1f}M x {e} bytes = {count * e / GB:.3f} GB"

    sam = "grounding_encoder.sam2_model."
    sam_decoder = params(sam + "sam_mask_decoder.")
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = pred.component("optimizer state") + sum(r.bytes for r in pred.host if r.component == "optimizer state")
    explanations = {
        "vision encoder (frozen)": "InternViT " + weights(params("vision_model.")),
        "LLM with LoRA": f"base {weights(params('language_model.') - lora)}; LoRA {weights(lora)}",
        "SAM2 encoder (frozen)": "everything but the decoder " + weights(params(sam) - sam_decoder),
        "SAM2 decoder": weights(sam_decoder),
        "projectors": "mlp1 + text_hidden_fcs " + weights(params("mlp1.") + params("text_hidden_fcs.")),
        "EMA full copy": f"fp32 shadow of the trainable tensors only: {fmt(pred.component('EMA')).strip()}",
        "gradients": f"{fmt(pred.component('gradients')).strip()} (trainable tensors only; {pred.rows_note('gradients')})",
        "optimizer states": f"{fmt(optimizer).strip()} for {trainable / 1e6:,.0f}M trainable parameters ({pred.rows_note('optimizer state')})",
        "activations": f"{fmt(pred.phases[pred.peak_phase]['total']).strip()} at the peak phase ({pred.peak_phase})",
    }
    print("\n== the design note's table (问题3) beside this prediction, per GPU")
    print(f"   {'design note':28} {'GB':>6}   what the module tree says")
    for name, gb in SEED_TABLE_GB:
        print(f"   {name:28} {gb:6.1f}   {explanations.get(name, '')}")
    print(f"   {'total':28} {'43-47':>6}   predicted peak {fmt(pred.peak_bytes).strip()}")


def compare(
    pred, meas, tolerance: float, peak_tolerance: float, rss_tolerance: float = 1.0, first_step: bool = True
) -> tuple[list[dict], bool]:
    rows, ok = [], True
    for component, measured in meas.static.items():
        predicted = pred.component(component)
        error = (measured - predicted) / predicted if predicted else (0.0 if measured == 0 else float("inf"))
        within = abs(error) <= tolerance
        ok &= within
        rows.append(
            {"component": component, "predicted": predicted, "measured": measured, "error": error, "within": within}
        )
    saved_measured = sum(p["saved_for_backward"] for p in meas.phases.values())
    saved_predicted = pred.phases["backward"]["saved"]
    if meas.device.startswith("cuda"):
        name = "peak allocated"
        predicted_peak = pred.peak_bytes - sum(r.bytes for r in pred.static if r.component == "CUDA context")
        measured_peak = meas.peak_bytes
    else:
        # On CPU the allocator reuses freed memory, so RSS says little about one warm step:
        # the peak check uses exact accounting of what autograd keeps for backward.
        name = "activations saved for backward"
        predicted_peak, measured_peak = saved_predicted, saved_measured
    checks = [(name, predicted_peak, measured_peak, peak_tolerance)]
    if first_step and not meas.device.startswith("cuda") and pred.deployment.zero_stage == 0:
        # (Under ZeRO, DeepSpeed's bucket allocations dominate and are not modelled exactly.)
        # The first step allocates gradients and optimizer state and runs every phase; its RSS
        # growth also holds library warm-up (kernel caches), hence the loose default tolerance.
        first = pred.component("gradients") + pred.component("optimizer state") + pred.phases[pred.peak_phase]["total"]
        checks.append(("peak RSS growth, first step", first, meas.first_step_growth, rss_tolerance))
    for label, predicted, measured, tol in checks:
        error = (measured - predicted) / predicted
        within = abs(error) <= tol
        ok &= within
        rows.append(
            {"component": label, "predicted": predicted, "measured": measured, "error": error, "within": within}
        )
    return rows, ok


def diagnose(rows: list[dict]) -> list[str]:
    """Name the components that are (nearly) absent when reality is far below the prediction."""
    return [
        f"{r['component']} is absent or incomplete: measured {fmt(r['measured']).strip()}, predicted {fmt(r['predicted']).strip()}"
        for r in rows
        if r["predicted"] > 0 and r["measured"] < 0.5 * r["predicted"]
    ]


def run(args: argparse.Namespace) -> int:
    """The whole memcheck for parsed arguments (`args.parse_args`): predict, measure, audit; the exit code."""
    cfg = None
    if args.config:
        from ..config import load_config

        cfg = load_config(args.config)
    report: dict = {}
    reference_preset = args.preset or (cfg.model.preset if cfg else "sa2va-4b")
    deployment = deployment_from(args, cfg)
    meta_model = build(reference_preset, cfg, "meta", torch.bfloat16)
    reference = predict(meta_model, deployment)
    print_prediction(
        f"predicted budget per GPU: {reference_preset}", reference, alternative_estimates(meta_model, deployment)
    )
    if reference_preset == "sa2va-4b":
        print_seed_comparison(reference, meta_model)
    report["reference"] = reference.to_dict()
    exit_code = 0
    if not args.no_measure:
        exit_code = run_measured(args, cfg, report)
    report["exit_code"] = exit_code
    if args.json and os.environ.get("RANK", "0") == "0":  # with --distributed, the main process reports
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
    return exit_code


def run_measured(args, cfg, report) -> int:
    from ..builders import build_optimizer
    from ..ema import EMATeacher
    from ..objectives.settings import PseudoGumbelConfig

    cuda = torch.cuda.is_available()
    device = "cuda:0" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    preset = args.measure_preset or ((args.preset or (cfg.model.preset if cfg else "sa2va-4b")) if cuda else "tiny")
    d = dataclasses.replace(
        deployment_from(args, cfg),
        world_size=1,
        zero_stage=0,
        offload_optimizer=False,
        dtype="bf16" if cuda else "fp32",
        device=device,
    )
    if not cuda:
        d = dataclasses.replace(
            d, batch_size=args.batch_size or (cfg.batch_size if cfg else 4), caption_len=args.caption_len or 16
        )
    model = build(preset, cfg, device, dtype)
    if d.gradient_checkpointing:
        from ..model import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    model.train()
    from ..config import TrainConfig

    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg or TrainConfig())
    student, accelerator = model, None
    if args.distributed:
        from ..accel import build_accelerator

        if "LOCAL_RANK" not in os.environ:
            raise SystemExit(
                "--distributed: run under `accelerate launch --config_file <deepspeed config> -m pg_train.memcheck --distributed`"
            )
        accelerator = build_accelerator(micro_batch_size=d.batch_size)
        student, optimizer = accelerator.prepare(model, optimizer)
        plugin = accelerator.state.deepspeed_plugin
        d = dataclasses.replace(
            d,
            world_size=accelerator.num_processes,
            zero_stage=plugin.zero_stage if plugin else 0,
            device=str(accelerator.device) if cuda else "cpu",
        )
    ema = None if "no-ema" in args.inject else EMATeacher(student, placement=d.ema_placement)
    # the deployment's caption length and top-k, so prediction and measurement describe one step
    objective = dataclasses.replace(
        cfg.objective if cfg else PseudoGumbelConfig(),
        max_caption_len=d.caption_len,
        min_caption_len=d.caption_len,
        topk=d.topk,
    )
    train_cfg = dataclasses.replace(cfg, objective=objective) if cfg else None
    streams = bool(cfg and cfg.streams.enabled)
    kinds = step_kinds(cfg, d.batch_size)
    d = dataclasses.replace(
        d,
        steps=kinds,
        fast_decoding=fast_decoding(objective.static_cache, objective.cuda_graphs, torch.device(device))[0],
    )
    rank = accelerator.process_index if accelerator else 0
    codes, steps, predictions, audits = [], [], {}, []
    for i, kind in enumerate(kinds):
        # Each kind of step the run trains, in the order it meets them, on the one model,
        # optimizer and EMA (as the run goes from one to the next); the first also allocates them.
        batch = build_step_batch(model, kind, streams, torch.device(device), seed=rank)
        unlabelled, labelled = (batch["unlabelled"], batch["labelled"]) if streams else (batch, batch)
        pred = predict(
            model,
            dataclasses.replace(
                d,
                steps=(kind,),
                decode_prompt=teacher_prompt(model, unlabelled, objective) if kind.has_teacher else None,
                text_len=text_tokens(model, labelled, objective),
            ),
        )
        predictions.update(pred.steps)
        meas = measure(
            student,
            optimizer,
            ema,
            objective,
            batch,
            steps=args.steps,
            inject=tuple(args.inject),
            accelerator=accelerator,
            gradient_checkpointing=d.gradient_checkpointing,
            grad_clip=(cfg or TrainConfig()).optim.grad_clip,
            kind=kind,
            train_cfg=train_cfg,
        )
        code, step_report = report_step(args, preset, pred, meas, i == 0, len(kinds) > 1, accelerator, cuda)
        codes.append(code)
        steps.append(step_report)
        audits += [
            {**dataclasses.asdict(a), "name": a.name + (f" [{kind.label}]" if len(kinds) > 1 else "")}
            for a in meas.audits
        ]
    exit_code = 1 if 1 in codes else max(codes)  # an audit failed, else out of tolerance, else 0
    if accelerator is not None and not accelerator.is_main_process:
        return exit_code  # every rank measured and audited its own partition; the main process reports
    overall = dataclasses.replace(pred, deployment=d, steps=predictions)
    overall.peak_step = max(predictions, key=lambda label: max(p["total"] for p in predictions[label].values()))
    overall.phases = predictions[overall.peak_step]
    if len(kinds) > 1:
        measured = {r["step"]: r["measured_peak"] for r in steps}
        print("\n== the steps this configuration trains (the budget is the largest)")
        print(f"   {'step':48} {'predicted peak':>15} {'measured':>12}  ({steps[0]['peak_metric']})")
        for r in steps:
            print(f"   {r['step']:48} {fmt(r['predicted_peak']):>15} {fmt(r['measured_peak']):>12}")
        print(f"   the peak: predicted in {overall.peak_step}, measured in {max(measured, key=measured.get)}")
    print(f"\nmemcheck: {'PASS' if exit_code == 0 else 'FAIL'} (exit {exit_code})")
    report["measured_config"] = {
        "preset": preset,
        "prediction": overall.to_dict(),
        "steps": steps,
        "peak_step": {"predicted": overall.peak_step, "measured": max(steps, key=lambda r: r["measured_peak"])["step"]},
        "comparison": [row for r in steps for row in r["comparison"]],
        "phases": steps[-1]["phases"],
        "losses": [loss for r in steps for loss in r["losses"]],
        "diagnosis": [reason for r in steps for reason in r["diagnosis"]],
    }
    report["audits"] = audits
    return exit_code


def report_step(args, preset: str, pred, meas, first: bool, named: bool, accelerator, cuda: bool) -> tuple[int, dict]:
    """Compare, print and report one measured kind of step: (exit code, its report). `first`:
    the run's first measured step (its RSS growth allocates gradients and optimizer state);
    `named`: several kinds are measured, so each row and audit names its step."""
    label = meas.step
    audits_ok = all(a.passed for a in meas.audits)
    if accelerator is not None and not accelerator.is_main_process:
        return (0 if audits_ok else 1), {}
    rows, within = compare(pred, meas, args.tolerance, args.peak_tolerance, args.rss_tolerance, first)
    metric = "peak allocated" if cuda else "activations saved for backward"
    peak = next(r for r in rows if r["component"] == metric)  # compare's peak check, as it compared
    inject = f" (injected: {', '.join(args.inject)})" if args.inject else ""
    print_prediction(f"measured run: {preset} on {pred.deployment.device}, step {label}{inject}", pred)
    print(f"\n== predicted vs measured, step {label} ({args.steps} steps, the last one measured)")
    print(f"   {'component':28} {'predicted':>12} {'measured':>12} {'error':>8}")
    for r in rows:
        flag = "" if r["within"] else "  <- out of tolerance"
        print(
            f"   {r['component']:28} {fmt(r['predicted']):>12} {fmt(r['measured']):>12} {100 * r['error']:7.1f}%{flag}"
        )
    print(f"   phases (measured): {'time':>24} {'peak above entry':>17} {'saved for backward':>19}")
    for name, ph in meas.phases.items():
        print(f"     {name:40} {ph['s']:7.3f} s {fmt(ph['peak_above_entry']):>17} {fmt(ph['saved_for_backward']):>19}")
    if not cuda:
        print(
            f"   process RSS grew by {fmt(meas.peak_bytes).strip()} during the warm measured step (the allocator reuses step 1's memory)"
        )
    for reason in diagnose(rows):
        print(f"   diagnosis: {reason}")
    if named:  # in the report each row names its step
        rows = [{**r, "component": f"{r['component']} [{label}]"} for r in rows]
    print(
        "\n== audits (the design note's three suspicions, the teacher swap and checkpointing, on the production step)"
    )
    for audit in meas.audits:
        print(f"   [{'PASS' if audit.passed else 'FAIL'}] {audit.name}")
        for line in audit.evidence:
            print(f"          {line}")
    exit_code = 0 if audits_ok and within else 1 if not audits_ok else 2
    return exit_code, {
        "step": label,
        "exit_code": exit_code,
        "comparison": rows,
        "phases": meas.phases,
        "losses": meas.losses,
        "diagnosis": diagnose(rows),
        "peak_metric": metric,
        "predicted_peak": peak["predicted"],
        "measured_peak": peak["measured"],
    }
