"""Seg-only grounding diagnostic (the measurements behind README "Learning from random weights").

Trains only the referring-segmentation path with ground-truth captions and prints, every EVERY
steps, held-out gIoU with the true caption (ref) and another sample's caption (shuf), the share
of live ReLUs in text_hidden_fcs, the relative spread of its input/output across samples, and
cap_var (how far the [SEG] state moves when only the caption changes, over its spread across
images). Experimental knobs are environment variables (a scratch tool, not part of the package):

    CFG, OV   config file and key=value overrides (data.*, model.*)
    STEPS, EVERY, LR, N (training scenes), K (targets per scene per batch), THREADS
    VIMG      vision input size (112: the tiny-112 grid)       LANGSCALE  scale fcs output at init
    FREEZE    comma-separated parameter prefixes to freeze      SLOW, SLOWMUL  lower-LR prefixes
    BYPASS=1  feed the mean caption embedding to text_hidden_fcs instead of the LLM's [SEG] state
    BOW=w     add the request-summary loss with weight w        LMW  caption LM loss weight

    OV="data.sizes=[large] data.min_objects=2 data.max_objects=2 data.distinct_colours=true \
        data.colours=[red,green,blue,yellow,white,black] data.textures=[plain]" VIMG=112 BOW=1 \
        STEPS=1500 EVERY=250 .venv/bin/python scripts/diagnose_grounding.py
"""
import os, sys, time, tempfile, torch, dataclasses
from pg_train.config import load_config
from pg_train.train import build_student
from pg_train.data import SyntheticPairs, PairDataset, Preprocess, collate_pairs
from pg_train.supervised import supervised_step, SupervisedConfig, tokenize_captions
from pg_train.pseudo_gumbel import PseudoGumbelConfig, forward_mask_with_text_embeds, iou_counts, resize_target
torch.manual_seed(0); torch.set_num_threads(int(E("THREADS","2")) if (E:=os.environ.get) else 2)
E = os.environ.get
overrides = E("OV", "").split()
cfg = load_config([E("CFG", os.path.join(os.path.dirname(__file__), "..", "configs", "learn_tiny_warmup.yaml"))], ["model.preset=tiny"] + overrides)
if E("VIMG"):
    import dataclasses as dc
    from pg_train.model import presets as P
    P.PRESETS["tiny"] = dc.replace(P.PRESETS["tiny"], vision=dc.replace(P.PRESETS["tiny"].vision, image_size=int(E("VIMG"))))
model = build_student(cfg)
if E("BYPASS"):
    import types
    def seg(self, prefix_ids, caption_embeds, caption_mask, suffix_ids, seg_index, pixel_values, sam_pixel_values):
        m = caption_mask.float()[..., None]
        pooled = (caption_embeds * m).sum(1) / m.sum(1).clamp(min=1)
        return self.grounding_encoder(sam_pixel_values, self.text_hidden_fcs[2](torch.relu(self.text_hidden_fcs[0](pooled * 10))))
    model.segment_from_embeds = types.MethodType(seg, model)
if E("LANGSCALE"):
    with torch.no_grad():
        model.text_hidden_fcs[2].weight.mul_(float(E("LANGSCALE"))); model.text_hidden_fcs[2].bias.mul_(float(E("LANGSCALE")))
for n, p in model.named_parameters():
    if E("FREEZE") and n.startswith(tuple(E("FREEZE").split(","))): p.requires_grad_(False)
params = [p for p in model.parameters() if p.requires_grad]
print("trainable", sum(p.numel() for p in params))
lr = float(E("LR", "1e-3")); slow = tuple(E("SLOW", "none").split(","))
named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
opt = torch.optim.AdamW([{"params": [p for n, p in named if not n.startswith(slow)], "lr": lr},
                         {"params": [p for n, p in named if n.startswith(slow)], "lr": lr * float(E("SLOWMUL", "0.1"))}])
pre = Preprocess(model.preset.vision.image_size, 128)
import numpy as np
from pg_train.data.synthetic import augmented_view
class Contrast(SyntheticPairs):
    K = int(E("K", "1"))
    def load(self, index):
        if self.K == 1: return super().load(index)
        scene, t = divmod(index, self.K)
        image, objects, masks = self.scene(scene)
        rng = self._rng(index, 1)
        visible = [i for i, m in enumerate(masks) if m.sum() >= self.min_pixels]
        order = self._rng(scene, 2).permutation(visible)
        target = int(order[t % len(order)])
        image2, mask2 = augmented_view(image, masks[target], rng, min_pixels=self.min_pixels)
        from pg_train.data.types import RawPair
        return RawPair(image, masks[target], image2, mask2, objects[target].describe(448, 448), "x")
def make(n, seed):
    from pg_train.data.synthetic import COLOURS, TEXTURES
    d = cfg.data
    src = Contrast(n, seed=seed, sizes=tuple(d.sizes), min_objects=d.min_objects, max_objects=d.max_objects,
        colours=tuple(d.colours or COLOURS), textures=tuple(d.textures or TEXTURES), distinct_colours=d.distinct_colours)
    ds = PairDataset(src, pre)
    return [ds[i] for i in range(n)]
import pickle
key = f"{tempfile.gettempdir()}/pg_train_diag_cache_{pre.mllm_size}_{E('N','512')}_{Contrast.K}_{'-'.join(cfg.data.sizes)}_{cfg.data.min_objects}_{cfg.data.max_objects}_{cfg.data.colours}_{cfg.data.textures}_{cfg.data.distinct_colours}.pt".replace(" ", "").replace("'", "")
t=time.time()
if os.path.exists(key): train, held = torch.load(key)
else:
    train = make(int(E("N", "512")), 0); held = make(48, 10000); torch.save((train, held), key); print("data", time.time()-t)
B = 4
sup = SupervisedConfig(lm_weight=float(E("LMW", "0")), seg_weight=1.0)
ocfg = cfg.objective
def to_batch(items):
    b = collate_pairs(items); return b
@torch.no_grad()
def evaluate():
    SEEN.clear(); model.eval(); res = {"ref": [0,0], "shuf": [0,0]}; g = {"ref": [], "shuf": []}
    for s in range(0, len(held), 8):
        b = to_batch(held[s:s+8])
        ids, lens = tokenize_captions(model, b["captions"], ocfg.max_caption_len)
        order = torch.roll(torch.arange(len(ids)), 1)
        for k, (i_, l_) in {"ref": (ids, lens), "shuf": (ids[order], lens[order])}.items():
            lg = forward_mask_with_text_embeds(model, b["pixel_values2"], b["sam_pixel_values2"], model.embed_tokens()(i_), l_)
            tgt = resize_target(b["masks2"], lg.shape[-2:]); I, U = iou_counts(lg, tgt)
            g[k] += (I.double() / U.clamp(min=1)).tolist()
    model.train(); r = {k: round(sum(v)/len(v), 4) for k, v in g.items()}
    r.update(ACT); return r
ACT = {}
SEEN = []
GRAB = []
model.text_hidden_fcs.register_forward_hook(lambda m, i, o: GRAB.append(i[0]) if model.training else None)
def hook(mod, inp, out):
    SEEN.append(inp[0].detach())
    if len(SEEN) >= 2 and SEEN[-1].shape == SEEN[-2].shape and not model.training:
        a, b = SEEN[-2], SEEN[-1]
        ACT["cap_var"] = round(((a - b).norm(dim=1).mean() / (a - a.mean(0)).norm(dim=1).mean()).item(), 4)
    h = mod[1](mod[0](inp[0]))
    ACT["alive"] = round((h > 0).any(0).float().mean().item(), 3)
    ACT["in_rel_std"] = round((inp[0].std(0).norm() / inp[0].mean(0).norm()).item(), 4)
    ACT["out_rel_std"] = round((out.std(0).norm() / out.mean(0).norm()).item(), 4)
model.text_hidden_fcs.register_forward_hook(hook)
steps = int(E("STEPS", "600")); gen = torch.Generator().manual_seed(0)
t = time.time()
for step in range(steps + 1):
    if step % int(E("EVERY", "100")) == 0:
        print(step, f"{time.time()-t:.0f}s", evaluate(), flush=True)
    K = Contrast.K
    sc = torch.randint(len(train) // K, (B // K,), generator=gen).tolist()
    idx = [s_ * K + t for s_ in sc for t in range(K)]
    b = to_batch([train[i] for i in idx])
    GRAB.clear()
    out = supervised_step(model, b, ocfg, sup)
    if E("BOW"):
        seg_h = GRAB[-1]
        ids, lens = tokenize_captions(model, b["captions"], ocfg.max_caption_len)
        V = model.preset.language.vocab_size
        bow = torch.zeros(len(ids), V)
        for i in range(len(ids)):
            bow[i].index_add_(0, ids[i, : lens[i]], torch.ones(int(lens[i])))
        bow = bow / bow.sum(1, keepdim=True)
        logp = torch.log_softmax(model.language_model.lm_head(seg_h).float(), -1)
        aux = -(bow * logp).sum(1).mean()
        out.loss = out.loss + float(E("BOW")) * aux
        if step % 50 == 0: print(" aux", round(aux.item(), 3))
    opt.zero_grad(); out.loss.backward(); opt.step()
    if step % 50 == 0: print(" step", step, f"loss {out.loss.item():.3f} iou {out.metrics['iou'].item():.3f}", flush=True)
