"""Tests of isp.py on a tiny random CLIP (CPU). Self-contained: the reference computations (plain IVLP through CLIP's
stock blocks, frozen-CLIP probabilities through CLIP's stock encode_image/encode_text, closed-form parameter counts)
are written here, independently of isp.py."""
import math

import pytest
import torch
import torch.nn.functional as F

import clip_layers
from isp import ISP, ISPConfig, PRESETS, sample_probing_weights

# Names of different token lengths, so the EOT cut leaves padding after the shorter ones (the mask matters).
NAMES = ["cat", "golden retriever", "sea lion", "red eyed tree frog", "ox"]
DEPTH = 3  # the tiny CLIP has 4 layers: layer 3 runs without prompts, as layers 9..11 of ViT-B/16 do


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # These models are tiny, and on a busy 2-core machine two OpenMP threads wait on each other (a training step of
    # the tiny ISP measured 0.025 s with one thread and up to 9 s with two).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    return clip_layers.random_clip("tiny", seed=0)


def make(tiny, names=NAMES, **kw):
    return ISP(tiny, names, ISPConfig(**{"depth": DEPTH, "sample_probing": False, **kw}))


def images(n, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def perturb(model, scale=0.5, seed=2):
    """Make every zero-initialised output and every prompt non-trivial, so that equalities mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and (name.endswith("o.weight") or "prompts" in name or "coupling" in name):
                p.add_(scale * torch.randn(p.shape, generator=g))


def trainable(model):
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------------------------------------------------
# IVLP: ISP with the modules off, checked against a plain re-implementation through CLIP's stock blocks

def plain_ivlp_logits(clip_model, classnames, Pt, Pv, x, depth):
    """IVLP deep prompting written out: LND tensors, stock `block(x)` with CLIP's own causal mask, all 77 tokens."""
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
    y = torch.cat([y, Pv[0].expand(N, -1, -1)], dim=1)             # prompts after the patches, before ln_pre
    y = v.ln_pre(y).permute(1, 0, 2)
    for i, block in enumerate(v.transformer.resblocks):
        if 1 <= i < depth:
            y = torch.cat([y[:-n], Pv[i][:, None].expand(-1, N, -1)])
        y = block(y)
    f = v.ln_post(y.permute(1, 0, 2)[:, 0]) @ v.proj
    f, t = f / f.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True)
    return clip_model.logit_scale.exp() * f @ t.t()


def test_ivlp_equals_plain_reimplementation(tiny):
    model = ISP(tiny, NAMES, ISPConfig(**{**PRESETS["ivlp"].__dict__, "depth": DEPTH}))
    ids = clip_layers.tokenize([f"a photo of a {c}." for c in NAMES])
    assert torch.equal(model.text_prompts[0], tiny.token_embedding(ids[0, 1:5]))   # init from "a photo of a"
    perturb(model)
    x = images(3)
    with torch.no_grad():
        ours, ref = model(x), plain_ivlp_logits(tiny, NAMES, model.text_prompts, model.vision_prompts, x, DEPTH)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cross", ["none", "c1", "c2", "c3"])
def test_zero_init_isp_equals_ivlp(tiny, cross):
    ivlp = make(tiny, isp_self=False, isp_cross="none")
    perturb(ivlp)
    model = make(tiny, isp_cross=cross)
    model.load_state_dict({k: v for k, v in trainable(ivlp).items()}, strict=False)   # same prompt values
    x = images(3)
    with torch.no_grad():
        a, b = model(x), ivlp(x)
    if cross == "c1":  # per-image text: the same rows in an N * C batch (other matmul shapes), so to rounding only
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------------------------
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

    def spy_image(clip_model, imgs, hook=None):
        def h(l, t):
            t = hook(l, t)
            if l == 1:
                seen["vision"] = t[:, -n:].detach().clone()
            return t
        return enc_v(clip_model, imgs, h)

    monkeypatch.setattr(clip_layers, "encode_text", spy_text)
    monkeypatch.setattr(clip_layers, "encode_image", spy_image)
    with torch.no_grad():
        model(x)
    monkeypatch.undo()
    return seen


def test_one_step_changes_prompts(tiny, monkeypatch):
    torch.manual_seed(0)
    model = make(tiny)  # self on, cross c2
    x, y = images(4), torch.tensor([0, 1, 2, 3])
    before = capture_prompts(model, x, monkeypatch)
    assert torch.equal(before["text"], model.text_prompts[1].detach().expand(len(NAMES), -1, -1))  # = IVLP
    opt = torch.optim.SGD(trainable(model).values(), lr=1.0)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    after = capture_prompts(model, x, monkeypatch)
    raw_t, raw_v = model.text_prompts[1].detach(), model.vision_prompts[1].detach()
    assert (after["text"] - raw_t).abs().max() > 1e-4      # the modules moved the text prompts ...
    assert (after["vision"] - raw_v).abs().max() > 1e-4    # ... and the vision prompts
    assert (after["text"][0] - after["text"][1]).abs().max() > 1e-4     # class-specific text prompts
    assert (after["vision"][0] - after["vision"][1]).abs().max() > 1e-4  # image-specific vision prompts


def test_text_padding_is_masked(tiny):
    """A class's self-structural text prompts must not see the padding after its own EOT: encoding it alone (no
    padding) or beside a longer name (padding up to the longer EOT) gives the same features."""
    model = make(tiny, isp_cross="none")
    perturb(model)
    with torch.no_grad():
        alone = model.encode_classes(chunk=1)[0]                      # each class cut at its own EOT
        together = model.encode_classes()[0]                          # all cut at the longest EOT
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cross", ["c1", "c2"])
def test_chunked_encode_classes(tiny, cross, monkeypatch):
    """Chunks (sorted by length, checkpointed with gradients on) give the same features, summaries and gradients, and
    clip_layers.TEXT_CHUNK (train.py's --text-chunk) is the default chunk."""
    model = make(tiny, isp_cross=cross)
    perturb(model)
    with torch.no_grad():
        (f1, s1), (f2, s2) = model.encode_classes(chunk=None), model.encode_classes(chunk=2)
    torch.testing.assert_close(f1, f2, atol=1e-5, rtol=1e-5)
    for a, b in zip(s1, s2, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    x, y = images(2), torch.tensor([1, 3])
    monkeypatch.setattr(clip_layers, "TEXT_CHUNK", 2)
    with torch.no_grad():  # ISP's hook knows its rows: clip_layers must not re-chunk them behind its back
        f3, _ = model.encode_classes(chunk=None)
    torch.testing.assert_close(f1, f3, atol=1e-5, rtol=1e-5)

    def grads(text_chunk):
        monkeypatch.setattr(clip_layers, "TEXT_CHUNK", text_chunk)
        model.zero_grad()
        logits = model(x)
        F.cross_entropy(logits, y).backward()
        return logits.detach(), {k: p.grad.clone() for k, p in trainable(model).items()}

    (l1, g1), (l2, g2) = grads(None), grads(2)
    torch.testing.assert_close(l1, l2, atol=1e-4, rtol=1e-5)
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], atol=1e-5, rtol=1e-4, msg=k)


# ----------------------------------------------------------------------------------------------------------------------
# C2 keeps the text branch image-independent; C1 does not

def text_features_seen(model, x, monkeypatch):
    out = []
    enc = clip_layers.encode_text

    def spy(*args, **kw):
        out.append(enc(*args, **kw))
        return out[-1]

    monkeypatch.setattr(clip_layers, "encode_text", spy)
    with torch.no_grad():
        model(x)
    monkeypatch.undo()
    return out


def test_c2_text_independent_of_images(tiny, monkeypatch):
    model = make(tiny, isp_cross="c2")
    perturb(model)
    a, b = text_features_seen(model, images(2, seed=3), monkeypatch), text_features_seen(model, images(2, seed=4),
                                                                                          monkeypatch)
    assert len(a) == len(b) == 1 and a[0].shape[0] == len(NAMES)   # one pass over the classes, not per image
    assert torch.equal(a[0], b[0])
    with torch.no_grad():  # ... while the text prompts do read the vision prompts
        model.vision_prompts.add_(torch.randn(model.vision_prompts.shape, generator=torch.Generator().manual_seed(6)))
    c = text_features_seen(model, images(2, seed=3), monkeypatch)
    assert (c[0] - a[0]).abs().max() > 1e-4


def test_c1_text_depends_on_images(tiny, monkeypatch):
    model = make(tiny, isp_cross="c1")
    perturb(model)
    x = images(2, seed=3)
    C = len(NAMES)
    seen = text_features_seen(model, x, monkeypatch)[-1]            # the per-image pass: (N * C, E), image-major
    assert seen.shape[0] == 2 * C
    assert (seen[:C] - seen[C:]).abs().max() > 1e-4                  # g_{c|x0} != g_{c|x1}
    same = text_features_seen(model, x[[0, 0]], monkeypatch)[-1]
    torch.testing.assert_close(same[:C], same[C:])
    torch.testing.assert_close(same[:C], seen[:C], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Sample probing

def test_probing_weights_hand_computed():
    p = torch.tensor([0.9, 0.5, 0.2, 0.0])                           # d = 0.1, 0.5, 0.8, 1.0
    torch.testing.assert_close(sample_probing_weights(p, "linear"), torch.tensor([1.1, 1.5, 1.8, 2.0]))
    torch.testing.assert_close(sample_probing_weights(p, "linear", lam=0.5), torch.tensor([1.05, 1.25, 1.4, 1.5]))
    # focal, gamma 2, eps 0: d^2 = .01, .25, .64, 1; mean .475
    torch.testing.assert_close(sample_probing_weights(p, "focal", gamma=2.0, eps=0.0),
                               torch.tensor([0.01, 0.25, 0.64, 1.0]) / 0.475)
    w = sample_probing_weights(p, "focal")                           # default eps: still mean 1, ordered
    assert abs(w.mean().item() - 1) < 1e-6 and torch.all(w[1:] > w[:-1])
    torch.testing.assert_close(sample_probing_weights(torch.ones(3), "focal"), torch.ones(3))  # all easy: no 0/0
    # batch-softmax, T = 1: 4 e^d / (e^.1 + e^.5 + e^.8 + e^1) = 4 * [1.105171, 1.648721, 2.225541, 2.718282] / 7.697715
    torch.testing.assert_close(sample_probing_weights(p, "batch-softmax"),
                               torch.tensor([0.574285, 0.856731, 1.156465, 1.412519]), atol=1e-6, rtol=1e-5)
    # dynamic: p_model = .9, .5, .8, .3 -> sqrt(p_clip p_model) = .9, .5, .4, 0 -> d = .1, .5, .6, 1
    torch.testing.assert_close(sample_probing_weights(p, "dynamic", p_model=torch.tensor([0.9, 0.5, 0.8, 0.3])),
                               torch.tensor([1.1, 1.5, 1.6, 2.0]))
    with pytest.raises(ValueError):
        sample_probing_weights(p, "dynamic")


@pytest.mark.parametrize("mode", ["linear", "focal", "batch-softmax", "dynamic"])
def test_sample_weights_use_frozen_clip(tiny, mode):
    model = make(tiny, sample_probing=True, sp_mode=mode, sp_lambda=0.7)
    perturb(model)  # the prompts must not leak into p_clip
    x, y = images(6), torch.tensor([0, 1, 2, 3, 4, 0])
    logits = model(x)
    with torch.no_grad():  # p_clip from CLIP's own encoders, "a photo of a {}." on all 77 tokens
        t = tiny.encode_text(clip_layers.tokenize([f"a photo of a {c}." for c in NAMES]))
        f = tiny.encode_image(x)
        t, f = t / t.norm(dim=-1, keepdim=True), f / f.norm(dim=-1, keepdim=True)
        p_clip = (tiny.logit_scale.exp() * f @ t.t()).softmax(-1)[torch.arange(6), y]
        p_model = logits.softmax(-1)[torch.arange(6), y]
    expected = sample_probing_weights(p_clip, mode, lam=0.7, p_model=p_model)
    w = model.sample_weights(x, y, logits)
    assert not w.requires_grad and w.shape == (6,)
    torch.testing.assert_close(w, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(make(tiny).sample_weights(x, y), torch.ones(6))   # probing off
    if mode == "dynamic":
        with pytest.raises(ValueError):
            model.sample_weights(x, y)


def test_training_with_probing_lowers_weighted_loss(tiny):
    torch.manual_seed(0)
    names = ["red", "green", "blue", "gray"]
    model = ISP(tiny, names, ISPConfig(depth=DEPTH))                  # probing on, linear
    g = torch.Generator().manual_seed(5)
    y = torch.arange(16) % 4
    x = 3 * torch.randn(4, 3, 32, 32, generator=g)[y] + torch.randn(16, 3, 32, 32, generator=g)  # class signal + noise
    w = model.sample_weights(x, y)
    assert torch.all((w >= 1) & (w <= 2)) and w.std() > 0
    # A random CLIP's image features differ little between images (cosine ~0.9), so the small steps take a while.
    opt = torch.optim.SGD(trainable(model).values(), lr=0.005)

    def loss_fn():
        return (w * F.cross_entropy(model(x), y, reduction="none")).mean()

    first = loss_fn()
    for _ in range(40):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = loss_fn()
    assert last < 0.5 * first.item()
    assert torch.equal(model.sample_weights(x, y), w)                # the frozen CLIP did not move


# ----------------------------------------------------------------------------------------------------------------------
# Trainable set and parameter counts

def closed_form(Dt, Dv, n, J, isp_self, cross, r_self=1 / 8, r_cross=1 / 8):
    """Trainable parameters of ISP, from the widths: LN = 2 d, a bias-free projection a -> b = a b."""
    total = J * n * (Dt + Dv)                                         # IVLP deep prompts, both branches
    if isp_self:
        for d in (Dt, Dv):
            d_s = max(1, round(d * r_self))
            total += J * (2 * d + 4 * d * d_s)                        # LN, W_q, W_k, W_u (d -> d_s), W_o (d_s -> d)
    if cross in ("c1", "c2"):
        d_c = max(1, round(Dt * r_cross))
        text_reads_vision = 2 * Dt + 2 * Dv + Dt * d_c + 2 * Dv * d_c + d_c * Dt
        vision_reads_text = 2 * Dv + 2 * Dt + Dv * d_c + 2 * Dt * d_c + d_c * Dv
        total += J * (text_reads_vision + vision_reads_text)
    elif cross == "c3":
        total += J * (Dt * Dv + Dv)                                   # Linear(Dt -> Dv) with bias
    return total


COMBOS = [(s, c) for s in (False, True) for c in ("none", "c1", "c2", "c3")]


def test_parameter_counts_tiny(tiny):
    for isp_self, cross in COMBOS:
        model = make(tiny, isp_self=isp_self, isp_cross=cross)
        n = sum(p.numel() for p in trainable(model).values())
        assert n == closed_form(64, 64, 4, DEPTH, isp_self, cross), (isp_self, cross)


def test_parameter_counts_vit_b16():
    assert closed_form(512, 768, 4, 9, False, "none") == 46_080       # IVLP 4+4, depth 9 (protocol.md 3.4)
    clip_b16 = clip_layers.random_clip("ViT-B/16")
    for isp_self, cross in COMBOS:
        cfg = ISPConfig(isp_self=isp_self, isp_cross=cross, sample_probing=False)
        n = sum(p.numel() for p in trainable(ISP(clip_b16, ["cat"], cfg)).values())
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
            if cross in ("c1", "c2"):
                names |= {f"cross_{m}.{l}.{p}" for m in ("text", "vision") for p in csp}
            if cross == "c3":
                names |= {f"coupling.{l}.weight", f"coupling.{l}.bias"}
        return names

    for isp_self, cross in COMBOS:
        model = make(tiny, isp_self=isp_self, isp_cross=cross, sample_probing=True)
        assert set(trainable(model)) == expected(isp_self, cross)
        assert not any(p.requires_grad for p in tiny.parameters())
        assert not any(name.startswith("clip.") for name in trainable(model))
    # Checkpoints: names and shapes do not depend on the class set; only CLIP's keys are missing on reload.
    base, new = make(tiny), make(tiny, names=["zebra", "aardvark"])
    sd = {k: v.detach().clone() for k, v in trainable(base).items()}
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in trainable(new).items()}
    missing, unexpected = new.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) == {f"clip.{k}" for k in tiny.state_dict()}


def test_config_fields_have_help(tiny):
    import dataclasses
    for f in dataclasses.fields(ISPConfig):
        assert f.metadata.get("help"), f.name
    assert dataclasses.fields(ISPConfig)[0].name == "n_ctx"
    names = {f.name for f in dataclasses.fields(ISPConfig)}
    assert {"n_ctx", "depth", "ctx_init", "isp_self", "isp_cross", "sample_probing", "sp_lambda", "sp_mode"} <= names
    with pytest.raises(ValueError):
        ISP(tiny, NAMES, ISPConfig())     # depth 9 > the tiny CLIP's 4 layers
    assert math.isclose(ISPConfig().sp_lambda, 1.0)
