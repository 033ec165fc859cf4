"""Prompts and stopping against the real Qwen2.5 vocabulary (BPE merges the tiny tokenizer lacks).

Expected ids come from the tokenizer's own encoding of the whole prompt string, as the official
Sa2VA code builds its input (`tokenizer.encode(input_text)`), never from the code under test.
"""

import itertools

import pytest
import torch
from conftest import QWEN_SPECIAL_IDS

from pg_train.model.text.stopping import EndTextStop
from pg_train.model.text.templates import CHAT_TEMPLATES, PromptBuilder

N_IMAGE = 6  # image slots per view in these prompts (256 on Sa2VA-4B; the count does not change a seam)


def captions() -> list[str]:
    """Captions of the shapes a teacher writes: sentence case or not, punctuation at the end,
    digits, quotes, brackets, an apostrophe."""
    starts = ["a", "A", "the", "The", "two", "3", "left", "man's", '"red"', "(small)"]
    middles = ["red circle", "dog on the left", "person in a blue shirt", "cup near 2 plates", 'sign saying "stop"']
    ends = ["", ".", ",", ")", "!", '"', " ."]
    return [f"{s} {m}{e}" for s, m, e in itertools.product(starts, middles, ends)]


@pytest.fixture(scope="module")
def prompts(qwen_tokenizer):
    return PromptBuilder(
        qwen_tokenizer, QWEN_SPECIAL_IDS, N_IMAGE, "sa2va", chat_template="phi3_chat", vocab_size=151_679
    )


def image_string(n=N_IMAGE):
    return "<img>" + "<IMG_CONTEXT>" * n + "</img>"


def test_whole_string_encoding_of_the_region_prompt(prompts, qwen_tokenizer):
    for k in (1, 3, 17):
        text = (
            "<|user|>\n"
            + image_string()
            + "\nThere are 1 part regions in the picture: region1<vp>"
            + "<IMG_CONTEXT>" * k
            + "</vp>.\n\nPlease give me a short description of the region in the picture marked by region1.<|end|>\n<|assistant|>\n"
        )
        assert prompts.region_prompt(k) == qwen_tokenizer.encode(text, add_special_tokens=False)


def official_region_caption_input(k: int, num_image_tokens: int = N_IMAGE) -> str:
    """The region-caption evaluation's input text, built with the official code's own steps and
    literals (one image, one region of k cells), copied from:
    - the question: bytedance/Sa2VA (formerly magic-research/Sa2VA) @ 0d8f983602bf7eb135150db3523b471d8f4756eb,
      projects/sa2va/evaluation/region_cap_refcocog_eval.py, `RegionCapInferenceDataset.get_questions`;
    - `predict_forward` of projects/llava_sam2/hf/models/modeling_sa2va_chat.py (the file shipped
      with the released checkpoints; read from the copy in kumuji/Sa2VA-i @
      4b1f846e83cc6c2b7d719a1184f94ead02d5b38a): vp_token_str, image_token_str, text.replace;
    - xtuner's phi3_chat INSTRUCTION (config.json["template"] of Sa2VA-4B)."""
    question = "<image>\nPlease give me a short description of the region in the picture marked by region1."
    vp_token_str = "\nThere are {} part regions in the picture: ".format(1)
    vp_token_str = vp_token_str + "region1" + "<vp>" + "<IMG_CONTEXT>" * k + "</vp>"
    vp_token_str = vp_token_str + ".\n"
    image_token_str = "<img>" + "<IMG_CONTEXT>" * num_image_tokens + "</img>"
    image_token_str = image_token_str + "\n"
    image_token_str = image_token_str * 1  # num_frames
    image_token_str = image_token_str.strip()
    text = question.replace("<image>", image_token_str + vp_token_str)
    return "<|user|>\n{input}<|end|>\n<|assistant|>\n".format(input=text)


def test_region_prompt_equals_the_official_evaluation_input(prompts, qwen_tokenizer):
    assert (
        official_region_caption_input(2)
        == (  # the blank line after the region list (issue 30)
            "<|user|>\n" + image_string() + "\nThere are 1 part regions in the picture: region1<vp>"
            "<IMG_CONTEXT><IMG_CONTEXT></vp>.\n\nPlease give me a short description of the region in the picture "
            "marked by region1.<|end|>\n<|assistant|>\n"
        )
    )
    for k in (0, 1, 2, 5, 256):
        official = qwen_tokenizer.encode(official_region_caption_input(k))  # as predict_forward: plain encode
        assert prompts.region_prompt(k) == official, k


def test_whole_string_encoding_of_the_segment_prompt_with_a_caption(prompts, qwen_tokenizer):
    suffix, seg_index = prompts.segment_suffix()
    assert suffix[seg_index] == QWEN_SPECIAL_IDS["[SEG]"]
    for caption in captions():
        ours = prompts.segment_prefix() + prompts.segment_caption_ids(caption) + suffix
        text = (
            "<|user|>\n"
            + image_string()
            + f"\nPlease segment {caption} in this image.<|end|>\n<|assistant|>\nIt is [SEG].<|end|>"
        )
        assert ours == qwen_tokenizer.encode(text, add_special_tokens=False), caption


def test_whole_string_encoding_of_answers_with_the_end_text(prompts, qwen_tokenizer):
    for caption in captions():
        assert prompts.answer_ids(caption, with_end=True) == qwen_tokenizer.encode(
            caption + "<|end|>", add_special_tokens=False
        )
        assert prompts.answer_ids(caption) == qwen_tokenizer.encode(caption, add_special_tokens=False)
    # The old splice: the caption's ids followed by the end text's own ids differs for almost all.
    end_alone = qwen_tokenizer.encode("<|end|>", add_special_tokens=False)
    differ = sum(prompts.answer_ids(c) + end_alone != prompts.answer_ids(c, with_end=True) for c in captions())
    assert differ > len(captions()) // 2


def test_whole_string_encoding_of_generated_captions_read_in_the_segment_prompt(prompts, qwen_tokenizer):
    """A teacher caption's ids are answer ids (`a`), the segment prompt reads `Ġa`: the first id
    goes through its leading-space twin, or a separate space id when it has none."""
    lead = prompts.leading_space
    exact = 0
    for caption in captions():
        answer = prompts.answer_ids(caption)
        first = answer[0]
        read = ([lead.space_id] if lead.needs_slot[first] else []) + [int(lead.twin[first])] + answer[1:]
        whole = qwen_tokenizer.encode(" " + caption, add_special_tokens=False)
        first_word_is_one_id = len(qwen_tokenizer.encode(caption.split(" ")[0], add_special_tokens=False)) == 1
        if first_word_is_one_id:
            assert read == whole, caption
        exact += read == whole
    assert exact >= 0.8 * len(captions())


@pytest.mark.parametrize("template", sorted(CHAT_TEMPLATES))
def test_whole_string_encoding_for_every_chat_template(template, qwen_tokenizer):
    chat = CHAT_TEMPLATES[template]
    prompts = PromptBuilder(
        qwen_tokenizer, QWEN_SPECIAL_IDS, N_IMAGE, "sa2va", chat_template=template, vocab_size=151_679
    )
    text = (
        chat.user_start
        + image_string()
        + "\nThere are 1 part regions in the picture: region1<vp><IMG_CONTEXT></vp>.\n\n"
        "Please give me a short description of the region in the picture marked by region1." + chat.assistant_start
    )
    assert prompts.region_prompt(1) == qwen_tokenizer.encode(text, add_special_tokens=False)
    caption = "a dog on the left."
    assert prompts.answer_ids(caption, with_end=True) == qwen_tokenizer.encode(
        caption + chat.end_text, add_special_tokens=False
    )


# ---- stopping ------------------------------------------------------------------------------------
class ScriptedHead(torch.nn.Module):
    """An lm_head that makes row b emit scripts[b][t] at step t (then eos), whatever the input."""

    def __init__(self, scripts: list[list[int]], vocab: int, eos: int):
        super().__init__()
        self.scripts, self.vocab, self.eos, self.step = scripts, vocab, eos, 0

    def forward(self, hidden):
        logits = torch.zeros(hidden.shape[0], self.vocab)
        for b, script in enumerate(self.scripts):
            logits[b, script[self.step] if self.step < len(script) else self.eos] = 1.0
        self.step += 1
        return logits


def tiny_real_vocab_lm():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=151_679,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
    )
    config._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(config).eval()


def generate_scripted(
    qwen_tokenizer, scripts, stop, min_new_tokens=0, check_every=None, max_new_tokens=16, static_cache=False
):
    from pg_train.model.decoding.generate import generate_from_embeds

    lm = tiny_real_vocab_lm()
    lm.lm_head = ScriptedHead(scripts, 151_679, QWEN_SPECIAL_IDS["<|im_end|>"])
    embeds = torch.randn(len(scripts), 3, 16)
    return generate_from_embeds(
        lm,
        embeds,
        torch.ones(len(scripts), 3, dtype=torch.long),
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        eos_token_id=QWEN_SPECIAL_IDS["<|im_end|>"],
        pad_token_id=151_643,
        stop=stop,
        check_every=check_every,
        static_cache=static_cache,
    )


def as_ids(tok, pieces: list[str]) -> list[int]:
    ids = tok.convert_tokens_to_ids(pieces)
    assert None not in ids and tok.unk_token_id not in ids
    return ids


@pytest.mark.parametrize("check_every, static_cache", [(1, False), (4, False), (4, True)])
def test_stop_on_end_text_cuts_before_the_tag_whatever_bpe_glued_to_it(qwen_tokenizer, check_every, static_cache):
    tok = qwen_tokenizer
    cases = {  # what the model generates (the whole-string BPE of text + <|end|>) -> the caption
        "A red circle.": tok.encode("A red circle.<|end|>", add_special_tokens=False),  # `.<`
        "small, big,": tok.encode("small, big,<|end|>", add_special_tokens=False),  # `,<`
        "the (left)": tok.encode("the (left)<|end|>", add_special_tokens=False),  # `)<`
        'said "hi"': tok.encode('said "hi"<|end|>', add_special_tokens=False),  # `"<`
        "a cat": tok.encode("a cat <|end|>", add_special_tokens=False),  # `Ġ<|`
        "a dog": tok.encode("a dog", add_special_tokens=False)
        + as_ids(tok, ["<", "|", "end", "|", ">"]),  # the tag in 5 ids
        "two cups": tok.encode("two cups", add_special_tokens=False)
        + as_ids(tok, ["Ġ<|", "end", "|", ">Ċ"]),  # and a newline after
    }
    expected = {}
    scripts = list(cases.values())
    assert any(".<" in tok.convert_ids_to_tokens(s) for s in scripts)
    stop = EndTextStop(tok, "<|end|>", QWEN_SPECIAL_IDS["<|im_end|>"], 151_679)
    tokens, lengths = generate_scripted(tok, scripts, stop, check_every=check_every, static_cache=static_cache)
    end_alone = tok.encode("<|end|>", add_special_tokens=False)
    assert sum(end_alone == s[-len(end_alone) :] for s in scripts) <= 2, (
        "the id sequence of <|end|> alone rarely appears"
    )
    for row, text in enumerate(cases):
        want = expected.get(text, text)
        got = tokens[row, : lengths[row]].tolist()
        assert got == tok.encode(want, add_special_tokens=False), (text, tok.decode(got))
        assert (tokens[row, lengths[row] :] == 151_643).all()


def test_stop_on_end_text_only_after_min_new_tokens(qwen_tokenizer):
    tok = qwen_tokenizer
    stop = EndTextStop(tok, "<|end|>", QWEN_SPECIAL_IDS["<|im_end|>"], 151_679)
    # The script wants to end at once; with a minimum of 2 ids the first two may not start the tag.
    script = tok.encode("<|end|>", add_special_tokens=False)
    tokens, lengths = generate_scripted(tok, [script], stop, min_new_tokens=2, max_new_tokens=6)
    got = tokens[0, : lengths[0]].tolist()
    assert len(got) >= 2
    assert "<|end|>" not in tok.decode(got) and "<" not in tok.decode(got[:2])


def test_stop_on_end_text_state_table_matches_a_text_search(qwen_tokenizer):
    """The automaton's verdict for random id sequences equals searching the decoded bytes."""
    tok = qwen_tokenizer
    stop = EndTextStop(tok, "<|end|>", None, 151_679)
    g = torch.Generator().manual_seed(0)
    pool = tok.encode("a.<|end|> b <|end ,<| end|> |>x <|e", add_special_tokens=False)
    for _ in range(300):
        seq = [pool[i] for i in torch.randint(len(pool), (8,), generator=g).tolist()]
        state = stop.initial(1, torch.device("cpu"))
        matched_at = None
        for t, token_id in enumerate(seq):
            state = stop.advance(state, torch.tensor([token_id]))
            if matched_at is None and stop.matched(state).item():
                matched_at = t
        text = b""
        search_at = None
        for t, token_id in enumerate(seq):
            text += stop.pieces[token_id]
            if search_at is None and b"<|end|>" in text:
                search_at = t
        assert matched_at == search_at, tok.convert_ids_to_tokens(seq)


# ---- the chat template a checkpoint names ---------------------------------------------------------
@pytest.mark.parametrize("template", ["qwen_chat", "phi3_chat"])
def test_config_template_of_a_checkpoint_decides_its_prompts(tmp_path, template):
    import json

    from pg_train.model import build_model
    from pg_train.model.io.checkpoint import from_pretrained, save_pretrained

    save_pretrained(build_model("tiny", seed=0, lora=False), tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["template"] = template
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    model = from_pretrained(tmp_path / "ckpt", lora=False)
    tok = model.tokenizer
    chat = CHAT_TEMPLATES[template]
    region = model.prompts.region_prompt(1)
    assert region[: len(tok.encode(chat.user_start, add_special_tokens=False))] == tok.encode(
        chat.user_start, add_special_tokens=False
    )
    assert model.prompts.stop.end_text == chat.end_text
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert (im_start in region) == (template == "qwen_chat")


def test_config_template_unknown_is_an_error_naming_it(tmp_path):
    import json

    from pg_train.model import build_model
    from pg_train.model.io.checkpoint import from_pretrained, save_pretrained

    save_pretrained(build_model("tiny", seed=0, lora=False), tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["template"] = "vicuna"
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="vicuna"):
        from_pretrained(tmp_path / "ckpt", lora=False)
