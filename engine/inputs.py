"""
What a run of train.py reads, from its flags: the dataset (whatever data.py's table or a folder
of your own names: a CoOp dataset under --root, a built-in mini world dataset, drawn there first,
or your own), the CLIP, checkpoints given with --load, and the identity of all of it (what the
run computes; engine/rundir.py). tools/protocols.py uses it too.
"""
import dataclasses
import os
from contextlib import contextmanager

import data
from engine import checkpoints
from engine import rundir
from engine.precision import resolve_precision

DEFAULT_DATASET = "mini_world"  # no --dataset: the built-in mini world, which needs no download


def dataset_name(args):
    return name_of(args.dataset)


def name_of(dataset):
    """The name a --dataset value runs under (run directories, results.json, tables): a dataset's own
    name, or the folder's name for a dataset of your own (data.own_dataset)."""
    if data.is_path(dataset):
        return os.path.basename(data.own_folder(dataset))
    return dataset or DEFAULT_DATASET


def check_dataset(args):
    """An unknown --dataset, or a --root that is not there (check_root): said before CLIP loads."""
    check_dataset_name(args.dataset)
    check_root(args.root, args.dataset)


def check_dataset_name(name):
    if data.is_path(name):
        data.own_dataset(name)  # its folder read (and split once, if it has no split file)
    elif name is not None:
        data.resolve_name(name)


def check_root(root, name):
    """A --root that is not a folder, for a CoOp dataset (read from there), said before CLIP loads.
    The mini world is drawn there, so for it a new folder is fine."""
    if data.is_world(name) or os.path.isdir(root):
        return
    try:
        key = data.resolve_name(name)
    except ValueError:  # not a built-in name: check_dataset says what it is
        return
    if key in data.DATASETS:
        what = "is not a folder" if os.path.exists(root) else "does not exist"
        raise FileNotFoundError(f"--root {root} {what}: it is the folder of the CoOp datasets "
                                f"(--dataset {key} is read from "
                                f"{os.path.join(root, data.DATASETS[key].dir)}); give --root or "
                                f"set $DATA")


def spec_of(name):
    """The DatasetSpec whose defaults a run on --dataset takes (crop_scale, clip): its entry in
    data.py's table, or for a folder of your own the defaults (Dassl's crops, ViT-B/16)."""
    if data.is_path(name):
        return data.OWN_SPEC
    return data.ALL[data.resolve_name(name_of(name))]


def crop_scale(name):
    """The default smallest area of the training crops: the dataset's (data.DatasetSpec)."""
    try:
        return spec_of(name).crop_scale
    except ValueError:  # an unknown name is said later, with the known ones (check_dataset)
        return data.DatasetSpec.crop_scale


def say_dataset(args):
    """What the run does with no --dataset, and the world's own crops."""
    if args.dataset is None:
        print("no --dataset given: running in the built-in mini world (world/mini_world.py). For "
              "the real benchmark: python train.py --method mpl --dataset eurosat --root $DATA "
              "--clip ViT-B/16")
    if data.is_world(args.dataset):
        print(f"mini world: training crops keep at least {args.crop_scale:.0%} of the 32-pixel "
              f"image, then flips (the dataset's crop_scale, world/mini_world.py; --crop-scale; "
              f"Dassl's 0.08 on the benchmarks)")


def benchmark(args, subsample):
    """The few-shot draw over all classes, then the class subsample (data.py)."""
    return data.load_benchmark(args.dataset or DEFAULT_DATASET, args.root, args.shots, args.seed,
                               subsample)


def check_trainable(bench):
    """A benchmark to train on has training images (a test-only set has none)."""
    if not bench.train:
        raise ValueError(f"--dataset {bench.name} has no training images (a test-only set): "
                         f"evaluate prompts trained elsewhere with --eval-only --load "
                         f"CHECKPOINT, or use --method zeroshot")


def clip_for(args, dataset=None):
    """--clip if given; else the CLIP of the dataset (data.DatasetSpec.clip: ViT-B/16, or the
    mini world's own); `dataset`: the one whose CLIP to take, when the caller knows better than
    --dataset (a protocol's first dataset)."""
    name = dataset if dataset is not None else args.dataset
    return checkpoints.load_clip(args.clip or spec_of(name).clip, args.device)


def data_fingerprint(args, benchmarks=None):
    """data.split_fingerprint of --dataset under --root, the world drawn there first if it is not
    yet; or of the Benchmarks passed in."""
    if benchmarks is not None:
        return data.benchmark_fingerprint(benchmarks)
    return data.split_fingerprint(args.dataset or DEFAULT_DATASET, args.root)


def run_identity(args, recipe, cfg, clip_fingerprint, benchmarks=None):
    """What a run of these flags computes on this CLIP and these data (rundir.identity): the
    method's config, the precision as resolved, the CLIP's weights fingerprint, the dataset's split
    and class names. tools/protocols.py computes it too (train.run_identity), before skipping."""
    ident = rundir.identity(args, recipe, dataclasses.asdict(cfg) if cfg is not None else None,
                            clip_fingerprint, data_fingerprint(args, benchmarks), dataset_name(args))
    ident["precision"] = resolve_precision(args.precision, args.device)
    return ident


def load_prompts(args, model, run_dir):
    """--load: the prompts of a checkpoint (ours or an official one) into the model; returns the
    file's SHA-256 (a finished run is reused only for this very file), or None."""
    if args.load:
        checkpoints.load_prompts(model, args.load, args.method)
        return rundir.file_sha256(args.load)
    if args.eval_only and any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"--eval-only with --method {args.method} needs --load PATH: the prompts "
                         f"to evaluate (e.g. {os.path.join(run_dir, 'checkpoint.pt')} of a "
                         f"finished run)")
    return None


def class_name_error(e, b, context):
    """The error of a class set whose prompt does not fit CLIP's context (`context` tokens): the
    class named, with the file that defines it; any other error as it is."""
    if "too long for context length" not in str(e):
        return e
    name = max((c for c in b.classnames if c in str(e)), key=len, default="?")
    name = name[:80] + ("..." if len(name) > 80 else "")
    return ValueError(f"--dataset {b.name}: the class name {name!r} is too long: this method's "
                      f"prompt with it exceeds CLIP's context of {context} tokens; shorten it in "
                      f"{b.source or 'the class list'}")


@contextmanager
def naming_long_classes(b, clip_model):
    """Around building benchmark b's model: a class whose prompt does not fit CLIP's context is
    named, with the file that defines it (class_name_error)."""
    try:
        yield
    except ValueError as e:
        raise class_name_error(e, b, clip_model.positional_embedding.shape[0]) from None
