"""Configuration: every knob checked before anything is built; shipped configs load."""

from pathlib import Path

import pytest

from pg_train.config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "override, key",
    [
        ("log_every=0", "log_every"),
        ("max_nonfinite_in_a_row=0", "max_nonfinite_in_a_row"),
        ("stop_at_step=0", "stop_at_step"),
        ("model.lora_r=0", "model.lora_r"),
        ("model.lora_dropout=1.0", "model.lora_dropout"),
        ("optim.betas=[0.9,1.0]", "optim.betas"),
        ("optim.weight_decay=-0.1", "optim.weight_decay"),
        ("optim.warmup_steps=-1", "optim.warmup_steps"),
        ("optim.min_lr_ratio=2", "optim.min_lr_ratio"),
        ("optim.grad_clip=-1", "optim.grad_clip"),
        ("objective.temperature=0", "objective.temperature"),
        ("objective.cuda_graphs=true", "objective.cuda_graphs"),
        ("objective.sample_top_k=-1", "objective.sample_top_k"),
        ("objective.dice_weight=-1", "objective.bce_weight"),
        ("objective.region_rule=bilinear", "objective.region_rule"),
        ("objective.region_threshold=1.5", "objective.region_threshold"),
        ("objective.empty_region_policy=drop", "objective.empty_region_policy"),
        ("supervised.summary_weight=-1", "supervised.lm_weight"),
        ("data.min_objects=0", "data.min_objects"),
        ("data.num_workers=-1", "data.min_pixels"),
        ("model.chat_template=vicuna", "model.chat_template"),
        ("model.min_dynamic_patch=5", "model.min_dynamic_patch"),
    ],
)
def test_every_knob_is_validated_naming_its_key(override, key):
    extra = ["model.max_dynamic_patch=4"] if "dynamic" in override else []
    extra += ["objective.static_cache=false"] if "cuda_graphs" in override else []  # (null: implied by graphs)
    with pytest.raises(ConfigError, match=rf"^{key}:"):
        load_config(overrides=[override, *extra])


@pytest.mark.parametrize("policy", ["largest", "official", "error"])
def test_every_empty_region_policy_is_accepted(policy):
    assert load_config(overrides=[f"objective.empty_region_policy={policy}"]).objective.empty_region_policy == policy


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    cfg = load_config([REPO / "configs" / name])
    if name == "sa2va_4b_zero2.yaml":
        assert cfg.model.preset == "sa2va-4b"
        assert (cfg.objective.topk, cfg.objective.max_caption_len) == (128, 64)  # the preset's, SPEC §3
