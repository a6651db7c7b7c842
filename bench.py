"""
Speed and memory of one training step, ours against the way the official code does it, on the device in hand.

    python bench.py                                # every method, 10 and 100 classes (and 1000 on a GPU)
    python bench.py --methods mpl maple --classes 10 100 1000 --steps 3

One step = forward of a batch of 4 images and the whole class set, cross-entropy, backward, at ViT-B/16 size with
random weights (the speed does not depend on the values). "official" is the same method built with fast=False, which
runs CLIP's stock modules the way the MaPLe-derived official code does: `ResidualAttentionBlock.forward` (nn.MultiheadAttention, LND layout, the
77 x 77 causal mask), all 77 text tokens, the whole class set in one pass. "ours" is this project's path: SDPA, the text
cut after the last EOT, classes in chunks of --text-chunk with activation checkpointing. Both compute the same logits
(checked below before timing). Peak memory: torch.cuda.max_memory_allocated on a GPU; on the CPU the peak resident set
of a fresh process per measurement (so each number is that step's own high-water mark, CLIP's weights included).
"""
import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time

import torch

import clip_layers
import train

# Class names of the usual length (1-3 words), so that the EOT cut is as long as on the real benchmarks.
WORDS = ["red", "golden", "striped", "small", "wild", "sea", "mountain", "city", "garden", "night", "spotted", "old"]
NOUNS = ["retriever", "bakery", "boeing 737", "tabby cat", "sunflower", "lake", "pizza", "toyota corolla", "texture",
         "highway or road", "violin", "parachute"]


def classnames(n):
    return [f"{WORDS[i % len(WORDS)]} {NOUNS[(i // len(WORDS)) % len(NOUNS)]} {i}" for i in range(n)]


def build(method, clip_model, n_classes, official, text_chunk):
    """The method at its preset, on the CLIP in hand. official: fast=False, the official code's way of running CLIP
    (stock blocks, all 77 text positions, the whole class set in one pass); else ours, chunked by text_chunk."""
    names = classnames(n_classes)
    if method == "zeroshot":
        return clip_layers.ZeroShotCLIP(clip_model, names, fast=not official)
    recipe = train.RECIPES[method]
    cfg = recipe.config
    if cfg.depth > min(clip_layers.n_layers(clip_model)):  # --arch tiny: 4 layers, fewer than the prompt depth 9
        cfg = dataclasses.replace(cfg, depth=3)
    return recipe.model(clip_model, names, cfg, text_chunk=None if official else text_chunk, fast=not official)


def step(model, images, labels):
    if not any(p.requires_grad for p in model.parameters()):  # zero-shot: nothing to train, forward only
        with torch.no_grad():
            return model(images)
    logits = model(images)
    weights = model.sample_weights(images, labels, logits=logits.detach()) if hasattr(model, "sample_weights") \
        else None
    loss = train.loss_fn(logits, labels, weights)
    loss.backward()
    return logits


def measure(method, n_classes, official, steps, device, text_chunk, precision, arch):
    """Seconds per step (mean of `steps` after one warm-up) and peak memory in MB, for one configuration."""
    torch.manual_seed(0)
    clip_model = clip_layers.random_clip(arch, device=device)
    model = build(method, clip_model, n_classes, official, text_chunk).to(device)
    r = clip_model.visual.input_resolution
    images, labels = torch.randn(4, 3, r, r, device=device), torch.arange(4, device=device) % n_classes
    cuda = device.startswith("cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    ctx = (lambda: torch.autocast("cuda", dtype=dtype)) if (cuda and dtype) else train.nullcontext
    with ctx():
        step(model, images, labels)  # warm-up: kernels, allocator
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        with ctx():
            step(model, images, labels)
    if cuda:
        torch.cuda.synchronize()
    sec = (time.time() - t0) / steps
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(method=method, classes=n_classes, official=official, sec=sec, peak_mb=peak)


def check_same_logits(method, device, text_chunk, arch, n_classes=10):
    torch.manual_seed(0)
    clip_model = clip_layers.random_clip(arch, device=device)
    outs = []
    for official in (True, False):
        torch.manual_seed(0)
        model = build(method, clip_model, n_classes, official, text_chunk).to(device)
        torch.manual_seed(1)
        r = clip_model.visual.input_resolution
        with torch.no_grad():
            outs.append(model(torch.randn(2, 3, r, r, device=device)).float())
    return (outs[0] - outs[1]).abs().max().item()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["zeroshot", "mpl", "maple", "ivlp", "isp"])
    p.add_argument("--classes", nargs="+", type=int, default=None, help="default 10 100 (CPU), 10 100 1000 (GPU)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast dtype on CUDA")
    p.add_argument("--text-chunk", type=int, default=128)
    p.add_argument("--arch", default="ViT-B/16", choices=list(clip_layers.RANDOM_CLIPS), help="tiny: a quick check")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one measurement in a fresh process
    args = p.parse_args()
    if args.one:
        method, n, official = args.one.split(",")
        print(json.dumps(measure(method, int(n), official == "1", args.steps, args.device, args.text_chunk,
                                 args.precision, args.arch)))
        return
    classes = args.classes or ([10, 100, 1000] if args.device.startswith("cuda") else [10, 100])
    print(f"device {args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'CPU'}, "
          f"{torch.get_num_threads()} threads), {args.arch} random weights, batch 4, precision {args.precision}, "
          f"text chunk {args.text_chunk}, torch {torch.__version__}")
    print(f"{'method':9s} {'classes':>7s} {'official s':>10s} {'ours s':>8s} {'speed-up':>8s} "
          f"{'official MB':>11s} {'ours MB':>8s} {'memory':>7s}  max |logit diff|")
    for method in args.methods:
        diff = check_same_logits(method, args.device, args.text_chunk, args.arch)
        for n in classes:
            res = {}
            for official in (True, False):
                cmd = [sys.executable, os.path.abspath(__file__), "--one", f"{method},{n},{int(official)}",
                       "--steps", str(args.steps), "--device", args.device, "--precision", args.precision,
                       "--text-chunk", str(args.text_chunk), "--arch", args.arch]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    res[official] = None
                    print(f"  {method} {n} {'official' if official else 'ours'} failed: "
                          f"{out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
                    continue
                res[official] = json.loads(out.stdout.strip().splitlines()[-1])
            o, u = res.get(True), res.get(False)
            if o and u:
                print(f"{method:9s} {n:7d} {o['sec']:10.3f} {u['sec']:8.3f} {o['sec'] / u['sec']:7.1f}x "
                      f"{o['peak_mb']:11.0f} {u['peak_mb']:8.0f} {u['peak_mb'] / o['peak_mb']:6.2f}x  {diff:.1e}",
                      flush=True)


if __name__ == "__main__":
    main()
