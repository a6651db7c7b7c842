"""
What the test files share: one tiny random CLIP, the trainable-parameter and SGD helpers, and fake $DATA trees in
CoOp's layout (test_data.py reads them; test_protocols.py runs whole protocols on a copy).

Test modules import the builders and constants from here (`from conftest import ...`), never from each other.
"""
import io
import json
import os
import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from engine import clip_engine
import clip_layers
import data

# Tiny models gain nothing from several threads, and on a loaded 2-core machine OpenMP's spinning threads make them
# 50x slower; one thread keeps the whole suite (all test files run in this process) fast and steady.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def cpu_defaults(monkeypatch):
    """The tests mean the CPU, also where a GPU is visible: --device defaults to cpu (and so --workers to 0) in every
    train.get_args, so train.main and the protocols never move the shared tiny CLIP to CUDA, and a fault planted in a
    dataset's __getitem__ runs in this process. Tests for CUDA give --device cuda and skip without a GPU."""
    import engine.run  # (imported here: conftest is loaded before the test files choose what they import)
    monkeypatch.setattr(engine.run, "default_device", lambda: "cpu")


# ----------------------------------------------------------------------------------------------------------------------
# The tiny random CLIP (12 layers of width 64 in both towers, 32 x 32 images), built once for the whole session

@pytest.fixture(scope="session")
def _tiny_clip():
    model = clip_layers.random_clip("tiny", seed=0)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def tiny(_tiny_clip):
    """The shared frozen fp32 tiny CLIP. Every test gets the same object, so none may change it: after each test that
    used it, its weights, dtypes, frozen state and eval mode are checked against the state it was built with (a test
    that needs to convert or train a CLIP builds its own, or works on a deepcopy)."""
    model, snapshot = _tiny_clip
    yield model
    state = model.state_dict()
    changed = [k for k, v in snapshot.items()  # compared on the CPU: a test that moved it to a GPU fails, not teardown
               if state[k].device != v.device or state[k].dtype != v.dtype or not torch.equal(state[k].cpu(), v)]
    unfrozen = any(p.requires_grad for p in model.parameters())
    training = any(m.training for m in model.modules())
    if changed or unfrozen or training:  # put it back, so that only the test that changed it fails
        model.cpu().float().load_state_dict(snapshot)
        clip_layers.freeze(model)
    assert not changed, f"this test changed the shared tiny CLIP: {changed[:5]}"
    assert not unfrozen, "this test unfroze the shared tiny CLIP"
    assert not training, "this test left the shared tiny CLIP in training mode"


def trainable(model):
    """{name: parameter} of what trains: the parameters with requires_grad, in the model's order."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def n_trainable(model):
    return sum(p.numel() for p in trainable(model).values())


def sgd_steps(model, loss_fn, steps, lr, momentum=0.9):
    """`steps` steps of plain SGD on the model's trainable parameters; returns the loss before each step."""
    opt = torch.optim.SGD(trainable(model).values(), lr=lr, momentum=momentum)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# ----------------------------------------------------------------------------------------------------------------------
# Fake $DATA trees in CoOp's layout

_buf = io.BytesIO()
Image.new("RGB", (12, 9), (200, 30, 90)).save(_buf, format="JPEG")
JPEG = _buf.getvalue()


def write_image(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(JPEG)


def interleave(counts, rng):
    """Labels with the given per-class counts, shuffled so that first-appearance order != label order."""
    labels = [y for y, n in enumerate(counts) for _ in range(n)]
    rng.shuffle(labels)
    return labels


def make_json_dataset(root, key, folders, classnames, counts, seed=0):
    """A split_zhou_*.json dataset. counts: {"train": [...], "val": [...], "test": [...]} per class."""
    spec = data.DATASETS[key]
    ddir = os.path.join(root, spec.dir)
    rng = random.Random(seed)  # private RNG: building trees must not touch the global stream
    split, serial = {}, 0
    for name in ("train", "val", "test"):
        split[name] = []
        for y in interleave(counts[name], rng):
            serial += 1
            rel = f"{folders[y]}/{folders[y]}_{serial:04d}.jpg"
            write_image(os.path.join(ddir, spec.image_dir, rel))
            split[name].append([rel, y, classnames[y]])
    with open(os.path.join(ddir, spec.split_file), "w") as f:
        json.dump(split, f)
    return split


EUROSAT_FOLDERS = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "SeaLake"]
EUROSAT_NAMES = ["Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Highway or Road",
                 "Industrial Buildings", "Sea or Lake"]
EUROSAT_COUNTS = {"train": [20, 3, 17, 16, 1, 9], "val": [6, 2, 5, 4, 1, 3], "test": [4, 5, 3, 2, 6, 1]}

PETS_NAMES = ["Abyssinian", "american_bulldog", "Bengal", "great_pyrenees", "pug", "scottish_terrier", "Sphynx"]
PETS_COUNTS = {"train": [5, 9, 2, 7, 4, 6, 3], "val": [2, 3, 1, 2, 4, 1, 2], "test": [3, 2, 4, 1, 2, 3, 2]}

CARS_NAMES = ["2012 Tesla Model S", "2012 BMW M3 coupe", "1993 Volvo 240 Sedan"]
CARS_COUNTS = {"train": [4, 2, 3], "val": [1, 1, 1], "test": [2, 2, 2]}

# classnames.txt lists wnids in CLIP's order, not sorted; labels follow the *sorted folder* order.
IMAGENET_LINES = [("n02099601", "golden retriever"), ("n01440764", "tench"), ("n04552348", "warplane"),
                  ("n01443537", "goldfish"), ("n09999999", "unused class"), ("n02123045", "tabby cat")]
IMAGENET_FOLDERS = ["n01440764", "n01443537", "n02099601", "n02123045", "n04552348"]  # sorted, n09999999 absent
IMAGENET_TRAIN = [10, 4, 7, 2, 12]
IMAGENET_VAL = [3, 2, 3, 1, 2]

FGVC_VARIANTS = ["707-320", "A300B4", "F-16A/B", "Tu-134"]


def make_imagenet(root, flat_val=False):
    ddir = os.path.join(root, "imagenet")
    os.makedirs(ddir, exist_ok=True)
    with open(os.path.join(ddir, "classnames.txt"), "w") as f:
        f.writelines(f"{w} {n}\n" for w, n in IMAGENET_LINES)
    rng = random.Random(1)
    for wnid, n_train, n_val in zip(IMAGENET_FOLDERS, IMAGENET_TRAIN, IMAGENET_VAL):
        names = [f"{wnid}_{i}.JPEG" for i in range(n_train)]
        rng.shuffle(names)  # creation order != sorted order
        for fname in names:
            write_image(os.path.join(ddir, "images", "train", wnid, fname))
        for i in range(n_val):
            sub = "" if flat_val else wnid
            write_image(os.path.join(ddir, "images", "val", sub, f"ILSVRC2012_val_{wnid}_{i:03d}.JPEG"))
    return ddir


def make_fgvc(root):
    ddir = os.path.join(root, "fgvc_aircraft")
    os.makedirs(ddir, exist_ok=True)
    with open(os.path.join(ddir, "variants.txt"), "w") as f:
        f.writelines(v + "\n" for v in FGVC_VARIANTS)
    rng, lines, serial = random.Random(2), {}, 1000000
    for name, counts in (("train", [5, 3, 6, 2]), ("val", [2, 2, 1, 3]), ("test", [1, 2, 2, 1])):
        lines[name] = []
        for y in interleave(counts, rng):
            serial += 1
            write_image(os.path.join(ddir, "images", f"{serial}.jpg"))
            lines[name].append((str(serial), y))
        with open(os.path.join(ddir, f"images_variant_{name}.txt"), "w") as f:
            f.writelines(f"{i} {FGVC_VARIANTS[y]}\n" for i, y in lines[name])
    return lines


def make_imagenet_r(root):
    ddir = os.path.join(root, "imagenet-rendition")
    os.makedirs(os.path.join(ddir, "imagenet-r"), exist_ok=True)
    with open(os.path.join(ddir, "classnames.txt"), "w") as f:
        f.writelines(f"{w} {n}\n" for w, n in IMAGENET_LINES)
    with open(os.path.join(ddir, "imagenet-r", "README.txt"), "w") as f:
        f.write("ImageNet-R readme, not a class\n")
    for wnid, n in (("n02123045", 2), ("n01443537", 3), ("n04552348", 1)):
        for i in range(n):
            write_image(os.path.join(ddir, "imagenet-r", wnid, f"art_{i}.jpg"))


def make_imagenet_v2(root):
    ddir = os.path.join(root, "imagenetv2")
    os.makedirs(ddir, exist_ok=True)
    with open(os.path.join(ddir, "classnames.txt"), "w") as f:
        f.writelines(f"{w} {n}\n" for w, n in IMAGENET_LINES)
    for y in range(len(IMAGENET_LINES)):
        for i in range(y % 3 + 1):
            write_image(os.path.join(ddir, "imagenetv2-matched-frequency-format-val", str(y), f"{i}abc.jpeg"))


@pytest.fixture(scope="session")
def tree(tmp_path_factory):
    """(root, splits): eurosat, oxford_pets, stanford_cars, fgvc_aircraft, imagenet, imagenet-r, imagenet-v2. Shared
    by the whole session: tests that write caches or break files use tree_copy."""
    root = str(tmp_path_factory.mktemp("DATA"))
    splits = {
        "eurosat": make_json_dataset(root, "eurosat", EUROSAT_FOLDERS, EUROSAT_NAMES, EUROSAT_COUNTS),
        "oxford_pets": make_json_dataset(root, "oxford_pets", PETS_NAMES, PETS_NAMES, PETS_COUNTS, seed=3),
        "stanford_cars": make_json_dataset(root, "stanford_cars", ["cars_train"] * 3, CARS_NAMES, CARS_COUNTS),
        "fgvc_aircraft": make_fgvc(root),
    }
    make_imagenet(root)
    make_imagenet_r(root)
    make_imagenet_v2(root)
    return root, splits


@pytest.fixture
def tree_copy(tree, tmp_path):
    """A private copy for tests that write caches or break files."""
    root = str(tmp_path / "DATA")
    shutil.copytree(tree[0], root)
    return root, tree[1]


# ----------------------------------------------------------------------------------------------------------------------
# A benchmark of four colours (test_train.py, test_faults.py)

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


# A mini world with fewer images per class (same classes and renderer): a draw takes well under a second
SMALL_WORLD = {"mini_world": (3, 1, 2), "mini_world_fine": (3, 1, 2), "mini_world_texture": (3, 1, 2),
               "mini_world_satellite": (3, 1, 2), "mini_world_xd": (2, 1, 2),
               "mini_world_shift": (0, 0, 2)}  # train, val, test images per class


@pytest.fixture
def small_world(monkeypatch):
    from world import mini_world  # (imported here: conftest is loaded before the test files choose what they import)
    for name, sizes in SMALL_WORLD.items():
        monkeypatch.setitem(mini_world.WORLD_DATASETS, name, dict(mini_world.WORLD_DATASETS[name], split_sizes=sizes))


def run_maple(tmp_path, tiny, colours, *flags, name="run"):
    """train.main of a quick MaPLe run (2 epochs, depth 2) on a colour benchmark, into tmp_path / name."""
    import train  # (imported here: conftest is loaded before the test files choose what they import)
    argv = ["--method", "maple", "--subsample", "all", "--output", str(tmp_path / name), "--epochs", "2",
            "--depth", "2", *flags]
    return train.main(argv, clip_model=tiny, benchmarks={"all": colours})


# ----------------------------------------------------------------------------------------------------------------------
# The shared prefix (test_clip_layers.py, test_methods.py)

def spy_shared(monkeypatch):
    """A list that receives the own rows (T) of every clip_engine.block_after_prefix call from now on."""
    calls, stock = [], clip_engine.block_after_prefix

    def counting(block, own, prefix, rows, eot_only=False):
        calls.append(own.shape[0])
        return stock(block, own, prefix, rows, eot_only)

    monkeypatch.setattr(clip_engine, "block_after_prefix", counting)
    return calls
