"""Launched by tests/test_ema.py under `accelerate launch` (2 CPU processes, DeepSpeed ZeRO-2).

Trains the tiny model a few Pseudo-Gumbel steps on rank-specific data and writes, per rank, the
EMA shadow checksum, the trainable-weight checksum and the optimizer-state element count.
"""
import json
import sys

from pg_train.accel import build_accelerator, configure_environment

configure_environment()
import torch  # noqa: E402

from pg_train.ema import EMATeacher  # noqa: E402
from pg_train.model import build_model  # noqa: E402
from pg_train.model.text.regions import region_grids  # noqa: E402
from pg_train.objectives.pseudo_gumbel import pseudo_gumbel_step  # noqa: E402
from pg_train.objectives.settings import PseudoGumbelConfig  # noqa: E402


def main(out_path: str, steps: int = 3) -> None:
    accelerator = build_accelerator(micro_batch_size=2, gradient_clipping=1.0)
    model = build_model("tiny", seed=0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    engine, optimizer = accelerator.prepare(model, optimizer)
    ema = EMATeacher(engine, decay=0.9)
    cfg = PseudoGumbelConfig(max_caption_len=6, topk=16)
    rank = accelerator.process_index
    for step in range(steps):
        g = torch.Generator().manual_seed(1000 * step + rank)  # different data on each rank
        masks = torch.zeros(2, 448, 448)
        masks[:, 50:200, 60:260] = 1
        nearest, coverage = region_grids(masks, 16)
        batch = {
            "pixel_values1": torch.randn(2, 3, 448, 448, generator=g),
            "region_masks1": masks,
            "region_nearest1": nearest,
            "region_coverage1": coverage,
            "pixel_values2": torch.randn(2, 3, 448, 448, generator=g),
            "sam_pixel_values2": torch.randn(2, 3, 128, 128, generator=g),
            "masks2": masks,
            "sample_seeds": torch.tensor([step * 10 + rank, step * 10 + rank + 5]),
        }
        with accelerator.accumulate(engine):
            out = pseudo_gumbel_step(engine, ema, batch, cfg)
            accelerator.backward(out.loss)
            optimizer.step()
            optimizer.zero_grad()
        ema.update_if_stepped(engine, accelerator)
    trainable = sum(float(p.detach().double().sum()) for p in engine.module.parameters() if p.requires_grad)
    opt_elems = sum(
        t.numel() for state in optimizer.optimizer.state.values() for t in state.values() if torch.is_tensor(t) and t.dim() > 0
    )
    result = {
        "rank": rank, "world": accelerator.num_processes, "ema_checksum": ema.checksum(), "ema_updates": ema.num_updates,
        "trainable_checksum": trainable, "optimizer_state_elements": opt_elems,
        "trainable_elements": sum(p.numel() for p in engine.module.parameters() if p.requires_grad),
    }
    with open(f"{out_path}.rank{rank}.json", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
