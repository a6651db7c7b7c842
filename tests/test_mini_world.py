"""Tests of world/: drawing the world, its datasets in CoOp's layout, the shipped tiny CLIP, pre-training."""
import json
import os

import numpy as np
import pytest
import torch

import clip_layers
from conftest import SMALL_WORLD
from world import mini_world, pretrain

SMALL = SMALL_WORLD  # the sizes conftest's small_world fixture draws


@pytest.fixture(scope="module")
def model():
    return mini_world.load_world_clip()


# -----------------------------------------------------------------------------
# rendering


def test_render_image_is_deterministic_and_varies_within_a_class():
    a = mini_world.render_image(np.random.default_rng([0, 1, 2]), "red", "striped", "circle")
    b = mini_world.render_image(np.random.default_rng([0, 1, 2]), "red", "striped", "circle")
    c = mini_world.render_image(np.random.default_rng([0, 1, 3]), "red", "striped", "circle")
    assert a.shape == (mini_world.WORLD_IMAGE_SIZE, mini_world.WORLD_IMAGE_SIZE, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    lamp = lambda: mini_world.render_image(np.random.default_rng([0, 1, 2]), "red", "striped", "circle",
                                      camera=mini_world.WORLD_CAMERAS["lamp"])
    assert np.array_equal(lamp(), lamp()) and not np.array_equal(lamp(), a)
    # same class, another draw: position, size, shade, background all change
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 10
    for style in ("photo", "sketch"):
        for shape in mini_world.WORLD_SHAPES:
            for pattern in mini_world.WORLD_PATTERNS:
                img = mini_world.render_image(np.random.default_rng(0), "blue", pattern, shape, style=style)
                assert img.std() > 5  # something is drawn


def test_render_world_is_deterministic(tmp_path, small_world):
    mini_world.render_world(tmp_path / "a", seed=3)
    mini_world.render_world(tmp_path / "b", seed=3)
    mini_world.render_world(tmp_path / "c", seed=4)
    for name in mini_world.WORLD_DATASETS:
        split_a = mini_world.read_world_split(tmp_path / "a", name)
        assert split_a == mini_world.read_world_split(tmp_path / "b", name)
        for impath, _, _ in split_a["train"] + split_a["test"]:
            bytes_a = (tmp_path / "a" / name / "images" / impath).read_bytes()
            assert bytes_a == (tmp_path / "b" / name / "images" / impath).read_bytes()
    # another seed, other images
    impath = mini_world.read_world_split(tmp_path / "a", "mini_world")["test"][0][0]
    image = lambda root: (root / "mini_world" / "images" / impath).read_bytes()
    assert image(tmp_path / "a") != image(tmp_path / "c")


def test_split_json_schema_and_counts(tmp_path, small_world):
    folders = mini_world.render_world(tmp_path)
    n_classes = {"mini_world": 36, "mini_world_xd": 24, "mini_world_shift": 36}
    for name, folder in folders.items():
        with open(os.path.join(folder, mini_world.WORLD_SPLIT_FILES[name])) as f:
            split = json.load(f)
        assert set(split) == {"train", "val", "test"}
        names = {}
        for key, per_class in zip(("train", "val", "test"), SMALL[name]):
            items = split[key]
            assert len(items) == per_class * n_classes[name]
            for item in items:
                impath, label, classname = item
                assert len(item) == 3 and isinstance(impath, str) and type(label) is int and isinstance(classname, str)
                assert not impath.startswith("/") and os.path.isfile(os.path.join(folder, "images", impath))
                assert names.setdefault(label, classname) == classname  # one name per label, across splits
        assert sorted(names) == list(range(n_classes[name]))  # 0-based, contiguous
        assert len(set(names.values())) == n_classes[name]
    assert mini_world.read_world_split(tmp_path, "mini_world_shift")["train"] == []
    # the shift dataset has the same classes, under the same labels, as mini_world
    labels = lambda name: sorted({(l, c) for _, l, c in mini_world.read_world_split(tmp_path, name)["test"]})
    assert labels("mini_world_shift") == labels("mini_world")


def test_render_world_is_idempotent_and_keeps_user_files(tmp_path, small_world):
    (tmp_path / "notes.txt").write_text("mine")
    folder = mini_world.render_world(tmp_path)["mini_world"]
    split_file = os.path.join(folder, mini_world.WORLD_SPLIT_FILES["mini_world"])
    (tmp_path / "mini_world" / "split_fewshot").mkdir()  # what the loader caches next to the split
    mtime = os.stat(split_file).st_mtime_ns
    mini_world.render_world(tmp_path)
    assert os.stat(split_file).st_mtime_ns == mtime  # skipped: manifest matches
    mini_world.render_world(tmp_path, seed=1)  # another seed re-renders in place ...
    assert os.stat(split_file).st_mtime_ns != mtime
    assert (tmp_path / "notes.txt").read_text() == "mine"  # ... and touches nothing it did not make
    assert (tmp_path / "mini_world" / "split_fewshot").is_dir()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary folders left
    (tmp_path / "other" / "mini_world").mkdir(parents=True)
    (tmp_path / "other" / "mini_world" / "x.png").write_bytes(b"")
    with pytest.raises(FileExistsError):  # a folder that is not ours is never overwritten
        mini_world.render_world(tmp_path / "other")


def test_new_classes_are_unseen_combinations_of_base_words():
    classes = mini_world.world_classes("mini_world")
    base, new = mini_world.base_new_labels(len(classes))
    assert (len(base), len(new)) == (18, 18)
    base_attrs = [classes[i][1] for i in base]
    base_names = {classes[i][0] for i in base}
    for i in new:
        name, attrs = classes[i]
        assert name not in base_names
        for k, word in enumerate(attrs):  # each word, in its role, occurs in some base class
            assert any(b[k] == word for b in base_attrs), word
        for j, k in [(0, 1), (0, 2), (1, 2)]:  # even every pair of words does: only the triple is new
            assert any((b[j], b[k]) == (attrs[j], attrs[k]) for b in base_attrs)


def test_captions_cover_every_attribute_word():
    rng = np.random.default_rng(0)
    words = set()
    for i in range(3000):
        colour = list(mini_world.WORLD_COLOURS)[i % 8]
        pattern, shape = mini_world.WORLD_PATTERNS[i % 4], mini_world.WORLD_SHAPES[i % 6]
        caption, pins = pretrain.make_caption(rng, colour, pattern, shape, style=("photo", "sketch")[i % 2])
        words |= set(caption.strip(".").split())
        for key, value in pins.items():  # what a caption pins is true of its image and said in it
            assert value == dict(colour=colour, pattern=pattern, shape=shape, style=("photo", "sketch")[i % 2])[key]
            if key in ("colour", "shape"):
                assert value in caption.split(" ") or value + "." in caption.split(" ")
    assert set(mini_world.WORLD_COLOURS) | set(mini_world.WORLD_PATTERNS) | set(mini_world.WORLD_SHAPES) <= words


def test_caption_frames_pin_style_and_light():
    """A sketch is never called a photo, a photo never a sketch; light words only for a camera that has them."""
    rng = np.random.default_rng(1)
    lamp, haze = mini_world.WORLD_CAMERAS["lamp"], mini_world.WORLD_CAMERAS["haze"]
    assert pretrain.light_words(lamp) == ["warm"] and pretrain.light_words(haze) == ["hazy"]
    assert pretrain.light_words(None) == []
    seen = set()
    for i in range(2000):
        style = ("photo", "sketch")[i % 2]
        lights = ("warm",) if i % 4 == 0 else ()
        caption, pins = pretrain.make_caption(rng, "red", "striped", "circle", style=style, lights=lights)
        assert ("photo" in caption) <= (style == "photo") and ("sketch" in caption) <= (style == "sketch")
        assert pins.get("style", style) == style and pins.get("light", "warm") == "warm"
        assert ("warm" in caption) == ("light" in pins) <= bool(lights)
        seen.add(("style" in pins, "light" in pins))
    assert seen == {(False, False), (True, False), (True, True)}  # neutral frames, style frames, light frames


def test_caption_matches_and_contrastive_loss():
    attrs = [("red", "plain", "circle", "photo", ("warm",)), ("red", "dotted", "circle", "sketch", ()),
             ("blue", "plain", "square", "photo", ())]
    codes, lights = pretrain._codes(attrs)
    pins = [dict(colour="red"), dict(colour="red", style="photo"), dict(shape="square", style="photo", light="warm")]
    m = pretrain.caption_matches(codes, lights, pins)
    assert m.tolist() == [[True, True, False], [True, False, False], [False, False, False]]
    logits = torch.randn(3, 3)
    # one positive per row and column (the diagonal): CLIP's symmetric InfoNCE exactly
    target = torch.arange(3)
    ce = torch.nn.functional.cross_entropy
    clip_loss = (ce(logits, target) + ce(logits.t(), target)) / 2
    assert torch.allclose(pretrain.contrastive_loss(logits, torch.eye(3, dtype=torch.bool)), clip_loss)
    # two images that one caption describes: its target is half on each
    both = torch.tensor([[True, False], [True, True]])
    l2 = torch.tensor([[2.0, 0.0], [1.0, 3.0]])
    expected_i2t = (-l2[0].log_softmax(0)[0] - (l2[1].log_softmax(0)).mean()) / 2
    expected_t2i = (-(l2[:, 0].log_softmax(0)).mean() - l2[:, 1].log_softmax(0)[1]) / 2
    assert torch.allclose(pretrain.contrastive_loss(l2, both), (expected_i2t + expected_t2i) / 2)


# -----------------------------------------------------------------------------
# the shipped tiny CLIP


def test_weights_file_is_small_and_loads_with_clips_own_builder(model):
    path = mini_world.WORLD_CLIP_PATH
    assert os.path.getsize(path) <= 25_000_000
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state_dict.values())
    assert state_dict["token_embedding.weight"].shape[0] == 49408  # OpenAI's BPE vocabulary, tokenizer unchanged
    assert state_dict["positional_embedding"].shape[0] == 77
    assert model.visual.input_resolution == mini_world.WORLD_IMAGE_SIZE
    assert not model.training and all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())


def test_the_world_clip_has_vitb16s_shape_where_it_matters(model):
    """12 layers per tower (the presets' depth 9 as published), 64 patches + CLS, vision wider than text (768 : 512)."""
    assert clip_layers.n_layers(model) == (12, 12)
    assert model.visual.positional_embedding.shape[0] == 65
    text_width, vision_width = clip_layers.widths(model)
    assert vision_width * 512 == text_width * 768


def test_clip_layers_text_encoder_matches_stock_on_the_world_clip(model):
    # pre-training and the zero-shot report encode text through clip_layers (the sequence cut after the last EOT)
    tokens = clip_layers.tokenize(["a photo of a red striped circle.", "a star.",
                                   "a crayon drawing of a black dotted heart."])
    assert torch.allclose(clip_layers.encode_text_ids(model, tokens), model.encode_text(tokens), atol=1e-5)


def test_zero_shot_accuracy_is_well_above_chance_and_reads_the_frame(tmp_path, monkeypatch, model):
    # 10 test images per class (the pixels of the full render's first 10 train images: zero-shot never trains)
    for name in mini_world.WORLD_DATASETS:
        monkeypatch.setitem(mini_world.WORLD_DATASETS, name,
                            dict(mini_world.WORLD_DATASETS[name], split_sizes=(0, 0, 10)))
    mini_world.render_world(tmp_path)
    base = mini_world.zero_shot_accuracy(model, tmp_path, "mini_world", classes="base")
    new = mini_world.zero_shot_accuracy(model, tmp_path, "mini_world", classes="new")
    xd = mini_world.zero_shot_accuracy(model, tmp_path, "mini_world_xd")
    sketch = {t: mini_world.zero_shot_accuracy(model, tmp_path, "mini_world_shift", template=t)
              for t in mini_world.SENSITIVITY_TEMPLATES}
    print(f"zero-shot base {base:.1f} new {new:.1f} xd {xd:.1f}, sketches {sketch}")
    # Measured with the shipped weights on this subset: base 84.4, new 82.8, xd 52.5 (chance: 5.6, 5.6, 4.2); sketches
    # 60.0 with "a photo of a {}.", 41.9 with "{}", 59.4 with "a sketch of a {}." (chance 2.8).
    # The thresholds leave ~15 points for sampling noise (180 images) and other CPUs' float rounding.
    assert base > 65 and new > 65 and xd > 35
    assert base < 95  # and not solved already: prompt learning needs room to improve on the base classes
    # the frozen text encoder reads the words around the class name: no frame at all costs many points on sketches
    assert sketch["a photo of a {}."] > sketch["{}"] + 5 and sketch["a sketch of a {}."] > sketch["{}"] + 5


@pytest.mark.parametrize("kill_at", ["drawing", "moving the cache", "renaming into place"])
def test_render_recovers_from_a_kill_at_any_point(tmp_path, small_world, monkeypatch, kill_at):
    """A kill while drawing over an older draw, after moving the loader's cache out of it, or right after the final
    rename leaves a folder that the next call completes by itself, identical to an uninterrupted draw; no temporary
    folder is left behind."""
    clean = mini_world.render_world(tmp_path / "clean", datasets=("mini_world",))["mini_world"]
    mini_world.render_world(tmp_path / "cut", seed=1, datasets=("mini_world",))  # an older draw, to be replaced
    (tmp_path / "cut" / "mini_world" / "split_fewshot").mkdir()  # with the loader's cache in it
    real_replace, real_render = os.replace, mini_world.render_image
    calls = {"replace": 0, "render": 0}

    def replace(src, dst):
        real_replace(src, dst)
        calls["replace"] += 1
        if (kill_at, calls["replace"]) in (("moving the cache", 1), ("renaming into place", 2)):
            raise KeyboardInterrupt

    def render(*args, **kwargs):
        calls["render"] += 1
        if kill_at == "drawing" and calls["render"] == 5:
            raise KeyboardInterrupt
        return real_render(*args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(mini_world, "render_image", render)
    with pytest.raises(KeyboardInterrupt):
        mini_world.render_world(tmp_path / "cut", datasets=("mini_world",))
    monkeypatch.setattr(os, "replace", real_replace)
    monkeypatch.setattr(mini_world, "render_image", real_render)
    folder = mini_world.render_world(tmp_path / "cut", datasets=("mini_world",))["mini_world"]
    assert mini_world.read_world_split(tmp_path / "cut", "mini_world") == \
        mini_world.read_world_split(tmp_path / "clean", "mini_world")
    assert set(os.listdir(folder)) - {"split_fewshot"} == set(os.listdir(clean))
    assert not [p for p in os.listdir(tmp_path / "cut") if p.startswith(".")]


def test_a_finished_draw_keeps_the_loaders_cache_and_a_killed_draw_leaves_nothing_behind(tmp_path, small_world):
    mini_world.render_world(tmp_path, seed=1, datasets=("mini_world",))
    (tmp_path / "mini_world" / "split_fewshot").mkdir()
    leftover = tmp_path / ".mini_world.drawing"
    (leftover / "images").mkdir(parents=True)  # what a draw killed half-way leaves
    (tmp_path / "mini_world" / "world_manifest.json").write_text("")  # and a manifest cut off while being written
    mini_world.render_world(tmp_path, datasets=("mini_world",))
    assert not leftover.exists()
    assert mini_world.read_world_split(tmp_path, "mini_world")["train"]
    assert (tmp_path / "mini_world" / "split_fewshot").is_dir()
    assert sorted(os.listdir(tmp_path)) == ["mini_world"]


# -----------------------------------------------------------------------------
# pre-training: a file of its own, writing new weights beside the shipped ones


def test_pretraining_is_a_file_of_its_own_that_drawing_and_loading_do_not_import():
    import ast
    import inspect
    tree = ast.parse(inspect.getsource(mini_world))
    top_imports = [a.name if isinstance(node, ast.Import) else f"{node.module}.{a.name}" for node in tree.body
                   if isinstance(node, (ast.Import, ast.ImportFrom)) for a in node.names]
    assert not [name for name in top_imports if "pretrain" in name]  # imported by --pretrain only
    assert not hasattr(mini_world, "make_caption") and not hasattr(mini_world, "pretrain_world_clip")
    assert callable(pretrain.pretrain_world_clip) and callable(pretrain.make_caption)


def test_pretrain_writes_beside_the_shipped_weights_and_weights_selects_what_loads(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(pretrain, "pretrain_world_clip", lambda path: calls.append(("write", path)))
    monkeypatch.setattr(mini_world, "load_world_clip", lambda path: calls.append(("load", path)))
    monkeypatch.setattr(mini_world, "render_world", lambda root: None)
    monkeypatch.setattr(mini_world, "zero_shot_report", lambda model, root: None)
    mini_world.main(["--pretrain"])
    assert calls == [("write", mini_world.NEW_CLIP_PATH), ("load", mini_world.NEW_CLIP_PATH)]
    assert os.path.dirname(mini_world.NEW_CLIP_PATH) == os.path.dirname(mini_world.WORLD_CLIP_PATH)
    assert mini_world.NEW_CLIP_PATH != mini_world.WORLD_CLIP_PATH
    calls.clear()
    mini_world.main(["--pretrain", "--weights", str(tmp_path / "w.pt")])
    mini_world.main(["--report"])
    mini_world.main(["--report", "--weights", str(tmp_path / "w.pt")])
    assert calls == [("write", str(tmp_path / "w.pt")), ("load", str(tmp_path / "w.pt")),
                     ("load", mini_world.WORLD_CLIP_PATH), ("load", str(tmp_path / "w.pt"))]


def test_pretraining_runs_and_writes_weights_the_world_loads(tmp_path):
    cfg = pretrain.WorldClipConfig(pool_size=16, steps=2, batch_size=8, warmup_steps=1)
    path = pretrain.pretrain_world_clip(str(tmp_path / "w.pt"), cfg)
    model = mini_world.load_world_clip(path)
    assert clip_layers.n_layers(model) == (12, 12) and model.visual.input_resolution == mini_world.WORLD_IMAGE_SIZE


# -----------------------------------------------------------------------------
# the main job shows zero-shot CLIP beside the method


def test_a_world_run_prints_and_stores_zero_shot_on_the_same_split(tmp_path, small_world, tiny, capsys):
    import train
    common = ["--shots", "2", "--root", str(tmp_path / "DATA")]
    zeroshot = train.main(["--method", "zeroshot", "--output", str(tmp_path / "zs"), *common], clip_model=tiny)
    assert "zeroshot" not in zeroshot and "zero-shot CLIP (same split)" not in capsys.readouterr().out
    run = train.main(["--method", "maple", "--depth", "2", "--epochs", "1", "--output", str(tmp_path / "run"), *common],
                     clip_model=tiny)
    acc = zeroshot["accuracy"]
    assert run["zeroshot"] == acc
    assert f"zero-shot CLIP (same split): base {acc['base']:.2f}  new {acc['new']:.2f}  hm {acc['hm']:.2f}" in \
        capsys.readouterr().out
    with open(tmp_path / "run" / "results.json") as f:
        assert json.load(f)["zeroshot"] == run["zeroshot"]
