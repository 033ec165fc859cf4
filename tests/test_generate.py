"""Caption decoding with a static KV cache (buffers allocated once, fixed-shape steps: what CUDA
graph capture needs) gives exactly the tokens of the dynamic-cache decoding."""

import pytest
import torch
from conftest import make_batch, with_lora_weights

from pg_train.ema import EMATeacher
from pg_train.model import build_model
from pg_train.model.decoding.generate import generate_from_embeds
from pg_train.model.text.regions import region_cells
from pg_train.objectives.passes import region_prompts
from pg_train.objectives.settings import PseudoGumbelConfig
from pg_train.objectives.teacher import generate_pseudo_tokens_with_ema


@pytest.fixture(scope="module")
def model():
    return with_lora_weights(build_model("tiny", seed=0)).eval()


def prompt_embeds(model, batch_size=3, seed=0):
    pixel_values, _, masks = make_batch(model, batch_size, seed)
    cells, _ = region_cells(masks, model.grid_size)
    assert len(set(cells.flatten(1).sum(1).tolist())) > 1, "left padding needs different K"
    ids, attention = region_prompts(model, cells, None)
    return model.embed_with_images(ids, model.extract_feature(pixel_values), cells), attention, pixel_values, cells


@pytest.mark.parametrize("sampled", [False, True])
def test_static_cache_decoding_equals_dynamic_token_for_token(model, sampled):
    embeds, attention, _, _ = prompt_embeds(model)
    out = {}
    for static in (False, True):
        out[static] = generate_from_embeds(
            model.language_model,
            embeds,
            attention,
            max_new_tokens=12,
            min_new_tokens=2,
            eos_token_id=model.eos_token_id,
            pad_token_id=model.tokenizer.pad_token_id,
            stop=model.prompts.stop,
            do_sample=sampled,
            temperature=1.5,
            generator=torch.Generator().manual_seed(3),
            static_cache=static,
        )
    assert torch.equal(out[False][0], out[True][0]) and torch.equal(out[False][1], out[True][1])


def test_static_cache_decoding_stops_where_the_dynamic_one_does(model):
    """Only eos and one word allowed: rows stop at different steps; the static path pads the same."""
    embeds, attention, _, _ = prompt_embeds(model, seed=1)
    vocab = model.preset.language.vocab_size
    keep = torch.zeros(vocab, dtype=torch.bool)
    keep[[model.eos_token_id, *model.tokenizer.encode("red blue", add_special_tokens=False)]] = True
    out = [
        generate_from_embeds(
            model.language_model,
            embeds,
            attention,
            max_new_tokens=10,
            eos_token_id=model.eos_token_id,
            pad_token_id=model.tokenizer.pad_token_id,
            suppress_token_ids=(~keep).nonzero().flatten(),
            stop=model.prompts.stop,
            static_cache=static,
        )
        for static in (False, True)
    ]
    assert torch.equal(out[0][0], out[1][0]) and out[0][1].tolist() == out[1][1].tolist()


@pytest.mark.parametrize("placement", ["same", "cpu", "full:cpu"])
def test_static_cache_teacher_captions_for_every_ema_placement(placement):
    student = with_lora_weights(build_model("tiny", seed=0))
    ema = EMATeacher(student, decay=0.5, placement=placement)
    with torch.no_grad():  # the student moves away from the shadow: a teacher that is the student would differ
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.add_(0.05)
    _, _, _, cells = prompt_embeds(student)
    pixel_values, _, _ = make_batch(student, 3, 0)
    captions = {}
    for static in (False, True):
        cfg = PseudoGumbelConfig(max_caption_len=10, static_cache=static)
        captions[static] = generate_pseudo_tokens_with_ema(ema, pixel_values, cells, cfg, student=student)
    assert torch.equal(captions[False][0], captions[True][0]) and torch.equal(captions[False][1], captions[True][1])
    plain = generate_pseudo_tokens_with_ema(
        student, pixel_values, cells, PseudoGumbelConfig(max_caption_len=10, static_cache=True)
    )
    assert not torch.equal(plain[0], captions[True][0]), "the test needs the teacher to differ from the student"


# ---- the bucketed, graph-ready step (cuda_graphs: captured on CUDA, the same step eagerly here) ----
from pg_train.model.decoding import graph_decode  # noqa: E402

# CUDA's bucket policy, and a coarse one (a prompt of ~380 ids padded to 512 on the left, 3 rows to 4)
POLICIES = {"cuda": graph_decode.BucketPolicy(), "coarse": graph_decode.BucketPolicy(prompt_multiple=256)}


@pytest.fixture(params=list(POLICIES))
def cuda_buckets_on_cpu(request, monkeypatch):
    """Off CUDA the default is exact shapes; here the CPU pads batches and prompts like the GPU."""
    monkeypatch.setitem(graph_decode.POLICIES, "cpu", POLICIES[request.param])
    return POLICIES[request.param]


def decode(model, embeds, attention, path, **kwargs):
    static, graphs = {"dynamic": (False, False), "static": (True, False), "graph": (True, True)}[path]
    return generate_from_embeds(
        model.language_model,
        embeds,
        attention,
        eos_token_id=model.eos_token_id,
        pad_token_id=model.tokenizer.pad_token_id,
        static_cache=static,
        cuda_graphs=graphs,
        **kwargs,
    )


def test_static_cache_bucket_policy_rounds_batches_to_powers_of_two_and_prompts_by_at_most_a_quarter():
    policy = graph_decode.BucketPolicy()
    assert [policy.batch(b) for b in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]
    assert [policy.prompt(p) for p in (1, 64, 65, 300, 383, 600, 3500)] == [64, 64, 128, 320, 384, 640, 3584]
    for p in range(1, 5000, 7):
        assert p <= policy.prompt(p) <= max(p + 63, 1.25 * p)
    assert graph_decode.EXACT.batch(3) == 3 and graph_decode.EXACT.prompt(383) == 383
    assert graph_decode.policy_for(torch.device("cpu")) is graph_decode.EXACT  # unless a test says otherwise


@pytest.mark.parametrize("sampled", [False, True])
def test_static_cache_graph_step_equals_todays_decoding_token_for_token(model, cuda_buckets_on_cpu, sampled):
    embeds, attention, _, _ = prompt_embeds(model)
    # the region prompts are 384 ids, a whole bucket of the CUDA policy; one id less (the longest
    # row's first) makes every bucket pad on the left, which is what this test is about
    embeds, attention = embeds[:, 1:], attention[:, 1:]
    assert graph_decode.policy_for(embeds.device).prompt(embeds.shape[1]) > embeds.shape[1]  # more left padding
    assert graph_decode.policy_for(embeds.device).batch(3) == 4  # and a dummy row
    for check_every in (1, 4):
        out = {
            path: decode(
                model,
                embeds,
                attention,
                path,
                max_new_tokens=12,
                min_new_tokens=2,
                stop=model.prompts.stop,
                do_sample=sampled,
                temperature=1.5,
                top_k=50 if sampled else 0,
                generator=torch.Generator().manual_seed(3),
                check_every=check_every,
            )
            for path in ("dynamic", "static", "graph")
        }
        for path in ("static", "graph"):
            assert torch.equal(out["dynamic"][0], out[path][0]) and torch.equal(out["dynamic"][1], out[path][1])


def forced_stops(model):
    """Only eos and two words allowed: rows stop at different steps."""
    vocab = model.preset.language.vocab_size
    keep = torch.zeros(vocab, dtype=torch.bool)
    keep[[model.eos_token_id, *model.tokenizer.encode("red blue", add_special_tokens=False)]] = True
    return (~keep).nonzero().flatten()


@pytest.fixture(scope="module")
def stopping_model(model):
    """The tiny model with eos's lm_head row next to `blue`'s: with forced_stops, one row of
    prompt_embeds(seed=1) stops at step 3 and the others run to the end."""
    import copy

    stopping = copy.deepcopy(model)
    W = stopping.language_model.lm_head.weight
    blue = model.tokenizer.encode("red blue", add_special_tokens=False)[-1]
    noise = torch.randn(W.shape[1], generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        W[model.eos_token_id] = W[blue] + 0.06 * noise * W[blue].norm() / W.shape[1] ** 0.5
    return stopping


@pytest.mark.parametrize("with_stop", [True, False])
def test_static_cache_graph_step_stops_where_todays_decoding_does(stopping_model, cuda_buckets_on_cpu, with_stop):
    model = stopping_model
    embeds, attention, _, _ = prompt_embeds(model, seed=1)
    kwargs = dict(
        max_new_tokens=10, suppress_token_ids=forced_stops(model), stop=model.prompts.stop if with_stop else None
    )
    today = decode(model, embeds, attention, "dynamic", **kwargs)
    graph = decode(model, embeds, attention, "graph", **kwargs)
    assert torch.equal(today[0], graph[0]) and today[1].tolist() == graph[1].tolist()
    assert len(set(today[1].tolist())) > 1 and min(today[1].tolist()) < 10, "rows must stop at different steps"


def test_static_cache_graph_step_reuses_its_bucket_for_other_k_and_batch_sizes(stopping_model, monkeypatch):
    """One bucket serves batches of other K (prompt length) and size; its buffers keep their
    addresses (what a captured graph reads) and the captions handed out are copies."""
    model = stopping_model
    monkeypatch.setitem(graph_decode.POLICIES, "cpu", POLICIES["coarse"])
    graph_decode.release(model.language_model)
    batches = [prompt_embeds(model, 3, seed=0)[:2], prompt_embeds(model, 4, seed=1)[:2]]  # K up to 383, 440
    batches.append((batches[0][0][:1, -330:], batches[0][1][:1, -330:]))  # one row, a shorter prompt
    policy = graph_decode.policy_for(torch.device("cpu"))
    assert {(policy.batch(e.shape[0]), policy.prompt(e.shape[1])) for e, _ in batches} == {(4, 512), (1, 512)}
    assert batches[0][0].shape[1] != batches[1][0].shape[1]
    kwargs = dict(max_new_tokens=8, min_new_tokens=1, stop=model.prompts.stop, suppress_token_ids=forced_stops(model))
    first = None
    addresses = None
    for _ in range(2):
        for embeds, attention in batches:
            today = decode(model, embeds, attention, "dynamic", **kwargs)
            graph = decode(model, embeds, attention, "graph", **kwargs)
            assert torch.equal(today[0], graph[0]) and torch.equal(today[1], graph[1])
            if first is None:
                first = graph[0], graph[0].clone()
            buckets = graph_decode.buckets_of(model.language_model)
            assert len(buckets) <= 2
            big = next(b for b in buckets if b.batch == 4)
            layer = big.cache.layers[0]
            now = [t.data_ptr() for t in (big.mask, big.tokens, big.ids, big.t, big.finished, layer.keys, layer.values)]
            addresses = addresses or now
            assert now == addresses
    assert torch.equal(*first), "a later call must not write into captions already handed out"


class HostReadTrap:
    """Fail on any read of a tensor's value by the host (what a CUDA graph cannot contain)."""

    NAMES = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__")

    def __enter__(self):
        self.saved = {name: getattr(torch.Tensor, name) for name in self.NAMES}

        def trap(name):
            def raise_(*args, **kwargs):
                raise AssertionError(f"the decoding step read a tensor on the host (Tensor.{name})")

            return raise_

        for name in self.NAMES:
            setattr(torch.Tensor, name, trap(name))
        return self

    def __exit__(self, *args):
        for name, fn in self.saved.items():
            setattr(torch.Tensor, name, fn)


def test_static_cache_graph_step_is_fixed_shape_in_place_and_reads_nothing_on_the_host(model, monkeypatch):
    from pg_train.model.decoding.graph_decode import DecodeRules, decode_step, get_bucket, prefill

    monkeypatch.setitem(graph_decode.POLICIES, "cpu", POLICIES["cuda"])
    embeds, attention, _, _ = prompt_embeds(model)
    lm = model.language_model
    rules = DecodeRules(model.eos_token_id, model.tokenizer.pad_token_id, 2, model.prompts.stop, rows=3)
    bucket = get_bucket(lm, 3, embeds.shape[1], 6, embeds.dtype, embeds.device)
    with torch.no_grad():
        prefill(lm, bucket, bucket.load(embeds, attention, rules), rules, forced_stops(model))
        state = {k: v for k, v in vars(bucket).items() if isinstance(v, torch.Tensor)}
        state.update({f"k{i}": layer.keys for i, layer in enumerate(bucket.cache.layers)})
        before = {k: (v.data_ptr(), v.shape, v.clone()) for k, v in state.items()}
        with HostReadTrap():
            for _ in range(3):
                decode_step(lm, bucket, rules)
    for k, v in state.items():
        assert (v.data_ptr(), v.shape) == before[k][:2], f"{k} was reallocated or reshaped"
    assert int(bucket.t) == 4 and int(bucket.positions[0, 0]) == int(before["positions"][2][0, 0]) + 3
    assert not torch.equal(bucket.tokens, before["tokens"][2]) and not torch.equal(bucket.mask, before["mask"][2])


@pytest.mark.parametrize("with_stop", [True, False])
def test_static_cache_graph_step_leaves_the_state_of_todays_static_loop(stopping_model, with_stop, monkeypatch):
    """After the loop the bucket holds what today's static-cache loop builds: the prompt mask
    (more left padding before it), then per step a column that is 1 while the row runs; positions
    and the cache one past each step; dummy rows finished throughout."""
    from pg_train.model.decoding.graph_decode import DecodeRules, buckets_of, generate_bucketed

    monkeypatch.setitem(graph_decode.POLICIES, "cpu", POLICIES["coarse"])
    model = stopping_model
    graph_decode.release(model.language_model)
    embeds, attention, _, _ = prompt_embeds(model, seed=1)
    B, P = attention.shape
    T = 10
    stop = model.prompts.stop if with_stop else None
    rules = DecodeRules(model.eos_token_id, model.tokenizer.pad_token_id, stop=stop)
    _, raw = generate_bucketed(
        model.language_model,
        embeds,
        attention,
        max_new_tokens=T,
        rules=rules,
        suppress_token_ids=forced_stops(model),
        check_every=100,
    )
    assert 0 < raw.min() < T  # a row stopped early, another ran to the end
    (bucket,) = buckets_of(model.language_model)
    Pb = bucket.prompt
    assert (bucket.batch, Pb) == (4, 512)
    # The step a row stopped at (the text rule's length counts the token that completed the end text).
    stopped_at = torch.where(bucket.finished[:B], raw - (1 if with_stop else 0), T)
    running = stopped_at[:, None] > torch.arange(T)[None]
    expected = torch.cat([torch.zeros(B, Pb - P, dtype=torch.long), attention, running.long()], dim=1)
    assert torch.equal(bucket.mask[:B], expected)
    dummy = torch.cat([expected[-1, :Pb], torch.zeros(T, dtype=torch.long)])
    assert all(torch.equal(row, dummy) for row in bucket.mask[B:])
    assert bucket.finished[B:].all() and (bucket.tokens[B:] == model.tokenizer.pad_token_id).all()
    last = (attention.cumsum(-1) - 1)[:, -1]
    assert torch.equal(bucket.positions[:B, 0], last + T) and int(bucket.t) == T
    assert int(bucket.cache.layers[0].cumulative_length) == Pb + T - 1


class CaptureStandIn:
    """CUDA's capture on the CPU: `record` runs nothing (as a capture) and returns an object whose
    replay runs the recorded step eagerly, with the rules of the call that recorded it (baked in,
    as a graph's)."""

    def __init__(self, fail: bool = False):
        self.warmups = self.records = self.replays = 0
        self.fail = fail

    def warm_up(self, run, device):
        self.warmups += 1
        run()

    def record(self, run, device):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.records += 1
        stand_in = self

        class Graph:
            def replay(self):
                stand_in.replays += 1
                run()

        return Graph()


def test_static_cache_graph_capture_warms_up_captures_once_replays_and_recaptures_when_weights_rebind(monkeypatch):
    monkeypatch.setitem(graph_decode.POLICIES, "cpu", POLICIES["coarse"])
    stand_in = CaptureStandIn()
    monkeypatch.setitem(graph_decode.CAPTURERS, "cpu", (stand_in.warm_up, stand_in.record))
    student = with_lora_weights(build_model("tiny", seed=0)).eval()
    lm = student.language_model
    first = prompt_embeds(student, 3, seed=0)
    second = prompt_embeds(student, 4, seed=1)  # another K, another size: the same [4, 512] bucket
    kwargs = dict(max_new_tokens=8, min_new_tokens=2, stop=student.prompts.stop)

    def check(batch, **extra):
        embeds, attention = batch[0], batch[1]
        today = decode(student, embeds, attention, "dynamic", **kwargs, **extra)
        graph = decode(student, embeds, attention, "graph", **kwargs, **extra)
        assert torch.equal(today[0], graph[0]) and torch.equal(today[1], graph[1])

    check(first)
    assert (stand_in.warmups, stand_in.records, stand_in.replays) == (2, 1, 5)  # steps 1-2 eager, 3-7 replayed
    check(second)
    assert (stand_in.warmups, stand_in.records, stand_in.replays) == (2, 1, 12)
    assert len(graph_decode.buckets_of(lm)) == 1
    sampled = dict(do_sample=True, temperature=1.5, generator=torch.Generator().manual_seed(5))
    today = decode(student, *second[:2], "dynamic", **kwargs, **sampled)
    sampled["generator"] = torch.Generator().manual_seed(5)
    graph = decode(student, *second[:2], "graph", **kwargs, **sampled)
    assert torch.equal(today[0], graph[0]) and stand_in.replays == 12  # sampling never replays the greedy graph
    p = next(lm.parameters())
    with torch.no_grad():
        p.mul_(1.5)  # in place: the capture stays valid
    check(first)
    assert (stand_in.records, stand_in.replays) == (1, 19)
    invalidations = graph_decode.STATS["invalidations"]
    p.data = p.data.clone()  # rebound: a graph would still read the old storage
    check(first)
    assert graph_decode.STATS["invalidations"] == invalidations + 1
    assert (stand_in.warmups, stand_in.records, stand_in.replays) == (2, 2, 26)  # recaptured at once
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the teacher under the student's autocast
        autocast = decode(student, *first[:2], "static", **kwargs)
        graph = decode(student, *first[:2], "graph", **kwargs)
    assert torch.equal(autocast[0], graph[0]) and torch.equal(autocast[1], graph[1])
    assert stand_in.records == 3 and len(graph_decode.buckets_of(lm)) == 2  # its own bucket, captured anew
    graph_decode.release(lm)


def test_static_cache_graph_capture_failure_decodes_eagerly_with_the_same_tokens(model, monkeypatch):
    monkeypatch.setitem(graph_decode.POLICIES, "cpu", POLICIES["coarse"])
    stand_in = CaptureStandIn(fail=True)
    monkeypatch.setitem(graph_decode.CAPTURERS, "cpu", (stand_in.warm_up, stand_in.record))
    graph_decode.release(model.language_model)
    embeds, attention, _, _ = prompt_embeds(model)
    kwargs = dict(max_new_tokens=6, stop=model.prompts.stop)
    failures = graph_decode.STATS["capture_failures"]
    with pytest.warns(UserWarning, match="capture of the decoding step failed"):
        graph = decode(model, embeds, attention, "graph", **kwargs)
    graph_again = decode(model, embeds, attention, "graph", **kwargs)  # no second attempt
    today = decode(model, embeds, attention, "dynamic", **kwargs)
    assert torch.equal(today[0], graph[0]) and torch.equal(today[0], graph_again[0])
    assert graph_decode.STATS["capture_failures"] == failures + 1 and stand_in.replays == 0
    graph_decode.release(model.language_model)


def test_static_cache_graph_step_needs_the_static_cache(model):
    embeds, attention, _, _ = prompt_embeds(model)
    with pytest.raises(ValueError, match="static_cache"):
        generate_from_embeds(
            model.language_model, embeds, attention, max_new_tokens=2, eos_token_id=0, pad_token_id=0, cuda_graphs=True
        )


@pytest.mark.parametrize("check_every", [1, 4])
def test_static_cache_graph_step_cuts_before_the_end_text_with_the_real_vocabulary(
    qwen_tokenizer, cuda_buckets_on_cpu, check_every
):
    """tests/test_templates.py's stop test (scripted lm_head over Qwen's 151,679 ids) through the graph step."""
    from conftest import QWEN_SPECIAL_IDS
    from test_templates import ScriptedHead, as_ids, tiny_real_vocab_lm

    from pg_train.model.text.stopping import EndTextStop

    tok = qwen_tokenizer
    cases = {
        "A red circle.": tok.encode("A red circle.<|end|>", add_special_tokens=False),
        "a cat": tok.encode("a cat <|end|>", add_special_tokens=False),
        "a dog": tok.encode("a dog", add_special_tokens=False) + as_ids(tok, ["<", "|", "end", "|", ">"]),
        "two cups": tok.encode("two cups", add_special_tokens=False) + as_ids(tok, ["Ġ<|", "end", "|", ">Ċ"]),
        "said": tok.encode('said "hi"', add_special_tokens=False),  # ends at eos
    }
    scripts = list(cases.values())
    eos = QWEN_SPECIAL_IDS["<|im_end|>"]
    stop = EndTextStop(tok, "<|end|>", eos, 151_679)
    embeds = torch.randn(len(scripts), 3, 16, generator=torch.Generator().manual_seed(0))
    out = {}
    for path, (static, graphs) in {"dynamic": (False, False), "graph": (True, True)}.items():
        for min_new in (0, 2):
            lm = tiny_real_vocab_lm()
            # min 2: the tag at once (may not start it), eos at once, eos at step 2 (allowed there)
            early = [cases["a cat"][-4:], [], cases["a dog"][:2]]
            lm.lm_head = ScriptedHead(scripts if min_new == 0 else early, 151_679, eos)
            out[path, min_new] = generate_from_embeds(
                lm,
                embeds if min_new == 0 else embeds[:3],
                torch.ones(len(scripts) if min_new == 0 else 3, 3, dtype=torch.long),
                max_new_tokens=16 if min_new == 0 else 6,
                min_new_tokens=min_new,
                eos_token_id=eos,
                pad_token_id=151_643,
                stop=stop,
                check_every=check_every,
                static_cache=static,
                cuda_graphs=graphs,
            )
    for min_new in (0, 2):
        assert torch.equal(out["dynamic", min_new][0], out["graph", min_new][0])
        assert torch.equal(out["dynamic", min_new][1], out["graph", min_new][1])
    tokens, lengths = out["graph", 0]
    for row, text in enumerate(cases):
        want = 'said "hi"' if text == "said" else text
        assert tokens[row, : lengths[row]].tolist() == tok.encode(want, add_special_tokens=False)
    tokens, lengths = out["graph", 2]
    assert lengths[0] >= 2 and lengths[1:].tolist() == [2, 2]
    assert "<" not in tok.decode(tokens[0, :2].tolist()) and "<|end|>" not in tok.decode(tokens[0].tolist())
    assert tokens[2, :2].tolist() == cases["a dog"][:2]


@pytest.mark.parametrize("placement", ["same", "cpu", "full:cpu"])
def test_static_cache_graph_step_teacher_captions_for_every_ema_placement(placement, monkeypatch):
    """The teacher's captions through the bucketed step equal the dynamic cache's for every EMA
    placement, also after an EMA update with the bucket (and, on CUDA, its graph) reused: the
    swap writes the shadow into the same tensors the step reads, and restores the student bitwise."""
    monkeypatch.setitem(graph_decode.POLICIES, "cpu", POLICIES["cuda"])
    student = with_lora_weights(build_model("tiny", seed=0))
    ema = EMATeacher(student, decay=0.5, placement=placement)
    _, _, _, cells = prompt_embeds(student)
    pixel_values, _, _ = make_batch(student, 3, 0)
    for update in range(2):
        with torch.no_grad():  # the student moves away from the shadow
            for name, p in student.named_parameters():
                if "lora_B" in name:
                    p.add_(0.05)
        before = {n: (p.data_ptr(), p.detach().clone()) for n, p in student.named_parameters()}
        with ema.as_teacher(student) as teacher:
            if placement != "full:cpu":
                assert teacher is student
                for n, p in student.named_parameters():
                    assert p.data_ptr() == before[n][0], "the shadow must be copied in, not rebound"
        for n, p in student.named_parameters():
            assert p.data_ptr() == before[n][0] and torch.equal(p.detach(), before[n][1])
        captions = {}
        for path in ("dynamic", "graph"):
            cfg = PseudoGumbelConfig(max_caption_len=10, static_cache=path == "graph", cuda_graphs=path == "graph")
            captions[path] = generate_pseudo_tokens_with_ema(ema, pixel_values, cells, cfg, student=student)
        assert torch.equal(captions["dynamic"][0], captions["graph"][0])
        assert torch.equal(captions["dynamic"][1], captions["graph"][1])
        plain = generate_pseudo_tokens_with_ema(
            student, pixel_values, cells, PseudoGumbelConfig(max_caption_len=10, static_cache=True, cuda_graphs=True)
        )
        assert not torch.equal(plain[0], captions["graph"][0]), "the test needs the teacher to differ from the student"
        ema.update(student)
    generating = ema.teacher_model if placement == "full:cpu" else student
    assert len(graph_decode.buckets_of(generating.language_model)) == 1  # one bucket, reused after the update


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (capture and replay)")
def test_static_cache_cuda_graph_replay_equals_eager_decoding():
    gpu = with_lora_weights(build_model("tiny", seed=0)).eval().cuda()
    embeds, attention, _, _ = prompt_embeds(gpu.cpu())
    gpu.cuda()
    embeds, attention = embeds.cuda(), attention.cuda()
    captures = graph_decode.STATS["captures"]
    for _ in range(2):
        out = {
            path: decode(gpu, embeds, attention, path, max_new_tokens=12, min_new_tokens=2, stop=gpu.prompts.stop)
            for path in ("dynamic", "static", "graph")
        }
        assert torch.equal(out["static"][0], out["graph"][0]) and torch.equal(out["static"][1], out["graph"][1])
        assert torch.equal(out["dynamic"][0], out["graph"][0])
    assert graph_decode.STATS["captures"] == captures + 1 and graph_decode.STATS["replays"] > 0


def test_fast_decoding_defaults_resolve_on_for_cuda_and_off_elsewhere(model):
    """objective.static_cache / cuda_graphs default to null: both on CUDA, both off on the CPU
    (nothing is captured there; the padded buckets would only cost); an explicit value wins, and
    cuda_graphs=true implies the static cache."""
    from pg_train.model.decoding.generate import fast_decoding

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert PseudoGumbelConfig().static_cache is None and PseudoGumbelConfig().cuda_graphs is None
    assert fast_decoding(None, None, cuda) == (True, True)
    assert fast_decoding(None, None, cpu) == (False, False)
    assert fast_decoding(None, True, cpu) == (True, True)
    assert fast_decoding(True, None, cpu) == (True, False)
    assert fast_decoding(False, None, cuda) == (False, False)
    assert fast_decoding(None, False, cuda) == (True, False)
    # the default objective on the CPU decodes with the dynamic cache: no bucket is made
    graph_decode.release(model.language_model)
    embeds, attention, pixel_values, cells = prompt_embeds(model)
    generate_pseudo_tokens_with_ema(model, pixel_values, cells, PseudoGumbelConfig(max_caption_len=4))
    assert graph_decode.buckets_of(model.language_model) == []


def _cuda_prompt(dtype):
    gpu = with_lora_weights(build_model("tiny", seed=0)).eval()
    pixel_values, _, masks = make_batch(gpu, 3, 0)
    cells, _ = region_cells(masks, gpu.grid_size)
    gpu = gpu.to("cuda", dtype)
    ids, attention = region_prompts(gpu, cells, None)
    with torch.no_grad():
        embeds = gpu.embed_with_images(ids.cuda(), gpu.extract_feature(pixel_values.cuda().to(dtype)), cells.cuda())
    return gpu, embeds, attention.cuda()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (capture and replay)")
@pytest.mark.parametrize("trim", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_graph_replay_equals_eager_decoding_on_the_same_bucket_id_for_id(dtype, trim, monkeypatch):
    """Replayed decoding is the eager step on the same shapes, id for id, in fp32 and in bf16,
    trimmed or not: the CUDA bucket (3 rows padded to 4, the prompt left-padded) decoded eagerly
    (no capturer) against the same bucket captured and replayed (twice: capture call, replay call)."""
    gpu, embeds, attention = _cuda_prompt(dtype)
    kwargs = dict(max_new_tokens=24, min_new_tokens=2, stop=gpu.prompts.stop, trim_last_layer=trim)
    graph_decode.release()
    with monkeypatch.context() as m:
        m.delitem(graph_decode.CAPTURERS, "cuda")
        eager = decode(gpu, embeds, attention, "graph", **kwargs)
    captures = graph_decode.STATS["captures"]
    for _ in range(2):
        replayed = decode(gpu, embeds, attention, "graph", **kwargs)
        assert torch.equal(replayed[0], eager[0]) and torch.equal(replayed[1], eager[1])
    assert graph_decode.STATS["captures"] == captures + 1
    (bucket,) = graph_decode.buckets_of(gpu.language_model)
    assert bucket.batch == 4 and bucket.prompt > embeds.shape[1]  # the padded shapes were exercised
    graph_decode.release()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (capture and replay)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_graph_replay_with_exact_shapes_equals_static_cache_eager_decoding(dtype, monkeypatch):
    """With unpadded buckets (EXACT policy) the replayed captions equal the static-cache eager
    loop's, id for id, in bf16 too: what is left between them is only the padding (the issue-28
    divergence hypothesis, docs/benchmarks.md)."""
    gpu, embeds, attention = _cuda_prompt(dtype)
    monkeypatch.setitem(graph_decode.POLICIES, "cuda", graph_decode.EXACT)
    kwargs = dict(max_new_tokens=24, min_new_tokens=2, stop=gpu.prompts.stop)
    graph_decode.release()
    static = decode(gpu, embeds, attention, "static", **kwargs)
    for _ in range(2):
        replayed = decode(gpu, embeds, attention, "graph", **kwargs)
        assert torch.equal(replayed[0], static[0]) and torch.equal(replayed[1], static[1])
    graph_decode.release()
