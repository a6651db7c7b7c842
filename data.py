"""
Datasets for CLIP prompt learning, read the way CoOp reads them and sampled the way Dassl samples
them.

All of it in this single file: the 11 base-to-new datasets (ImageNet, Caltech101, OxfordPets, StanfordCars,
Flowers102, Food101, FGVCAircraft, SUN397, DTD, EuroSAT, UCF101) and the four test-only ImageNet variants
(V2, Sketch, A, R), read from an unchanged CoOp `$DATA` tree (as CoOp's DATASETS.md lays it out);
the built-in mini world's six (world/mini_world.py), drawn under --root the first time one is read;
and a folder of your own (--dataset PATH).
The point is comparability with the published tables, so the parts that decide *which* images a run sees
are copies of Dassl's behaviour, not improvements on it:
- the official split files (`split_zhou_*.json`, FGVC's variant files, ImageNet's `classnames.txt` + folders)
  are required and never regenerated;
- the few-shot draw is Dassl's `generate_fewshot_dataset` on Python's `random` seeded with the run's seed,
  and the base/new split is CoOp's `subsample_classes`.
Deliberate deviations, each harmless to the comparison: ImageNet file listings are sorted (Dassl used the
unsorted `os.listdir` order), and the few-shot cache is a JSON record with relative paths under
`split_fewshot_ref/`, checked against the draw and never trusted (Dassl's `split_fewshot/*.pkl` hold absolute paths
and are never touched here).

Usage:
    bench = load_benchmark("eurosat", root="$DATA", shots=16, seed=1, subsample="base")
    res = clip_model.visual.input_resolution          # 224 for ViT-B/16; a tiny test CLIP may use 32
    loader = make_loader(bench.train, train_transform(res), batch_size=4, train=True, workers=0)
    python data.py --check --root $DATA               # what is on disk, against the expected counts

Left out: no dataset downloading, no split generation, no Dassl `repeat=True` sampling, no reading
of Dassl's pickles.
"""

import argparse
import difflib
import hashlib
import json
import math
import os
import random
import tempfile
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from world import mini_world

# --------------------------------------------------------------------------------------------------
# Items and the benchmark container

# CLIP's own normalisation; Dassl's configs use the same numbers.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Datum:
    impath: str     # absolute path in everything load_benchmark returns
    label: int      # 0-based; after base/new subsampling, relabelled 0..n_selected-1
    # as the split source spells it (e.g. "american_bulldog"); see Benchmark.classnames
    classname: str


@dataclass
class Benchmark:
    name: str               # canonical key of DATASETS, e.g. "eurosat"
    train: list[Datum]      # few-shot (or full) training set; empty for test-only variants
    val: list[Datum]  # few-shot val (min(shots, 4) per class); ImageNet: the test set, as in CoOp
    test: list[Datum]       # always the full test split of the selected classes
    # index == label, "_" already replaced by " " (what every CoOp trainer tokenises)
    classnames: list[str]
    template: str           # CoOp's hand-crafted zero-shot template of the dataset
    # the file (or folder) that defines the classes, for messages; None when built in memory
    source: str = None

    @property
    def num_classes(self):
        return len(self.classnames)


# --------------------------------------------------------------------------------------------------
# The dataset table: folders, split sources and expected sizes, zero-shot templates

@dataclass(frozen=True)
class DatasetSpec:
    coop_name: str      # CoOp's cfg DATASET.NAME; also accepted as --dataset
    section: str        # heading of CoOp's DATASETS.md that explains how to prepare it
    dir: str            # $DATA/<dir>
    image_dir: str      # relative to $DATA/<dir>; every relative image path is joined to it
    split_file: str     # the file that defines the split, relative to $DATA/<dir>
    reader: str         # "json" | "fgvc" | "imagenet" | "imagenet_v2" | "imagenet_folders"
    template: str
    classes: int        # expected counts of the full split, shown by --check
    train: int
    val: int            # ImageNet: 0, its val set is the test set
    test: int
    crop_scale: float = 0.08  # smallest area of the training RandomResizedCrop (Dassl's default)
    clip: str = "ViT-B/16"    # the CLIP a run on it loads when no --clip is given

    @property
    def test_only(self):  # ImageNet-V2/-Sketch/-A/-R: a test split and nothing to train on
        return self.train == 0


DATASETS = {
    # 1,281,167: the exact size of the ILSVRC-2012 train set
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
}

# The built-in mini world (world/mini_world.py): small datasets in CoOp's layout and a small CLIP
# of their own, so everything runs offline. read_splits reads them as it reads CoOp's;
# load_benchmark and split_fingerprint draw one under `root` first if it is not there yet.
BUILT_IN = "(built in)"  # DatasetSpec.section of the mini world's datasets
WORLD = {name: DatasetSpec(section=BUILT_IN, clip=mini_world.WORLD_CLIP_PATH, **fields)
         for name, fields in mini_world.SPECS.items()}
ALL = {**DATASETS, **WORLD}  # every dataset known by name

# not Dassl's "split_fewshot/", so its pickles are never overwritten
FEWSHOT_CACHE_DIR = "split_fewshot_ref"
SUBSAMPLE_MODES = ("all", "base", "new")


def _normalise(name):
    return name.lower().replace("_", "").replace("-", "").replace(" ", "")


# Matching ignores case, "_" and "-", so CoOp's config names (OxfordPets, ImageNetV2, ...) and yaml
# file names (imagenetv2, imagenet_sketch, ...) resolve by themselves; only the names that differ in
# words need an entry.
_ALIASES = {_normalise(k): k for k in ALL}
_ALIASES.update({_normalise(s.coop_name): k for k, s in ALL.items()})
_ALIASES.update({"flowers102": "oxford_flowers"})  # DATASETS.md's heading for OxfordFlowers


def resolve_name(name):
    """Canonical key of ALL for a --dataset value (canonical key or CoOp name, any case)."""
    key = _ALIASES.get(_normalise(str(name)))
    if key is None:
        known = list(ALL)
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f" Did you mean {close[0]}?" if close else ""
        raise ValueError(f"Unknown dataset {name!r} (--dataset). Known datasets: "
                         f"{', '.join(known)}. CoOp's config names (e.g. OxfordPets, "
                         f"DescribableTextures, ImageNetV2) work too.{hint}")
    return key


# --------------------------------------------------------------------------------------------------
# Reading the CoOp tree. Readers return Datum with paths *relative* to the image root;
# load_benchmark makes them absolute at the very end, so the cache can store exactly what was
# sampled.

def _listdir(path):
    # Dassl's listdir_nohidden drops dot-files; we also sort, which Dassl does not do for image
    # files (its ImageNet order was whatever os.listdir returned on the machine that wrote
    # preprocessed.pkl).
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
    if spec.section == OWN:
        return "see 'Your own dataset' in the README"
    if spec.section == BUILT_IN:
        return "the mini world draws it there (python -m world --render --root ROOT)"
    return f"see the {spec.section} section of CoOp's DATASETS.md"


def _require_file(spec, ddir, fname, what):
    path = os.path.join(ddir, fname)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Split file not found: {path}. Expected {what} ({_howto(spec)}). "
                                f"It is required: a split made up here would not match the "
                                f"published numbers.")
    return path


def _require_image_root(spec, ddir):
    image_root = os.path.join(ddir, spec.image_dir)
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"Image folder not found: {image_root} (expected "
                                f"$DATA/{spec.dir}/{spec.image_dir} for --dataset "
                                f"{spec.coop_name}); {_howto(spec)}.")
    return image_root


def _check_images(spec, image_root, items, source):
    # Dassl's Datum asserts every image file exists, so an incomplete extraction fails at load time,
    # not mid-training. We do the same, but report all missing files at once.
    missing = [d.impath for d in items if not os.path.isfile(os.path.join(image_root, d.impath))]
    if missing:
        shown = ", ".join(missing[:5])
        raise FileNotFoundError(f"{len(missing)} of {len(items)} images listed in {source} are "
                                f"missing under {image_root}: "
                                f"{shown}{', ...' if len(missing) > 5 else ''}. Re-extract the "
                                f"images; {_howto(spec)}.")


def _check_nonempty(splits, source, names):
    for name in names:
        if not splits[name]:
            raise ValueError(f"The {name!r} split read from {source} is empty; expected the full "
                             f"{name} split (see the expected counts in DATASETS). Check that the "
                             f"file / folders are complete.")


def _read_json(spec, ddir):
    """split_zhou_*.json: {"train"|"val"|"test": [[relpath, label, classname], ...]}."""
    what = spec.split_file if spec.section == OWN else \
        f"{spec.split_file}, downloaded from the Google Drive link"
    path = _require_file(spec, ddir, spec.split_file, what)
    raw = _read_bytes(path)
    fmt = 'CoOp\'s split format {"train": [[path, label, classname], ...], "val": [...], "test": [...]}'
    try:
        split = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); expected {fmt}.") from None
    except RecursionError:  # lists or objects nested thousands deep: no split file looks like that
        raise ValueError(f"{path} is malformed: its JSON is nested too deeply to read; expected {fmt}.") from None
    splits = {}
    for name in ("train", "val", "test"):
        if not isinstance(split, dict) or not isinstance(split.get(name), list):
            raise ValueError(f"{path} has no {name!r} list; expected {fmt}.")
        # list order is kept: the few-shot sampler groups labels in first-appearance order
        items = []
        for i, entry in enumerate(split[name]):
            if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                    # no float or bool labels
                    and type(entry[1]) is int and isinstance(entry[2], str)):
                raise ValueError(f"{path}: an entry of {name!r} is not [path, label, classname] "
                                 f"(entry {i}: {entry!r}; a label is an integer); expected {fmt}.")
            items.append(Datum(*entry))
        splits[name] = items
    _check_nonempty(splits, path, ("test",) if spec.test_only else ("train", "val", "test"))
    _check_labels(splits, path)
    image_root = _require_image_root(spec, ddir)
    _check_paths_inside(splits, image_root, path)
    for name in ("train", "val", "test"):
        _check_images(spec, image_root, splits[name], f"{path} ({name})")
    return splits, _sha256(raw)


def _check_labels(splits, source):
    """Labels 0..n-1, one class name per label, and every class that is tested also trained on
    (where there is a training split): a label out of range would move classes between base and
    new, a class only in test would vanish from the class list."""
    names = {}
    for split, items in splits.items():
        for d in items:
            if names.setdefault(d.label, d.classname) != d.classname:
                raise ValueError(f"{source}: label {d.label} is {names[d.label]!r} in one entry "
                                 f"and {d.classname!r} in another ({split}: {d.impath}); each "
                                 f"label must name one class.")
    labels = sorted(names)
    if labels != list(range(len(labels))):
        odd = [y for y in labels if not 0 <= y < len(labels)] or sorted(set(range(len(labels))) - set(labels))
        raise ValueError(f"{source}: the labels are not 0..{len(labels) - 1} (out of range or "
                         f"missing: {odd[:10]}); each of the {len(labels)} classes needs its own "
                         f"label.")
    if splits.get("train"):
        untrained = sorted({d.label for d in splits["test"]} - {d.label for d in splits["train"]})
        if untrained:
            raise ValueError(f"{source}: classes {[names[y] for y in untrained][:10]} (labels "
                             f"{untrained[:10]}) are in test but not in train; a few-shot split "
                             f"needs training images of every class.")


def _check_paths_inside(splits, image_root, source):
    """What a split file may name: paths below the image folder, relative to it, with no '..' part
    (CoOp's never have one). This is a check of the split file's text, not of the disk: the
    folders under the image folder are the user's own layout, so a class folder that is a
    symbolic link to another disk is followed like any folder."""
    for split, items in splits.items():
        for d in items:
            if os.path.isabs(d.impath) or ".." in d.impath.replace("\\", "/").split("/"):
                raise ValueError(f"{source}: the {split} path {d.impath!r} leaves the image folder "
                                 f"{image_root}; split paths must be relative to it, without '..'.")


def _read_fgvc(spec, ddir):
    """FGVCAircraft: label = line index in variants.txt; images_variant_<split>.txt lines are '<id>
    <variant>'."""
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
    """classnames.txt: '<wnid> <class name words...>' per line, in CLIP's ImageNet order."""
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
    # Label = index of the wnid in the *sorted* folder list (CoOp's ImageNet, -Sketch, -A, -R
    # readers). Only folders count, which also drops the README.txt that ImageNet-A/-R ship next to
    # their class folders.
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
            raise ValueError(f"{split_dir} is flat ({len(files)} files, no class folders). CoOp "
                             f"expects one folder per wnid, like train/ "
                             f"(val/n01440764/ILSVRC2012_val_*.JPEG); move the val images into "
                             f"wnid folders first (e.g. with the valprep.sh script used by "
                             f"PyTorch's ImageNet example).")
        splits[name] = _read_wnid_folders(split_dir, folder, names, names_path)
    splits["val"] = []
    _check_nonempty(splits, os.path.join(image_root, "{train,val}"), ("train", "test"))
    # Labels are folder indices computed separately for train/ and val/, so both must hold the same
    # wnids.
    train_wnids, val_wnids = _subdirs(os.path.join(image_root, "train")), _subdirs(os.path.join(image_root, "val"))
    if train_wnids != val_wnids:
        raise ValueError(f"{image_root}/train and {image_root}/val hold different class folders "
                         f"({len(train_wnids)} vs {len(val_wnids)}); labels would not match "
                         f"between them.")
    # No split file exists, so the cache key hashes what the sampler reads: classnames.txt + the
    # sorted listing.
    key = _sha256(_read_bytes(names_path), "\n".join(f"{d.impath}\t{d.label}" for d in splits["train"]))
    return splits, key


def _read_imagenet_variant(spec, ddir):
    """ImageNetV2 (folders 0..999 = line i of classnames.txt) and -Sketch/-A/-R (sorted wnid
    folders)."""
    names, names_path = _read_classnames(spec, ddir)
    image_root = _require_image_root(spec, ddir)
    if spec.reader == "imagenet_v2":
        wnids = list(names)
        absent = [str(y) for y in range(len(wnids)) if not os.path.isdir(os.path.join(image_root, str(y)))]
        if absent:
            raise FileNotFoundError(f"{len(absent)} of {len(wnids)} class folders are missing "
                                    f"under {image_root}: "
                                    f"{', '.join(absent[:5])}{', ...' if len(absent) > 5 else ''}; "
                                    f"{_howto(spec)}.")
        test = [Datum(os.path.join(str(y), f), y, names[wnid])
                for y, wnid in enumerate(wnids) for f in _listdir(os.path.join(image_root, str(y)))]
    else:
        test = _read_wnid_folders(image_root, "", names, names_path)
    splits = {"train": [], "val": [], "test": test}
    _check_nonempty(splits, image_root, ("test",))
    return splits, None


_READERS = {"json": _read_json, "fgvc": _read_fgvc, "imagenet": _read_imagenet,
            "imagenet_v2": _read_imagenet_variant, "imagenet_folders": _read_imagenet_variant}


def read_splits(key, root, spec=None):
    """Full train/val/test of one dataset (relative paths) and the split hash used to key the
    few-shot cache. spec: the DatasetSpec of a dataset that is not in ALL (default ALL[key])."""
    spec = spec or ALL[key]
    ddir = os.path.join(root, spec.dir)
    if not os.path.isdir(ddir):
        extra = "" if os.path.isdir(root) else f" (--root {root} itself is not a folder)" if os.path.exists(root) \
            else f" (--root {root} itself does not exist)"
        raise FileNotFoundError(f"Dataset folder not found: {ddir}{extra}. --dataset {key} expects "
                                f"$DATA/{spec.dir} under --root; {_howto(spec)}.")
    splits, split_hash = _READERS[spec.reader](spec, ddir)
    # Every class needs test images: one without any would be scored on nothing (with base-to-new, a
    # new class set without test images fails after the whole training).
    untested = sorted({d.label for items in splits.values() for d in items} - {d.label for d in splits["test"]})
    if untested:
        names = {d.label: d.classname for items in splits.values() for d in items}
        test_source = {"json": spec.split_file, "fgvc": "images_variant_test.txt",
                       "imagenet": os.path.join(spec.image_dir, "val")}.get(spec.reader, spec.image_dir)
        raise ValueError(f"{os.path.join(ddir, test_source)}: classes "
                         f"{[names[y] for y in untested][:10]} (labels {untested[:10]}) have no "
                         f"test image; every class needs test images to be scored. Check that the "
                         f"file / folders are complete.")
    _check_distinct_names(splits, os.path.join(ddir, {"json": spec.split_file}.get(spec.reader, spec.dir)))
    return splits, split_hash


def prompt_name(classname):
    """A class name as CLIP reads it: every CoOp trainer writes "_" as a space, and CLIP's tokenizer
    lowercases and collapses whitespace."""
    return " ".join(classname.replace("_", " ").lower().split())


def _check_distinct_names(splits, source):
    """Two labels whose names CLIP reads alike ("Annual_Crop" and "annual crop") would get one
    prompt: the model could never tell them apart, and training would sit at a loss of ln 2.
    Refused, naming both."""
    first = {}
    for items in splits.values():
        for d in items:
            other = first.setdefault(prompt_name(d.classname), (d.label, d.classname))
            if other[0] != d.label:
                raise ValueError(f"{source}: label {other[0]} {other[1]!r} and label {d.label} "
                                 f"{d.classname!r} are the same class name to CLIP (case, '_' and "
                                 f"spaces are not read), so their prompts would be identical. "
                                 f"Rename one of them.")


def split_fingerprint(name, root, spec=None):
    """A short hash of what decides a dataset's split and class names under `root`, for a run's
    identity: the split file(s) (split_zhou_*.json, which also holds the class names; FGVC's
    variants.txt and images_variant_*.txt; ImageNet's and its variants' classnames.txt) and,
    where labels are class-folder indices (ImageNet, -Sketch, -A, -R), the sorted class-folder
    names. Reads no image, so it is cheap enough to compute before deciding to skip a finished
    run; a file that is missing raises read_splits' own message."""
    key, root, spec = _find(name, root, spec)
    ddir = os.path.join(root, spec.dir)
    if not os.path.isdir(ddir):
        read_splits(key, root, spec)  # raises: the dataset folder is not under --root
    files = [spec.split_file] + ([f"images_variant_{s}.txt" for s in ("train", "val", "test")]
                                 if spec.reader == "fgvc" else [])
    chunks = [spec.reader]
    for fname in files:
        chunks += [fname, _read_bytes(_require_file(spec, ddir, fname, f"{fname} ({_howto(spec)})"))]
    image_root = os.path.join(ddir, spec.image_dir)
    folders = {"imagenet": ["train", "val"], "imagenet_folders": [""]}.get(spec.reader, [])
    for folder in folders:
        path = os.path.join(image_root, folder)
        chunks += [f"folders of {folder!r}", "\n".join(_subdirs(path)) if os.path.isdir(path) else "absent"]
    return _sha256(*chunks)


def _find(name, root, spec=None):
    """(key, root, spec) of a dataset to read: `name` as its key when `spec` is given, else a
    folder of your own (own_dataset) or a dataset known by name; a mini world dataset is drawn
    under `root` first if it is not there yet (idempotent: a drawn one is only checked)."""
    if spec is None and is_path(name):
        return own_dataset(name)
    key = name if spec is not None else resolve_name(name)
    spec = spec or ALL[key]
    root = os.path.abspath(os.path.expanduser(root))
    if spec.section == BUILT_IN:
        mini_world.render_world(root, datasets=(key,))
    return key, root, spec


def benchmark_fingerprint(benchmarks):
    """split_fingerprint's counterpart for Benchmarks built in memory ({"base": Benchmark, ...}, as
    tests pass them): their names, class names and items."""
    return _sha256(*(json.dumps([k, b.name, b.classnames, [[d.impath, d.label] for d in b.train + b.val + b.test]])
                     for k, b in sorted(benchmarks.items())))


# --------------------------------------------------------------------------------------------------
# Your own dataset: --dataset PATH, a folder read as a CoOp dataset

OWN = "your own dataset"  # DatasetSpec.section of a dataset named by its folder
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")  # any case


def is_world(name):
    """Whether --dataset names one of the mini world's datasets (None: the mini world, the
    default)."""
    return name is None or name in WORLD


def is_path(name):
    """Whether a --dataset value names a folder of your own rather than a dataset: it holds a path
    separator or starts with '.', or it is an existing folder and no dataset's name."""
    if not isinstance(name, str):
        return False
    return os.sep in name or "/" in name or name.startswith(".") or \
        (os.path.isdir(name) and _ALIASES.get(_normalise(name)) is None)


def own_folder(path):
    """The absolute folder of `--dataset PATH`; its last part is the dataset's name."""
    return os.path.abspath(os.path.expanduser(path)).rstrip(os.sep) or os.sep


def own_dataset(path):
    """(key, root, spec) for `--dataset PATH`: a folder of your own, then read exactly as a CoOp
    dataset is (its checks, the few-shot draw, the base/new split). The folder holds either
      - one split file `split*.json` in CoOp's format ({"train" | "val" | "test": [[image path,
        label, class name], ...]}), its paths relative to the folder or to one folder inside it
        (as CoOp's eurosat/2750/), or
      - one folder of images per class (PATH/<class name>/*.jpg): a split is made once, as CoOp
        makes DTD's (make_split), written to PATH/split_<folder name>.json and read from then on.
    An optional PATH/template.txt holds the prompt template (default "a photo of a {}.")."""
    folder = own_folder(path)
    if not os.path.isdir(folder):
        what = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise FileNotFoundError(f"--dataset {path}: {folder} {what}; a dataset of your own is a "
                                f"folder of class folders of images, or of images and a "
                                f"split_*.json ({_howto(OWN_SPEC)})")
    name = os.path.basename(folder)
    splits = sorted(f for f in _listdir(folder) if f.startswith("split") and f.endswith(".json")
                    and os.path.isfile(os.path.join(folder, f)))
    if len(splits) > 1:
        raise ValueError(f"--dataset {path}: {folder} holds {len(splits)} split files "
                         f"({', '.join(splits)}); keep the one to use")
    split_file = splits[0] if splits else make_split(folder, f"split_{name}.json")
    template = "a photo of a {}."
    if os.path.isfile(os.path.join(folder, "template.txt")):
        with open(os.path.join(folder, "template.txt")) as f:
            template = f.read().strip()
        if template.count("{}") != 1 or "\n" in template:
            raise ValueError(f"{os.path.join(folder, 'template.txt')} must hold one line with one "
                             f"{{}} where the class name goes, like 'a photo of a {{}}.'; got "
                             f"{template[:80]!r}")
    # no published counts (None: not test-only, and data.py --check shows what is there)
    spec = DatasetSpec(name, OWN, name, _image_dir(folder, split_file), split_file, "json",
                       template, None, None, None, None)
    return name, os.path.dirname(folder), spec


OWN_SPEC = DatasetSpec("", OWN, "", "", "", "json", "a photo of a {}.", None, None, None, None)


def _image_dir(folder, split_file):
    """Where a split file's paths start: the folder itself, or the one folder inside it where the
    first path exists (CoOp's datasets keep their images in one such folder)."""
    try:
        with open(os.path.join(folder, split_file)) as f:
            first = json.load(f)["train"][0][0]
    except (OSError, ValueError, TypeError, KeyError, IndexError, RecursionError):
        return ""  # the split's own reader says what is wrong with the file
    if not isinstance(first, str) or os.path.isfile(os.path.join(folder, first)):
        return ""
    found = [d for d in _subdirs(folder) if os.path.isfile(os.path.join(folder, d, first))]
    return found[0] if len(found) == 1 else ""


def make_split(folder, split_file, p_train=0.5, p_val=0.2, seed=1):
    """Split folder/<class>/<image> into train / val / test once, as CoOp's
    DescribableTextures.read_and_split_data does (CoOp made its DTD split with it): the classes in
    sorted order are labels 0..n-1; each class's images are shuffled (Python's random, seeded once
    with `seed`, as a CoOp run is seeded before it builds its dataset) and cut into round(n * 0.5)
    train, round(n * 0.2) val and the rest test images. Written in CoOp's split format; returns
    split_file. Unlike CoOp, only image files count (IMAGE_EXTENSIONS; CoOp takes every file) and
    they are sorted before the shuffle (CoOp shuffles os.listdir's order, which differs between file
    systems)."""
    classes = _subdirs(folder)
    if len(classes) < 2:
        raise ValueError(f"--dataset {folder}: no split_*.json and {len(classes)} class folder(s); "
                         f"a dataset of your own needs a split file or at least two folders of "
                         f"images, one per class ({_howto(OWN_SPEC)})")
    rng = random.Random(seed)
    split = {"train": [], "val": [], "test": []}
    for label, c in enumerate(classes):
        images = [f for f in _listdir(os.path.join(folder, c)) if f.lower().endswith(IMAGE_EXTENSIONS)]
        rng.shuffle(images)
        n_train, n_val = round(len(images) * p_train), round(len(images) * p_val)
        if not (n_train > 0 and n_val > 0 and len(images) - n_train - n_val > 0):
            raise ValueError(f"--dataset {folder}: class folder {c!r} holds {len(images)} images; "
                             f"each class needs at least 4 (train, val and test get some)")
        rows = [[f"{c}/{f}", label, c] for f in images]
        split["train"] += rows[:n_train]
        split["val"] += rows[n_train:n_train + n_val]
        split["test"] += rows[n_train + n_val:]
    path = os.path.join(folder, split_file)
    try:
        write_json(split, path)
    except OSError as e:
        raise OSError(f"--dataset {folder}: the split made from its class folders could not be "
                      f"written to {path} ({e}); make the folder writable once, or copy it") from None
    print(f"{path}: a split made from the class folders of {folder} ({len(classes)} classes, "
          f"{len(split['train'])} / {len(split['val'])} / {len(split['test'])} train / val / test "
          f"images); it is read from now on")
    return split_file


# --------------------------------------------------------------------------------------------------
# Few-shot sampling and base/new subsampling, exactly as Dassl/CoOp

def generate_fewshot(items, num_shots):
    """Dassl's generate_fewshot_dataset(..., repeat=False) on one data source, drawing from the
    global `random`.

    Labels are visited in first-appearance order (Dassl's defaultdict keeps insertion order), items
    within a label keep the split order, and a label with fewer than num_shots items keeps all of
    them without a draw.
    """
    by_label = {}
    for item in items:
        by_label.setdefault(item.label, []).append(item)
    out = []
    for group in by_label.values():
        out.extend(random.sample(group, num_shots) if len(group) >= num_shots else group)
    return out


def subsample_classes(*splits, subsample="all"):
    """CoOp's subsample_classes: sorted labels of the first split, first ceil(n/2) = base, rest =
    new, relabelled."""
    if subsample == "all":
        return splits
    labels = sorted({d.label for d in splits[0]})
    m = math.ceil(len(labels) / 2)
    selected = labels[:m] if subsample == "base" else labels[m:]
    relabel = {y: i for i, y in enumerate(selected)}
    return tuple([Datum(d.impath, relabel[d.label], d.classname) for d in items if d.label in relabel]
                 for items in splits)


# --------------------------------------------------------------------------------------------------
# Few-shot cache: a record of each draw, JSON with relative paths, keyed by (dataset, shots, seed,
# split hash). Dassl keys its pickles by (shots, seed) only, stores absolute paths and trusts them;
# here the draw is always made (one pass over the training list, cheap next to a run) and a
# record that differs from it is rewritten.

def _cache_path(ddir, key, shots, seed, split_hash):
    return os.path.join(ddir, FEWSHOT_CACHE_DIR, f"{key}-shot_{shots}-seed_{seed}-split_{split_hash}.json")


def _load_cache(path, meta):
    """The cached {train, val} as lists of [path, label, classname], or None where there is no
    readable cache."""
    try:
        with open(path) as f:
            data = json.load(f)
        if any(data.get(k) != v for k, v in meta.items()):
            return None
        return {name: data[name] for name in ("train", "val") if name in data}
    # e.g. a list, nested deep
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None


def _write_cache(path, meta, sampled):
    # A read-only $DATA (shared cluster storage) is normal: then we just don't cache.
    data = dict(meta, **{k: [[d.impath, d.label, d.classname] for d in v] for k, v in sampled.items()})
    try:
        write_json(data, path)
    except OSError:
        pass


def write_json(data, path):
    """Atomic (temp file + os.replace), so an interrupted or concurrent run never leaves half a file
    behind; the folder is made if needed. Raises OSError."""
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
        raise


# --------------------------------------------------------------------------------------------------
# The one entry point train.py uses

def load_benchmark(name, root, shots, seed, subsample="all", cache=True, spec=None):
    """Read one dataset from the CoOp tree under `root` and return its few-shot, base/new-subsampled
    Benchmark.

    shots: K images per class (>= 1), or None for the full training split (no draw, no cache).
    seed:  the run's seed. Right before the draw this function calls random.seed(seed) on Python's *global*
           `random` and draws nothing from it earlier, so the K-shot sets equal Dassl's for that seed whatever
           the caller did with `random` before. The global stream is left advanced by the draw,
           as in Dassl's first run of a seed (later ones read its pickle).
    subsample: "all" | "base" | "new", applied after sampling over all classes.
    Test-only variants (imagenet_v2/_sketch/_a/_r) return empty train/val and the full test set; `shots` is
    validated but unused, and subsample must be "all".
    name:  a dataset of ALL (CoOp's, or the mini world's: drawn under `root` first if it is not
           there yet) or the folder of a dataset of your own (own_dataset; `root` is then unused).
    spec:  a DatasetSpec for a dataset in CoOp's layout that is not one of ALL; `name` is then
           used as its key as given.
    """
    key, root, spec = _find(name, root, spec)
    if shots is not None and shots < 1:
        raise ValueError(f"--shots must be >= 1 (got {shots}); pass shots=None for the full training split.")
    if subsample not in SUBSAMPLE_MODES:
        raise ValueError(f"--subsample must be one of {SUBSAMPLE_MODES} (got {subsample!r}).")
    if spec.test_only and subsample != "all":
        raise ValueError(f"--dataset {key} is test-only (all classes); --subsample must be 'all' (got {subsample!r}).")
    ddir = os.path.join(root, spec.dir)

    splits, split_hash = read_splits(key, root, spec)
    train, val, test = splits["train"], splits["val"], splits["test"]

    if shots is not None and not spec.test_only:
        if seed is None or seed < 0:
            # CPython's random.seed(-s) equals random.seed(s), and Dassl does not seed at all for s
            # < 0.
            raise ValueError(f"--seed must be an int >= 0 when sampling shots (got {seed}).")
        # CoOp never samples ImageNet val
        draws = ("train",) if spec.reader == "imagenet" else ("train", "val")
        meta = {"dataset": key, "shots": shots, "seed": seed, "split_hash": split_hash}
        path = _cache_path(ddir, key, shots, seed, split_hash)
        random.seed(seed)
        sampled = {"train": generate_fewshot(train, shots)}
        if "val" in draws:
            # second draw on the same stream, after train: keeps parity with Dassl's cached pickles
            sampled["val"] = generate_fewshot(val, min(shots, 4))
        if cache:
            # The cache records the draw; it is never trusted: the draw is cheap, so it is always
            # made, and a cache that says otherwise (edited, or written by other code) is replaced,
            # with a word.
            rows = {k: [[d.impath, d.label, d.classname] for d in v] for k, v in sampled.items()}
            cached = _load_cache(path, meta)
            if cached != rows:
                if cached is not None:
                    print(f"few-shot cache {path} differs from the draw of seed {seed}: drawn again and rewritten")
                _write_cache(path, meta, sampled)
        train, val = sampled["train"], sampled.get("val", val)

    if spec.reader == "imagenet":
        val = test  # CoOp: "evaluation on the val set, also used as the val set"
    train, val, test = subsample_classes(train, val, test, subsample=subsample)

    image_root = os.path.join(ddir, spec.image_dir)
    train, val, test = ([Datum(os.path.join(image_root, d.impath), d.label, d.classname) for d in items]
                        for items in (train, val, test))
    source = os.path.join(ddir, spec.split_file)
    # read_splits gives every class test images, so only a subsample of no class gets here
    if not test:
        raise ValueError(f"--dataset {key}: --subsample {subsample} selects no class of {source} "
                         f"(a dataset of one class has no new classes); base-to-new needs at least "
                         f"two classes.")
    # What the run will read, opened now (headers only, not pixels): a file that is no image or a
    # decompression bomb stops the run here, named, rather than after the training.
    check_image_headers(dict.fromkeys(d.impath for d in train + val + test), source)
    return Benchmark(key, train, val, test, _classnames(train, val, test), spec.template, source)


def _classnames(*splits):
    # Dassl builds label -> name from train_x; we take the first name seen over train, val, test
    # (identical for the real splits) so that test-only variants work, and insist on labels 0..n-1
    # so index == label holds.
    names = {}
    for items in splits:
        for d in items:
            names.setdefault(d.label, d.classname)
    if sorted(names) != list(range(len(names))):
        raise ValueError(f"Labels are not 0..n-1 (found {sorted(names)[:10]}...); the split file is inconsistent.")
    # every CoOp trainer does name.replace("_", " ") before tokenising
    return [names[y].replace("_", " ") for y in range(len(names))]


# --------------------------------------------------------------------------------------------------
# Transforms and the torch Dataset

def train_transform(resolution, min_scale=0.08):
    """Dassl's train pipeline at `resolution` (224 for ViT-B/16): bicubic RandomResizedCrop(0.08-1)
    + flip.

    There is no Resize before the crop: Dassl skips it when random_resized_crop is configured.
    `min_scale` is Dassl's INPUT.RRCROP_SCALE[0] (0.08, never overridden by the official configs);
    train.py raises it for very small images (a crop of 8% of a 32-pixel image is 9 x 9 pixels,
    often without the object).
    """
    return T.Compose([
        T.RandomResizedCrop(resolution, scale=(min_scale, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(p=0.5),
        T.ToTensor(),
        T.Normalize(CLIP_MEAN, CLIP_STD),
    ])


def images_to_tensor(images):
    """(N, H, W, 3) uint8 images already at CLIP's input size -> (N, 3, H, W) float, normalised as
    CLIP's preprocess does."""
    x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def test_transform(resolution):
    """Resize shorter side (bicubic) + CenterCrop, i.e. CLIP's own preprocess, at the model's input
    resolution."""
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
        try:
            with Image.open(d.impath) as img:
                image = self.transform(img.convert("RGB"))
        except (OSError, Image.DecompressionBombError) as e:  # PIL's messages do not say which file
            raise OSError(f"could not read image {d.impath}: {e}. Re-extract or remove it from the split.") from e
        return image, d.label, index


def make_loader(items, transform, batch_size, train, workers, device="cpu"):
    """train.py's loader: shuffled with drop_last when training (Dassl's; kept when fewer images than
    a batch), in order for a test."""
    return torch.utils.data.DataLoader(ImageDataset(items, transform), batch_size=batch_size,
                                       shuffle=train, drop_last=train and len(items) >= batch_size,
                                       num_workers=workers, pin_memory=device.startswith("cuda"),
                                       persistent_workers=workers > 0)


def check_image_headers(paths, source):
    """Open each image and read its header only (format and size; the pixels are not decoded), so
    that a file PIL cannot read or an image larger than PIL's limit against decompression bombs
    (Image.MAX_IMAGE_PIXELS, which PIL enforces with a warning, or an error from twice the limit)
    is named before a run trains, not when it is scored. A file cut short after its header still
    gets through: finding that needs every image decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        for path in paths:
            try:
                with open(path, "rb") as f, Image.open(f):
                    pass
            except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
                raise ValueError(f"image {path} (listed in {source}) is too large to read safely: "
                                 f"{e} Remove it from the split or replace it with a smaller "
                                 f"copy.") from None
            except OSError as e:
                raise OSError(f"could not read image {path} (listed in {source}): {e}. Re-extract "
                              f"it or remove it from the split.") from None


# --------------------------------------------------------------------------------------------------
# `python data.py --check --root $DATA`: what is on disk, against the expected counts

def check(root, names=None, out=print):
    """Print one row per dataset (found / missing / error, counts found vs expected); return the
    rows."""
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root) and not (names and all(is_path(n) for n in names)):
        what = "is not a folder" if os.path.exists(root) else "does not exist"
        raise FileNotFoundError(f"--root {root} {what} (it should be the CoOp $DATA folder that "
                                f"holds caltech-101/, eurosat/, imagenet/, ...)")
    rows, errors = [], []
    def entry(name):  # (key, root, spec); an unknown name stops before the table
        if is_path(name):
            return own_dataset(name)
        key = resolve_name(name)
        return key, root, ALL[key]

    entries = [entry(name) for name in (names or list(DATASETS))]
    for key, where, spec in entries:
        expected = {"classes": spec.classes, "train": spec.train, "val": spec.val, "test": spec.test}
        found = None
        if not os.path.isdir(os.path.join(where, spec.dir)):
            status = "missing"
        else:
            try:
                splits, _ = read_splits(key, where, spec)
                labels = {d.label for items in splits.values() for d in items}
                found = {"classes": len(labels), **{k: len(v) for k, v in splits.items()}}
                if spec.section == OWN:  # no published counts: what is there is what it has
                    expected = found
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
        out(f"{r['dataset']:<16} {r['dir']:<22} {r['status']:<14} {cell(r, 'classes'):>10} "
            f"{cell(r, 'train'):>16} {cell(r, 'val'):>12} {cell(r, 'test'):>12}")
    for e in errors:
        out(f"error: {e}")
    return rows


def main(argv=None):
    from engine import cli
    parser = argparse.ArgumentParser(description="CoOp dataset tree checks / few-shot split preview.",
                                     formatter_class=cli.HelpFormatter)
    parser.add_argument("--root", default=os.environ.get("DATA", "data"), help="the datasets' folder: the CoOp tree "
                        "($DATA), where the mini world is also drawn (<root>/mini_world*); "
                        "default: $DATA if set, else data")
    parser.add_argument("--check", action="store_true", help="table of every dataset: found against expected class "
                        "and image counts; split files are validated (exit 1 on an error)")
    parser.add_argument("--dataset", nargs="*", help="restrict to these datasets, the mini world's included "
                        "(mini_world, mini_world_fine, ...: world/mini_world.py), or folders of your own "
                        "(path/to/mydata: see the README); default: CoOp's for --check")
    parser.add_argument("--shots", type=int, default=16, help="preview: training images per class (few-shot draw)")
    parser.add_argument("--seed", type=int, default=1, help="preview: the seed of the few-shot draw")
    parser.add_argument("--subsample", default="all", choices=SUBSAMPLE_MODES,
                        help="preview: all classes, the base half or the new half")
    args = parser.parse_args(argv)
    if args.check:
        try:
            rows = check(args.root, args.dataset)
        except (FileNotFoundError, ValueError) as e:  # no --root folder, an unknown --dataset
            print(f"error: {e}")
            return 1
        return 1 if any(r["status"] == "error" for r in rows) else 0
    if not args.dataset:
        parser.error("give --check, or --dataset NAME to preview its few-shot split")
    for name in args.dataset:
        b = load_benchmark(name, args.root, args.shots, args.seed, args.subsample)
        print(f"{b.name}: {b.num_classes} classes, train {len(b.train)}, val {len(b.val)}, test "
              f"{len(b.test)}; template {b.template!r}; first classes: "
              f"{', '.join(b.classnames[:5])}")
    return 0


if __name__ == "__main__":
    from engine import cli  # one line `error: ...` for the user's errors, a traceback for bugs
    cli.run(main)
