"""Launched by tests/test_train.py under `accelerate launch` (2 CPU processes, ZeRO-2).

Runs the real training loop (`pg_train.train.train`) with the overrides given on the command
line, then writes what each rank holds: the sample indices it consumed, a checksum of its
trainable weights and of its EMA, and the number of optimizer-state elements it keeps.
"""
import hashlib
import json
import os
import sys
from pathlib import Path

from pg_train.accel import configure_environment  # noqa: E402

configure_environment()
import torch  # noqa: E402

from pg_train.config import load_config  # noqa: E402
from pg_train.train import train  # noqa: E402


def poison(rank: int, call: int) -> None:
    """Make the `call`-th objective evaluation on `rank` return a NaN loss (only that rank)."""
    import pg_train.objectives.mix as objectives_mix

    if int(os.environ["RANK"]) != rank:
        return
    real, calls = objectives_mix.pseudo_gumbel_step, {"n": 0}

    def step(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        if calls["n"] == call:
            out.loss = out.loss * float("nan")
        return out

    objectives_mix.pseudo_gumbel_step = step


def consumed_by(loader) -> list[int]:
    """The sample indices a PairLoader has handed out, in order."""
    consumed = []
    for epoch in range(loader.epoch + 1):
        order = loader.shard(epoch)
        done = loader.batches_done if epoch == loader.epoch else loader.batches_per_epoch()
        consumed += order[: done * loader.batch_size]
    return consumed


def main(out_path: str, overrides: list[str]) -> None:
    if "PG_POISON" in os.environ:  # "rank:call"
        poison(*(int(x) for x in os.environ["PG_POISON"].split(":")))
    result = train(load_config([], overrides))
    loader = result.loader
    if hasattr(loader, "streams"):  # streams.enabled: each stream's samples, by name
        consumed = {name: consumed_by(stream) for name, stream in loader.streams.items()}
    else:
        consumed = consumed_by(loader)
    module = result.model.module
    trainable = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    state_elements = sum(
        t.numel() for s in result.optimizer.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0
    )
    rank = int(os.environ["RANK"])  # end_training() has destroyed the process group
    torch.save({n: t.float().cpu() for n, t in trainable.items()}, f"{out_path}.rank{rank}.weights.pt")
    Path(f"{out_path}.rank{rank}.json").write_text(json.dumps({
        "rank": rank,
        "exit_code": result.exit_code,
        "consumed": consumed,
        "trainable_checksum": [float(t.double().sum()) for t in trainable.values()],
        "trainable_bytes_hash": hashlib.sha256(b"".join(t.float().numpy().tobytes() for t in trainable.values())).hexdigest(),
        "trainable_elements": sum(t.numel() for t in trainable.values()),
        "optimizer_state_elements": state_elements,
        "ema_checksum": result.ema.checksum(),
        "losses": [r["loss"] for r in result.history],
        "skipped": [r["skipped_nonfinite"] for r in result.history],
        "ema_updates": [r["ema_updates"] for r in result.history],
        "optimizer_steps": getattr(result.model, "global_steps", None),  # DeepSpeed's own count
        "finite_weights": all(bool(torch.isfinite(t).all()) for t in trainable.values()),
    }))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
