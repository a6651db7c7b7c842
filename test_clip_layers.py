"""
Tests of clip_layers.py on the CPU with the tiny random CLIP (conftest.py): the patched encoders equal stock CLIP, the
EOT cut is exact, the hooks see every layer, zero-shot CLIP, loading checkpoints, chunked text encoding.

    python -m pytest -q test_clip_layers.py

Every test compares against something computed another way (stock CLIP, the full 77-token path) or against a count,
so each one can fail.
"""
import pytest
import torch

import clip_layers

TEXTS = ["a photo of a dog.", "a photo of a big red striped circle.", "x", "a centered satellite photo of sea."]


# ----------------------------------------------------------------------------------------------------------------------
# The patched encoders equal stock CLIP

def test_patched_text_encoder_equals_stock(tiny):
    ids = clip_layers.tokenize(TEXTS)
    with torch.no_grad():
        ours, stock = clip_layers.encode_text_ids(tiny, ids), tiny.encode_text(ids)
    assert ours.shape == (len(TEXTS), tiny.text_projection.shape[1])
    assert (ours - stock).abs().max() < 1e-5


def test_patched_image_encoder_equals_stock(tiny):
    torch.manual_seed(0)
    images = torch.randn(5, 3, tiny.visual.input_resolution, tiny.visual.input_resolution)
    with torch.no_grad():
        ours, stock = clip_layers.encode_image(tiny, images), tiny.encode_image(images)
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
        cut = clip_layers.encode_text(tiny, x, eot, hook=hook, cut=True)
        full = clip_layers.encode_text(tiny, x, eot, hook=hook, cut=False)
    assert (cut - full).abs().max() < 1e-5
    assert int(eot.max()) + 1 < 77 // 4  # and it really is a much shorter sequence


def test_image_hook_sees_every_layer_input(tiny):
    seen = []

    def hook(layer, x):
        seen.append((layer, x.shape[1]))
        return torch.cat([x, x[:, :1]], dim=1) if layer == 0 else x  # append one token before ln_pre

    images = torch.randn(2, 3, tiny.visual.input_resolution, tiny.visual.input_resolution)
    clip_layers.encode_image(tiny, images, hook=hook)
    n_tok = tiny.visual.positional_embedding.shape[0]
    assert seen == [(0, n_tok)] + [(i, n_tok + 1) for i in range(1, len(tiny.visual.transformer.resblocks))]


def test_zeroshot_equals_stock_clip_classifier(tiny):
    names = ["dog", "red circle", "sea"]
    model = clip_layers.ZeroShotCLIP(tiny, names, "a photo of a {}.")
    images = torch.randn(3, 3, tiny.visual.input_resolution, tiny.visual.input_resolution)
    with torch.no_grad():
        img = tiny.encode_image(images)
        txt = tiny.encode_text(clip_layers.tokenize([f"a photo of a {n}." for n in names]))
        img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
        expected = tiny.logit_scale.exp() * img @ txt.t()
        assert (model(images) - expected).abs().max() < 1e-4
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 0


# ----------------------------------------------------------------------------------------------------------------------
# Loading

def test_load_clip_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # an empty ~/.cache/clip
    with pytest.raises(FileNotFoundError, match=r"ViT-B-16\.pt.*--clip"):
        clip_layers.load_clip("ViT-B/16")
    with pytest.raises(FileNotFoundError, match="neither a CLIP model name"):
        clip_layers.load_clip(str(tmp_path / "nothing.pt"))
    bad = tmp_path / "ViT-B-16.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="corrupt"):
        clip_layers.load_clip(str(bad))
    cache = tmp_path / ".cache" / "clip"
    cache.mkdir(parents=True)
    (cache / "ViT-B-16.pt").write_bytes(b"truncated")
    with pytest.raises(RuntimeError, match="corrupt.*SHA256"):
        clip_layers.load_clip("ViT-B/16")


def test_load_clip_reads_a_real_checkpoint_file(tmp_path, tiny):
    """A local .pt in OpenAI's layout (a state dict) goes through the real clip.load and comes back frozen fp32."""
    path = tmp_path / "tiny.pt"
    torch.save(tiny.state_dict(), path)
    model = clip_layers.load_clip(str(path))
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    ids = clip_layers.tokenize(TEXTS[:2])
    with torch.no_grad():
        assert (model.encode_text(ids) - tiny.encode_text(ids)).abs().max() < 1e-5


# ----------------------------------------------------------------------------------------------------------------------
# Class chunks

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
        f = clip_layers.encode_text(tiny, clip_layers.token_embedding(tiny, ids), eot, hook=hook, chunk=chunk)
        (f ** 2).sum().backward()
        feats.append(f.detach())
        grads.append(prompt.grad.clone())
        prompt.grad = None
    assert (feats[0] - feats[1]).abs().max() < 1e-5
    assert (grads[0] - grads[1]).abs().max() < 1e-4 * grads[0].abs().max()
