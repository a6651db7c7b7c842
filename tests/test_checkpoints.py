"""
Checkpoint files from strangers (checkpoints.py): official MPL / MaPLe / IVLP checkpoints in the structure Dassl
really writes (a real SGD optimizer and a real warm-up + cosine scheduler pickled inside), hostile pickles that try to
run code, a compression bomb, and broken values. CPU, the shared tiny CLIP.

    python -m pytest -q test_checkpoints.py
"""
import copy
import io
import os
import pickle
import time
import zipfile
from collections import OrderedDict
from dataclasses import replace

import pytest
import torch

from engine import checkpoints
import isp
import mpl
from isp import ISP, ISPConfig

CLASSES = ["dog", "cat", "sea lion"]
TINY = {"mpl": replace(mpl.PRESETS["mpl"], **mpl.CROSS_DATASET),
        "maple": replace(mpl.PRESETS["maple"], **mpl.CROSS_DATASET)}
IVLP = replace(isp.PRESETS["ivlp"], depth=3)
# The hostile pickles below are protocol 4 (torch.save writes 2); PyTorch warns that it may not read every opcode.
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")


def images_for(clip_model, n=3, seed=1):
    size = clip_model.visual.input_resolution
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def make_mpl(clip_model, cfg, seed=0):
    """An MPL model whose prompt values are random, all different, and exactly representable in fp16 (what an fp16
    file holds)."""
    torch.manual_seed(seed)
    model = mpl.MPL(clip_model, CLASSES, cfg)
    with torch.no_grad():
        for p in model.prompt_learner.parameters():
            p.copy_((p + 0.1 * torch.randn_like(p)).half().float())
    return model


def make_ivlp(clip_model, seed=0):
    torch.manual_seed(seed)
    model = ISP(clip_model, CLASSES, IVLP)
    with torch.no_grad():
        for p in (model.text_prompts, model.vision_prompts):
            p.copy_(torch.randn_like(p).half().float())
    return model


# ----------------------------------------------------------------------------------------------------------------------
# The official CustomCLIP's state dict: prompt learner, token buffers of the training-time classes, frozen CLIP (fp16)

def frozen_clip(clip_model):
    sd = OrderedDict(("image_encoder." + k, v.half()) for k, v in clip_model.visual.state_dict().items())
    for k, v in clip_model.state_dict().items():
        if k.startswith(("transformer.", "positional_embedding", "ln_final.", "text_projection")):
            sd["text_encoder." + k] = v.half()
    sd["logit_scale"] = clip_model.logit_scale.detach().half()
    return sd


def mpl_state_dict(model, clip_model, maple=False, fp16=True, n_train_classes=7):
    """MPL's (or MaPLe's) official state dict. dtypes of the official fp16 run: ctx (made from the fp16 token embedding)
    and proj (`.half()`) are fp16; compound prompts and projections fp32. PREC amp/fp32: all fp32."""
    pl = model.prompt_learner
    width = pl.ctx.shape[1]
    sd = OrderedDict()
    sd["prompt_learner.ctx"] = pl.ctx.detach().clone()
    sd["prompt_learner.token_prefix"] = torch.randn(n_train_classes, 1, width)
    sd["prompt_learner.token_suffix"] = torch.randn(n_train_classes, 76 - pl.n_ctx, width)
    for k, v in pl.state_dict().items():
        if k != "ctx":
            name = k.replace("txt2img_proj.0.", "compound_prompt_projections.") if maple else k
            sd["prompt_learner." + name] = v.clone()
    for k in ("prompt_learner.ctx", "prompt_learner.token_prefix", "prompt_learner.token_suffix",
              "prompt_learner.proj.weight", "prompt_learner.proj.bias"):
        if fp16 and k in sd:
            sd[k] = sd[k].half()
    return sd | frozen_clip(clip_model)


def ivlp_state_dict(model, clip_model, n_train_classes=7):
    """PromptSRC's IndependentVL CustomCLIP, fp16: prompt_learner.ctx (layer-0 text prompts) and token buffers, the
    layer-0 vision prompts as image_encoder.VPT, the deep prompts as VPT_shallow parameters of blocks 1..J-1."""
    width = model.text_prompts.shape[-1]
    sd = OrderedDict()
    sd["prompt_learner.ctx"] = model.text_prompts[0].detach().half()
    sd["prompt_learner.token_prefix"] = torch.randn(n_train_classes, 1, width).half()
    sd["prompt_learner.token_suffix"] = torch.randn(n_train_classes, 72, width).half()
    sd |= frozen_clip(clip_model)
    sd["image_encoder.VPT"] = model.vision_prompts[0].detach().half()
    for l in range(1, model.cfg.depth):
        sd[f"text_encoder.transformer.resblocks.{l}.VPT_shallow"] = model.text_prompts[l].detach().half()
        sd[f"image_encoder.transformer.resblocks.{l}.VPT_shallow"] = model.vision_prompts[l].detach().half()
    return sd


# ----------------------------------------------------------------------------------------------------------------------
# Dassl's checkpoint, rebuilt with the real objects: what `save_checkpoint(trainer state)` pickles

class ConstantWarmupScheduler(torch.optim.lr_scheduler.LRScheduler):
    """Dassl's constant warm-up (dassl/optim/lr_scheduler.py) as pickling sees it: an LR scheduler object that keeps
    its successor scheduler as an attribute, so its state_dict() holds that successor object (which holds the
    optimizer object). Written here because Dassl is not a dependency; its constructor arguments are Dassl's."""

    def __init__(self, optimizer, successor, warmup_epoch, cons_lr):
        self.successor, self.warmup_epoch, self.cons_lr = successor, warmup_epoch, cons_lr
        super().__init__(optimizer)

    def get_lr(self):
        if self.last_epoch >= self.warmup_epoch:
            return self.successor.get_last_lr()
        return [self.cons_lr for _ in self.base_lrs]

    def step(self, epoch=None):
        if self.last_epoch >= self.warmup_epoch:
            self.successor.step(epoch)
            self._last_lr = self.successor.get_last_lr()
        else:
            super().step(epoch)


def module_of(state_dict):
    """The official CustomCLIP as an nn.Module holding exactly `state_dict`'s tensors (shared storage, as in the real
    trainer): prompts as trainable parameters, the frozen CLIP as frozen ones, the token buffers as buffers."""
    root = torch.nn.Module()
    for key, value in state_dict.items():
        *path, leaf = key.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        if key.endswith(("token_prefix", "token_suffix")):
            module.register_buffer(leaf, value)
        else:
            trainable = key.startswith("prompt_learner.") or key.endswith(("VPT", "VPT_shallow"))
            module.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=trainable))
    return root


def dassl_save(state_dict, path, epoch=5):
    """Train the module a few SGD steps as Dassl's trainer does (build_optimizer hands SGD *all* of the CustomCLIP's
    parameters; build_lr_scheduler wraps CosineAnnealingLR in the constant warm-up), so that the optimizer holds
    momentum buffers in its defaultdict `state`; then save Dassl's dict. Returns the state dict as saved (trained)."""
    model = module_of(state_dict)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0035, momentum=0.9, weight_decay=5e-4)
    scheduler = ConstantWarmupScheduler(optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 5.0), 1, 1e-5)
    for _ in range(3):
        optimizer.zero_grad()
        sum((p.float() ** 2).sum() for p in model.parameters() if p.requires_grad).backward()
        optimizer.step()
        scheduler.step()
    saved = OrderedDict(model.state_dict())  # save_checkpoint's OrderedDict (it strips "module." prefixes)
    torch.save({"state_dict": saved, "epoch": epoch, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "val_result": None}, path)
    return saved


# What torch.serialization.get_unsafe_globals_in_checkpoint lists for a file written by Dassl's own save_checkpoint,
# build_optimizer and build_lr_scheduler (Dassl.pytorch at c61a1b5, torch 2.14, MaPLe's optimizer config)
REAL_DASSL_GLOBALS = {"torch.optim.sgd.SGD", "collections.defaultdict", "builtins.dict",
                      "torch.optim.lr_scheduler.CosineAnnealingLR"}


def test_rebuilt_dassl_file_has_the_real_files_structure(tmp_path, tiny):
    path = tmp_path / "model.pth.tar-5"
    dassl_save(mpl_state_dict(make_mpl(tiny, TINY["mpl"]), tiny), path)
    assert set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path))) == REAL_DASSL_GLOBALS
    with pytest.raises(pickle.UnpicklingError):  # what plain weights_only loading says of such a file
        torch.load(path, weights_only=True)
    ckpt = checkpoints.read(str(path))
    successor = ckpt["scheduler"]["successor"]
    assert type(successor) is checkpoints.StandIn and type(successor.state["optimizer"]) is checkpoints.StandIn
    momentum = successor.state["optimizer"].state["state"]
    assert type(momentum) is dict and len(momentum) > 0   # the defaultdict, as a plain dict of its items


@pytest.mark.parametrize("method, fp16", [("mpl", True), ("maple", True), ("maple", False)])
def test_real_structure_dassl_file_loads_with_identical_predictions(tmp_path, tiny, method, fp16):
    source = make_mpl(tiny, TINY[method])
    path = tmp_path / "model.pth.tar-5"
    saved = dassl_save(mpl_state_dict(source, tiny, maple=method == "maple", fp16=fp16), path)
    with torch.no_grad():  # the trained values, as the file holds them, are what `source` must now predict with
        for k, v in source.prompt_learner.named_parameters():
            k = k.replace("txt2img_proj.0.", "compound_prompt_projections.") if method == "maple" else k
            v.copy_(saved["prompt_learner." + k])
    target = make_mpl(tiny, TINY[method], seed=1)
    x = images_for(tiny)
    with torch.no_grad():
        assert not torch.equal(target(x), source(x))
        checkpoints.load_prompts(target, str(path), method)
        assert torch.equal(target(x), source(x))
    assert all(p.dtype == torch.float32 for p in target.prompt_learner.parameters())


def test_real_structure_ivlp_file_loads_with_identical_predictions(tmp_path, tiny):
    source = make_ivlp(tiny)
    path = tmp_path / "model.pth.tar-20"
    saved = dassl_save(ivlp_state_dict(source, tiny), path, epoch=20)
    with torch.no_grad():
        for key, (param, l) in checkpoints.ivlp_names(IVLP.depth).items():
            getattr(source, param)[l] = saved[key]
    target = make_ivlp(tiny, seed=1)
    x = images_for(tiny)
    with torch.no_grad():
        assert not torch.equal(target(x), source(x))
        assert checkpoints.load_ivlp(target, str(path)) == 20
        assert torch.equal(target(x), source(x))
    with pytest.raises(ValueError, match=r"missing \['image_encoder.transformer.resblocks.3.VPT_shallow'"):
        checkpoints.load_ivlp(ISP(tiny, CLASSES, replace(IVLP, depth=4)), str(path))
    with pytest.raises(ValueError, match="holds prompts only: build the model with the ivlp preset"):
        checkpoints.load_ivlp(ISP(tiny, CLASSES, ISPConfig(depth=3, sample_probing=False)), str(path))
    with pytest.raises(ValueError, match=r"model\.pth\.tar-20 is an official IVLP checkpoint that this model does "
                                         r"not match: read it with --method ivlp --n-ctx 4 --depth 3$"):
        checkpoints.load_prompts(ISP(tiny, CLASSES, ISPConfig(depth=3)), str(path), "isp")


def test_official_checkpoint_errors_name_the_file_and_the_keys(tmp_path, tiny):
    model = make_mpl(tiny, TINY["mpl"])
    good = {"state_dict": mpl_state_dict(model, tiny), "epoch": 5}

    def save(ckpt, name):
        torch.save(ckpt, tmp_path / name)
        return str(tmp_path / name)

    renamed = copy.deepcopy(good)
    renamed["state_dict"]["prompt_learner.ctx_vectors"] = renamed["state_dict"].pop("prompt_learner.ctx")
    with pytest.raises(ValueError, match=r"renamed\.pth\.tar-5 does not match.*missing \['prompt_learner\.ctx'\], "
                                         r"unexpected \['prompt_learner\.ctx_vectors'\]"):
        checkpoints.load_mpl(model, save(renamed, "renamed.pth.tar-5"))
    reshaped = copy.deepcopy(good)
    reshaped["state_dict"]["prompt_learner.compound_prompts_text.1"] = torch.zeros(2, 64)
    with pytest.raises(ValueError, match=r"shape mismatches \['prompt_learner\.compound_prompts_text\.1: \(2, 64\) "
                                         r"in the file, \(1, 64\) in the model'\]"):
        checkpoints.load_mpl(model, save(reshaped, "reshaped.pth.tar-5"))
    deeper = {"state_dict": mpl_state_dict(make_mpl(tiny, replace(TINY["mpl"], depth=4)), tiny)}
    with pytest.raises(ValueError, match=r"unexpected \['prompt_learner\.compound_prompts_text\.2'"):
        checkpoints.load_mpl(model, deeper)
    stranger = copy.deepcopy(good)
    stranger["state_dict"]["visual.proj"] = torch.zeros(64, 64)  # neither prompt nor the official frozen CLIP
    with pytest.raises(ValueError, match=r"unexpected \['visual\.proj'\]"):
        checkpoints.load_mpl(model, stranger)
    with pytest.raises(ValueError, match="no 'state_dict'"):
        checkpoints.load_mpl(model, {"epoch": 5})
    # a MaPLe file given to --method mpl: the message names the file and the flags that read it
    maple = save({"state_dict": mpl_state_dict(make_mpl(tiny, TINY["maple"]), tiny, maple=True)}, "maple.pth.tar-2")
    with pytest.raises(ValueError, match=r"maple\.pth\.tar-2 is an official MaPLe checkpoint that this model does "
                                         r"not match: read it with --method maple --n-ctx 2 --depth 3$"):
        checkpoints.load_prompts(model, maple, "mpl")
    checkpoints.load_prompts(make_mpl(tiny, TINY["maple"]), maple, "maple")  # and those flags do read it


def test_official_checkpoint_of_another_backbone_is_refused(tmp_path, tiny):
    model = make_mpl(tiny, TINY["mpl"])
    sd = mpl_state_dict(model, tiny)
    sd["image_encoder.conv1.weight"] = torch.zeros(64, 3, 16, 16).half()   # a /16 patch embedding, not tiny's /8
    sd["image_encoder.positional_embedding"] = torch.zeros(5, 64).half()
    path = tmp_path / "model.pth.tar-5"
    torch.save({"state_dict": sd, "epoch": 5}, path)
    with pytest.raises(ValueError, match=r"another CLIP backbone.*image_encoder\.conv1\.weight: \(64, 3, 16, 16\) in "
                                         r"the file, \(64, 3, 8, 8\) in this CLIP"):
        checkpoints.load_mpl(model, str(path))


# ----------------------------------------------------------------------------------------------------------------------
# Hostile files: pickles that try to run code. The proof that code ran is a file created by it.

def with_pickle(tmp_path, payload, name="evil.pt"):
    """A real torch.save archive ({"params": {}}) whose data.pkl is replaced by `payload` (the rest kept)."""
    clean = io.BytesIO()
    torch.save({"params": {}}, clean)
    path = tmp_path / name
    with zipfile.ZipFile(clean) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info, payload if info.filename.endswith("/data.pkl") else src.read(info))
    return str(path)


def short_unicode(s):
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b  # SHORT_BINUNICODE


def stack_global(module, name):  # protocol 4: STACK_GLOBAL resolves dotted names in Python's own unpickler
    return short_unicode(module) + short_unicode(name) + b"\x93"


def glob(module, name):  # protocol 0-3: GLOBAL
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def call(func_bytes, *string_args):
    args = b"(" + b"".join(short_unicode(a) for a in string_args) + b"t"  # MARK ... TUPLE
    return func_bytes + args + b"R"                                       # REDUCE


def as_checkpoint(value_bytes):  # {"params": value}: a dict that the loader would accept
    return b"\x80\x04}" + short_unicode("params") + value_bytes + b"s."    # PROTO 4, EMPTY_DICT, SETITEM, STOP


def gadgets(proof):
    code = f"open({str(proof)!r}, 'w').close() or {{}}"
    eval_via = "_rebuild_tensor.__builtins__.get"  # dict.get on the builtins: hands out eval
    return {
        "STACK_GLOBAL dotted attribute chain": as_checkpoint(call(call(stack_global("torch._utils", eval_via), "eval"),
                                                                 code)),
        "GLOBAL dotted attribute chain": as_checkpoint(call(call(glob("torch._utils", eval_via), "eval"), code)),
        "GLOBAL builtins.eval": as_checkpoint(call(glob("builtins", "eval"), code)),
        "GLOBAL __builtin__.eval": as_checkpoint(call(glob("__builtin__", "eval"), code)),
        "STACK_GLOBAL os.system": as_checkpoint(call(stack_global("os", "system"), f"touch {proof}")),
        "GLOBAL posix.system": as_checkpoint(call(glob("posix", "system"), f"touch {proof}")),
        "stand-in attribute chain": as_checkpoint(call(call(glob("checkpoints", "StandIn.__setstate__.__globals__.get"),
                                                            "open"), str(proof), "w")),
        "torch.load itself": as_checkpoint(call(glob("torch", "load"), str(proof))),
        "a Dassl name's attribute": as_checkpoint(call(glob("torch.optim.sgd", "SGD.__init__.__globals__.get"),
                                                       "eval")),
    }


@pytest.mark.parametrize("kind", list(gadgets("x")))
def test_hostile_pickles_run_nothing(tmp_path, kind):
    proof = tmp_path / "code_ran"
    path = with_pickle(tmp_path, gadgets(proof)[kind])
    with pytest.raises(ValueError, match=r"evil\.pt"):
        checkpoints.read(path)
    assert not proof.exists()


def test_the_gadget_is_real(tmp_path):
    """The STACK_GLOBAL gadget does run code under Python's own unpickler (the reader above refuses it)."""
    proof = tmp_path / "code_ran"
    pickle.loads(gadgets(proof)["STACK_GLOBAL dotted attribute chain"])
    assert proof.exists()


def allowed_globals():
    """Every global the reader lets a file name: PyTorch's weights_only set and our stand-ins."""
    from torch._weights_only_unpickler import _get_allowed_globals
    names = dict(_get_allowed_globals())
    names.update({name: obj for obj, name in checkpoints.STAND_INS})
    return names


def test_reduce_on_every_allowed_global_runs_nothing(tmp_path):
    """Call every allowed global with a string that would run code if anything evaluated it: nothing runs, and each
    either fails (a clear ValueError naming the file) or builds a harmless value."""
    proof = tmp_path / "code_ran"
    code = f"open({str(proof)!r}, 'w').close()"
    for i, full_name in enumerate(allowed_globals()):
        module, _, name = full_name.rpartition(".")
        for payload in (call(glob(module, name), code), call(stack_global(module, name), code)):
            path = with_pickle(tmp_path, as_checkpoint(payload), name=f"g{i}.pt")
            try:
                checkpoints.read(path)
            except ValueError as e:
                assert f"g{i}.pt" in str(e)
            assert not proof.exists(), full_name


def test_compression_bomb_is_refused_before_it_is_inflated(tmp_path):
    path = tmp_path / "bomb.pt"
    clean = io.BytesIO()
    torch.save({"params": {}}, clean)
    with zipfile.ZipFile(clean) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if info.filename.endswith("/data.pkl"):   # a pickle followed by 64 MiB of zeros: 64 KiB on disk
                with dst.open(info.filename, "w", force_zip64=True) as f:
                    f.write(src.read(info))
                    for _ in range(64):
                        f.write(bytes(1 << 20))
            else:
                dst.writestr(info.filename, src.read(info))
    assert os.path.getsize(path) < 1 << 20
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"bomb\.pt declares 64 MiB of contents in a file of 0\.\d MiB"):
        checkpoints.read(str(path))
    assert time.perf_counter() - start < 2


# ----------------------------------------------------------------------------------------------------------------------
# Broken values: refused at load, naming the file and the tensor

@pytest.mark.parametrize("value, message", [
    (float("nan"), "holds NaN or infinite values"),
    (float("inf"), "holds NaN or infinite values"),
    ("int", r"is of dtype torch\.int64; prompts are dense floating-point"),
    ("bool", r"is of dtype torch\.bool; prompts are dense floating-point"),
    ("meta", "is a meta tensor"),
    ("list", "is a list, not a tensor"),
])
def test_broken_prompts_are_refused_at_load(tmp_path, tiny, value, message):
    model = make_mpl(tiny, TINY["maple"])
    params = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    name = "prompt_learner.ctx"
    if isinstance(value, float):
        params[name][0, 0] = value
    else:
        shape = params[name].shape
        params[name] = {"int": torch.zeros(shape, dtype=torch.long), "bool": torch.zeros(shape, dtype=torch.bool),
                        "meta": torch.empty(shape, device="meta"), "list": [0.0]}[value]
    path = tmp_path / "checkpoint.pt"
    torch.save({"params": params}, path)
    before = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    with pytest.raises(ValueError, match=rf"checkpoint\.pt: prompts 'prompt_learner\.ctx' {message}"):
        checkpoints.load_prompts(model, str(path), "maple")
    assert all(torch.equal(v, before[k]) for k, v in model.named_parameters() if v.requires_grad)


@pytest.mark.parametrize("content, message", [
    ([1, 2, 3], "holds a list, not a dict"),
    ({"params": [1]}, "'params' is a list, not a dict of tensors"),
    ({"state_dict": {"prompt_learner.ctx": 3}}, "no 'params'"),
])
def test_checkpoints_of_another_shape_say_so(tmp_path, tiny, content, message):
    path = tmp_path / "odd.pt"
    torch.save(content, path)
    model = make_mpl(tiny, TINY["mpl"])
    with pytest.raises(ValueError, match=message):
        checkpoints.load_prompts(model, str(path), "isp" if "state_dict" in content else "mpl")
