"""
Checkpoint files: ours, and the official code's, read without trusting them.

What is trusted, and what is not
--------------------------------
A checkpoint is a pickle inside a zip archive, and unpickling an arbitrary pickle can run arbitrary code. So no file,
not even one of ours, is unpickled by Python's own unpickler here. Every file goes through `read`:

  1. Its size: the zip archive's table of contents says how large each member is once decompressed. `torch.save` never
     compresses, so a member that inflates to more than the file itself is no checkpoint (a "zip bomb") and is refused
     before a byte of it is decompressed. A TorchScript archive (code/ inside) is refused: loading one runs its code.
  2. A pre-scan of the pickle (`scan_pickle`), one pass over its opcodes that runs nothing: only the opcodes PyTorch's
     reader knows (pickle protocol 2, what torch.save writes), only allowed globals (named when refused), bounded
     nesting (a tuple nested a million deep makes PyTorch's reader crash the interpreter), a bounded number of tensors
     and objects (a 5 MB file can ask for a million views of one storage) and of opcodes.
  3. PyTorch's restricted unpickler, `torch.load(weights_only=True)`: it builds tensors, storages, dtypes, containers
     and plain values, and calls nothing else; every other name in the pickle is refused, and we add no function to it.
  4. Stand-ins by name, for what Dassl pickles besides tensors. The official code trains with Dassl, whose
     `save_checkpoint` stores `scheduler.state_dict()`; for the warm-up scheduler of MaPLe / MPL / PromptSRC that
     holds its successor, a `CosineAnnealingLR` object, which holds the `SGD` object, whose `state` is a
     `collections.defaultdict`. For exactly those names (STAND_INS) the restricted unpickler builds an empty `StandIn`
     object that keeps the pickled attributes as data; the real class is never imported, called or consulted, and
     `defaultdict` becomes a plain dict. We never use what they hold; they are there so the file's tensors can load.
  5. What we use is checked as data: what was read nests no deeper than the scan allowed and holds dense tensors only
     (`check_plain`); prompts are floating-point tensors (not meta tensors), finite, with exactly the names and shapes
     the model expects (`match`); the frozen CLIP stored in an official file must have the shapes of the CLIP in hand
     (`check_backbone`).

CLIP weights (`load_clip`, train.py --clip) are trusted only when they are OpenAI's own file, by its SHA-256: only
then does clip.load (and its torch.jit.load) see them. Any other file is a state dict read by `read`, whose shapes are
checked against the CLIP they describe (built on the meta device, which allocates nothing) before CLIP is built.

Official checkpoints (Dassl's `output/.../MultiModalPromptLearner/model.pth.tar-N`) hold the whole CustomCLIP of the
official code: the prompt learner, the frozen CLIP (fp16), the token embeddings of the training-time class names. We
take the prompts, check the frozen CLIP against ours, and drop the rest:
    load_mpl(model, path)    MPL's and MaPLe's repositories -> an mpl.MPL of the same config (the mpl/maple presets)
    load_ivlp(model, path)   the PromptSRC repository's IndependentVL trainer -> an isp.ISP with the ivlp preset
    load_prompts(model, path, method)   train.py --load: a checkpoint of ours ({"params": ...}) or an official one
"""
import os
import pickletools
import re
import warnings
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING

import torch

import clip_layers
from clip_layers import clip
from engine import rundir

# ----------------------------------------------------------------------------------------------------------------------
# Reading a file: stand-ins for what Dassl pickles


class StandIn:
    """Takes the place of a pickled object we do not load (an optimizer or LR scheduler of Dassl's): the restricted
    unpickler creates it empty (`__new__`) and hands it the pickled attributes, which it keeps as a plain dict."""

    def __setstate__(self, state):
        self.state = state


def _plain_dict(*_):
    return {}  # `collections.defaultdict(dict)` in the pickle becomes an empty dict; its items follow as data


# The names Dassl's checkpoints pickle besides tensors (optimizers and schedulers Dassl's build_optimizer and
# build_lr_scheduler can make), each mapped to an inert stand-in. `builtins.dict` only ever appears as the
# defaultdict's factory; it is a stand-in too, so nothing from a file is called through it.
_OPTIMIZERS = ("torch.optim.sgd.SGD", "torch.optim.adam.Adam", "torch.optim.adamw.AdamW",
               "torch.optim.rmsprop.RMSprop", "dassl.optim.radam.RAdam", "dassl.optim.radam.AdamW")
_SCHEDULERS = ("torch.optim.lr_scheduler.CosineAnnealingLR", "torch.optim.lr_scheduler.StepLR",
               "torch.optim.lr_scheduler.MultiStepLR", "dassl.optim.lr_scheduler.ConstantWarmupScheduler",
               "dassl.optim.lr_scheduler.LinearWarmupScheduler")
STAND_INS = [(StandIn, name) for name in _OPTIMIZERS + _SCHEDULERS + ("builtins.dict",)] + \
            [(_plain_dict, "collections.defaultdict")]


# ----------------------------------------------------------------------------------------------------------------------
# Reading a file as data: a pre-scan of its pickle, then PyTorch's restricted unpickler

# What a prompt checkpoint, a Dassl checkpoint or a CLIP state dict can hold, with a wide margin: nesting (a Dassl
# file nests 7 deep), objects built by calls (a tensor is one; ViT-L/14 has about 400), pickle opcodes (20-30 per
# tensor) and the pickle's own size (the tensors' bytes are stored beside it, not in it).
MAX_DEPTH = 64
MAX_OBJECTS = 50_000
MAX_OPCODES = 1_000_000
MAX_PICKLE_BYTES = 64 << 20

# The opcodes PyTorch's weights_only reader knows: protocol 2's, the protocol torch.save writes. Any other (protocol
# 0-1's text opcodes, protocol 4-5's FRAME, MEMOIZE, SHORT_BINUNICODE, ...) it refuses, so we name it first.
TORCH_OPCODES = frozenset(
    "GLOBAL NEWOBJ REDUCE BUILD APPEND APPENDS SETITEM SETITEMS MARK TUPLE TUPLE1 TUPLE2 TUPLE3 NONE NEWFALSE NEWTRUE "
    "EMPTY_TUPLE EMPTY_LIST EMPTY_DICT EMPTY_SET BININT BININT1 BININT2 BINFLOAT BINUNICODE SHORT_BINSTRING BINPERSID "
    "BINGET LONG_BINGET BINPUT LONG_BINPUT LONG1 PROTO STOP".split())
_IN_PLACE = frozenset("APPEND APPENDS SETITEM SETITEMS BUILD".split())  # they fill the container below them
_BUILDS = frozenset("REDUCE NEWOBJ BUILD BINPERSID".split())              # a call: a tensor, a storage, an object


def _stack_effect(op):
    """(name, entries it takes off the stack below a MARK or the top, whether it takes a MARK, whether it fills a
    container in place) of a pickle opcode, from pickletools' description of it."""
    mark = pickletools.markobject in op.stack_before
    taken = op.stack_before.index(pickletools.markobject) if mark else len(op.stack_before)
    return op.name, taken, mark, op.name in _IN_PLACE


_OPCODES = {op: _stack_effect(op) for op in pickletools.opcodes if op.name in TORCH_OPCODES}


def allowed_globals():
    """The names a file may use: PyTorch's weights_only set (tensors, storages, dtypes, OrderedDict, ...) and our
    stand-ins. PyTorch keeps its set in a private function; it is read, never changed."""
    from torch._weights_only_unpickler import _get_allowed_globals
    return set(_get_allowed_globals()) | {name for _, name in STAND_INS}


def scan_pickle(f, source, allowed):
    """Judge one pickle as data before anything unpickles it, in one linear pass over its opcodes
    (pickletools.genops), running nothing: every opcode is one PyTorch's reader knows, every global is allowed, and
    nesting, calls and length stay within the bounds above. The nesting is followed on a model of the unpickler's
    stack: each entry is [depth], shared with the memo, so that a container filled later deepens where the memo hands
    it out afterwards (`check_plain` covers the rest). Raises ValueError naming `source`."""
    stack, marks, memo = [], [], {}
    builds = 0
    protocol = "0 or 1"  # they have no PROTO opcode
    too_many = lambda what, n: ValueError(f"{source} holds more than {n:,} {what}, far more than a checkpoint or a "  # noqa: E731
                                          f"CLIP has; it is not read")
    try:
        for n, (op, arg, _) in enumerate(pickletools.genops(f)):
            if n >= MAX_OPCODES:
                raise too_many("pickle opcodes", MAX_OPCODES)
            if op not in _OPCODES:
                raise ValueError(f"{source} was pickled with protocol {protocol} (opcode {op.name}), which PyTorch's "
                                 f"safe reader does not read; torch.save writes protocol 2. Where you trust the file, "
                                 f"load it and save it again with plain torch.save(obj, path)")
            name, taken, mark, in_place = _OPCODES[op]
            if name in ("BINPUT", "LONG_BINPUT"):
                memo[arg] = stack[-1]
                continue
            if name in ("BINGET", "LONG_BINGET"):
                stack.append(memo[arg])
                continue
            if name == "MARK":
                marks.append(len(stack))
                continue
            if name == "PROTO":
                protocol = arg
                continue
            if name == "STOP":
                return
            if name == "GLOBAL":  # named as PyTorch's reader names it (protocol 2 writes Python 2's __builtin__)
                module, _, attr = arg.partition(" ")
                module, attr = NAME_MAPPING.get((module, attr), (IMPORT_MAPPING.get(module, module), attr))
                if f"{module}.{attr}" not in allowed:
                    raise ValueError(f"{source} holds a {module}.{attr}, which is not a tensor or a plain value (nor "
                                     f"an optimizer or scheduler of a Dassl checkpoint), so nothing of it is read. "
                                     f"A checkpoint holds tensors: save model.state_dict(), not the model")
            elif name in _BUILDS:
                builds += 1
                if builds > MAX_OBJECTS:
                    raise too_many("tensors or objects", MAX_OBJECTS)
            start = (marks.pop() if mark else len(stack)) - taken
            if start < 0:
                raise IndexError("stack underflow")
            items, stack[start:] = stack[start:], []
            inner = 1 + max((d for d, in (items[1:] if in_place else items)), default=0)
            if in_place:                   # the container gets deeper in place, wherever the memo shares it
                node = items[0]
                node[0] = max(node[0], inner)
            else:                          # a new value: a scalar (depth 0) or a container of `items`
                node = [inner if items or name.startswith("EMPTY_") else 0]
            if node[0] > MAX_DEPTH:
                raise ValueError(f"{source} nests containers more than {MAX_DEPTH} deep, far more than a "
                                 f"checkpoint does (it could crash the reader); it is not read")
            stack.append(node)  # every opcode PyTorch reads, but PROTO, MARK, PUT and STOP, leaves one value
    except (IndexError, KeyError, ValueError) as e:
        if isinstance(e, ValueError) and str(e).startswith(source):
            raise
        raise ValueError(f"{source} is not a valid pickle ({type(e).__name__}: {str(e)[:200]}): truncated or "
                         f"damaged; it is not read") from None
    raise ValueError(f"{source} is not a valid pickle (it ends without STOP): truncated?")


def read(path, what="checkpoint"):
    """The dict a checkpoint file holds, tensors on the CPU, read as the header explains. Raises ValueError naming
    the file for anything that is not a checkpoint we can read safely."""
    check_file(path, what)
    allowed = allowed_globals()
    with open(path, "rb") as f:
        if zipfile.is_zipfile(f):
            with zipfile.ZipFile(f) as z:
                names = z.namelist()
                if any(re.fullmatch(r"[^/]+/(code/.*|constants\.pkl)", n) for n in names):
                    raise ValueError(f"{what} {path} is a TorchScript archive: loading one runs the code it holds, "
                                     f"so it is not read. Save a state dict instead: torch.save(model.state_dict(), "
                                     f"path)")
                pickles = [n for n in names if re.fullmatch(r"[^/]+/data\.pkl", n)]
                if len(pickles) != 1:
                    raise ValueError(f"{what} {path} is a zip archive but not one torch.save wrote (it holds "
                                     f"{len(pickles)} data.pkl records, not 1)")
                if z.getinfo(pickles[0]).file_size > MAX_PICKLE_BYTES:
                    raise ValueError(f"{what} {path}: its pickle is over {MAX_PICKLE_BYTES >> 20} MiB, far more than "
                                     f"a checkpoint's (its tensors are stored beside it); it is not read")
                with z.open(pickles[0]) as p:
                    scan_pickle(p, f"{what} {path}", allowed)
        else:  # torch.save before PyTorch 1.6: magic number, protocol, system info, the object, storage keys, data
            for _ in range(5):
                scan_pickle(f, f"{what} {path}", allowed)
    try:
        with torch.serialization.safe_globals(STAND_INS):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the scan found nothing wrong, so this is a damaged file: say so, not PyTorch's advice
        first = next((line for line in str(e).splitlines() if line.strip()), "")
        raise ValueError(f"could not read {what} {path}: the file is truncated or not a torch checkpoint "
                         f"({type(e).__name__}: {first[:300]})") from None
    check_plain(ckpt, f"{what} {path}")
    if not isinstance(ckpt, dict):
        raise ValueError(f"{what} {path} holds a {type(ckpt).__name__}, not a dict: it was not written by this "
                         f"project (checkpoint.pt) or by Dassl (model.pth.tar-N)")
    return ckpt


def check_plain(value, source):
    """What was read, walked without recursion: every tensor is dense, and no chain of containers is longer than
    MAX_DEPTH, counting chains through shared containers too (the pickle's memo can fill a list after another has
    taken it in, which the scan does not follow). A container met again on its own chain (a cycle) ends the chain."""
    def children(v):
        v = v.state if isinstance(v, StandIn) else v
        return [*v.keys(), *v.values()] if isinstance(v, dict) else v if isinstance(v, (list, tuple, set)) else ()

    height, on_chain, todo = {}, set(), [(value, False)]
    while todo:
        v, finished = todo.pop()
        if isinstance(v, torch.Tensor):
            if v.layout != torch.strided:
                raise ValueError(f"{source} holds a {v.layout} tensor; checkpoints hold dense tensors")
        elif isinstance(v, (dict, list, tuple, set, StandIn)):
            if finished:  # all below it done: its height is one more than its highest child's
                on_chain.discard(id(v))
                height[id(v)] = 1 + max((height.get(id(c), 0) for c in children(v)), default=0)
                if height[id(v)] > MAX_DEPTH:
                    raise ValueError(f"{source} nests containers more than {MAX_DEPTH} deep, far more than a "
                                     f"checkpoint does; it is not read")
            elif id(v) not in height and id(v) not in on_chain:
                on_chain.add(id(v))
                todo.append((v, True))
                todo.extend((c, False) for c in children(v))


def check_file(path, what="checkpoint", slack=1 << 20):
    """Fail early, and say why, for what is not a torch checkpoint at all or would inflate far beyond its size."""
    if os.path.isdir(path):
        inside = os.path.join(path, "checkpoint.pt")
        hint = f": did you mean {inside}?" if os.path.isfile(inside) else " (a run directory holds checkpoint.pt)"
        raise IsADirectoryError(f"{what} {path} is a directory, not a file{hint}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise ValueError(f"{what} {path} is an empty file (0 bytes): an interrupted copy or download?")
    if not head.startswith((b"PK", b"\x80")):  # a zip archive (torch.save) or a pickle (torch.save before 1.6)
        kind = "a JSON file (results.json?)" if head.lstrip()[:1] in (b"{", b"[") else \
            f"not one (it begins with {head!r})"
        takes = ". --load and --resume take checkpoint.pt or an official model.pth.tar-N" if what == "checkpoint" else ""
        raise ValueError(f"{what} {path} is not a torch file: it is {kind}{takes}")
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as z:
                inflated = sum(member.file_size for member in z.infolist())
        except (zipfile.BadZipFile, OSError) as e:
            raise ValueError(f"{what} {path} is a damaged zip archive ({e}): truncated?") from None
        if inflated > size + slack:
            raise ValueError(f"{what} {path} declares {inflated / 2**20:,.0f} MiB of contents in a file of "
                             f"{size / 2**20:,.1f} MiB: torch.save does not compress, so this is not its file "
                             f"(a compression bomb?); it is not read")


def check_tensors(tensors, source, what="prompts"):
    """The values we load: dense floating-point tensors that hold data (not meta tensors), all finite."""
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{source}: {what} {name!r} is a {type(value).__name__}, not a tensor")
        if value.layout != torch.strided or value.is_meta or not value.is_floating_point():
            kind = (f"a {value.layout} tensor" if value.layout != torch.strided else
                    "a meta tensor (no values)" if value.is_meta else f"of dtype {value.dtype}")
            raise ValueError(f"{source}: {what} {name!r} is {kind}; prompts are dense floating-point tensors")
        if not torch.isfinite(value).all():
            raise ValueError(f"{source}: {what} {name!r} holds NaN or infinite values; these prompts are broken "
                             f"(a diverged run?) and are not loaded")


def some(names, limit=8):
    """A list of names for a message: all of them, or the first `limit` and how many there are."""
    names = list(names)
    return str(names) if len(names) <= limit else f"{str(names[:limit])[:-1]}, ... ({len(names):,} in all)]"


class Mismatch(ValueError):
    """A file's tensors are not the model's: other names or shapes (`match`)."""


def match(expected, given, source, hint):
    """The one key-and-shape check of every import: `given` (name -> tensor) must hold exactly the names of `expected`
    (name -> shape), each with its shape, and be loadable values (check_tensors)."""
    missing, unexpected = sorted(expected.keys() - given.keys()), sorted(given.keys() - expected.keys())
    shapes = [f"{k}: {tuple(given[k].shape)} in the file, {tuple(expected[k])} in the model"
              for k in sorted(expected.keys() & given.keys())
              if isinstance(given[k], torch.Tensor) and tuple(given[k].shape) != tuple(expected[k])]
    if missing or unexpected or shapes:
        raise Mismatch(f"{source} does not match this model: missing {some(missing)}, unexpected "
                         f"{some(unexpected)}, shape mismatches {some(shapes, 3)}. {hint}")
    check_tensors(given, source)


# ----------------------------------------------------------------------------------------------------------------------
# Ours: {"params": {name: tensor}, ...} written by train.py

def load_trainable(model, params, source):
    """Load prompts read from a file into a method (possibly built for other class names): every trainable tensor must
    be given, with its shape and finite values (`match`, which names the file); nothing else may be."""
    if not isinstance(params, dict):
        raise ValueError(f"{source}: 'params' is a {type(params).__name__}, not a dict of tensors")
    shapes = {k: p.shape for k, p in model.named_parameters() if p.requires_grad}
    match(shapes, params, source,
          f"Was it saved from the same method and config ({type(model).__name__})?")
    model.load_prompt_state_dict(params)


# ----------------------------------------------------------------------------------------------------------------------
# Official checkpoints

# Where the official CustomCLIP keeps the frozen CLIP in its state dict, and where ours has it. PromptSRC keeps a second,
# prompt-free copy of the image encoder for its self-regularising loss (prompt_learner.ZS_image_encoder).
_FROZEN_CLIP = (("image_encoder.", "visual."), ("text_encoder.", ""), ("logit_scale", "logit_scale"),
                ("prompt_learner.ZS_image_encoder.", "visual."))
# Token embeddings of the training-time class names; the official loaders drop them too.
_TOKEN_BUFFERS = ("prompt_learner.token_prefix", "prompt_learner.token_suffix")


def official_state_dict(checkpoint, name=None):
    """(state dict, epoch, name) of a Dassl checkpoint: a path, or the dict it holds (`name`: its file, for messages)."""
    name = name or ("the given checkpoint dict" if isinstance(checkpoint, dict) else str(checkpoint))
    if not isinstance(checkpoint, dict):
        checkpoint = read(checkpoint)
    if not isinstance(checkpoint.get("state_dict"), dict):
        raise ValueError(f"{name}: not a Dassl checkpoint (no 'state_dict' dict; keys: {some(sorted(map(str, checkpoint)))})")
    return checkpoint["state_dict"], checkpoint.get("epoch"), name


def check_backbone(clip_model, state_dict, source):
    """An official checkpoint holds the frozen CLIP it was trained with: each of its tensors that our CLIP has must
    have our CLIP's shape, or the prompts were trained on another backbone (ViT-B/32, ViT-L/14, ...)."""
    own = clip_model.state_dict()
    wrong = []
    for key, value in state_dict.items():
        for theirs, ours in _FROZEN_CLIP:
            mine = own.get(ours + key[len(theirs):]) if key.startswith(theirs) else None
            if mine is not None and tuple(getattr(value, "shape", ())) != tuple(mine.shape):
                wrong.append(f"{key}: {tuple(getattr(value, 'shape', ()))} in the file, {tuple(mine.shape)} in this "
                             f"CLIP")
    if wrong:
        raise ValueError(f"{source} was trained on another CLIP backbone than the one in hand: "
                         f"{'; '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}. Load the CLIP it was trained "
                         f"with (--clip).")


# MaPLe names its one projection per deep layer `compound_prompt_projections.{l}`; MPL's code (n_add of them per layer)
# `txt2img_proj.{a}.{l}`, which is ours. A MaPLe file is MPL's layout with a = 0.
_MAPLE_NAMES = ("compound_prompt_projections.", "txt2img_proj.0.")


def mpl_prompts(state_dict):
    """MPL / MaPLe: the `prompt_learner.` tensors in our names, without the token buffers and the frozen CLIP. Any
    other key is kept, so that `match` reports it as unexpected."""
    prompts = {}
    for key, value in state_dict.items():
        if key in _TOKEN_BUFFERS or key.startswith(tuple(theirs for theirs, _ in _FROZEN_CLIP)):
            continue
        prompts[key.replace("prompt_learner." + _MAPLE_NAMES[0], "prompt_learner." + _MAPLE_NAMES[1], 1)] = value
    return prompts


def load_mpl(model, checkpoint, name=None):
    """Load the prompts of an official MPL or MaPLe checkpoint into `model`, an mpl.MPL of the same config; returns
    the file's epoch. fp16 values are cast to the model's dtype."""
    state_dict, epoch, name = official_state_dict(checkpoint, name)
    check_backbone(model.clip, state_dict, name)
    prompts = mpl_prompts(state_dict)
    match({"prompt_learner." + k: v.shape for k, v in model.prompt_learner.state_dict().items()}, prompts, name,
          f"Is it a checkpoint of the same config ({model.cfg}) and backbone?")
    # copy_ casts fp16 -> the model's dtype
    model.prompt_learner.load_state_dict({k[len("prompt_learner."):]: v for k, v in prompts.items()}, strict=True)
    return epoch


def ivlp_names(depth):
    """Where the official IVLP keeps each prompt, and where ours has it:
        prompt_learner.ctx                                     (n, 512)  text prompts of layer 0   -> text_prompts[0]
        text_encoder.transformer.resblocks.{l}.VPT_shallow     (n, 512)  text prompts of layer l   -> text_prompts[l]
        image_encoder.VPT                                      (n, 768)  vision prompts of layer 0 -> vision_prompts[0]
        image_encoder.transformer.resblocks.{l}.VPT_shallow    (n, 768)  vision prompts of layer l -> vision_prompts[l]
    """
    where = {"prompt_learner.ctx": ("text_prompts", 0), "image_encoder.VPT": ("vision_prompts", 0)}
    for l in range(1, depth):
        where[f"text_encoder.transformer.resblocks.{l}.VPT_shallow"] = ("text_prompts", l)
        where[f"image_encoder.transformer.resblocks.{l}.VPT_shallow"] = ("vision_prompts", l)
    return where


def load_ivlp(model, checkpoint, name=None):
    """Load the prompts of an official IVLP checkpoint into `model`, an isp.ISP built with the ivlp preset (no
    structural modules) and the file's n_ctx and depth; returns the file's epoch."""
    state_dict, epoch, name = official_state_dict(checkpoint, name)
    if any(m is not None for m in (model.self_text, model.cross_text, model.coupling)):
        raise ValueError(f"{name} is an IVLP checkpoint, which holds prompts only: build the model with the ivlp "
                         f"preset (isp.PRESETS['ivlp'], train.py --method ivlp), not with structural modules")
    check_backbone(model.clip, state_dict, name)
    where = ivlp_names(model.cfg.depth)
    prompts = {k: v for k, v in state_dict.items()
               if (k.startswith("prompt_learner.") or k.endswith(("VPT", "VPT_shallow"))) and k not in _TOKEN_BUFFERS
               and not k.startswith("prompt_learner.ZS_image_encoder.")}
    match({k: getattr(model, p)[l].shape for k, (p, l) in where.items()}, prompts, name,
          f"Is it an IVLP checkpoint of the same n_ctx ({model.cfg.n_ctx}), depth ({model.cfg.depth}) and backbone?")
    with torch.no_grad():
        for key, (param, l) in where.items():
            getattr(model, param)[l] = prompts[key]             # copy_ casts fp16 -> fp32
    return epoch


# --load of an official Dassl model.pth.tar-N: which layout each method reads
OFFICIAL_IMPORTERS = {"mpl": load_mpl, "maple": load_mpl, "ivlp": load_ivlp}


def official_layout(state_dict):
    """Which official method wrote a Dassl state dict, told by its keys: (name, the train.py flags that read it), the
    flags None for a method this project does not implement.
        CoOp, CoCoOp   only their prompt learner: ctx, token_prefix/suffix (CoCoOp: and meta_net.*)
        MaPLe          prompt_learner.compound_prompt_projections.{l}
        MPL            prompt_learner.txt2img_proj.{a}.{l}
        IVLP           image_encoder.VPT and the blocks' VPT_shallow
        PromptSRC      IVLP's prompts (names and shapes) and a frozen prompt_learner.ZS_image_encoder. Its other
                       parts (the self-regularising losses and the Gaussian averaging of the epochs' prompts) act in
                       training only: at test time it is IVLP's forward, so its file loads as one (--method ivlp)."""
    keys = [str(k) for k in state_dict]
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if "ctx" in keys and "token_prefix" in keys:
        return ("CoCoOp" if has("meta_net.") else "CoOp"), None
    ctx = state_dict.get("prompt_learner.ctx")
    n_ctx = f" --n-ctx {ctx.shape[-2]}" if isinstance(ctx, torch.Tensor) and ctx.dim() >= 2 else ""
    deep = lambda prefix, end="": 1 + sum(k.startswith(prefix) and k.endswith(end) for k in keys)  # noqa: E731
    if has("prompt_learner.compound_prompt_projections."):
        return "MaPLe", f"--method maple{n_ctx} --depth {deep('prompt_learner.compound_prompts_text.')}"
    if has("prompt_learner.txt2img_proj."):
        n_add = len({k.split(".")[2] for k in keys if k.startswith("prompt_learner.txt2img_proj.")})
        return "MPL", (f"--method mpl{n_ctx} --n-add {n_add} --depth {deep('prompt_learner.compound_prompts_text.')} "
                       f"and the --n-rm it was trained with (the file does not record it)")
    if "image_encoder.VPT" in keys:
        name = "PromptSRC" if has("prompt_learner.ZS_image_encoder.") else "IVLP"
        return name, f"--method ivlp{n_ctx} --depth {deep('image_encoder.transformer.resblocks.', '.VPT_shallow')}"
    return None


def load_prompts(model, path, method):
    """train.py --load: a checkpoint of ours ({"params": ...}) or an official MPL / MaPLe / IVLP / PromptSRC
    model.pth.tar-N. A file of another method or config is named with the flags that would read it."""
    ckpt = read(path)
    if "params" in ckpt:
        saved = ckpt.get("method")
        try:
            load_trainable(model, ckpt["params"], path)
        except Mismatch:
            if not isinstance(saved, str) or saved == method:
                raise
            raise ValueError(f"--load {path} holds prompts of --method {saved[:40]} (its 'method'), not of "
                             f"--method {method}: load it with --method {saved[:40]} and the settings it was "
                             f"trained with (its 'config')") from None
        return
    layout = official_layout(ckpt["state_dict"]) if isinstance(ckpt.get("state_dict"), dict) else None
    if layout is not None and layout[1] is None:
        raise ValueError(f"--load {path} is a {layout[0]} checkpoint, which this project does not read (it reads "
                         f"official MPL, MaPLe, IVLP and PromptSRC files, and its own)")
    try:
        if method not in OFFICIAL_IMPORTERS:
            raise Mismatch(f"--load {path}: not a checkpoint of this project (no 'params') nor an official one this "
                           f"method reads (official MPL, MaPLe and IVLP checkpoints load with "
                           f"{', '.join(f'--method {m}' for m in OFFICIAL_IMPORTERS)})")
        OFFICIAL_IMPORTERS[method](model, ckpt, name=path)
    except Mismatch:
        if layout is None:
            raise
        raise ValueError(f"--load {path} is an official {layout[0]} checkpoint that this model does not match: "
                         f"read it with {layout[1]}") from None


# ----------------------------------------------------------------------------------------------------------------------
# CLIP weights (--clip): OpenAI's own files, or a state dict read as data

def openai_files():
    """SHA-256 -> model name of every CLIP file OpenAI publishes (clip.load's download addresses carry it)."""
    return {url.split("/")[-2]: name for name, url in clip.clip._MODELS.items()}


def load_clip(name_or_path="ViT-B/16", device="cpu"):
    """An OpenAI ViT CLIP as a frozen fp32 model, from a model name (the file clip.load downloads to ~/.cache/clip)
    or a local file. OpenAI ships TorchScript archives, and loading one runs the code it holds, so only a file whose
    SHA-256 is one OpenAI published is handed to clip.load. Any other file must be a state dict (e.g.
    torch.save(model.state_dict(), path)): read as data (`read`), its shapes checked against the CLIP they describe
    (built first on the meta device, which allocates nothing), and only then built."""
    if name_or_path in clip.available_models():
        url = clip.clip._MODELS[name_or_path]  # where clip.load looks for (and downloads) it
        path = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"CLIP weights '{name_or_path}' not on this machine: expected {path} (clip.load "
                                    f"writes it, with internet), or pass --clip /path/to/{os.path.basename(path)}.")
    elif os.path.isdir(name_or_path) or not os.path.exists(name_or_path):
        raise FileNotFoundError(f"--clip {name_or_path!r} is neither a CLIP model name "
                                f"({', '.join(clip.available_models())}) nor an existing file.")
    else:
        path = name_or_path
    if rundir.file_sha256(path) in openai_files():  # OpenAI's own file: clip.load, with its TorchScript
        with warnings.catch_warnings():  # torch.jit.load warns that it is deprecated
            warnings.simplefilter("ignore")
            model = clip.load(path, device="cpu", jit=False)[0]
    elif path != name_or_path:  # the file clip.load downloaded for a name
        raise ValueError(f"CLIP weights file {path} is corrupt (its SHA-256 is not OpenAI's): delete it and "
                         f"download it again.")
    else:
        model = build_clip(read(path, what="CLIP weights"), f"CLIP weights {path}")
    return clip_layers.freeze(model.float().to(device))


def build_clip(state_dict, source):
    """clip.model.build_model(state_dict) for a state dict read from a file, once it is known to describe one ViT
    CLIP exactly: every value a dense floating-point tensor whose storage holds its values (no stride-0 expansion
    standing for a huge one), every name and shape those of the CLIP that build_model would make."""
    if "visual.conv1.weight" not in state_dict:
        kind = ("a ResNet CLIP: only the ViT backbones are supported" if "visual.layer1.0.conv1.weight" in state_dict
                else "a Dassl checkpoint, not CLIP weights" if "state_dict" in state_dict
                else f"not an OpenAI CLIP state dict (no 'visual.conv1.weight'; keys: {some(sorted(map(str, state_dict)))})")
        raise ValueError(f"{source}: {kind}")
    for key, t in state_dict.items():
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided or not t.is_floating_point():
            raise ValueError(f"{source}: {str(key)[:80]!r} is not a dense floating-point tensor")
        if t.numel() * t.element_size() > t.untyped_storage().nbytes():
            raise ValueError(f"{source}: {str(key)[:80]!r} has shape {tuple(t.shape)} but stores "
                             f"{t.untyped_storage().nbytes():,} bytes (a stride-0 tensor?); CLIP weights store every "
                             f"value")
    try:
        with torch.device("meta"), warnings.catch_warnings():  # copying into meta tensors is a no-op: it warns
            warnings.simplefilter("ignore")
            clip.model.build_model(dict(state_dict))
    except (RuntimeError, KeyError, ValueError, TypeError, ZeroDivisionError, IndexError) as e:
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        raise ValueError(f"{source} does not describe one OpenAI CLIP: {type(e).__name__}: {first[:300]}") from None
    return clip.model.build_model(dict(state_dict))
