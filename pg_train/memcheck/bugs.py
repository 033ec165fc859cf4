"""The bugs `python -m pg_train.memcheck --inject` reproduces in the measured run (its self-test: each
must make an audit fail). Its own module so the command line lists them without importing torch."""

BUGS = ("no-ema", "detach-text-embeds", "no-optimizer-step", "frozen-vit-keeps-graph")
