"""pg_train: Pseudo-Gumbel self-training for Sa2VA-style grounded VLMs."""

__version__ = "0.1.0"
