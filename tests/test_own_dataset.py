"""A dataset of your own (data.own_dataset): a folder of class folders, split once exactly as CoOp's own code splits
one, or a folder with a CoOp split file; then train.py, data.py --check and the protocols read it like any CoOp
dataset. The split is compared with the output of CoOp's real read_and_split_data (tests/fixtures/)."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import data
import train
from engine import inputs
from tools import protocols

HERE = os.path.dirname(os.path.abspath(__file__))
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def image_folders(folder, n=8, size=32, seed=0):
    """folder/<colour>/img_<i>.png: four classes told apart by colour, n noisy images each."""
    rng = np.random.default_rng(seed)
    for name, rgb in COLOURS.items():
        os.makedirs(os.path.join(folder, name))
        for i in range(n):
            img = np.clip(np.array(rgb) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(os.path.join(folder, name, f"img_{i}.png"))
    return str(folder)


def test_the_split_is_coops_own(tmp_path):
    """make_split on the tree that CoOp's DescribableTextures.read_and_split_data split (random.seed(1), names
    sorted) writes exactly the split that CoOp's code wrote."""
    with open(os.path.join(HERE, "fixtures", "coop_read_and_split.json")) as f:
        golden = json.load(f)
    folder = tmp_path / "mydata"
    for c, files in golden["tree"].items():
        (folder / c).mkdir(parents=True)
        for name in files:
            (folder / c / name).write_bytes(b"")
    (folder / "forest" / "notes.txt").write_text("not an image")  # only images count
    assert data.make_split(str(folder), "split_mydata.json") == "split_mydata.json"
    with open(folder / "split_mydata.json") as f:
        assert json.load(f) == golden["split"]


def test_a_folder_of_class_folders_runs_base_to_new(tmp_path, tiny, capsys):
    folder = image_folders(tmp_path / "colours")
    out = tmp_path / "run"
    acc = train.main(["--method", "maple", "--dataset", folder, "--shots", "2", "--epochs", "2", "--depth", "2",
                      "--output", str(out)], clip_model=tiny)
    printed = capsys.readouterr().out
    assert "a split made from the class folders" in printed and os.path.isfile(os.path.join(folder,
                                                                                             "split_colours.json"))
    with open(out / "results.json") as f:
        results = json.load(f)
    assert results == acc and set(results["accuracy"]) == {"base", "new", "hm"}
    assert results["identity"]["dataset"] == "colours"
    # base: the first two colours (sorted: blue, green), new: red, yellow; 8 images -> 4 train, 2 val, 2 test each
    key, root, spec = data.own_dataset(folder)
    base = data.load_benchmark(key, root, 2, 1, "base", spec=spec)
    assert base.classnames == ["blue", "green"] and len(base.train) == 4 and len(base.test) == 4
    assert spec.template == "a photo of a {}."
    # run again: the split is read, not made again, and the finished run is reused
    train.main(["--method", "maple", "--dataset", folder, "--shots", "2", "--epochs", "2", "--depth", "2",
                "--output", str(out)], clip_model=tiny)
    assert "a split made from" not in capsys.readouterr().out


def test_a_folder_with_a_coop_split_file_is_read_as_one(tmp_path):
    folder = tmp_path / "eurosat_like"
    image_folders(folder / "2750", n=5)
    rows = lambda i: [[f"{c}/img_{i}.png", y, c] for y, c in enumerate(sorted(COLOURS))]  # noqa: E731
    split = {"train": rows(0) + rows(1), "val": rows(2), "test": rows(3) + rows(4)}
    (folder / "split_zhou_Mine.json").write_text(json.dumps(split))
    (folder / "template.txt").write_text("a satellite photo of {}.\n")
    key, root, spec = data.own_dataset(str(folder))
    assert (key, root, spec.image_dir, spec.template) == ("eurosat_like", str(tmp_path), "2750",
                                                          "a satellite photo of {}.")
    b = data.load_benchmark(key, root, 1, 1, spec=spec)
    assert b.classnames == sorted(COLOURS) and len(b.train) == 4 and len(b.test) == 8
    assert data.check(str(tmp_path / "nowhere"), [str(folder)], out=lambda *a: None)[0]["status"] == "ok"


@pytest.mark.parametrize("make, message", [
    (lambda f: None, r"does not exist"),
    (lambda f: os.makedirs(os.path.join(f, "only_one")), r"no split_\*\.json and 1 class folder"),
    (lambda f: [os.makedirs(os.path.join(f, c)) for c in ("a", "b")], r"class folder 'a' holds 0 images"),
    (lambda f: [open(os.path.join(f, n), "w").write("{}") or os.makedirs(f, exist_ok=True)
                for n in ("split_a.json", "split_b.json")] if os.makedirs(f) is None else None,
     r"holds 2 split files"),
])
def test_what_is_not_a_dataset_is_said(tmp_path, make, message):
    folder = str(tmp_path / "mine")
    make(folder)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        inputs.check_dataset_name(folder)


def test_protocols_name_a_folder_by_its_name(tmp_path):
    folder = image_folders(tmp_path / "colours", n=4)
    (command,) = protocols.pending_commands("base2new", ["--method", "maple"], [folder], [1], out=str(tmp_path / "o"))
    assert f"--datasets {folder}" in command
    assert inputs.name_of(folder) == "colours" and inputs.name_of(None) == "mini_world"
    assert protocols.run_path("o", "base2new", "maple", inputs.name_of(folder), 16, 1) == \
        os.path.join("o", "base2new", "maple", "colours", "shots16_seed1")
