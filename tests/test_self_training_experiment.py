"""scripts/self_training_experiment.py (issue 26): its statistics, arms, gate and table, without training."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "self_training_experiment.py"


@pytest.fixture(scope="module")
def script():
    sys.path.insert(0, str(SCRIPT.parent))  # as when the script runs: its sibling pg_vs_supervised imports
    spec = importlib.util.spec_from_file_location("self_training_experiment", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


# Student t 0.975 quantiles from a printed table (e.g. NIST/SEMATECH e-Handbook, table 1.3.6.7.2)
T_TABLE_975 = {1: 12.706, 2: 4.303, 4: 2.776, 5: 2.571, 6: 2.447, 10: 2.228, 30: 2.042}


def test_t_quantile_matches_a_printed_table(script):
    for df, value in T_TABLE_975.items():
        assert script.t_quantile(0.975, df) == pytest.approx(value, abs=6e-4), df
    assert script.t_quantile(0.95, 4) == pytest.approx(2.132, abs=6e-4)


def test_paired_ci_is_the_hand_computed_t_interval(script):
    # mean 0.16; sample sd sqrt(0.052 / 4) = 0.114018; se 0.050990; t(0.975, 4) = 2.7764
    mean, low, high = script.paired_ci([0.1, 0.2, 0.3, 0.0, 0.2])
    assert mean == pytest.approx(0.16)
    assert low == pytest.approx(0.16 - 2.7764 * 0.114018 / math.sqrt(5), abs=1e-4)
    assert high == pytest.approx(0.3016, abs=1e-4)


def test_defaults_name_two_heldout_sets_and_run_enough_seeds(script):
    args = script.parse_args([])
    assert len(args.seeds) >= 5 and args.eval_seed_a != args.eval_seed_b
    assert min(args.eval_seed_a, args.eval_seed_b) > max(args.seeds)  # held-out scenes are not training scenes
    assert args.arms[0] == "sup_a" and "oracle_b" in args.arms and "pg" in args.arms
    assert args.jobs <= 2 and args.threads == 1 and args.gate > 0
    assert args.json.startswith("docs/measurements/") and args.doc.startswith("docs/learning/")


def test_arm_overrides_put_each_arm_on_its_domain(script):
    args = script.parse_args(["--domain-b", "colours", "--lr", "5e-4"])
    arms = {a.key: a for a in script.ARMS}
    sup_a = script.arm_overrides(arms["sup_a"], Path("/w"), 3, args)
    oracle = script.arm_overrides(arms["oracle_b"], Path("/w"), 3, args)
    assert "seed=3" in sup_a and "model.init_from=/w" in sup_a and "optim.lr=0.0005" in sup_a
    assert "objective_kind=supervised" in oracle and "data.colours=[yellow,purple,cyan]" in oracle
    assert not any(o.startswith("data.") for o in sup_a)
    # the same schedule for every arm
    assert [o for o in sup_a if o.startswith("optim.")] == [o for o in oracle if o.startswith("optim.")]


def _numbers(ref_b, cyc_b, ref_a=0.5, cyc_a=0.5):
    return {
        "B": {"referring_gIoU": ref_b, "cycle_gIoU": cyc_b, "shuffled_gIoU": 0.1, "empty_gIoU": 0.0},
        "A": {"referring_gIoU": ref_a, "cycle_gIoU": cyc_a, "shuffled_gIoU": 0.1, "empty_gIoU": 0.0},
    }


def test_summary_pairs_grounded_seeds_only_and_table_marks_intervals(script):
    results = {
        0: {"grounded": True, "sup_a": _numbers(0.3, 0.3), "oracle_b": _numbers(0.4, 0.35)},
        1: {"grounded": True, "sup_a": _numbers(0.2, 0.3), "oracle_b": _numbers(0.4, 0.25)},
        2: {"grounded": True, "sup_a": _numbers(0.3, 0.3), "oracle_b": _numbers(0.45, 0.3)},
        3: {"grounded": False, "warmup": _numbers(0.1, 0.1)},  # no arms: must not enter the pairs
    }
    summary = script.summarize(results, ["sup_a", "oracle_b"])
    ref = summary["oracle_b"]["B_referring"]
    assert ref["n"] == 3 and ref["per_seed_diff"] == pytest.approx([0.1, 0.2, 0.15])
    mean, low, high = script.paired_ci([0.1, 0.2, 0.15])
    assert (ref["diff"], ref["ci_low"], ref["ci_high"]) == pytest.approx((mean, low, high))
    assert low > 0
    arms = [a for a in script.ARMS if a.key in ("sup_a", "oracle_b")]
    rows = script.table(summary, arms).splitlines()
    assert rows[0] == "| arm | B referring | B text use | B cycle | A referring | A text use | A cycle |"
    assert rows[2].startswith("| supervised on A") and "| 0.267 |" in rows[2]
    assert f"0.417 (+0.150 [{low:+.3f}, {high:+.3f}]) **↑**" in rows[3]
    # text use = referring − shuffled (0.1 in every evaluation here): 0.317 on average
    assert summary["oracle_b"]["B_text_use"]["mean"] == pytest.approx(0.3167, abs=1e-4)
    assert "**" not in rows[3].split("|")[4]  # B cycle: the interval straddles 0, no mark


def test_arm_comparisons_pair_the_two_arms_seed_by_seed_on_grounded_seeds(script):
    results = {
        0: {"grounded": True, "pl": _numbers(0.5, 0.4, ref_a=0.6), "pg": _numbers(0.3, 0.4, ref_a=0.5)},
        1: {"grounded": True, "pl": _numbers(0.45, 0.3, ref_a=0.6), "pg": _numbers(0.3, 0.35, ref_a=0.4)},
        2: {"grounded": True, "pl": _numbers(0.6, 0.5, ref_a=0.5), "pg": _numbers(0.35, 0.5, ref_a=0.45)},
        3: {"grounded": False},  # no arms: must not enter the pairs
    }
    comparisons = script.compare_arms(results, ["sup_a", "pl", "pg"])
    assert list(comparisons) == ["pl − pg"]  # pairs with an arm that did not run are left out
    ref_b = comparisons["pl − pg"]["B_referring"]
    assert ref_b["per_seed_diff"] == pytest.approx([0.2, 0.15, 0.25])
    _, low, high = script.paired_ci([0.2, 0.15, 0.25])
    assert (ref_b["ci_low"], ref_b["ci_high"]) == pytest.approx((low, high)) and low > 0
    assert comparisons["pl − pg"]["A_referring"]["per_seed_diff"] == pytest.approx([0.1, 0.2, 0.05])
    rows = script.comparison_table(comparisons).splitlines()
    assert rows[0] == "| comparison | B referring | B text use | B cycle | A referring |"
    assert rows[2].startswith("| `pl` − `pg` | **+0.200 [")  # interval above 0: bold
    assert "| +0.000 [+0.000, +0.000] |" not in rows[2] and rows[2].split("|")[4].strip().startswith("-0.017")


def test_doc_table_is_replaced_between_markers(script, tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- table -->\nold\n<!-- /table -->\noutro\n")
    script.write_doc_table(doc, "| new |")
    assert doc.read_text() == "intro\n<!-- table -->\n| new |\n<!-- /table -->\noutro\n"
    doc.write_text("no markers")
    with pytest.raises(SystemExit, match="markers"):
        script.write_doc_table(doc, "| new |")


def test_stream_overrides_carry_every_data_field_as_yaml(script):
    import dataclasses

    import yaml

    from pg_train.data import DataConfig

    data = DataConfig(num_samples=7, colours=["yellow", "cyan"], hf_caption=None, sizes=["large"])
    lines = script.stream_overrides("streams.unlabelled", data)
    assert len(lines) == len(dataclasses.fields(DataConfig))
    parsed = {}
    for line in lines:
        key, value = line.split("=", 1)
        assert key.startswith("streams.unlabelled.")
        parsed[key.rsplit(".", 1)[1]] = yaml.safe_load(value)  # what a key=value override reads
    assert DataConfig(**parsed) == data


def test_plot_draws_every_arm_but_the_baseline(script, tmp_path):
    results = {s: {"grounded": True, "sup_a": _numbers(0.3, 0.3), "pg": _numbers(0.2 + s / 10, 0.3)} for s in range(3)}
    summary = script.summarize(results, ["sup_a", "pg"])
    arms = [a for a in script.ARMS if a.key in ("sup_a", "pg")]
    script.plot(summary, arms, results, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
