"""RefCOCO-family evaluation: cIoU / gIoU at the image's resolution, on answers known by construction."""

import json

import numpy as np
import pytest
import torch
from formats import MASKS, box_mask, write_refer
from PIL import Image

from pg_train.data import Preprocess
from pg_train.data.refer import ReferPairs
from pg_train.eval_refcoco import evaluate_split

SMALL = Preprocess(mllm_size=448, sam_size=128)


def logits_of(mask: np.ndarray, factor: int = 2) -> torch.Tensor:
    """±10 logits of a mask on a grid `factor` times coarser than the image (the decoder's
    low-resolution output); block-aligned masks come back exactly after the bilinear upsampling."""
    coarse = mask[::factor, ::factor]
    return torch.from_numpy(np.where(coarse, 10.0, -10.0)).float()


def predictor(answers: dict, cycle: str = "perfect"):
    """Stub model: referring masks looked up by expression; cycle = the truth (perfect) or nothing."""

    def predict(batch):
        referring = [
            logits_of(answers[c]) if answers else logits_of(t.numpy())
            for c, t in zip(batch["captions"], batch["truths"])
        ]
        cycles = [logits_of(t.numpy() if cycle == "perfect" else np.zeros_like(t.numpy())) for t in batch["truths"]]
        return {
            "referring": torch.stack(referring),
            "cycle": torch.stack(cycles),
            "cycle_captions": ["a caption"] * len(cycles),
        }

    return predict


@pytest.fixture
def refer(tmp_path):
    refer_dir, images = write_refer(tmp_path)
    return ReferPairs(refer_dir, images, split=None, pairing="same", min_pixels=0)


def test_refcoco_eval_perfect_masks_score_one_and_bad_refs_are_counted_not_scored(refer):
    for split, expressions in (("val", 1), ("testA", 3)):
        result = evaluate_split(refer.subset(split), predictor({}), SMALL, batch_size=2, progress=False)
        assert result["expressions"] == expressions and result["skipped"] == {}
        assert result["referring"] == {"cIoU": 1.0, "gIoU": 1.0} and result["cycle"] == {"cIoU": 1.0, "gIoU": 1.0}
    # train: ref 1's two sentences are scored; ref 4 (annotation missing) is counted, not scored
    train = evaluate_split(refer.subset("train"), predictor({}), SMALL, progress=False)
    assert train["expressions"] == 2 and train["skipped"] == {"malformed_record": 1}


def test_refcoco_eval_known_partial_overlap_gives_its_exact_ciou_and_giou(refer):
    h, w = 48, 64  # image 2; the truth is rows 10:30, cols 20:40 (400 px) for all three expressions
    assert np.array_equal(MASKS[103][1], box_mask(h, w, 10, 30, 20, 40))
    answers = {
        "the box": box_mask(h, w, 10, 20, 20, 40),  # its top half: I 200, U 400
        "box in the middle": box_mask(h, w, 0, 10, 0, 10),  # disjoint, 100 px: I 0, U 500
        "middle thing": box_mask(h, w, 10, 30, 10, 40),  # a superset, 600 px: I 400, U 600
    }
    result = evaluate_split(
        refer.subset("testA"), predictor(answers, cycle="nothing"), SMALL, batch_size=2, progress=False
    )
    assert result["referring"]["cIoU"] == pytest.approx((200 + 0 + 400) / (400 + 500 + 600))
    assert result["referring"]["gIoU"] == pytest.approx((200 / 400 + 0 / 500 + 400 / 600) / 3)
    assert result["cycle"] == {"cIoU": 0.0, "gIoU": 0.0}  # predicting nothing for a real object
    assert [e["referring_IoU"] for e in result["examples"]] == pytest.approx([0.5, 0.0, 2 / 3])


class EmptyTruths:
    """Two expressions whose annotated mask is empty (a source is anything with load_target)."""

    def __len__(self):
        return 2

    def load_target(self, index):
        return Image.new("RGB", (8, 8)), np.zeros((8, 8), dtype=bool), f"nothing {index}", f"fake {index}"


def test_refcoco_eval_empty_union_scores_one_in_giou_and_nothing_in_ciou(refer):
    result = evaluate_split(EmptyTruths(), predictor({}, cycle="nothing"), SMALL, progress=False)
    assert result["referring"]["gIoU"] == 1.0 and result["referring"]["cIoU"] == 0.0  # ΣU = 0
    # mixed with the partial-overlap split's numbers, the empty ones weigh only in gIoU
    inter, union = torch.tensor([200.0, 0.0]), torch.tensor([400.0, 0.0])
    from pg_train.scores import ciou_giou

    assert ciou_giou(inter, union) == {"cIoU": 0.5, "gIoU": pytest.approx(0.75)}


def test_refcoco_eval_cli_on_a_released_format_tiny_checkpoint(tmp_path, capsys):
    from pg_train.evaluate import main
    from pg_train.model import build_model, save_pretrained

    refer_dir, images = write_refer(tmp_path)
    save_pretrained(build_model("tiny", seed=0), tmp_path / "ckpt")
    code = main(
        [
            "--checkpoint",
            str(tmp_path / "ckpt"),
            "--refer-dir",
            str(refer_dir),
            "--images",
            str(images),
            "--batch-size",
            "2",
            "--output",
            str(tmp_path / "eval"),
        ]
    )
    assert code == 0
    results = json.loads((tmp_path / "eval" / "refcoco.json").read_text())
    assert list(results["splits"]) == ["testA", "val"] and results["refs"] == "refs(unc).p"  # every split but train
    assert results["splits"]["testA"]["expressions"] == 3 and results["splits"]["val"]["expressions"] == 1
    for split in results["splits"].values():
        for kind in ("referring", "cycle"):
            assert 0.0 <= split[kind]["cIoU"] <= 1.0 and 0.0 <= split[kind]["gIoU"] <= 1.0
        assert all(isinstance(e["cycle_caption"], str) for e in split["examples"])
    out = capsys.readouterr().out
    assert "referring cIoU" in out and out.count("\ntestA ") == 1 and out.count("\nval ") == 1
    from pg_train.gallery import TEXT_HEIGHT, TILE

    for split, rows in (("testA", 3), ("val", 1)):  # a gallery per split: a row per expression (up to 8)
        assert results["splits"][split]["gallery"] == str(tmp_path / "eval" / f"gallery_{split}.png")
        with Image.open(tmp_path / "eval" / f"gallery_{split}.png") as picture:
            assert picture.size == (2 * TILE, rows * (TILE + TEXT_HEIGHT))
            left = np.asarray(picture.convert("RGB"))[:TILE, :TILE].astype(int)
        assert left.std() > 20  # the fixture's noise image is drawn, not a blank tile
