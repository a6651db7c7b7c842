"""
The mini world: a procedurally drawn benchmark and a small CLIP pre-trained on it, so that the whole prompt-learning
pipeline (few-shot sampling, base-to-new, cross-dataset and domain-shift evaluation) runs offline, without CLIP's
weights or any download, on a laptop CPU. It is what `python train.py --method mpl --shots 16` runs.

    python -m world.mini_world --render --root data    # draw the three datasets (train.py does it on first use)
    python -m world.mini_world --pretrain              # re-train the world's CLIP into assets/ (time: docs/results.md)
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

The world's CLIP: a miniature of ViT-B/16 where its shape decides what prompt methods can do
---------------------------------------------------------------------------------------------
This design was fixed, and the CLIP pre-trained, before any prompt method ran on it; it is not tuned to their results.

- Depth: 12 layers in each tower, as ViT-B/16. Every preset runs at its published depth (9 of 12; 3 of 12 for the
  cross-dataset recipe), nothing is rescaled, and MPL's carried tokens have as many layers to matter in as in the paper.
- Image sequence: 32 x 32 pixel images in 4 x 4 patches, 64 patches + CLS = 65 tokens (ViT-B/16: 197). MPL's preset
  carries up to 9 extra tokens (14 % of the sequence; 5 % in ViT-B/16), MaPLe's 2, IVLP's 4: prompts stay a small
  share of what attention looks at, not a half of it.
- Widths: vision 96, text 64, joint embedding 64; 96 : 64 is ViT-B/16's 768 : 512, so the text-to-vision
  projections of MaPLe and MPL map between different widths, as they do on real CLIP. clip.model gives a tower
  width // 64 heads: one head each here (ViT-B/16: 12 and 8 heads of 64).
- Text: OpenAI's BPE tokenizer and 77-token context, so every prompt learner works unchanged.
- Captions whose frames matter: a caption pins some attributes of its image (colour, pattern, shape, and through its
  frame the *style*, photo or sketch, and sometimes the *light*). Sketches are described as "a sketch / drawing /
  doodle of a ...", photos as "a photo / picture / image of a ...", a photo under a coloured or hazy camera sometimes as
  "a hazy photo of a ..." or "a photo of a ... in warm light", and 20 % of captions have a neutral frame ("a ...",
  "..."). The loss is told which images in a batch each caption describes (contrastive_loss), so "a photo of a" is a
  claim the text encoder must encode: it reads "a sketch of a red circle" differently from "a photo of a red circle".
  This is what gives text prompts something to act on, as the context words do in real CLIP.
- Temperature: learned from CLIP's 1/0.07 and clamped at CLIP's 100. It learns with a 10x learning rate because this
  pre-training has 850 steps where CLIP's had about 400,000 (see pretrain_world_clip), and the known positives let it
  grow (a batch's duplicate captions no longer cap it). Where it ends, and why not at CLIP's 100: docs/results.md.
- Pre-training: symmetric InfoNCE over 850 batches of 256 from 32,768 images of the whole world, new classes included
  (like real CLIP it has seen every concept; only prompt learning is restricted to the base classes), AdamW, warmup
  and cosine decay. 85 % of the images are photos, 70 % of those through a neutral camera, so each benchmark's own
  light (WORLD_CAMERAS) is a domain gap that few-shot adaptation can close.
- Weights: 5.1 M parameters (of which the 49408 x 64 token table is 3.2 M), shipped in assets/ as a 10.4 MB fp16
  state dict, loaded with CLIP's own build_model.

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

try:
    import fcntl  # the lock that lets one of several processes draw the world (POSIX)
except ImportError:
    fcntl = None

import clip_layers
import data
from engine import rundir

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


def _read_manifest(path):
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError, RecursionError):
        return None  # absent, empty or cut short (a render that did not finish), or not ours: drawn again
    return manifest if isinstance(manifest, dict) else None


def _ours(out, name):
    """Is `out` a render of ours (it has our manifest, even an unfinished one), or does it hold only what render_world
    and the few-shot caches write (a render killed before its manifest)? Anything else means it is someone's folder,
    which we never touch."""
    return os.path.exists(os.path.join(out, "world_manifest.json")) or set(os.listdir(out)) <= {
        "images", WORLD_SPLIT_FILES[name], "world_manifest.json", data.FEWSHOT_CACHE_DIR, "split_fewshot"}


def _remove_stale_temporaries(root, name):
    """Temporary folders `.<name>-<pid>-*` of renders whose process is gone (killed mid-drawing)."""
    for entry in os.listdir(root):
        parts = entry.split("-")
        if entry.startswith(f".{name}-") and len(parts) >= 3 and parts[-2].isdigit() and \
                not rundir.pid_alive(int(parts[-2])):
            shutil.rmtree(os.path.join(root, entry), ignore_errors=True)


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
    manifest_path = os.path.join(out, "world_manifest.json")
    manifest = _manifest(name, seed)
    if (_read_manifest(manifest_path) or {}).get("hash") == manifest["hash"]:
        return out, False  # already rendered with this generator version and seed
    with _draw_lock(root, name):
        if (_read_manifest(manifest_path) or {}).get("hash") == manifest["hash"]:
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
    # Render into a temporary folder next to the target, then move the finished pieces in and write the manifest last,
    # so a folder is complete exactly when its manifest matches. An interrupted render (a kill at any point) leaves a
    # folder of our files without a matching manifest, which the next call replaces, and a temporary folder named
    # after its process, which the next call removes once that process is gone. Only `images/`, the split file and the
    # manifest are ours; the loader's split_fewshot_ref/ cache next to them is left alone.
    manifest_path = os.path.join(out, "world_manifest.json")
    _remove_stale_temporaries(root, name)
    tmp = tempfile.mkdtemp(prefix=f".{name}-{os.getpid()}-", dir=root)
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
        with open(os.path.join(tmp, "world_manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)

        os.makedirs(out, exist_ok=True)
        if os.path.exists(manifest_path):
            os.remove(manifest_path)  # first: from here until the new manifest the folder reads as unfinished
        shutil.rmtree(os.path.join(out, "images"), ignore_errors=True)  # a stale or half-moved render of ours
        os.replace(os.path.join(tmp, "images"), os.path.join(out, "images"))
        os.replace(os.path.join(tmp, WORLD_SPLIT_FILES[name]), os.path.join(out, WORLD_SPLIT_FILES[name]))
        os.replace(os.path.join(tmp, "world_manifest.json"), manifest_path)  # last: the render is complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
# Captions for pre-training: what is drawn, how (photo or sketch) and under what light, in many phrasings
#
# A caption *pins* some attributes of its image: "a sketch of a red circle." pins colour, shape and style (sketch);
# "a red shape." pins the colour only. Image j is a positive of caption i when it has every attribute caption i pins
# (caption_matches), so the contrastive loss knows that "a red shape." describes every red image in the batch.
# Because the style and light words pin attributes of the image, the text encoder cannot ignore them: "a photo of a"
# describes photos and not sketches, "in warm light" describes warm photos. That is what gives a prompt something to
# act on, as the words around a class name do in real CLIP ("a sketch of a" and "a photo of a" read differently).

PHOTO_TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a close-up photo of a {}.",
                   "a photo of the {}.", "a good photo of a {}."]
SKETCH_TEMPLATES = ["a sketch of a {}.", "a drawing of a {}.", "a crayon drawing of a {}.", "a doodle of a {}.",
                    "a sketch of the {}."]
NEUTRAL_TEMPLATES = ["a {}.", "{}.", "this is a {}.", "the {}."]  # say nothing about photo or sketch
LIGHT_TEMPLATES = {  # photos only: a caption may name one light word of its camera (light_words)
    "warm": ["a photo of a {} in warm light.", "a warm photo of a {}."],
    "cold": ["a photo of a {} in cold light.", "a cold photo of a {}."],
    "hazy": ["a hazy photo of a {}.", "a washed out photo of a {}."],
    "dark": ["a dark photo of a {}.", "a photo of a {} in dim light."],
}
LIGHTS = list(LIGHT_TEMPLATES)
STYLES = ["photo", "sketch"]
PATTERN_NOUNS = {"striped": "stripes", "dotted": "dots", "checkered": "checks"}


def light_words(camera):
    """The light words that describe a camera (a dict like WORLD_CAMERAS["lamp"]); none for the neutral camera.
    The datasets' cameras: lamp is "warm", haze is "hazy"."""
    if camera is None:
        return []
    gain, offset = np.asarray(camera["gain"]), np.asarray(camera["offset"])
    words = []
    if gain[0] - gain[2] > 0.25:
        words.append("warm")
    if gain[2] - gain[0] > 0.25:
        words.append("cold")
    if offset.mean() > 0.2:
        words.append("hazy")
    if camera["contrast"] * gain.mean() + offset.mean() < 0.5:
        words.append("dark")
    return words


def make_caption(rng, colour, pattern, shape, style="photo", lights=()):
    """A random caption of one image and what it pins: (text, dict with some of colour, pattern, shape, style, light).

    The object: 60% all three attribute words, 40% only some of them. The frame: 20% a neutral one ("a {}."), else
    one of the image's style (photo or sketch templates), and for a photo whose camera has light words, half the time
    one of those ("a hazy photo of a {}.").
    """
    pins = {}
    r = rng.uniform()
    say_plain = pattern != "plain" or rng.uniform() < 0.5  # "plain" is often left unsaid (then pattern is not pinned)
    p = pattern + " " if say_plain else ""
    if r < 0.45:
        phrase, pinned = f"{colour} {p}{shape}", ("colour", "shape") + (("pattern",) if say_plain else ())
    elif r < 0.52:
        phrase, pinned = f"{p}{colour} {shape}", ("colour", "shape") + (("pattern",) if say_plain else ())
    elif r < 0.60:
        phrase = f"{colour} {shape} with {PATTERN_NOUNS[pattern]}" if pattern != "plain" else f"plain {colour} {shape}"
        pinned = ("colour", "pattern", "shape")
    else:  # partial descriptions: many images in a batch match them, and the loss knows it
        phrase, pinned = [(f"{colour} {shape}", ("colour", "shape")), (f"{pattern} {shape}", ("pattern", "shape")),
                          (f"{colour} {pattern} shape", ("colour", "pattern")), (f"{colour} shape", ("colour",)),
                          (f"{shape}", ("shape",)), (f"{pattern} shape", ("pattern",)),
                          (f"{colour} object", ("colour",)),
                          (f"{pattern} {colour} thing", ("pattern", "colour"))][rng.integers(8)]
    pins.update({k: v for k, v in dict(colour=colour, pattern=pattern, shape=shape).items() if k in pinned})

    if rng.uniform() < 0.2:
        template = NEUTRAL_TEMPLATES[rng.integers(len(NEUTRAL_TEMPLATES))]
    elif style == "photo" and lights and rng.uniform() < 0.5:
        light = lights[rng.integers(len(lights))]
        template = LIGHT_TEMPLATES[light][rng.integers(len(LIGHT_TEMPLATES[light]))]
        pins.update(style="photo", light=light)
    else:
        templates = SKETCH_TEMPLATES if style == "sketch" else PHOTO_TEMPLATES
        template = templates[rng.integers(len(templates))]
        pins["style"] = style
    caption = template.format(phrase)
    if rng.uniform() < 0.75:  # mostly proper English ("an orange ..."); sometimes not, as templates often are not
        caption = re.sub(r"\ba (?=[aeiou])", "an ", caption)
    return caption, pins


# what a caption can pin besides the light, in the order of pretrain_sample's attribute tuples
PINNABLE = [("colour", list(WORLD_COLOURS)), ("pattern", WORLD_PATTERNS), ("shape", WORLD_SHAPES), ("style", STYLES)]


def _codes(attrs):
    """Integer codes of images' attributes: (N, 4) [colour, pattern, shape, style] and (N,) bit masks of light
    words."""
    codes = np.array([[words.index(a[k]) for k, (_, words) in enumerate(PINNABLE)] for a in attrs])
    lights = np.array([sum(1 << LIGHTS.index(w) for w in a[4]) for a in attrs])
    return codes, lights


def caption_matches(image_codes, image_lights, pins):
    """(B_images, B_captions) bool: image i has every attribute that caption j pins."""
    need = np.array([[words.index(p[k]) if k in p else -1 for k, words in PINNABLE] for p in pins])  # -1: not pinned
    need_light = np.array([1 << LIGHTS.index(p["light"]) if "light" in p else 0 for p in pins])
    ok = ((need[None] == -1) | (need[None] == image_codes[:, None])).all(-1)
    return ok & ((image_lights[:, None] & need_light[None]) == need_light[None])


def pretrain_sample(seed, i):
    """Image i of the pre-training stream and its (colour, pattern, shape, style, light words); the captions are drawn
    anew every time the image is used. Attributes are uniform over the whole world, so every combination occurs."""
    rng = np.random.default_rng([seed, PRETRAIN_STREAM_ID, i])
    colour = list(WORLD_COLOURS)[rng.integers(len(WORLD_COLOURS))]
    pattern = WORLD_PATTERNS[rng.integers(len(WORLD_PATTERNS))]
    shape = WORLD_SHAPES[rng.integers(len(WORLD_SHAPES))]
    style = "sketch" if rng.uniform() < 0.15 else "photo"
    camera = random_camera(rng) if style == "photo" and rng.uniform() < 0.3 else None
    image = render_image(rng, colour, pattern, shape, style=style, camera=camera)
    return image, (colour, pattern, shape, style, tuple(light_words(camera)))


# -----------------------------------------------------------------------------
# The world's CLIP: OpenAI's architecture at toy width and full depth, pre-trained on the world's captions

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD_CLIP_PATH = os.path.join(PROJECT, "assets", "mini_world_clip.pt")


@dataclass
class WorldClipConfig:
    # architecture: clip.model.CLIP's arguments; build_model() infers all of them back from the state dict
    embed_dim: int = 64             # ViT-B/16: 512
    image_resolution: int = WORLD_IMAGE_SIZE
    vision_layers: int = 12         # ViT-B/16's depth in both towers: every preset runs as published (depth 9 of 12)
    vision_width: int = 96          # ViT-B/16: 768; 96 : 64 is ViT-B/16's 768 : 512. clip.model: width // 64 = 1 head
    vision_patch_size: int = 4      # 8 x 8 patches + CLS = 65 tokens (ViT-B/16: 14 x 14 + 1 = 197)
    context_length: int = 77        # CLIP's, so clip.tokenize and every prompt learner work unchanged
    vocab_size: int = 49408         # OpenAI's BPE vocabulary; the table is 49408 x 64 = 6.3 MB of the fp16 file
    transformer_width: int = 64     # ViT-B/16: 512; 1 head
    transformer_layers: int = 12
    # pre-training
    seed: int = 0
    pool_size: int = 32768          # pre-training images, rendered once; captions are re-drawn at every use
    steps: int = 850                # CLIP's had about 400,000; this many fit a CPU (time: docs/results.md)
    batch_size: int = 256
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    temperature_lr_scale: float = 10.0


def build_tiny_clip(cfg):
    heads = cfg.transformer_width // 64  # what build_model() assumes; a different count would load but misbehave
    return clip_layers.clip.model.CLIP(cfg.embed_dim, cfg.image_resolution, cfg.vision_layers, cfg.vision_width,
                                       cfg.vision_patch_size, cfg.context_length, cfg.vocab_size,
                                       cfg.transformer_width, heads, cfg.transformer_layers)


def images_to_tensor(images):
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float, normalised as CLIP's preprocess does (images are already at size)."""
    x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(data.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(data.CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _pretrain_lr(step, cfg):
    # 1) linear warmup, 2) cosine decay to 0 (CLIP's schedule)
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


def contrastive_loss(logits, matches):
    """CLIP's symmetric InfoNCE, with every known positive as a target: (B, B) logits image i x caption j and the bool
    matches of caption_matches. Row i's target is uniform over the captions image i matches, column j's over the images
    caption j matches (UniCL's loss, Yang et al., arXiv:2204.03610). With one positive per row (the diagonal) this is
    CLIP's loss exactly. Why not CLIP's: a batch of 256 from this world holds many images that one caption describes
    ("a red shape."), and calling all but one of them negatives caps how sharp the similarities may get; CLIP's own
    temperature ends at its clamp of 100 because web captions rarely collide. With known positives this one can too."""
    m = matches.float()
    image_to_text = -(m / m.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    text_to_image = -(m / m.sum(0, keepdim=True) * logits.log_softmax(0)).sum(0).mean()
    return (image_to_text + text_to_image) / 2


def pretrain_world_clip(path=WORLD_CLIP_PATH, cfg=None):
    """Pre-train the world's CLIP on the world's captions and save a plain fp16 state dict at `path`.

    Deterministic from cfg.seed for a given machine and thread count: the images, captions and batch order come
    from seeded numpy generators and the weights from torch.manual_seed, but float sums in multi-threaded CPU
    kernels may differ between machines or thread counts, so a rerun elsewhere gives close, not identical, weights.
    """
    cfg = cfg or WorldClipConfig()
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    model = build_tiny_clip(cfg)  # fp32 on the CPU
    print(cfg)
    print(f"world CLIP: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")

    samples = [pretrain_sample(cfg.seed, i) for i in range(cfg.pool_size)]
    pool = images_to_tensor([img for img, _ in samples])
    codes, lights = _codes([a for _, a in samples])
    print(f"rendered {cfg.pool_size} pre-training images in {time.time() - t0:.1f} s")

    # CLIP's recipe: AdamW with weight decay on matrices only (not on gains, biases, embeddings or the temperature)
    # The temperature learns 10x faster than the rest: Adam moves a parameter by about lr per step, CLIP's log
    # temperature climbs from log(1/0.07) to its clamp log(100) (+1.95) over ~400,000 steps, and this run has
    # cfg.steps; at lr 1e-3 under the cosine schedule it could move by half a unit at most.
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)
                and n != "logit_scale"]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
                                   {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
                                   {"params": [model.logit_scale], "weight_decay": 0.0,
                                    "lr_scale": cfg.temperature_lr_scale}],
                                  lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    rng = np.random.default_rng([cfg.seed, PRETRAIN_STREAM_ID, 1])  # batch order, captions, flips
    order = []
    model.train()
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = _pretrain_lr(step, cfg) * group["lr_scale"]
        if len(order) < cfg.batch_size:
            order = np.concatenate([order, rng.permutation(cfg.pool_size)]).astype(np.int64)
        idx, order = order[:cfg.batch_size], order[cfg.batch_size:]
        images = pool[idx]
        flip = torch.as_tensor(rng.uniform(size=len(idx)) < 0.5)  # every shape here is left-right symmetric
        images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
        captions = [make_caption(rng, *samples[i][1][:4], lights=samples[i][1][4]) for i in idx]
        tokens = clip_layers.tokenize([text for text, _ in captions])
        matches = torch.as_tensor(caption_matches(codes[idx], lights[idx], [pins for _, pins in captions]))
        assert matches.diagonal().all()  # every caption describes its own image

        image_features = F.normalize(model.encode_image(images), dim=-1)
        # clip_layers' text encoder: CLIP's blocks, the sequence cut after the last EOT (exact under the causal mask;
        # the captions are at most ~16 tokens, so this makes the text side ~5x cheaper than all 77 positions).
        text_features = F.normalize(clip_layers.encode_text_ids(model, tokens), dim=-1)
        logits = model.logit_scale.exp() * image_features @ text_features.t()  # (B, B)
        loss = contrastive_loss(logits, matches)

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP clips the temperature at 100
        if step % 50 == 0 or step == cfg.steps - 1:
            print(f"step {step:5d} | loss {loss.item():.3f} | logit scale {model.logit_scale.exp().item():.1f} "
                  f"| lr {_pretrain_lr(step, cfg):.2e} | {time.time() - t0:.0f} s", flush=True)

    # fp16 storage halves the file (25 MB budget); load_world_clip() returns fp32 again.
    state_dict = {k: v.detach().half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    rundir.atomic_save(state_dict, path, torch.save)
    print(f"saved {path} ({os.path.getsize(path) / 1e6:.1f} MB) after {time.time() - t0:.0f} s")
    return path


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
    p = argparse.ArgumentParser(prog="python -m world.mini_world", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=os.environ.get("DATA", "data"), help="where the world's datasets are drawn")
    p.add_argument("--render", action="store_true", help="draw the three datasets under --root")
    p.add_argument("--pretrain", action="store_true", help="pre-train the world CLIP and write it to --weights, "
                   "replacing the shipped file by default, then print its zero-shot accuracy")
    p.add_argument("--report", action="store_true", help="zero-shot accuracy of --weights on every world dataset")
    p.add_argument("--weights", default=WORLD_CLIP_PATH, help="the world CLIP file to write or read")
    args = p.parse_args(argv)
    if not (args.render or args.pretrain or args.report):
        p.error("give --render, --pretrain or --report")
    if args.pretrain:
        pretrain_world_clip(args.weights)
    if args.render or args.pretrain or args.report:
        render_world(args.root)
    if args.pretrain or args.report:
        zero_shot_report(load_world_clip(args.weights), args.root)
    return 0


if __name__ == "__main__":
    from engine import cli  # one line `error: ...` for the user's errors, a traceback for bugs
    cli.run(main)
