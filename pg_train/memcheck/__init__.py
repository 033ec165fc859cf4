"""memcheck: what should this run use, what does it use, and is anything missing.

    python -m pg_train.memcheck [--config F] [--preset P] [--world-size N] [--zero-stage S]
        [--ema-placement X] [--batch-size B] [--steps K] [--no-measure] [--json PATH] [--tolerance T]

Exit codes: 0 audits pass and measurement within tolerance, 1 an audit failed, 2 out of tolerance.
"""

from .measure import BUGS, Audit, Measurement, measure
from .predict import Deployment, Prediction, alternative_estimates, predict
from .steps import StepKind, step_kinds

__all__ = [
    "BUGS",
    "Audit",
    "Measurement",
    "measure",
    "Deployment",
    "Prediction",
    "predict",
    "alternative_estimates",
    "StepKind",
    "step_kinds",
]
