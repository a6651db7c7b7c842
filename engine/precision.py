"""
The compute precision of a run (train.py's --precision), decided in one place.
"""
from contextlib import nullcontext

import torch

import clip_layers

PRECISIONS = ["auto", "fp32", "bf16", "amp", "fp16"]
PRECISION_HELP = ("auto: fp32 on CPU, bf16 autocast on CUDA. fp32: TF32 off. bf16: bf16 autocast "
                  "(CUDA or CPU). amp: fp16 autocast + GradScaler (CUDA). fp16: the whole model in "
                  "fp16 with plain SGD, as the official code runs (for parity checks)")


def resolve_precision(precision, device):
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "amp"
    return "fp32"


def precision_setup(precision, device, model):
    """Precision is decided here and nowhere else. Returns (autocast, scaler, precision): a function
    that opens the autocast context (a no-op in fp32 and fp16), a GradScaler that scales the loss
    under amp only (a pass-through otherwise), and the precision with auto resolved. The prompts are
    fp32 master weights in every mode but fp16, which puts the whole model (frozen CLIP and prompts)
    in fp16 and trains with plain SGD and no loss scaling, as the official MaPLe/MPL code does. bf16
    autocasts on the CPU too; amp is CUDA's. fp32 turns TF32 off (cuDNN's convolutions use it by
    default), so fp32 is fp32 on a GPU too."""
    cuda = device.startswith("cuda")
    precision = resolve_precision(precision, device)
    if precision == "amp" and not cuda:
        raise ValueError(f"--precision amp needs a CUDA device; on the CPU use fp32 or bf16 "
                         f"(--device is {device})")
    if precision == "fp16":
        clip_layers.to_official_fp16(model)
    if precision == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    dtype = {"bf16": torch.bfloat16, "amp": torch.float16}.get(precision)
    kind = "cuda" if cuda else "cpu"
    autocast = (lambda: torch.autocast(kind, dtype=dtype)) if dtype else nullcontext
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "amp")
    return autocast, scaler, precision
