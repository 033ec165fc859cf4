"""pg_train: Pseudo-Gumbel self-training for Sa2VA-style grounded VLMs."""

from . import quiet

__version__ = "0.1.0"

quiet.install()  # known third-party noise dropped before bitsandbytes / transformers are imported
