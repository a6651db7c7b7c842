"""
Tests of the patched CLIP encoders, the training loop and the methods, on the CPU with a tiny random CLIP.

    python -m pytest -q

Every test compares against something computed another way (stock CLIP, the full 77-token path, the papers'
schedule, an uninterrupted run) or against a count, so each one can fail.
"""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import clip_layers
import data
import train

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
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
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
    text = train.summarize(str(tmp_path))
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
    train.run_protocol("base2new", flags, ["eurosat", "oxford_pets"], [1, 2], out, tiny)
    for d in ("eurosat", "oxford_pets"):
        for s in (1, 2):
            res = json.load(open(os.path.join(out, "base2new", "maple", d, f"seed{s}", "results.json")))
            assert set(res["accuracy"]) == {"base", "new", "hm"} and res["protocol"] == "base2new"
    train.run_protocol("cross_dataset", flags, ["imagenet"], [1], out, tiny, targets=["eurosat", "oxford_pets"])
    train.run_protocol("domain_generalization", flags, ["imagenet"], [1], out, tiny,
                       targets=["imagenet_r", "imagenet_v2"])
    src = os.path.join(out, "source", "maple", "imagenet", "seed1")
    assert sorted(os.listdir(src)) == ["checkpoint.pt", "results.json"]  # trained once, for both protocols
    for protocol, targets in (("cross_dataset", ["eurosat", "oxford_pets"]),
                              ("domain_generalization", ["imagenet_r", "imagenet_v2"])):
        for t in targets:
            res = json.load(open(os.path.join(out, protocol, "maple", t, "seed1", "results.json")))
            assert set(res["accuracy"]) == {"all"} and res["source"]["dataset"] == "imagenet"
            assert res["config"]["args"]["load"] == os.path.join(src, "checkpoint.pt")
    text = train.summarize(out)
    assert "### base2new: maple (seeds 1, 2)" in text and "### cross_dataset: maple (seeds 1)" in text
    assert "### domain_generalization: maple (seeds 1)" in text
    assert {"summary.md", "summary.csv"} <= set(os.listdir(out))
