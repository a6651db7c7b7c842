"""
What a run of train.py reads, from its flags: the dataset (a CoOp dataset under --root, a folder of
your own given as its path (data.own_dataset), or one of the built-in mini world's, drawn there
first), the CLIP, checkpoints given with --load, and the identity of all of it (what the run
computes; engine/rundir.py). tools/protocols.py uses it too.
"""
import dataclasses
import os

import data
from engine import checkpoints
from engine import rundir
from world import mini_world

DEFAULT_DATASET = "mini_world"  # no --dataset: the built-in mini world, which needs no download


def dataset_name(args):
    return name_of(args.dataset)


def name_of(dataset):
    """The name a --dataset value runs under (run directories, results.json, tables): a dataset's own
    name, or the folder's name for a dataset of your own (data.own_dataset)."""
    if data.is_path(dataset):
        return os.path.basename(data.own_folder(dataset))
    return dataset or DEFAULT_DATASET


def is_world(name):
    """Whether --dataset names one of the mini world's datasets (None: the mini world)."""
    return mini_world.is_world(name)


WORLD_SUITE = mini_world.SUITE  # the mini world's four base-to-new datasets


def check_dataset(args):
    """An unknown --dataset, said before CLIP loads."""
    check_dataset_name(args.dataset)


def check_dataset_name(name):
    if data.is_path(name):
        data.own_dataset(name)  # its folder read (and split once, if it has no split file)
    elif not is_world(name):
        data.resolve_name(name, also=mini_world.DATASETS)


def check_root(root, name):
    """A --root that is not a folder, for a CoOp dataset (read from there), said before CLIP loads.
    The mini world is drawn there, so for it a new folder is fine."""
    if is_world(name) or os.path.isdir(root):
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


def crop_scale(name):
    """The default smallest area of the training crops: the dataset's (data.DatasetSpec)."""
    if is_world(name):
        return mini_world.train_crop_scale(name)  # its WORLD_DATASETS entry
    if data.is_path(name):
        return data.DatasetSpec.crop_scale  # your own dataset: Dassl's
    try:
        return data.DATASETS[data.resolve_name(name)].crop_scale
    except ValueError:  # an unknown name is said later, with the known ones (check_dataset)
        return data.DatasetSpec.crop_scale


def say_dataset(args):
    """What the run does with no --dataset, and the world's own crops."""
    if args.dataset is None:
        print("no --dataset given: running in the built-in mini world (world/mini_world.py). For "
              "the real benchmark: python train.py --method mpl --dataset eurosat --root $DATA "
              "--clip ViT-B/16")
    if is_world(args.dataset):
        print(f"mini world: training crops keep at least {args.crop_scale:.0%} of the 32-pixel "
              f"image, then flips (the dataset's crop_scale, world/mini_world.py; --crop-scale; "
              f"Dassl's 0.08 on the benchmarks)")


def benchmark(args, subsample):
    """The few-shot draw over all classes, then the class subsample (data.py)."""
    if is_world(args.dataset):
        return mini_world.load_benchmark(dataset_name(args), args.root, args.shots, args.seed,
                                         subsample)
    if data.is_path(args.dataset):
        key, root, spec = data.own_dataset(args.dataset)
        return data.load_benchmark(key, root, args.shots, args.seed, subsample, spec=spec)
    return data.load_benchmark(args.dataset, args.root, args.shots, args.seed, subsample)


def clip_for(args, real=None):
    """--clip if given; else ViT-B/16 for a real dataset and the mini world's CLIP in the mini world
    (real: which of the two, when the caller knows better than --dataset)."""
    if args.clip:
        return checkpoints.load_clip(args.clip, args.device)
    if real if real is not None else not is_world(args.dataset):
        return checkpoints.load_clip("ViT-B/16", args.device)
    return mini_world.load_world_clip(device=args.device)


def data_fingerprint(args, benchmarks=None):
    """data.split_fingerprint of --dataset under --root, the world drawn there first if it is not
    yet; or of the Benchmarks passed in."""
    if benchmarks is not None:
        return data.benchmark_fingerprint(benchmarks)
    if is_world(args.dataset):
        name = dataset_name(args)
        mini_world.render_world(args.root, datasets=(name,))  # idempotent: a drawn world is checked
        return data.split_fingerprint(name, args.root, mini_world.DATASETS[name])
    if data.is_path(args.dataset):
        return data.split_fingerprint(*data.own_dataset(args.dataset))
    return data.split_fingerprint(args.dataset, args.root)


def run_identity(args, recipe, cfg, precision, clip_fingerprint, benchmarks=None):
    """What a run of these flags computes on this CLIP and these data (rundir.identity): the
    method's config, the precision as resolved, the CLIP's weights fingerprint, the dataset's split
    and class names."""
    ident = rundir.identity(args, recipe, dataclasses.asdict(cfg) if cfg is not None else None,
                            clip_fingerprint, data_fingerprint(args, benchmarks), dataset_name(args))
    ident["precision"] = precision
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
