"""
Tests of train.py on the CPU with the tiny random CLIP (conftest.py): the learning-rate schedule, the training loop
and its loss weights, checkpoints and resuming, base-to-new, the official fp16 setting, NaN handling, evaluation only,
the main job in the mini world end to end, and the README's two commands.

    python -m pytest -q test_train.py

Every test compares against something computed another way (the papers' schedule, an uninterrupted run, a hand-made
evaluation) or against a count, so each one can fail.
"""
import json
import math
import os
import re
from contextlib import nullcontext

import numpy as np
import pytest
import torch

import clip_layers
from engine import checkpoints
import data
from engine import rundir
import train
from conftest import colour_benchmark, sgd_steps, trainable


# ----------------------------------------------------------------------------------------------------------------------
# Schedule

def test_lr_schedule_matches_dassl_maple():
    lrs = [train.get_lr(e, 0.0035, 5) for e in range(5)]
    assert lrs[0] == 1e-5
    assert np.allclose(lrs, [1e-5, 0.0035, 0.003166, 0.002291, 0.001209], atol=5e-7)


def test_promptsrc_last_epoch_lr():
    assert abs(train.get_lr(19, 0.0025, 20) - 6.1e-5) < 1e-6


# ----------------------------------------------------------------------------------------------------------------------
# A benchmark of four colours, and a short maple run on it

@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return colour_benchmark(str(tmp_path_factory.mktemp("colours")))


def run(tmp_path, tiny, colours, *flags, name="run"):
    argv = ["--method", "maple", "--subsample", "all", "--output", str(tmp_path / name), "--epochs", "3",
            "--depth", "2", *flags]
    return train.main(argv, clip_model=tiny, benchmarks={"all": colours})


# ----------------------------------------------------------------------------------------------------------------------
# The loop, checkpoints, resuming, evaluation only

def test_training_lowers_loss_and_beats_chance(tmp_path, tiny, colours, capsys):
    """maple on four colour classes: the per-sample loss falls, and accuracy on the training images beats chance."""
    args = train.get_args(["--method", "maple", "--depth", "2"])
    torch.manual_seed(0)
    model = train.build_model(args, tiny, colours.classnames, colours.template)
    loader = data.make_loader(colours.train, data.test_transform(32), 32, False, 0)
    images, labels, _ = next(iter(loader))
    losses = sgd_steps(model, lambda: train.loss_fn(model(images), labels), steps=30, lr=0.2)
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
    # an existing run is never overwritten silently: asked again, its results come back untouched
    assert run(tmp_path, tiny, colours) == saved
    with pytest.raises(FileExistsError, match="other settings.*--overwrite"):
        run(tmp_path, tiny, colours, "--lr", "0.01")
    # --eval-only --load gives back the same accuracy from the checkpoint alone
    res2 = run(tmp_path, tiny, colours, "--eval-only", "--load", str(tmp_path / "run" / "checkpoint.pt"), name="ev")
    assert res2["accuracy"] == res["accuracy"]


def test_resume_after_interruption_equals_uninterrupted(tmp_path, tiny, colours, monkeypatch):
    run(tmp_path, tiny, colours, name="full")
    full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["params"]

    calls = {"n": 0}
    real_save = rundir.atomic_save

    def save_then_die(obj, path, save):  # the process dies right after epoch 2's checkpoint
        real_save(obj, path, save)
        calls["n"] += path.endswith("checkpoint.pt")
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(rundir, "atomic_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, tiny, colours, name="cut")
    monkeypatch.setattr(rundir, "atomic_save", real_save)
    assert not (tmp_path / "cut" / ".lock").exists()  # the interrupted run let go of its directory
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["epoch"] == 2
    run(tmp_path, tiny, colours, "--resume", name="cut")
    resumed = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["params"]
    assert resumed.keys() == full.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


def test_eval_only_needs_load_and_resume_needs_the_same_settings(tmp_path, tiny, colours):
    with pytest.raises(ValueError, match="--eval-only with --method maple needs --load"):
        run(tmp_path, tiny, colours, "--eval-only", name="e")
    run(tmp_path, tiny, colours, name="r")
    with pytest.raises(ValueError, match="other settings.*epochs: 3 then, 4 now"):
        run(tmp_path, tiny, colours, "--resume", "--epochs", "4", name="r")
    run(tmp_path, tiny, colours, "--overwrite", "--epochs", "1", name="r")  # --overwrite starts again from scratch
    assert torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["epoch"] == 1


# ----------------------------------------------------------------------------------------------------------------------
# Base to new

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
    checkpoints.load_prompts(model, str(tmp_path / "b2n" / "checkpoint.pt"), "maple")
    assert train.evaluate(model, new.test, argparse_ns(args), nullcontext) == n


def argparse_ns(args):
    args.workers = 0
    return args


# ----------------------------------------------------------------------------------------------------------------------
# Precision, the trainable set, NaN

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
    trained = list(trainable(model).values())
    own = [p for p in model.parameters() if id(p) not in clip_ids]
    assert {id(p) for p in trained} == {id(p) for p in own}
    assert (len(trained) == 0) == (method == "zeroshot")


def test_nan_loss_stops_with_step_paths_and_lr_and_keeps_checkpoint(tmp_path, tiny, colours, monkeypatch):
    """The run stops inside an epoch, after train.py's model.train(): the shared CLIP must still be frozen and in eval
    mode (the methods keep it so; conftest checks it after every test)."""
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


# ----------------------------------------------------------------------------------------------------------------------
# The main job in the mini world, reduced: draw the world, load the shipped world CLIP, train on base, test base and
# new; the README's commands

def test_main_job_in_the_mini_world_end_to_end(tmp_path, capsys):
    res = train.main(["--method", "mpl", "--shots", "2", "--epochs", "2", "--root", str(tmp_path / "DATA"),
                      "--output", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert "no --dataset given: running in the built-in mini world" in out
    assert res["dataset"] == "mini_world" and set(res["accuracy"]) == {"base", "new", "hm"}
    assert res["config"]["method_config"]["depth"] == 9  # the published depth: the world's CLIP has 12 layers too
    assert "depth" not in out.split("no --dataset given")[1].split("epoch")[0]  # nothing about the depth is changed
    chance = 100 / 18
    assert res["accuracy"]["base"] > 3 * chance and res["accuracy"]["new"] > 3 * chance
    assert os.path.exists(tmp_path / "run" / "results.json")


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project folder
    readme = open(os.path.join(here, "README.md")).read().split("```bash\n", 1)[1].split("```")[0].splitlines()
    assert readme == ["pip install -r requirements.txt && python train.py --method mpl --shots 16",
                      "pip install -r requirements.txt && python -m pytest -q"]
    ci = open(os.path.join(here, ".ci", "run")).read().splitlines()
    assert ci[-1] == readme[1]


def test_load_reads_an_official_maple_dassl_file(tmp_path, tiny, colours):
    """--load of a MaPLe model.pth.tar-N as Dassl writes it (its names, a pickled LR scheduler, fp16 values) evaluates
    the same prompts as the run that produced them."""
    first = run(tmp_path, tiny, colours, name="trained")
    ours = torch.load(tmp_path / "trained" / "checkpoint.pt", weights_only=True)["params"]
    state_dict = {k.replace("prompt_learner.txt2img_proj.0.", "prompt_learner.compound_prompt_projections."): v
                  for k, v in ours.items()}
    assert any("compound_prompt_projections" in k for k in state_dict)
    optimizer = torch.optim.SGD([torch.nn.Parameter(v.clone()) for v in ours.values()], lr=0.0035, momentum=0.9)
    scheduler = {"successor": torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 3), "last_epoch": 3}
    path = tmp_path / "MultiModalPromptLearner" / "model.pth.tar-3"
    path.parent.mkdir()
    torch.save({"state_dict": state_dict, "epoch": 3, "optimizer": optimizer.state_dict(), "scheduler": scheduler,
                "val_result": None}, path)
    again = run(tmp_path, tiny, colours, "--eval-only", "--load", str(path), name="official")
    assert again["accuracy"] == first["accuracy"]


def test_loop_takes_the_methods_loss_weights_and_prints_the_epochs_mean_loss(tmp_path, tiny, colours,
                                                                             monkeypatch, capsys):
    """The loop asks the model for its loss weights at every step, on the crops it trains on (ISP's sample probing:
    p_clip of each step's crop), passes them to the loss unchanged, and prints the mean loss of each epoch."""
    import isp
    forwarded, asked, given, losses = [], [], [], []
    real_forward, real_weights, real_loss = isp.ISP.forward, isp.ISP.loss_weights, train.loss_fn

    def forward(self, images, *a, **kw):
        forwarded.append(images)
        return real_forward(self, images, *a, **kw)

    def loss_weights(self, images, labels, logits):
        asked.append(images)
        given.append(real_weights(self, images, labels, logits))
        return given[-1]

    def loss_fn(logits, labels, weights=None):
        assert weights is given[-1]
        losses.append(real_loss(logits, labels, weights))
        return losses[-1]

    monkeypatch.setattr(isp.ISP, "forward", forward)
    monkeypatch.setattr(isp.ISP, "loss_weights", loss_weights)
    monkeypatch.setattr(train, "loss_fn", loss_fn)
    train.main(["--method", "isp", "--subsample", "all", "--output", str(tmp_path / "isp"), "--epochs", "2",
                "--depth", "2", "--batch-size", "4"], clip_model=tiny, benchmarks={"all": colours})
    steps = len(colours.train) // 4
    assert [x.shape[0] for x in asked] == [4] * 2 * steps and all(w.shape == (4,) for w in given)
    training = [x for x in forwarded if x.shape[0] == 4][:2 * steps]  # the test batches are larger
    assert all(torch.equal(x, y) for x, y in zip(asked, training))
    assert not all(torch.equal(w, torch.ones(4)) for w in given)  # sample probing is on in ISP's preset
    out = capsys.readouterr().out
    for epoch in range(2):
        mean = sum(l.item() for l in losses[epoch * steps:(epoch + 1) * steps]) / steps
        printed = re.search(rf"epoch {epoch + 1}/2  lr {train.get_lr(epoch, 0.0025, 2):.6f}  loss (\S+)\n", out)
        assert abs(float(printed.group(1)) - mean) <= 6e-5  # printed to 4 decimals
