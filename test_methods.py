"""
Tests of the patched CLIP encoders, the training loop and the methods, on the CPU with a tiny random CLIP.

    python -m pytest -q

Every test compares against something computed another way (stock CLIP, the full 77-token path, the papers'
schedule, an uninterrupted run) or against a count, so each one can fail.
"""
import copy
import json
import math
import os
import warnings
from collections import OrderedDict
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clip_layers
import data
import mpl
import protocols
import train
import isp
from isp import ISP, ISPConfig, PRESETS, sample_probing_weights

# Tiny models gain nothing from several threads, and on a loaded 2-core machine OpenMP's spinning threads make them
# 50x slower; one thread keeps the whole suite (all test files run in this process) fast and steady.
torch.set_num_threads(1)

@pytest.fixture(scope="module")
def tiny():
    return clip_layers.random_clip("tiny", seed=0)


TEXTS = ["a photo of a dog.", "a photo of a big red striped circle.", "x", "a centered satellite photo of sea."]


# ----------------------------------------------------------------------------------------------------------------------
# clip_layers: the patched encoders equal stock CLIP

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
# train.py: schedule, loop, checkpoints

def test_lr_schedule_matches_dassl_maple():
    lrs = [train.get_lr(e, 0.0035, 5) for e in range(5)]
    assert lrs[0] == 1e-5
    assert np.allclose(lrs, [1e-5, 0.0035, 0.003166, 0.002291, 0.001209], atol=5e-7)


def test_promptsrc_last_epoch_lr():
    assert abs(train.get_lr(19, 0.0025, 20) - 6.1e-5) < 1e-6


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def colour_benchmark(root, n_train=8, n_test=6, size=32, seed=0):
    """Four classes told apart by colour alone: separable, so a prompt method must beat chance on train data."""
    rng = np.random.default_rng(seed)
    splits = {"train": [], "test": []}
    for label, (name, rgb) in enumerate(COLOURS.items()):
        for split, n in (("train", n_train), ("test", n_test)):
            for i in range(n):
                img = np.clip(np.array(rgb) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
                path = os.path.join(root, f"{split}_{name}_{i}.png")
                Image.fromarray(img).save(path)
                splits[split].append(data.Datum(path, label, name))
    return data.Benchmark("colours", splits["train"], [], splits["test"], list(COLOURS), "a photo of a {}.")


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return colour_benchmark(str(tmp_path_factory.mktemp("colours")))


def run(tmp_path, tiny, colours, *flags, name="run"):
    argv = ["--method", "maple", "--subsample", "all", "--output", str(tmp_path / name), "--epochs", "3",
            "--depth", "2", *flags]
    return train.main(argv, clip_model=tiny, benchmarks={"all": colours})


def test_training_lowers_loss_and_beats_chance(tmp_path, tiny, colours, capsys):
    """maple on four colour classes: the per-sample loss falls, and accuracy on the training images beats chance."""
    args = train.get_args(["--method", "maple", "--depth", "2"])
    torch.manual_seed(0)
    model = train.build_model(args, tiny, colours.classnames, colours.template)
    loader = train.make_loader(colours.train, data.test_transform(32), 32, False, 0)
    images, labels, _ = next(iter(loader))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2, momentum=0.9)
    losses = []
    for _ in range(30):
        loss = train.loss_fn(model(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        acc = (model(images).argmax(-1) == labels).float().mean().item()
    assert losses[-1] < 0.5 * losses[0]
    assert acc > 0.5  # chance is 0.25


def test_run_writes_results_and_a_small_weights_only_checkpoint(tmp_path, tiny, colours):
    res = run(tmp_path, tiny, colours)
    assert set(res["accuracy"]) == {"all"}
    saved = json.load(open(tmp_path / "run" / "results.json"))
    assert saved["accuracy"] == res["accuracy"] and saved["trainable_params"] == res["trainable_params"] > 0
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 3
    assert sum(v.numel() for v in ckpt["params"].values()) == res["trainable_params"]  # no frozen CLIP inside
    # an existing run is never overwritten silently
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        run(tmp_path, tiny, colours)
    # --eval-only --load gives back the same accuracy from the checkpoint alone
    res2 = run(tmp_path, tiny, colours, "--eval-only", "--load", str(tmp_path / "run" / "checkpoint.pt"), name="ev")
    assert res2["accuracy"] == res["accuracy"]


def test_resume_after_interruption_equals_uninterrupted(tmp_path, tiny, colours, monkeypatch):
    run(tmp_path, tiny, colours, name="full")
    full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["params"]

    calls = {"n": 0}
    real_save = train.save_checkpoint

    def save_then_die(path, ckpt):  # the process dies right after epoch 2's checkpoint
        real_save(path, ckpt)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, tiny, colours, name="cut")
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["epoch"] == 2
    run(tmp_path, tiny, colours, "--resume", name="cut")
    resumed = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["params"]
    assert resumed.keys() == full.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


def test_base_to_new_rebuilds_with_new_classnames(tmp_path, tiny, colours):
    base = data.Benchmark("colours", [d for d in colours.train if d.label < 2], [],
                          [d for d in colours.test if d.label < 2], colours.classnames[:2], colours.template)
    relabel = lambda items: [data.Datum(d.impath, d.label - 2, d.classname) for d in items if d.label >= 2]
    new = data.Benchmark("colours", [], [], relabel(colours.test), colours.classnames[2:], colours.template)
    res = train.main(["--method", "maple", "--output", str(tmp_path / "b2n"), "--epochs", "2", "--depth", "2"],
                     clip_model=tiny, benchmarks={"base": base, "new": new})
    b, n, hm = res["accuracy"]["base"], res["accuracy"]["new"], res["accuracy"]["hm"]
    assert math.isclose(hm, 2 * b * n / (b + n)) if b + n else hm == 0
    # the new accuracy is that of the base-trained prompts on the new classes, checked by hand
    args = train.get_args(["--method", "maple", "--depth", "2"])
    model = train.build_model(args, tiny, new.classnames, new.template)
    train.load_prompts(model, str(tmp_path / "b2n" / "checkpoint.pt"), "maple")
    assert train.evaluate(model, new.test, argparse_ns(args), train.nullcontext) == n


def argparse_ns(args):
    args.workers = 0
    return args


@pytest.mark.parametrize("method", ["maple", "isp"])
def test_official_pure_fp16_setting(tmp_path, colours, method):
    """--precision fp16: CLIP's weights as OpenAI ships them (fp16 linear layers, fp32 LayerNorms), fp16 prompts,
    plain SGD; the logits stay close to the fp32 ones and a run trains end to end."""
    clip32, clip16 = clip_layers.random_clip("tiny"), clip_layers.random_clip("tiny")
    args = train.get_args(["--method", method, "--depth", "2"])
    torch.manual_seed(0)
    m32 = train.build_model(args, clip32, colours.classnames, colours.template)
    torch.manual_seed(0)
    m16 = clip_layers.to_official_fp16(train.build_model(args, clip16, colours.classnames, colours.template))
    assert clip16.visual.conv1.weight.dtype == torch.float16 and clip16.ln_final.weight.dtype == torch.float32
    assert all(p.dtype == torch.float16 for p in m16.parameters() if p.requires_grad)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        l32, l16 = m32(images), m16(images)
    assert (l32 - l16).abs().max() < 0.05 * l32.abs().max() and not torch.equal(l32, l16)
    res = train.main(["--method", method, "--depth", "2", "--subsample", "all", "--epochs", "2", "--precision",
                      "fp16", "--output", str(tmp_path / "fp16")], clip_model=clip_layers.random_clip("tiny"),
                     benchmarks={"all": colours})
    assert res["precision"] == "fp16" and 0 <= res["accuracy"]["all"] <= 100


@pytest.mark.parametrize("method", ["zeroshot", "mpl", "maple", "ivlp", "isp"])
def test_only_method_parameters_train(method, tiny):
    """CLIP is frozen; what trains is exactly the method's own parameters (counts per method are in their tests)."""
    args = train.get_args(["--method", method] + ([] if method == "zeroshot" else ["--depth", "2"]))
    model = train.build_model(args, tiny, ["a", "b", "c"], "a photo of a {}.")
    assert all(not p.requires_grad for p in tiny.parameters())
    clip_ids = {id(p) for p in tiny.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    own = [p for p in model.parameters() if id(p) not in clip_ids]
    assert {id(p) for p in trainable} == {id(p) for p in own}
    assert (len(trainable) == 0) == (method == "zeroshot")


def test_nan_loss_stops_with_step_paths_and_lr_and_keeps_checkpoint(tmp_path, tiny, colours, monkeypatch):
    real_getitem = data.ImageDataset.__getitem__
    calls = {"n": 0}

    def poisoned(self, index):  # from the third epoch on, one image of every batch is NaN
        image, label, i = real_getitem(self, index)
        calls["n"] += 1
        if calls["n"] > 2 * len(colours.train) and self.transform.__class__.__name__ == "Compose" and index == 0:
            image = image * float("nan")
        return image, label, i

    monkeypatch.setattr(data.ImageDataset, "__getitem__", poisoned)
    with pytest.raises(FloatingPointError) as err:
        run(tmp_path, tiny, colours, name="nan")
    msg = str(err.value)
    assert "loss is nan at epoch 3, step" in msg and colours.train[0].impath in msg
    assert f"LR {train.get_lr(2, 0.0035, 3):.6g}" in msg
    ckpt = torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and all(torch.isfinite(v).all() for v in ckpt["params"].values())


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


# ----------------------------------------------------------------------------------------------------------------------
# Protocols and the summary tables (fake CoOp trees from test_data.py)

def fake_result(protocol, method, dataset, seed, **acc):
    return dict(protocol=protocol, method=method, dataset=dataset, seed=seed, accuracy=acc,
                config=dict(args=dict(cross_dataset=False)))


def test_summary_means_hm_average_and_missing_seed(tmp_path):
    runs = [fake_result("base2new", "maple", "eurosat", s, base=b, new=n)
            for s, b, n in ((1, 90.0, 60.0), (2, 92.0, 64.0), (3, 94.0, 62.0))]
    runs += [fake_result("base2new", "maple", "dtd", s, base=b, new=n) for s, b, n in ((1, 80.0, 50.0), (2, 82.0, 52.0))]
    runs += [fake_result("domain_generalization", "maple", t, 1, all=a)
             for t, a in (("imagenet_v2", 60.0), ("imagenet_sketch", 40.0))]
    for i, r in enumerate(runs):
        os.makedirs(tmp_path / str(i))
        json.dump(r, open(tmp_path / str(i) / "results.json", "w"))
    text = protocols.summarize(str(tmp_path))
    eurosat = next(l for l in text.splitlines() if l.startswith("| eurosat"))
    hm = 2 * 92 * 62 / (92 + 62)  # HM of the seed means, not the mean of per-seed HMs
    assert f"| 92.00 ± 2.00 | 62.00 ± 2.00 | {hm:.2f} |" in eurosat
    assert "| 94.07 / 73.23 / 82.35 | " + f"{hm - 82.35:+.2f} |" in eurosat  # MaPLe's published row beside it
    dtd = next(l for l in text.splitlines() if l.startswith("| dtd"))
    assert "missing seed 3" in dtd and "81.00" not in dtd  # never averaged over fewer seeds
    assert "| **average** | incomplete" in text
    dg = next(l for l in text.splitlines() if l.startswith("| imagenet_sketch"))
    assert "| 40.00 ± 0.00 | 49.15 | -9.15 |" in dg
    assert "| **average (2)** | 50.00 |" in text
    csv = open(tmp_path / "summary.csv").read().splitlines()
    assert f"base2new,maple,eurosat,hm,{hm:.4f},,3,82.35" in csv
    assert os.path.exists(tmp_path / "summary.md")


def test_protocols_end_to_end_on_fake_trees(tmp_path, tiny):
    from test_data import (EUROSAT_COUNTS, EUROSAT_FOLDERS, EUROSAT_NAMES, PETS_COUNTS, PETS_NAMES, make_imagenet,
                           make_imagenet_r, make_imagenet_v2, make_json_dataset)
    root = str(tmp_path / "DATA")
    make_json_dataset(root, "eurosat", EUROSAT_FOLDERS, EUROSAT_NAMES, EUROSAT_COUNTS)
    make_json_dataset(root, "oxford_pets", PETS_NAMES, PETS_NAMES, PETS_COUNTS, seed=3)
    make_imagenet(root), make_imagenet_r(root), make_imagenet_v2(root)
    out = str(tmp_path / "out")
    flags = ["--method", "maple", "--depth", "2", "--epochs", "1", "--root", root, "--shots", "2"]
    protocols.run_protocol("base2new", flags, ["eurosat", "oxford_pets"], [1, 2], out, tiny)
    for d in ("eurosat", "oxford_pets"):
        for s in (1, 2):
            res = json.load(open(os.path.join(out, "base2new", "maple", d, f"shots2_seed{s}", "results.json")))
            assert set(res["accuracy"]) == {"base", "new", "hm"} and res["protocol"] == "base2new"
    protocols.run_protocol("cross_dataset", flags, ["imagenet"], [1], out, tiny, targets=["eurosat", "oxford_pets"])
    protocols.run_protocol("domain_generalization", flags, ["imagenet"], [1], out, tiny,
                       targets=["imagenet_r", "imagenet_v2"])
    src = os.path.join(out, "source", "maple", "imagenet", "shots2_seed1")
    assert sorted(os.listdir(src)) == ["checkpoint.pt", "results.json"]  # trained once, for both protocols
    for protocol, targets in (("cross_dataset", ["eurosat", "oxford_pets"]),
                              ("domain_generalization", ["imagenet_r", "imagenet_v2"])):
        for t in targets:
            res = json.load(open(os.path.join(out, protocol, "maple", t, "shots2_seed1", "results.json")))
            assert set(res["accuracy"]) == {"all"} and res["source"]["dataset"] == "imagenet"
            assert res["config"]["args"]["load"] == os.path.join(src, "checkpoint.pt")
    zs = protocols.run_protocol("domain_generalization", ["--method", "zeroshot", "--root", root], ["imagenet"], [1], out,
                            tiny, targets=["imagenet_r"])  # nothing trains: the targets are evaluated directly
    assert zs[0]["dataset"] == "imagenet_r" and zs[0]["protocol"] == "domain_generalization"
    text = protocols.summarize(out)
    assert "### base2new: maple (2 shots) (seeds 1, 2)" in text and "### cross_dataset: maple (2 shots) (seeds 1)" in text
    assert "### domain_generalization: maple (2 shots) (seeds 1)" in text
    assert "published" in text and "64.07" not in text  # MaPLe's 16-shot anchors are not shown beside 2-shot runs
    # a table must hold every expected seed: asking for seeds 1-3 turns the 2-seed rows into "missing seed 3"
    assert "missing seed 3" in protocols.summarize(out, write=False, seeds=[1, 2, 3])
    assert {"summary.md", "summary.csv"} <= set(os.listdir(out))


# ----------------------------------------------------------------------------------------------------------------------
# mpl.py: MPL and the MaPLe preset, against a plain re-implementation of the official forward (test_mpl)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import clip

CLASSES = ["dog", "cat", "sea lion"]
TINY = {  # the tiny CLIP has 4 layers: the cross-dataset depth 3 leaves one unprompted layer at the end
    "mpl": replace(mpl.PRESETS["mpl"], **mpl.CROSS_DATASET),
    "maple": replace(mpl.PRESETS["maple"], **mpl.CROSS_DATASET),
}


@pytest.fixture(scope="module")
def mpl_tiny():
    return clip_layers.random_clip("tiny")


@pytest.fixture(scope="module")
def vitb16():
    return clip_layers.random_clip("ViT-B/16")


def make_model(clip_model, cfg, seed=0, classnames=CLASSES):
    """An MPL model whose prompt values are random and all different (the projections start as identical copies, and
    a zero-ish prompt would hide mistakes of order or placement)."""
    torch.manual_seed(seed)
    model = mpl.MPL(clip_model, classnames, cfg)
    with torch.no_grad():
        for p in model.prompt_learner.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def images_for(clip_model, n=3, seed=1):
    size = clip_model.visual.input_resolution
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------------------
# The official forward, written out

def official_logits(clip_model, params, classnames, images, cfg, maple_block=False):
    """CustomCLIP.forward of the official MPL code in fp32 (eval mode: logits). `params` maps the official prompt
    learner names to tensors. maple_block=True runs MaPLe's vision block instead (replace the last n_ctx tokens by the
    single projection `txt2img_proj.0.l` of the text prompt) to show that the maple preset is MaPLe."""
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
    words = (" ".join(["X"] * n_ctx) + " " if cfg.x_placeholders else "") + cfg.ctx_init  # MaPLe's text: no X
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
def test_logits_equal_official_forward(mpl_tiny, preset):
    cfg = TINY[preset]
    model = make_model(mpl_tiny, cfg)
    images = images_for(mpl_tiny)
    with torch.no_grad():
        ours = model(images)
        ref = official_logits(mpl_tiny, prompt_params(model), CLASSES, images, cfg)
    assert ours.shape == (3, len(CLASSES))
    assert (ours - ref).abs().max().item() <= 1e-5
    assert ref.std() > 0.1  # the logits are not trivially equal


def test_maple_preset_equals_maple_block(mpl_tiny):
    """mpl.md: with n_add = 1 and n_rm = n_ctx, MPL is MaPLe's deep prompting (its block replaces the last n_ctx)."""
    cfg = replace(mpl.PRESETS["maple"], depth=4)
    model = make_model(mpl_tiny, cfg)
    images = images_for(mpl_tiny)
    with torch.no_grad():
        ref = official_logits(mpl_tiny, prompt_params(model), CLASSES, images, cfg, maple_block=True)
        assert (model(images) - ref).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------------------------------------------------
# Token counts per layer (mpl.md table), recorded at the input of every block

def record_blocks(monkeypatch, model, images, identity=False):
    """Inputs and outputs of every block call, per tower, through a wrapper of clip_layers.residual_block."""
    seen = {"text": [], "vision": []}
    stock = clip_layers.residual_block

    def recording(block, x, causal, fast=True):
        y = x if identity else stock(block, x, causal, fast)
        seen["text" if causal else "vision"].append((x.detach().clone(), y.detach().clone()))
        return y

    monkeypatch.setattr(clip_layers, "residual_block", recording)
    with torch.no_grad():
        model(images)
    monkeypatch.undo()
    return seen


def vision_lengths(n_tokens, cfg, n_layers):
    """mpl.md: 1 + patches + n_ctx at layer 0, then n_add * n_ctx - n_rm more per prompted layer 1..depth-1."""
    return [n_tokens + cfg.n_ctx + min(l, cfg.depth - 1) * (cfg.n_add * cfg.n_ctx - cfg.n_rm) for l in range(n_layers)]


@pytest.mark.parametrize("preset, expected", [("mpl", [18, 19, 20, 20]), ("maple", [19, 19, 19, 19])])
def test_sequence_lengths_tiny(mpl_tiny, monkeypatch, preset, expected):
    cfg = TINY[preset]
    model = make_model(mpl_tiny, cfg)
    seen = record_blocks(monkeypatch, model, images_for(mpl_tiny))
    lengths = [x.shape[1] for x, _ in seen["vision"]]
    assert lengths == expected == vision_lengths(17, cfg, 4)
    cut = int(model.prompt_learner.eot.max()) + 1  # the text keeps its (cut) length at every layer
    assert [x.shape[1] for x, _ in seen["text"]] == [cut] * 4


def test_sequence_lengths_vitb16(vitb16, monkeypatch):
    """The official configs on ViT-B/16 (blocks replaced by the identity: only the hooks decide the lengths)."""
    images = images_for(vitb16, n=1)
    expected = {"mpl": list(range(198, 207)) + [206] * 3, "maple": [199] * 12}
    for preset, cfg in mpl.PRESETS.items():
        model = mpl.MPL(vitb16, CLASSES, cfg)
        seen = record_blocks(monkeypatch, model, images, identity=True)
        assert [x.shape[1] for x, _ in seen["vision"]] == expected[preset] == vision_lengths(197, cfg, 12)


def test_add_remove_carry(mpl_tiny, monkeypatch):
    """Default preset: at the input of layer l the tokens are the previous block's outputs minus the last n_rm (carried
    exactly), then the n_add projections of the layer's text prompt (added); text rows 1..n_ctx are replaced."""
    cfg = TINY["mpl"]
    model = make_model(mpl_tiny, cfg)
    seen = record_blocks(monkeypatch, model, images_for(mpl_tiny))
    p = prompt_params(model)
    for l in range(1, 4):
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


def test_maple_preset_carries_nothing(mpl_tiny, monkeypatch):
    """maple preset: the sequence stays 17 + n_ctx and the prompt positions at every deep layer's input hold exactly the
    projected compound prompts of that layer: nothing of the previous layer's prompts survives."""
    cfg = replace(mpl.PRESETS["maple"], depth=4)
    model = make_model(mpl_tiny, cfg)
    seen = record_blocks(monkeypatch, model, images_for(mpl_tiny))
    p = prompt_params(model)
    assert [x.shape[1] for x, _ in seen["vision"]] == [17 + cfg.n_ctx] * 4
    for l in range(1, 4):
        x_in, y_prev = seen["vision"][l][0], seen["vision"][l - 1][1]
        proj = F.linear(p[f"compound_prompts_text.{l - 1}"], p[f"txt2img_proj.0.{l - 1}.weight"],
                        p[f"txt2img_proj.0.{l - 1}.bias"])                                  # (n_ctx, D)
        assert torch.equal(x_in[:, 17:], proj.expand(x_in.shape[0], -1, -1))
        assert torch.equal(x_in[:, :17], y_prev[:, :17])


# ----------------------------------------------------------------------------------------------------------------------
# Official checkpoints

def official_names(cfg):
    """The official ModularPromptLearner's parameter names for a config."""
    names = {"ctx", "proj.weight", "proj.bias"} | {f"compound_prompts_text.{l}" for l in range(cfg.depth - 1)}
    return names | {f"txt2img_proj.{a}.{l}.{w}" for a in range(cfg.n_add) for l in range(cfg.depth - 1)
                    for w in ("weight", "bias")}


def official_checkpoint(model, clip_model, epoch=5, n_train_classes=7):
    """A Dassl model.pth.tar-N as the official code writes it. dtypes as in the official fp16 run: ctx (made from the
    fp16 token embedding), proj (`.half()`), the token buffers and the frozen CLIP are fp16; compound prompts and
    projections are fp32 parameters. The token buffers come from other (training-time) class names."""
    pl = model.prompt_learner
    text_width = pl.ctx.shape[1]
    sd = OrderedDict()
    sd["prompt_learner.ctx"] = pl.ctx.detach().half()
    sd["prompt_learner.token_prefix"] = torch.randn(n_train_classes, 1, text_width).half()
    sd["prompt_learner.token_suffix"] = torch.randn(n_train_classes, 76 - pl.n_ctx, text_width).half()
    for k, v in pl.state_dict().items():
        if k != "ctx":
            sd["prompt_learner." + k] = v.half() if k.startswith("proj.") else v.clone()
    for k, v in clip_model.visual.state_dict().items():
        sd["image_encoder." + k] = v.half()
    for k, v in clip_model.state_dict().items():
        if k.startswith(("transformer.", "positional_embedding", "ln_final.", "text_projection")):
            sd["text_encoder." + k] = v.half()
    sd["logit_scale"] = clip_model.logit_scale.detach().half()
    return {"state_dict": sd, "epoch": epoch, "optimizer": None, "scheduler": None, "val_result": None}


def round_to_fp16(model):
    with torch.no_grad():
        for p in model.prompt_learner.parameters():
            p.copy_(p.half().float())


@pytest.mark.parametrize("preset", ["mpl", "maple"])
def test_official_checkpoint_loads(mpl_tiny, tmp_path, preset):
    cfg = TINY[preset]
    source = make_model(mpl_tiny, cfg, seed=0)
    round_to_fp16(source)  # so that the fp16 file holds the exact values
    path = tmp_path / "model.pth.tar-5"
    torch.save(official_checkpoint(source, mpl_tiny), path)

    target = make_model(mpl_tiny, cfg, seed=1)
    assert set(target.prompt_learner.state_dict()) == official_names(cfg)
    images = images_for(mpl_tiny)
    with torch.no_grad():
        assert not torch.equal(target(images), source(images))
        assert mpl.load_official(target, path) == 5
        assert torch.equal(target(images), source(images))
    assert all(p.dtype == torch.float32 for p in target.prompt_learner.parameters())


def test_official_checkpoint_errors(mpl_tiny, tmp_path):
    cfg = TINY["mpl"]
    model = make_model(mpl_tiny, cfg)
    good = official_checkpoint(model, mpl_tiny)

    def save(ckpt, name):
        path = tmp_path / name
        torch.save(ckpt, path)
        return path

    renamed = copy.deepcopy(good)
    renamed["state_dict"]["prompt_learner.ctx_vectors"] = renamed["state_dict"].pop("prompt_learner.ctx")
    path = save(renamed, "renamed.pth.tar-5")
    with pytest.raises(ValueError, match=r"renamed\.pth\.tar-5.*missing prompt keys \['prompt_learner\.ctx'\], "
                                         r"unexpected keys \['prompt_learner\.ctx_vectors'\]"):
        mpl.load_official(model, path)

    reshaped = copy.deepcopy(good)
    reshaped["state_dict"]["prompt_learner.compound_prompts_text.1"] = torch.zeros(2, 64)
    with pytest.raises(ValueError, match=r"shape mismatches \['prompt_learner\.compound_prompts_text\.1: \(2, 64\) "
                                         r"in the file, \(1, 64\) in the model'\]"):
        mpl.load_official(model, save(reshaped, "reshaped.pth.tar-5"))

    deeper = official_checkpoint(make_model(mpl_tiny, replace(cfg, depth=4)), mpl_tiny)  # a checkpoint of another config
    with pytest.raises(ValueError, match=r"unexpected keys \['prompt_learner\.compound_prompts_text\.2'"):
        mpl.load_official(model, deeper)

    stranger = copy.deepcopy(good)
    stranger["state_dict"]["visual.proj"] = torch.zeros(64, 64)  # neither prompt nor the official frozen CLIP
    with pytest.raises(ValueError, match=r"unexpected keys \['visual\.proj'\]"):
        mpl.load_official(model, stranger)

    with pytest.raises(ValueError, match="no 'state_dict'"):
        mpl.load_official(model, {"epoch": 5})


def test_pickled_scheduler_is_not_loaded_silently(mpl_tiny, tmp_path):
    """Real Dassl files pickle the LR scheduler (its `successor`); weights_only=True refuses them, and so must we,
    with a message that says how to proceed. The dict loaded by the user then goes through."""
    cfg = TINY["mpl"]
    source = make_model(mpl_tiny, cfg)
    round_to_fp16(source)
    ckpt = official_checkpoint(source, mpl_tiny)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    ckpt["scheduler"] = {"successor": torch.optim.lr_scheduler.CosineAnnealingLR(opt, 5), "last_epoch": 5}
    path = tmp_path / "model.pth.tar-5"
    torch.save(ckpt, path)
    target = make_model(mpl_tiny, cfg, seed=1)
    with pytest.raises(ValueError, match=r"model\.pth\.tar-5: torch\.load\(weights_only=True\) refused.*"
                                         r"weights_only=False"):
        mpl.load_official(target, path)
    assert mpl.load_official(target, torch.load(path, map_location="cpu", weights_only=False)) == 5
    images = images_for(mpl_tiny)
    with torch.no_grad():
        assert torch.equal(target(images), source(images))


# ----------------------------------------------------------------------------------------------------------------------
# Parameters

def closed_form_count(text_width, vision_width, n_ctx, n_add, depth):
    """mpl.md: ctx + (depth-1) compound text prompts, each n_ctx x text_width; proj + n_add x (depth-1) projections,
    each a Linear(text_width -> vision_width) with bias."""
    linear = text_width * vision_width + vision_width
    return depth * n_ctx * text_width + (1 + n_add * (depth - 1)) * linear


def mpl_trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("cfg", [TINY["mpl"], TINY["maple"], mpl.MPLConfig(n_ctx=3, n_add=3, n_rm=4, depth=4),
                                 mpl.MPLConfig(depth=1)])
def test_trainable_count_tiny(mpl_tiny, cfg):
    text_width, vision_width = clip_layers.widths(mpl_tiny)
    assert mpl_trainable(mpl.MPL(mpl_tiny, CLASSES, cfg)) == closed_form_count(text_width, vision_width, cfg.n_ctx, cfg.n_add,
                                                                        cfg.depth)


def test_trainable_count_vitb16(vitb16):
    mpl_count = mpl_trainable(mpl.MPL(vitb16, CLASSES, mpl.PRESETS["mpl"]))
    maple_count = mpl_trainable(mpl.MPL(vitb16, CLASSES, mpl.PRESETS["maple"]))
    assert mpl_count == closed_form_count(512, 768, n_ctx=1, n_add=2, depth=9)
    assert maple_count == closed_form_count(512, 768, n_ctx=2, n_add=1, depth=9)
    assert maple_count == 3_555_072  # MaPLe vit_b16_c2_ep5_batch4_2ctx, counted from the MaPLe code


def test_initial_values_follow_the_official_code(mpl_tiny):
    """ctx = the embedding of "X"; then, from the same RNG state, the official order of draws: proj, the compound
    prompts (N(0, 0.02^2)), one Linear that every txt2img_proj starts as a copy of."""
    cfg = TINY["mpl"]
    torch.manual_seed(3)
    pl = mpl.MPL(mpl_tiny, CLASSES, cfg).prompt_learner
    torch.manual_seed(3)
    proj = torch.nn.Linear(64, 64)
    deep = [torch.empty(cfg.n_ctx, 64) for _ in range(cfg.depth - 1)]
    for d in deep:
        torch.nn.init.normal_(d, std=0.02)
    single = torch.nn.Linear(64, 64)
    x_embedding = mpl_tiny.token_embedding(clip.tokenize("X"))[0, 1]
    assert torch.equal(pl.ctx, x_embedding.expand(cfg.n_ctx, -1))
    assert torch.equal(pl.proj.weight, proj.weight) and torch.equal(pl.proj.bias, proj.bias)
    assert all(torch.equal(a, b) for a, b in zip(pl.compound_prompts_text, deep))
    assert all(torch.equal(lin.weight, single.weight) and torch.equal(lin.bias, single.bias)
               for per_add in pl.txt2img_proj for lin in per_add)


def test_maple_text_is_maples(mpl_tiny):
    """maple preset: "a photo of a {c}." with ctx = the embeddings of "a photo" (MaPLe's CTX_INIT handling)."""
    pl = mpl.MPL(mpl_tiny, CLASSES, TINY["maple"]).prompt_learner
    ids = clip.tokenize(["a photo of a dog."])
    assert TINY["maple"].x_placeholders is False
    assert torch.equal(pl.ctx, mpl_tiny.token_embedding(ids)[0, 1:3])
    assert torch.equal(pl.token_suffix[0], mpl_tiny.token_embedding(ids)[0, 3:])


def test_config_errors(mpl_tiny):
    with pytest.raises(ValueError, match="removes at most what it adds"):
        mpl.MPL(mpl_tiny, CLASSES, mpl.MPLConfig(n_ctx=1, n_add=2, n_rm=3, depth=3))
    with pytest.raises(ValueError, match=r"depth must be in 1\.\.4"):
        mpl.MPL(mpl_tiny, CLASSES, mpl.MPLConfig())  # the official depth 9 does not fit the 4-layer tiny CLIP


def test_trainable_set_is_the_prompt_learner(mpl_tiny):
    model = mpl.MPL(mpl_tiny, CLASSES, TINY["mpl"])
    trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable_names == {"prompt_learner." + n for n in official_names(TINY["mpl"])}
    assert all(not p.requires_grad for p in model.clip.parameters())
    # only parameters are saved: the token buffers are rebuilt from the class names in hand
    assert set(model.prompt_learner.state_dict()) == official_names(TINY["mpl"])
    # names and shapes do not depend on the class set (base -> new)
    other = mpl.MPL(mpl_tiny, ["a", "b", "c", "d", "e"], TINY["mpl"])
    assert {n: p.shape for n, p in other.prompt_learner.named_parameters()} == \
           {n: p.shape for n, p in model.prompt_learner.named_parameters()}


# ----------------------------------------------------------------------------------------------------------------------
# Behaviour

def test_encode_classes_reuse_and_fp16(mpl_tiny):
    model = make_model(mpl_tiny, TINY["mpl"])
    images = images_for(mpl_tiny)
    with torch.no_grad():
        logits = model(images)
        assert torch.equal(model(images, classes=model.encode_classes()), logits)
        # Pure fp16 as in the official code: OpenAI's fp16 layout (convert_weights keeps the LayerNorms in fp32; a
        # plain model.half() breaks CLIP's fp32-upcasting LayerNorm on the CPU) and fp16 prompts.
        half = copy.deepcopy(model)
        clip.model.convert_weights(half.clip)
        half.prompt_learner.half()
        logits_half = half(images.half())
    assert logits_half.dtype == torch.float32  # the features are fp16; the cosine logits are always computed in fp32
    assert (logits_half - logits).abs().max().item() < 0.1 and not torch.equal(logits_half, logits)


def test_short_training_lowers_the_loss(mpl_tiny):
    """Plain SGD (momentum 0.9) on the prompt learner alone fits a small batch: three classes, each a fixed random image
    pattern under noise. The loss is computed here, as train.py does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 50 steps of tiny ops: a second thread only adds synchronisation (slow on a busy CPU)
    try:
        _train_and_check(mpl_tiny)
    finally:
        torch.set_num_threads(threads)


def _train_and_check(mpl_tiny):
    torch.manual_seed(0)
    model = mpl.MPL(mpl_tiny, ["red", "green", "blue"], TINY["mpl"])
    patterns = 2 * torch.randn(3, 3, 32, 32)
    y = torch.arange(12) % 3
    x = patterns[y] + 0.5 * torch.randn(12, 3, 32, 32)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.02, momentum=0.9)
    losses = []
    for _ in range(50):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = F.cross_entropy(model(x), y).item()
    assert final < 0.75 * losses[0], (losses[0], final)
    assert all(p.grad is None for p in model.clip.parameters())


# ----------------------------------------------------------------------------------------------------------------------
# isp.py: ISP and the IVLP preset

# Names of different token lengths, so the EOT cut leaves padding after the shorter ones (the mask matters).
NAMES = ["cat", "golden retriever", "sea lion", "red eyed tree frog", "ox"]
DEPTH = 3  # the tiny CLIP has 4 layers: layer 3 runs without prompts, as layers 9..11 of ViT-B/16 do


@pytest.fixture(scope="module")
def isp_tiny():
    return clip_layers.random_clip("tiny", seed=0)


def make(isp_tiny, names=NAMES, **kw):
    return ISP(isp_tiny, names, ISPConfig(**{"depth": DEPTH, "sample_probing": False, **kw}))


def images(n, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def perturb(model, scale=0.5, seed=2):
    """Make every zero-initialised output and every prompt non-trivial, so that equalities mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and (name.endswith("o.weight") or "prompts" in name or "coupling" in name):
                p.add_(scale * torch.randn(p.shape, generator=g))


def isp_trainable(model):
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


def test_ivlp_equals_plain_reimplementation(isp_tiny):
    model = ISP(isp_tiny, NAMES, ISPConfig(**{**PRESETS["ivlp"].__dict__, "depth": DEPTH}))
    ids = clip_layers.tokenize([f"a photo of a {c}." for c in NAMES])
    assert torch.equal(model.text_prompts[0], isp_tiny.token_embedding(ids[0, 1:5]))   # init from "a photo of a"
    perturb(model)
    x = images(3)
    with torch.no_grad():
        ours, ref = model(x), plain_ivlp_logits(isp_tiny, NAMES, model.text_prompts, model.vision_prompts, x, DEPTH)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cross", ["none", "image_tokens", "class_summaries", "linear"])
def test_zero_init_isp_equals_ivlp(isp_tiny, cross):
    ivlp = make(isp_tiny, isp_self=False, isp_cross="none")
    perturb(ivlp)
    model = make(isp_tiny, isp_cross=cross)
    model.load_state_dict({k: v for k, v in isp_trainable(ivlp).items()}, strict=False)   # same prompt values
    x = images(3)
    with torch.no_grad():
        a, b = model(x), ivlp(x)
    if cross == "image_tokens":  # per-image text: the same rows in an N * C batch (other matmul shapes), so to rounding only
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

    def spy_image(clip_model, imgs, hook=None, **kw):
        def h(l, t):
            t = hook(l, t)
            if l == 1:
                seen["vision"] = t[:, -n:].detach().clone()
            return t
        return enc_v(clip_model, imgs, h, **kw)

    monkeypatch.setattr(clip_layers, "encode_text", spy_text)
    monkeypatch.setattr(clip_layers, "encode_image", spy_image)
    with torch.no_grad():
        model(x)
    monkeypatch.undo()
    return seen


def test_one_step_changes_prompts(isp_tiny, monkeypatch):
    torch.manual_seed(0)
    model = make(isp_tiny)  # self on, cross class_summaries
    x, y = images(4), torch.tensor([0, 1, 2, 3])
    before = capture_prompts(model, x, monkeypatch)
    assert torch.equal(before["text"], model.text_prompts[1].detach().expand(len(NAMES), -1, -1))  # = IVLP
    opt = torch.optim.SGD(isp_trainable(model).values(), lr=1.0)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    after = capture_prompts(model, x, monkeypatch)
    raw_t, raw_v = model.text_prompts[1].detach(), model.vision_prompts[1].detach()
    assert (after["text"] - raw_t).abs().max() > 1e-4      # the modules moved the text prompts ...
    assert (after["vision"] - raw_v).abs().max() > 1e-4    # ... and the vision prompts
    assert (after["text"][0] - after["text"][1]).abs().max() > 1e-4     # class-specific text prompts
    assert (after["vision"][0] - after["vision"][1]).abs().max() > 1e-4  # image-specific vision prompts


def test_text_padding_is_masked(isp_tiny):
    """A class's self-structural text prompts must not see the padding after its own EOT: encoding it alone (no
    padding) or beside a longer name (padding up to the longer EOT) gives the same features."""
    model = make(isp_tiny, isp_cross="none")
    perturb(model)
    with torch.no_grad():
        model.text_chunk = 1
        alone = model.encode_classes()[0]                             # each class cut at its own EOT
        model.text_chunk = None
        together = model.encode_classes()[0]                          # all cut at the longest EOT
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cross", ["image_tokens", "class_summaries"])
def test_chunked_encode_classes(isp_tiny, cross):
    """Chunks (sorted by length, checkpointed with gradients on) give the same features, summaries and gradients; the
    chunk is the model's text_chunk (train.py's --text-chunk)."""
    model = make(isp_tiny, isp_cross=cross)
    perturb(model)

    def encode(text_chunk):
        model.text_chunk = text_chunk
        return model.encode_classes()

    with torch.no_grad():
        (f1, s1), (f2, s2) = encode(None), encode(2)
    torch.testing.assert_close(f1, f2, atol=1e-5, rtol=1e-5)
    assert s1.shape == (len(NAMES), len(isp_tiny.transformer.resblocks), isp_tiny.ln_final.weight.shape[0])
    torch.testing.assert_close(s1, s2, atol=1e-5, rtol=1e-5)
    x, y = images(2), torch.tensor([1, 3])

    def grads(text_chunk):
        model.text_chunk = text_chunk
        model.zero_grad()
        logits = model(x)
        F.cross_entropy(logits, y).backward()
        return logits.detach(), {k: p.grad.clone() for k, p in isp_trainable(model).items()}

    (l1, g1), (l2, g2) = grads(None), grads(2)
    torch.testing.assert_close(l1, l2, atol=1e-4, rtol=1e-5)
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], atol=1e-5, rtol=1e-4, msg=k)


# ----------------------------------------------------------------------------------------------------------------------
# class_summaries keeps the text branch image-independent; image_tokens does not

def text_features_seen(model, x, monkeypatch):
    out = []
    enc = clip_layers.encode_text

    def spy(*args, **kw):
        result = enc(*args, **kw)
        out.append(result[0] if isinstance(result, tuple) else result)  # (features, EOT summaries) in the class pass
        return result

    monkeypatch.setattr(clip_layers, "encode_text", spy)
    with torch.no_grad():
        model(x)
    monkeypatch.undo()
    return out


def test_class_summaries_text_independent_of_images(isp_tiny, monkeypatch):
    model = make(isp_tiny, isp_cross="class_summaries")
    perturb(model)
    a, b = text_features_seen(model, images(2, seed=3), monkeypatch), text_features_seen(model, images(2, seed=4),
                                                                                          monkeypatch)
    assert len(a) == len(b) == 1 and a[0].shape[0] == len(NAMES)   # one pass over the classes, not per image
    assert torch.equal(a[0], b[0])
    with torch.no_grad():  # ... while the text prompts do read the vision prompts
        model.vision_prompts.add_(torch.randn(model.vision_prompts.shape, generator=torch.Generator().manual_seed(6)))
    c = text_features_seen(model, images(2, seed=3), monkeypatch)
    assert (c[0] - a[0]).abs().max() > 1e-4


def test_image_tokens_text_depends_on_images(isp_tiny, monkeypatch):
    model = make(isp_tiny, isp_cross="image_tokens")
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
def test_sample_weights_use_frozen_clip(isp_tiny, mode):
    model = make(isp_tiny, sample_probing=True, sp_mode=mode, sp_lambda=0.7)
    perturb(model)  # the prompts must not leak into p_clip
    x, y = images(6), torch.tensor([0, 1, 2, 3, 4, 0])
    logits = model(x)
    with torch.no_grad():  # p_clip from CLIP's own encoders, "a photo of a {}." on all 77 tokens
        t = isp_tiny.encode_text(clip_layers.tokenize([f"a photo of a {c}." for c in NAMES]))
        f = isp_tiny.encode_image(x)
        t, f = t / t.norm(dim=-1, keepdim=True), f / f.norm(dim=-1, keepdim=True)
        p_clip = (isp_tiny.logit_scale.exp() * f @ t.t()).softmax(-1)[torch.arange(6), y]
        p_model = logits.softmax(-1)[torch.arange(6), y]
    expected = sample_probing_weights(p_clip, mode, lam=0.7, p_model=p_model)
    w = model.sample_weights(x, y, logits)
    assert not w.requires_grad and w.shape == (6,)
    torch.testing.assert_close(w, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(make(isp_tiny).sample_weights(x, y), torch.ones(6))   # probing off
    if mode == "dynamic":
        with pytest.raises(ValueError):
            model.sample_weights(x, y)


def test_training_with_probing_lowers_weighted_loss(isp_tiny):
    torch.manual_seed(0)
    names = ["red", "green", "blue", "gray"]
    model = ISP(isp_tiny, names, ISPConfig(depth=DEPTH))                  # probing on, linear
    g = torch.Generator().manual_seed(5)
    y = torch.arange(16) % 4
    x = 3 * torch.randn(4, 3, 32, 32, generator=g)[y] + torch.randn(16, 3, 32, 32, generator=g)  # class signal + noise
    w = model.sample_weights(x, y)
    assert torch.all((w >= 1) & (w <= 2)) and w.std() > 0
    # A random CLIP's image features differ little between images (cosine ~0.9), so the small steps take a while.
    opt = torch.optim.SGD(isp_trainable(model).values(), lr=0.005)

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
    if cross in ("image_tokens", "class_summaries"):
        d_c = max(1, round(Dt * r_cross))
        text_reads_vision = 2 * Dt + 2 * Dv + Dt * d_c + 2 * Dv * d_c + d_c * Dt
        vision_reads_text = 2 * Dv + 2 * Dt + Dv * d_c + 2 * Dt * d_c + d_c * Dv
        total += J * (text_reads_vision + vision_reads_text)
    elif cross == "linear":
        total += J * (Dt * Dv + Dv)                                   # Linear(Dt -> Dv) with bias
    return total


COMBOS = [(s, c) for s in (False, True) for c in isp.CROSS_MODES]


def test_parameter_counts_tiny(isp_tiny):
    for isp_self, cross in COMBOS:
        model = make(isp_tiny, isp_self=isp_self, isp_cross=cross)
        n = sum(p.numel() for p in isp_trainable(model).values())
        assert n == closed_form(64, 64, 4, DEPTH, isp_self, cross), (isp_self, cross)


def test_parameter_counts_vit_b16():
    assert closed_form(512, 768, 4, 9, False, "none") == 46_080       # IVLP 4+4, depth 9 (protocol.md 3.4)
    clip_b16 = clip_layers.random_clip("ViT-B/16")
    for isp_self, cross in COMBOS:
        cfg = ISPConfig(isp_self=isp_self, isp_cross=cross, sample_probing=False)
        n = sum(p.numel() for p in isp_trainable(ISP(clip_b16, ["cat"], cfg)).values())
        assert n == closed_form(512, 768, 4, 9, isp_self, cross), (isp_self, cross)
        print(f"ViT-B/16 self={isp_self} cross={cross}: {n:,}")


def test_trainable_set(isp_tiny):
    def expected(isp_self, cross, J=DEPTH):
        names = {"text_prompts", "vision_prompts"}
        ssp = ["ln.weight", "ln.bias", "q.weight", "k.weight", "u.weight", "o.weight"]
        csp = ["ln_a.weight", "ln_a.bias", "ln_b.weight", "ln_b.bias", "q.weight", "k.weight", "u.weight", "o.weight"]
        for l in range(J):
            if isp_self:
                names |= {f"self_{m}.{l}.{p}" for m in ("text", "vision") for p in ssp}
            if cross in ("image_tokens", "class_summaries"):
                names |= {f"cross_{m}.{l}.{p}" for m in ("text", "vision") for p in csp}
            if cross == "linear":
                names |= {f"coupling.{l}.weight", f"coupling.{l}.bias"}
        return names

    for isp_self, cross in COMBOS:
        model = make(isp_tiny, isp_self=isp_self, isp_cross=cross, sample_probing=True)
        assert set(isp_trainable(model)) == expected(isp_self, cross)
        assert not any(p.requires_grad for p in isp_tiny.parameters())
        assert not any(name.startswith("clip.") for name in isp_trainable(model))
    # Checkpoints: names and shapes do not depend on the class set; only CLIP's keys are missing on reload.
    base, new = make(isp_tiny), make(isp_tiny, names=["zebra", "aardvark"])
    sd = {k: v.detach().clone() for k, v in isp_trainable(base).items()}
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in isp_trainable(new).items()}
    missing, unexpected = new.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) == {f"clip.{k}" for k in isp_tiny.state_dict()}


def test_config_fields_have_help(isp_tiny):
    import argparse
    import dataclasses
    for config in (ISPConfig(), mpl.MPLConfig()):  # each field's flag takes its help from the comment on its line
        parser = argparse.ArgumentParser()
        train.config_flags(parser, config)
        helps = {a.dest[4:]: a.help for a in parser._actions if a.dest.startswith("cfg_")}
        assert set(helps) == {f.name for f in dataclasses.fields(config)}
        assert all(len(h.split(" (preset:")[0]) > 15 for h in helps.values()), helps
    with pytest.raises(ValueError, match="isp_cross must be one of none, image_tokens, class_summaries, linear"):
        ISPConfig(isp_cross="c2")
    assert dataclasses.fields(ISPConfig)[0].name == "n_ctx"
    names = {f.name for f in dataclasses.fields(ISPConfig)}
    assert {"n_ctx", "depth", "ctx_init", "isp_self", "isp_cross", "sample_probing", "sp_lambda", "sp_mode"} <= names
    with pytest.raises(ValueError):
        ISP(isp_tiny, NAMES, ISPConfig())     # depth 9 > the tiny CLIP's 4 layers
    assert math.isclose(ISPConfig().sp_lambda, 1.0)


# ----------------------------------------------------------------------------------------------------------------------
# The main job in the mini world, reduced: draw the world, load the shipped tiny CLIP, train on base, test base and new

def test_main_job_in_the_mini_world_end_to_end(tmp_path, capsys):
    res = train.main(["--method", "mpl", "--shots", "2", "--epochs", "2", "--root", str(tmp_path / "DATA"),
                      "--output", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert "no --dataset given: running in the built-in mini world" in out
    assert res["dataset"] == "mini_world" and set(res["accuracy"]) == {"base", "new", "hm"}
    assert res["config"]["method_config"]["depth"] == 3  # 9 of ViT-B/16's 12 layers -> 3 of the tiny CLIP's 4
    chance = 100 / 18
    assert res["accuracy"]["base"] > 3 * chance and res["accuracy"]["new"] > 3 * chance
    assert os.path.exists(tmp_path / "run" / "results.json")


def test_isp_ablation_grid_writes_one_table(tmp_path, colours, monkeypatch):
    """--ablation runs base2new for the 8 switch combinations and writes one table; (off, none, off) is IVLP."""
    seen = []

    def fake_protocol(protocol, argv, datasets, seeds, out, clip_model=None):
        args = train.get_args(argv)
        seen.append((args.cfg_isp_self, args.cfg_isp_cross, args.cfg_sample_probing))
        b = 50.0 + 10 * bool(args.cfg_isp_self) + 5 * (args.cfg_isp_cross == "class_summaries") + 2 * bool(args.cfg_sample_probing)
        return [dict(dataset="mini_world", accuracy=dict(base=b + s, new=40.0)) for s in seeds]

    monkeypatch.setattr(protocols, "run_protocol", fake_protocol)
    text = protocols.run_ablation(["--method", "isp"], None, [1, 3], str(tmp_path))
    assert len(set(seen)) == 8
    assert "| off | none | off | 52.00 | 40.00 |" in text    # mean of seeds 1 and 3: 51, 53
    assert "| on | class_summaries | on | 69.00 | 40.00 |" in text
    assert open(tmp_path / "ablation" / "ablation.md").read().strip() == text.strip()


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second():
    here = os.path.dirname(os.path.abspath(__file__))
    readme = open(os.path.join(here, "README.md")).read().split("```bash\n", 1)[1].split("```")[0].splitlines()
    assert readme == ["pip install -r requirements.txt && python train.py --method mpl --shots 16",
                      "pip install -r requirements.txt && python -m pytest -q"]
    ci = open(os.path.join(here, ".ci", "run")).read().splitlines()
    assert ci[-1] == readme[1]


def test_eval_only_needs_load_and_resume_needs_the_same_settings(tmp_path, tiny, colours):
    with pytest.raises(ValueError, match="--eval-only with --method maple needs --load"):
        run(tmp_path, tiny, colours, "--eval-only", name="e")
    run(tmp_path, tiny, colours, name="r")
    with pytest.raises(ValueError, match="other settings.*epochs: 3 then, 4 now"):
        run(tmp_path, tiny, colours, "--resume", "--epochs", "4", name="r")
    run(tmp_path, tiny, colours, "--overwrite", "--epochs", "1", name="r")  # --overwrite starts again from scratch
    assert torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["epoch"] == 1
