"""
Faults in the data a run reads, met where the data is loaded and not after a whole training: the mini world drawn by
several processes at once, a --root that is a file or read-only, an unknown --dataset, malformed split files, class
names too long for CLIP, classes without test images, decompression bombs, class folders linked to another disk.
CPU, the shared tiny CLIP, fake CoOp trees (conftest.py) and a small mini world drawn here.
"""
import errno
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from contextlib import nullcontext

import pytest
import torch

from engine import checkpoints
from engine import inputs
import data
from world import mini_world
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project folder


def edit_world_split(root, change):
    path = os.path.join(root, "mini_world", mini_world.WORLD_SPLIT_FILES["mini_world"])
    with open(path) as f:
        split = json.load(f)
    change(split)
    with open(path, "w") as f:
        json.dump(split, f)
    return path


def run_world(root, tmp_path, tiny, *flags):
    """A base-to-new maple run in the small world under `root`: 1 epoch of a few images."""
    return train.main(["--method", "maple", "--depth", "2", "--epochs", "1", "--shots", "2", "--root", str(root),
                       "--output", str(tmp_path / "run"), *flags], clip_model=tiny)


NEW = mini_world.base_new_labels(data.WORLD["mini_world"].classes)[1]  # mini_world's new labels, 18..35


def png_header(width, height):
    """A PNG that declares width x height pixels and holds almost none: what a decompression bomb looks like to a
    reader that trusts the header."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b""))


# ----------------------------------------------------------------------------------------------------------------------
# Item 6: the world's first draw, by several processes at once

CHILD = textwrap.dedent("""
    import json, os, sys, time
    sys.path.insert(0, {here!r})
    from world import mini_world
    from PIL import Image
    root, go, ready = sys.argv[1], sys.argv[2], sys.argv[3]
    mini_world.WORLD_DATASETS["mini_world_shift"]["split_sizes"] = (0, 0, 5)
    open(ready, "w").close()
    while not os.path.exists(go):  # all start drawing at the same moment
        time.sleep(0.005)
    mini_world.render_world(root, datasets=("mini_world_shift",))
    split = mini_world.read_world_split(root, "mini_world_shift")
    for impath, _, _ in split["test"]:  # every image, fully decoded, as a run reads them
        with Image.open(os.path.join(root, "mini_world_shift", "images", impath)) as img:
            img.load()
    print("read", len(split["test"]))
""")


def test_processes_started_at_once_on_a_new_root_draw_the_world_once(tmp_path):
    root, go = tmp_path / "DATA", tmp_path / "go"
    n = 2
    procs = [subprocess.Popen([sys.executable, "-c", CHILD.format(here=ROOT), str(root), str(go),
                               str(tmp_path / f"ready{i}")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(n)]
    deadline = time.time() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(n)) and time.time() < deadline:
        time.sleep(0.01)
    go.touch()
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert all("read 180" in out for out in outputs), outputs  # 36 classes x 5 test images, each read whole
    assert sum(out.count("rendered mini_world_shift") for out in outputs) == 1, outputs  # one drew, the others waited
    assert sorted(os.listdir(root)) == ["mini_world_shift"]  # no lock file or temporary folder left behind


# ----------------------------------------------------------------------------------------------------------------------
# Item 8: --root that is a file or read-only; an unknown --dataset

def test_root_that_is_a_file_is_named(tmp_path, tiny, small_world):
    root = tmp_path / "DATA"
    root.write_text("not a folder")
    with pytest.raises(NotADirectoryError, match=r"--root .*DATA is a file, not a folder"):
        mini_world.render_world(root, datasets=("mini_world",))
    with pytest.raises(OSError, match=r"--root .*DATA is a file"):
        run_world(root, tmp_path, tiny)
    with pytest.raises(FileNotFoundError, match=r"--root .*DATA itself is not a folder"):  # a CoOp dataset
        data.load_benchmark("eurosat", str(root), shots=2, seed=1)
    assert root.read_text() == "not a folder"


def test_check_says_when_the_root_is_a_file(tmp_path, capsys):
    (tmp_path / "DATA").write_text("not a folder")
    assert data.main(["--check", "--root", str(tmp_path / "DATA")]) == 1
    assert "DATA is not a folder" in capsys.readouterr().out


def make_read_only(root, monkeypatch):
    """chmod does not stop root, so as root a read-only mount is simulated: creating a file or folder in it fails."""
    if os.geteuid() != 0:
        os.chmod(root, 0o555)
        return
    real_open, real_mkdir, inside = os.open, os.mkdir, str(root) + os.sep

    def refuse(path):
        if os.path.abspath(path).startswith(inside):
            raise OSError(errno.EROFS, "Read-only file system", str(path))

    def open_(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return real_open(path, flags, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        refuse(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "mkdir", mkdir)


def test_read_only_root_is_named_and_a_drawn_world_still_reads(tmp_path, small_world, monkeypatch):
    empty, drawn = tmp_path / "empty", tmp_path / "drawn"
    empty.mkdir()
    mini_world.render_world(drawn, datasets=("mini_world",))
    make_read_only(empty, monkeypatch)
    make_read_only(drawn, monkeypatch)
    try:
        with pytest.raises(OSError, match=r"--root .*empty: cannot draw the mini world's mini_world there .*"
                                          r"give --root a folder this process can write"):
            mini_world.render_world(empty, datasets=("mini_world",))
        bench = data.load_benchmark("mini_world", str(drawn), shots=2, seed=1, subsample="base")
        assert len(bench.classnames) == 18
    finally:
        monkeypatch.undo()
        os.chmod(empty, 0o755)
        os.chmod(drawn, 0o755)


def test_unknown_dataset_is_named_before_the_clip_loads(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown dataset 'eurosatt' \(--dataset\)\. Known datasets: .*eurosat, .*"
                                         r"mini_world, mini_world_fine, mini_world_texture, mini_world_satellite, "
                                         r"mini_world_xd, mini_world_shift\..*Did you mean eurosat\?"):
        train.main(["--dataset", "eurosatt", "--root", str(tmp_path), "--output", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()  # nothing made for a run that cannot start


def test_protocol_of_an_unknown_dataset_is_named_before_the_clip_loads(tmp_path, monkeypatch):
    from tools import protocols
    monkeypatch.setattr(inputs, "clip_for", lambda *a, **k: pytest.fail("CLIP loaded before the dataset was checked"))
    with pytest.raises(ValueError, match=r"Unknown dataset 'eurosatt'.*Did you mean eurosat\?"):
        protocols.run_protocol("base2new", ["--method", "mpl"], ["eurosatt"], out=str(tmp_path))


def test_check_of_an_unknown_dataset_is_one_error_line(tree, capsys):
    assert data.main(["--check", "--root", tree[0], "--dataset", "eurosatt"]) == 1
    assert capsys.readouterr().out.startswith("error: Unknown dataset 'eurosatt' (--dataset)")


# ----------------------------------------------------------------------------------------------------------------------
# Item 8: JSON nested far too deep; a class folder linked to another disk

DEEP = "[" * 200_000 + "]" * 200_000


def test_split_file_nested_too_deep_is_named_and_check_prints_its_table(tree_copy, capsys):
    root, _ = tree_copy
    path = os.path.join(root, "eurosat", "split_zhou_EuroSAT.json")
    with open(path, "w") as f:
        f.write(DEEP)
    with pytest.raises(ValueError, match=r"split_zhou_EuroSAT\.json is malformed: its JSON is nested too deeply"):
        data.load_benchmark("eurosat", root, shots=2, seed=1)
    assert data.main(["--check", "--root", root]) == 1
    out = capsys.readouterr().out
    assert "dataset" in out.splitlines()[1] and "oxford_pets" in out  # the whole table, then the error
    assert "error: eurosat:" in out and "nested too deeply" in out


def test_few_shot_cache_and_world_manifest_nested_too_deep_are_redrawn(tree_copy, tmp_path, small_world):
    root, _ = tree_copy
    first = data.load_benchmark("eurosat", root, shots=2, seed=1)
    cache_dir = os.path.join(root, "eurosat", data.FEWSHOT_CACHE_DIR)
    for name in os.listdir(cache_dir):
        with open(os.path.join(cache_dir, name), "w") as f:
            f.write(DEEP)
    assert data.load_benchmark("eurosat", root, shots=2, seed=1).train == first.train  # a miss: drawn again
    folder = mini_world.render_world(tmp_path / "world", datasets=("mini_world",))["mini_world"]
    with open(os.path.join(folder, "world_manifest.json"), "w") as f:
        f.write(DEEP)
    mini_world.render_world(tmp_path / "world", datasets=("mini_world",))  # an unfinished draw: drawn again
    assert mini_world._read_manifest(os.path.join(folder, "world_manifest.json"))["hash"]


def test_class_folder_linked_to_another_disk_is_followed(tree_copy, tmp_path):
    root, splits = tree_copy
    image_root = os.path.join(root, "eurosat", "2750")
    elsewhere = tmp_path / "other_disk" / "Forest"
    shutil.move(os.path.join(image_root, "Forest"), elsewhere)
    os.symlink(elsewhere, os.path.join(image_root, "Forest"))
    b = data.load_benchmark("eurosat", root, shots=None, seed=1, cache=False)
    forest = [d for d in b.train + b.val + b.test if d.classname == "Forest"]
    assert len(forest) == sum(1 for s in splits["eurosat"].values() for _, y, _ in s if y == 1)
    assert all(d.impath.startswith(os.path.join(image_root, "Forest") + os.sep) for d in forest)
    # ... but a split path still may not climb out of the image folder, through the link or otherwise
    (tmp_path / "other_disk" / "secret.jpg").write_bytes(open(forest[0].impath, "rb").read())
    split = json.loads(json.dumps(splits["eurosat"]))
    split["test"][0][0] = "Forest/../secret.jpg"  # inside by its letters, outside on the disk
    with open(os.path.join(root, "eurosat", "split_zhou_EuroSAT.json"), "w") as f:
        json.dump(split, f)
    with pytest.raises(ValueError, match=r"'Forest/\.\./secret\.jpg' leaves the image folder"):
        data.load_benchmark("eurosat", root, shots=None, seed=1, cache=False)


# ----------------------------------------------------------------------------------------------------------------------
# Item 7: what failed only after a whole training is found where the data is loaded

def test_new_class_name_too_long_for_clip_stops_before_training(tmp_path, tiny, small_world):
    root = tmp_path / "DATA"
    mini_world.render_world(root, datasets=("mini_world",))
    long_name = "very " * 80 + "long circle"  # 82 tokens on its own: over CLIP's context of 77
    path = edit_world_split(root, lambda s: [e.__setitem__(2, long_name) for k in s for e in s[k] if e[1] == NEW[-1]])
    with pytest.raises(ValueError, match=rf"--dataset mini_world: the class name 'very very .*\.\.\.' is too long: "
                                         rf".*CLIP's context of 77 tokens; shorten it in {path}"):
        run_world(root, tmp_path, tiny)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # stopped before training


@pytest.mark.parametrize("labels", [NEW[-1:], NEW], ids=["one new class", "every new class"])
def test_new_classes_without_test_images_stop_before_training(tmp_path, tiny, small_world, labels):
    root = tmp_path / "DATA"
    mini_world.render_world(root, datasets=("mini_world",))
    path = edit_world_split(root, lambda s: s.__setitem__("test", [e for e in s["test"] if e[1] not in labels]))
    with pytest.raises(ValueError, match=rf"{path}: classes \[.*\] \(labels \[{labels[0]}.*\]\) have no test image"):
        run_world(root, tmp_path, tiny)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize("pixels", [30_000, 10_000], ids=["error", "warning"])  # 900 M and 100 M pixels
def test_decompression_bomb_in_the_test_split_is_named_before_training(tmp_path, tiny, small_world, pixels):
    root = tmp_path / "DATA"
    mini_world.render_world(root, datasets=("mini_world",))
    impath = next(p for p, y, _ in mini_world.read_world_split(root, "mini_world")["test"] if y == NEW[-1])
    bomb = root / "mini_world" / "images" / impath
    bomb.write_bytes(png_header(pixels, pixels))
    with pytest.raises(ValueError, match=rf"image {bomb} \(listed in .*split_zhou_MiniWorld\.json\) is too large to "
                                         rf"read safely: .*{pixels * pixels} pixels"):
        run_world(root, tmp_path, tiny)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_bomb_read_by_the_dataset_itself_is_named(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(30_000, 30_000))
    dataset = data.ImageDataset([data.Datum(str(bomb), 0, "red")], data.test_transform(32))
    with pytest.raises(OSError, match=rf"could not read image {bomb}: .*decompression bomb"):
        dataset[0]


def test_a_dataset_of_one_class_has_no_new_classes(tree_copy):
    root, splits = tree_copy
    split = {k: [e for e in v if e[1] == 0] for k, v in splits["eurosat"].items()}
    with open(os.path.join(root, "eurosat", "split_zhou_EuroSAT.json"), "w") as f:
        json.dump(split, f)
    assert data.load_benchmark("eurosat", root, shots=2, seed=1, subsample="base").num_classes == 1
    with pytest.raises(ValueError, match=r"--subsample new selects no class of .*split_zhou_EuroSAT\.json"):
        data.load_benchmark("eurosat", root, shots=2, seed=1, subsample="new")


def test_an_image_that_is_no_image_is_named_before_training(tmp_path, tiny, small_world):
    root = tmp_path / "DATA"
    mini_world.render_world(root, datasets=("mini_world",))
    impath = next(p for p, y, _ in mini_world.read_world_split(root, "mini_world")["test"] if y == NEW[-1])
    (root / "mini_world" / "images" / impath).write_bytes(b"<html>404 not found</html>")
    with pytest.raises(OSError, match=rf"could not read image .*{impath} \(listed in .*\): cannot identify"):
        run_world(root, tmp_path, tiny)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_building_the_new_classes_before_training_changes_no_result(tmp_path, tiny, small_world):
    """The new classes' model is now also built once before training (before the torch RNG is seeded for the
    prompts): the trained prompts and both scores are those of a base-only run whose prompts are then scored on the
    new classes."""
    root = tmp_path / "DATA"
    mini_world.render_world(root, datasets=("mini_world",))
    b2n = run_world(root, tmp_path, tiny)
    flags = ["--method", "maple", "--depth", "2", "--epochs", "1", "--shots", "2", "--root", str(root)]
    base = train.main(flags + ["--subsample", "base", "--output", str(tmp_path / "base")], clip_model=tiny)
    trained = torch.load(tmp_path / "base" / "checkpoint.pt", weights_only=True)["params"]
    again = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["params"]
    assert trained.keys() == again.keys() and all(torch.equal(trained[k], again[k]) for k in trained)
    assert b2n["accuracy"]["base"] == base["accuracy"]["base"]
    args = train.get_args(flags)
    args.workers = 0
    new = data.load_benchmark("mini_world", str(root), 2, 1, "new")
    model = train.build_model(args, tiny, new.classnames, new.template)
    checkpoints.load_trainable(model, trained, "the base run's prompts")
    assert train.evaluate(model, new.test, args, nullcontext) == b2n["accuracy"]["new"]
