"""
Checkpoint files: ours, and the official code's, read without trusting them.

What is trusted, and what is not
--------------------------------
A checkpoint is a pickle inside a zip archive, and unpickling an arbitrary pickle can run arbitrary code. So no file,
not even one of ours, is unpickled by Python's own unpickler here. Every file goes through `read`:

  1. Its size: the zip archive's table of contents says how large each member is once decompressed. `torch.save` never
     compresses, so a member that inflates to more than the file itself is no checkpoint (a "zip bomb") and is refused
     before a byte of it is decompressed.
  2. PyTorch's restricted unpickler, `torch.load(weights_only=True)`: it builds tensors, storages, dtypes, containers
     and plain values, and calls nothing else; every other name in the pickle is refused, and we add no function to it.
  3. Stand-ins by name, for what Dassl pickles besides tensors. The official code trains with Dassl, whose
     `save_checkpoint` stores `scheduler.state_dict()`; for the warm-up scheduler of MaPLe / MPL / PromptSRC that
     holds its successor, a `CosineAnnealingLR` object, which holds the `SGD` object, whose `state` is a
     `collections.defaultdict`. For exactly those names (STAND_INS) the restricted unpickler builds an empty `StandIn`
     object that keeps the pickled attributes as data; the real class is never imported, called or consulted, and
     `defaultdict` becomes a plain dict. We never use what they hold; they are there so the file's tensors can load.
  4. What we use is checked as data: prompts are floating-point tensors (not meta tensors), finite, with exactly the
     names and shapes the model expects (`match`); the frozen CLIP stored in an official file must have the shapes
     of the CLIP in hand (`check_backbone`).

Official checkpoints (Dassl's `output/.../MultiModalPromptLearner/model.pth.tar-N`) hold the whole CustomCLIP of the
official code: the prompt learner, the frozen CLIP (fp16), the token embeddings of the training-time class names. We
take the prompts, check the frozen CLIP against ours, and drop the rest:
    load_mpl(model, path)    MPL's and MaPLe's repositories -> an mpl.MPL of the same config (the mpl/maple presets)
    load_ivlp(model, path)   the PromptSRC repository's IndependentVL trainer -> an isp.ISP with the ivlp preset
    load_prompts(model, path, method)   train.py --load: a checkpoint of ours ({"params": ...}) or an official one
"""
import os
import pickle
import zipfile

import torch

# ----------------------------------------------------------------------------------------------------------------------
# Reading a file


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


def read(path):
    """The dict a checkpoint file holds, tensors on the CPU, read as the header explains. Raises ValueError naming
    the file for anything that is not a checkpoint we can read safely."""
    check_file(path)
    try:
        with torch.serialization.safe_globals(STAND_INS):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # a name outside the allowed set: say which, not PyTorch's advice
        raise ValueError(f"checkpoint {path} holds objects that are not tensors or plain values and are not the "
                         f"optimizer/scheduler objects of a Dassl checkpoint, so it is not read "
                         f"({str(e).splitlines()[0][:300]})") from None
    except Exception as e:
        raise ValueError(f"could not read checkpoint {path}: the file is truncated or not a torch checkpoint "
                         f"({type(e).__name__}: {str(e)[:300]})") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a dict: it was not written by this "
                         f"project (checkpoint.pt) or by Dassl (model.pth.tar-N)")
    return ckpt


def check_file(path, slack=1 << 20):
    """Fail early, and say why, for what is not a torch checkpoint at all or would inflate far beyond its size."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise ValueError(f"checkpoint {path} is an empty file (0 bytes): an interrupted copy or download?")
    if not head.startswith((b"PK", b"\x80")):  # a zip archive (torch.save) or a pickle (torch.save before 1.6)
        kind = "a JSON file (results.json?)" if head.lstrip()[:1] in (b"{", b"[") else \
            f"not one (it begins with {head!r})"
        raise ValueError(f"{path} is not a torch checkpoint: it is {kind}. --load and --resume take checkpoint.pt or "
                         f"an official model.pth.tar-N")
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as z:
                inflated = sum(member.file_size for member in z.infolist())
        except (zipfile.BadZipFile, OSError) as e:
            raise ValueError(f"checkpoint {path} is a damaged zip archive ({e}): truncated?") from None
        if inflated > size + slack:
            raise ValueError(f"checkpoint {path} declares {inflated / 2**20:,.0f} MiB of contents in a file of "
                             f"{size / 2**20:,.1f} MiB: torch.save does not compress, so this is not a checkpoint "
                             f"(a compression bomb?); it is not read")


def check_tensors(tensors, source, what="prompts"):
    """The values we load: floating-point tensors that hold data (not meta tensors), all finite."""
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{source}: {what} {name!r} is a {type(value).__name__}, not a tensor")
        if value.is_meta or not value.is_floating_point():
            kind = "a meta tensor (no values)" if value.is_meta else f"of dtype {value.dtype}"
            raise ValueError(f"{source}: {what} {name!r} is {kind}; prompts are floating-point tensors")
        if not torch.isfinite(value).all():
            raise ValueError(f"{source}: {what} {name!r} holds NaN or infinite values; these prompts are broken "
                             f"(a diverged run?) and are not loaded")


def match(expected, given, source, hint):
    """The one key-and-shape check of every import: `given` (name -> tensor) must hold exactly the names of `expected`
    (name -> shape), each with its shape, and be loadable values (check_tensors)."""
    missing, unexpected = sorted(expected.keys() - given.keys()), sorted(given.keys() - expected.keys())
    shapes = [f"{k}: {tuple(given[k].shape)} in the file, {tuple(expected[k])} in the model"
              for k in sorted(expected.keys() & given.keys())
              if isinstance(given[k], torch.Tensor) and tuple(given[k].shape) != tuple(expected[k])]
    if missing or unexpected or shapes:
        raise ValueError(f"{source} does not match this model: missing {missing}, unexpected {unexpected}, shape "
                         f"mismatches {shapes}. {hint}")
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

# Where the official CustomCLIP keeps the frozen CLIP in its state dict, and where ours has it.
_FROZEN_CLIP = (("image_encoder.", "visual."), ("text_encoder.", ""), ("logit_scale", "logit_scale"))
# Token embeddings of the training-time class names; the official loaders drop them too.
_TOKEN_BUFFERS = ("prompt_learner.token_prefix", "prompt_learner.token_suffix")


def official_state_dict(checkpoint, name=None):
    """(state dict, epoch, name) of a Dassl checkpoint: a path, or the dict it holds (`name`: its file, for messages)."""
    name = name or ("the given checkpoint dict" if isinstance(checkpoint, dict) else str(checkpoint))
    if not isinstance(checkpoint, dict):
        checkpoint = read(checkpoint)
    if not isinstance(checkpoint.get("state_dict"), dict):
        raise ValueError(f"{name}: not a Dassl checkpoint (no 'state_dict' dict; keys: {sorted(map(str, checkpoint))})")
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
               if (k.startswith("prompt_learner.") or k.endswith(("VPT", "VPT_shallow"))) and k not in _TOKEN_BUFFERS}
    match({k: getattr(model, p)[l].shape for k, (p, l) in where.items()}, prompts, name,
          f"Is it an IVLP checkpoint of the same n_ctx ({model.cfg.n_ctx}), depth ({model.cfg.depth}) and backbone?")
    with torch.no_grad():
        for key, (param, l) in where.items():
            getattr(model, param)[l] = prompts[key]             # copy_ casts fp16 -> fp32
    return epoch


# --load of an official Dassl model.pth.tar-N: which layout each method reads
OFFICIAL_IMPORTERS = {"mpl": load_mpl, "maple": load_mpl, "ivlp": load_ivlp}


def load_prompts(model, path, method):
    """train.py --load: a checkpoint of ours ({"params": ...}) or an official MPL / MaPLe / IVLP model.pth.tar-N."""
    ckpt = read(path)
    if "params" in ckpt:
        load_trainable(model, ckpt["params"], path)
    elif "state_dict" in ckpt and method in OFFICIAL_IMPORTERS:
        OFFICIAL_IMPORTERS[method](model, ckpt, name=path)
    else:
        official = ", ".join(f"--method {m}" for m in OFFICIAL_IMPORTERS)
        raise ValueError(f"--load {path}: not a checkpoint of this project (no 'params') nor an official one this "
                         f"method reads (official MPL, MaPLe and IVLP checkpoints load with {official})")
