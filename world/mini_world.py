"""
The mini world: a procedurally drawn benchmark suite and a small CLIP pre-trained on it, so that the whole
prompt-learning pipeline (few-shot sampling, base-to-new, cross-dataset and domain-shift evaluation) runs offline,
without CLIP's weights or any download, on a laptop CPU. It is what `python train.py --method mpl --shots 16` runs.

    python -m world --render --root data    # draw the datasets (train.py draws the one it needs on first use)
    python -m world --report --root data    # the world's targets on its CLIP: zero-shot, frames, probes
    python -m world --pretrain              # re-train the CLIP (world/pretrain.py) into a new file

A class is a combination of attribute words, e.g. "red striped circle". Images of one class vary in position, size,
rotation, shade, pattern scale and angle, background and noise, so telling classes apart is a real (small) recognition
task. The datasets are written to disk in CoOp's layout (a `split_zhou_*.json` next to an `images/` folder) and read by
data.py's loader like any CoOp dataset: data.py's table lists them (data.WORLD, from SPECS below) and draws one under
--root the first time it is read. This file imports nothing of the project but clip_layers, so data.py can import it.

The suite: four base-to-new datasets, each a miniature of a kind of benchmark dataset
-------------------------------------------------------------------------------------
On the real benchmarks zero-shot CLIP is strong on some datasets and weak on others (base classes: 97 % on Caltech101,
27 % on FGVC-Aircraft, 56 % on EuroSAT), and prompt learning gains most where the generic "a photo of a {}." says least
about the domain. The suite has one dataset per kind of gap (WORLD_DATASETS has the words; the images: render_image):

    mini_world            generic objects, like Caltech101 or ImageNet. 36 classes = 4 colours x 3 patterns x
                          3 shapes, photographed like the pre-training photos but close up, as Caltech101 centres its
                          objects (half-size 0.32-0.40 of the image, the upper part of the pre-training's 0.22-0.40),
                          and named with the captions' commonest words. Zero-shot CLIP is strong here, and the image
                          features separate the classes better still (the shapes above all), as a linear probe on
                          real CLIP's features beats its zero-shot classifier on Caltech101.
    mini_world_fine       fine-grained, like FGVC-Aircraft, Flowers or Cars: 16 classes = 8 shades of red and blue x
                          2 shapes ("crimson circle", "maroon circle"), shot in hazy light as aircraft are against the
                          sky. The names differ in one word, and it is a rare one: the pre-training captions call a
                          crimson object "red" 95 % of the time, as web captions say "a plane" and rarely
                          "a 737-200". The images still show the shade, so the image features separate what the text
                          encoder barely names.
    mini_world_texture    textures, like DTD: 8 classes of close-ups filled with one pattern in one of 4 colours,
                          named by the pattern alone ("zigzag", "ringed"): no object, and a class name that the
                          captions use as an adjective.
    mini_world_satellite  satellite images, like EuroSAT: 16 classes = 4 colours x 4 shapes in false colour (each
                          colour channel takes half of the next one), as multispectral composites shift hues: a red
                          object looks purple and a purple one blue, so in a photo's terms several classes look like
                          another one. The captions always call these "a satellite photo of ..." (or aerial), so a
                          colour word means another hue after "satellite" than after "photo", and nothing else in the
                          picture says "satellite": only the text can read the colours right. The domain's frame is
                          worth points that the generic one loses, as "a centered satellite photo of" is on EuroSAT.
                          The objects are drawn close up, as mini_world's (half-size 0.32-0.40): at the pre-training's
                          0.22-0.40 a probe on the frozen features read no more than zero-shot with the satellite
                          template (83.4 % both), so prompts had nothing to gain over CoOp's baseline there.

New classes follow CoOp's rule (sort the labels, the first half are base), with labels ordered so that every new
class is an unseen combination of words the base classes use (for the textures: a pattern no base class has).

The other two protocols' targets:

    mini_world_xd         24 classes from other words (4 colours x plain/checkered x star/heart/cross) in hazy
                          light: the cross-dataset target of a model trained on mini_world.
    mini_world_shift      mini_world's 36 classes as crayon sketches on paper, test split only: the domain-shift
                          target (our ImageNet-Sketch).

Targets, fixed before any prompt method ran on the world (`--report` checks them; the numbers: docs/results.md):
zero-shot with "a photo of a {}." averages 55-75 % on the suite's base classes, with at least one dataset at 85 % or
more and one at 50 % or less, and new classes on average at most 5 points below base; on the dataset drawn in a style
the captions name with their own frame word (satellite), its own template beats the generic one by 5 points or more;
a linear probe on all of a dataset's training images beats zero-shot by 15 points or more on average, and on every
dataset by 3 or more over zero-shot with the dataset's own template (CoOp's baseline: the frozen features hold more
than the best hand-written classifier reads, as CLIP's do on every real dataset), and a 16-shot probe is at most 2
points below that; and the training views keep the
class: zero-shot on the training images through the dataset's training augmentation (crop_scale, below) is at most
1 point below zero-shot on the clean training images, on every dataset.

The world's CLIP (its design, the caption grammar and the pre-training: world/pretrain.py): a miniature of
ViT-B/16, 12 layers per tower, 32 x 32 images in 4 x 4 patches, shipped in assets/ as a 10.4 MB fp16 state dict.

Deliberately left out: realism. This is a toy to check that code runs and that prompts learn what the papers say they
learn; its numbers say nothing about the real benchmarks.
"""
import colorsys
import contextlib
import hashlib
import itertools
import json
import math
import os
import shutil

import numpy as np
import torch
from PIL import Image, ImageDraw

try:
    import fcntl  # the lock that lets one of several processes draw the world (POSIX)
except ImportError:
    fcntl = None

import clip_layers

# -----------------------------------------------------------------------------
# The world's vocabulary. Every word here is a plain English word that OpenAI's BPE tokenizer knows.

# Base RGB in [0, 1]; each image jitters hue, saturation and value around it. The first eight are the basic colours
# every caption may name; the last eight are fine shades of red and blue (the fine-grained dataset's words), which the
# pre-training captions name only now and then, and otherwise call by their family's basic colour (SHADE_FAMILY).
WORLD_COLOURS = {
    "red": (0.85, 0.12, 0.10),
    "green": (0.15, 0.62, 0.20),
    "blue": (0.12, 0.30, 0.85),
    "yellow": (0.95, 0.85, 0.15),
    "purple": (0.55, 0.20, 0.70),
    "orange": (0.98, 0.55, 0.10),
    "pink": (0.98, 0.58, 0.76),
    "black": (0.08, 0.08, 0.08),
    "scarlet": (1.00, 0.20, 0.05),
    "crimson": (0.80, 0.05, 0.30),
    "maroon": (0.45, 0.05, 0.08),
    "coral": (1.00, 0.50, 0.40),
    "navy": (0.05, 0.08, 0.42),
    "azure": (0.30, 0.65, 1.00),
    "cobalt": (0.05, 0.28, 0.75),
    "indigo": (0.30, 0.10, 0.65),
}
SHADE_FAMILY = {"scarlet": "red", "crimson": "red", "maroon": "red", "coral": "red",
                "navy": "blue", "azure": "blue", "cobalt": "blue", "indigo": "blue"}
BASIC_COLOURS = [c for c in WORLD_COLOURS if c not in SHADE_FAMILY]
WORLD_PATTERNS = ["plain", "striped", "dotted", "checkered", "zigzag", "wavy", "grid", "ringed", "speckled"]
WORLD_SHAPES = ["circle", "square", "triangle", "star", "heart", "cross"]
TEXTURE = "texture"  # the "shape" of a texture close-up: the pattern fills the whole picture, no object

# The benchmark suite. A class is a combination of the attributes named in `named`; an attribute not named is drawn at
# random per image from its list (a list of one is fixed). style: how the images are drawn (render_image); camera: the
# dataset's light, None for a neutral one (WORLD_CAMERAS); split_sizes: images per class in train, val, test; template:
# the dataset's own zero-shot prompt, as CoOp gives each benchmark one (the report also scores "a photo of a {}.").
#
# What each base-to-new dataset is a miniature of, and why the real one is hard for zero-shot CLIP in that way:
#   mini_world            generic objects (Caltech101, ImageNet): the names are the words the captions use most, in
#                         photos like the pre-training ones, close up (radius). Zero-shot is strong; the features
#                         stronger still.
#   mini_world_fine       fine-grained (FGVC-Aircraft, Flowers, Cars): 8 shades of red and blue on 2 shapes; the names
#                         share all but one word, a rare one (the captions mostly say "red" for "crimson"), so the text
#                         encoder knows them poorly while the images still show them clearly.
#   mini_world_texture    textures (DTD): close-ups filled with one pattern in random colours, named by the pattern
#                         alone ("zigzag"); no object, and a name that is an adjective in the captions.
#   mini_world_satellite  satellite images (EuroSAT): close-up objects seen from above on fields, in false colour (half
#                         of every colour channel moved to the next, as multispectral composites shift hues). The
#                         captions always call them "a satellite photo of ...", so the colour words mean other hues
#                         there: only a prompt that says "satellite", or learns it, reads them right.
# and the other two protocols' targets:
#   mini_world_xd         cross-dataset target: 24 classes from other words in hazy light.
#   mini_world_shift      domain-shift target: mini_world's 36 classes as crayon sketches, test only (ImageNet-Sketch).
#
# radius: the range of the objects' half-size, as a fraction of the image (default OBJECT_RADIUS, the pre-training's).
# crop_scale: the smallest area of the training RandomResizedCrop (data.train_transform) on this dataset: its training
# augmentation, chosen by the dataset, never by the method (train.py's --crop-scale default). Dassl's 0.08 is for
# photos of 224+ pixels, where a random crop almost always still shows the class. Here a crop to half the area zooms a
# 32-pixel image up to 1.41x, past the sizes the world CLIP was pre-trained on (it saw no crops), and cuts the object:
# the frozen CLIP's zero-shot on such views of the training images falls 6 points below the clean images on
# mini_world, 15 on the satellite images. The rule: the largest crop of 0.5, 0.7, 0.8, 0.9, 0.95 and 1.0 whose views
# the frozen CLIP reads within 1 point of the clean training images on every suite dataset (the report's "train" and
# "aug" columns; decided on the training images alone, docs/results.md). On the close-up objects of mini_world even a
# 0.9 or 0.95 crop loses 5 and 2 points, so it is 1.0: no crop, the images as drawn and their mirror images (every
# shape is left-right symmetric; the pre-training flipped them too).
TRAIN_CROP_SCALE = 1.0
OBJECT_RADIUS = (0.22, 0.40)  # the object's half-size as a fraction of the image: the pre-training photos' range
CLOSE_UP_RADIUS = (0.32, 0.40)  # mini_world's objects and their sketches: close up, the upper part of that range
_OBJECTS = ("colour", "pattern", "shape")
WORLD_DATASETS = {
    "mini_world": dict(colours=["red", "green", "blue", "yellow"], patterns=["plain", "striped", "dotted"],
                       shapes=["circle", "square", "triangle"], named=_OBJECTS, radius=CLOSE_UP_RADIUS,
                       style="photo", camera=None, split_sizes=(40, 10, 40), template="a photo of a {}.",
                       crop_scale=TRAIN_CROP_SCALE),
    "mini_world_fine": dict(colours=list(SHADE_FAMILY), patterns=["plain"], shapes=["circle", "square"],
                            named=("colour", "shape"),
                            style="photo", camera="haze", split_sizes=(40, 10, 40), template="a photo of a {}.",
                            crop_scale=TRAIN_CROP_SCALE),
    "mini_world_texture": dict(colours=["red", "green", "blue", "yellow"], patterns=WORLD_PATTERNS[1:],
                               shapes=[TEXTURE],
                               named=("pattern",),
                               style="photo", camera=None, split_sizes=(40, 10, 40), template="a photo of a {}.",
                               crop_scale=TRAIN_CROP_SCALE),
    "mini_world_satellite": dict(colours=["red", "purple", "blue", "green"], patterns=["plain"],
                                 shapes=["circle", "square", "triangle", "cross"], named=("colour", "shape"),
                                 radius=CLOSE_UP_RADIUS, style="satellite", camera=None, split_sizes=(40, 10, 40),
                                 template="a satellite photo of a {}.", crop_scale=TRAIN_CROP_SCALE),
    "mini_world_xd": dict(colours=["purple", "orange", "pink", "black"], patterns=["plain", "checkered"],
                          shapes=["star", "heart", "cross"], named=_OBJECTS,
                          style="photo", camera="haze", split_sizes=(40, 10, 40), template="a photo of a {}.",
                          crop_scale=TRAIN_CROP_SCALE),
    "mini_world_shift": dict(colours=["red", "green", "blue", "yellow"], patterns=["plain", "striped", "dotted"],
                             shapes=["circle", "square", "triangle"], named=_OBJECTS, radius=CLOSE_UP_RADIUS,
                             style="sketch", camera=None, split_sizes=(0, 0, 40),  # test only, like ImageNet-Sketch
                             template="a photo of a {}.", crop_scale=TRAIN_CROP_SCALE),
}
SUITE = ["mini_world", "mini_world_fine", "mini_world_texture", "mini_world_satellite"]  # the base-to-new datasets
SPLIT_FILE_NAMES = {"mini_world": "MiniWorld", "mini_world_fine": "MiniWorldFine", "mini_world_texture":
                    "MiniWorldTexture", "mini_world_satellite": "MiniWorldSatellite", "mini_world_xd": "MiniWorldXD",
                    "mini_world_shift": "MiniWorldShift"}


def _n_classes(cfg):
    return math.prod(len(cfg[k + "s"]) for k in cfg["named"])


# The same datasets as CoOp datasets, as the fields of data.DatasetSpec (data.WORLD): data.py reads them like any other
# split_zhou_*.json tree (expected counts: classes, and train, val, test images from split_sizes above).
SPECS = {name: dict(coop_name=SPLIT_FILE_NAMES[name], dir=name, image_dir="images",
                    split_file=f"split_zhou_{SPLIT_FILE_NAMES[name]}.json", reader="json", template=cfg["template"],
                    classes=_n_classes(cfg), **dict(zip(("train", "val", "test"),
                                                        (_n_classes(cfg) * n for n in cfg["split_sizes"]))),
                    crop_scale=cfg["crop_scale"])
         for name, cfg in WORLD_DATASETS.items()}
WORLD_SPLIT_FILES = {name: spec["split_file"] for name, spec in SPECS.items()}
WORLD_IMAGE_SIZE = 32  # pixels; equals the world CLIP's input resolution, so Resize + CenterCrop are no-ops
SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased edges and stripes without any extra dependency
WORLD_VERSION = 3  # bump whenever rendering changes, so render_world() re-renders stale folders

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
    if pattern == "zigzag":  # stripes folded into a triangle wave
        period, amp = rng.uniform(4.0, 6.0), rng.uniform(1.2, 2.0)
        wave = amp * np.abs((v / 5.0 + rng.uniform()) % 1.0 - 0.5) * 4
        return ((u + wave) / period + rng.uniform()) % 1.0 < 0.45
    if pattern == "wavy":  # stripes bent into a sine wave
        period = rng.uniform(4.0, 6.0)
        wave = rng.uniform(1.0, 1.8) * np.sin(2 * np.pi * v / rng.uniform(7.0, 10.0) + rng.uniform(0, 2 * np.pi))
        return ((u + wave) / period + rng.uniform()) % 1.0 < 0.45
    if pattern == "grid":  # thin lines in both directions
        cell = rng.uniform(4.0, 6.0)
        return ((u / cell + rng.uniform()) % 1.0 < 0.28) | ((v / cell + rng.uniform()) % 1.0 < 0.28)
    if pattern == "ringed":  # concentric rings around a random centre
        cx, cy = rng.uniform(0, WORLD_IMAGE_SIZE, size=2)
        return (np.hypot(xx - cx, yy - cy) / rng.uniform(3.5, 5.0) + rng.uniform()) % 1.0 < 0.45
    if pattern == "speckled":  # small specks scattered at random
        grain = rng.uniform(1.2, 1.8)
        cells = rng.uniform(size=(64, 64)) < 0.3
        iu = np.floor(xx / grain).astype(int) % 64
        iv = np.floor(yy / grain).astype(int) % 64
        return cells[iv, iu]
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
# and sensor noise. 70% of the pre-training photos come through a neutral camera and the rest through random ones;
# the fine-grained dataset and the cross-dataset target are shot in haze.
WORLD_CAMERAS = {
    "haze": dict(gain=(0.92, 0.96, 1.0), contrast=0.55, offset=(0.3, 0.3, 0.3), noise=0.03),  # bright, washed out
}


def render_image(rng, colour, pattern, shape, *, style="photo", camera=None, size=WORLD_IMAGE_SIZE,
                 radius_range=OBJECT_RADIUS):
    """One (size, size, 3) uint8 image of a `colour` `pattern` `shape`, drawn with random nuisances from `rng`.

    style "photo": a filled shape painted with its pattern in a contrasting ink, on a muted, cloudy background.
    style "sketch": the same object as a wobbly crayon outline on paper, the pattern drawn in the object's colour.
    style "satellite": a photo in false colour (SATELLITE_MIX), with nothing else that tells it from a photo.
    shape TEXTURE: a photo close-up, the pattern filling the whole picture (style "photo" only).
    camera: None (neutral) or a dict like WORLD_CAMERAS["haze"], applied last.
    radius_range: the object's half-size is drawn in it, as a fraction of the image (OBJECT_RADIUS: the pre-training's).
    """
    if style not in ("photo", "sketch", "satellite"):
        raise ValueError(f"unknown style {style!r}")
    if shape == TEXTURE and style != "photo":
        raise ValueError(f"a {TEXTURE} close-up is a photo, not a {style}")
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
    else:  # a photo; a satellite image is drawn as one too, and only its colours differ (below)
        grey = rng.uniform(0.3, 0.85)
        tint = rng.normal(0, 0.05, size=3)
        bg = (grey + tint)[None, None, :] + _smooth_field(rng, x1, y1, rng.uniform(0.0, 0.12))[..., None]

    if shape == TEXTURE:  # a close-up: the whole picture is the object's surface
        inside = np.ones((S * k, S * k), dtype=np.float32)
    else:  # object geometry: size, rotation, position (kept fully inside the image)
        radius = rng.uniform(*radius_range) * S
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
    if style == "satellite":  # false colour: every channel keeps (1 - m) of itself and takes m of the next one
        img = (1 - SATELLITE_MIX) * img + SATELLITE_MIX * np.roll(img, -1, axis=-1)
    if camera is not None:
        gain = np.asarray(camera["gain"]) * rng.uniform(0.95, 1.05, size=3)  # the light varies a little per shot
        img = img * gain * camera["contrast"] + np.asarray(camera["offset"])
        img = img + rng.normal(0, camera["noise"], size=img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


SATELLITE_MIX = 0.5  # red (1, 0, 0) -> (0.5, 0, 0.5), a purple; green -> olive; blue -> teal; yellow -> a pink


# -----------------------------------------------------------------------------
# The datasets, written to disk in CoOp's layout

WORLD_DATASET_IDS = {"mini_world": 1, "mini_world_xd": 2, "mini_world_shift": 3, "mini_world_fine": 4,
                     "mini_world_texture": 5, "mini_world_satellite": 6}  # mixed into every image's seed


def world_classes(name):
    """The classes of dataset `name` in label order: a list of (classname, attrs), attrs a dict of the named attributes
    ({"colour": "red", "pattern": "striped", "shape": "circle"}; the others are drawn per image).

    The labels are ordered so that CoOp's base/new rule (sort the labels, the first ceil(n/2) are base) gives a
    checkerboard over the attribute grid: a class is base when the sum of its attribute indices is even. With two
    named attributes every word then occurs in some base class, with three every pair of words does, so each new class
    is an unseen *combination* of words that prompt learning has seen, the compositional analogue of "new classes".
    With one named attribute (the textures) every new class is a word no base class has.
    """
    cfg = WORLD_DATASETS[name]
    lists = [cfg[k + "s"] for k in cfg["named"]]
    grid = [(sum(idx), words) for idx, words in zip(itertools.product(*[range(len(w)) for w in lists]),
                                                     itertools.product(*lists))]
    # stable sort on parity only: base (even) first, each half in the grid's order
    ordered = [words for parity, words in sorted(grid, key=lambda g: g[0] % 2)]
    return [(" ".join(words), dict(zip(cfg["named"], words))) for words in ordered]


def base_new_labels(n):
    """CoOp's subsample_classes rule: sorted labels, the first ceil(n/2) are base, the rest new."""
    m = math.ceil(n / 2)
    return list(range(m)), list(range(m, n))


def _manifest(name, seed):
    # everything the images depend on besides the code itself, which WORLD_VERSION stands for
    # (not the training augmentation, crop_scale: changing it draws nothing again)
    drawn = {k: v for k, v in WORLD_DATASETS[name].items() if k != "crop_scale"}
    cfg = dict(drawn, name=name, seed=seed, version=WORLD_VERSION, image_size=WORLD_IMAGE_SIZE, supersample=SUPERSAMPLE,
               classes=[c for c, _ in world_classes(name)], split_file=WORLD_SPLIT_FILES[name], image_dir="images",
               rgb={c: WORLD_COLOURS[c] for c in WORLD_DATASETS[name]["colours"]},
               camera_settings=WORLD_CAMERAS.get(WORLD_DATASETS[name]["camera"]), satellite_mix=SATELLITE_MIX)
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
    # split_fewshot*: data.py's few-shot caches (split_fewshot_ref/) and Dassl's (split_fewshot/)
    return os.path.exists(os.path.join(out, "world_manifest.json")) or all(
        f in ("images", WORLD_SPLIT_FILES[name], "world_manifest.json") or f.startswith("split_fewshot")
        for f in os.listdir(out))


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
                          f"python -m world --render --root FOLDER) and point --root at it") from None
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
    for label, (classname, attrs) in enumerate(world_classes(name)):
        class_dir = classname.replace(" ", "_")
        os.makedirs(os.path.join(tmp, "images", class_dir))
        for i in range(n_train + n_val + n_test):
            # one RNG per image, keyed by (seed, dataset, class, index): order-independent and reproducible
            rng = np.random.default_rng([seed, WORLD_DATASET_IDS[name], label, i])
            # the attributes the class does not name are drawn per image (e.g. a texture's colour)
            colour, pattern, shape = (attrs.get(k) or cfg[k + "s"][rng.integers(len(cfg[k + "s"]))] for k in _OBJECTS)
            img = render_image(rng, colour, pattern, shape, style=cfg["style"], camera=camera,
                               radius_range=cfg.get("radius", OBJECT_RADIUS))
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
        if rendered:  # the folder as the user would type it: relative when under the working directory
            where = os.path.relpath(folders[name])
            outside = where == os.pardir or where.startswith(os.pardir + os.sep)
            print(f"rendered {name} to {folders[name] if outside else where}")
    return folders


# -----------------------------------------------------------------------------
# The world's CLIP, as shipped (its pre-training: world/pretrain.py)

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD_CLIP_PATH = os.path.join(PROJECT, "assets", "mini_world_clip.pt")  # shipped: --pretrain never writes it
NEW_CLIP_PATH = os.path.join(PROJECT, "assets", "mini_world_clip.new.pt")  # where --pretrain writes unless told


def load_world_clip(path=None, device="cpu"):
    """The shipped world CLIP, through CLIP's own loading path, as a frozen fp32 model in eval mode."""
    state_dict = torch.load(path or WORLD_CLIP_PATH, map_location="cpu", weights_only=True)
    return clip_layers.freeze(clip_layers.clip.model.build_model(state_dict).float().to(device))


# -----------------------------------------------------------------------------
# Reading a drawn dataset back


def read_world_split(root, name):
    with open(os.path.join(root, name, WORLD_SPLIT_FILES[name])) as f:
        return json.load(f)
