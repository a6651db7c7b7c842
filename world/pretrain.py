"""
Pre-training the mini world's CLIP: the caption grammar and the contrastive loop that wrote assets/mini_world_clip.pt.
Only `python -m world --pretrain` needs this file; drawing the datasets and loading the shipped CLIP are in
world/mini_world.py.

    python -m world --pretrain    # writes assets/mini_world_clip.new.pt (or --weights), not the shipped one

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
  frame the *style*: photo, sketch or satellite, and sometimes the *light*). Sketches are described as "a sketch /
  drawing / doodle of a ...", photos as "a photo / picture / image of a ...", a photo under a coloured or hazy camera
  sometimes as "a hazy photo of a ..." or "a photo of a ... in warm light", satellite images always as "a satellite
  photo / image / view of a ..." (or "an aerial photo of a ..."), texture close-ups as "a zigzag texture." or "a photo
  of a zigzag texture.", and 20 % of the other captions have a neutral frame ("a ...", "..."). The loss is told which
  images in a batch each caption describes (contrastive_loss), so "a photo of a" is a claim the text encoder must
  encode: it reads "a satellite photo of a red circle" (a purple one, in false colour) differently from "a photo of a
  red circle". This is what gives text prompts something to act on, as the context words do in real CLIP.
- Rare words: 15 % of the object photos are in one of 8 fine shades of red and blue, which a caption names 5 % of the
  time (SHADE_NAMING) and otherwise calls by the family's word; the fine-grained dataset's names are these shades.
- Temperature: learned from CLIP's 1/0.07 and clamped at CLIP's 100. It learns with a 10x learning rate because this
  pre-training has 900 steps where CLIP's had about 400,000 (see pretrain_world_clip), and the known positives let it
  grow (a batch's duplicate captions no longer cap it). Where it ends, and why not at CLIP's 100: docs/results.md.
- Pre-training: symmetric InfoNCE over 900 batches of 256 from 32,768 images of the whole world, new classes included
  (like real CLIP it has seen every concept; only prompt learning is restricted to the base classes), AdamW, warmup
  and cosine decay. The images: 60 % photos of objects and 10 % texture close-ups (70 % of these photos through a
  neutral camera, the rest through random ones), 12 % sketches, 18 % satellite images (pretrain_sample).
- Weights: 5.1 M parameters (of which the 49408 x 64 token table is 3.2 M), shipped in assets/ as a 10.4 MB fp16
  state dict, loaded with CLIP's own build_model.
"""
import math
import os
import re
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import clip_layers
from data import images_to_tensor
from engine import rundir
from world.mini_world import (BASIC_COLOURS, NEW_CLIP_PATH, SHADE_FAMILY, TEXTURE, WORLD_COLOURS, WORLD_IMAGE_SIZE,
                              WORLD_PATTERNS, WORLD_SHAPES, render_image)

PRETRAIN_STREAM_ID = 100  # the pre-training images come from their own seed stream, never from a benchmark split


def random_camera(rng):
    """A camera of the pre-training stream's 'web': random light colour, contrast, haze and noise."""
    contrast = rng.uniform(0.5, 1.0)
    return dict(gain=tuple(rng.uniform(0.55, 1.05, size=3)), contrast=contrast,
                offset=tuple(rng.uniform(0, 1 - contrast) + rng.uniform(0, 0.05, size=3)), noise=rng.uniform(0, 0.06))



# -----------------------------------------------------------------------------
# Captions for pre-training: what is drawn, how (photo, sketch, satellite image, close-up) and under what light, in
# many phrasings
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
SATELLITE_TEMPLATES = ["a satellite photo of a {}.", "a satellite image of a {}.", "a satellite view of a {}.",
                       "an aerial photo of a {}."]
NEUTRAL_TEMPLATES = ["a {}.", "{}.", "this is a {}.", "the {}."]  # say nothing about photo or sketch
TEXTURE_TEMPLATES = ["a photo of a {} texture.", "a close-up photo of a {} pattern.", "a {} texture.",
                     "a {} pattern.", "{} fabric."]  # close-ups: the pattern is the subject
LIGHT_TEMPLATES = {  # photos only: a caption may name one light word of its camera (light_words)
    "warm": ["a photo of a {} in warm light.", "a warm photo of a {}."],
    "cold": ["a photo of a {} in cold light.", "a cold photo of a {}."],
    "hazy": ["a hazy photo of a {}.", "a washed out photo of a {}."],
    "dark": ["a dark photo of a {}.", "a photo of a {} in dim light."],
}
LIGHTS = list(LIGHT_TEMPLATES)
STYLES = ["photo", "sketch", "satellite"]
PATTERN_NOUNS = {"striped": "stripes", "dotted": "dots", "checkered": "checks", "zigzag": "zigzags",
                 "wavy": "waves", "grid": "grid lines", "ringed": "rings", "speckled": "specks"}
SHADE_NAMING = 0.05  # how often a caption names a fine shade ("crimson") rather than its family ("red")


def light_words(camera):
    """The light words that describe a camera (a dict like WORLD_CAMERAS["haze"]); none for the neutral camera.
    The cross-dataset target's haze is "hazy"."""
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

    The colour word: a fine shade is named as such SHADE_NAMING of the time and by its family otherwise ("red" for
    "crimson"), and a caption that says "red" pins the family, which every shade of red has.
    A close-up (shape TEXTURE) is described by its pattern ("a zigzag texture."), sometimes with its colour.
    An object: 60% all three attribute words, 40% only some of them. The frame: a satellite image always gets a
    satellite frame; otherwise 20% a neutral one ("a {}."), else one of the image's style (photo or sketch templates),
    and for a photo whose camera has light words, half the time one of those ("a hazy photo of a {}.").
    """
    pins = {}
    if colour in SHADE_FAMILY and rng.uniform() >= SHADE_NAMING:
        colour = SHADE_FAMILY[colour]  # said (and pinned) as its family
    if shape == TEXTURE:
        phrase = f"{colour} {pattern}" if rng.uniform() < 0.3 else pattern
        pins.update(pattern=pattern, shape=TEXTURE, **({"colour": colour} if phrase != pattern else {}))
        template = TEXTURE_TEMPLATES[rng.integers(len(TEXTURE_TEMPLATES))]
        if "photo" in template:
            pins["style"] = "photo"
        return template.format(phrase), pins
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

    if style == "satellite":
        template = SATELLITE_TEMPLATES[rng.integers(len(SATELLITE_TEMPLATES))]
        pins["style"] = style
    elif rng.uniform() < 0.2:
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
PINNABLE = [("colour", list(WORLD_COLOURS)), ("pattern", WORLD_PATTERNS), ("shape", WORLD_SHAPES + [TEXTURE]),
            ("style", STYLES)]


def _codes(attrs):
    """Integer codes of images' attributes: (N, 5) [colour, pattern, shape, style, colour family] and (N,) bit masks
    of light words."""
    colours = PINNABLE[0][1]
    codes = np.array([[words.index(a[k]) for k, (_, words) in enumerate(PINNABLE)]
                      + [colours.index(SHADE_FAMILY.get(a[0], a[0]))] for a in attrs])
    lights = np.array([sum(1 << LIGHTS.index(w) for w in a[4]) for a in attrs])
    return codes, lights


def caption_matches(image_codes, image_lights, pins):
    """(B_images, B_captions) bool: image i has every attribute that caption j pins (a colour pin is met by the
    colour itself or, for a fine shade, by its family's word)."""
    need = np.array([[words.index(p[k]) if k in p else -1 for k, words in PINNABLE] for p in pins])  # -1: not pinned
    need_light = np.array([1 << LIGHTS.index(p["light"]) if "light" in p else 0 for p in pins])
    codes = image_codes[:, None, :4]
    ok = (need[None] == -1) | (need[None] == codes)
    ok[..., 0] |= need[None, :, 0] == image_codes[:, None, 4]  # "red" describes a crimson image too
    return ok.all(-1) & ((image_lights[:, None] & need_light[None]) == need_light[None])


def pretrain_sample(seed, i):
    """Image i of the pre-training stream and its (colour, pattern, shape, style, light words); the captions are drawn
    anew every time the image is used. Every class of every dataset occurs (new classes included), in these shares:
    60% photos of objects (15% of them in a fine shade), 10% texture close-ups, 12% sketches, 18% satellite images."""
    rng = np.random.default_rng([seed, PRETRAIN_STREAM_ID, i])
    pick = lambda words: words[rng.integers(len(words))]
    r = rng.uniform()
    kind = "sketch" if r < 0.12 else "satellite" if r < 0.30 else "texture" if r < 0.40 else "object"
    style = "photo" if kind in ("texture", "object") else kind  # a close-up is a photo
    shaded = kind == "object" and rng.uniform() < 0.15
    colour = pick(list(SHADE_FAMILY) if shaded else BASIC_COLOURS)
    pattern = "plain" if kind == "satellite" else pick(WORLD_PATTERNS[1:] if kind == "texture" else WORLD_PATTERNS)
    shape = TEXTURE if kind == "texture" else pick(WORLD_SHAPES)
    camera = random_camera(rng) if style == "photo" and rng.uniform() < 0.3 else None
    image = render_image(rng, colour, pattern, shape, style=style, camera=camera)
    return image, (colour, pattern, shape, style, tuple(light_words(camera)))


# -----------------------------------------------------------------------------
# The world's CLIP: OpenAI's architecture at toy width and full depth, pre-trained on the world's captions


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
    steps: int = 900                # CLIP's had about 400,000; this many fit a CPU (time: docs/results.md)
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


def pretrain_world_clip(path=NEW_CLIP_PATH, cfg=None):
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
