"""How fast the tiny preset builds and runs (the embedded default must be quick on 2 cores).

    python -m pg_train.bench.tiny

Build time is reported cold (first build in this process: includes importing transformers'
Qwen2, peft and sam2 modules) and warm; then one full forward (vision, LLM, SAM2) and one
64-token batched generation with a KV cache, batch 2.
"""

from __future__ import annotations

import statistics
import time

import torch


def main():
    start = time.perf_counter()
    from pg_train.model import build_model

    import_s = time.perf_counter() - start
    start = time.perf_counter()
    model = build_model("tiny", seed=0).eval()
    cold = time.perf_counter() - start
    warm = []
    for _ in range(5):
        start = time.perf_counter()
        build_model("tiny", seed=0)
        warm.append(time.perf_counter() - start)

    from pg_train.model.decoding.generate import generate_from_embeds
    from pg_train.model.text.regions import region_cells
    from pg_train.model.text.templates import left_pad

    B = 2
    pixel_values = torch.randn(B, 3, 448, 448)
    sam_pixel_values = torch.randn(B, 3, model.preset.sam2.image_size, model.preset.sam2.image_size)
    masks = torch.zeros(B, 448, 448)
    masks[0, 50:150, 50:250] = 1
    masks[1, 200:400, 100:200] = 1

    def forward_and_generate():
        with torch.no_grad():
            cells, _ = region_cells(masks, model.grid_size)
            ids, attention = left_pad(
                [model.prompts.region_prompt(int(k)) for k in cells.flatten(1).sum(1)], model.tokenizer.pad_token_id
            )
            out = model(
                input_ids=ids,
                attention_mask=attention,
                pixel_values=pixel_values,
                region_cells=cells,
                output_hidden_states=True,
            )
            model.predict_masks(out.hidden_states[-1][:, -1], sam_pixel_values)
            embeds = model.embed_with_images(ids, model.extract_feature(pixel_values), cells)
            generate_from_embeds(
                model.language_model,
                embeds,
                attention,
                max_new_tokens=64,
                min_new_tokens=64,
                eos_token_id=model.eos_token_id,
                pad_token_id=model.tokenizer.pad_token_id,
            )

    forward_and_generate()
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        forward_and_generate()
        runs.append(time.perf_counter() - start)
    print(f"tiny preset, {torch.get_num_threads()} CPU threads")
    print(f"import pg_train.model        {import_s:6.2f} s")
    print(f"build (cold, first in proc)  {cold:6.2f} s")
    print(f"build (warm, median of 5)    {statistics.median(warm):6.3f} s")
    print(f"forward + generate 64 tok    {statistics.median(runs):6.3f} s  (batch {B}, median of 5)")


if __name__ == "__main__":
    main()
