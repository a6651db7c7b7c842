"""
Datasets for CLIP prompt learning, read the way CoOp reads them and sampled the way Dassl samples them.

All of it in this single file: the 11 base-to-new datasets (ImageNet, Caltech101, OxfordPets, StanfordCars,
Flowers102, Food101, FGVCAircraft, SUN397, DTD, EuroSAT, UCF101) and the four test-only ImageNet variants
(V2, Sketch, A, R), read from an unchanged CoOp `$DATA` tree (CoOp's DATASETS.md; spec: protocol.md sec. 1).
The point is comparability with the published tables, so the parts that decide *which* images a run sees
are copies of Dassl's behaviour, not improvements on it:
- the official split files (`split_zhou_*.json`, FGVC's variant files, ImageNet's `classnames.txt` + folders)
  are required and never regenerated (protocol.md 1.1);
- the few-shot draw is Dassl's `generate_fewshot_dataset` on Python's `random` seeded with the run's seed
  (protocol.md 2.1-2.2), and the base/new split is CoOp's `subsample_classes` (protocol.md 2.4).
Deliberate deviations, each harmless to the comparison: ImageNet file listings are sorted (Dassl used the
unsorted `os.listdir` order, sec. 2.3), and the few-shot cache is JSON with relative paths under
`split_fewshot_ref/` (Dassl's `split_fewshot/*.pkl` hold absolute paths and are never touched here).

Usage:
    bench = load_benchmark("eurosat", root="$DATA", shots=16, seed=1, subsample="base")
    res = clip_model.visual.input_resolution          # 224 for ViT-B/16; a tiny test CLIP may use 32
    train_set = ImageDataset(bench.train, train_transform(res))
    python data.py --check --root $DATA               # what is on disk vs. protocol.md 1.1

Left out: no dataset downloading, no split generation, no Dassl `repeat=True` sampling, no data loaders
(train.py builds those), no reading of Dassl's pickles.
"""

import argparse
import colorsys
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torchvision import transforms as T

# -----------------------------------------------------------------------------
# Items and the benchmark container

# CLIP's own normalisation (protocol.md 3.1); Dassl's configs use the same numbers.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Datum:
    impath: str     # absolute path in everything load_benchmark returns
    label: int      # 0-based; after base/new subsampling, relabelled 0..n_selected-1
    classname: str  # as the split source spells it (e.g. "american_bulldog"); see Benchmark.classnames


@dataclass
class Benchmark:
    name: str               # canonical key of DATASETS, e.g. "eurosat"
    train: list[Datum]      # few-shot (or full) training set; empty for test-only variants
    val: list[Datum]        # few-shot val (min(shots, 4) per class); ImageNet: the test set, as in CoOp
    test: list[Datum]       # always the full test split of the selected classes
    classnames: list[str]   # index == label, "_" already replaced by " " (what every CoOp trainer tokenises)
    template: str           # hand-crafted zero-shot template, protocol.md 1.4

    @property
    def num_classes(self):
        return len(self.classnames)


# -----------------------------------------------------------------------------
# The dataset table: folders, split sources and expected sizes (protocol.md 1.1), templates (1.4)

@dataclass(frozen=True)
class DatasetSpec:
    coop_name: str      # CoOp's cfg DATASET.NAME; also accepted as --dataset
    section: str        # heading of CoOp's DATASETS.md that explains how to prepare it
    dir: str            # $DATA/<dir>
    image_dir: str      # relative to $DATA/<dir>; every relative image path is joined to it
    split_file: str     # the file that defines the split, relative to $DATA/<dir>
    reader: str         # "json" | "fgvc" | "imagenet" | "imagenet_v2" | "imagenet_folders"
    template: str
    classes: int        # expected counts of the full split (protocol.md 1.1), shown by --check
    train: int
    val: int            # ImageNet: 0, its val set is the test set
    test: int

    @property
    def test_only(self):
        return self.reader in ("imagenet_v2", "imagenet_folders", "world_test")


DATASETS = {
    # protocol.md gives ImageNet train as "1.28M"; 1,281,167 is the exact size of the ILSVRC-2012 train set
    "imagenet": DatasetSpec("ImageNet", "ImageNet", "imagenet", "images", "classnames.txt", "imagenet",
                            "a photo of a {}.", 1000, 1281167, 0, 50000),
    "caltech101": DatasetSpec("Caltech101", "Caltech101", "caltech-101", "101_ObjectCategories",
                              "split_zhou_Caltech101.json", "json", "a photo of a {}.", 100, 4128, 1649, 2465),
    "oxford_pets": DatasetSpec("OxfordPets", "OxfordPets", "oxford_pets", "images", "split_zhou_OxfordPets.json",
                               "json", "a photo of a {}, a type of pet.", 37, 2944, 736, 3669),
    "stanford_cars": DatasetSpec("StanfordCars", "StanfordCars", "stanford_cars", "",
                                 "split_zhou_StanfordCars.json", "json", "a photo of a {}.", 196, 6509, 1635, 8041),
    "oxford_flowers": DatasetSpec("OxfordFlowers", "Flowers102", "oxford_flowers", "jpg",
                                  "split_zhou_OxfordFlowers.json", "json", "a photo of a {}, a type of flower.",
                                  102, 4093, 1633, 2463),
    "food101": DatasetSpec("Food101", "Food101", "food-101", "images", "split_zhou_Food101.json", "json",
                           "a photo of {}, a type of food.", 101, 50500, 20200, 30300),
    "fgvc_aircraft": DatasetSpec("FGVCAircraft", "FGVCAircraft", "fgvc_aircraft", "images", "variants.txt", "fgvc",
                                 "a photo of a {}, a type of aircraft.", 100, 3334, 3333, 3333),
    "sun397": DatasetSpec("SUN397", "SUN397", "sun397", "SUN397", "split_zhou_SUN397.json", "json",
                          "a photo of a {}.", 397, 15880, 3970, 19850),
    "dtd": DatasetSpec("DescribableTextures", "DTD", "dtd", "images", "split_zhou_DescribableTextures.json", "json",
                       "{} texture.", 47, 2820, 1128, 1692),
    "eurosat": DatasetSpec("EuroSAT", "EuroSAT", "eurosat", "2750", "split_zhou_EuroSAT.json", "json",
                           "a centered satellite photo of {}.", 10, 13500, 5400, 8100),
    "ucf101": DatasetSpec("UCF101", "UCF101", "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", "json",
                          "a photo of a person doing {}.", 101, 7639, 1898, 3783),
    "imagenet_v2": DatasetSpec("ImageNetV2", "ImageNetV2", "imagenetv2", "imagenetv2-matched-frequency-format-val",
                               "classnames.txt", "imagenet_v2", "a photo of a {}.", 1000, 0, 0, 10000),
    "imagenet_sketch": DatasetSpec("ImageNetSketch", "ImageNet-Sketch", "imagenet-sketch", "images",
                                   "classnames.txt", "imagenet_folders", "a photo of a {}.", 1000, 0, 0, 50889),
    "imagenet_a": DatasetSpec("ImageNetA", "ImageNet-A", "imagenet-adversarial", "imagenet-a", "classnames.txt",
                              "imagenet_folders", "a photo of a {}.", 200, 0, 0, 7500),
    "imagenet_r": DatasetSpec("ImageNetR", "ImageNet-R", "imagenet-rendition", "imagenet-r", "classnames.txt",
                              "imagenet_folders", "a photo of a {}.", 200, 0, 0, 30000),
    # The built-in mini world (last section of this file): drawn into $DATA/<dir> on first use, then read like the
    # CoOp datasets above. Base-to-new, the cross-dataset target, and the domain-shift target (test only).
    "mini_world": DatasetSpec("MiniWorld", "(built in)", "mini_world", "images", "split_zhou_MiniWorld.json",
                              "world", "a photo of a {}.", 36, 1440, 360, 1440),
    "mini_world_xd": DatasetSpec("MiniWorldXD", "(built in)", "mini_world_xd", "images", "split_zhou_MiniWorldXD.json",
                                 "world", "a photo of a {}.", 24, 960, 240, 960),
    "mini_world_shift": DatasetSpec("MiniWorldShift", "(built in)", "mini_world_shift", "images",
                                    "split_zhou_MiniWorldShift.json", "world_test", "a photo of a {}.", 36, 0, 0, 1440),
}

FEWSHOT_CACHE_DIR = "split_fewshot_ref"  # not Dassl's "split_fewshot/", so its pickles are never overwritten
SUBSAMPLE_MODES = ("all", "base", "new")


def _normalise(name):
    return name.lower().replace("_", "").replace("-", "").replace(" ", "")


# Matching ignores case, "_" and "-", so CoOp's config names (OxfordPets, ImageNetV2, ...) and yaml file names
# (imagenetv2, imagenet_sketch, ...) resolve by themselves; only the names that differ in words need an entry.
_ALIASES = {_normalise(k): k for k in DATASETS}
_ALIASES.update({_normalise(s.coop_name): k for k, s in DATASETS.items()})
_ALIASES.update({"flowers102": "oxford_flowers"})  # DATASETS.md's heading for OxfordFlowers


def resolve_name(name):
    """Canonical DATASETS key for a --dataset value (canonical key or CoOp name, any case)."""
    key = _ALIASES.get(_normalise(str(name)))
    if key is None:
        raise ValueError(f"Unknown dataset {name!r} (--dataset). Known datasets: {', '.join(DATASETS)}. "
                         f"CoOp's config names (e.g. OxfordPets, DescribableTextures, ImageNetV2) work too.")
    return key


# -----------------------------------------------------------------------------
# Reading the CoOp tree (protocol.md 1.1-1.2). Readers return Datum with paths *relative* to the image root;
# load_benchmark makes them absolute at the very end, so the cache can store exactly what was sampled.

def _listdir(path):
    # Dassl's listdir_nohidden drops dot-files; we also sort, which Dassl does not do for image files
    # (sec. 2.3: its ImageNet order was whatever os.listdir returned on the machine that wrote preprocessed.pkl).
    return sorted(f for f in os.listdir(path) if not f.startswith("."))


def _subdirs(path):
    return [f for f in _listdir(path) if os.path.isdir(os.path.join(path, f))]


def _sha256(*chunks):
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk if isinstance(chunk, bytes) else chunk.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def _howto(spec):
    return f"see the {spec.section} section of CoOp's DATASETS.md"


def _require_file(spec, ddir, fname, what):
    path = os.path.join(ddir, fname)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Split file not found: {path}. Expected {what} ({_howto(spec)}). It is required: "
                                f"a split made up here would not match the published numbers.")
    return path


def _require_image_root(spec, ddir):
    image_root = os.path.join(ddir, spec.image_dir)
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"Image folder not found: {image_root} (expected $DATA/{spec.dir}/{spec.image_dir} "
                                f"for --dataset {spec.coop_name}); {_howto(spec)}.")
    return image_root


def _check_images(spec, image_root, items, source):
    # Dassl's Datum asserts every image file exists, so an incomplete extraction fails at load time, not
    # mid-training. We do the same, but report all missing files at once.
    missing = [d.impath for d in items if not os.path.isfile(os.path.join(image_root, d.impath))]
    if missing:
        shown = ", ".join(missing[:5])
        raise FileNotFoundError(f"{len(missing)} of {len(items)} images listed in {source} are missing under "
                                f"{image_root}: {shown}{', ...' if len(missing) > 5 else ''}. "
                                f"Re-extract the images; {_howto(spec)}.")


def _check_nonempty(splits, source, names):
    for name in names:
        if not splits[name]:
            raise ValueError(f"The {name!r} split read from {source} is empty; expected the full {name} split "
                             f"of protocol.md 1.1. Check that the file / folders are complete.")


def _read_json(spec, ddir):
    """split_zhou_*.json: {"train"|"val"|"test": [[relpath, label, classname], ...]} (protocol.md 1.2)."""
    what = f"{spec.split_file}, downloaded from the Google Drive link"
    path = _require_file(spec, ddir, spec.split_file, what)
    raw = _read_bytes(path)
    fmt = 'CoOp\'s split format {"train": [[path, label, classname], ...], "val": [...], "test": [...]}'
    try:
        split = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); expected {fmt}.") from None
    splits = {}
    for name in ("train", "val", "test"):
        if not isinstance(split, dict) or not isinstance(split.get(name), list):
            raise ValueError(f"{path} has no {name!r} list; expected {fmt}.")
        # list order is kept: the few-shot sampler groups labels in first-appearance order (sec. 2.2)
        try:
            splits[name] = [Datum(str(p), int(y), str(c)) for p, y, c in split[name]]
        except (TypeError, ValueError):
            raise ValueError(f"{path}: an entry of {name!r} is not [path, label, classname]; expected {fmt}.") from None
    _check_nonempty(splits, path, ("test",) if spec.test_only else ("train", "val", "test"))
    image_root = _require_image_root(spec, ddir)
    for name in ("train", "val", "test"):
        _check_images(spec, image_root, splits[name], f"{path} ({name})")
    return splits, _sha256(raw)


def _read_fgvc(spec, ddir):
    """FGVCAircraft: label = line index in variants.txt; images_variant_<split>.txt lines are '<id> <variant>'."""
    files = {"variants": _require_file(spec, ddir, "variants.txt", "variants.txt of fgvc-aircraft-2013b/data")}
    for name in ("train", "val", "test"):
        fname = f"images_variant_{name}.txt"
        files[name] = _require_file(spec, ddir, fname, f"{fname} of fgvc-aircraft-2013b/data")
    raw = {k: _read_bytes(p) for k, p in files.items()}
    variants = [line.strip() for line in raw["variants"].decode().splitlines() if line.strip()]
    label_of = {v: i for i, v in enumerate(variants)}
    splits = {}
    for name in ("train", "val", "test"):
        items = []
        for line in raw[name].decode().splitlines():
            if not line.strip():
                continue
            imid, _, variant = line.strip().partition(" ")
            if variant not in label_of:
                raise ValueError(f"Variant {variant!r} in {files[name]} is not a line of {files['variants']}.")
            items.append(Datum(imid + ".jpg", label_of[variant], variant))
        splits[name] = items
    _check_nonempty(splits, os.path.join(ddir, "images_variant_*.txt"), ("train", "val", "test"))
    image_root = _require_image_root(spec, ddir)
    for name in ("train", "val", "test"):
        _check_images(spec, image_root, splits[name], files[name])
    # the cache key covers every file that defines the split, in a fixed order
    return splits, _sha256(*(raw[k] for k in ("variants", "train", "val", "test")))


def _read_classnames(spec, ddir):
    """classnames.txt: '<wnid> <class name words...>' per line, in CLIP's ImageNet order (protocol.md 1.2)."""
    if spec.reader == "imagenet":
        what = "classnames.txt, downloaded from the Google Drive link"
    else:
        what = "a copy of $DATA/imagenet/classnames.txt"
    path = _require_file(spec, ddir, "classnames.txt", what)
    names = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                wnid, _, words = line.strip().partition(" ")
                names[wnid] = words
    return names, path


def _read_wnid_folders(split_dir, prefix, names, names_path):
    # Label = index of the wnid in the *sorted* folder list (CoOp's ImageNet, -Sketch, -A, -R readers). Only
    # folders count, which also drops the README.txt that ImageNet-A/-R ship next to their class folders.
    items = []
    for label, wnid in enumerate(_subdirs(split_dir)):
        if wnid not in names:
            raise ValueError(f"Class folder {os.path.join(split_dir, wnid)} has no line in {names_path}.")
        for f in _listdir(os.path.join(split_dir, wnid)):
            items.append(Datum(os.path.join(prefix, wnid, f), label, names[wnid]))
    return items


def _read_imagenet(spec, ddir):
    """ImageNet: images/{train,val}/<wnid>/*; the val set is the test set (and CoOp's "val")."""
    names, names_path = _read_classnames(spec, ddir)
    image_root = _require_image_root(spec, ddir)
    splits = {}
    for name, folder in (("train", "train"), ("test", "val")):
        split_dir = os.path.join(image_root, folder)
        if not os.path.isdir(split_dir):
            raise FileNotFoundError(f"ImageNet {folder} folder not found: {split_dir}; {_howto(spec)}.")
        files = _listdir(split_dir)
        if files and not _subdirs(split_dir):
            raise ValueError(f"{split_dir} is flat ({len(files)} files, no class folders). CoOp expects one "
                             f"folder per wnid, like train/ (val/n01440764/ILSVRC2012_val_*.JPEG); move the val "
                             f"images into wnid folders first (e.g. with the valprep.sh script used by PyTorch's "
                             f"ImageNet example).")
        splits[name] = _read_wnid_folders(split_dir, folder, names, names_path)
    splits["val"] = []
    _check_nonempty(splits, os.path.join(image_root, "{train,val}"), ("train", "test"))
    # Labels are folder indices computed separately for train/ and val/, so both must hold the same wnids.
    train_wnids, val_wnids = _subdirs(os.path.join(image_root, "train")), _subdirs(os.path.join(image_root, "val"))
    if train_wnids != val_wnids:
        raise ValueError(f"{image_root}/train and {image_root}/val hold different class folders "
                         f"({len(train_wnids)} vs {len(val_wnids)}); labels would not match between them.")
    # No split file exists, so the cache key hashes what the sampler reads: classnames.txt + the sorted listing.
    key = _sha256(_read_bytes(names_path), "\n".join(f"{d.impath}\t{d.label}" for d in splits["train"]))
    return splits, key


def _read_imagenet_variant(spec, ddir):
    """ImageNetV2 (folders 0..999 = line i of classnames.txt) and -Sketch/-A/-R (sorted wnid folders)."""
    names, names_path = _read_classnames(spec, ddir)
    image_root = _require_image_root(spec, ddir)
    if spec.reader == "imagenet_v2":
        wnids = list(names)
        absent = [str(y) for y in range(len(wnids)) if not os.path.isdir(os.path.join(image_root, str(y)))]
        if absent:
            raise FileNotFoundError(f"{len(absent)} of {len(wnids)} class folders are missing under {image_root}: "
                                    f"{', '.join(absent[:5])}{', ...' if len(absent) > 5 else ''}; {_howto(spec)}.")
        test = [Datum(os.path.join(str(y), f), y, names[wnid])
                for y, wnid in enumerate(wnids) for f in _listdir(os.path.join(image_root, str(y)))]
    else:
        test = _read_wnid_folders(image_root, "", names, names_path)
    splits = {"train": [], "val": [], "test": test}
    _check_nonempty(splits, image_root, ("test",))
    return splits, None


_READERS = {"json": _read_json, "fgvc": _read_fgvc, "imagenet": _read_imagenet,
            "imagenet_v2": _read_imagenet_variant, "imagenet_folders": _read_imagenet_variant}


def read_splits(key, root):
    """Full train/val/test of one dataset (relative paths) and the split hash used to key the few-shot cache."""
    spec = DATASETS[key]
    ddir = os.path.join(root, spec.dir)
    if not os.path.isdir(ddir) and not spec.reader.startswith("world"):  # the mini world is drawn on first use
        extra = "" if os.path.isdir(root) else f" (--root {root} itself does not exist)"
        raise FileNotFoundError(f"Dataset folder not found: {ddir}{extra}. --dataset {key} expects "
                                f"$DATA/{spec.dir} under --root; {_howto(spec)}.")
    return _READERS[spec.reader](spec, ddir)


# -----------------------------------------------------------------------------
# Few-shot sampling and base/new subsampling, exactly as Dassl/CoOp (protocol.md 2.2, 2.4)

def generate_fewshot(items, num_shots):
    """Dassl's generate_fewshot_dataset(..., repeat=False) on one data source, drawing from the global `random`.

    Labels are visited in first-appearance order (Dassl's defaultdict keeps insertion order), items within a label
    keep the split order, and a label with fewer than num_shots items keeps all of them without a draw.
    """
    by_label = {}
    for item in items:
        by_label.setdefault(item.label, []).append(item)
    out = []
    for group in by_label.values():
        out.extend(random.sample(group, num_shots) if len(group) >= num_shots else group)
    return out


def subsample_classes(*splits, subsample="all"):
    """CoOp's subsample_classes: sorted labels of the first split, first ceil(n/2) = base, rest = new, relabelled."""
    if subsample == "all":
        return splits
    labels = sorted({d.label for d in splits[0]})
    m = math.ceil(len(labels) / 2)
    selected = labels[:m] if subsample == "base" else labels[m:]
    relabel = {y: i for i, y in enumerate(selected)}
    return tuple([Datum(d.impath, relabel[d.label], d.classname) for d in items if d.label in relabel]
                 for items in splits)


# -----------------------------------------------------------------------------
# Few-shot cache: JSON, relative paths, keyed by (dataset, shots, seed, split hash) so it cannot go stale.
# Dassl keys its pickles by (shots, seed) only and stores absolute paths (protocol.md 2.3).

def _cache_path(ddir, key, shots, seed, split_hash):
    return os.path.join(ddir, FEWSHOT_CACHE_DIR, f"{key}-shot_{shots}-seed_{seed}-split_{split_hash}.json")


def _load_cache(path, meta, full):
    """The cached {train, val} or None. Anything unexpected (edited, truncated, from another split) is a miss."""
    try:
        with open(path) as f:
            data = json.load(f)
        if any(data.get(k) != v for k, v in meta.items()):
            return None
        out = {}
        for name in full:  # "train" and "val"; ImageNet only "train"
            items = [Datum(p, int(y), c) for p, y, c in data[name]]
            if not set(items) <= full[name]:
                return None
            out[name] = items
        return out
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(path, meta, sampled):
    # Atomic (temp file + os.replace) so an interrupted or concurrent run never leaves half a file behind.
    # A read-only $DATA (shared cluster storage) is normal: then we just don't cache.
    data = dict(meta, **{k: [[d.impath, d.label, d.classname] for d in v] for k, v in sampled.items()})
    tmp = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


# -----------------------------------------------------------------------------
# The one entry point train.py uses

def load_benchmark(name, root, shots, seed, subsample="all", cache=True):
    """Read one dataset from the CoOp tree under `root` and return its few-shot, base/new-subsampled Benchmark.

    shots: K images per class (>= 1), or None for the full training split (no draw, no cache).
    seed:  the run's seed. Right before the draw this function calls random.seed(seed) on Python's *global*
           `random` and draws nothing from it earlier, so the K-shot sets equal Dassl's for that seed whatever
           the caller did with `random` before (protocol.md 2.1). The global stream is left advanced by the draw,
           as in Dassl; on a cache hit it is not touched at all.
    subsample: "all" | "base" | "new", applied after sampling over all classes (protocol.md 2.4).
    Test-only variants (imagenet_v2/_sketch/_a/_r) return empty train/val and the full test set; `shots` is
    validated but unused, and subsample must be "all".
    """
    key = resolve_name(name)
    spec = DATASETS[key]
    if shots is not None and shots < 1:
        raise ValueError(f"--shots must be >= 1 (got {shots}); pass shots=None for the full training split.")
    if subsample not in SUBSAMPLE_MODES:
        raise ValueError(f"--subsample must be one of {SUBSAMPLE_MODES} (got {subsample!r}).")
    if spec.test_only and subsample != "all":
        raise ValueError(f"--dataset {key} is test-only (all classes); --subsample must be 'all' (got {subsample!r}).")
    root = os.path.abspath(os.path.expanduser(root))
    ddir = os.path.join(root, spec.dir)

    splits, split_hash = read_splits(key, root)
    train, val, test = splits["train"], splits["val"], splits["test"]

    if shots is not None and not spec.test_only:
        if seed is None or seed < 0:
            # CPython's random.seed(-s) equals random.seed(s), and Dassl does not seed at all for s < 0.
            raise ValueError(f"--seed must be an int >= 0 when sampling shots (got {seed}).")
        draws = ("train",) if spec.reader == "imagenet" else ("train", "val")  # CoOp never samples ImageNet val
        meta = {"dataset": key, "shots": shots, "seed": seed, "split_hash": split_hash}
        path = _cache_path(ddir, key, shots, seed, split_hash)
        sampled = _load_cache(path, meta, {k: set(splits[k]) for k in draws}) if cache else None
        if sampled is None:
            random.seed(seed)
            sampled = {"train": generate_fewshot(train, shots)}
            if "val" in draws:
                # second draw on the same stream, after train: keeps parity with Dassl's cached pickles
                sampled["val"] = generate_fewshot(val, min(shots, 4))
            if cache:
                _write_cache(path, meta, sampled)
        train, val = sampled["train"], sampled.get("val", val)

    if spec.reader == "imagenet":
        val = test  # CoOp: "evaluation on the val set, also used as the val set"
    train, val, test = subsample_classes(train, val, test, subsample=subsample)

    image_root = os.path.join(ddir, spec.image_dir)
    train, val, test = ([Datum(os.path.join(image_root, d.impath), d.label, d.classname) for d in items]
                        for items in (train, val, test))
    return Benchmark(key, train, val, test, _classnames(train, val, test), spec.template)


def _classnames(*splits):
    # Dassl builds label -> name from train_x; we take the first name seen over train, val, test (identical for
    # the real splits) so that test-only variants work, and insist on labels 0..n-1 so index == label holds.
    names = {}
    for items in splits:
        for d in items:
            names.setdefault(d.label, d.classname)
    if sorted(names) != list(range(len(names))):
        raise ValueError(f"Labels are not 0..n-1 (found {sorted(names)[:10]}...); the split file is inconsistent.")
    # every CoOp trainer does name.replace("_", " ") before tokenising (protocol.md 1.3)
    return [names[y].replace("_", " ") for y in range(len(names))]


# -----------------------------------------------------------------------------
# Transforms (protocol.md 3.1) and the torch Dataset

def train_transform(resolution, min_scale=0.08):
    """Dassl's train pipeline at `resolution` (224 for ViT-B/16): bicubic RandomResizedCrop(0.08-1) + flip.

    There is no Resize before the crop: Dassl skips it when random_resized_crop is configured. `min_scale` is Dassl's
    INPUT.RRCROP_SCALE[0] (0.08, never overridden by the official configs); train.py raises it for the mini world,
    whose 32-pixel images leave nothing of the object in a crop of 8% of the area (9 x 9 pixels).
    """
    return T.Compose([
        T.RandomResizedCrop(resolution, scale=(min_scale, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(p=0.5),
        T.ToTensor(),
        T.Normalize(CLIP_MEAN, CLIP_STD),
    ])


def test_transform(resolution):
    """Resize shorter side (bicubic) + CenterCrop, i.e. CLIP's own preprocess, at the model's input resolution."""
    return T.Compose([
        T.Resize(resolution, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(resolution),
        T.ToTensor(),
        T.Normalize(CLIP_MEAN, CLIP_STD),
    ])


class ImageDataset(torch.utils.data.Dataset):
    """(image, label, index) for a list of Datum; images are read as RGB, like Dassl's read_image."""

    def __init__(self, items, transform):
        self.items = list(items)
        self.transform = transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        d = self.items[index]
        with Image.open(d.impath) as img:
            image = self.transform(img.convert("RGB"))
        return image, d.label, index


# -----------------------------------------------------------------------------
# The mini world: a procedurally drawn benchmark and a tiny CLIP pre-trained on it (no download needed)
#
# The mini world: a procedurally generated image world and a tiny CLIP pre-trained on it, so that the whole
# prompt-learning pipeline (few-shot sampling, base-to-new, cross-dataset and domain-shift evaluation) runs offline,
# without CLIP weights or datasets, on a laptop CPU in minutes.
#
# A class is a combination of attribute words, e.g. "red striped circle". Images of one class vary in position, size,
# rotation, shade, pattern scale and angle, background and noise, so telling classes apart is a real (small)
# recognition task. Three datasets, written to disk in CoOp's layout, stand in for the three evaluation protocols:
#
#     mini_world        36 classes = 4 colours x 3 patterns x 3 shapes, photographed under warm lamp light.
#                       Base-to-new: the 18 new classes are unseen *combinations* of words that all occur in the
#                       18 base classes (CoOp's rule: sort the labels, the first ceil(n/2) are base).
#     mini_world_xd     24 classes from other words (4 colours x plain/checkered x star/heart/cross) in hazy light:
#                       the cross-dataset target.
#     mini_world_shift  the 36 classes of mini_world as crayon sketches on paper, test split only: the domain-shift
#                       target (our ImageNet-Sketch).
#
# The tiny CLIP is OpenAI's `clip.model.CLIP` (a ViT), stored as a plain state dict and loaded with CLIP's own
# `build_model`, with OpenAI's BPE tokenizer and 77-token context, so method code sees nothing but smaller widths.
# It is pre-trained contrastively (symmetric InfoNCE with a learned temperature, as in Radford et al., "Learning
# Transferable Visual Models From Natural Language Supervision", ICML 2021, arXiv:2103.00020) on varied captions of a
# separate stream of images covering the *whole* world, new classes included: like real CLIP it has seen every
# concept, and only prompt learning is restricted to the base classes. Most pre-training images come through a neutral
# camera, so each dataset's own light is a domain gap that few-shot adaptation can close (see CAMERAS).
#
# Deliberately left out: realism. This is a toy to check that code runs and that prompts learn; its numbers say
# nothing about the real benchmarks.

# -----------------------------------------------------------------------------
# The world's vocabulary. Every word here is a plain English word that OpenAI's BPE tokenizer knows.

# Base RGB in [0, 1]; each image jitters hue, saturation and value around it.
WORLD_COLOURS = {
    "red": (0.85, 0.12, 0.10),
    "green": (0.15, 0.62, 0.20),
    "blue": (0.12, 0.30, 0.85),
    "yellow": (0.95, 0.85, 0.15),
    "purple": (0.55, 0.20, 0.70),
    "orange": (0.98, 0.55, 0.10),
    "pink": (0.98, 0.58, 0.76),
    "black": (0.08, 0.08, 0.08),
}
WORLD_PATTERNS = ["plain", "striped", "dotted", "checkered"]
WORLD_SHAPES = ["circle", "square", "triangle", "star", "heart", "cross"]

# Which words make up each dataset's classes; a class is (colour, pattern, shape), named "colour pattern shape".
# style and camera: how its images look (render_image); split_sizes: images per class in train, val, test.
WORLD_DATASETS = {
    "mini_world": dict(colours=["red", "green", "blue", "yellow"], patterns=["plain", "striped", "dotted"],
                       shapes=["circle", "square", "triangle"],
                       style="photo", camera="lamp", split_sizes=(40, 10, 40)),
    "mini_world_xd": dict(colours=["purple", "orange", "pink", "black"], patterns=["plain", "checkered"],
                          shapes=["star", "heart", "cross"],
                          style="photo", camera="haze", split_sizes=(40, 10, 40)),
    "mini_world_shift": dict(colours=["red", "green", "blue", "yellow"], patterns=["plain", "striped", "dotted"],
                             shapes=["circle", "square", "triangle"],
                             style="sketch", camera=None, split_sizes=(0, 0, 40)),  # test only, like ImageNet-Sketch
}
WORLD_SPLIT_FILES = {"mini_world": "split_zhou_MiniWorld.json", "mini_world_xd": "split_zhou_MiniWorldXD.json",
               "mini_world_shift": "split_zhou_MiniWorldShift.json"}
WORLD_IMAGE_SIZE = 32  # pixels; equals the tiny CLIP's input resolution, so Resize + CenterCrop are no-ops
SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased edges and stripes without any extra dependency
WORLD_VERSION = 2  # bump whenever rendering changes, so render_world() re-renders stale folders

# -----------------------------------------------------------------------------
# Rendering one image (numpy + pillow only)


def _resample(points, n):
    # Points evenly spaced along the closed outline: the sketch style wobbles them, which needs many vertices
    # on straight edges too, not only at the corners.
    p = np.asarray(points, dtype=np.float64)
    seg = np.roll(p, -1, axis=0) - p
    cum = np.concatenate([[0.0], np.cumsum(np.linalg.norm(seg, axis=1))])
    t = np.linspace(0, cum[-1], n, endpoint=False)
    i = np.searchsorted(cum, t, side="right") - 1
    frac = (t - cum[i]) / np.maximum(cum[i + 1] - cum[i], 1e-9)
    return p[i] + frac[:, None] * seg[i]


def _unit_shape(shape):
    """Outline of a shape as (96, 2) points, y pointing down, bounding box centred on 0 and half-size 1."""
    if shape == "circle":
        a = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        p = np.stack([np.cos(a), np.sin(a)], 1)
    elif shape == "square":
        p = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    elif shape == "triangle":
        p = [(0, -1), (1, 0.73), (-1, 0.73)]  # equilateral, apex up
    elif shape == "star":
        a = -np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        p = np.stack([r * np.cos(a), r * np.sin(a)], 1)
    elif shape == "heart":
        t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        p = np.stack([x, y], 1)
    elif shape == "cross":
        w = 0.36
        p = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w),
             (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    p = _resample(p, 96)
    p -= (p.max(0) + p.min(0)) / 2
    return p / np.abs(p).max()


def _pattern_mask(rng, pattern, xx, yy, sketch):
    """Where the pattern's second colour goes, a bool array on the supersampled grid (coordinates in output pixels)."""
    if pattern == "plain":
        return np.zeros(xx.shape, dtype=bool)
    angle = rng.uniform(0, np.pi)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = -xx * np.sin(angle) + yy * np.cos(angle)
    if pattern == "striped":
        period = rng.uniform(3.5, 5.5)
        duty = 0.35 if sketch else 0.5  # pencil lines are thinner than painted stripes
        return (u / period + rng.uniform()) % 1.0 < duty
    if pattern == "dotted":
        spacing = rng.uniform(4.0, 6.0)
        du = (u / spacing + rng.uniform()) % 1.0 - 0.5
        dv = (v / spacing + rng.uniform()) % 1.0 - 0.5
        return du ** 2 + dv ** 2 < 0.28 ** 2
    if pattern == "checkered":
        cell = rng.uniform(3.0, 4.5)
        return (np.floor(u / cell + rng.uniform()) + np.floor(v / cell + rng.uniform())) % 2 == 0
    raise ValueError(f"unknown pattern {pattern!r}")


def _jitter_colour(rng, rgb):
    h, s, v = colorsys.rgb_to_hsv(*rgb)
    h = (h + rng.uniform(-0.025, 0.025)) % 1.0
    s = min(1.0, s * rng.uniform(0.8, 1.1))
    v = min(1.0, v * rng.uniform(0.8, 1.1) + rng.uniform(0.0, 0.05))
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32)


def _smooth_field(rng, xx, yy, amplitude):
    # Two random low-frequency waves: a cheap stand-in for uneven lighting and cloudy backgrounds.
    field = np.zeros(xx.shape, dtype=np.float32)
    for _ in range(2):
        fx, fy = rng.uniform(-0.08, 0.08, size=2)
        field += np.sin(2 * np.pi * (fx * xx + fy * yy) + rng.uniform(0, 2 * np.pi)).astype(np.float32)
    return amplitude * field / 2


def _downsample(mask, k):
    # box filter k x k: the fraction of each output pixel that a supersampled mask covers (anti-aliasing)
    S = mask.shape[0] // k
    return mask.reshape(S, k, S, k).mean(axis=(1, 3))


# A camera is how a dataset's pictures were taken: colour gains (the light's colour), contrast, a grey offset (haze)
# and sensor noise. Each benchmark has its own, as real ones do (satellite views, studio shots, texture close-ups),
# while 70% of the pre-training images come through a neutral camera and the rest through random ones. Without
# this gap there was nothing to adapt to: with every image neutral, the tiny CLIP's zero-shot classifier (87% on
# mini_world base) beat a 40-shot linear probe on its own image features (85%), and deep visual prompts trained on
# 16 shots only got back to where they started. With it, zero-shot drops to ~73% and the same prompts reach ~81%
# on base and new classes alike, which is the kind of headroom prompt learning has on real benchmarks.
WORLD_CAMERAS = {
    "lamp": dict(gain=(1.0, 0.82, 0.55), contrast=0.8, offset=(0.06, 0.04, 0.0), noise=0.04),  # warm indoor light
    "haze": dict(gain=(0.92, 0.96, 1.0), contrast=0.55, offset=(0.3, 0.3, 0.3), noise=0.03),  # bright, washed out
}


def random_camera(rng):
    """A camera of the pre-training stream's 'web': random light colour, contrast, haze and noise."""
    contrast = rng.uniform(0.5, 1.0)
    return dict(gain=tuple(rng.uniform(0.55, 1.05, size=3)), contrast=contrast,
                offset=tuple(rng.uniform(0, 1 - contrast) + rng.uniform(0, 0.05, size=3)), noise=rng.uniform(0, 0.06))


def render_image(rng, colour, pattern, shape, *, style="photo", camera=None, size=WORLD_IMAGE_SIZE):
    """One (size, size, 3) uint8 image of a `colour` `pattern` `shape`, drawn with random nuisances from `rng`.

    style "photo": a filled shape painted with its pattern in a contrasting ink, on a muted, cloudy background.
    style "sketch": the same object as a wobbly crayon outline on paper, the pattern drawn in the object's colour.
    camera: None (neutral) or a dict like WORLD_CAMERAS["lamp"], applied last.
    """
    if style not in ("photo", "sketch"):
        raise ValueError(f"unknown style {style!r}")
    S, k = size, SUPERSAMPLE
    sketch = style == "sketch"
    # Only the masks (shape, outline, pattern) are drawn at k x the resolution; colours are smooth, so they are
    # composited at the output resolution from the masks' coverage. This keeps one image at about 1 ms.
    c = (np.arange(S, dtype=np.float32) + 0.5)
    x1, y1 = np.meshgrid(c, c)  # output pixel centres
    ck = (np.arange(S * k, dtype=np.float32) + 0.5) / k
    xk, yk = np.meshgrid(ck, ck)  # supersampled pixel centres, in output pixels

    # background
    if sketch:
        paper = rng.uniform(0.88, 1.0) * np.array([1.0, rng.uniform(0.96, 1.0), rng.uniform(0.88, 1.0)])
        bg = paper[None, None, :] + _smooth_field(rng, x1, y1, 0.03)[..., None]
    else:
        grey = rng.uniform(0.3, 0.85)
        tint = rng.normal(0, 0.05, size=3)
        bg = (grey + tint)[None, None, :] + _smooth_field(rng, x1, y1, rng.uniform(0.0, 0.12))[..., None]

    # object geometry: size, rotation, position (kept fully inside the image)
    radius = rng.uniform(0.22, 0.40) * S
    theta = np.deg2rad(rng.uniform(-20, 20))
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    pts = _unit_shape(shape) @ rot.T * radius
    lo, hi = -pts.min(0), S - pts.max(0)
    centre = rng.uniform(lo, np.maximum(lo, hi))
    if sketch:
        # a hand-drawn outline: smooth random wobble of about half a pixel
        n = len(pts)
        wobble = sum(rng.normal(0, 0.35, size=(1, 2)) * np.sin(2 * np.pi * f * np.arange(n)[:, None] / n
                                                                + rng.uniform(0, 2 * np.pi)) for f in (2, 3, 5))
        pts = pts + wobble
    poly = [tuple(p) for p in (pts + centre) * k]
    mask_img = Image.new("L", (S * k, S * k), 0)
    ImageDraw.Draw(mask_img).polygon(poly, fill=255)
    inside = np.asarray(mask_img, dtype=np.float32) / 255.0
    pat = _pattern_mask(rng, pattern, xk, yk, sketch)
    a_fill = _downsample(inside * ~pat, k)[..., None]  # coverage by the object's own colour
    a_pat = _downsample(inside * pat, k)[..., None]  # coverage by the pattern

    fill = _jitter_colour(rng, WORLD_COLOURS[colour])
    if sketch:
        outline_img = Image.new("L", (S * k, S * k), 0)
        ImageDraw.Draw(outline_img).line(poly + [poly[0]], fill=255, width=int(rng.integers(5, 8)), joint="curve")
        a_line = _downsample(np.asarray(outline_img, dtype=np.float32) / 255.0, k)[..., None]
        a_pat = a_pat * rng.uniform(0.7, 0.95)  # crayon does not cover the paper fully
        img = bg * (1 - a_pat) + fill * a_pat
        img = img * (1 - a_line) + (fill * 0.85) * a_line
    else:
        # the pattern's second colour contrasts with the fill: dark ink on light colours, light ink on dark ones
        luminance = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]
        ink_grey = rng.uniform(0.05, 0.2) if luminance > 0.55 else rng.uniform(0.85, 1.0)
        ink = 0.8 * ink_grey + 0.2 * fill
        light = (1 + _smooth_field(rng, x1, y1, 0.1))[..., None]  # uneven lighting on the object
        img = bg * (1 - a_fill - a_pat) + (fill * a_fill + ink * a_pat) * light

    img = img * rng.uniform(0.9, 1.1) + rng.normal(0, rng.uniform(0.005, 0.03), size=img.shape)
    if camera is not None:
        gain = np.asarray(camera["gain"]) * rng.uniform(0.95, 1.05, size=3)  # the light varies a little per shot
        img = img * gain * camera["contrast"] + np.asarray(camera["offset"])
        img = img + rng.normal(0, camera["noise"], size=img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


# -----------------------------------------------------------------------------
# The three datasets, written to disk in CoOp's layout

WORLD_DATASET_IDS = {"mini_world": 1, "mini_world_xd": 2, "mini_world_shift": 3}  # mixed into every image's seed
PRETRAIN_STREAM_ID = 100  # the pre-training images come from their own seed stream, never from a benchmark split


def world_classes(name):
    """The classes of dataset `name` in label order: a list of (classname, (colour, pattern, shape)).

    For mini_world the labels are ordered so that CoOp's base/new rule (sort the labels, the first ceil(n/2) are
    base) gives a checkerboard over the attribute grid: a class is base when the sum of its attribute indices is
    even. Every colour-pattern, colour-shape and pattern-shape pair then occurs in some base class, so each new class
    is an unseen *combination* of words that prompt learning has seen, the compositional analogue of "new classes".
    """
    cfg = WORLD_DATASETS[name]
    grid = [(ci + pi + si, (c, p, s)) for ci, c in enumerate(cfg["colours"]) for pi, p in enumerate(cfg["patterns"])
            for si, s in enumerate(cfg["shapes"])]
    # stable sort on parity only: base (even) first, each half in colour-pattern-shape order
    ordered = [attrs for parity, attrs in sorted(grid, key=lambda g: g[0] % 2)]
    return [(" ".join(attrs), attrs) for attrs in ordered]


def base_new_labels(n):
    """CoOp's subsample_classes rule: sorted labels, the first ceil(n/2) are base, the rest new."""
    m = math.ceil(n / 2)
    return list(range(m)), list(range(m, n))


def _manifest(name, seed):
    # everything the images depend on besides the code itself, which WORLD_VERSION stands for
    cfg = dict(WORLD_DATASETS[name], name=name, seed=seed, version=WORLD_VERSION, image_size=WORLD_IMAGE_SIZE,
               supersample=SUPERSAMPLE, classes=[c for c, _ in world_classes(name)], split_file=WORLD_SPLIT_FILES[name],
               image_dir="images", rgb={c: WORLD_COLOURS[c] for c in WORLD_DATASETS[name]["colours"]},
               camera_settings=WORLD_CAMERAS.get(WORLD_DATASETS[name]["camera"]))
    cfg["hash"] = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]
    return cfg


def _render_dataset(root, name, seed):
    out = os.path.join(root, name)
    manifest_path = os.path.join(out, "world_manifest.json")
    manifest = _manifest(name, seed)
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            if json.load(f).get("hash") == manifest["hash"]:
                return out, False  # already rendered with this generator version and seed
    elif os.path.isdir(out) and os.listdir(out):
        # not ours (no manifest): refuse rather than mix our files into someone's folder
        raise FileExistsError(f"{out} exists and was not made by render_world(); move it or pick another root")

    # Render into a temporary folder next to the target, then move the finished pieces in, so an interrupted
    # render never leaves a folder that looks complete. Only `images/`, the split file and the manifest are ours;
    # anything else in `out` (e.g. the loader's split_fewshot/ cache) is left alone.
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=root)
    try:
        split = {"train": [], "val": [], "test": []}
        cfg = WORLD_DATASETS[name]
        camera = WORLD_CAMERAS[cfg["camera"]] if cfg["camera"] else None
        n_train, n_val, n_test = cfg["split_sizes"]
        for label, (classname, (colour, pattern, shape)) in enumerate(world_classes(name)):
            class_dir = classname.replace(" ", "_")
            os.makedirs(os.path.join(tmp, "images", class_dir))
            for i in range(n_train + n_val + n_test):
                # one RNG per image, keyed by (seed, dataset, class, index): order-independent and reproducible
                rng = np.random.default_rng([seed, WORLD_DATASET_IDS[name], label, i])
                img = render_image(rng, colour, pattern, shape, style=cfg["style"], camera=camera)
                impath = f"{class_dir}/{i:04d}.png"
                Image.fromarray(img).save(os.path.join(tmp, "images", impath))
                key = "train" if i < n_train else "val" if i < n_train + n_val else "test"
                split[key].append([impath, label, classname])
        with open(os.path.join(tmp, WORLD_SPLIT_FILES[name]), "w") as f:
            json.dump(split, f)

        os.makedirs(out, exist_ok=True)
        if os.path.exists(manifest_path):  # a stale render of ours: replace it
            os.remove(manifest_path)
            shutil.rmtree(os.path.join(out, "images"), ignore_errors=True)
        os.replace(os.path.join(tmp, "images"), os.path.join(out, "images"))
        os.replace(os.path.join(tmp, WORLD_SPLIT_FILES[name]), os.path.join(out, WORLD_SPLIT_FILES[name]))
        with open(manifest_path, "w") as f:  # written last: its presence means the render is complete
            json.dump(manifest, f, indent=1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, True


def render_world(root, seed=0, datasets=tuple(WORLD_DATASETS)):
    """Write the mini world datasets under `root` in CoOp's layout and return {name: folder}.

        <root>/mini_world/images/<class_dir>/<i>.png        class_dir = classname with "_" for spaces
        <root>/mini_world/split_zhou_MiniWorld.json         {"train"|"val"|"test": [[impath, label, classname], ...]}
        <root>/mini_world/world_manifest.json               generator version, seed and config (idempotency)

    impath is relative to the image root `<root>/<dataset>/images`. Labels are 0-based. mini_world_shift has a test
    split only (train and val are empty lists), like ImageNet-Sketch. A dataset whose manifest matches this
    generator version and seed is skipped, so calling this at every start is cheap.
    """
    folders = {}
    for name in datasets:
        folders[name], rendered = _render_dataset(root, name, seed)
        if rendered:
            print(f"rendered {name} to {folders[name]}")
    return folders


# -----------------------------------------------------------------------------
# Captions for pre-training: full and partial descriptions in several phrasings, like alt-text on the web

PHOTO_TEMPLATES = ["a photo of a {}.", "a {}.", "an image of a {}.", "a picture of a {}.", "this is a {}.",
                   "a close-up photo of a {}.", "a {} on a background.", "{}."]
SKETCH_TEMPLATES = ["a sketch of a {}.", "a drawing of a {}.", "a crayon drawing of a {}.", "a doodle of a {}."]
PATTERN_NOUNS = {"striped": "stripes", "dotted": "dots", "checkered": "checks"}


def make_caption(rng, colour, pattern, shape, style="photo"):
    """A random caption of one image: 60% name all three attributes, 40% only some of them."""
    r = rng.uniform()
    p = "" if pattern == "plain" and rng.uniform() < 0.5 else pattern + " "  # "plain" is often left unsaid
    if r < 0.45:
        phrase = f"{colour} {p}{shape}"
    elif r < 0.52:
        phrase = f"{p}{colour} {shape}"  # the other natural English order
    elif r < 0.60:
        phrase = f"{colour} {shape} with {PATTERN_NOUNS[pattern]}" if pattern != "plain" else f"plain {colour} {shape}"
    else:  # partial descriptions: the rest of the batch holds many images that match them too (CLIP's noise)
        phrase = [f"{colour} {shape}", f"{pattern} {shape}", f"{colour} {pattern} shape", f"{colour} shape",
                  f"{shape}", f"{pattern} shape", f"{colour} object", f"{pattern} {colour} thing"][rng.integers(8)]
    templates = SKETCH_TEMPLATES if style == "sketch" and rng.uniform() < 0.6 else PHOTO_TEMPLATES
    caption = templates[rng.integers(len(templates))].format(phrase)
    if rng.uniform() < 0.75:  # mostly proper English ("an orange ..."); sometimes not, as templates often are not
        caption = re.sub(r"\ba (?=[aeiou])", "an ", caption)
    return caption


def pretrain_sample(seed, i):
    """Image i of the pre-training stream and its (colour, pattern, shape, style); the captions are drawn anew
    every time the image is used. Attributes are uniform over the whole world, so every combination occurs."""
    rng = np.random.default_rng([seed, PRETRAIN_STREAM_ID, i])
    colour = list(WORLD_COLOURS)[rng.integers(len(WORLD_COLOURS))]
    pattern = WORLD_PATTERNS[rng.integers(len(WORLD_PATTERNS))]
    shape = WORLD_SHAPES[rng.integers(len(WORLD_SHAPES))]
    style = "sketch" if rng.uniform() < 0.15 else "photo"
    camera = random_camera(rng) if style == "photo" and rng.uniform() < 0.3 else None
    return render_image(rng, colour, pattern, shape, style=style, camera=camera), (colour, pattern, shape, style)


# -----------------------------------------------------------------------------
# The tiny CLIP: OpenAI's architecture at toy size, pre-trained on the world's captions

WORLD_CLIP_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "mini_world_clip.pt")


@dataclass
class WorldClipConfig:
    # architecture: clip.model.CLIP's arguments; build_model() infers all of them back from the state dict
    embed_dim: int = 64
    image_resolution: int = WORLD_IMAGE_SIZE
    vision_layers: int = 4
    vision_width: int = 128  # != transformer_width, as in ViT-B/16 (768 vs 512); clip.model uses width // 64 heads
    vision_patch_size: int = 8  # 4 x 4 patches + CLS = 17 tokens (ViT-B/16: 14 x 14 + 1 = 197)
    context_length: int = 77  # CLIP's, so clip.tokenize and every prompt learner work unchanged
    vocab_size: int = 49408  # OpenAI's BPE vocabulary; the table is 49408 x 64 = 6.3 MB of the fp16 file
    transformer_width: int = 64  # 1 head
    transformer_layers: int = 4
    # pre-training
    seed: int = 0
    pool_size: int = 16384  # pre-training images, rendered once (~12 s); captions are re-drawn at every use
    steps: int = 1400
    batch_size: int = 256
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1


def _import_clip():
    # Imported where used (`import clip` takes seconds), through clip_layers, which silences its pkg_resources warning.
    import clip_layers
    return clip_layers.clip


def build_tiny_clip(cfg):
    clip = _import_clip()
    heads = cfg.transformer_width // 64  # what build_model() assumes; a different count would load but misbehave
    return clip.model.CLIP(cfg.embed_dim, cfg.image_resolution, cfg.vision_layers, cfg.vision_width,
                           cfg.vision_patch_size, cfg.context_length, cfg.vocab_size, cfg.transformer_width,
                           heads, cfg.transformer_layers)


def images_to_tensor(images):
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float, normalised as CLIP's preprocess does (images are already at size)."""
    x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def encode_text_short(model, tokens):
    """model.encode_text(tokens), computed on the first L = (last EOT position + 1) tokens only.

    The text transformer is causal and CLIP pools the EOT token, so the 77 - L padding positions cannot change the
    result; skipping them makes pre-training ~5x cheaper on the text side. The price: positional rows past the
    longest caption (14 tokens) are never trained. In practice the trained model ignores filler words and positions
    (zero-shot accuracy is the same with "a photo of a {}." and with 16 "X" tokens in front of the class name),
    so longer prompts still work.
    """
    eot = tokens.argmax(dim=-1)  # the EOT token has the largest id
    L = int(eot.max()) + 1
    x = model.token_embedding(tokens[:, :L]) + model.positional_embedding[:L]  # (N, L, D)
    x = x.permute(1, 0, 2)  # NLD -> LND
    mask = model.build_attention_mask()[:L, :L]
    for block in model.transformer.resblocks:
        h = block.ln_1(x)
        x = x + block.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        x = x + block.mlp(block.ln_2(x))
    x = model.ln_final(x.permute(1, 0, 2))  # LND -> NLD
    return x[torch.arange(x.shape[0]), eot] @ model.text_projection


def _pretrain_lr(step, cfg):
    # 1) linear warmup, 2) cosine decay to 0 (nanoGPT's _pretrain_lr, CLIP's schedule)
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


def pretrain_world_clip(path=WORLD_CLIP_PATH, cfg=None):
    """Pre-train the tiny CLIP on the world's captions and save a plain fp16 state dict at `path`.

    Deterministic from cfg.seed for a given machine and thread count: the images, captions and batch order come
    from seeded numpy generators and the weights from torch.manual_seed, but float sums in multi-threaded CPU
    kernels may differ between machines or thread counts, so a rerun elsewhere gives close, not identical, weights.
    """
    cfg = cfg or WorldClipConfig()
    clip = _import_clip()
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    model = build_tiny_clip(cfg)  # fp32 on the CPU
    print(cfg)
    print(f"tiny CLIP: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")

    samples = [pretrain_sample(cfg.seed, i) for i in range(cfg.pool_size)]
    pool = images_to_tensor([img for img, _ in samples])
    attrs = [a for _, a in samples]
    print(f"rendered {cfg.pool_size} pre-training images in {time.time() - t0:.1f} s")

    # CLIP's recipe: AdamW with weight decay on matrices only (not on gains, biases, embeddings or the temperature)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    rng = np.random.default_rng([cfg.seed, PRETRAIN_STREAM_ID, 1])  # batch order, captions, flips
    order = []
    model.train()
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = _pretrain_lr(step, cfg)
        if len(order) < cfg.batch_size:
            order = np.concatenate([order, rng.permutation(cfg.pool_size)]).astype(np.int64)
        idx, order = order[:cfg.batch_size], order[cfg.batch_size:]
        images = pool[idx]
        flip = torch.as_tensor(rng.uniform(size=len(idx)) < 0.5)  # every shape here is left-right symmetric
        images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
        tokens = clip.tokenize([make_caption(rng, *attrs[i]) for i in idx])

        image_features = F.normalize(model.encode_image(images), dim=-1)
        text_features = F.normalize(encode_text_short(model, tokens), dim=-1)
        logits = model.logit_scale.exp() * image_features @ text_features.t()  # (B, B)
        target = torch.arange(len(idx))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2  # symmetric InfoNCE

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP clips the temperature at 100
        if step % 50 == 0 or step == cfg.steps - 1:
            print(f"step {step:5d} | loss {loss.item():.3f} | logit scale {model.logit_scale.exp().item():.1f} "
                  f"| lr {_pretrain_lr(step, cfg):.2e} | {time.time() - t0:.0f} s")

    # fp16 storage halves the file (10 MB budget); load_world_clip() returns fp32 again.
    state_dict = {k: v.detach().half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(state_dict, path)
    print(f"saved {path} ({os.path.getsize(path) / 1e6:.1f} MB) after {time.time() - t0:.0f} s")
    return path


def load_world_clip(path=None, device="cpu"):
    """The shipped tiny CLIP, through CLIP's own loading path, as a frozen fp32 model in eval mode."""
    import clip_layers
    state_dict = torch.load(path or WORLD_CLIP_PATH, map_location="cpu", weights_only=True)
    return clip_layers.freeze(clip_layers.clip.model.build_model(state_dict).float().to(device))


# -----------------------------------------------------------------------------
# Zero-shot evaluation


def read_world_split(root, name):
    with open(os.path.join(root, name, WORLD_SPLIT_FILES[name])) as f:
        return json.load(f)


@torch.no_grad()
def zero_shot_accuracy(model, root, name="mini_world", split="test", classes="all", template="a photo of a {}.",
                       max_per_class=None, batch_size=500):
    """Top-1 accuracy (%) of zero-shot CLIP on a rendered split, with CoOp's base/new relabelling.

    classes: "all", "base" or "new" (sorted labels, first ceil(n/2) are base). Uses the stock model.encode_image,
    model.encode_text and clip.tokenize, so it measures exactly what a prompt learner starts from.
    """
    if classes not in ("all", "base", "new"):
        raise ValueError(f"classes must be 'all', 'base' or 'new', not {classes!r}")
    clip = _import_clip()
    items = read_world_split(root, name)[split]
    names = dict((label, classname) for _, label, classname in items)
    labels = sorted(names)
    if classes != "all":
        base, new = base_new_labels(len(labels))
        labels = [labels[i] for i in (base if classes == "base" else new)]
    relabel = {label: i for i, label in enumerate(labels)}
    kept, per_class = [], {}
    for impath, label, _ in items:
        if label in relabel and per_class.get(label, 0) < (max_per_class or len(items)):
            per_class[label] = per_class.get(label, 0) + 1
            kept.append((impath, relabel[label]))

    device = next(model.parameters()).device
    prompts = [template.format(names[label].replace("_", " ")) for label in labels]
    text_features = F.normalize(model.encode_text(clip.tokenize(prompts).to(device)).float(), dim=-1)
    correct = 0
    for i in range(0, len(kept), batch_size):
        chunk = kept[i:i + batch_size]
        images = [np.asarray(Image.open(os.path.join(root, name, "images", p)).convert("RGB")) for p, _ in chunk]
        image_features = F.normalize(model.encode_image(images_to_tensor(images).to(device)).float(), dim=-1)
        pred = (image_features @ text_features.t()).argmax(dim=-1).cpu()
        correct += (pred == torch.tensor([y for _, y in chunk])).sum().item()
    return 100.0 * correct / len(kept)


def zero_shot_report(model, root):
    """Zero-shot accuracy on every rendered dataset, base and new where it applies, next to chance."""
    rows = []
    for name in WORLD_DATASETS:
        if not os.path.exists(os.path.join(root, name, WORLD_SPLIT_FILES[name])):
            continue
        n = len(world_classes(name))
        base, new = base_new_labels(n)
        for classes, k in [("all", n), ("base", len(base)), ("new", len(new))]:
            acc = zero_shot_accuracy(model, root, name, classes=classes)
            rows.append((name, classes, acc, 100.0 / k))
            print(f"{name:18s} {classes:5s} {acc:6.1f}%  (chance {100.0 / k:.1f}%, {k} classes)")
    return rows


# -----------------------------------------------------------------------------


def _read_world(spec, ddir):
    """A mini-world dataset: drawn on first use (seconds; idempotent), then read as any split_zhou_*.json dataset."""
    render_world(os.path.dirname(ddir), datasets=(spec.dir,))
    return _read_json(spec, ddir)


_READERS.update(world=_read_world, world_test=_read_world)


# -----------------------------------------------------------------------------
# `python data.py --check --root $DATA`: what is on disk, against protocol.md 1.1

def check(root, names=None, out=print):
    """Print one row per dataset (found / missing / error, counts found vs expected); return the rows."""
    root = os.path.abspath(os.path.expanduser(root))
    rows, errors = [], []
    for key in (names or [k for k, v in DATASETS.items() if not v.reader.startswith("world")]):
        key = resolve_name(key)
        spec = DATASETS[key]
        expected = {"classes": spec.classes, "train": spec.train, "val": spec.val, "test": spec.test}
        found = None
        if not os.path.isdir(os.path.join(root, spec.dir)):
            status = "missing"
        else:
            try:
                splits, _ = read_splits(key, root)
                labels = {d.label for items in splits.values() for d in items}
                found = {"classes": len(labels), **{k: len(v) for k, v in splits.items()}}
                status = "ok" if found == expected else "counts differ"
            except (OSError, ValueError) as e:
                status = "error"
                errors.append(f"{key}: {e}")
        rows.append({"dataset": key, "dir": spec.dir, "status": status, "found": found, "expected": expected})

    def cell(row, k):
        if row["expected"][k] == 0 and (row["found"] is None or row["found"][k] == 0):
            return "= test" if (k == "val" and row["dataset"] == "imagenet") else "-"
        got = "-" if row["found"] is None else str(row["found"][k])
        return f"{got}/{row['expected'][k]}"

    out(f"root: {root}    (cells are found/expected)")
    out(f"{'dataset':<16} {'$DATA/<dir>':<22} {'status':<14} {'classes':>10} {'train':>16} {'val':>12} {'test':>12}")
    for r in rows:
        out(f"{r['dataset']:<16} {r['dir']:<22} {r['status']:<14} {cell(r, 'classes'):>10} {cell(r, 'train'):>16} "
            f"{cell(r, 'val'):>12} {cell(r, 'test'):>12}")
    for e in errors:
        out(f"error: {e}")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description="CoOp dataset tree checks / few-shot split preview.")
    parser.add_argument("--root", default=os.environ.get("DATA"), help="the CoOp $DATA folder (default: $DATA)")
    parser.add_argument("--check", action="store_true", help="table of every dataset against protocol.md 1.1")
    parser.add_argument("--dataset", nargs="*", help="restrict to these datasets (default: all for --check)")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--subsample", default="all", choices=SUBSAMPLE_MODES)
    parser.add_argument("--render-world", action="store_true", help="draw the mini world's three datasets under --root")
    parser.add_argument("--pretrain-world-clip", action="store_true", help="pre-train the mini world's tiny CLIP and "
                        "write it to --weights, replacing the shipped file by default (~6 min on 2 CPU cores; the "
                        "same bytes on the same machine), then print its zero-shot accuracy")
    parser.add_argument("--weights", default=WORLD_CLIP_PATH, help="the tiny CLIP file to write or read")
    args = parser.parse_args(argv)
    if args.pretrain_world_clip:
        pretrain_world_clip(args.weights)
        with tempfile.TemporaryDirectory() as tmp:
            render_world(args.root or tmp)
            zero_shot_report(load_world_clip(args.weights), args.root or tmp)
        return 0
    if args.root is None:
        parser.error("--root is required (or set $DATA)")
    if args.render_world:
        render_world(args.root)
        return 0
    if args.check:
        rows = check(args.root, args.dataset)
        return 1 if any(r["status"] == "error" for r in rows) else 0
    if not args.dataset:
        parser.error("give --check, or --dataset NAME to preview its few-shot split")
    for name in args.dataset:
        b = load_benchmark(name, args.root, args.shots, args.seed, args.subsample)
        print(f"{b.name}: {b.num_classes} classes, train {len(b.train)}, val {len(b.val)}, test {len(b.test)}; "
              f"template {b.template!r}; first classes: {', '.join(b.classnames[:5])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
