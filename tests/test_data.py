"""
Tests for data.py on fake CoOp trees (built in conftest.py): real folder layout and split-file formats, tiny JPEGs,
CPU only.

The few-shot checks compare against an independent re-implementation of Dassl's sampler written here from
Dassl's generate_fewshot_dataset (on *indices* into the split lists), so data.py cannot pass by agreeing with itself.
"""

import errno
import json
import math
import os
import random
import shutil

import pytest
import torch
from PIL import Image

import data
from conftest import (CARS_NAMES, EUROSAT_COUNTS, EUROSAT_FOLDERS, EUROSAT_NAMES, FGVC_VARIANTS, IMAGENET_FOLDERS,
                      IMAGENET_LINES, IMAGENET_TRAIN, IMAGENET_VAL, PETS_NAMES, make_imagenet, make_json_dataset)

# -----------------------------------------------------------------------------
# Independent re-implementation of Dassl's sampler, on indices

def reference_fewshot(labels, k):
    groups = {}  # insertion-ordered: labels in first-appearance order
    for i, y in enumerate(labels):
        groups.setdefault(y, []).append(i)
    picked = []
    for idx in groups.values():
        picked += random.sample(idx, k) if len(idx) >= k else idx
    return picked


def indices(items, root_dir, split_rows):
    where = {os.path.join(root_dir, row[0]): i for i, row in enumerate(split_rows)}
    return [where[d.impath] for d in items]


# -----------------------------------------------------------------------------
# Loading: labels, class names, paths

def test_json_dataset_full_split(tree):
    root, splits = tree
    b = data.load_benchmark("eurosat", root, shots=None, seed=1, cache=False)
    image_root = os.path.join(root, "eurosat", "2750")
    assert b.name == "eurosat"
    assert b.classnames == EUROSAT_NAMES
    assert b.template == "a centered satellite photo of {}."
    for name in ("train", "val", "test"):
        got = [(d.impath, d.label, d.classname) for d in getattr(b, name)]
        assert got == [(os.path.join(image_root, p), y, c) for p, y, c in splits["eurosat"][name]]
        assert all(os.path.isabs(d.impath) and os.path.isfile(d.impath) for d in getattr(b, name))


def test_underscores_replaced_in_classnames_only(tree):
    root, splits = tree
    b = data.load_benchmark("OxfordPets", root, shots=None, seed=1, cache=False)
    assert b.name == "oxford_pets"
    assert b.classnames == [n.replace("_", " ") for n in PETS_NAMES]
    assert b.classnames[1] == "american bulldog"
    assert {d.classname for d in b.train if d.label == 1} == {"american_bulldog"}  # Datum keeps the split's spelling
    assert b.template == "a photo of a {}, a type of pet."


def test_stanford_cars_image_root_is_dataset_dir(tree):
    root, _ = tree
    b = data.load_benchmark("stanford_cars", root, shots=None, seed=1, cache=False)
    assert b.classnames == CARS_NAMES
    assert all(d.impath.startswith(os.path.join(root, "stanford_cars", "cars_train") + os.sep) for d in b.test)


def test_imagenet_layout(tree):
    root, _ = tree
    b = data.load_benchmark("imagenet", root, shots=None, seed=1, cache=False)
    names = dict(IMAGENET_LINES)
    assert b.classnames == [names[w] for w in IMAGENET_FOLDERS]
    images = os.path.join(root, "imagenet", "images")
    expected_train = [(os.path.join(images, "train", w, f), y, names[w])
                      for y, w in enumerate(IMAGENET_FOLDERS)
                      for f in sorted(f"{w}_{i}.JPEG" for i in range(IMAGENET_TRAIN[y]))]
    assert [(d.impath, d.label, d.classname) for d in b.train] == expected_train
    assert len(b.test) == sum(IMAGENET_VAL)
    assert all(os.path.basename(os.path.dirname(d.impath)) == IMAGENET_FOLDERS[d.label] for d in b.test)
    assert b.val == b.test  # CoOp: ImageNet val is the test set


def test_fgvc_aircraft_variant_files(tree):
    root, splits = tree
    b = data.load_benchmark("FGVCAircraft", root, shots=None, seed=1, cache=False)
    assert b.classnames == FGVC_VARIANTS
    image_root = os.path.join(root, "fgvc_aircraft", "images")
    for name in ("train", "val", "test"):
        got = [(d.impath, d.label, d.classname) for d in getattr(b, name)]
        assert got == [(os.path.join(image_root, i + ".jpg"), y, FGVC_VARIANTS[y])
                       for i, y in splits["fgvc_aircraft"][name]]


def test_imagenet_r_and_v2_are_test_only(tree):
    root, _ = tree
    names = dict(IMAGENET_LINES)
    r = data.load_benchmark("imagenet_r", root, shots=16, seed=1)
    assert r.train == [] and r.val == []
    assert r.classnames == [names["n01443537"], names["n02123045"], names["n04552348"]]  # README.txt ignored
    assert [d.label for d in r.test] == [0, 0, 0, 1, 1, 2]
    v2 = data.load_benchmark("ImageNetV2", root, shots=None, seed=1)
    assert v2.name == "imagenet_v2"
    assert v2.classnames == [n for _, n in IMAGENET_LINES]  # folder i = line i of classnames.txt
    assert [d.label for d in v2.test] == [y for y in range(len(IMAGENET_LINES)) for _ in range(y % 3 + 1)]
    assert not os.path.exists(os.path.join(root, "imagenetv2", data.FEWSHOT_CACHE_DIR))


def test_aliases():
    assert data.resolve_name("DescribableTextures") == "dtd"
    assert data.resolve_name("imagenetv2") == "imagenet_v2"
    assert data.resolve_name("ImageNetSketch") == "imagenet_sketch"
    assert data.resolve_name("oxfordflowers") == "oxford_flowers"
    assert data.resolve_name("SUN397") == "sun397"
    assert set(data.DATASETS) == {"imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers",
                                  "food101", "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101", "imagenet_v2",
                                  "imagenet_sketch", "imagenet_a", "imagenet_r"}  # the world is mini_world.py's


# -----------------------------------------------------------------------------
# Few-shot sampling == Dassl

@pytest.mark.parametrize("key", ["eurosat", "oxford_pets"])
@pytest.mark.parametrize("seed", [1, 2, 3, 17])
@pytest.mark.parametrize("shots", [1, 2, 4, 8, 16])
def test_fewshot_matches_reference(tree, key, seed, shots):
    root, splits = tree
    split = splits[key]
    random.seed(seed)
    exp_train = reference_fewshot([y for _, y, _ in split["train"]], shots)
    exp_val = reference_fewshot([y for _, y, _ in split["val"]], min(shots, 4))
    random.seed(999)  # caller state must not matter: load_benchmark seeds `random` itself
    random.random()
    b = data.load_benchmark(key, root, shots=shots, seed=seed, cache=False)
    image_root = os.path.join(root, data.DATASETS[key].dir, data.DATASETS[key].image_dir)
    assert indices(b.train, image_root, split["train"]) == exp_train
    assert indices(b.val, image_root, split["val"]) == exp_val
    assert len(b.test) == len(split["test"])


def test_fewshot_small_classes_keep_everything(tree):
    root, splits = tree
    b = data.load_benchmark("eurosat", root, shots=16, seed=1, cache=False)
    per_class = [sum(d.label == y for d in b.train) for y in range(6)]
    assert per_class == [min(n, 16) for n in EUROSAT_COUNTS["train"]]  # 3, 1 and 9 images: all kept


@pytest.mark.parametrize("seed,shots", [(1, 1), (2, 4), (3, 16)])
def test_fewshot_fgvc_and_imagenet(tree, seed, shots):
    root, splits = tree
    random.seed(seed)
    exp_train = reference_fewshot([y for _, y in splits["fgvc_aircraft"]["train"]], shots)
    exp_val = reference_fewshot([y for _, y in splits["fgvc_aircraft"]["val"]], min(shots, 4))
    b = data.load_benchmark("fgvc_aircraft", root, shots=shots, seed=seed, cache=False)
    rows = [[i + ".jpg"] for i, _ in splits["fgvc_aircraft"]["train"]]
    image_root = os.path.join(root, "fgvc_aircraft", "images")
    assert indices(b.train, image_root, rows) == exp_train
    assert indices(b.val, image_root, [[i + ".jpg"] for i, _ in splits["fgvc_aircraft"]["val"]]) == exp_val

    # ImageNet: only train is drawn, over the sorted listing; val == test == the full val folder
    full = data.load_benchmark("imagenet", root, shots=None, seed=seed, cache=False)
    random.seed(seed)
    exp = reference_fewshot([d.label for d in full.train], shots)
    b = data.load_benchmark("imagenet", root, shots=shots, seed=seed, cache=False)
    assert b.train == [full.train[i] for i in exp]
    assert b.test == full.test and b.val == full.test


def test_shots_none_draws_nothing(tree):
    root, _ = tree
    random.seed(5)
    state = random.getstate()
    data.load_benchmark("eurosat", root, shots=None, seed=1, cache=False)
    assert random.getstate() == state


# -----------------------------------------------------------------------------
# Base / new

@pytest.mark.parametrize("key,n", [("oxford_pets", 7), ("eurosat", 6), ("imagenet", 5), ("fgvc_aircraft", 4)])
def test_base_new_split(tree, key, n):
    root, _ = tree
    full = data.load_benchmark(key, root, shots=4, seed=2, cache=False)
    m = math.ceil(n / 2)
    assert full.num_classes == n
    base = data.load_benchmark(key, root, shots=4, seed=2, subsample="base", cache=False)
    new = data.load_benchmark(key, root, shots=4, seed=2, subsample="new", cache=False)
    assert base.classnames == full.classnames[:m] and new.classnames == full.classnames[m:]
    assert len(base.classnames) + len(new.classnames) == n
    for part, offset, keep in ((base, 0, range(m)), (new, m, range(m, n))):
        for name in ("train", "val", "test"):
            # sampled over all classes first, then filtered and relabelled (order kept)
            expected = [data.Datum(d.impath, d.label - offset, d.classname)
                        for d in getattr(full, name) if d.label in keep]
            assert getattr(part, name) == expected
        assert {d.label for d in part.test} == set(range(len(keep)))


# -----------------------------------------------------------------------------
# Few-shot cache

def cache_files(root, key):
    folder = os.path.join(root, data.DATASETS[key].dir, data.FEWSHOT_CACHE_DIR)
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_cache_written_relative_and_checked(tree_copy, capsys):
    root, splits = tree_copy
    b = data.load_benchmark("eurosat", root, shots=4, seed=1)
    files = cache_files(root, "eurosat")
    assert len(files) == 1 and files[0].startswith("eurosat-shot_4-seed_1-split_") and files[0].endswith(".json")
    assert not os.path.exists(os.path.join(root, "eurosat", "split_fewshot"))  # Dassl's folder is never touched
    path = os.path.join(root, "eurosat", data.FEWSHOT_CACHE_DIR, files[0])
    with open(path) as f:
        cached = json.load(f)
    assert (cached["dataset"], cached["shots"], cached["seed"]) == ("eurosat", 4, 1)
    image_root = os.path.join(root, "eurosat", "2750")
    assert cached["train"] == [[os.path.relpath(d.impath, image_root), d.label, d.classname] for d in b.train]
    assert all(not os.path.isabs(p) for p, _, _ in cached["train"] + cached["val"])

    # an edited cache (valid JSON, a subset of the split: a class cut to 2 images) is a miss: the run trains on the
    # seed's draw, says so, and the record is rewritten
    edited = dict(cached, train=[row for row in cached["train"] if row[1] != 0] + cached["train"][:2])
    for train in (edited["train"], edited["train"] + [["AnnualCrop/not_in_split.jpg", 0, "Annual Crop Land"]]):
        with open(path, "w") as f:
            json.dump(dict(cached, train=train), f)
        again = data.load_benchmark("eurosat", root, shots=4, seed=1)
        assert again.train == b.train and again.val == b.val
        assert "differs from the draw of seed 1: drawn again and rewritten" in capsys.readouterr().out
        with open(path) as f:
            assert json.load(f) == cached
    data.load_benchmark("eurosat", root, shots=4, seed=1)  # the record as drawn: nothing said
    assert capsys.readouterr().out == ""


def test_cache_imagenet_train_only(tree_copy):
    root, _ = tree_copy
    b = data.load_benchmark("imagenet", root, shots=2, seed=1)
    (fname,) = cache_files(root, "imagenet")
    path = os.path.join(root, "imagenet", data.FEWSHOT_CACHE_DIR, fname)
    with open(path) as f:
        cached = json.load(f)
    assert "val" not in cached and [row[0] for row in cached["train"]][:2] == \
        [os.path.relpath(d.impath, os.path.join(root, "imagenet", "images")) for d in b.train][:2]
    assert cached["train"][0][0].startswith("train" + os.sep)
    cached["train"] = cached["train"][:3]  # an edited record is not what the run trains on
    with open(path, "w") as f:
        json.dump(cached, f)
    again = data.load_benchmark("imagenet", root, shots=2, seed=1)
    assert again.train == b.train and again.test == b.test


def test_cache_moves_with_root(tree_copy, tmp_path):
    root, _ = tree_copy
    first = data.load_benchmark("oxford_pets", root, shots=2, seed=3)
    moved = str(tmp_path / "moved")
    shutil.move(root, moved)
    b = data.load_benchmark("oxford_pets", moved, shots=2, seed=3)
    assert [os.path.relpath(d.impath, moved) for d in b.train] == [os.path.relpath(d.impath, root) for d in first.train]
    assert all(os.path.isfile(d.impath) for d in b.train)


def test_cache_key_changes_with_split_file(tree_copy):
    root, splits = tree_copy
    data.load_benchmark("eurosat", root, shots=2, seed=1)
    split = splits["eurosat"]
    new_split = dict(split, train=split["train"][::-1])  # same images, another order -> another draw
    with open(os.path.join(root, "eurosat", "split_zhou_EuroSAT.json"), "w") as f:
        json.dump(new_split, f)
    random.seed(1)
    exp = reference_fewshot([y for _, y, _ in new_split["train"]], 2)
    b = data.load_benchmark("eurosat", root, shots=2, seed=1)
    assert indices(b.train, os.path.join(root, "eurosat", "2750"), new_split["train"]) == exp
    assert len(cache_files(root, "eurosat")) == 2  # old entry kept under its own key, never reused


def test_cache_skipped_when_read_only(tree_copy, monkeypatch):
    root, _ = tree_copy

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    # chmod does not stop root, so simulate a read-only mount where the cache file would be created
    monkeypatch.setattr(data.tempfile, "mkstemp", read_only)
    b = data.load_benchmark("eurosat", root, shots=2, seed=1)
    assert len(b.train) == 2 * 5 + 1 and cache_files(root, "eurosat") == []


# -----------------------------------------------------------------------------
# Transforms and the torch Dataset

def test_transforms_follow_resolution():
    img = Image.new("RGB", (60, 40), (255, 0, 128))
    for res in (24, 32):
        x = data.test_transform(res)(img)
        assert x.shape == (3, res, res)
        expected = (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor(data.CLIP_MEAN)) / torch.tensor(data.CLIP_STD)
        assert torch.allclose(x[:, res // 2, res // 2], expected, atol=1e-5)
        assert data.train_transform(res)(img).shape == (3, res, res)
    rrc, flip = data.train_transform(32).transforms[:2]
    assert rrc.scale == (0.08, 1.0) and rrc.interpolation.value == "bicubic" and flip.p == 0.5
    resize, crop = data.test_transform(32).transforms[:2]
    assert resize.size == 32 and resize.interpolation.value == "bicubic" and crop.size == (32, 32)


def test_image_dataset(tree):
    root, _ = tree
    b = data.load_benchmark("eurosat", root, shots=None, seed=1, cache=False)
    ds = data.ImageDataset(b.test, data.test_transform(16))
    image, label, index = ds[3]
    assert image.shape == (3, 16, 16) and label == b.test[3].label and index == 3
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch[0].shape == (4, 3, 16, 16) and batch[2].tolist() == [0, 1, 2, 3]


# -----------------------------------------------------------------------------
# Errors

def test_error_unknown_dataset(tree):
    with pytest.raises(ValueError, match=r"Unknown dataset 'imagenet21k' \(--dataset\)\. Known datasets: "
                                         r"imagenet, caltech101, oxford_pets, .*imagenet_r"):
        data.load_benchmark("imagenet21k", tree[0], shots=16, seed=1)


def test_error_missing_dataset_dir(tree):
    with pytest.raises(FileNotFoundError, match=r"Dataset folder not found: .*dtd\. --dataset dtd expects "
                                                r"\$DATA/dtd .*DTD section of CoOp's DATASETS\.md"):
        data.load_benchmark("dtd", tree[0], shots=16, seed=1)


def test_error_missing_split_file(tmp_path):
    os.makedirs(tmp_path / "caltech-101" / "101_ObjectCategories")
    with pytest.raises(FileNotFoundError, match=r"Split file not found: .*caltech-101.split_zhou_Caltech101\.json\. "
                                                r"Expected split_zhou_Caltech101\.json, downloaded from the Google "
                                                r"Drive link \(see the Caltech101 section of CoOp's DATASETS\.md\)"):
        data.load_benchmark("caltech101", str(tmp_path), shots=16, seed=1)
    os.makedirs(tmp_path / "imagenet" / "images")
    with pytest.raises(FileNotFoundError, match=r"Split file not found: .*imagenet.classnames\.txt\. "
                                                r"Expected classnames\.txt.*ImageNet section"):
        data.load_benchmark("imagenet", str(tmp_path), shots=16, seed=1)
    os.makedirs(tmp_path / "fgvc_aircraft")
    with pytest.raises(FileNotFoundError, match=r"fgvc_aircraft.variants\.txt\. Expected variants\.txt of "
                                                r"fgvc-aircraft-2013b/data \(see the FGVCAircraft section"):
        data.load_benchmark("fgvc_aircraft", str(tmp_path), shots=16, seed=1)


def test_error_missing_images(tree_copy):
    root, splits = tree_copy
    gone = [row[0] for row in splits["eurosat"]["train"][:7]]
    for rel in gone:
        os.remove(os.path.join(root, "eurosat", "2750", rel))
    n = len(splits["eurosat"]["train"])
    with pytest.raises(FileNotFoundError, match=rf"7 of {n} images listed in .*split_zhou_EuroSAT\.json \(train\) "
                                                rf"are missing under .*2750: {gone[0]}, .*{gone[4]}, \.\.\."):
        data.load_benchmark("eurosat", root, shots=16, seed=1)


def test_error_missing_image_folder(tmp_path):
    make_json_dataset(str(tmp_path), "eurosat", EUROSAT_FOLDERS, EUROSAT_NAMES, EUROSAT_COUNTS)
    shutil.rmtree(tmp_path / "eurosat" / "2750")
    with pytest.raises(FileNotFoundError, match=r"Image folder not found: .*eurosat.2750"):
        data.load_benchmark("eurosat", str(tmp_path), shots=16, seed=1)


def test_error_flat_imagenet_val(tmp_path):
    make_imagenet(str(tmp_path), flat_val=True)
    with pytest.raises(ValueError, match=rf"images.val is flat \({sum(IMAGENET_VAL)} files, no class folders\)"):
        data.load_benchmark("imagenet", str(tmp_path), shots=16, seed=1)


def test_error_malformed_split(tree_copy):
    root, splits = tree_copy
    path = os.path.join(root, "oxford_pets", "split_zhou_OxfordPets.json")
    with open(path, "w") as f:
        json.dump(dict(splits["oxford_pets"], test=[["a.jpg", 0]]), f)
    with pytest.raises(ValueError, match=r"an entry of 'test' is not \[path, label, classname\]"):
        data.load_benchmark("oxford_pets", root, shots=16, seed=1)
    with open(path, "w") as f:
        f.write('{"train": [')
    with pytest.raises(ValueError, match=r"split_zhou_OxfordPets\.json is not valid JSON"):
        data.load_benchmark("oxford_pets", root, shots=16, seed=1)


def test_error_empty_split(tree_copy):
    root, splits = tree_copy
    with open(os.path.join(root, "oxford_pets", "split_zhou_OxfordPets.json"), "w") as f:
        json.dump(dict(splits["oxford_pets"], val=[]), f)
    with pytest.raises(ValueError, match=r"The 'val' split read from .*split_zhou_OxfordPets\.json is empty"):
        data.load_benchmark("oxford_pets", root, shots=16, seed=1)


@pytest.mark.parametrize("shots", [0, -1])
def test_error_shots(tree, shots):
    with pytest.raises(ValueError, match=rf"--shots must be >= 1 \(got {shots}\)"):
        data.load_benchmark("eurosat", tree[0], shots=shots, seed=1)


def test_error_bad_subsample_and_seed(tree):
    with pytest.raises(ValueError, match=r"--subsample must be one of"):
        data.load_benchmark("eurosat", tree[0], shots=16, seed=1, subsample="novel")
    with pytest.raises(ValueError, match=r"test-only .*--subsample must be 'all'"):
        data.load_benchmark("imagenet_r", tree[0], shots=16, seed=1, subsample="new")
    with pytest.raises(ValueError, match=r"--seed must be an int >= 0"):
        data.load_benchmark("eurosat", tree[0], shots=16, seed=-1)


# -----------------------------------------------------------------------------
# python data.py --check

def test_check_table(tree, capsys):
    root, _ = tree
    assert data.main(["--check", "--root", root]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = {line.split()[0]: line.split() for line in lines[2:] if line.split()[0] in data.DATASETS}
    assert set(row) == set(data.DATASETS)
    assert row["dtd"][2] == "missing" and row["dtd"][3] == "-/47"
    assert row["eurosat"][2:4] == ["counts", "differ"]
    assert row["eurosat"][4:] == ["6/10", "66/13500", "21/5400", "21/8100"]
    assert row["imagenet"][4:] == ["5/1000", f"{sum(IMAGENET_TRAIN)}/1281167", "=", "test",
                                   f"{sum(IMAGENET_VAL)}/50000"]
    assert row["imagenet_r"][4:] == ["3/200", "-", "-", "6/30000"]


def test_check_reports_errors(tmp_path, capsys):
    os.makedirs(tmp_path / "sun397")
    assert data.main(["--check", "--root", str(tmp_path), "--dataset", "sun397", "eurosat"]) == 1
    out = capsys.readouterr().out
    assert "sun397" in out and " error " in out and "missing" in out
    assert "error: sun397: Split file not found" in out and "split_zhou_SUN397.json" in out


# ----------------------------------------------------------------------------------------------------------------------
# Split files are validated on load, and data.py --check reports what is wrong


def rewrite_split(root, splits, change):
    """Write eurosat's split file with one change: change(split dict) edits a deep copy."""
    split = json.loads(json.dumps(splits["eurosat"]))
    change(split)
    with open(os.path.join(root, "eurosat", "split_zhou_EuroSAT.json"), "w") as f:
        json.dump(split, f)


@pytest.mark.parametrize("change, message", [
    (lambda s: s["train"][0].__setitem__(1, 99), r"labels are not 0\.\.6 \(out of range or missing: \[99\]\)"),
    (lambda s: s["train"][0].__setitem__(1, -1), r"labels are not 0\.\.6 \(out of range or missing: \[-1\]\)"),
    (lambda s: s["test"][0].__setitem__(1, 99), r"out of range or missing: \[99\]"),
    (lambda s: s["train"][0].__setitem__(1, 1.0), r"an entry of 'train' is not \[path, label, classname\].*integer"),
    (lambda s: s["train"][0].__setitem__(2, "Forest"), r"label \d is '[^']+' in one entry and '[^']+' in another"),
    (lambda s: s.__setitem__("train", [e for e in s["train"] if e[1] != 5]),
     r"classes \['Sea or Lake'\] \(labels \[5\]\) are in test but not in train"),
    (lambda s: s["test"][0].__setitem__(0, "../../../../etc/passwd"), r"'\.\./\.\./\.\./\.\./etc/passwd' leaves"),
    (lambda s: s["test"][0].__setitem__(0, "/etc/passwd"), r"'/etc/passwd' leaves the image folder"),
    (lambda s: [e.__setitem__(2, "annual_crop_LAND") for k in s for e in s[k] if e[1] == 1],
     r"split_zhou_EuroSAT\.json: label \d '(Annual Crop Land|annual_crop_LAND)' and label \d "
     r"'(Annual Crop Land|annual_crop_LAND)' are the same class name to CLIP"),
])
def test_split_files_are_validated(tree_copy, change, message, capsys):
    root, splits = tree_copy
    rewrite_split(root, splits, change)
    with pytest.raises(ValueError, match=message):
        data.load_benchmark("eurosat", root, shots=2, seed=1, subsample="base")
    assert data.main(["--check", "--root", root, "--dataset", "eurosat"]) == 1
    assert "error: eurosat:" in capsys.readouterr().out


def test_check_says_when_the_root_is_missing(tmp_path, capsys):
    assert data.main(["--check", "--root", str(tmp_path / "nowhere")]) == 1
    assert "nowhere does not exist" in capsys.readouterr().out
