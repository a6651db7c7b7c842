"""
The mini world: a procedurally drawn benchmark and a small CLIP pre-trained on it, so that the whole prompt-learning
pipeline (few-shot sampling, base-to-new, cross-dataset and domain-shift evaluation) runs offline, without CLIP's
weights or any download, on a laptop CPU. It is what `python train.py --method mpl --shots 16` runs.

    python -m world.mini_world --render --root data    # draw the three datasets (train.py does it on first use)
    python -m world.mini_world --pretrain              # re-train it (world/pretrain.py) into a new file
    python -m world.mini_world --report --root data    # its zero-shot accuracy, template sensitivity and temperature

A class is a combination of attribute words, e.g. "red striped circle". Images of one class vary in position, size,
rotation, shade, pattern scale and angle, background and noise, so telling classes apart is a real (small) recognition
task. Three datasets, written to disk in CoOp's layout (a `split_zhou_*.json` next to an `images/` folder) and then
read by data.py's loader like any CoOp dataset, stand in for the three evaluation protocols:

    mini_world        36 classes = 4 colours x 3 patterns x 3 shapes, photographed under warm lamp light.
                      Base-to-new: the 18 new classes are unseen *combinations* of words that all occur in the
                      18 base classes (CoOp's rule: sort the labels, the first ceil(n/2) are base).
    mini_world_xd     24 classes from other words (4 colours x plain/checkered x star/heart/cross) in hazy light:
                      the cross-dataset target.
    mini_world_shift  the 36 classes of mini_world as crayon sketches on paper, test split only: the domain-shift
                      target (our ImageNet-Sketch).

The world's CLIP (its design, the caption grammar and the pre-training: world/pretrain.py): a miniature of
ViT-B/16, 12 layers per tower, 32 x 32 images in 4 x 4 patches, shipped in assets/ as a 10.4 MB fp16 state dict.

Measured on the shipped weights (`python -m world.mini_world --report`), with the pre-training's time: docs/results.md.

Deliberately left out: realism. This is a toy to check that code runs and that prompts learn; its numbers say nothing
about the real benchmarks.
"""
import argparse
import colorsys
import contextlib
import hashlib
import json
import math
import os
import shutil

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

try:
    import fcntl  # the lock that lets one of several processes draw the world (POSIX)
except ImportError:
    fcntl = None

import clip_layers
import data

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
# The same three as CoOp datasets: data.py reads them like any other split_zhou_*.json tree (expected counts: classes,
# train, val, test images, from split_sizes above).
DATASETS = {  # DatasetSpec(coop_name, section, dir, image_dir, split_file, reader, template, classes, train, val, test)
    "mini_world": data.DatasetSpec("MiniWorld", "(built in)", "mini_world", "images", "split_zhou_MiniWorld.json",
                                   "json", "a photo of a {}.", 36, 1440, 360, 1440),
    "mini_world_xd": data.DatasetSpec("MiniWorldXD", "(built in)", "mini_world_xd", "images",
                                      "split_zhou_MiniWorldXD.json", "json", "a photo of a {}.", 24, 960, 240, 960),
    "mini_world_shift": data.DatasetSpec("MiniWorldShift", "(built in)", "mini_world_shift", "images",
                                         "split_zhou_MiniWorldShift.json", "json", "a photo of a {}.", 36, 0, 0, 1440),
}
WORLD_SPLIT_FILES = {name: spec.split_file for name, spec in DATASETS.items()}
WORLD_IMAGE_SIZE = 32  # pixels; equals the world CLIP's input resolution, so Resize + CenterCrop are no-ops
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
# while 70% of the pre-training photos come through a neutral camera and the rest through random ones. This gap is
# what few-shot prompts can adapt to, as on real benchmarks (why it is needed: docs/results.md).
WORLD_CAMERAS = {
    "lamp": dict(gain=(1.0, 0.82, 0.55), contrast=0.8, offset=(0.06, 0.04, 0.0), noise=0.04),  # warm indoor light
    "haze": dict(gain=(0.92, 0.96, 1.0), contrast=0.55, offset=(0.3, 0.3, 0.3), noise=0.03),  # bright, washed out
}


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
    # composited at the output resolution from the masks' coverage, which is k^2 times cheaper.
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


def _read_manifest(path):
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError, RecursionError):
        return None  # absent, empty or cut short (a render that did not finish), or not ours: drawn again
    return manifest if isinstance(manifest, dict) else None


def _ours(out, name):
    """Does `out` hold only what render_world and the few-shot caches write, or our manifest? Anything else means it is
    someone's folder, which we never touch."""
    return os.path.exists(os.path.join(out, "world_manifest.json")) or set(os.listdir(out)) <= {
        "images", WORLD_SPLIT_FILES[name], "world_manifest.json", data.FEWSHOT_CACHE_DIR, "split_fewshot"}


@contextlib.contextmanager
def _draw_lock(root, name):
    """Held while a process draws dataset `name` under `root`, so that of several processes started at once on a new
    root one draws and the others wait, then find it drawn. The lock is an flock on `<root>/.<name>.lock`: the kernel
    releases it when its process ends or is killed, so no lock outlives its holder. The holder removes the file before
    it lets go; a process that was waiting on the removed file finds it gone and locks a new one. Also where `root` is
    first created and written, so a --root that is a file, or read-only, stops here with a message that names it."""
    path = os.path.join(root, f".{name}.lock")
    while True:
        try:
            os.makedirs(root, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            if os.path.exists(root) and not os.path.isdir(root):
                raise NotADirectoryError(f"--root {root} is a file, not a folder: the mini world is drawn into a "
                                         f"folder there on first use; give --root a folder (a new one is created)"
                                         ) from None
            raise type(e)(f"--root {root}: cannot draw the mini world's {name} there ({e.strerror or e}); give "
                          f"--root a folder this process can write, or draw the world once where it can ("
                          f"python -m world.mini_world --render --root FOLDER) and point --root at it") from None
        if fcntl is None:  # no flock on this system: draw unguarded
            break
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process that is drawing {name} under {root}", flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a file system without locks (some network mounts): draw unguarded
            break
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break  # the file is still the lock: ours now
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder removed it while this process waited: lock the next one
    try:
        yield
    finally:
        try:
            os.remove(path)  # before the lock is released, never after (see above)
        except OSError:
            pass
        os.close(fd)  # releases the lock


def _render_dataset(root, name, seed):
    out = os.path.join(root, name)
    manifest = _manifest(name, seed)
    drawn = lambda: (_read_manifest(os.path.join(out, "world_manifest.json")) or {}).get("hash") == manifest["hash"]
    if drawn():
        return out, False  # already drawn with this generator version and seed
    with _draw_lock(root, name):
        if drawn():
            return out, False  # drawn by another process while this one waited for the lock
        if os.path.lexists(out) and not os.path.isdir(out):
            raise NotADirectoryError(f"{out} is a file, not the folder the mini world draws {name} into; move it or "
                                     f"pick another --root")
        if os.path.isdir(out) and os.listdir(out) and not _ours(out, name):
            # not ours: refuse rather than mix our files into someone's folder
            raise FileExistsError(f"{out} exists and holds files render_world() does not write; move it or pick "
                                  f"another --root")
        try:
            _draw(root, name, seed, out, manifest)
        except OSError as e:  # e.g. the disk filled up: say what was being written, and where
            raise type(e)(f"could not draw the mini world's {name} under --root {root}: {e}") from e
    return out, True


def _draw(root, name, seed, out, manifest):
    # The whole dataset is drawn into <root>/.<name>.drawing and renamed to <root>/<name> at the end, so <root>/<name>
    # holds a finished draw whenever its manifest matches. A kill at any point leaves at most the temporary folder,
    # which the next draw removes first (under the lock, so it is nobody else's). The loader's few-shot caches in an
    # older draw's folder move into the new one.
    tmp = os.path.join(root, f".{name}.drawing")
    shutil.rmtree(tmp, ignore_errors=True)
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
    with open(os.path.join(tmp, "world_manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    if os.path.isdir(out):
        for entry in set(os.listdir(out)) - set(os.listdir(tmp)):
            os.replace(os.path.join(out, entry), os.path.join(tmp, entry))
        shutil.rmtree(out)
    os.replace(tmp, out)


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
# The world's CLIP, as shipped (its pre-training: world/pretrain.py)

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD_CLIP_PATH = os.path.join(PROJECT, "assets", "mini_world_clip.pt")  # shipped: --pretrain never writes it
NEW_CLIP_PATH = os.path.join(PROJECT, "assets", "mini_world_clip.new.pt")  # where --pretrain writes unless told


def images_to_tensor(images):
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float, normalised as CLIP's preprocess does (images are already at size)."""
    x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(data.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(data.CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def load_world_clip(path=None, device="cpu"):
    """The shipped world CLIP, through CLIP's own loading path, as a frozen fp32 model in eval mode."""
    state_dict = torch.load(path or WORLD_CLIP_PATH, map_location="cpu", weights_only=True)
    return clip_layers.freeze(clip_layers.clip.model.build_model(state_dict).float().to(device))


# -----------------------------------------------------------------------------
# Zero-shot evaluation


def read_world_split(root, name):
    with open(os.path.join(root, name, WORLD_SPLIT_FILES[name])) as f:
        return json.load(f)


@torch.no_grad()
def encode_split(model, root, name, split="test", max_per_class=None, batch_size=500):
    """A rendered split through CLIP's image encoder, once: (normalised features (N, D), labels (N,),
    {label: classname}). zero_shot_accuracy scores it against any template and class subset."""
    items = read_world_split(root, name)[split]
    names = dict((label, classname) for _, label, classname in items)
    kept, per_class = [], {}
    for impath, label, _ in items:
        if per_class.get(label, 0) < (max_per_class or len(items)):
            per_class[label] = per_class.get(label, 0) + 1
            kept.append((impath, label))
    device = next(model.parameters()).device
    features = []
    for i in range(0, len(kept), batch_size):
        images = [np.asarray(Image.open(os.path.join(root, name, "images", p)).convert("RGB"))
                  for p, _ in kept[i:i + batch_size]]
        features.append(F.normalize(clip_layers.encode_image(model, images_to_tensor(images).to(device)), dim=-1))
    return torch.cat(features), torch.tensor([label for _, label in kept], device=device), names


@torch.no_grad()
def zero_shot_accuracy(model, root, name="mini_world", split="test", classes="all", template="a photo of a {}.",
                       max_per_class=None, batch_size=500, encoded=None):
    """Top-1 accuracy (%) of zero-shot CLIP on a rendered split, with CoOp's base/new relabelling.

    classes: "all", "base" or "new" (sorted labels, first ceil(n/2) are base). Goes through clip_layers' encoders
    (equal to CLIP's own to 1e-6), so it measures exactly what a prompt learner starts from. encoded: encode_split's
    result for this split, to score one encoding with several templates or class subsets.
    """
    if classes not in ("all", "base", "new"):
        raise ValueError(f"classes must be 'all', 'base' or 'new', not {classes!r}")
    features, image_labels, names = encoded if encoded is not None else \
        encode_split(model, root, name, split, max_per_class, batch_size)
    labels = sorted(names)
    if classes != "all":
        base, new = base_new_labels(len(labels))
        labels = [labels[i] for i in (base if classes == "base" else new)]
    labels = torch.tensor(labels, device=image_labels.device)
    keep = torch.isin(image_labels, labels)
    target = torch.searchsorted(labels, image_labels[keep])  # CoOp's relabelling: position among the kept labels
    prompts = [template.format(names[label].replace("_", " ")) for label in labels.tolist()]
    text_features = F.normalize(clip_layers.encode_text_ids(model, clip_layers.tokenize(prompts).to(labels.device)),
                                dim=-1)
    pred = (features[keep] @ text_features.t()).argmax(dim=-1)
    return 100.0 * (pred == target).float().mean().item()


SENSITIVITY_TEMPLATES = ["a photo of a {}.", "{}", "a sketch of a {}."]  # how much the frozen text encoder reads


def zero_shot_report(model, root):
    """Zero-shot accuracy on every rendered dataset (base and new where it applies) next to chance, the same with
    other templates (does the text encoder read the words around a class name?), and the learned temperature."""
    rows = []
    print(f"temperature (logit scale): {model.logit_scale.exp().item():.1f}  (CLIP ViT-B/16: 100)")
    for name in WORLD_DATASETS:
        if not os.path.exists(os.path.join(root, name, WORLD_SPLIT_FILES[name])):
            continue
        n = len(world_classes(name))
        base, new = base_new_labels(n)
        encoded = encode_split(model, root, name)  # the images once; each template and subset re-scores them
        for classes, k in [("all", n), ("base", len(base)), ("new", len(new))]:
            acc = zero_shot_accuracy(model, root, name, classes=classes, encoded=encoded)
            rows.append((name, classes, "a photo of a {}.", acc, 100.0 / k))
            print(f"{name:18s} {classes:5s} {acc:6.1f}%  (chance {100.0 / k:.1f}%, {k} classes)")
        for template in SENSITIVITY_TEMPLATES[1:]:
            acc = zero_shot_accuracy(model, root, name, template=template, encoded=encoded)
            rows.append((name, "all", template, acc, 100.0 / n))
            print(f"{name:18s} all   {acc:6.1f}%  with the template {template!r}")
    return rows


def is_world(name):
    """True for the world's dataset names (and for no --dataset at all, which means the mini world)."""
    return name is None or name in DATASETS


def load_benchmark(name, root, shots, seed, subsample="all"):
    """data.load_benchmark for a world dataset, drawn under `root` first if it is not there yet (idempotent)."""
    render_world(root, datasets=(name,))
    return data.load_benchmark(name, root, shots, seed, subsample, spec=DATASETS[name])


def main(argv=None):
    from engine import cli
    p = argparse.ArgumentParser(prog="python -m world.mini_world", description=__doc__,
                                formatter_class=cli.HelpFormatter)
    p.add_argument("--root", default=os.environ.get("DATA", "data"), help="where the world's datasets are drawn, as "
                   "train.py's --root (<root>/mini_world*); default: $DATA if set, else data")
    p.add_argument("--render", action="store_true", help="draw the three datasets under --root")
    p.add_argument("--pretrain", action="store_true", help="pre-train a world CLIP (world/pretrain.py) into --weights, "
                   f"by default {os.path.relpath(NEW_CLIP_PATH, PROJECT)} beside the shipped weights, never over them "
                   "unless --weights names them, then print its zero-shot accuracy")
    p.add_argument("--report", action="store_true", help="zero-shot accuracy of --weights on every world dataset")
    p.add_argument("--weights", help="the world CLIP file to read (--report; default: the shipped "
                   f"{os.path.relpath(WORLD_CLIP_PATH, PROJECT)}) or to write (--pretrain)")
    args = p.parse_args(argv)
    if not (args.render or args.pretrain or args.report):
        p.error("give --render, --pretrain or --report")
    weights = args.weights or (NEW_CLIP_PATH if args.pretrain else WORLD_CLIP_PATH)
    if args.pretrain:
        from world import pretrain  # the caption grammar and the training loop: only needed here
        pretrain.pretrain_world_clip(weights)
    render_world(args.root)
    if args.pretrain or args.report:
        zero_shot_report(load_world_clip(weights), args.root)
    return 0


if __name__ == "__main__":
    from engine import cli  # one line `error: ...` for the user's errors, a traceback for bugs
    cli.run(main)
