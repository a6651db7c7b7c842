"""
Speed and memory of one training step, ours against the way the official code does it and against the limit, on the
device in hand.

    python bench.py                                # every method, 10 and 100 classes (and 1000 on a GPU)
    python bench.py --methods mpl maple ivlp --classes 10 100 1000 --steps 2
    python bench.py --methods mpl --classes 10 100 --unshared     # also ours without the shared text prefix
    python bench.py --methods mpl --classes 100 --precision bf16  # one precision (default: all the device runs)

One step = forward of a batch of 4 images and the whole class set, cross-entropy, backward, at ViT-B/16 size with
random weights (the speed does not depend on the values); its time is the fastest of --steps steps after a warm-up
(other processes on the machine only ever add time). Three ways of running it:

  official  OfficialEngine below, which runs CLIP's stock modules the way the MaPLe-derived official code
            does: `ResidualAttentionBlock.forward` (nn.MultiheadAttention, LND layout, the 77 x 77 causal mask), all
            77 text tokens, the whole class set in one pass (the parity tests use it too);
  ours      this project's path: SDPA, the text cut after the last EOT, the rows before the class names encoded once
            for all classes (the shared prefix; not where the prompts read the class's own tokens, as ISP's
            self-structural module does), classes in chunks of --text-chunk with activation checkpointing;
  limit     ours with the class side given: the text features computed beforehand, so the step is the image encoder
            with its prompts, forward and backward, plus the logits. No way of computing the text side can make a step
            cheaper than this.

Beside them: "text s", the text side of ours alone (the class set's features, forward and backward with a fixed
gradient), and for ISP "probe s", sample probing's extra pass of the frozen image encoder (part of ours' step, not of
the limit). Both ways compute the same logits (checked first).

Precisions: every one the device runs unless --precision picks some (a CPU: fp32 and bf16 autocast; a GPU: fp32,
bf16 and fp16 autocast), each a table of its own, then ours' step time in each against fp32's, from the same run. On
a CPU the header says whether it has bf16 instructions (AVX512-BF16 or AMX); without them bf16 is emulated, slower
than fp32.

Class names: synthetic, with the token lengths of OpenAI's 1000 ImageNet class names (NAME_TOKENS below: 1 to 11 BPE
tokens, 2.16 on average), spread over the class count by quantile, so that 10, 100 or 1000 classes have ImageNet's
length distribution and the text cost is that of a real benchmark.

The official step grows with the class count until it no longer fits: it is measured at every requested count whose
memory (predicted from the counts measured before it) fits in the free memory, and beyond that its time is a straight
line through the measured counts, printed with "~" and said to be extrapolated.

Peak memory: torch.cuda.max_memory_allocated on a GPU. On the CPU, each configuration runs in a fresh process, and
memory is that process's resident set: "base MB" once the CLIP and the method are built (CLIP's 600 MB of fp32
weights, the runtime), "peak MB" the high-water mark during the steps (the kernel's peak counter, reset after
building, so that building does not count), "step MB" the difference.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import nullcontext

import torch

from engine import clip_engine
import clip_layers
import train

# How many BPE tokens the class names of OpenAI's ImageNet list have (CLIP's notebook Prompt_Engineering_for_ImageNet,
# 1000 names; "tench" is 1 token, "great white shark" 3): {tokens: classes}. Mean 2.16 tokens, so "X a photo of a
# {name}." is 10.2 tokens up to EOT, of which 4.2 (name, ".", EOT) are the class's own.
NAME_TOKENS = {1: 246, 2: 508, 3: 155, 4: 49, 5: 24, 6: 9, 7: 7, 8: 1, 11: 1}
# Words that are one BPE token each, to build names of a given token length.
WORDS = ["red", "golden", "small", "wild", "sea", "mountain", "city", "garden", "night", "old", "dog", "cat", "bird",
         "fish", "car", "boat", "house", "tree", "flower", "snake", "horse", "bear", "shark", "lake", "river", "bridge",
         "tower", "church", "table", "chair", "cup", "bottle", "phone", "clock", "ball", "hat", "shoe", "bag", "box"]


def classnames(n):
    """n class names whose token lengths follow NAME_TOKENS: class i gets the length at quantile (i + 0.5) / n of the
    1000 ImageNet lengths, its words cycling through WORDS (names may repeat: only their lengths matter here)."""
    lengths = sorted(k for k, count in NAME_TOKENS.items() for _ in range(count))          # 1000 lengths, ascending
    names = []
    for i in range(n):
        k = lengths[int((i + 0.5) * len(lengths) / n)]
        names.append(" ".join(WORDS[(7 * i + 11 * j) % len(WORDS)] for j in range(k)))
    return names


# ----------------------------------------------------------------------------------------------------------------------
# The official path: CLIP's stock blocks, sequence-first; for text all 77 positions, all classes in one pass

def stock_block(block, x):
    """CLIP's own ResidualAttentionBlock (nn.MultiheadAttention; for text its 77 x 77 causal mask), NLD -> LND -> NLD."""
    return block(x.transpose(0, 1)).transpose(0, 1)


class OfficialEngine:
    """An engine (as clip_engine.Engine, handed to a method) that runs CLIP as the official MaPLe / MPL / PromptSRC
    code does: every block is CLIP's stock block, the text runs all 77 positions, all classes in one pass."""

    def encode_text(self, clip_model, x, eot, hook=None, hook_rows=None, eot_rows=False):
        x = x.to(clip_model.dtype) + clip_model.positional_embedding.to(clip_model.dtype)  # (C, 77, 512)
        rows, summaries = torch.arange(x.shape[0], device=x.device), []
        for layer, block in enumerate(clip_model.transformer.resblocks):
            x = x if hook is None else hook(layer, x)
            summaries.append(x[rows, eot])
            x = stock_block(block, x)                                                      # (C, 77, 512)
        x = clip_model.ln_final(x[rows, eot]) @ clip_model.text_projection.to(x.dtype)    # (C, 512)
        return (x, torch.stack(summaries, dim=1)) if eot_rows else x

    def vision_block(self, block, x, last):
        return stock_block(block, x)


OFFICIAL = OfficialEngine()


def engine_for(official, text_chunk, shared_prefix=True):
    """The engine of one configuration. official: the official code's way of running CLIP (stock blocks, all 77 text
    positions, the whole class set in one pass); else ours, chunked by text_chunk."""
    return OFFICIAL if official else clip_engine.Engine(text_chunk=text_chunk, shared_prefix=shared_prefix)


def build(method, clip_model, n_classes, engine):
    """The method at its preset, on the CLIP in hand, its encoders run by `engine`."""
    names = classnames(n_classes)
    if method == "zeroshot":
        return clip_layers.ZeroShotCLIP(clip_model, names, engine=engine)
    recipe = train.RECIPES[method]
    return recipe.model(clip_model, names, recipe.config, engine=engine)


def trains(model):
    return any(p.requires_grad for p in model.parameters())


def trains_method(method):
    return train.RECIPES[method].model is not None  # zero-shot: nothing trains, its text is encoded once


def step(model, images, labels, classes=None):
    """One training step; classes: the class side given (the limit), else computed in the step."""
    if not trains(model):  # zero-shot: nothing to train, forward only
        with torch.no_grad():
            return model(images)
    logits = model(images, classes)
    weights = model.loss_weights(images, labels, logits.detach()) if classes is None else None
    train.loss_fn(logits, labels, weights).backward()
    return logits


def text_side(model, gradient):
    """The class side of a step alone: the class set's text features, and their backward with a fixed gradient."""
    if not trains(model):  # zero-shot: its class texts are encoded once, on construction; that encoding, timed
        return clip_layers.ZeroShotCLIP(model.clip, classnames(model.text_features.shape[0]), engine=model.engine)
    out = model.encode_classes()
    features = out[0] if isinstance(out, tuple) else out                 # ISP: (features, EOT summaries or None)
    features.backward(gradient)


class PeakMemory:
    """Peak memory in MB from `reset()` on: the CUDA allocator's peak, or on the CPU the kernel's peak resident set
    (VmHWM, reset by writing 5 to /proc/self/clear_refs)."""

    def __init__(self, cuda):
        self.cuda = cuda

    @staticmethod
    def _status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith(key + ":"))

    def now(self):
        return torch.cuda.memory_allocated() / 2 ** 20 if self.cuda else self._status("VmRSS")

    def reset(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def peak(self):
        return torch.cuda.max_memory_allocated() / 2 ** 20 if self.cuda else self._status("VmHWM")


def timed(fn, steps, cuda):
    """Seconds of the fastest of `steps` calls of fn (after the caller's warm-up): the one least slowed down by other
    processes on the machine, which only ever add time."""
    times = []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(method, n_classes, official, steps, device, text_chunk, precision, arch, shared_prefix=True):
    """One configuration in this (fresh) process: seconds per step (the fastest of `steps` after one warm-up), peak
    memory; for ours also the text side, and with the shared prefix the limit and the probing pass, timed the same way."""
    torch.manual_seed(0)
    cuda = device.startswith("cuda")
    memory = PeakMemory(cuda)
    clip_model = clip_layers.random_clip(arch, device=device)
    model = build(method, clip_model, n_classes, engine_for(official, text_chunk, shared_prefix)).to(device)
    r = clip_model.visual.input_resolution
    images, labels = torch.randn(4, 3, r, r, device=device), torch.arange(4, device=device) % n_classes
    autocast = autocast_for(device, precision)

    def run(fn):
        def go():
            model.zero_grad(set_to_none=True)
            with autocast():
                fn()
        return go

    base = memory.now()
    memory.reset()
    full = run(lambda: step(model, images, labels))
    full()                                                            # warm-up: kernels, allocator
    res = dict(method=method, classes=n_classes, official=official, shared_prefix=shared_prefix,
               sec=timed(full, steps, cuda), base_mb=base, peak_mb=memory.peak())
    if official:
        return res
    with torch.no_grad(), autocast():
        classes = model.encode_classes()                              # the class side, given to the limit's step
    out = classes[0] if isinstance(classes, tuple) else classes      # ISP: (features, EOT summaries or None)
    gradient = torch.randn(out.shape, device=device, generator=torch.Generator(device).manual_seed(0))
    text = run(lambda: text_side(model, gradient))
    text()
    res["text_sec"] = timed(text, steps, cuda)
    if not shared_prefix:  # the limit and the probe do not depend on the text path: measured once, with ours
        return res
    limit = run(lambda: step(model, images, labels, classes))
    limit()
    res["limit_sec"] = timed(limit, steps, cuda)
    if getattr(getattr(model, "cfg", None), "sample_probing", False):
        with torch.no_grad(), autocast():
            logits = model(images, classes)
        probe = run(lambda: model.loss_weights(images, labels, logits))
        probe()
        res["probe_sec"] = timed(probe, steps, cuda)
    return res


# ----------------------------------------------------------------------------------------------------------------------
# Precisions: fp32, and autocast to bf16 (CPU and GPU) or fp16 (GPU), as train.py's --precision

def device_precisions(device):
    """The precisions a device runs: bf16 autocast runs on every CPU (emulated where the CPU has no bf16
    instructions), fp16 autocast only on CUDA here."""
    return ["fp32", "bf16", "fp16"] if device.startswith("cuda") else ["fp32", "bf16"]


def autocast_for(device, precision):
    """A context-manager factory: torch.autocast to the precision's dtype on the device, or nothing for fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return nullcontext
    return lambda: torch.autocast(torch.device(device).type, dtype=dtype)


CPUINFO = "/proc/cpuinfo"


def cpu_bf16():
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX: /proc/cpuinfo's flags; None where it has none to
    read), and the flags found. Without them bf16 matmuls are converted to fp32 and back, slower than fp32."""
    try:
        with open(CPUINFO) as f:
            flags = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return None, []
    found = sorted(flags & {"avx512_bf16", "amx_bf16"})
    return bool(found), found


def check_same_logits(method, device, text_chunk, arch, n_classes=10):
    torch.manual_seed(0)
    clip_model = clip_layers.random_clip(arch, device=device)
    outs = []
    for official in (True, False):
        torch.manual_seed(0)
        model = build(method, clip_model, n_classes, engine_for(official, text_chunk)).to(device)
        torch.manual_seed(1)
        r = clip_model.visual.input_resolution
        with torch.no_grad():
            outs.append(model(torch.randn(2, 3, r, r, device=device)).float())
    return (outs[0] - outs[1]).abs().max().item()


def free_mb(device):
    """Memory a new measurement may use: free GPU memory, or the kernel's MemAvailable."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info()[0] / 2 ** 20
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("MemAvailable:"))


def official_text_mb(arch, n_classes):
    """A first guess of the official step's memory before any count is measured: its text side keeps, per class and
    per layer, about 16 activations of width D at every one of the 77 positions and two h x 77 x 77 attention maps,
    in fp32 (the order of magnitude; from two measured counts on, a line through them replaces it)."""
    cfg = clip_layers.RANDOM_CLIPS[arch]
    D, L, h, T = cfg["transformer_width"], cfg["transformer_layers"], cfg["transformer_heads"], cfg["context_length"]
    return n_classes * L * T * (16 * D + 2 * h * T) * 4 / 2 ** 20


def line_fit(points):
    """Least-squares line y = a + b x through [(x, y), ...]: (a, b); with one point, (y, 0)."""
    if len(points) == 1:
        return points[0][1], 0.0
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    b = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return my - b * mx, b


def main(argv=None):
    from engine import cli
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("--methods", nargs="+", default=["zeroshot", "mpl", "maple", "ivlp", "isp"], help="methods to time")
    p.add_argument("--classes", nargs="+", type=int, default=None, help="default 10 100 (CPU), 10 100 1000 (GPU)")
    p.add_argument("--steps", type=int, default=2, help="timed training steps per method and class count")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda when a GPU is visible, else cpu")
    p.add_argument("--precision", nargs="+", default=None, choices=["fp32", "bf16", "fp16"],
                   help="the precisions to time, each a table, then ours' step time per precision against fp32's "
                        "(default: every one the device runs: fp32 bf16 on a CPU, fp32 bf16 fp16 on a GPU)")
    p.add_argument("--text-chunk", type=int, default=128, help="classes per text pass, as train.py's --text-chunk")
    p.add_argument("--arch", default="ViT-B/16", choices=list(clip_layers.RANDOM_CLIPS), help="tiny: a quick check")
    p.add_argument("--unshared", action="store_true",
                   help="also time ours with shared_prefix=False (every class runs all its text rows: the path before "
                        "the shared prefix), in the same run")
    p.add_argument("--slope-from", type=int, default=100,
                   help="ours' cost per added class is measured from this class count to the largest (default 100)")
    p.add_argument("--memory-margin", type=float, default=0.8,
                   help="run the official step only where its predicted memory is below this fraction of the free "
                        "memory (default 0.8)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one measurement in a fresh process
    args = p.parse_args(argv)
    if args.classes and min(args.classes) < 1:
        p.error(f"--classes must be >= 1, got {args.classes}")
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    precisions = args.precision or device_precisions(args.device)
    wrong = [x for x in precisions if x not in device_precisions(args.device)]
    if wrong:
        p.error(f"--precision {' '.join(wrong)}: --device {args.device} runs {' '.join(device_precisions(args.device))}")
    if args.one:
        method, n, official, shared = args.one.split(",")
        print(json.dumps(measure(method, int(n), official == "1", args.steps, args.device, args.text_chunk,
                                 precisions[0], args.arch, shared_prefix=shared == "1")))
        return
    classes = sorted(args.classes or ([10, 100, 1000] if args.device.startswith("cuda") else [10, 100]))
    if "bf16" in precisions and not args.device.startswith("cuda"):
        native, flags = cpu_bf16()
        print(f"CPU bf16: native ({', '.join(flags)})" if native else
              "CPU bf16: this CPU has no bf16 instructions (no avx512_bf16 or amx_bf16 flag): bf16 is emulated, "
              "expect it slower than fp32" if native is False else "CPU bf16: the CPU's flags could not be read")
    ours = {precision: table(args, classes, precision) for precision in precisions}
    if len(precisions) > 1:
        print(f"ours' step time per precision, against fp32 ({args.device}, {args.arch}, in this run):")
        for method, n in ours[precisions[0]]:
            cells = [f"{x} {ours[x][method, n]:.3f} s" + (f" ({ours[precisions[0]][method, n] / ours[x][method, n]:.2f}x)"
                                                          if x != precisions[0] else "")
                     for x in precisions if (method, n) in ours[x]]
            print(f"  {method:9s} {n:5d} classes: " + ", ".join(cells))


def table(args, classes, precision):
    """One precision's table (every method and class count); returns ours' seconds per step by (method, classes)."""

    def fresh(method, n, official, shared=True):
        """measure() in a fresh process (its own peak memory); None if it failed."""
        cmd = [sys.executable, os.path.abspath(__file__), "--one", f"{method},{n},{int(official)},{int(shared)}",
               "--steps", str(args.steps), "--device", args.device, "--precision", precision,
               "--text-chunk", str(args.text_chunk), "--arch", args.arch]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            err = out.stderr.strip().splitlines()
            print(f"  {method} {n} {'official' if official else 'ours'} failed: {err[-1] if err else out.returncode}")
            return None
        return json.loads(out.stdout.strip().splitlines()[-1])

    print(f"device {args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'CPU'}, "
          f"{torch.get_num_threads()} threads), {args.arch} random weights, batch 4, precision {precision}, "
          f"text chunk {args.text_chunk}, torch {torch.__version__}")
    print(f"{'method':9s} {'classes':>7s} {'official s':>10s} {'ours s':>7s} {'speed-up':>8s} {'text s':>7s} "
          f"{'limit s':>7s} {'ours/limit':>10s} {'probe s':>7s} {'official MB':>11s} {'ours MB':>7s} {'base MB':>7s}"
          f"{' unshared s  text s' if args.unshared else ''}  max |logit diff|")
    summary, times = [], {}
    for method in args.methods:
        diff = check_same_logits(method, args.device, args.text_chunk, args.arch)
        official_points, memory_points, ours = [], [], {}
        for n in classes:
            # The official step at n classes, if its memory (a line through the counts measured so far) fits.
            predicted = line_fit(memory_points) if len(memory_points) >= 2 else None
            need = predicted[0] + predicted[1] * n if predicted else official_text_mb(args.arch, n)
            free = free_mb(args.device)
            o = fresh(method, n, True) if need < args.memory_margin * free else None
            if o is None and need >= args.memory_margin * free:
                print(f"  {method} {n}: the official step would need ~{need:,.0f} MB of {free:,.0f} MB free; not run "
                      f"(--memory-margin {args.memory_margin})", flush=True)
            if o:
                official_points.append((n, o["sec"]))
                memory_points.append((n, o["peak_mb"]))
            u = fresh(method, n, False)
            if u is None:
                continue
            ours[n] = u
            times[method, n] = u["sec"]
            a, b = line_fit(official_points) if official_points else (float("nan"), float("nan"))
            official_sec = o["sec"] if o else a + b * n
            mark = " " if o else "~"
            official_mb = f"{o['peak_mb']:11.0f}" if o else f"{'~%.0f' % need:>11s}"
            probe = f"{u['probe_sec']:7.3f}" if "probe_sec" in u else f"{'-':>7s}"
            extra = ""
            if args.unshared:
                v = fresh(method, n, False, shared=False)
                extra = f" {v['sec']:10.3f} {v['text_sec']:7.3f}" if v else "     failed"
            print(f"{method:9s} {n:7d} {mark}{official_sec:9.3f} {u['sec']:7.3f} {official_sec / u['sec']:7.1f}x "
                  f"{u['text_sec']:7.3f} {u['limit_sec']:7.3f} {u['sec'] / u['limit_sec']:9.2f}x {probe} "
                  f"{official_mb} {u['peak_mb']:7.0f} {u['base_mb']:7.0f}{extra}  {diff:.1e}", flush=True)
        if len(ours) >= 2 and official_points and trains_method(method):
            hi = max(ours)
            lo = args.slope_from if args.slope_from in ours and args.slope_from < hi else min(ours)
            ours_slope = (ours[hi]["sec"] - ours[lo]["sec"]) / (hi - lo)
            official_slope = line_fit(official_points)[1]
            measured = ", ".join(str(n) for n, _ in official_points)
            summary.append(f"{method}: per added class, official +{1e3 * official_slope:.1f} ms (line through "
                           f"{measured} classes, measured), ours +{1e3 * ours_slope:.2f} ms ({lo} -> {hi}): "
                           f"1/{official_slope / ours_slope:.0f} of the official slope")
    for line in summary:
        print(line)
    print("~: the official step did not fit in memory at that count; its time and memory are the straight line "
          "through the counts measured (extrapolated, not measured). text s: ours' text side alone. limit s: the step "
          "with the class side given (image encoder with prompts, forward and backward, and the logits). probe s: "
          "ISP's sample-probing pass, inside ours' step. MB: peak resident set during the steps (CPU) or peak "
          "allocated (GPU); base MB: the process with CLIP and the method built, before the first step."
          + (" unshared: ours with shared_prefix=False, its step and its text side." if args.unshared else ""))
    return times


if __name__ == "__main__":
    from engine import cli  # one line `error: ...` for the user's errors, a traceback for bugs
    cli.run(main)
