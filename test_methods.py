"""
Tests of the methods on the CPU with the tiny random CLIP (conftest.py): mpl.py (MPL and its MaPLe
preset, against a plain re-implementation of the official forward; token counts per layer; parameter
counts) and isp.py (ISP and its IVLP preset, the structural modules, sample probing, parameter
counts); what both do with the CLIP they are handed; the methods' interface (fp32 logits, the
prompts' own state dict, the loss weights); the engine's official path and class chunks under the
methods; the config flags' help.

    python -m pytest -q test_methods.py

Every test compares against something computed another way (a plain re-implementation through CLIP's
stock blocks, an official checkpoint, a closed-form count) or against a count, so each one can fail.
"""
import argparse
import copy
import dataclasses
import math
import os
import typing
import warnings
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import bench
from engine import cli
from engine import clip_engine
import clip_layers
import isp
import mpl
import train
from clip_layers import clip
from conftest import n_trainable, sgd_steps, spy_shared, trainable
from isp import ISP, ISPConfig


@pytest.fixture(scope="module")
def vitb16():
    """A random CLIP of ViT-B/16's size (149.6 M parameters), for the official configs' counts and
    lengths."""
    return clip_layers.random_clip("ViT-B/16")


# --------------------------------------------------------------------------------------------------
# mpl.py: MPL and the MaPLe preset, against a plain re-implementation of the official forward

CLASSES = ["dog", "cat", "sea lion"]
# the engine train.py hands the methods: what most tests run; bench.OFFICIAL: the official
FAST = clip_engine.Engine()
# the cross-dataset depth 3: most of the tiny CLIP's 12 layers run unprompted, which the tests check
# too
TINY = {
    "mpl": replace(mpl.PRESETS["mpl"], **mpl.CROSS_DATASET),
    "maple": replace(mpl.PRESETS["maple"], **mpl.CROSS_DATASET),
}


def make_model(clip_model, cfg, seed=0, classnames=CLASSES, **kw):
    """An MPL model whose prompt values are random and all different (the projections start as
    identical copies, and a zero-ish prompt would hide mistakes of order or placement)."""
    torch.manual_seed(seed)
    model = mpl.MPL(clip_model, classnames, cfg, **{"engine": FAST, **kw})
    with torch.no_grad():
        for p in model.prompt_learner.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def images_for(clip_model, n=3, seed=1):
    size = clip_model.visual.input_resolution
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------
# The official forward, written out

def official_logits(clip_model, params, classnames, images, cfg, maple_block=False):
    """CustomCLIP.forward of the official MPL code in fp32 (eval mode: logits). `params` maps the
    official prompt learner names to tensors. maple_block=True runs MaPLe's vision block instead
    (replace the last n_ctx tokens by the single projection `txt2img_proj.0.l` of the text
    prompt) to show that the maple preset is MaPLe."""
    n_ctx, depth, n = cfg.n_ctx, cfg.depth, images.shape[0]
    ctx = params["ctx"]
    deep_text = [params[f"compound_prompts_text.{l}"] for l in range(depth - 1)]

    def lin(x, a, l):
        return F.linear(x, params[f"txt2img_proj.{a}.{l}.weight"], params[f"txt2img_proj.{a}.{l}.bias"])

    if maple_block:
        deep_vision = [lin(deep_text[l], 0, l) for l in range(depth - 1)]
    else:
        deep_vision = [torch.cat([lin(deep_text[l], a, l) for a in range(cfg.n_add)], dim=0) for l in range(depth - 1)]

    # ModularPromptLearner.forward: "X ... X a photo of a {c}." with the X rows replaced by ctx
    # MaPLe's text: no X
    words = (" ".join(["X"] * n_ctx) + " " if cfg.x_placeholders else "") + cfg.ctx_init
    ids = clip.tokenize([words + " " + c + "." for c in classnames])
    emb = clip_model.token_embedding(ids)
    c = len(classnames)
    prompts = torch.cat([emb[:, :1], ctx.unsqueeze(0).expand(c, -1, -1), emb[:, 1 + n_ctx:]], dim=1)
    shared_ctx = F.linear(ctx, params["proj.weight"], params["proj.bias"])

    # TextEncoder.forward
    x = (prompts + clip_model.positional_embedding).permute(1, 0, 2)             # (77, C, D)
    for i, block in enumerate(clip_model.transformer.resblocks):
        if i >= 1 and i - 1 < len(deep_text):
            p = deep_text[i - 1].expand(c, -1, -1).permute(1, 0, 2)
            x = torch.cat([x[:1], p, x[1 + n_ctx:]], dim=0)
        x = block(x)
    x = clip_model.ln_final(x.permute(1, 0, 2))
    text = x[torch.arange(c), ids.argmax(dim=-1)] @ clip_model.text_projection

    # VisionTransformer_MultiModal.forward
    v = clip_model.visual
    x = v.conv1(images)
    x = x.reshape(n, x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([v.class_embedding + torch.zeros(n, 1, x.shape[-1]), x], dim=1) + v.positional_embedding
    x = torch.cat([x, shared_ctx.expand(n, -1, -1)], dim=1)
    x = v.ln_pre(x).permute(1, 0, 2)                                             # (L, N, D)
    for i, block in enumerate(v.transformer.resblocks):
        if i >= 1 and i - 1 < len(deep_vision):
            keep = x.shape[0] - (n_ctx if maple_block else cfg.n_rm)
            x = torch.cat([x[:keep], deep_vision[i - 1].expand(n, -1, -1).permute(1, 0, 2)], dim=0)
        x = block(x)
    image = v.ln_post(x.permute(1, 0, 2)[:, 0]) @ v.proj

    image = image / image.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    return clip_model.logit_scale.exp() * image @ text.t()


def prompt_params(model):
    return {k: v.detach() for k, v in model.prompt_learner.named_parameters()}


@pytest.mark.parametrize("preset", ["mpl", "maple"])
def test_logits_equal_official_forward(tiny, preset):
    cfg = TINY[preset]
    model = make_model(tiny, cfg)
    images = images_for(tiny)
    with torch.no_grad():
        ours = model(images)
        ref = official_logits(tiny, prompt_params(model), CLASSES, images, cfg)
    assert ours.shape == (3, len(CLASSES))
    assert (ours - ref).abs().max().item() <= 1e-5
    assert ref.std() > 0.1  # the logits are not trivially equal


def test_maple_preset_equals_maple_block(tiny):
    """With n_add = 1 and n_rm = n_ctx, MPL is MaPLe's deep prompting (its block replaces the last
    n_ctx)."""
    cfg = mpl.PRESETS["maple"]  # depth 9 of 12, as published
    model = make_model(tiny, cfg)
    images = images_for(tiny)
    with torch.no_grad():
        ref = official_logits(tiny, prompt_params(model), CLASSES, images, cfg, maple_block=True)
        assert (model(images) - ref).abs().max().item() <= 1e-5


# --------------------------------------------------------------------------------------------------
# Token counts per layer, recorded at the input of every block

def run_spied(monkeypatch, model, images, **spies):
    """model(images) without gradients, while the clip_layers functions named in `spies` are
    replaced by them."""
    for name, spy in spies.items():
        monkeypatch.setattr(clip_layers, name, spy)
    with torch.no_grad():
        model(images)
    monkeypatch.undo()


def record_blocks(monkeypatch, model, images, identity=False):
    """Inputs and outputs of every block call, per tower, while model(images) runs:
    clip_layers.residual_block and the engine's CLS-only last vision block and stock blocks (the
    official path); and which of these kinds ran."""
    seen = {"text": [], "vision": [], "kinds": set()}

    def recording(kind, run):
        def call(block, x, causal=False):
            y = (x[:, :1] if kind == "cls" else x) if identity else \
                run(block, x) if kind != "ours" else run(block, x, causal=causal)
            text = causal or (kind == "stock" and block.attn_mask is not None)
            seen["text" if text else "vision"].append((x.detach().clone(), y.detach().clone()))
            seen["kinds"].add(kind)
            return y
        return call

    monkeypatch.setattr(clip_engine, "cls_block", recording("cls", clip_engine.cls_block))
    monkeypatch.setattr(bench, "stock_block", recording("stock", bench.stock_block))
    run_spied(monkeypatch, model, images, residual_block=recording("ours", clip_layers.residual_block))
    return seen


def vision_lengths(n_tokens, cfg, n_layers):
    """1 + patches + n_ctx at layer 0, then n_add * n_ctx - n_rm more per prompted layer 1..depth-1."""
    return [n_tokens + cfg.n_ctx + min(l, cfg.depth - 1) * (cfg.n_add * cfg.n_ctx - cfg.n_rm) for l in range(n_layers)]


@pytest.mark.parametrize("preset, expected, prefix", [("mpl", [18, 19] + [20] * 10, 6), ("maple", [19] * 12, 5)])
def test_sequence_lengths_tiny(tiny, monkeypatch, preset, expected, prefix):
    cfg = TINY[preset]
    model = make_model(tiny, cfg)
    seen = record_blocks(monkeypatch, model, images_for(tiny))
    lengths = [x.shape[1] for x, _ in seen["vision"]]
    assert lengths == expected == vision_lengths(17, cfg, 12)
    # The text's shared prefix, SOS + prompts + the template's words ("X a photo of a" / "a photo of
    # a"), runs once through every block but the last (after which only the EOT rows are read); each
    # class's own rows run beside it (clip_engine.block_after_prefix, not recorded here) ...
    assert [tuple(x.shape[:2]) for x, _ in seen["text"]] == [(1, prefix)] * 11
    # ... and without sharing every class keeps its (cut) length at every layer
    with FAST.options(shared_prefix=False):
        seen = record_blocks(monkeypatch, make_model(tiny, cfg), images_for(tiny))
    cut = int(model.prompt_learner.eot.max()) + 1
    assert [tuple(x.shape[:2]) for x, _ in seen["text"]] == [(len(CLASSES), cut)] * 12


def test_sequence_lengths_vitb16(vitb16, monkeypatch):
    """The official configs on ViT-B/16 (blocks replaced by the identity: only the hooks decide the
    lengths)."""
    images = images_for(vitb16, n=1)
    expected = {"mpl": list(range(198, 207)) + [206] * 3, "maple": [199] * 12}
    for preset, cfg in mpl.PRESETS.items():
        model = mpl.MPL(vitb16, CLASSES, cfg, engine=FAST)
        seen = record_blocks(monkeypatch, model, images, identity=True)
        assert [x.shape[1] for x, _ in seen["vision"]] == expected[preset] == vision_lengths(197, cfg, 12)


def test_add_remove_carry(tiny, monkeypatch):
    """Default preset: at the input of layer l the tokens are the previous block's outputs minus the
    last n_rm (carried exactly), then the n_add projections of the layer's text prompt (added);
    text rows 1..n_ctx are replaced."""
    cfg = TINY["mpl"]
    model = make_model(tiny, cfg)
    with FAST.options(shared_prefix=False):  # every class's text rows through every block
        seen = record_blocks(monkeypatch, model, images_for(tiny))
    p = prompt_params(model)
    for l in range(1, 12):
        x_in, y_prev = seen["vision"][l][0], seen["vision"][l - 1][1]
        if l < cfg.depth:
            keep = y_prev.shape[1] - cfg.n_rm
            added = torch.cat([F.linear(p[f"compound_prompts_text.{l - 1}"], p[f"txt2img_proj.{a}.{l - 1}.weight"],
                                        p[f"txt2img_proj.{a}.{l - 1}.bias"]) for a in range(cfg.n_add)])
            assert torch.equal(x_in[:, :keep], y_prev[:, :keep])                            # O_cr
            assert torch.equal(x_in[:, keep:], added.expand(x_in.shape[0], -1, -1))         # O_add
        else:
            assert torch.equal(x_in, y_prev)
        t_in, t_prev = seen["text"][l][0], seen["text"][l - 1][1]
        if l < cfg.depth:
            assert torch.equal(t_in[:, 1:1 + cfg.n_ctx], p[f"compound_prompts_text.{l - 1}"].expand(3, -1, -1))
            assert torch.equal(t_in[:, 1 + cfg.n_ctx:], t_prev[:, 1 + cfg.n_ctx:])
        else:
            assert torch.equal(t_in, t_prev)


def test_maple_preset_carries_nothing(tiny, monkeypatch):
    """maple preset: the sequence stays 17 + n_ctx and the prompt positions at every deep layer's
    input hold exactly the projected compound prompts of that layer: nothing of the previous
    layer's prompts survives. Past the depth (layers 9..11) the block's outputs go on unchanged."""
    cfg = mpl.PRESETS["maple"]
    model = make_model(tiny, cfg)
    seen = record_blocks(monkeypatch, model, images_for(tiny))
    p = prompt_params(model)
    assert [x.shape[1] for x, _ in seen["vision"]] == [17 + cfg.n_ctx] * 12
    for l in range(cfg.depth, 12):
        assert torch.equal(seen["vision"][l][0], seen["vision"][l - 1][1])
    for l in range(1, cfg.depth):
        x_in, y_prev = seen["vision"][l][0], seen["vision"][l - 1][1]
        proj = F.linear(p[f"compound_prompts_text.{l - 1}"], p[f"txt2img_proj.0.{l - 1}.weight"],
                        p[f"txt2img_proj.0.{l - 1}.bias"])  # (n_ctx, D)
        assert torch.equal(x_in[:, 17:], proj.expand(x_in.shape[0], -1, -1))
        assert torch.equal(x_in[:, :17], y_prev[:, :17])


# --------------------------------------------------------------------------------------------------
# MaPLe's own rules, against plain re-implementations of its code

def test_maple_with_other_n_ctx_removes_what_it_added(tiny, monkeypatch):
    """--method maple --n-ctx 3: MaPLe replaces exactly the n_ctx tokens it added, so the vision
    sequence stays at 17 + n_ctx at every layer (and nothing of the previous layer's prompts is
    carried)."""
    cfg = train.method_config(train.get_args(["--method", "maple", "--n-ctx", "3", "--depth", "3"]))
    assert (cfg.n_ctx, cfg.n_add, cfg.n_rm) == (3, 1, 3) and cfg == mpl.maple(3, depth=3)
    seen = record_blocks(monkeypatch, mpl.MPL(tiny, CLASSES, cfg, engine=FAST), images_for(tiny))
    assert [x.shape[1] for x, _ in seen["vision"]] == [17 + 3] * 12
    explicit = train.method_config(train.get_args(["--method", "maple", "--n-ctx", "3", "--n-rm", "1"]))
    assert explicit.n_rm == 1  # an explicit --n-rm still wins


def maple_official_text(clip_model, classnames, n_ctx, ctx_init, seed):
    """MaPLe's MultiModalPromptLearner.__init__, the parts that decide the text: (prompt texts,
    initial ctx)."""
    torch.manual_seed(seed)
    if ctx_init and n_ctx <= 4:
        ctx = clip_model.token_embedding(clip.tokenize(ctx_init))[0, 1:1 + n_ctx]
        prefix = ctx_init
    else:
        ctx = torch.nn.init.normal_(torch.empty(n_ctx, clip_model.ln_final.weight.shape[0]), std=0.02)
        prefix = " ".join(["X"] * n_ctx)
    return [prefix + " " + name.replace("_", " ") + "." for name in classnames], ctx


@pytest.mark.parametrize("n_ctx, ctx_init", [(2, "a photo of a"), (4, "a photo of a"), (2, ""), (6, "a photo of a"),
                                             (3, "a photo")])
def test_maple_context_initialisation_rule(tiny, n_ctx, ctx_init):
    names = ["american_bulldog", "cat"]
    texts, ctx = maple_official_text(tiny, names, n_ctx, ctx_init, seed=5)
    torch.manual_seed(5)
    pl = mpl.MPL(tiny, names, mpl.maple(n_ctx, ctx_init=ctx_init, depth=3)).prompt_learner
    with torch.no_grad():
        assert torch.equal(pl.ctx, ctx)  # same start, same RNG draw
        embedding = tiny.token_embedding(clip.tokenize(texts))
    assert torch.equal(pl.token_sos, embedding[:, :1]) and torch.equal(pl.token_suffix, embedding[:, 1 + n_ctx:])
    assert torch.equal(pl.eot, clip.tokenize(texts).argmax(-1))


def test_class_names_with_underscores_are_words(tiny):
    """The official trainers replace "_" by " " inside the model: a user passing raw split names
    gets the same model."""
    x = images_for(tiny)
    for build in (lambda names: make_model(tiny, TINY["mpl"], classnames=names),
                  lambda names: (torch.manual_seed(0), ISP(tiny, names, ISPConfig(depth=DEPTH)))[1]):
        with torch.no_grad():
            raw, spaced = build(["american_bulldog", "sea_lion"])(x), build(["american bulldog", "sea lion"])(x)
        torch.testing.assert_close(raw, spaced, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# Parameters

def closed_form_count(text_width, vision_width, n_ctx, n_add, depth):
    """ctx + (depth-1) compound text prompts, each n_ctx x text_width; proj + n_add x (depth-1)
    projections, each a Linear(text_width -> vision_width) with bias."""
    linear = text_width * vision_width + vision_width
    return depth * n_ctx * text_width + (1 + n_add * (depth - 1)) * linear


@pytest.mark.parametrize("cfg", [TINY["mpl"], TINY["maple"], mpl.MPLConfig(n_ctx=3, n_add=3, n_rm=4, depth=4),
                                 mpl.MPLConfig(depth=1)])
def test_trainable_count_tiny(tiny, cfg):
    text_width, vision_width = clip_layers.widths(tiny)
    assert n_trainable(mpl.MPL(tiny, CLASSES, cfg)) == closed_form_count(text_width, vision_width, cfg.n_ctx, cfg.n_add,
                                                                        cfg.depth)


def test_trainable_count_vitb16(vitb16):
    mpl_count = n_trainable(mpl.MPL(vitb16, CLASSES, mpl.PRESETS["mpl"]))
    maple_count = n_trainable(mpl.MPL(vitb16, CLASSES, mpl.PRESETS["maple"]))
    assert mpl_count == closed_form_count(512, 768, n_ctx=1, n_add=2, depth=9)
    assert maple_count == closed_form_count(512, 768, n_ctx=2, n_add=1, depth=9)
    assert maple_count == 3_555_072  # MaPLe vit_b16_c2_ep5_batch4_2ctx, counted from the MaPLe code


def test_initial_values_follow_the_official_code(tiny):
    """ctx = the embedding of "X"; then, from the same RNG state, the official order of draws: proj,
    the compound prompts (N(0, 0.02^2)), one Linear that every txt2img_proj starts as a copy of."""
    cfg = TINY["mpl"]
    torch.manual_seed(3)
    pl = mpl.MPL(tiny, CLASSES, cfg).prompt_learner
    torch.manual_seed(3)
    proj = torch.nn.Linear(64, 64)
    deep = [torch.empty(cfg.n_ctx, 64) for _ in range(cfg.depth - 1)]
    for d in deep:
        torch.nn.init.normal_(d, std=0.02)
    single = torch.nn.Linear(64, 64)
    x_embedding = tiny.token_embedding(clip.tokenize("X"))[0, 1]
    assert torch.equal(pl.ctx, x_embedding.expand(cfg.n_ctx, -1))
    assert torch.equal(pl.proj.weight, proj.weight) and torch.equal(pl.proj.bias, proj.bias)
    assert all(torch.equal(a, b) for a, b in zip(pl.compound_prompts_text, deep))
    assert all(torch.equal(lin.weight, single.weight) and torch.equal(lin.bias, single.bias)
               for per_add in pl.txt2img_proj for lin in per_add)


def test_maple_text_is_maples(tiny):
    """maple preset: "a photo of a {c}." with ctx = the embeddings of "a photo" (MaPLe's CTX_INIT
    handling)."""
    pl = mpl.MPL(tiny, CLASSES, TINY["maple"]).prompt_learner
    ids = clip.tokenize(["a photo of a dog."])
    assert TINY["maple"].x_placeholders is False
    assert torch.equal(pl.ctx, tiny.token_embedding(ids)[0, 1:3])
    assert torch.equal(pl.token_suffix[0], tiny.token_embedding(ids)[0, 3:])


def test_config_errors(tiny):
    with pytest.raises(ValueError, match="removes at most what it adds"):
        mpl.MPL(tiny, CLASSES, mpl.MPLConfig(n_ctx=1, n_add=2, n_rm=3, depth=3))
    with pytest.raises(ValueError, match=r"depth must be in 1\.\.12"):
        # deeper than the CLIP: refused, never rescaled
        mpl.MPL(tiny, CLASSES, mpl.MPLConfig(depth=13))


def official_names(cfg):
    """The official ModularPromptLearner's parameter names for a config."""
    names = {"ctx", "proj.weight", "proj.bias"} | {f"compound_prompts_text.{l}" for l in range(cfg.depth - 1)}
    return names | {f"txt2img_proj.{a}.{l}.{w}" for a in range(cfg.n_add) for l in range(cfg.depth - 1)
                    for w in ("weight", "bias")}


def test_trainable_set_is_the_prompt_learner(tiny):
    model = mpl.MPL(tiny, CLASSES, TINY["mpl"])
    trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable_names == {"prompt_learner." + n for n in official_names(TINY["mpl"])}
    assert all(not p.requires_grad for p in model.clip.parameters())
    # only parameters are saved: the token buffers are rebuilt from the class names in hand
    assert set(model.prompt_learner.state_dict()) == official_names(TINY["mpl"])
    # names and shapes do not depend on the class set (base -> new)
    other = mpl.MPL(tiny, ["a", "b", "c", "d", "e"], TINY["mpl"])
    assert {n: p.shape for n, p in other.prompt_learner.named_parameters()} == \
           {n: p.shape for n, p in model.prompt_learner.named_parameters()}


# --------------------------------------------------------------------------------------------------
# Behaviour

def test_encode_classes_reuse_and_fp16(tiny):
    model = make_model(tiny, TINY["mpl"])
    images = images_for(tiny)
    with torch.no_grad():
        logits = model(images)
        assert torch.equal(model(images, classes=model.encode_classes()), logits)
        # Pure fp16 as in the official code: OpenAI's fp16 layout (convert_weights keeps the
        # LayerNorms in fp32; a plain model.half() breaks CLIP's fp32-upcasting LayerNorm on the
        # CPU) and fp16 prompts.
        half = copy.deepcopy(model)
        clip.model.convert_weights(half.clip)
        half.prompt_learner.half()
        logits_half = half(images.half())
    # the features are fp16; the cosine logits are always computed in fp32
    assert logits_half.dtype == torch.float32
    assert (logits_half - logits).abs().max().item() < 0.1 and not torch.equal(logits_half, logits)


def test_short_training_lowers_the_loss(tiny):
    """Plain SGD (momentum 0.9) on the prompt learner alone fits a small batch: three classes, each
    a fixed random image pattern under noise. The loss is computed here, as train.py does. (One
    CPU thread: conftest.py.)"""
    torch.manual_seed(0)
    model = mpl.MPL(tiny, ["red", "green", "blue"], TINY["mpl"])
    patterns = 2 * torch.randn(3, 3, 32, 32)
    y = torch.arange(12) % 3
    x = patterns[y] + 0.5 * torch.randn(12, 3, 32, 32)
    losses = sgd_steps(model, lambda: F.cross_entropy(model(x), y), steps=50, lr=0.02)
    with torch.no_grad():
        final = F.cross_entropy(model(x), y).item()
    assert final < 0.75 * losses[0], (losses[0], final)
    assert all(p.grad is None for p in model.clip.parameters())


# --------------------------------------------------------------------------------------------------
# isp.py: ISP and the IVLP preset

# Names of different token lengths, so the EOT cut leaves padding after the shorter ones (the mask
# matters).
NAMES = ["cat", "golden retriever", "sea lion", "red eyed tree frog", "ox"]
DEPTH = 3  # of the tiny CLIP's 12 layers, 3..11 run without prompts, as layers 9..11 of ViT-B/16 do


def make(clip_model, names=NAMES, **kw):
    return ISP(clip_model, names, ISPConfig(**{"depth": DEPTH, "sample_probing": False, **kw}), engine=FAST)


def images(n, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def perturb(model, scale=0.5, seed=2):
    """Make every zero-initialised output and every prompt non-trivial, so that equalities mean
    something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and (name.endswith("o.weight") or "prompts" in name or "coupling" in name):
                p.add_(scale * torch.randn(p.shape, generator=g))


# --------------------------------------------------------------------------------------------------
# IVLP: ISP with the modules off, checked against a plain re-implementation through CLIP's stock
# blocks

def plain_ivlp_logits(clip_model, classnames, Pt, Pv, x, depth):
    """IVLP deep prompting written out: LND tensors, stock `block(x)` with CLIP's own causal mask,
    all 77 tokens."""
    n, C, N = Pt.shape[1], len(classnames), x.shape[0]
    ids = clip_layers.tokenize([f"a photo of a {c}." for c in classnames])
    t = clip_model.token_embedding(ids).clone()
    t[:, 1:1 + n] = Pt[0]                                          # "a photo of a" -> learnable P^0
    t = (t + clip_model.positional_embedding).permute(1, 0, 2)     # (77, C, D)
    for i, block in enumerate(clip_model.transformer.resblocks):
        if 1 <= i < depth:
            t = torch.cat([t[:1], Pt[i][:, None].expand(-1, C, -1), t[1 + n:]])
        t = block(t)
    t = clip_model.ln_final(t.permute(1, 0, 2))
    t = t[torch.arange(C), ids.argmax(-1)] @ clip_model.text_projection
    v = clip_model.visual
    y = v.conv1(x).flatten(2).transpose(1, 2)
    y = torch.cat([v.class_embedding.expand(N, 1, -1), y], dim=1) + v.positional_embedding
    y = torch.cat([y, Pv[0].expand(N, -1, -1)], dim=1)  # prompts after the patches, before ln_pre
    y = v.ln_pre(y).permute(1, 0, 2)
    for i, block in enumerate(v.transformer.resblocks):
        if 1 <= i < depth:
            y = torch.cat([y[:-n], Pv[i][:, None].expand(-1, N, -1)])
        y = block(y)
    f = v.ln_post(y.permute(1, 0, 2)[:, 0]) @ v.proj
    f, t = f / f.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True)
    return clip_model.logit_scale.exp() * f @ t.t()


def test_ivlp_equals_plain_reimplementation(tiny):
    model = ISP(tiny, NAMES, ISPConfig(**{**isp.PRESETS["ivlp"].__dict__, "depth": DEPTH}), engine=FAST)
    ids = clip_layers.tokenize([f"a photo of a {c}." for c in NAMES])
    # init from "a photo of a"
    assert torch.equal(model.text_prompts[0], tiny.token_embedding(ids[0, 1:5]))
    perturb(model)
    x = images(3)
    with torch.no_grad():
        ours, ref = model(x), plain_ivlp_logits(tiny, NAMES, model.text_prompts, model.vision_prompts, x, DEPTH)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cross", ["none", "class_summaries", "linear"])
def test_zero_init_isp_equals_ivlp(tiny, cross):
    # IVLP's text through the same (unshared) path as ISP's, whose self-structural module reads the
    # class's own tokens, so that the two must agree bit for bit
    ivlp = make(tiny, isp_self=False, isp_cross="none")
    perturb(ivlp)
    model = make(tiny, isp_cross=cross)
    # same prompt values
    model.load_state_dict({k: v for k, v in trainable(ivlp).items()}, strict=False)
    x = images(3)
    with torch.no_grad(), FAST.options(shared_prefix=False):
        assert torch.equal(model(x), ivlp(x))


# --------------------------------------------------------------------------------------------------
# The structural modules act, and make the prompts class- / image-specific

def capture_prompts(model, x, monkeypatch):
    """Run forward and record the prompt rows written at the input of layer 1 of each encoder."""
    n, seen = model.cfg.n_ctx, {}
    enc_t, enc_v = clip_layers.encode_text, clip_layers.encode_image

    def spy_text(clip_model, tokens, eot, hook=None, **kw):
        def h(l, t):
            t = hook(l, t)
            if l == 1:
                seen["text"] = t[:, 1:1 + n].detach().clone()
            return t
        return enc_t(clip_model, tokens, eot, h, **kw)

    def spy_image(clip_model, imgs, hook=None, **kw):
        def h(l, t):
            t = hook(l, t)
            if l == 1:
                seen["vision"] = t[:, -n:].detach().clone()
            return t
        return enc_v(clip_model, imgs, h, **kw)

    run_spied(monkeypatch, model, x, encode_text=spy_text, encode_image=spy_image)
    return seen


def test_one_step_changes_prompts(tiny, monkeypatch):
    torch.manual_seed(0)
    model = make(tiny)  # self on, cross class_summaries
    x, y = images(4), torch.tensor([0, 1, 2, 3])
    before = capture_prompts(model, x, monkeypatch)
    # = IVLP
    assert torch.equal(before["text"], model.text_prompts[1].detach().expand(len(NAMES), -1, -1))
    opt = torch.optim.SGD(trainable(model).values(), lr=1.0)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    after = capture_prompts(model, x, monkeypatch)
    raw_t, raw_v = model.text_prompts[1].detach(), model.vision_prompts[1].detach()
    assert (after["text"] - raw_t).abs().max() > 1e-4      # the modules moved the text prompts ...
    assert (after["vision"] - raw_v).abs().max() > 1e-4    # ... and the vision prompts
    assert (after["text"][0] - after["text"][1]).abs().max() > 1e-4  # class-specific text prompts
    # image-specific vision prompts
    assert (after["vision"][0] - after["vision"][1]).abs().max() > 1e-4


def test_text_padding_is_masked(tiny):
    """A class's self-structural text prompts must not see the padding after its own EOT: encoding
    it alone (no padding) or beside a longer name (padding up to the longer EOT) gives the same
    features."""
    model = make(tiny, isp_cross="none")
    perturb(model)
    with torch.no_grad():
        together = model.encode_classes()[0]                          # all cut at the longest EOT
        for c, name in enumerate(NAMES):
            alone = make(tiny, [name], isp_cross="none")
            alone.load_state_dict(model.state_dict())  # the same prompts and modules, one class
            torch.testing.assert_close(alone.encode_classes()[0][0], together[c], atol=1e-5, rtol=1e-5)
    assert len({int(e) for e in model.eot}) > 1  # (the names do differ in length)


def test_chunked_encode_classes(tiny):
    """Chunks (sorted by length, checkpointed with gradients on) give the same features, summaries
    and gradients; the chunk is the engine's text_chunk (train.py's --text-chunk). ISP's
    class_summaries cross module without the self-structural module: its text hook writes every
    class alike, so the engine may chunk it."""
    model = make(tiny, isp_self=False, isp_cross="class_summaries")
    perturb(model)

    def encode(text_chunk):
        with FAST.options(text_chunk=text_chunk):
            return model.encode_classes()

    with torch.no_grad():
        (f1, s1), (f2, s2) = encode(None), encode(2)
    torch.testing.assert_close(f1, f2, atol=1e-5, rtol=1e-5)
    assert s1.shape == (len(NAMES), len(tiny.transformer.resblocks), tiny.ln_final.weight.shape[0])
    torch.testing.assert_close(s1, s2, atol=1e-5, rtol=1e-5)
    x, y = images(2), torch.tensor([1, 3])

    def grads(text_chunk):
        model.zero_grad()
        with FAST.options(text_chunk=text_chunk):
            logits = model(x)
            F.cross_entropy(logits, y).backward()
        return logits.detach(), {k: p.grad.clone() for k, p in trainable(model).items()}

    (l1, g1), (l2, g2) = grads(None), grads(2)
    torch.testing.assert_close(l1, l2, atol=1e-4, rtol=1e-5)
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], atol=1e-5, rtol=1e-4, msg=k)


# --------------------------------------------------------------------------------------------------
# class_summaries keeps the text branch image-independent

def text_features_seen(model, x, monkeypatch):
    out = []
    enc = clip_layers.encode_text

    def spy(*args, **kw):
        result = enc(*args, **kw)
        # (features, EOT summaries) in the class pass
        out.append(result[0] if isinstance(result, tuple) else result)
        return result

    run_spied(monkeypatch, model, x, encode_text=spy)
    return out


def test_class_summaries_text_independent_of_images(tiny, monkeypatch):
    model = make(tiny, isp_cross="class_summaries")
    perturb(model)
    a, b = text_features_seen(model, images(2, seed=3), monkeypatch), text_features_seen(model, images(2, seed=4),
                                                                                          monkeypatch)
    # one pass over the classes, not per image
    assert len(a) == len(b) == 1 and a[0].shape[0] == len(NAMES)
    assert torch.equal(a[0], b[0])
    with torch.no_grad():  # ... while the text prompts do read the vision prompts
        model.vision_prompts.add_(torch.randn(model.vision_prompts.shape, generator=torch.Generator().manual_seed(6)))
    c = text_features_seen(model, images(2, seed=3), monkeypatch)
    assert (c[0] - a[0]).abs().max() > 1e-4


# --------------------------------------------------------------------------------------------------
# Sample probing

def test_probing_weights_hand_computed(tiny, monkeypatch):
    p = torch.tensor([0.9, 0.5, 0.2, 0.0])                           # d = 0.1, 0.5, 0.8, 1.0
    for lam, expected in ((1.0, [1.1, 1.5, 1.8, 2.0]), (0.5, [1.05, 1.25, 1.4, 1.5])):
        probe = isp.SampleProbe(tiny, NAMES, "a photo of a {}.", lam)
        monkeypatch.setattr(probe, "p_clip", lambda clip_model, images, labels: p)
        # w = 1 + lambda d
        torch.testing.assert_close(probe(tiny, None, None), torch.tensor(expected))


def test_loss_weights_use_frozen_clip(tiny):
    model = make(tiny, sample_probing=True, sp_lambda=0.7)
    perturb(model)  # the prompts must not leak into p_clip
    x, y = images(6), torch.tensor([0, 1, 2, 3, 4, 0])
    logits = model(x)
    with torch.no_grad():  # p_clip from CLIP's own encoders, "a photo of a {}." on all 77 tokens
        t = tiny.encode_text(clip_layers.tokenize([f"a photo of a {c}." for c in NAMES]))
        f = tiny.encode_image(x)
        t, f = t / t.norm(dim=-1, keepdim=True), f / f.norm(dim=-1, keepdim=True)
        p_clip = (tiny.logit_scale.exp() * f @ t.t()).softmax(-1)[torch.arange(6), y]
    w = model.loss_weights(x, y, logits)
    assert not w.requires_grad and w.shape == (6,) and w.dtype == torch.float32
    torch.testing.assert_close(w, 1 + 0.7 * (1 - p_clip), atol=1e-5, rtol=1e-5)
    assert make(tiny).loss_weights(x, y, logits) is None               # probing off: a plain mean


def test_training_with_probing_lowers_weighted_loss(tiny):
    torch.manual_seed(0)
    names = ["red", "green", "blue", "gray"]
    model = ISP(tiny, names, ISPConfig(depth=DEPTH), engine=FAST)     # probing on, linear
    g = torch.Generator().manual_seed(5)
    y = torch.arange(16) % 4
    # class signal + noise
    x = 3 * torch.randn(4, 3, 32, 32, generator=g)[y] + torch.randn(16, 3, 32, 32, generator=g)
    w = model.loss_weights(x, y)
    assert torch.all((w >= 1) & (w <= 2)) and w.std() > 0

    def loss_fn():
        return (w * F.cross_entropy(model(x), y, reduction="none")).mean()

    # A random CLIP's image features differ little between images (cosine ~0.9), so the small steps
    # take a while.
    first = sgd_steps(model, loss_fn, steps=40, lr=0.005, momentum=0)[0]
    with torch.no_grad():
        last = loss_fn()
    assert last < 0.5 * first
    assert torch.equal(model.loss_weights(x, y), w)                  # the frozen CLIP did not move


# --------------------------------------------------------------------------------------------------
# The shared text prefix (clip_layers.encode_text): the rows before the class names are encoded once
# for all classes, each class runs only its own rows; the same features and gradients as every class
# running all of its rows

# A one-token name and a 30-token one (its prompt is 3x as long as the next), between names of 1 to
# 4 tokens
THIRTY_TOKENS = " ".join(["big red striped"] * 10)
SHARED_NAMES = ["ox", "golden retriever", THIRTY_TOKENS, "sea lion", "red eyed tree frog", "cat", "tabby cat"]
# the presets whose text hook treats every class alike, and ISP's cross terms without the self
# module
ROW_ALIKE = {
    "mpl": lambda: replace(mpl.PRESETS["mpl"], depth=DEPTH),
    "maple": lambda: replace(mpl.PRESETS["maple"], depth=DEPTH),
    "ivlp": lambda: replace(isp.PRESETS["ivlp"], depth=DEPTH),
    "isp_class_summaries": lambda: replace(isp.PRESETS["isp"], depth=DEPTH, isp_self=False),
    "isp_linear": lambda: replace(isp.PRESETS["isp"], depth=DEPTH, isp_self=False, isp_cross="linear"),
}


def built(clip_model, cfg, names):
    """MPL or ISP for cfg, with prompts and zero-initialised modules made non-trivial; the same for
    the same cfg."""
    if isinstance(cfg, mpl.MPLConfig):
        return make_model(clip_model, cfg, classnames=names)
    torch.manual_seed(0)
    model = ISP(clip_model, names, cfg, engine=FAST)
    perturb(model)
    return model


def features_and_gradients(model, x, y):
    """Text features (and ISP's EOT summaries), logits, and the gradients of every trainable tensor
    for a loss that reads both the logits and the text features directly."""
    model.zero_grad()
    out = model.encode_classes()
    features, summaries = out if isinstance(out, tuple) else (out, None)
    logits = model(x, out)
    w = torch.randn(features.shape, generator=torch.Generator().manual_seed(3))
    (F.cross_entropy(logits, y) + (w * features).sum()).backward()
    grads = {k: p.grad.clone() for k, p in trainable(model).items() if p.grad is not None}
    return features.detach(), summaries, logits.detach(), grads


@pytest.mark.parametrize("chunk", [None, 2])
@pytest.mark.parametrize("preset", list(ROW_ALIKE))
def test_shared_prefix_equals_unshared(tiny, monkeypatch, preset, chunk):
    """Features, EOT summaries, logits and gradients equal to 1e-5 (fp32; gradients to 1e-5 of their
    largest entry), with class chunks (checkpointed, 2 classes a pass) and without, over names of
    1 to 30 tokens; and the shared path really ran, each class on its own rows."""
    ids = clip_layers.tokenize([f"{n}." for n in SHARED_NAMES])
    # a 1-token and a 30-token name
    assert {int(e) - 2 for e in clip_layers.eot_index(ids)} >= {1, 30}
    cfg = ROW_ALIKE[preset]()
    x, y = images(3), torch.tensor([0, 2, 5])
    calls = spy_shared(monkeypatch)
    with FAST.options(text_chunk=chunk, shared_prefix=False):
        unshared = features_and_gradients(built(tiny, cfg, SHARED_NAMES), x, y)
    assert calls == []
    model = built(tiny, cfg, SHARED_NAMES)
    # (ISP's sample probing encodes its zero-shot class texts on construction, through the same
    # path)
    calls.clear()
    with FAST.options(text_chunk=chunk):
        shared = features_and_gradients(model, x, y)
    for a, b, what in zip(shared, unshared, ("features", "summaries", "logits")):
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=what)
    assert shared[3].keys() == unshared[3].keys() and len(shared[3]) > 0
    # sums over the classes in another order: 1e-5 of the gradient's size (up to 15)
    for k, g in unshared[3].items():
        assert (shared[3][k] - g).abs().max() <= 1e-5 * max(1.0, g.abs().max().item()), k
    # Each class ran only its own rows (name, ".", EOT) through the blocks beside the prefix: per
    # text pass, T = the sum over its classes of EOT + 1 - Lp, where Lp is 6 for MPL ("SOS X a photo
    # of a") and 5 for the others; once per layer, and with chunks once more in the backward pass
    # (recomputation). A pass of one class has nothing to share.
    eot = model.prompt_learner.eot if preset in mpl.PRESETS else model.eot
    Lp = 6 if preset == "mpl" else 5
    passes = [eot] if chunk is None else [e for e in eot.sort().values.split(chunk) if len(e) > 1]
    per_pass = [int((e + 1 - Lp).sum()) for e in passes]
    assert sorted(calls) == sorted(per_pass * len(tiny.transformer.resblocks) * (2 if chunk else 1))


def test_hook_reading_the_class_rows_is_not_shared(tiny, monkeypatch):
    """ISP's self-structural module (its text prompts read the class's own tokens) keeps the
    unshared path, even with the engine's shared_prefix on (the default)."""
    calls = spy_shared(monkeypatch)
    x = images(2)
    for cross in ("none", "class_summaries"):
        cfg = replace(isp.PRESETS["isp"], depth=DEPTH, sample_probing=False, isp_cross=cross)
        model = built(tiny, cfg, SHARED_NAMES)
        with torch.no_grad(), FAST.options(shared_prefix=False):
            reference = model(x)
        with torch.no_grad():
            assert torch.equal(model(x), reference)  # the very same path
    assert calls == []


def test_zeroshot_shared_prefix(tiny, monkeypatch):
    """Zero-shot CLIP's class texts: the template's words before the name ("a photo of a") are
    encoded once, with the same features as stock CLIP over all 77 tokens."""
    calls = spy_shared(monkeypatch)
    model = clip_layers.ZeroShotCLIP(tiny, SHARED_NAMES, engine=FAST)
    assert calls  # the shared path ran
    with torch.no_grad():
        stock = tiny.encode_text(clip_layers.tokenize([f"a photo of a {n}." for n in SHARED_NAMES]))
    torch.testing.assert_close(model.text_features, stock, atol=1e-5, rtol=1e-5)
    with FAST.options(shared_prefix=False):
        unshared = clip_layers.ZeroShotCLIP(tiny, SHARED_NAMES, engine=FAST).text_features
    torch.testing.assert_close(model.text_features, unshared, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Trainable set and parameter counts

def closed_form(Dt, Dv, n, J, isp_self, cross, r_self=1 / 8, r_cross=1 / 8):
    """Trainable parameters of ISP, from the widths: LN = 2 d, a bias-free projection a -> b = a b."""
    total = J * n * (Dt + Dv)  # IVLP deep prompts, both branches
    if isp_self:
        for d in (Dt, Dv):
            d_s = max(1, round(d * r_self))
            total += J * (2 * d + 4 * d * d_s)  # LN, W_q, W_k, W_u (d -> d_s), W_o (d_s -> d)
    if cross == "class_summaries":
        d_c = max(1, round(Dt * r_cross))
        text_reads_vision = 2 * Dt + 2 * Dv + Dt * d_c + 2 * Dv * d_c + d_c * Dt
        vision_reads_text = 2 * Dv + 2 * Dt + Dv * d_c + 2 * Dt * d_c + d_c * Dv
        total += J * (text_reads_vision + vision_reads_text)
    elif cross == "linear":
        total += J * (Dt * Dv + Dv)                                   # Linear(Dt -> Dv) with bias
    return total


COMBOS = [(s, c) for s in (False, True) for c in isp.CROSS_MODES]


def test_parameter_counts_tiny(tiny):
    for isp_self, cross in COMBOS:
        model = make(tiny, isp_self=isp_self, isp_cross=cross)
        assert n_trainable(model) == closed_form(64, 64, 4, DEPTH, isp_self, cross), (isp_self, cross)


def test_parameter_counts_vit_b16(vitb16):
    assert closed_form(512, 768, 4, 9, False, "none") == 46_080  # IVLP 4+4, depth 9 (PromptSRC)
    for isp_self, cross in COMBOS:
        cfg = ISPConfig(isp_self=isp_self, isp_cross=cross, sample_probing=False)
        n = n_trainable(ISP(vitb16, ["cat"], cfg))
        assert n == closed_form(512, 768, 4, 9, isp_self, cross), (isp_self, cross)
        print(f"ViT-B/16 self={isp_self} cross={cross}: {n:,}")


def test_trainable_set(tiny):
    def expected(isp_self, cross, J=DEPTH):
        names = {"text_prompts", "vision_prompts"}
        ssp = ["ln.weight", "ln.bias", "q.weight", "k.weight", "u.weight", "o.weight"]
        csp = ["ln_a.weight", "ln_a.bias", "ln_b.weight", "ln_b.bias", "q.weight", "k.weight", "u.weight", "o.weight"]
        for l in range(J):
            if isp_self:
                names |= {f"self_{m}.{l}.{p}" for m in ("text", "vision") for p in ssp}
            if cross == "class_summaries":
                names |= {f"cross_{m}.{l}.{p}" for m in ("text", "vision") for p in csp}
            if cross == "linear":
                names |= {f"coupling.{l}.weight", f"coupling.{l}.bias"}
        return names

    for isp_self, cross in COMBOS:
        model = make(tiny, isp_self=isp_self, isp_cross=cross, sample_probing=True)
        assert set(trainable(model)) == expected(isp_self, cross)
        assert not any(p.requires_grad for p in tiny.parameters())
        assert not any(name.startswith("clip.") for name in trainable(model))
    # Checkpoints: names and shapes do not depend on the class set; only CLIP's keys are missing on
    # reload.
    base, new = make(tiny), make(tiny, names=["zebra", "aardvark"])
    sd = {k: v.detach().clone() for k, v in trainable(base).items()}
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in trainable(new).items()}
    missing, unexpected = new.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) == {f"clip.{k}" for k in tiny.state_dict()}


# --------------------------------------------------------------------------------------------------
# Both methods: the CLIP they are handed, the official path, class chunks, the config flags

def clip_as_loaded_on_cuda(seed=0):
    """A fresh tiny CLIP as `clip.load(..., device="cuda")` hands one over: built by
    clip.model.build_model from a state dict, with OpenAI's fp16 weights (convert_weights),
    trainable and in training mode (as a user may leave it)."""
    torch.manual_seed(seed)
    state_dict = clip.model.CLIP(**clip_layers.RANDOM_CLIPS["tiny"]).state_dict()
    model = clip.model.build_model(state_dict)
    clip.model.convert_weights(model)
    return model.requires_grad_(True).train()


def method_on(clip_model, method):
    """MPL (its default preset at depth 3) or ISP (all modules and sample probing on, depth 3) on
    `clip_model`, with non-trivial prompts; the same CLIP weights give the same model."""
    if method == "mpl":
        return make_model(clip_model, TINY["mpl"])
    torch.manual_seed(0)
    model = make(clip_model, sample_probing=True)
    perturb(model)
    return model


@pytest.mark.parametrize("method", ["mpl", "isp"])
def test_methods_freeze_an_fp16_clip_as_clip_load_returns_it_on_cuda(method):
    """A CLIP straight from clip.load on CUDA (fp16, trainable, training mode) is made fp32, frozen
    and put in eval mode, with a warning; only the prompts train, and the logits are those of the
    same method on the fp32 weights."""
    clip16 = clip_as_loaded_on_cuda()
    clip32 = copy.deepcopy(clip16).float()  # the same weights in fp32: fp16 -> fp32 is exact
    assert clip16.visual.conv1.weight.dtype == torch.float16 and clip16.training
    assert all(p.requires_grad for p in clip16.parameters())
    with pytest.warns(UserWarning, match="converted to fp32"):
        model = method_on(clip16, method)
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.clip.parameters())
    assert not model.clip.training and not any(m.training for m in model.clip.modules())
    assert all(torch.equal(a, b) for a, b in zip(model.clip.state_dict().values(), clip32.state_dict().values()))
    if method == "mpl":  # exactly the prompt learner's parameters train
        assert {id(p) for p in trainable(model).values()} == {id(p) for p in model.prompt_learner.parameters()}
        assert n_trainable(model) == closed_form_count(64, 64, TINY["mpl"].n_ctx, TINY["mpl"].n_add, TINY["mpl"].depth)
    else:  # exactly ISP's own parameters (prompts and structural modules) train
        assert set(trainable(model)) == {name for name, _ in model.named_parameters() if not name.startswith("clip.")}
        assert n_trainable(model) == closed_form(64, 64, 4, DEPTH, True, "class_summaries")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an fp32 CLIP is taken as it is, without a warning
        reference = method_on(clip32, method)
    x, y = images(3), torch.tensor([0, 1, 2])
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
    # the frozen zero-shot text behind sample probing was computed after the conversion
    if method == "isp":
        torch.testing.assert_close(model.loss_weights(x, y), reference.loss_weights(x, y))


@pytest.mark.parametrize("method", [mpl.MPL, ISP, clip_layers.ZeroShotCLIP])
def test_methods_refuse_what_is_no_vit_clip(method):
    with warnings.catch_warnings():
        # torch.jit.script is deprecated; clip.load(jit=True) gives such a module
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"TorchScript module.*clip\.load\(name, jit=False\)\.$"):
        method(scripted, CLASSES)
    with pytest.raises(TypeError, match=r"expected an OpenAI ViT CLIP \(.*as clip\.load returns.*\), got Linear"):
        method(torch.nn.Linear(2, 2), CLASSES)


@pytest.mark.parametrize("method", [mpl.MPL, ISP, clip_layers.ZeroShotCLIP])
def test_methods_check_what_a_copier_hands_them(method, tiny):
    with pytest.raises(TypeError, match=r"classnames must be a list of class names, not a str \(for one "
                                        r"class: \['cat'\]\)"):
        method(tiny, "cat")
    with pytest.raises(ValueError, match="classnames must be non-empty strings, at least one; got an empty"):
        method(tiny, [])
    with pytest.raises(ValueError, match=r"got \[''\]"):
        method(tiny, ["dog", ""])
    model = method(tiny, CLASSES)
    with pytest.raises(ValueError, match=r"images of shape \(2, 3, 64, 64\): this CLIP reads \(N, 3, 32, 32\)"):
        model(torch.zeros(2, 3, 64, 64))
    others = {mpl.MPL: ISP, ISP: mpl.MPL, clip_layers.ZeroShotCLIP: ISP}
    with torch.no_grad():
        foreign = others[method](tiny, CLASSES).encode_classes()
        with pytest.raises(TypeError, match=rf"{method.__name__}: classes must be what this model's "
                                            r"encode_classes\(\) returns"):
            model(torch.zeros(2, 3, 32, 32), foreign)
        own = model.encode_classes()
        assert torch.equal(model(torch.zeros(2, 3, 32, 32), own), model(torch.zeros(2, 3, 32, 32)))


@pytest.mark.parametrize("name", ["mpl.py", "isp.py"])
def test_method_files_answer_help(name):
    import subprocess
    import sys
    done = subprocess.run([sys.executable, name, "--help"], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.abspath(__file__)))
    assert done.returncode == 0 and done.stdout.startswith("usage:") and "smoke test" in done.stdout


def preset_model(clip_model, preset, names=NAMES, seed=0, engine=FAST):
    """A preset at depth 3 or zero-shot CLIP, over class names of different lengths, prompts and
    zero-initialised modules made non-trivial; the same arguments give the same model.
    "isp_linear", "isp_none": ISP's preset with that cross module."""
    if preset == "zeroshot":
        return clip_layers.ZeroShotCLIP(clip_model, names, engine=engine)
    if preset in mpl.PRESETS:
        return make_model(clip_model, replace(mpl.PRESETS[preset], depth=DEPTH), seed, classnames=names, engine=engine)
    preset, _, cross = preset.partition("_")
    torch.manual_seed(seed)
    cfg = replace(isp.PRESETS[preset], depth=DEPTH, **({"isp_cross": cross} if cross else {}))
    model = ISP(clip_model, names, cfg, engine=engine)
    perturb(model, seed=2 + seed)
    return model


@pytest.mark.parametrize("preset", ["mpl", "maple", "ivlp", "isp", "zeroshot"])
def test_official_path_and_class_chunks_give_the_same_logits(tiny, monkeypatch, preset):
    """The engine's official path (CLIP's stock blocks, all 77 text positions, one pass) gives the
    default's logits; and so does one class per text pass (text_chunk=1) against all classes at
    once (None)."""
    x = images(3)
    with torch.no_grad():
        expected = preset_model(tiny, preset)(x)
        official = preset_model(tiny, preset, engine=bench.OFFICIAL)(x)
        torch.testing.assert_close(official, expected, atol=1e-5, rtol=0)
    assert expected.std() > 0.1  # the logits are not trivially equal
    # ... and it is the official path: every block of both towers (class texts built on construction
    # included) is CLIP's stock block, over all 77 text positions
    seen = record_blocks(monkeypatch, lambda images: preset_model(tiny, preset, engine=bench.OFFICIAL)(images), x)
    assert seen["kinds"] == {"stock"} and seen["text"] and seen["vision"]
    assert {t.shape[1] for t, _ in seen["text"]} == {77}
    if preset == "zeroshot":
        return  # its class texts are encoded once, on construction
    model = preset_model(tiny, preset)
    for shared_prefix in (True, False):
        with torch.no_grad(), FAST.options(shared_prefix=shared_prefix):
            with FAST.options(text_chunk=1):
                one = model(x)
            with FAST.options(text_chunk=None):
                torch.testing.assert_close(one, model(x), atol=1e-5, rtol=0)
    # (one class alone has no prefix to share; and without sharing each block sees every class of
    # the pass; ISP's self-structural hook reads each class's own rows, so the engine never splits
    # its classes)
    alike = preset != "isp"
    with FAST.options(text_chunk=1, shared_prefix=False):
        assert {t.shape[0] for t, _ in record_blocks(monkeypatch, model, x)["text"]} == {1 if alike else len(NAMES)}
    with FAST.options(text_chunk=None, shared_prefix=False):
        assert {t.shape[0] for t, _ in record_blocks(monkeypatch, model, x)["text"]} == {len(NAMES)}


# --------------------------------------------------------------------------------------------------
# The methods' interface (clip_layers.PromptMethod): fp32 logits, the prompts' own state dict, the
# loss weights

INTERFACE = ["mpl", "maple", "ivlp", "isp", "isp_linear", "isp_none", "zeroshot"]


@pytest.mark.parametrize("preset", INTERFACE)
def test_logits_are_fp32_under_bf16_autocast(tiny, preset):
    """Logits are always computed in fp32, under autocast too; so are ISP's loss weights."""
    model, x = preset_model(tiny, preset), images(2)
    with torch.no_grad():
        reference = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
            weights = model.loss_weights(x, torch.tensor([0, 1]), logits)
    assert logits.dtype == torch.float32 and logits.shape == (2, len(NAMES))
    # bf16 features: the same logits to bf16's precision
    assert 0 < (logits - reference).abs().max() < 2
    assert weights is None or weights.dtype == torch.float32


@pytest.mark.parametrize("preset", INTERFACE)
def test_prompt_state_dict_holds_exactly_the_trainable_tensors(tiny, preset):
    model = preset_model(tiny, preset)
    sd = model.prompt_state_dict()
    assert sd.keys() == trainable(model).keys() and (sd == {}) == (preset == "zeroshot")
    assert not any(k.startswith("clip.") for k in sd)
    assert all(torch.equal(sd[k], p) and not sd[k].requires_grad for k, p in trainable(model).items())
    with torch.no_grad():  # copies: the model training on does not change them
        for p in trainable(model).values():
            p.add_(1)
    assert not any(torch.equal(sd[k], p) for k, p in trainable(model).items())


@pytest.mark.parametrize("preset", ["mpl", "maple", "ivlp", "isp_linear", "isp_none", "zeroshot"])
def test_prompts_load_into_a_model_of_other_class_names(tiny, preset):
    """Save the prompts only, build the method for other class names, load them: the classes both
    sets share get the same logits. (ISP's class_summaries reads the whole class set: the next
    test.)"""
    trained, x = preset_model(tiny, preset), images(3)
    fresh = preset_model(tiny, preset, names=["zebra", NAMES[3], "aardvark", NAMES[0]], seed=9)
    with torch.no_grad():
        expected = trained(x)[:, [0, 3]]
        assert preset == "zeroshot" or (fresh(x)[:, [3, 1]] - expected).abs().max() > 1e-3
        fresh.load_prompt_state_dict(trained.prompt_state_dict())
        torch.testing.assert_close(fresh(x)[:, [3, 1]], expected, atol=1e-5, rtol=1e-5)


def test_isp_prompts_load_into_a_model_of_the_classes_reordered(tiny):
    """ISP's default cross module reads every class of the set: the same set in another order, the
    same logits."""
    trained, x, order = preset_model(tiny, "isp"), images(3), [3, 0, 4, 1, 2]
    fresh = preset_model(tiny, "isp", names=[NAMES[i] for i in order], seed=9)
    fresh.load_prompt_state_dict(trained.prompt_state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), trained(x)[:, order], atol=1e-5, rtol=1e-5)


def test_load_prompt_state_dict_is_strict(tiny):
    """Missing, unexpected (a CLIP weight included: CLIP stays frozen) or reshaped tensors, or
    another config's: refused, and nothing is loaded."""
    model = preset_model(tiny, "isp")
    sd, first = model.prompt_state_dict(), "text_prompts"
    for wrong in ({k: v for k, v in sd.items() if k != first}, {**sd, "clip.logit_scale": torch.zeros(())},
                  {**sd, first: sd[first][:, :-1]}, preset_model(tiny, "ivlp").prompt_state_dict(),
                  preset_model(tiny, "mpl").prompt_state_dict()):
        with pytest.raises(ValueError, match="missing, unexpected or of another shape for this ISP"):
            model.load_prompt_state_dict({k: v + 1 for k, v in wrong.items()})
    assert all(torch.equal(sd[k], v) for k, v in model.prompt_state_dict().items())
    assert tiny.logit_scale.item() != 1  # (the CLIP weight offered, 1, was not loaded)


def test_loss_weights_none_without_sample_probing(tiny):
    x, y = images(2), torch.tensor([0, 1])
    for model in (preset_model(tiny, "mpl"), preset_model(tiny, "ivlp"), make(tiny), preset_model(tiny, "zeroshot")):
        assert model.loss_weights(x, y, model(x)) is None
    model = preset_model(tiny, "isp").train()
    assert not model.clip.training and model.training  # train() leaves the frozen CLIP in eval mode
    w = model.loss_weights(x, y, model(x))
    assert w.shape == (2,) and not w.requires_grad


def test_config_fields_have_help(tiny):
    # each field's flag takes its help from its Annotated[type, help]
    for config in (ISPConfig(), mpl.MPLConfig()):
        parser = argparse.ArgumentParser()
        cli.config_flags(parser, config)
        helps = {a.dest[4:]: a.help for a in parser._actions if a.dest.startswith("cfg_")}
        assert set(helps) == {f.name for f in dataclasses.fields(config)}
        assert all(len(h.split(" (preset:")[0]) > 15 for h in helps.values()), helps
        hints = typing.get_type_hints(type(config), include_extras=True)
        assert helps == {k: f"{hints[k].__metadata__[0]} (preset: {getattr(config, k)!r})" for k in helps}
    with pytest.raises(ValueError, match="isp_cross must be one of none, class_summaries, linear"):
        ISPConfig(isp_cross="c2")
    assert dataclasses.fields(ISPConfig)[0].name == "n_ctx"
    names = {f.name for f in dataclasses.fields(ISPConfig)}
    assert {"n_ctx", "depth", "ctx_init", "isp_self", "isp_cross", "sample_probing", "sp_lambda"} <= names
    with pytest.raises(ValueError, match=r"depth must be in 1\.\.12"):
        ISP(tiny, NAMES, ISPConfig(depth=13))     # deeper than the CLIP: refused, never rescaled
    assert math.isclose(ISPConfig().sp_lambda, 1.0)
