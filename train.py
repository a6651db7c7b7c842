"""
Train and evaluate prompt learning on a frozen CLIP: one run (one method, dataset and seed), in one plain loop.

    python train.py --method mpl --shots 16                                     # the built-in mini world, on the CPU
    python train.py --method mpl --dataset eurosat --root $DATA --clip ViT-B/16  # the paper's base-to-new, one seed
    python train.py --method isp --help                                         # every flag, the method's included

Methods (all presets of two files plus zero-shot):
    zeroshot  CLIP with CoOp's hand-written template of the dataset, no training
    mpl       Modular Prompt Learning (mpl.py), official vit_b4_c1_add2_rm1 recipe
    maple     MaPLe = mpl.py with one add and n_ctx removes per layer (every deep layer replaces its prompts)
    isp       Integrated Structural Prompts + sample probing (isp.py), PromptSRC's recipe
    ivlp      IVLP deep prompts = isp.py with its structural modules and sample probing off

The recipe is the papers' (Dassl's trainer as the official configs set it): SGD (momentum 0.9, weight decay 5e-4), a
per-epoch cosine schedule after one warm-up epoch at a constant 1e-5, drop_last, the last-epoch model, top-1 micro
accuracy. `--subsample base2new` (the default) trains on the base classes, then evaluates the same prompts on the base
test set and, rebuilt with the new class names, on the new test set, and reports HM = 2BN / (B + N).

What this file is not: no multi-GPU, no config files, no trainer registry; whole protocols (every dataset x seed) and
their tables are tools/protocols.py. A run writes into its own directory: checkpoint.pt (only the trainable prompt
parameters, kilobytes), train.log (what it printed) and results.json (the accuracies, per class too, and the history:
per epoch the mean loss, LR and seconds).
"""
import argparse
import dataclasses
import json
import math
import os
import random
import re
import subprocess
import sys
import time
import typing
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine import checkpoints
from engine import cli
from engine import clip_engine
import clip_layers
import data
import isp
from world import mini_world
import mpl
from engine import rundir

# ----------------------------------------------------------------------------------------------------------------------
# Methods and their training recipes. A prompt method is a model class and one of its file's presets, so the baselines
# are settings, not code.


@dataclasses.dataclass(frozen=True)
class Recipe:
    model: type = None        # mpl.MPL or isp.ISP; None: zero-shot CLIP, nothing trains
    config: object = None     # the method's preset (mpl.PRESETS[...], isp.PRESETS[...])
    lr: float = 0.0           # base learning rate of the cosine schedule
    epochs: int = 0
    batch_size: int = 4
    cross_dataset: dict = dataclasses.field(default_factory=dict)  # --cross-dataset: changes to lr, epochs, config


RECIPES = {
    "zeroshot": Recipe(),
    # MPL configs/trainers/MPL/vit_b4_c1_add2_rm1.yaml (+ _cross_datasets: depth 3, lr 0.0026, 2 epochs)
    "mpl": Recipe(mpl.MPL, mpl.PRESETS["mpl"], lr=0.0035, epochs=5, batch_size=4,
                  cross_dataset=dict(mpl.CROSS_DATASET, lr=0.0026, epochs=2)),
    # MaPLe vit_b16_c2_ep5_batch4_2ctx.yaml (+ _cross_datasets)
    "maple": Recipe(mpl.MPL, mpl.PRESETS["maple"], lr=0.0035, epochs=5, batch_size=4,
                    cross_dataset=dict(mpl.CROSS_DATASET, lr=0.0026, epochs=2)),
    # INFERRED (docs/isp_reconstruction.md §6): PromptSRC's vit_b16_c2_ep20_batch4_4+4ctx (_cross_datasets: depth 3)
    "isp": Recipe(isp.ISP, isp.PRESETS["isp"], lr=0.0025, epochs=20, batch_size=4, cross_dataset=dict(depth=3)),
    # PromptSRC's IVLP 4+4 baseline, the same recipe
    "ivlp": Recipe(isp.ISP, isp.PRESETS["ivlp"], lr=0.0025, epochs=20, batch_size=4, cross_dataset=dict(depth=3)),
}
WARMUP_LR = 1e-5  # Dassl's ConstantWarmupScheduler: 1 epoch at a constant 1e-5


def config_flags(parser, config):
    """One flag per field of a method's config dataclass, e.g. --n-ctx, --isp-self/--no-isp-self. Its help is the
    field's annotation in mpl.py / isp.py, `Annotated[type, "help [source]"]`, so the config stays the one place where
    a setting is explained."""
    hints = typing.get_type_hints(type(config), include_extras=True)
    group = parser.add_argument_group(f"{type(config).__name__} (defaults: the preset)")
    for f in dataclasses.fields(config):
        kind, text = typing.get_args(hints[f.name])                      # Annotated[int, "help"] -> int, "help"
        kw = dict(default=None, dest=f"cfg_{f.name}", help=f"{text} (preset: {getattr(config, f.name)!r})")
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw.update(type=kind, metavar=f.name.upper())
        group.add_argument("--" + f.name.replace("_", "-"), **kw)


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("--method", default="mpl", choices=list(RECIPES), help="which method")
    p.add_argument("--dataset", default=None, help="a CoOp dataset (eurosat, imagenet, ...; see data.py); "
                   "default: the built-in mini world (world/mini_world.py), which needs no download")
    p.add_argument("--root", default=os.environ.get("DATA", "data"), help="the datasets' folder: the CoOp tree "
                   "($DATA), where the mini world is also drawn (<root>/mini_world*); default: $DATA if set, else data")
    p.add_argument("--shots", type=int, default=16, help="training images per class (Dassl few-shot draw)")
    p.add_argument("--seed", type=int, default=1, help="the papers use seeds 1, 2, 3")
    p.add_argument("--subsample", default="base2new", choices=["base2new", "all", "base", "new"],
                   help="base2new: train on base classes, test on base and new (default); all/base/new: train and "
                        "test on those classes")
    p.add_argument("--epochs", type=int, default=None, help="default: the method's recipe")
    p.add_argument("--lr", type=float, default=None, help="base learning rate; default: the method's recipe")
    p.add_argument("--batch-size", type=int, default=None, help="default: the method's recipe (4)")
    p.add_argument("--test-batch-size", type=int, default=100, help="images per evaluation batch")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay")
    p.add_argument("--cross-dataset", action="store_true",
                   help="the cross-dataset / domain-generalisation recipe (depth 3; MPL/MaPLe: lr 0.0026, 2 epochs)")
    p.add_argument("--clip", default=None, help="CLIP model name (ViT-B/16) or path to a local .pt; default ViT-B/16 "
                   "with --dataset, else the mini world's CLIP")
    p.add_argument("--output", default=None, help="this one run's directory (default: output/<dataset>/<method>/"
                   "shots<K>_seed<S>); tools/protocols.py's --output is the root folder above its runs' directories")
    p.add_argument("--overwrite", action="store_true", help="allow writing into an existing run directory")
    p.add_argument("--resume", action="store_true", help="continue from <output>/checkpoint.pt")
    p.add_argument("--steal-lock", action="store_true", help="take over the run directory's lock although the "
                   "process it names may be alive: a process on another machine, or a pid reused after a reboot. "
                   "Safe only when you know that process no longer runs this run (a lock held by a running process "
                   "of this machine is never taken)")
    p.add_argument("--load", default=None, help="initialise the prompts from a checkpoint: ours, or an official "
                   "model.pth.tar-N of MPL (--method mpl), MaPLe (maple) or PromptSRC's IVLP (ivlp)")
    p.add_argument("--eval-only", action="store_true", help="no training; evaluate (the prompts of --load)")
    p.add_argument("--device", default=default_device(), help="default: cuda when a GPU is visible, else cpu")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "amp", "fp16"],
                   help="auto: fp32 on CPU, bf16 autocast on CUDA. fp32: TF32 off. bf16: bf16 autocast (CUDA or CPU). "
                        "amp: fp16 autocast + GradScaler (CUDA). fp16: the whole model in fp16 with plain SGD, as the "
                        "official code runs (for parity checks)")
    p.add_argument("--deterministic", action="store_true", help="deterministic CUDA kernels "
                   "(torch.use_deterministic_algorithms, cuDNN benchmark off): bitwise repeatable on one GPU, slower")
    p.add_argument("--workers", type=int, default=None, help="data loader workers (default 4 on CUDA, 0 on CPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default on the CPU: 1 for the "
                   "mini world's small CLIP, else the cores not busy with other processes)")
    p.add_argument("--crop-scale", type=float, default=None, help="smallest area of the training RandomResizedCrop "
                   "(default: Dassl's 0.08 on the benchmarks; in the mini world its dataset's own crop_scale, "
                   "world/mini_world.py: an 8%% crop reduces its 32-pixel images to 9 x 9 pixels)")
    p.add_argument("--text-chunk", type=int, default=128, help="encode at most this many classes at a time, "
                   "with activation checkpointing (exact; saves memory for large class sets); 0: all at once")
    p.add_argument("--debug", action="store_true", help="on an error, show Python's traceback, not only the one line "
                   "`error: ...` (cli.py; any command line of this project takes it)")
    # The method's own hyper-parameters become flags: a first look at --method, before --help prints everything.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default="mpl", choices=list(RECIPES))
    method = pre.parse_known_args(argv)[0].method
    if RECIPES[method].config is not None:
        config_flags(p, RECIPES[method].config)
    args = p.parse_args(argv)
    if args.crop_scale is None:
        args.crop_scale = mini_world.train_crop_scale(args.dataset) if mini_world.is_world(args.dataset) else 0.08
    # Values that would fail only after training started, or silently do something else: refused here.
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    checks = [("--shots", args.shots, args.shots >= 1, "an integer >= 1"),
              ("--seed", args.seed, 0 <= args.seed < 2 ** 32, f"an integer >= 0 and <= {2 ** 32 - 1} (numpy's seeds; "
                                                              f"Dassl does not seed for negative seeds)"),
              ("--epochs", args.epochs, args.epochs is None or args.epochs >= 0, "an integer >= 0"),
              ("--lr", args.lr, args.lr is None or (math.isfinite(args.lr) and 0 < args.lr <= 1),
               "a finite number > 0 and <= 1 (the recipes use 0.0025-0.0035; far larger rates drive the prompts to "
               "inf or NaN)"),
              ("--batch-size", args.batch_size, args.batch_size is None or args.batch_size >= 1, "an integer >= 1"),
              ("--test-batch-size", args.test_batch_size, args.test_batch_size >= 1, "an integer >= 1"),
              ("--momentum", args.momentum, 0 <= args.momentum < 1, "a number in [0, 1)"),
              ("--weight-decay", args.weight_decay, math.isfinite(args.weight_decay) and args.weight_decay >= 0,
               "a finite number >= 0"),
              ("--crop-scale", args.crop_scale, 0 < args.crop_scale <= 1, "a fraction of the image area in (0, 1]"),
              ("--text-chunk", args.text_chunk, args.text_chunk >= 0, "an integer >= 0 (0: all classes at once)"),
              ("--threads", args.threads, args.threads is None or args.threads >= 1, "an integer >= 1"),
              ("--workers", args.workers, args.workers is None or 0 <= args.workers <= cpus,
               f"an integer in [0, {cpus}] (the CPUs this process may use)"),
              ("--output", repr(args.output), args.output is None or args.output.strip() != "",
               "a directory path (leave the flag out for the default)")]
    for flag, value, ok, expected in checks:
        if not ok:
            p.error(f"{flag} must be {expected}, got {value}")
    if args.resume and args.overwrite:
        p.error("--resume continues the run in --output, --overwrite starts it again: give one of them")
    if args.resume and args.eval_only:
        p.error("--resume continues training, --eval-only trains nothing: give one of them")
    if args.precision == "amp" and not args.device.startswith("cuda"):
        p.error(f"--precision amp is CUDA autocast with a loss scaler; on --device {args.device} use fp32 or bf16 "
                f"(or fp16, the official pure-fp16 setting)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA GPU is visible to torch here (torch {torch.__version__}); "
                f"use --device cpu")
    try:
        method_config(args)  # the config checks its own values, so a bad flag stops here, before anything loads
    except ValueError as e:
        p.error(config_error_with_flags(str(e), RECIPES[args.method].config))
    return args


def config_error_with_flags(message, config):
    """A config's message with its field names written as their flags ("sp_lambda must be" -> "--sp-lambda must
    be"), leaving quoted values alone."""
    for f in dataclasses.fields(config):
        message = re.sub(rf"(?<![\w'-]){f.name}(?![\w'])", "--" + f.name.replace("_", "-"), message)
    return message


def method_config(args):
    """The method's config: its preset, then --cross-dataset, then explicit flags (highest priority)."""
    r = RECIPES[args.method]
    if r.config is None:
        return None
    names = {f.name for f in dataclasses.fields(r.config)}
    changes = {k: v for k, v in r.cross_dataset.items() if k in names} if args.cross_dataset else {}
    changes.update({k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None})
    if args.method == "maple" and "n_rm" not in changes:  # MaPLe removes exactly the n_ctx tokens it added
        return mpl.maple(**changes)
    return dataclasses.replace(r.config, **changes)


def recipe(args):
    """(lr, epochs, batch size): flags override --cross-dataset, which overrides the method's recipe."""
    r = RECIPES[args.method]
    xd = r.cross_dataset if args.cross_dataset else {}
    lr, epochs = xd.get("lr", r.lr), xd.get("epochs", r.epochs)
    return (args.lr if args.lr is not None else lr, args.epochs if args.epochs is not None else epochs,
            args.batch_size if args.batch_size is not None else r.batch_size)


def build_model(args, clip_model, classnames, template):
    clip_engine.settings.text_chunk = args.text_chunk or None  # classes per text pass (exact, memory only)
    if args.method == "zeroshot":
        return clip_layers.ZeroShotCLIP(clip_model, classnames, template)
    return RECIPES[args.method].model(clip_model, classnames, method_config(args))


# ----------------------------------------------------------------------------------------------------------------------
# Learning rate and precision

def get_lr(epoch, base_lr, epochs):
    """LR used during 0-based `epoch`, Dassl's scheduler as the official configs set it:
    1) epoch 0 is a warm-up at a constant 1e-5;
    2) then cosine annealing over T = epochs, restarted after the warm-up, so it is shifted by one epoch and never
       reaches 0 (MaPLe, lr 0.0035, 5 epochs: 1e-5, 0.0035, 0.003166, 0.002291, 0.001209)."""
    if epoch == 0:
        return WARMUP_LR
    return base_lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / epochs))


def resolve_precision(precision, device):
    if precision != "auto":
        return precision
    return ("bf16" if torch.cuda.is_bf16_supported() else "amp") if device.startswith("cuda") else "fp32"


def precision_setup(precision, device, model):
    """Precision is decided here and nowhere else. Returns (autocast, scaler, precision): a function that opens the
    autocast context (a no-op in fp32 and fp16), a GradScaler that scales the loss under amp only (a pass-through
    otherwise), and the precision with auto resolved. The prompts are fp32 master weights in every mode but fp16,
    which puts the whole model (frozen CLIP and prompts) in fp16 and trains with plain SGD and no loss scaling, as
    the official MaPLe/MPL code does. bf16 autocasts on the CPU too; amp is CUDA's. fp32 turns TF32 off (cuDNN's
    convolutions use it by default), so fp32 is fp32 on a GPU too."""
    cuda = device.startswith("cuda")
    precision = resolve_precision(precision, device)
    if precision == "amp" and not cuda:
        raise ValueError(f"--precision amp needs a CUDA device; on the CPU use fp32 or bf16 (--device is {device})")
    if precision == "fp16":
        clip_layers.to_official_fp16(model)
    if precision == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    dtype = {"bf16": torch.bfloat16, "amp": torch.float16}.get(precision)
    kind = "cuda" if cuda else "cpu"
    autocast = (lambda: torch.autocast(kind, dtype=dtype)) if dtype else nullcontext
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "amp")
    return autocast, scaler, precision


def loss_fn(logits, labels, weights=None):
    """Cross-entropy, optionally weighted per sample (ISP's sample probing): mean_i w_i * CE_i."""
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    return ce.mean() if weights is None else (weights.float() * ce).mean()


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except OSError:
        return None


# ----------------------------------------------------------------------------------------------------------------------
# Training and evaluation

def make_loader(items, transform, batch_size, train, workers, device="cpu"):
    return torch.utils.data.DataLoader(data.ImageDataset(items, transform), batch_size=batch_size, shuffle=train,
                                       drop_last=train and len(items) >= batch_size, num_workers=workers,
                                       pin_memory=device.startswith("cuda"), persistent_workers=workers > 0)


@torch.no_grad()
def evaluate(model, items, args, autocast, per_class=None):
    """Top-1 micro accuracy (%) over `items`. The class side is encoded once, not once per batch. A dict passed as
    `per_class` receives each label's accuracy (%) over its own test images."""
    model.eval()
    res = model.clip.visual.input_resolution
    loader = make_loader(items, data.test_transform(res), args.test_batch_size, False, args.workers, args.device)
    correct, hits = 0, {}
    with autocast():
        classes = model.encode_classes()
        for images, labels, _ in tqdm(loader, desc="test", leave=False, disable=None):
            logits = model(images.to(args.device), classes)
            right = logits.argmax(-1).cpu() == labels
            correct += right.sum().item()
            for label, ok in zip(labels.tolist(), right.tolist()):
                hits.setdefault(label, []).append(ok)
    if per_class is not None:
        per_class.update({label: 100.0 * sum(oks) / len(oks) for label, oks in sorted(hits.items())})
    return 100.0 * correct / len(items)


def train(model, items, args, run_dir, autocast, scaler, identity, ckpt=None):
    """The loop: per epoch set the LR, then zero_grad -> forward -> loss -> backward -> step for each batch. Returns
    (seconds per step or None if there was nothing left to train, history: per epoch trained here its number, mean
    loss, LR and seconds; under amp also the steps GradScaler skipped and its scale at the epoch's end). Host syncs per
    step in this loop: one (the finiteness of the loss and all prompts, in one reduction); amp adds GradScaler's own
    (its test for inf gradients)."""
    if getattr(args, "deterministic", False):
        set_deterministic()
    lr, epochs, batch_size = recipe(args)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
    path = os.path.join(run_dir, "checkpoint.pt")
    start = restore(ckpt, model, optimizer, scaler, path) if ckpt is not None else 0  # --resume: at its epoch
    loader = make_loader(items, data.train_transform(model.clip.visual.input_resolution, args.crop_scale),
                         batch_size, True, args.workers, args.device)
    step_times, history, amp = [], [], scaler.is_enabled()
    for epoch in range(start, epochs):
        t_epoch, skipped = time.time(), 0
        for group in optimizer.param_groups:
            group["lr"] = get_lr(epoch, lr, epochs)
        model.train()
        loss_sum = torch.zeros((), device=args.device)  # read once per epoch, not once per step
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs} lr {optimizer.param_groups[0]['lr']:.6f}", disable=None)
        for step, (images, labels, index) in enumerate(bar):
            t0 = time.time()
            images = images.to(args.device, non_blocking=True)  # clip_layers casts to CLIP's dtype
            labels = labels.to(args.device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                logits = model(images)
                weights = model.loss_weights(images, labels, logits)  # None, or (N,): ISP's sample probing
            loss = loss_fn(logits, labels, weights)
            scaler.scale(loss).backward()  # --precision amp scales the loss (fp16 gradients); else a pass-through
            scale = scaler._get_scale_async().clone() if amp else None  # the scale in use, kept on the device
            scaler.step(optimizer)  # amp: skipped when a gradient is inf or NaN, and the scale halves
            scaler.update()
            if amp:  # a skipped step halved the scale: counted on the device, read once per epoch
                skipped = skipped + (scaler._get_scale_async() < scale)
            if not all_finite([loss, *params]):  # a finite loss can still give an infinite step
                where = (epoch, step, len(loader), optimizer, path)
                check_finite("loss", [loss], where, [items[i].impath for i in index.tolist()])
                check_finite("prompts", params, where)
            loss_sum += loss.detach()
            step_times.append(time.time() - t0)
        save_checkpoint(path, model, args, identity, epoch + 1, optimizer, scaler)
        remove_replaced_results(run_dir, args)
        history.append(dict(epoch=epoch + 1, loss=loss_sum.item() / len(loader), lr=optimizer.param_groups[0]["lr"],
                            seconds=time.time() - t_epoch))
        if amp:
            history[-1].update(skipped_steps=int(skipped), scale=scaler.get_scale())
        print(f"epoch {epoch + 1}/{epochs}  lr {history[-1]['lr']:.6f}  loss {history[-1]['loss']:.4f}"
              + (f"  amp: {int(skipped)} steps skipped, scale {scaler.get_scale():g}" if amp else ""))
    # seconds per step, leaving out the first (warm-up of kernels and allocators)
    return (sum(step_times[1:]) / max(1, len(step_times) - 1) if step_times else None), history


def restore(ckpt, model, optimizer, scaler, path):
    """--resume: the prompts, the optimizer's momentum, the loss scaler and the RNG states (the batch order and the
    random crops of the epochs to come) of a checkpoint. The schedule is a function of the epoch, so the epoch is its
    whole state; returned, it is where the loop continues. The checkpoint's structure was checked
    (resumable_checkpoint); values that still do not fit are named here."""
    try:
        checkpoints.load_trainable(model, ckpt["params"], f"--resume checkpoint {path}")
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler.is_enabled() and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        random.setstate(ckpt["rng"]["python"])
        if ckpt["rng"].get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as e:
        raise ValueError(f"--resume: {path} cannot be resumed ({type(e).__name__}: {e}); --overwrite starts the run "
                         f"again, or give another --output") from e
    return ckpt["epoch"]


def all_finite(tensors):
    """Whether every value of every tensor is finite: one reduction on the device, so one host sync for all."""
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def set_deterministic():
    """--deterministic: deterministic kernels only (an op without one raises), cuDNN's autotuner off. On one GPU and
    software stack a run then repeats bitwise; across GPUs or versions it does not."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for deterministic matmuls
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def check_finite(name, tensors, where, batch=None):
    """Nothing non-finite is ever saved: after each step the loss and the prompts are checked (all_finite), and a
    value that is inf or NaN stops the run (FloatingPointError) before the epoch's checkpoint, naming the loss if it
    was the loss. `where`: (epoch, step, steps, optimizer, checkpoint path); the checkpoint on disk, if any, is that
    of the epoch before."""
    if all(torch.isfinite(t).all() for t in tensors):
        return
    epoch, step, steps, optimizer, path = where
    what = f"loss is {tensors[0].item()}" if name == "loss" else f"the {name} became non-finite in this step"
    detail = f"; images of this batch: {batch}" if batch is not None else ""
    kept = (f"The last checkpoint of this run, {path} (epoch {epoch}), is finite and kept; --resume restarts from it."
            if epoch else "No checkpoint of this run was written.")
    raise FloatingPointError(f"{what} at epoch {epoch + 1}, step {step + 1} of {steps}, LR "
                             f"{optimizer.param_groups[0]['lr']:.6g}{detail}. {kept}")


def remove_replaced_results(run_dir, args):
    """--overwrite: once the new run's first checkpoint has replaced the old one, the old run's results.json no
    longer describes anything and goes (prepare_run_dir: nothing is removed before)."""
    stale = os.path.join(run_dir, "results.json")
    if args.overwrite and os.path.exists(stale):
        os.remove(stale)


# Checkpoints hold only the trainable tensors and plain values, written atomically; checkpoints.read reads them back
# (PyTorch's weights_only unpickler: see engine/checkpoints.py for what is trusted).
def save_checkpoint(path, model, args, identity, epoch, optimizer, scaler=None):
    """checkpoint.pt, written atomically: the trainable prompts, which run they are (identity, config) and where it
    stands (epoch, optimizer, loss scaler, RNG states), all that --resume needs."""
    rundir.atomic_save(dict(
        params=checkpoints.trainable_state(model), method=args.method, epoch=epoch, identity=identity,
        config=plain_config(args, model), optimizer=optimizer.state_dict(),
        scaler=scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        rng=dict(torch=torch.get_rng_state(), python=random.getstate(),
                 cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])), path, torch.save)


def resumable_checkpoint(path, identity):
    """--resume's checkpoint: a checkpoint of this run (the same identity) that holds what resuming uses."""
    ckpt = checkpoints.read(path)
    again = "--overwrite starts the run again, or give another --output"
    if not isinstance(ckpt, dict):
        raise ValueError(f"--resume: {path} holds a {type(ckpt).__name__}, not a checkpoint of train.py; {again}")
    if ckpt.get("identity") != identity:
        raise ValueError(f"--resume: {path} is a run of other settings ("
                         f"{rundir.differences(ckpt.get('identity') or {}, identity)}); give that run's flags to "
                         f"continue it, --overwrite to start a new run in its place, or another --output")
    rng, epoch = ckpt.get("rng"), ckpt.get("epoch")
    wrong = [name for name, ok in (
        ("params", isinstance(ckpt.get("params"), dict)), ("optimizer", isinstance(ckpt.get("optimizer"), dict)),
        ("epoch", isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 0),
        ("rng", isinstance(rng, dict) and isinstance(rng.get("torch"), torch.Tensor)
         and isinstance(rng.get("python"), tuple))) if not ok]
    if wrong:
        raise ValueError(f"--resume: {path} lacks what resuming needs ({', '.join(wrong)} missing or malformed): it "
                         f"was not written by train.py, or was changed since; {again}")
    return ckpt


def plain_config(args, model):
    lr, epochs, batch_size = recipe(args)
    cfg = getattr(model, "cfg", None)  # the config the model was built with
    return dict(args=vars(args), lr=lr, epochs=epochs, batch_size=batch_size,
                method_config=dataclasses.asdict(cfg) if cfg is not None else None)


def prepare_run_dir(args):
    """The run directory, checked writable now. A directory that holds an unfinished run (a checkpoint, no results)
    needs --resume (continue it) or --overwrite (start again); one that holds a finished run is looked at once its
    identity is known (finished_run). --overwrite removes nothing here: the old checkpoint is replaced by the new
    run's first checkpoint (atomically) and the old results.json goes at that moment, or, for a run that trains
    nothing, both are replaced when its results are written; so a run that fails before then, or a file that --load
    reads from this directory, loses nothing."""
    name = args.dataset or "mini_world"
    run_dir = args.output or os.path.join("output", name, args.method + ("_xd" if args.cross_dataset else ""),
                                          f"shots{args.shots}_seed{args.seed}")
    unfinished = os.path.exists(os.path.join(run_dir, "checkpoint.pt")) and \
        not os.path.exists(os.path.join(run_dir, "results.json"))
    if unfinished and not (args.resume or args.overwrite):
        raise FileExistsError(f"run directory {run_dir} holds an unfinished run (checkpoint.pt, no results.json); "
                              f"pass --resume to continue it, --overwrite to start it again, or --output for a new "
                              f"directory")
    rundir.check_writable(run_dir)
    return run_dir


def finished_run(run_dir, identity, args):
    """Without --resume or --overwrite, a run directory that holds results.json: its results if they are of this very
    run (the same identity, and for --load the same file), printed with how to train again; a finished run of other
    settings is refused. None when there is nothing to look at."""
    path = os.path.join(run_dir, "results.json")
    if args.resume or args.overwrite or not os.path.exists(path):
        return None
    again = "pass --overwrite to replace it, or --output for a new directory"
    try:
        with open(path) as f:
            old = json.load(f)
    except ValueError as e:
        raise FileExistsError(f"{path} is not a readable results file ({e}); {again}") from e
    if not isinstance(old, dict) or not isinstance(old.get("accuracy"), dict):
        raise FileExistsError(f"{path} is not a results file of train.py (no 'accuracy'); {again}")
    if old.get("identity") != identity:
        raise FileExistsError(f"run directory {run_dir} holds a finished run of other settings ("
                              f"{rundir.differences(old.get('identity') or {}, identity)}); {again}")
    if args.load and old.get("load_sha256") != (rundir.file_sha256(args.load) if os.path.isfile(args.load) else None):
        raise FileExistsError(f"run directory {run_dir} holds an evaluation of --load {args.load}, which has changed "
                              f"since (its SHA-256 is not the one recorded in {path}); pass --overwrite to evaluate "
                              f"it again, or --output for a new directory")
    accuracy = "  ".join(f"{k} {v:.2f}" if isinstance(v, (int, float)) else f"{k} {v}"
                         for k, v in old["accuracy"].items())
    print(f"{path}: this run already finished with these settings. {old.get('method')} {old.get('dataset')} seed "
          f"{old.get('seed')}: {accuracy}")
    print("Nothing was trained. To train it again, add --overwrite (or give another --output).")
    return old


def load_clip(args, real=None):
    """--clip if given; else ViT-B/16 for a real dataset and the mini world's CLIP in the mini world."""
    if args.clip:
        return checkpoints.load_clip(args.clip, args.device)
    if real if real is not None else not mini_world.is_world(args.dataset):
        return checkpoints.load_clip("ViT-B/16", args.device)
    return mini_world.load_world_clip(device=args.device)


def cpu_threads(args, clip_model):
    """Threads for torch on the CPU, and why. A CLIP narrower than 256 (the mini world's) runs small matrices, whose
    per-op cost is largely thread synchronisation: a second thread gains little on an idle machine and, with another
    process busy on a core, makes every op wait for it. So one thread for a small CLIP, which also lets two protocol
    processes share two cores; a large CLIP gets the cores that other processes leave free (by the 1-minute load
    average)."""
    if args.threads:
        return args.threads, "--threads"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if clip_layers.widths(clip_model)[1] < 256:
        return 1, f"this small CLIP's ops are too small to share between threads; {cores} cores here; --threads sets it"
    busy = round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    return max(1, cores - busy), f"{cores} cores, about {busy} busy with other processes; --threads sets it"


def run_identity(args, clip_model, clip_fingerprint=None, benchmarks=None):
    """What a run of these flags computes on this CLIP and these data (rundir.identity): the method's config, the
    precision as resolved, the CLIP's weights fingerprint, the dataset's split and class names (data.split_fingerprint
    of --dataset under --root, the world drawn there first if it is not yet; or of the Benchmarks passed in).
    tools/protocols.py computes it too, before deciding to skip."""
    cfg = method_config(args)
    if benchmarks is not None:
        data_fingerprint = data.benchmark_fingerprint(benchmarks)
    elif mini_world.is_world(args.dataset):
        name = args.dataset or "mini_world"
        mini_world.render_world(args.root, datasets=(name,))  # idempotent: a drawn world is only checked
        data_fingerprint = data.split_fingerprint(name, args.root, mini_world.DATASETS[name])
    else:
        data_fingerprint = data.split_fingerprint(args.dataset, args.root)
    ident = rundir.identity(args, recipe(args), dataclasses.asdict(cfg) if cfg is not None else None,
                            clip_fingerprint or rundir.weights_fingerprint(clip_model), data_fingerprint)
    ident["precision"] = resolve_precision(args.precision, args.device)
    return ident


def main(argv=None, clip_model=None, benchmarks=None, extra=None):
    """Run one (method, dataset, seed). Tests and protocol scripts may pass the CLIP model and the benchmarks in
    (`benchmarks`: {"base": Benchmark, "new": Benchmark} or {"all": ...}); otherwise they are loaded from the flags.
    One process per run directory: a second one started on the same directory stops with rundir.Locked."""
    args = get_args(argv)
    if args.workers is None:
        args.workers = 4 if args.device.startswith("cuda") else 0
    if benchmarks is None and not mini_world.is_world(args.dataset):
        data.resolve_name(args.dataset, also=mini_world.DATASETS)  # an unknown --dataset: said before CLIP loads
    run_dir = prepare_run_dir(args)
    with rundir.RunLock(run_dir, steal=args.steal_lock), log_to(os.path.join(run_dir, "train.log"), argv):
        return run(args, run_dir, clip_model, benchmarks, extra)


class _Tee:
    """A stream that writes to the terminal's stream and to the log. The log is a copy: a failed write to it (a full
    disk) ends the copy, never the run."""
    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def to_log(self, text):
        try:
            if self.log is not None:
                self.log.write(text)
                self.log.flush()
        except (OSError, ValueError):
            self.log = None

    def write(self, text):
        self.to_log(text)
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextmanager
def log_to(path, argv=None):
    """What the run prints, also appended to its run directory's train.log (a resumed run adds to it), under a line
    with the time and the command; an error that stops the run is written there too."""
    log = open(path, "a")
    tee = _Tee(sys.stdout, log)
    command = " ".join(sys.argv[:1] + list(sys.argv[1:] if argv is None else argv))
    tee.to_log(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {command}\n")
    stdout, sys.stdout = sys.stdout, tee
    try:
        yield
    except BaseException as e:
        tee.to_log(f"error: {type(e).__name__}: {e}\n")
        raise
    finally:
        sys.stdout = stdout
        try:
            log.close()
        except OSError:
            pass


def run(args, run_dir, clip_model=None, benchmarks=None, extra=None):
    t_start = time.time()
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    if clip_model is None:
        clip_model = load_clip(args)
    clip_fingerprint = rundir.weights_fingerprint(clip_model)  # before any precision change
    if not args.device.startswith("cuda"):
        threads, why = cpu_threads(args, clip_model)
        torch.set_num_threads(threads)
        print(f"CPU threads: {threads} ({why})")
    if args.dataset is None and benchmarks is None:
        print("no --dataset given: running in the built-in mini world (world/mini_world.py). For the real benchmark: "
              "python train.py --method mpl --dataset eurosat --root $DATA --clip ViT-B/16")
    if mini_world.is_world(args.dataset) and benchmarks is None:
        print(f"mini world: training crops keep at least {args.crop_scale:.0%} of the 32-pixel image, then flips "
              f"(the dataset's crop_scale, world/mini_world.py; --crop-scale; Dassl's 0.08 on the benchmarks)")
    ident = run_identity(args, clip_model, clip_fingerprint, benchmarks)
    done = finished_run(run_dir, ident, args)
    if done is not None:
        return done
    last = os.path.join(run_dir, "checkpoint.pt")
    ckpt = resumable_checkpoint(last, ident) if args.resume and os.path.exists(last) else None

    def benchmark(subsample):  # base/new: the few-shot draw over all classes, then the class subsample (data.py)
        if benchmarks is not None:
            return benchmarks[subsample]
        if mini_world.is_world(args.dataset):
            return mini_world.load_benchmark(args.dataset or "mini_world", args.root, args.shots, args.seed, subsample)
        return data.load_benchmark(args.dataset, args.root, args.shots, args.seed, subsample)

    def build_for(b):  # the model of a class set; a class whose prompt does not fit CLIP's context is named
        try:
            return build_model(args, clip_model, b.classnames, b.template)
        except ValueError as e:
            if "too long for context length" not in str(e):
                raise
            name = max((c for c in b.classnames if c in str(e)), key=len, default="?")
            raise ValueError(f"--dataset {b.name}: the class name {name[:80] + ('...' if len(name) > 80 else '')!r} "
                             f"is too long: this method's prompt with it exceeds CLIP's context of "
                             f"{clip_model.positional_embedding.shape[0]} tokens; shorten it in "
                             f"{b.source or 'the class list'}") from None

    train_on = "base" if args.subsample == "base2new" else args.subsample
    bench = benchmark(train_on)
    # base2new: the new classes are read and their model built once now, so that a fault in them (a missing test
    # image, a class name too long for CLIP) stops the run before the training, not after it. The model is built again
    # after training, so that under --precision fp16 it encodes the class names with the then fp16 CLIP.
    new = benchmark("new") if args.subsample == "base2new" else None
    if new is not None:
        build_for(new)
    torch.manual_seed(args.seed)  # prompt initialisation draws from the torch RNG
    model = build_for(bench).to(args.device)
    autocast, scaler, precision = precision_setup(args.precision, args.device, model)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{args.method} on {bench.name} ({train_on} classes): {len(bench.classnames)} classes, {len(bench.train)} "
          f"training images, {n_trainable:,} trainable parameters, precision {precision}, run directory {run_dir}")

    load_sha256 = None
    if args.load:
        checkpoints.load_prompts(model, args.load, args.method)
        load_sha256 = rundir.file_sha256(args.load)  # what was evaluated: a finished run is reused only for this file
    elif args.eval_only and n_trainable > 0:
        raise ValueError(f"--eval-only with --method {args.method} needs --load PATH: the prompts to evaluate "
                         f"(e.g. {os.path.join(run_dir, 'checkpoint.pt')} of a finished run)")
    sec_per_step, history = None, []
    trains = not args.eval_only and recipe(args)[1] > 0 and n_trainable > 0
    if trains:
        if not bench.train:
            raise ValueError(f"--dataset {bench.name} has no training images (a test-only set): evaluate prompts "
                             f"trained elsewhere with --eval-only --load CHECKPOINT, or use --method zeroshot")
        sec_per_step, history = train(model, bench.train, args, run_dir, autocast, scaler, ident, ckpt)
        if sec_per_step is None and ckpt is not None:  # a finished run resumed: nothing trained, keep the old timing
            previous = _previous_results(run_dir)
            sec_per_step, history = previous.get("sec_per_step"), previous.get("history", [])

    per_class = {train_on: {}, "new": {}}
    acc = {train_on: evaluate(model, bench.test, args, autocast, per_class[train_on])}
    if args.subsample == "base2new":  # the same prompts; the model rebuilt with the new class names
        new_model = build_for(new).to(args.device)
        checkpoints.load_trainable(new_model, checkpoints.trainable_state(model),
                                   "the prompts trained on the base classes")
        precision_setup(precision, args.device, new_model)
        acc["new"] = evaluate(new_model, new.test, args, autocast, per_class["new"])
        b, n = acc["base"], acc["new"]
        acc["hm"] = 2 * b * n / (b + n) if b + n > 0 else 0.0  # harmonic mean, HM = 2BN / (B + N)
    print(f"{args.method} {bench.name} seed {args.seed}: " + "  ".join(f"{k} {v:.2f}" for k, v in acc.items()))
    names = {train_on: bench.classnames, "new": new.classnames if new is not None else []}
    per_class = {split: {names[split][label]: v for label, v in per_class[split].items()} for split in acc
                 if split in per_class}

    results = dict(method=args.method, dataset=bench.name, seed=args.seed, shots=args.shots,
                   subsample=args.subsample, accuracy=acc, config=plain_config(args, model), identity=ident,
                   trainable_params=n_trainable, sec_per_step=sec_per_step, wall_seconds=time.time() - t_start,
                   precision=precision, device=args.device, git_commit=git_commit(), load_sha256=load_sha256,
                   history=history, per_class_accuracy=per_class, **(extra or {}))
    if args.method != "zeroshot" and benchmarks is None and mini_world.is_world(args.dataset):  # cheap in the world
        zs = {k: evaluate(clip_layers.ZeroShotCLIP(clip_model, b.classnames, b.template).to(args.device), b.test,
                          args, autocast) for k, b in ((train_on, bench), ("new", new)) if b is not None}
        if "new" in zs:
            zs["hm"] = 2 * zs["base"] * zs["new"] / (zs["base"] + zs["new"]) if zs["base"] + zs["new"] > 0 else 0.0
        print("zero-shot CLIP (same split): " + "  ".join(f"{k} {v:.2f}" for k, v in zs.items()))
        results["zeroshot"] = zs
    if not trains:
        untrained_checkpoint(last, model, args, ident, n_trainable)
    rundir.save_json(results, os.path.join(run_dir, "results.json"))
    return results


def untrained_checkpoint(path, model, args, identity, n_trainable):
    """The checkpoint beside the results of a run that trained nothing (--epochs 0, --eval-only, zero-shot), written
    right before them, so the two never disagree: a checkpoint left there by an earlier run (--overwrite) is replaced
    by the prompts evaluated now (removed, for a method without prompts), and an --epochs 0 run writes its initial
    prompts as its checkpoint, as a trained run writes its last epoch (a transfer source of 0 epochs is loadable)."""
    if n_trainable == 0:
        if os.path.exists(path):
            os.remove(path)
            print(f"removed {path}: it held the prompts of the run replaced (--overwrite); --method {args.method} has "
                  f"none")
        return
    if args.eval_only and not os.path.exists(path):
        return  # an evaluation of prompts trained elsewhere: they stay in the file it loaded
    lr = recipe(args)[0]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
    save_checkpoint(path, model, args, identity, 0, optimizer)


def _previous_results(run_dir):
    try:
        with open(os.path.join(run_dir, "results.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


if __name__ == "__main__":
    cli.run(main)
