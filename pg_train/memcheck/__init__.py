"""memcheck: what should this run use, what does it use, and is anything missing.

    python -m pg_train.memcheck [--config F] [--preset P] [--world-size N] [--zero-stage S]
        [--ema-placement X] [--batch-size B] [--steps K] [--no-measure] [--json PATH] [--tolerance T]

Exit codes: 0 audits pass and measurement within tolerance, 1 an audit failed, 2 out of tolerance.

The exports below load on first use (PEP 562): `python -m pg_train.memcheck` imports this package
before its __main__, and `--help` should not pay for torch. The two functions named like their
modules are imported from those modules (`from pg_train.memcheck.predict import predict`,
`from pg_train.memcheck.measure import measure`): importing a submodule binds its name on the
package, so a lazy `pg_train.memcheck.predict` would be the function or the module depending on
what was imported first.
"""

from __future__ import annotations

import importlib

from .bugs import BUGS

_EXPORTS = {
    "Audit": "measure",
    "Measurement": "measure",
    "Deployment": "predict",
    "Prediction": "predict",
    "alternative_estimates": "predict",
    "StepKind": "steps",
    "step_kinds": "steps",
}

__all__ = ["BUGS", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
