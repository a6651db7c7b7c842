"""
Tests of clip_layers.py and its engine (clip_engine.py) on the CPU with the tiny random CLIP (conftest.py): the patched
encoders equal stock CLIP, the EOT cut is exact, the hooks see every layer, zero-shot CLIP, loading checkpoints; each
speed-up of the engine (class chunks, shared text prefix, CLS-only last block) equals the plain loops.

    python -m pytest -q test_clip_layers.py

Every test compares against something computed another way (stock CLIP, the full 77-token path) or against a count,
so each one can fail.
"""
import copy


import pytest
import torch

import bench
from engine import clip_engine
import clip_layers
from conftest import spy_shared

FAST = clip_engine.Engine()  # the engine train.py hands the methods
TEXTS = ["a photo of a dog.", "a photo of a big red striped circle.", "x", "a centered satellite photo of sea."]


# ----------------------------------------------------------------------------------------------------------------------
# The patched encoders equal stock CLIP

@pytest.mark.parametrize("engine", [True, False])
def test_patched_text_encoder_equals_stock(tiny, engine):
    ids = clip_layers.tokenize(TEXTS)
    with torch.no_grad():  # engine=None: the plain loop of clip_layers, as a copy without clip_engine.py runs it
        ours = clip_layers.encode_text_ids(tiny, ids, clip_engine.Engine() if engine else None)
        stock = tiny.encode_text(ids)
    assert ours.shape == (len(TEXTS), tiny.text_projection.shape[1])
    assert (ours - stock).abs().max() < 1e-5


@pytest.mark.parametrize("engine", [True, False])
def test_patched_image_encoder_equals_stock(tiny, engine):
    torch.manual_seed(0)
    images = torch.randn(5, 3, tiny.visual.input_resolution, tiny.visual.input_resolution)
    with torch.no_grad():  # engine=None: the plain loop of clip_layers, as a copy without clip_engine.py runs it
        ours = clip_layers.encode_image(tiny, images, engine=clip_engine.Engine() if engine else None)
        stock = tiny.encode_image(images)
    assert (ours - stock).abs().max() < 1e-5


def test_eot_cut_equals_full_77_tokens_with_prompts(tiny):
    """Cutting after the last EOT is exact under the causal mask, also when a hook rewrites prompt rows per layer."""
    ids = clip_layers.tokenize(TEXTS)
    torch.manual_seed(1)
    deep = torch.randn(len(tiny.transformer.resblocks), 2, tiny.ln_final.weight.shape[0])

    def hook(layer, x):  # replace rows 1..2 (just after SOS) at every layer, as deep text prompts do
        return torch.cat([x[:, :1], deep[layer].expand(x.shape[0], -1, -1), x[:, 3:]], dim=1)

    x = clip_layers.token_embedding(tiny, ids)
    eot = clip_layers.eot_index(ids)
    with torch.no_grad():
        cut = clip_layers.text_transformer(tiny, x, eot, hook=hook)
        # all 77 positions through CLIP's stock blocks
        full = clip_layers.encode_text(tiny, x, eot, hook=hook, engine=bench.OFFICIAL)
    assert (cut - full).abs().max() < 1e-5
    assert int(eot.max()) + 1 < 77 // 4  # and it really is a much shorter sequence


def test_image_hook_sees_every_layer_input(tiny):
    seen = []

    def hook(layer, x):
        seen.append((layer, x.shape[1]))
        return torch.cat([x, x[:, :1]], dim=1) if layer == 0 else x  # append one token before ln_pre

    images = torch.randn(2, 3, tiny.visual.input_resolution, tiny.visual.input_resolution)
    clip_layers.encode_image(tiny, images, hook=hook, engine=FAST)
    n_tok = tiny.visual.positional_embedding.shape[0]
    assert seen == [(0, n_tok)] + [(i, n_tok + 1) for i in range(1, len(tiny.visual.transformer.resblocks))]


def test_zeroshot_equals_stock_clip_classifier(tiny):
    names = ["dog", "red circle", "sea"]
    model = clip_layers.ZeroShotCLIP(tiny, names, "a photo of a {}.", engine=FAST)
    images = torch.randn(3, 3, tiny.visual.input_resolution, tiny.visual.input_resolution)
    with torch.no_grad():
        img = tiny.encode_image(images)
        txt = tiny.encode_text(clip_layers.tokenize([f"a photo of a {n}." for n in names]))
        img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
        expected = tiny.logit_scale.exp() * img @ txt.t()
        assert (model(images) - expected).abs().max() < 1e-4
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 0


# ----------------------------------------------------------------------------------------------------------------------
# The engine: class chunks

def test_chunked_text_encoding_equals_one_shot_with_gradients(tiny):
    """Class chunks (sorted by length, each cut at its own EOT, checkpointed) give the same features and gradients."""
    names = ["dog", "a very long class name with many many words in it", "sea", "red circle", "x y", "cat"] * 3
    ids = clip_layers.tokenize([f"a photo of a {n}." for n in names])
    eot = clip_layers.eot_index(ids)
    prompt = torch.randn(len(tiny.transformer.resblocks), 2, tiny.ln_final.weight.shape[0], requires_grad=True)

    def hook(layer, x):
        return torch.cat([x[:, :1], prompt[layer].expand(x.shape[0], -1, -1), x[:, 3:]], dim=1)

    grads, feats = [], []
    for chunk in (None, 4):
        with FAST.options(text_chunk=chunk):
            x = clip_layers.token_embedding(tiny, ids)
            f = clip_layers.encode_text(tiny, x, eot, hook=hook, hook_rows=3, engine=FAST)
        (f ** 2).sum().backward()
        feats.append(f.detach())
        grads.append(prompt.grad.clone())
        prompt.grad = None
    assert (feats[0] - feats[1]).abs().max() < 1e-5
    assert (grads[0] - grads[1]).abs().max() < 1e-4 * grads[0].abs().max()


# ----------------------------------------------------------------------------------------------------------------------
# The engine: the shared prefix, the leading rows that are equal in every class, encoded once

# Names of 1 to 30 tokens behind one template: "a photo of a" (+ SOS) is the shared prefix, 5 rows
SHARED = ["ox", "golden retriever", " ".join(["big red striped"] * 10), "sea lion", "cat", "red eyed tree frog"]


def test_shared_prefix_length():
    ids = clip_layers.tokenize([f"X a photo of a {n}." for n in SHARED])
    x, eot = torch.randn(49408, 8)[ids], clip_layers.eot_index(ids)   # any embedding: equal ids give equal rows
    assert clip_engine.prefix_length(clip_engine.equal_run(x), eot) == 6             # SOS X a photo of a
    ids = clip_layers.tokenize(["a dog.", "a dog."])                 # equal texts: the EOT stays a class's own row
    x = torch.randn(49408, 8)[ids]
    assert clip_engine.prefix_length(clip_engine.equal_run(x), clip_layers.eot_index(ids)) == 4
    ids = clip_layers.tokenize(["x", "a photo of a dog."])           # only SOS in common
    x = torch.randn(49408, 8)[ids]
    assert clip_engine.prefix_length(clip_engine.equal_run(x), clip_layers.eot_index(ids)) == 1


@pytest.mark.parametrize("chunk", [None, 2])
def test_shared_prefix_gradients_of_clip_itself(tiny, monkeypatch, chunk):
    """Zero-shot CLIP's text path (no hook) with every text weight of CLIP trainable (token and position embeddings
    included, as in pre-training): the same features and the same gradients with and without the shared prefix, the
    prefix's gradient summed over the classes that read it, as the embedding table sums it over its copies."""
    clip_model = copy.deepcopy(tiny)
    text_params = [p for n, p in clip_model.named_parameters() if not n.startswith("visual.") and n != "logit_scale"]
    for p in text_params:
        p.requires_grad_(True)
    ids = clip_layers.tokenize([f"a photo of a {n}." for n in SHARED])
    w = torch.randn(len(SHARED), clip_model.text_projection.shape[1], generator=torch.Generator().manual_seed(0))
    calls = spy_shared(monkeypatch)
    out = {}
    for shared in (False, True):
        for p in text_params:
            p.grad = None
        with FAST.options(text_chunk=chunk, shared_prefix=shared):
            f = clip_layers.encode_text_ids(clip_model, ids, FAST)
        (w * f).sum().backward()
        out[shared] = f.detach(), [p.grad.clone() for p in text_params]
        assert bool(calls) == shared
    torch.testing.assert_close(out[True][0], out[False][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(out[True][1], out[False][1]):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item())
    with torch.no_grad():
        torch.testing.assert_close(out[True][0], clip_model.encode_text(ids), atol=1e-5, rtol=1e-5)


def deep_prompt_hook(prompt):
    """Deep text prompts as MPL / IVLP write them: rows 1..n (right after SOS) replaced at every layer."""
    n = prompt.shape[1]

    def hook(layer, x):
        return torch.cat([x[:, :1], prompt[layer].expand(x.shape[0], -1, -1), x[:, 1 + n:]], dim=1)

    return hook


def test_shared_prefix_with_a_hook_needs_its_promise(tiny, monkeypatch):
    """A hook shares the prefix only with hook_rows (its promise to write rows < hook_rows alike in every class), and
    only where the equal leading rows cover those rows; then with the features and EOT summaries of the full rows."""
    ids = clip_layers.tokenize([f"X X a photo of a {n}." for n in SHARED])      # equal leading rows: 7
    x, eot = clip_layers.token_embedding(tiny, ids), clip_layers.eot_index(ids)
    prompt = torch.randn(len(tiny.transformer.resblocks), 2, x.shape[-1], generator=torch.Generator().manual_seed(1))
    hook = deep_prompt_hook(prompt)
    calls = spy_shared(monkeypatch)
    with torch.no_grad():
        with FAST.options(shared_prefix=False):
            full = clip_layers.encode_text(tiny, x, eot, hook, eot_rows=True, engine=FAST)
        assert not calls
        no_promise = clip_layers.encode_text(tiny, x, eot, hook, eot_rows=True, engine=FAST)
        assert torch.equal(no_promise[0], full[0])
        assert not calls
        too_many = clip_layers.encode_text(tiny, x, eot, hook, eot_rows=True, hook_rows=8, engine=FAST)
        assert torch.equal(too_many[0], full[0])
        assert not calls                                                           # 8 rows > the 7 equal ones
        shared = clip_layers.encode_text(tiny, x, eot, hook, eot_rows=True, hook_rows=3, engine=FAST)
        assert calls == [int((eot + 1 - 7).sum())] * len(tiny.transformer.resblocks)   # each class's own rows
        for a, b in zip(shared, full):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

        def lengthening(layer, x):  # breaks the promise: writes a row past the prefix
            return torch.cat([x, x[:, -1:]], dim=1)

        with pytest.raises(ValueError, match="changed the shared rows' shape"):
            clip_layers.encode_text(tiny, x, eot, lengthening, hook_rows=3, engine=FAST)


def test_last_vision_block_computes_the_cls_row_only(tiny, monkeypatch):
    """After the last block CLIP reads only CLS: the engine's last block returns (N, 1, D), the blocks before it
    (N, L, D), and the features are stock CLIP's."""
    shapes, stock, stock_cls = [], clip_layers.residual_block, clip_engine.cls_block

    def recording(run):
        def call(block, x, **kw):
            y = run(block, x, **kw)
            shapes.append(y.shape[1])
            return y
        return call

    monkeypatch.setattr(clip_layers, "residual_block", recording(stock))
    monkeypatch.setattr(clip_engine, "cls_block", recording(stock_cls))
    images = torch.randn(2, 3, tiny.visual.input_resolution, tiny.visual.input_resolution)
    with torch.no_grad():
        ours = clip_layers.encode_image(tiny, images, engine=FAST)
        assert (ours - tiny.encode_image(images)).abs().max() < 1e-5
    n_tok = tiny.visual.positional_embedding.shape[0]
    assert shapes == [n_tok] * (len(tiny.visual.transformer.resblocks) - 1) + [1]


def test_the_engine_is_an_argument_and_nothing_imports_it_behind_the_callers_back(tiny, monkeypatch):
    """clip_layers, mpl and isp import no engine; a method without engine= runs the plain loops (no engine function
    is called), and one handed clip_engine.Engine() runs the engine's shared prefix and CLS-only last block."""
    import os
    import subprocess
    import sys
    import mpl
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = "import sys, clip_layers, mpl, isp; print(sorted(m for m in sys.modules if m.split('.')[0] == 'engine'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    shared, cls = spy_shared(monkeypatch), []
    stock_cls = clip_engine.cls_block
    monkeypatch.setattr(clip_engine, "cls_block", lambda block, x: cls.append(1) or stock_cls(block, x))
    images = torch.randn(2, 3, tiny.visual.input_resolution, tiny.visual.input_resolution)
    cfg = mpl.PRESETS["maple"]
    with torch.no_grad():
        torch.manual_seed(0)  # the same initial prompts in both
        plain = mpl.MPL(tiny, ["dog", "sea lion", "red circle"], cfg)(images)
        assert shared == [] and cls == []
        torch.manual_seed(0)
        fast = mpl.MPL(tiny, ["dog", "sea lion", "red circle"], cfg, engine=clip_engine.Engine())(images)
        assert shared and cls == [1]
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
