"""scripts/pg_vs_supervised.py (issue 20): the arms' data splits and the table, without training."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "pg_vs_supervised.py"


def _load():
    spec = importlib.util.spec_from_file_location("pg_vs_supervised", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_reports_mean_std_and_per_seed_values():
    script = _load()
    args = script.parse_args(["--seeds", "0", "1"])
    assert args.labelled == 0.1 and args.scenes == 1000 and args.eval_seed == 20_000
    numbers = lambda cyc, ref, shuf: {"cycle_gIoU": cyc, "referring_gIoU": ref, "shuffled_gIoU": shuf}  # noqa: E731
    results = {
        0: {"pg": numbers(0.5, 0.6, 0.2), "sup": numbers(0.4, 0.5, 0.3), "none": numbers(0.3, 0.3, 0.3)},
        1: {"pg": numbers(0.7, 0.8, 0.2), "sup": numbers(0.4, 0.5, 0.3), "none": numbers(0.3, 0.3, 0.3)},
    }
    text = script.table(results, [0, 1])
    rows = text.splitlines()
    assert len(rows) == 2 + 3 and rows[2].startswith("| (a)") and rows[4].startswith("| (c)")
    assert "0.600 ± 0.141" in rows[2] and "0.500 / 0.700" in rows[2] and "+0.400 ± 0.141" in rows[2]
    assert "0.300 ± 0.000" in rows[4]
