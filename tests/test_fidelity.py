"""The options that reproduce the official Sa2VA code where pg_train chose otherwise (issue 30,
items 4-7; docs/fidelity.md), each pinned both ways.

The references are the official code's behaviour transcribed literally (never pg_train's own
outputs), from the Sa2VA Hugging Face code as stored copies carry it:
- `StopWordStoppingCriteria`, `preparing_for_generation` (stop words, min 1 / max 12 /
  thumbnail) and `predict_forward` (`tokenizer.encode(input_text)`; SAM2 pixels cast to bf16
  before `preprocess_image`): projects/llava_sam2/hf/models/modeling_sa2va_chat.py, read at
  kumuji/Sa2VA-i@4b1f846e83cc6c2b7d719a1184f94ead02d5b38a (a fork of magic-research/Sa2VA);
- `SAM2.preprocess_image(image, dtype=torch.bfloat16)`: projects/llava_sam2/hf/models/sam2.py,
  amogh-w/Sa2VA-i@9e501e0b7460d4defd7433a578190cb7281f0652; the training runner's
  `preprocess_image` (dtype of the image: float32 for uint8 / 255.):
  bytedance/Sa2VA@0d8f983602bf7eb135150db3523b471d8f4756eb projects/sa2va/models/sam2_train.py;
- STOP_WORDS (phi3_chat `<|end|>`; qwen_chat `<|im_end|>`, `<|endoftext|>`): xtuner's
  PROMPT_TEMPLATE, InternLM/xtuner@00fa897e3588753d5dcd633999cd8993890d73da
  xtuner/utils/templates.py (Sa2VA's templates copy it and add phi3_chat).
"""

import json

import numpy as np
import pytest
import torch
from conftest import QWEN_SPECIAL_IDS
from PIL import Image

from pg_train.model.text.stopping import EndTextStop
from pg_train.model.text.templates import PromptBuilder

N_IMAGE = 4
EOS = QWEN_SPECIAL_IDS["<|im_end|>"]
ENDOFTEXT = 151643


# ---- item 4: the stop rule -----------------------------------------------------------------------
def official_stop_step(tokenizer, ids: list[int], stop_words: list[str], eos: int) -> int | None:
    """Tokens generated when the official generation stops: eos (generation_config), or
    StopWordStoppingCriteria on the decoded text, transcribed:
        cur_text = self.tokenizer.decode(input_ids[0])
        cur_text = cur_text.replace('\\r', '').replace('\\n', '')
        return cur_text[-self.length:] == self.stop_word
    (input_ids are the generated ids: generation from inputs_embeds)."""
    for t in range(1, len(ids) + 1):
        if ids[t - 1] == eos:
            return t
        cur_text = tokenizer.decode(ids[:t]).replace("\r", "").replace("\n", "")
        if any(cur_text[-len(word) :] == word for word in stop_words):
            return t
    return None


def contains_stop_step(tokenizer, ids: list[int], end_text: str, eos: int) -> int | None:
    """pg_train's default rule, as documented: eos, or the decoded caption containing the end text."""
    for t in range(1, len(ids) + 1):
        if ids[t - 1] == eos or end_text in tokenizer.decode(ids[:t]):
            return t
    return None


def automaton_stop_step(stop: EndTextStop, ids: list[int]) -> int | None:
    states = stop.initial(1, torch.device("cpu"))
    for t, token in enumerate(ids, start=1):
        states = stop.advance(states, torch.tensor([token]))
        if bool(stop.matched(states)):
            return t
    return None


CAPTIONS = ["a red circle", "the dog on the left.", "man's hat", '"stop" sign', "two cups (small)"]
# Endings where the two rules agree, and the edges where they differ.
ENDINGS = [
    "<|end|>",
    " <|end|>",
    "<|end|>\n",
    "<|end|>\n\nmore text",
    "\n<|end|>",
    "<|en\nd|>",  # newlines inside the end text: the official rule still stops
    "<|end\r\n|>\n",
    "<|end|>.",  # a character glued after the end text: only `contains` stops here
    "<|end|>. Then more<|end|>",
    "<|end|>x and so on",
    " no end at all",
]


def sequences(tokenizer):
    for caption in CAPTIONS:
        for ending in ENDINGS:
            yield (
                caption + ending,
                tokenizer(caption + ending, add_special_tokens=False, split_special_tokens=True)["input_ids"],
            )


@pytest.fixture(scope="module")
def phi3_stops(qwen_tokenizer):
    return {
        rule: PromptBuilder(
            qwen_tokenizer, QWEN_SPECIAL_IDS, N_IMAGE, chat_template="phi3_chat", vocab_size=151_679, stop_rule=rule
        ).stop
        for rule in ("contains", "official")
    }


def test_stop_rule_official_stops_where_the_official_criterion_does(qwen_tokenizer, phi3_stops):
    differ = 0
    for text, ids in sequences(qwen_tokenizer):
        official = official_stop_step(qwen_tokenizer, ids, ["<|end|>"], EOS)
        assert automaton_stop_step(phi3_stops["official"], ids) == official, text
        contains = contains_stop_step(qwen_tokenizer, ids, "<|end|>", EOS)
        assert automaton_stop_step(phi3_stops["contains"], ids) == contains, text
        differ += official != contains
    # the edges exist in this set: newlines inside the tag, a character glued after it
    assert differ >= 2 * len(CAPTIONS)


def test_stop_rule_official_trim_cuts_the_official_text_before_its_stop_word(qwen_tokenizer, phi3_stops):
    """The caption kept is the official prediction's text up to the stop word it ends with
    (newlines inside the tag skipped, as its criterion skips them), trailing whitespace aside."""
    stop = phi3_stops["official"]
    for text, ids in sequences(qwen_tokenizer):
        step = official_stop_step(qwen_tokenizer, ids, ["<|end|>"], EOS)
        if step is None:
            continue
        raw = qwen_tokenizer.decode(ids[:step])
        cut = next(p for p in range(len(raw), -1, -1) if raw[p:].replace("\r", "").replace("\n", "") == "<|end|>")
        (caption,) = stop.trim(torch.tensor([ids]), torch.tensor([step]), max_len=64)
        # (a newline glued to the last kept id, `.\n`, stays in that id: compared without it)
        assert qwen_tokenizer.decode(caption).rstrip() == raw[:cut].rstrip(), text


def test_stop_rule_official_stops_on_every_qwen_chat_stop_word(qwen_tokenizer):
    """qwen_chat: `<|im_end|>` (eos) and `<|endoftext|>` stop the official generation, as ids or
    spelt in text; `contains` stops on the end text alone and its decoding suppresses the second."""
    stops = {
        rule: PromptBuilder(
            qwen_tokenizer, QWEN_SPECIAL_IDS, N_IMAGE, chat_template="qwen_chat", vocab_size=151_679, stop_rule=rule
        ).stop
        for rule in ("contains", "official")
    }
    words = ["<|im_end|>", "<|endoftext|>"]
    for caption in CAPTIONS:
        plain = qwen_tokenizer(caption, add_special_tokens=False)["input_ids"]
        for ids in (
            plain + [ENDOFTEXT, 11, 12],
            plain + [EOS],
            plain + qwen_tokenizer("<|endoftext|>x", split_special_tokens=True)["input_ids"],
        ):
            assert automaton_stop_step(stops["official"], ids) == official_stop_step(qwen_tokenizer, ids, words, EOS)
    assert set(stops["official"].stop_token_ids.tolist()) == {EOS, ENDOFTEXT}
    assert set(stops["contains"].stop_token_ids.tolist()) == {EOS}
    ids = qwen_tokenizer("a cat", add_special_tokens=False)["input_ids"] + [ENDOFTEXT, 11]
    assert automaton_stop_step(stops["contains"], ids) is None


class _Favour(torch.nn.Module):
    """lm_head plus a fixed logit bias: the teacher's next token is decided by the test."""

    def __init__(self, head, bias):
        super().__init__()
        self.head, self.bias = head, bias

    def forward(self, hidden):
        return self.head(hidden) + self.bias.to(hidden.dtype)


def test_stop_rule_config_switch_reaches_the_teacher():
    """A qwen_chat teacher that wants `<|endoftext|>` after its first two tokens: the official
    rule lets it end the caption there; `contains` suppresses it and the caption runs to the
    length limit. The switch comes from the config as a run builds its model."""
    from pg_train.config import ConfigError, load_config
    from pg_train.objectives.settings import PseudoGumbelConfig
    from pg_train.objectives.teacher import generate_pseudo_tokens_with_ema
    from pg_train.train import build_student

    cfg = PseudoGumbelConfig(min_caption_len=2, max_caption_len=6)
    lengths = {}
    for rule in ("official", "contains"):
        model = build_student(load_config(overrides=[f"model.stop_rule={rule}", "model.chat_template=qwen_chat"]))
        assert model.prompts.stop.rule == rule and model.prompts.chat_template == "qwen_chat"
        endoftext = model.tokenizer.convert_tokens_to_ids("<|endoftext|>")
        plain = model.tokenizer("red", add_special_tokens=False)["input_ids"][0]
        bias = torch.zeros(model.preset.language.vocab_size)
        bias[endoftext], bias[plain] = 1e4, 5e3
        model.language_model.lm_head = _Favour(model.language_model.lm_head, bias)
        cells = torch.zeros(1, model.grid_size, model.grid_size, dtype=torch.bool)
        cells[0, 3, 4] = True
        ids, length = generate_pseudo_tokens_with_ema(model, torch.zeros(1, 3, 448, 448), cells, cfg)
        lengths[rule] = int(length[0])
        assert ids[0, : lengths[rule]].tolist() == [plain] * lengths[rule]
    assert lengths == {"official": 2, "contains": 6}
    assert build_student(load_config()).prompts.stop.rule == "contains"
    with pytest.raises(ConfigError, match="model.stop_rule"):
        load_config(overrides=["model.stop_rule=endswith"])


# ---- item 5: special-token strings inside caption text -------------------------------------------
SPECIAL_CAPTIONS = ["[SEG] word", "the <p>red</p> ball", "a <ref>cat</ref> on the left", "x<|im_end|> y", "plain words"]


def official_segment_prompt(caption: str) -> str:
    image = "<img>" + "<IMG_CONTEXT>" * N_IMAGE + "</img>"
    return f"<|user|>\n{image}\nPlease segment {caption} in this image.<|end|>\n<|assistant|>\nIt is [SEG].<|end|>"


def segment_ids(prompts, caption):
    suffix, _ = prompts.segment_suffix()
    return prompts.segment_prefix() + prompts.segment_caption_ids(caption) + suffix


def test_caption_special_tokens_ids_encode_as_the_official_whole_string(qwen_tokenizer):
    """`ids`: the official predict_forward's `tokenizer.encode(input_text)` of the whole prompt
    (special-token strings in the caption become their ids); `text`: the caption as plain text."""
    by_ids = PromptBuilder(qwen_tokenizer, QWEN_SPECIAL_IDS, N_IMAGE, vocab_size=151_679, caption_special_tokens="ids")
    as_text = PromptBuilder(qwen_tokenizer, QWEN_SPECIAL_IDS, N_IMAGE, vocab_size=151_679)
    for caption in SPECIAL_CAPTIONS:
        official = qwen_tokenizer.encode(official_segment_prompt(caption), add_special_tokens=False)
        assert segment_ids(by_ids, caption) == official, caption
        plain = qwen_tokenizer(" " + caption, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert as_text.segment_caption_ids(caption) == plain, caption
        assert (segment_ids(as_text, caption) == official) == (caption == "plain words"), caption
        assert by_ids.answer_ids(caption) == qwen_tokenizer.encode(caption, add_special_tokens=False)
    assert QWEN_SPECIAL_IDS["[SEG]"] in by_ids.answer_ids("[SEG] word")
    assert QWEN_SPECIAL_IDS["[SEG]"] not in as_text.answer_ids("[SEG] word")


def test_caption_special_tokens_ids_keep_image_and_region_slots_as_text(qwen_tokenizer):
    """A slot token as an id would take an image feature (the slot count check refuses it)."""
    by_ids = PromptBuilder(qwen_tokenizer, QWEN_SPECIAL_IDS, N_IMAGE, vocab_size=151_679, caption_special_tokens="ids")
    for slot in ("<IMG_CONTEXT>", "<vp>", "</img>"):
        ids = by_ids.answer_ids(f"a {slot} [SEG] b")
        assert QWEN_SPECIAL_IDS[slot] not in ids and QWEN_SPECIAL_IDS["[SEG]"] in ids


def test_caption_special_tokens_config_switch():
    from pg_train.config import ConfigError, load_config
    from pg_train.train import build_student

    model = build_student(load_config(overrides=["model.caption_special_tokens=ids"]))
    seg = model.token_ids["[SEG]"]
    assert seg in model.prompts.answer_ids("[SEG] red") and model.prompts.caption_special_tokens == "ids"
    assert seg not in build_student(load_config()).prompts.answer_ids("[SEG] red")
    with pytest.raises(ConfigError, match="model.caption_special_tokens"):
        load_config(overrides=["model.caption_special_tokens=tokens"])


# ---- item 6: SAM2 pixel normalisation ------------------------------------------------------------
def official_sam2_pixels(image: Image.Image, size: int, inference: bool) -> torch.Tensor:
    """predict_forward's grounding image (DirectResize, then uint8 -> torch_dtype=bf16) through
    the HF SAM2.preprocess_image(dtype=torch.bfloat16); or (inference=False) the training
    runner's preprocess_image of the uint8 tensor (dtype=image.dtype after / 255.: float32)."""
    from torchvision.transforms.functional import to_pil_image

    g_image = np.array(to_pil_image(np.array(image), mode="RGB").resize((size, size)))
    pixels = torch.from_numpy(g_image).permute(2, 0, 1).contiguous()
    if inference:
        pixels = pixels.to(torch.bfloat16)
    image = pixels / 255.0
    dtype = torch.bfloat16 if inference else image.dtype
    img_mean = torch.tensor((0.485, 0.456, 0.406), dtype=dtype)[:, None, None]
    img_std = torch.tensor((0.229, 0.224, 0.225), dtype=dtype)[:, None, None]
    image -= img_mean
    image /= img_std
    return image


def test_sam2_normalise_float32_is_the_official_training_and_bfloat16_its_inference():
    from pg_train.data.images import image_tensor

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (90, 130, 3), dtype=np.uint8))
    fp32 = image_tensor(image, 128)
    bf16 = image_tensor(image, 128, "bfloat16")
    assert fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    assert torch.equal(fp32, official_sam2_pixels(image, 128, inference=False))
    assert torch.equal(bf16, official_sam2_pixels(image, 128, inference=True))
    # the two differ by rounding only: three roundings against one, at most two bf16 steps
    # (2**-6 each for |x| in [2, 4)) from the float32 values cast to bf16
    diff = (bf16.float() - fp32.to(torch.bfloat16).float()).abs().max()
    assert 0 < diff <= 2**-5


def test_sam2_normalise_config_switch_reaches_the_data():
    from pg_train.config import ConfigError, load_config
    from pg_train.data.loader import PairDataset, preprocess_for
    from pg_train.data.synthetic import SyntheticPairs
    from pg_train.train import build_student

    for value, dtype in (("bfloat16", torch.bfloat16), (None, torch.float32)):
        model = build_student(load_config(overrides=[f"model.sam2_normalise={json.dumps(value)}"]))
        preprocess = preprocess_for(model.preset)
        item = PairDataset(SyntheticPairs(num_samples=2, image_size=128), preprocess)[0]
        assert item["sam_pixel_values2"].dtype == dtype
    with pytest.raises(ConfigError, match="model.sam2_normalise"):
        load_config(overrides=["model.sam2_normalise=float16"])


# ---- item 7: tiling keys -------------------------------------------------------------------------
def test_tiling_official_ignores_config_json_as_predict_forward_does(tmp_path):
    """A checkpoint whose config.json says 2..4 tiles without thumbnail: `config` follows it, the
    official predict_forward (and `model.tiling=official`) cuts 1..12 tiles + thumbnail."""
    from test_tiling import internvl_layout

    from pg_train.config import ConfigError, load_config
    from pg_train.data.loader import preprocess_for
    from pg_train.model import build_model
    from pg_train.model.io.checkpoint import save_pretrained
    from pg_train.train import build_student

    save_pretrained(build_model("tiny", seed=0, lora=False), tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "config.json"
    config = json.loads(path.read_text())
    config.update(dynamic_image_size=True, min_dynamic_patch=2, max_dynamic_patch=4, use_thumbnail=False)
    path.write_text(json.dumps(config))
    for tiling, expected in (("config", (2, 4, False)), ("official", (1, 12, True))):
        cfg = load_config(overrides=[f"model.checkpoint={tmp_path / 'ckpt'}", f"model.tiling={tiling}"])
        views = preprocess_for(build_student(cfg).preset).tiling
        assert (views.dynamic, views.min_num, views.max_num, views.use_thumbnail) == (True, *expected)
        for size in ((640, 480), (1920, 1080), (300, 200)):
            assert views.num_views(*size) == internvl_layout(*size, *expected[:2], 448, expected[2])[0]
    with pytest.raises(ConfigError, match="model.tiling"):
        load_config(overrides=["model.tiling=official", "model.max_dynamic_patch=6"])
    with pytest.raises(ConfigError, match="model.tiling"):
        load_config(overrides=["model.tiling=released"])
