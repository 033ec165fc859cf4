"""Autoregressive decoding (eager and shape-bucketed / CUDA-graph) on top of `arch` and `text`."""
