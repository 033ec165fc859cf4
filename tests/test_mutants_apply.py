"""scripts/mutation_test.py's mutants still describe the code: a mutant whose snippet no longer
occurs exactly once (the code moved or was reworded) cannot be applied, and would only show up
as an error in a long mutation run; its test files must exist too."""

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def load_script():
    spec = importlib.util.spec_from_file_location("mutation_test", REPO / "scripts" / "mutation_test.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("mutation_test", module)
    spec.loader.exec_module(module)
    return module


def test_every_mutant_applies_to_this_tree_and_names_existing_tests():
    script = load_script()
    names = [m.name for m in script.MUTANTS]
    assert len(names) == len(set(names)) and len(names) > 60
    stale, missing_tests = [], []
    for mutant in script.MUTANTS:
        text = (REPO / mutant.file).read_text() if (REPO / mutant.file).is_file() else ""
        if not any(text.count(original) == 1 for original, _ in mutant.alternatives()):
            stale.append(f"{mutant.name} ({mutant.file})")
        for test in mutant.tests or script.TESTS[mutant.file]:
            if not (REPO / test.split("::")[0]).is_file():
                missing_tests.append(f"{mutant.name}: {test}")
    assert not stale, f"mutants whose snippet does not occur exactly once: {stale}"
    assert not missing_tests, missing_tests
