"""
Train and evaluate prompt learning on a frozen CLIP: one run (one method, dataset and seed), in one
plain loop.

    python train.py --method mpl --shots 16             # the built-in mini world, on the CPU
    python train.py --method mpl --dataset eurosat --root $DATA --clip ViT-B/16   # the paper's
    python train.py --method isp --help                 # every flag, the method's included

Methods, all presets of two files plus zero-shot: zeroshot (CLIP with CoOp's template of the
dataset), mpl (mpl.py, the official add2/rm1 recipe), maple (mpl.py: one add and n_ctx removes per
layer), isp (isp.py with sample probing, PromptSRC's recipe), ivlp (isp.py, both switched off).

The recipe is the papers' (Dassl's trainer as the official configs set it): SGD (momentum 0.9,
weight decay 5e-4), a per-epoch cosine schedule after one warm-up epoch at a constant 1e-5,
drop_last, the last-epoch model, top-1 micro accuracy. `--subsample base2new` (the default) trains
on the base classes, then evaluates the same prompts on the base test set and, rebuilt with the new
class names, on the new test set, and reports HM = 2BN / (B + N). The run directory (lock, log,
checkpoints, resume, results.json) is engine/run.py's Run; whole protocols are tools/protocols.py.
"""
import argparse
import dataclasses
import math
import os
import random

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import clip_layers
import data
import isp
import mpl
from engine import checkpoints, cli, clip_engine, inputs, rundir
from engine.precision import precision_setup
from engine.run import Run, cpu_count, run_flags, set_deterministic

# --------------------------------------------------------------------------------------------------
# Methods and their training recipes. A prompt method is a model class and one of its file's
# presets, so the baselines are settings, not code.


@dataclasses.dataclass(frozen=True)
class Recipe:
    model: type = None     # mpl.MPL or isp.ISP; None: zero-shot CLIP, nothing trains
    config: object = None  # the method's preset (mpl.PRESETS[...], isp.PRESETS[...])
    lr: float = 0.0        # base learning rate of the cosine schedule
    epochs: int = 0
    batch_size: int = 4
    cross_dataset: dict = dataclasses.field(default_factory=dict)  # --cross-dataset's changes


MPL_XD = dict(mpl.CROSS_DATASET, lr=0.0026, epochs=2)  # the official _cross_datasets configs
RECIPES = {
    "zeroshot": Recipe(),
    # MPL configs/trainers/MPL/vit_b4_c1_add2_rm1.yaml (+ _cross_datasets: depth 3, lr .0026, 2 ep)
    "mpl": Recipe(mpl.MPL, mpl.PRESETS["mpl"], lr=0.0035, epochs=5, cross_dataset=MPL_XD),
    # MaPLe vit_b16_c2_ep5_batch4_2ctx.yaml (+ _cross_datasets)
    "maple": Recipe(mpl.MPL, mpl.PRESETS["maple"], lr=0.0035, epochs=5, cross_dataset=MPL_XD),
    # INFERRED (docs/isp_reconstruction.md §6): PromptSRC's vit_b16_c2_ep20_batch4_4+4ctx (+ _xd)
    "isp": Recipe(isp.ISP, isp.PRESETS["isp"], lr=0.0025, epochs=20, cross_dataset=dict(depth=3)),
    # PromptSRC's IVLP 4+4 baseline, the same recipe
    "ivlp": Recipe(isp.ISP, isp.PRESETS["ivlp"], lr=0.0025, epochs=20, cross_dataset=dict(depth=3)),
}
WARMUP_LR = 1e-5  # Dassl's ConstantWarmupScheduler: 1 epoch at a constant 1e-5


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    add = p.add_argument
    add("--method", default="mpl", choices=list(RECIPES), help="which method")
    add("--dataset", default=None, help="a dataset of data.py's table (eurosat, ..., mini_world_"
        "fine) or a folder of your own (README); default: the built-in mini world, no download")
    add("--root", default=os.environ.get("DATA", "data"), help="the CoOp datasets' folder, where "
        "the mini world is drawn too (<root>/mini_world*); default: $DATA if set, else data")
    add("--shots", type=int, default=16, help="training images per class (Dassl few-shot draw)")
    add("--seed", type=int, default=1, help="the papers use seeds 1, 2, 3")
    add("--subsample", default="base2new", choices=["base2new", "all", "base", "new"], help="base"
        "2new: train on base classes, test on base and new; all/base/new: those classes only")
    add("--epochs", type=int, default=None, help=f"default: the method's recipe. Epoch 1 is the "
        f"warm-up at a constant LR of {WARMUP_LR:g}, so --epochs 1 learns next to nothing")
    add("--lr", type=float, default=None, help="base learning rate; default: the method's recipe")
    add("--batch-size", type=int, default=None, help="default: the method's recipe (4)")
    add("--momentum", type=float, default=0.9, help="SGD momentum")
    add("--weight-decay", type=float, default=5e-4, help="SGD weight decay")
    add("--cross-dataset", action="store_true", help="the cross-dataset / domain-generalisation "
        "recipe (depth 3; MPL/MaPLe: lr 0.0026, 2 epochs)")
    add("--clip", default=None, help="CLIP model name (ViT-B/16) or path to a local .pt; default "
        "ViT-B/16 with --dataset, else the mini world's CLIP")
    add("--load", default=None, help="initialise the prompts from a checkpoint: ours, or an "
        "official model.pth.tar-N of MPL (--method mpl), MaPLe (maple) or PromptSRC's IVLP (ivlp)")
    add("--eval-only", action="store_true", help="no training; evaluate (the prompts of --load)")
    add("--crop-scale", type=float, default=None, help="smallest area of the training "
        "RandomResizedCrop (default: the dataset's: Dassl's 0.08 on the benchmarks, data.py)")
    run_flags(p)  # where and how the run computes and is kept: --device, --precision, --output..
    config = RECIPES[cli.peek(argv, "--method", default="mpl", choices=list(RECIPES))].config
    cli.config_flags(p, config)  # the method's hyper-parameters: a flag per field of its config
    args = p.parse_args(argv)
    if args.crop_scale is None:
        args.crop_scale = inputs.crop_scale(args.dataset)  # the dataset's (data.DatasetSpec)
    cli.check_train_args(p, args, cpu_count(), method_config, config)
    if args.workers is None:
        args.workers = 4 if args.device.startswith("cuda") else 0
    return args


def method_config(args):
    """The method's config: its preset, then --cross-dataset, then explicit flags (highest)."""
    r = RECIPES[args.method]
    if r.config is None:
        return None
    names = {f.name for f in dataclasses.fields(r.config)}
    changes = {k: v for k, v in r.cross_dataset.items() if k in names} if args.cross_dataset else {}
    changes.update({k[4:]: v for k, v in vars(args).items() if k[:4] == "cfg_" and v is not None})
    if args.method == "maple" and "n_rm" not in changes:  # MaPLe removes the n_ctx tokens it added
        return mpl.maple(**changes)
    return dataclasses.replace(r.config, **changes)


def recipe(args):
    """(lr, epochs, batch size): flags override --cross-dataset, which overrides the recipe."""
    r = RECIPES[args.method]
    xd = r.cross_dataset if args.cross_dataset else {}
    pick = lambda flag, name: flag if flag is not None else xd.get(name, getattr(r, name))
    return pick(args.lr, "lr"), pick(args.epochs, "epochs"), pick(args.batch_size, "batch_size")


def build_model(args, clip_model, classnames, template, method=None):
    """The method (default --method) on the frozen CLIP, its encoders run by the engine: exact
    speed-ups of clip_layers' plain loops (engine/clip_engine.py), the same numbers."""
    engine = clip_engine.Engine(text_chunk=args.text_chunk or None)  # classes per text pass
    if (method or args.method) == "zeroshot":
        return clip_layers.ZeroShotCLIP(clip_model, classnames, template, engine=engine)
    return RECIPES[args.method].model(clip_model, classnames, method_config(args), engine=engine)


# --------------------------------------------------------------------------------------------------
# Training and evaluation

def get_lr(epoch, base_lr, epochs):
    """LR used during 0-based `epoch`, Dassl's scheduler as the official configs set it: epoch 0 a
    warm-up at a constant 1e-5, then cosine annealing over T = epochs restarted after it, so shifted
    by one epoch, never reaching 0 (MaPLe, .0035, 5 epochs: 1e-5, .0035, .00317, .00229, .00121)."""
    if epoch == 0:
        return WARMUP_LR
    return base_lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / epochs))


def loss_fn(logits, labels, weights=None):
    """Cross-entropy, optionally weighted per sample (ISP's sample probing): mean_i w_i * CE_i."""
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    return ce.mean() if weights is None else (weights.float() * ce).mean()


def train(model, items, args, run, autocast, scaler):
    """The loop: per epoch set the LR, then zero_grad -> forward -> loss -> backward -> step for
    each batch. The run (engine/run.py) restores a --resume, checks each step for non-finite values
    (one host sync; amp adds GradScaler's own and its scale), keeps the history and saves each
    epoch."""
    lr, epochs, batch_size = recipe(args)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    start = run.restore(model, optimizer, scaler)  # --resume: the epoch to go on from; else 0
    if epochs == 1:  # epoch 0 is the warm-up (get_lr)
        print(f"note: --epochs 1 trains only the warm-up epoch, at a constant LR of {WARMUP_LR:g}; "
              f"the recipe's LR {lr:g} starts with epoch 2")
    transform = data.train_transform(model.clip.visual.input_resolution, args.crop_scale)
    loader = data.make_loader(items, transform, batch_size, True, args.workers, args.device)
    for epoch in range(start, epochs):
        for group in optimizer.param_groups:
            group["lr"] = get_lr(epoch, lr, epochs)
        model.train()
        for images, labels, _ in run.batches(loader, epoch, optimizer):
            images = images.to(args.device, non_blocking=True)  # clip_layers casts to CLIP's dtype
            labels = labels.to(args.device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                logits = model(images)
                weights = model.loss_weights(images, labels, logits)  # None, or (N,): ISP's probing
            loss = loss_fn(logits, labels, weights)
            scaler.scale(loss).backward()  # amp scales the loss (fp16 gradients); else as it is
            scaler.step(optimizer)         # amp: skipped when a gradient is inf or NaN
            scaler.update()
            run.after_step(loss, params, scaler)
        run.end_epoch(model, optimizer, scaler)
    return run.timing()


@torch.no_grad()
def evaluate(model, items, args, autocast, per_class=None):
    """Top-1 micro accuracy (%) over `items`. The class side is encoded once, not once per batch.
    A dict passed as `per_class` receives each label's accuracy (%) over its own test images."""
    model.eval()
    transform = data.test_transform(model.clip.visual.input_resolution)
    loader = data.make_loader(items, transform, args.test_batch_size, False, args.workers,
                              args.device)
    correct, hits = 0, {}
    with autocast():
        classes = model.encode_classes()
        for images, labels, _ in tqdm(loader, desc="test", leave=False, disable=None):
            right = model(images.to(args.device), classes).argmax(-1).cpu() == labels
            correct += right.sum().item()
            for label, ok in zip(labels.tolist(), right.tolist()):
                hits.setdefault(label, []).append(ok)
    if per_class is not None:
        per_class.update({label: 100.0 * sum(oks) / len(oks)
                          for label, oks in sorted(hits.items())})
    return 100.0 * correct / len(items)


def hm(base, new):
    """The harmonic mean of base and new accuracy, HM = 2BN / (B + N) (CoCoOp)."""
    return 2 * base * new / (base + new) if base + new > 0 else 0.0


def with_hm(acc):
    """{"base": B, "new": N} gains "hm"; other splits stay as they are."""
    return dict(acc, hm=hm(acc["base"], acc["new"])) if "new" in acc else acc


# --------------------------------------------------------------------------------------------------
# One run: CoCoOp's base-to-new protocol (train on the base classes, test base and new)

def base_to_new(args, run, clip_model, benchmarks=None):
    """Train on the base classes (or all / base / new), evaluate; returns (results, the model,
    whether it trained). `benchmarks`: {"base": Benchmark, "new": Benchmark} (a test, a protocol)."""
    train_on = "base" if args.subsample == "base2new" else args.subsample
    splits = [train_on] + (["new"] if args.subsample == "base2new" else [])
    benches = benchmarks or {k: inputs.benchmark(args, k) for k in splits}
    # Both models are built now, the new classes' first, so that a fault in them (a missing test
    # image, a class name too long for CLIP) stops the run before the training, not after it.
    models = {}
    for k in reversed(splits):
        torch.manual_seed(args.seed)  # prompt initialisation draws from the torch RNG: one start
        with inputs.naming_long_classes(benches[k], clip_model):
            models[k] = build_model(args, clip_model, benches[k].classnames, benches[k].template)
    bench, model = benches[train_on], models[train_on].to(args.device)
    autocast, scaler, precision = precision_setup(args.precision, args.device, model)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{args.method} on {bench.name} ({train_on} classes): {len(bench.classnames)} classes, "
          f"{len(bench.train)} training images, {n_trainable:,} trainable parameters, precision "
          f"{precision}, run directory {run.dir}")
    load_sha256 = inputs.load_prompts(args, model, run.dir)  # --load
    trains = not args.eval_only and recipe(args)[1] > 0 and n_trainable > 0
    if trains:
        inputs.check_trainable(bench)  # a test-only set has nothing to train on
        if args.deterministic:
            set_deterministic()
        train(model, bench.train, args, run, autocast, scaler)

    acc, per_class = {}, {}
    for k in splits:  # the same prompts, in the model of each class set
        if k != train_on:
            checkpoints.load_trainable(models[k].to(args.device), model.prompt_state_dict(),
                                       "the prompts trained on the base classes")
            precision_setup(precision, args.device, models[k])
        by_label = {}
        acc[k] = evaluate(models[k], benches[k].test, args, autocast, by_label)
        per_class[k] = {benches[k].classnames[label]: v for label, v in by_label.items()}
    acc = with_hm(acc)
    print(f"{args.method} {bench.name} seed {args.seed}: "
          + "  ".join(f"{k} {v:.2f}" for k, v in acc.items()))
    results = dict(method=args.method, dataset=bench.name, seed=args.seed, shots=args.shots,
                   subsample=args.subsample, accuracy=acc, trainable_params=n_trainable,
                   precision=precision, load_sha256=load_sha256, per_class_accuracy=per_class)
    if args.method != "zeroshot" and benchmarks is None and data.is_world(args.dataset):
        results["zeroshot"] = zero_shot(args, clip_model, autocast, benches)  # cheap here
    return results, model, trains


def main(argv=None, clip_model=None, benchmarks=None, extra=None):
    """Run one (method, dataset, seed). Tests and protocol scripts may pass the CLIP model and the
    benchmarks in; otherwise they are loaded from the flags. One process per run directory: a
    second one started on the same directory stops with rundir.Locked."""
    args = get_args(argv)
    if benchmarks is None:
        inputs.check_dataset(args)  # an unknown --dataset, a missing --root: said before CLIP loads
    with Run(args, recipe(args), argv, dataset=inputs.dataset_name(args)) as run:
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        clip_model = clip_model if clip_model is not None else inputs.clip_for(args)
        fingerprint = rundir.weights_fingerprint(clip_model)  # before any precision change
        run.use_cpu_threads(clip_model)  # on the CPU: --threads, or what suits this CLIP's width
        if benchmarks is None:
            inputs.say_dataset(args)  # the mini world without --dataset, and its crops
        done = run.start(run_identity(args, clip_model, fingerprint, benchmarks))
        if done is not None:
            return done  # a finished run of these very settings
        results, model, trained = base_to_new(args, run, clip_model, benchmarks)
        return run.finish(dict(results, **(extra or {})), model, trained)


def zero_shot(args, clip_model, autocast, benches):
    """Zero-shot CLIP's accuracy on the same split, printed beside the run's."""
    models = {k: build_model(args, clip_model, b.classnames, b.template, "zeroshot")
              for k, b in benches.items()}
    zs = with_hm({k: evaluate(models[k].to(args.device), b.test, args, autocast)
                  for k, b in benches.items()})
    print("zero-shot CLIP (same split): " + "  ".join(f"{k} {v:.2f}" for k, v in zs.items()))
    return zs


def run_identity(args, clip_model, clip_fingerprint=None, benchmarks=None):
    """What a run of these flags computes on this CLIP and these data (engine/inputs.py)."""
    return inputs.run_identity(args, recipe(args), method_config(args), clip_fingerprint
                               or rundir.weights_fingerprint(clip_model), benchmarks)


if __name__ == "__main__":
    cli.run(main)
