"""
CLIP's two encoders, written out as plain loops over CLIP's own residual blocks, with a hook at the input of every
layer through which a prompt-learning method inserts, replaces or removes prompt tokens.

This is the only file of the project that knows CLIP's internals (attribute names of OpenAI's `clip/model.py`).
The methods (mpl.py, isp.py) only ever see:

    encode_text(clip_model, x, eot, hook)   x: token embeddings with prompts already placed, (n_cls, 77, 512)
    encode_image(clip_model, images, hook)  images: (N, 3, 224, 224)
    hook(layer, x) -> x                     called at the *input* of layer `layer`, x batch-first (N, L, D)

A method whose text hook writes only the first rows of every class, the same way for all classes (MPL, MaPLe, IVLP:
the prompt rows right after SOS), says so with `encode_text(..., hook_rows=k)`; then the leading rows that are the same
in every class ("X a photo of a") are encoded once for all classes and the hook sees only those (1, Lp, 512) rows
(the shared prefix, see encode_text).

Nothing here is a fork of CLIP: the blocks are CLIP's stock `ResidualAttentionBlock`s with their stock parameter names,
so stock checkpoints load with `strict=True`. We only re-write the *call* of a block (`residual_block` below), so that
  1. attention runs through `F.scaled_dot_product_attention` (fused kernels on GPU, same math as
     `nn.MultiheadAttention` with the block's own in/out projection weights), and
  2. the tensors stay batch-first, so no NLD <-> LND permutes are needed around the hooks.

The text sequence is cut right after the last end-of-text (EOT) token of the prompts in hand. Under CLIP's causal mask
no token attends to a later one, so the EOT feature (the only one CLIP reads out) is exactly the same as with all 77
positions, and the work shrinks with the prompt length: "a photo of a dog." is 7 tokens, not 77. The same argument
goes one step further (the shared prefix): the rows before the class name are the same for every class, so they are
encoded once, and each class only runs its own rows (name, ".", EOT), attending to the prefix: ImageNet's prompts are
10.2 tokens long on average, of which 4.2 are the class's own.

References: OpenAI CLIP, clip/model.py (https://github.com/openai/CLIP); the equations are those of the transformer
(Vaswani et al. 2017) in CLIP's pre-LayerNorm form.

Shapes in comments are for ViT-B/16: text width 512, context 77; vision width 768, 14 x 14 = 196 patches + 1 CLS = 197
tokens. Letters: N images, C classes (text sequences), L sequence length, D width, h heads. No width is hard-coded:
everything is read from the model in hand, so the tiny random CLIP of the tests runs the same code.
"""
import hashlib
import math
import os
import warnings
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

with warnings.catch_warnings():  # clip imports pkg_resources, which warns about its own deprecation on every run
    warnings.simplefilter("ignore")
    import clip
    from clip.model import CLIP


# ----------------------------------------------------------------------------------------------------------------------
# Loading: the real `clip.load`, with errors that say what to do

def _cached_weights_path(name):
    """Where `clip.load(name)` looks for (and would download) the weights of a named model."""
    url = clip.clip._MODELS[name]
    return os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url)), url.split("/")[-2]


def load_clip(name_or_path="ViT-B/16", device="cpu"):
    """Load an OpenAI CLIP (a model name such as "ViT-B/16", or the path of a local .pt file) as a frozen fp32 model.

    OpenAI's checkpoints are fp16. We keep the frozen weights in fp32 and decide the compute precision in exactly one
    place (train.py: autocast on GPU, or `--precision fp16` for the official pure-fp16 setting).
    """
    if name_or_path in clip.available_models():
        path, sha256 = _cached_weights_path(name_or_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"CLIP weights for '{name_or_path}' are not on this machine: expected {path}. Download them where you "
                f"have internet (python -c \"import clip; clip.load('{name_or_path}')\" writes that file), copy the "
                f"file there, or pass its location with --clip /path/to/{os.path.basename(path)}.")
        with open(path, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != sha256:
                raise RuntimeError(f"CLIP weights file {path} is corrupt (SHA256 does not match OpenAI's); it is most "
                                   f"likely a truncated download. Delete it and download it again.")
    elif not os.path.isfile(name_or_path):
        raise FileNotFoundError(
            f"--clip {name_or_path!r} is neither a CLIP model name ({', '.join(clip.available_models())}) nor an "
            f"existing file. For ViT-B/16 put ViT-B-16.pt in ~/.cache/clip/ or pass --clip /path/to/ViT-B-16.pt.")
    try:
        with warnings.catch_warnings():  # torch.jit.load warns that it is deprecated
            warnings.simplefilter("ignore")
            model, _ = clip.load(name_or_path, device="cpu", jit=False)
    except Exception as jit_error:
        # OpenAI's files are TorchScript archives, which clip.load reads. For a plain state dict (a re-saved or
        # converted checkpoint) clip.load retries torch.load on a file handle the failed TorchScript read has already
        # consumed, and fails; so we read such a file ourselves, safely (weights_only), and build the model the same way.
        try:
            state_dict = torch.load(name_or_path, map_location="cpu", weights_only=True)
            model = clip.model.build_model(dict(state_dict))
        except Exception as e:  # a truncated or foreign file fails deep inside torch.load / build_model
            raise RuntimeError(f"could not read CLIP weights from {name_or_path!r}: the file is corrupt or not an "
                               f"OpenAI CLIP checkpoint ({type(jit_error).__name__}: {jit_error}; then "
                               f"{type(e).__name__}: {e})") from e
    if not hasattr(model.visual, "conv1"):
        raise ValueError(f"{name_or_path}: only the ViT CLIP backbones are supported, not the ResNet ones")
    return freeze(model.float().to(device))


# Architectures of random CLIPs, for tests and bench.py: same class, same code path as the real weights.
RANDOM_CLIPS = {
    # ViT-B/16 (149.6 M parameters): text 12 x 512, vision 12 x 768 on 224 x 224 images with 16 x 16 patches
    "ViT-B/16": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=16,
                     context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
                     transformer_layers=12),
    # tiny: ViT-B/16's 12 layers in both towers at width 64, so every preset runs at its published depth; 32 x 32
    # images with 8 x 8 patches (16 patches + CLS) keep the tests quick (the mini world's CLIP has 64 patches)
    "tiny": dict(embed_dim=64, image_resolution=32, vision_layers=12, vision_width=64, vision_patch_size=8,
                 context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1,
                 transformer_layers=12),
}


def random_clip(arch="tiny", seed=0, device="cpu"):
    """A randomly initialised CLIP, frozen fp32, built through `clip.model.build_model(state_dict)` exactly as real
    weights are (so heads = width // 64 and the fp16 round trip of OpenAI's checkpoints both happen)."""
    torch.manual_seed(seed)
    state_dict = CLIP(**RANDOM_CLIPS[arch]).state_dict()
    return freeze(clip.model.build_model(state_dict).float().to(device))


def freeze(model):
    """The contract every method in this project relies on, applied to any CLIP it is handed (e.g. straight from
    `clip.load`): a ViT CLIP, in eval mode, no gradients for any CLIP parameter, fp32 weights. Returns the same model,
    changed in place. The prompt modules live outside CLIP and are the only thing that trains.

    fp32: `clip.load(..., device="cuda")` returns OpenAI's fp16 weights. We turn them into fp32 (and say so) because
    the compute precision is the caller's decision, made in one place: `torch.autocast` around the forward (train.py's
    --precision bf16 / amp), or `to_official_fp16(method_model)` for the official pure-fp16 setting. Frozen fp32
    weights cost 0.6 GB for ViT-B/16 and never see an optimizer.
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("this CLIP is a TorchScript module (clip.load(..., jit=True)); its blocks cannot be called one "
                        "by one. Load it with clip.load(name, jit=False) or clip_layers.load_clip(name).")
    if not isinstance(model, CLIP) or not hasattr(model.visual, "conv1"):
        raise TypeError(f"expected an OpenAI ViT CLIP (clip.model.CLIP with a VisionTransformer, as clip.load returns "
                        f"for ViT-B/16), got {type(model).__name__}"
                        f"{' with a ResNet image encoder' if isinstance(model, CLIP) else ''}")
    if model.visual.conv1.weight.dtype != torch.float32:
        warnings.warn(f"CLIP's weights are {model.visual.conv1.weight.dtype} (clip.load on CUDA returns fp16): "
                      f"converted to fp32 in place. Choose the compute precision with torch.autocast, or call "
                      f"clip_layers.to_official_fp16(model) on the method for the official pure-fp16 setting.")
        model.float()
    model.eval()
    model.requires_grad_(False)
    return model


def to_official_fp16(model):
    """The official pure-fp16 setting (PREC "fp16" of CoOp / MaPLe / MPL), for parity runs: CLIP's weights as OpenAI
    ships them (`clip.model.convert_weights`: linear, convolution, attention and projection weights in fp16; LayerNorms
    and embeddings in fp32, CLIP's LayerNorm computing in fp32) and the method's own parameters in fp16, trained with
    plain SGD. `model.clip` is the frozen CLIP inside a method's module."""
    clip_ids = {id(p) for p in model.clip.parameters()}
    clip.model.convert_weights(model.clip)
    for p in model.parameters():
        if id(p) not in clip_ids:
            p.data = p.data.half()
    return model


def widths(clip_model):
    """(text width, vision width), e.g. (512, 768) for ViT-B/16, read from the weights."""
    return clip_model.ln_final.weight.shape[0], clip_model.visual.conv1.weight.shape[0]


# ----------------------------------------------------------------------------------------------------------------------
# One residual attention block, called through its stock parameters

def attention(attn: nn.MultiheadAttention, x, causal, rows=None):
    """Multi-head self-attention with the weights of CLIP's `nn.MultiheadAttention`, through fused SDPA.

    Same math as `attn(x, x, x, attn_mask=causal_mask)`: q, k, v = x W_in^T + b_in; softmax(q k^T / sqrt(d_h)) v per
    head; output projection. CLIP's causal mask (-inf above the diagonal) is exactly SDPA's `is_causal`.
    rows: a slice of the rows whose outputs are wanted (all rows are still keys and values); only without the causal
    mask (which SDPA would align at the top left of the shorter query block). Returns (N, rows, D).
    """
    N, L, D = x.shape                                   # text (C, L<=77, 512) / vision (N, 197 + prompts, 768)
    h = attn.num_heads                                  # 8 / 12
    W, b = attn.in_proj_weight, attn.in_proj_bias       # (3D, D): the q, k and v projections, stacked
    if rows is None:
        q, k, v = F.linear(x, W, b).chunk(3, dim=-1)                                   # 3 x (N, L, D)
    else:
        if causal:
            raise ValueError("attention(rows=...) is for the vision tower: SDPA would align a causal mask wrongly")
        q = F.linear(x[:, rows], W[:D], b[:D])                                         # (N, Q, D) Q wanted rows
        k, v = F.linear(x, W[D:], b[D:]).chunk(2, dim=-1)                              # 2 x (N, L, D)
    q, k, v = (t.unflatten(-1, (h, D // h)).transpose(1, 2) for t in (q, k, v))        # (N, h, Q | L, D/h)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)                      # (N, h, Q, D/h)
    y = y.transpose(1, 2).flatten(2)                                                   # (N, Q, D)
    return F.linear(y, attn.out_proj.weight, attn.out_proj.bias)


def residual_block(block, x, causal, fast=True, rows=None):
    """CLIP's `ResidualAttentionBlock.forward` (pre-LN), batch-first: x + attn(ln_1(x)), then x + mlp(ln_2(x)).
    fast=False calls the stock block itself, sequence-first, as the official code does (nn.MultiheadAttention with the
    block's 77 x 77 causal mask, so the text must be all 77 positions): the same numbers, slower (bench.py's baseline).
    rows: compute the output of these rows only (a slice; vision only), e.g. slice(0, 1) in the last vision block,
    after which CLIP reads only the CLS row: the other rows are needed there only as keys and values, and the output
    projection and the MLP, 3/4 of a block's work, run on one row instead of 197. Exact: every row but the attention
    is computed on its own. Returns (N, rows, D).
    """
    if not fast:
        return block(x.transpose(0, 1)).transpose(0, 1)                  # NLD -> LND -> stock block -> NLD
    out = x if rows is None else x[:, rows]
    out = out + attention(block.attn, block.ln_1(x), causal, rows)
    return out + block.mlp(block.ln_2(out))


class OwnRows(NamedTuple):
    """Where the class-specific rows of C text sequences lie when they share a prefix (encode_text's shared prefix).
    They are packed, class after class, into (T, 512), T = n.sum(): no class pays for another's longer name; attention
    lays them out padded, (C, Ls, 512)."""
    n: torch.Tensor       # (C,) own rows of each class: its positions Lp..EOT (name, ".", EOT), at least 1
    Ls: int               # the longest of them: the padded layout is (C, Ls)
    unpad: torch.Tensor   # (T,) padded position c * Ls + i of each packed row (own row i of class c)
    last: torch.Tensor    # (C,) packed row of each class's EOT

    @staticmethod
    def of(n):
        Ls = int(n.max())
        i = torch.arange(Ls, device=n.device)
        unpad = (i < n[:, None]).flatten().nonzero().squeeze(1)                          # (T,)
        return OwnRows(n, Ls, unpad, n.cumsum(dim=0) - 1)                                 # last = start + n - 1


def residual_block_after_prefix(block, own, prefix, rows, eot_only=False):
    """CLIP's causal residual block (residual_block above, the same math) for the class-specific rows of C text
    sequences that all begin with the same Lp rows, the shared prefix (see encode_text for why this is exact).

    own:    (T, 512) the rows of every class after the prefix, packed (OwnRows `rows` says where each class's are);
    prefix: (1, Lp, 512) the prefix rows at this layer's input: what each class's rows see before their own;
    eot_only: compute the output of each class's EOT row only and return it, (C, 512): in the last block, after which
            CLIP reads only the EOT row (the other rows are still keys and values there).
    Returns the packed rows at the block's output, (T, 512). The prefix's own output is residual_block(block, prefix).

    Everything but attention works on one row at a time (LayerNorms, projections, MLP), so it runs on the packed rows
    only. Attention, the only step that mixes rows, runs on the padded layout: the query at own row i of a class
    (sequence position Lp + i) attends to the keys and values of the Lp prefix rows and of its own rows 0..i, which is
    CLIP's causal mask shifted by Lp. Padding (zeros) is only ever a key of later positions (masked), and the outputs
    of padding queries are dropped, so it changes no number, value or gradient.
    """
    attn = block.attn
    T, D = own.shape                                   # (T, 512)
    C, Ls, h = rows.n.shape[0], rows.Ls, attn.num_heads
    Lp = prefix.shape[1]                               # 6 for "X a photo of a", the same at every layer
    W, b = attn.in_proj_weight, attn.in_proj_bias      # (1536, 512): the q, k and v projections, stacked

    def padded(t):                                     # (T, w) packed -> (C, Ls, w), zeros after each class's rows
        return t.new_zeros(C * Ls, t.shape[-1]).index_copy(0, rows.unpad, t).view(C, Ls, -1)

    x = block.ln_1(own)                                                                # (T, 512)
    if eot_only:
        q = F.linear(x[rows.last], W[:D], b[:D])[:, None]                              # (C, 1, 512) EOT queries
        k, v = padded(F.linear(x, W[D:], b[D:])).chunk(2, dim=-1)                      # 2 x (C, Ls, 512)
        i = (rows.n - 1)[:, None]                                                      # (C, 1) own row of each EOT
    else:
        q, k, v = padded(F.linear(x, W, b)).chunk(3, dim=-1)                           # 3 x (C, Ls, 512)
        i = torch.arange(Ls, device=own.device)[None]                                  # (1, Ls) own row of each query
    # k, v of the prefix rows, computed once for all C classes (their queries are not needed here): 2 x (1, Lp, 512)
    k_p, v_p = F.linear(block.ln_1(prefix), W[D:], b[D:]).chunk(2, dim=-1)
    k = torch.cat([k_p.expand(C, -1, -1), k], dim=1)                                   # (C, Lp + Ls, 512)
    v = torch.cat([v_p.expand(C, -1, -1), v], dim=1)                                   # (C, Lp + Ls, 512)
    q, k, v = (t.unflatten(-1, (h, D // h)).transpose(1, 2) for t in (q, k, v))        # (C, 8, Ls | 1 | Lp + Ls, 64)
    # Own row i is position Lp + i: it sees keys j <= Lp + i (CLIP's causal mask, shifted by the prefix). Written out
    # rather than through SDPA: is_causal would align the non-square mask at the top left (j <= i), and for blocks
    # this small (a few rows per class) the plain softmax is the faster one on the CPU.
    j = torch.arange(Lp + Ls, device=own.device)
    sees = (j <= Lp + i[..., None])[:, None]                                           # (C | 1, 1, Ls | 1, Lp + Ls)
    a = (q @ k.transpose(-2, -1)) / math.sqrt(D // h)                                  # (C, 8, Ls | 1, Lp + Ls)
    a = a.masked_fill(~sees, float("-inf")).softmax(dim=-1, dtype=torch.float32).to(v.dtype)
    y = (a @ v).transpose(1, 2).reshape(-1, D)                                         # (C * Ls | C, 512)
    if eot_only:
        out = own[rows.last]                                                           # (C, 512)
    else:
        out, y = own, y.index_select(0, rows.unpad)                                    # (T, 512) packed again
    out = out + F.linear(y, attn.out_proj.weight, attn.out_proj.bias)
    return out + block.mlp(block.ln_2(out))


# ----------------------------------------------------------------------------------------------------------------------
# Text encoder

def token_embedding(clip_model, ids):
    """Token ids (C, 77) -> frozen token embeddings (C, 77, 512). Prompt methods overwrite some rows of the result."""
    return clip_model.token_embedding(ids)


def eot_index(ids):
    """Position of the end-of-text token of each sequence. EOT has the largest id of CLIP's vocabulary (49407), so
    argmax finds it (CLIP model.py does the same)."""
    return ids.argmax(dim=-1)


def encode_text(clip_model, x, eot, hook=None, cut=True, chunk=None, fast=True, eot_rows=False, shared_prefix=True,
                hook_rows=None):
    """Text features of prompts given as token embeddings.

    x:     (C, 77, 512) token embeddings, the layer-0 prompts already written into them (before the positional
           embedding is added, as CoOp / MaPLe / MPL do);
    eot:   (C,) EOT positions (`eot_index(ids)`);
    hook:  hook(layer, x) -> x at the input of every block, x (C, L, 512); deep prompts replace rows there. With
           a shared prefix (hook_rows below) the hook sees the prefix only, x (1, Lp, 512), and returns that shape;
    cut:   drop the positions after the last EOT (exact under the causal mask). `cut=False` runs all 77;
    chunk: encode at most this many classes at a time, with activation checkpointing when gradients are on (see
           over_class_chunks; None: all at once). A hook then sees one chunk at a time, so it must treat every class
           row alike (MPL's and IVLP's do); a method whose hook depends on the class of a row chunks by itself;
    fast:  False runs the official way: CLIP's stock blocks over all 77 positions, one pass (bench.py's baseline);
    eot_rows: also return each class's EOT row at the input of every layer (after the hook), (C, layers, 512): the
           token that CLIP reads out at the end, as a per-layer summary of the class's text (ISP's cross module
           reads it);
    shared_prefix: encode the leading rows that are the same in every class once, and each class's own rows after
           them (exact; see below). False: every class runs all its rows (the path before sharing existed);
    hook_rows: the caller's promise that makes sharing possible with a hook: the hook writes only rows
           0..hook_rows-1, and writes them the same way for every class, from those rows alone (MPL / MaPLe: rows
           1..n_ctx become the layer's prompts, so hook_rows = 1 + n_ctx). None: the hook may write anywhere, so
           nothing is shared. Without a hook there is nothing to promise.
    Returns (C, E) features, E = 512 for ViT-B/16, not normalised; with eot_rows, (features, rows).

    The shared prefix, and why it is exact. CLIP's text blocks are pre-LN residual blocks under a causal mask: the
    output of a block at position t is a function of its inputs at positions 0..t only (LayerNorm and MLP act on one
    row, the attention of row t reads the keys and values of rows <= t). Let Lp be the number of leading positions whose
    layer-0 rows are equal in all C classes, and let the hook write only rows < hook_rows <= Lp, as the same function
    of rows < Lp for every class. Then, by induction over the layers, rows 0..Lp-1 stay equal in all classes at the
    input of every layer, hook included: each is computed from equal rows by the same function. So they are computed
    once, as one sequence (1, Lp, 512), and the hook is called on that sequence only (it must return it with its shape).
    A class's own rows t >= Lp need, per layer, their own row-wise work and attention over rows <= t: the prefix's keys
    and values (the same for all classes, computed once) and their own earlier rows (residual_block_after_prefix).
    Lp is at most the first EOT, so every class keeps its EOT (and its eot_rows summaries) among its own rows. For
    "X a photo of a {class}." the prefix is SOS, X, "a photo of a" (6 rows), and each class runs name, ".", EOT.
    Gradients: the prefix is one tensor that every class reads, so autograd sums the classes' gradients into it, the
    same sum the per-class copies of the prompts (an expand) receive without sharing. This also needs equal leading
    rows to be equal because they are the same tensors (shared prompts, frozen tokens), never by coincidence (e.g.
    per-class prompts that happen to start equal): the caller's promise covers that too (hook_rows, or no hook).
    """
    if not fast:
        cut, chunk, shared_prefix = False, None, False
    if cut:  # the columns after the last EOT never matter: dropped before the chunks pick their rows (a chunk's rows
        x = x[:, :int(eot.max()) + 1]  # and, in the backward pass, their gradients are then (C, L, 512), not 77 wide)
    share = (0 if hook is None else hook_rows) if shared_prefix and cut else None  # rows the prefix must cover
    return over_class_chunks(lambda rows: _encode_text(clip_model, x[rows], eot[rows], hook, cut, fast, eot_rows,
                                                       share), eot, chunk)


def over_class_chunks(encode, eot, chunk):
    """encode(rows) for the class rows `rows`, at most `chunk` classes at a time, results back in class order.

    encode returns a tensor (R, ...) or a tuple of them. Classes are sorted by length (EOT position), so that each
    chunk is cut at its own last EOT: long class names do not make every chunk long. With gradients on, each chunk is
    recomputed in the backward pass (activation checkpointing), so only one chunk's activations are held at a time;
    gradients still flow to whatever `encode` reads (prompts, hook parameters). Exact: the same numbers as one pass.
    A method whose hook depends on which class a row is calls this with its own `encode` (isp.py does).
    """
    if not chunk or eot.shape[0] <= chunk:
        return encode(slice(None))
    order = eot.argsort()
    parts = [torch.utils.checkpoint.checkpoint(encode, rows, use_reentrant=False) if torch.is_grad_enabled()
             else encode(rows) for rows in order.split(chunk)]
    back = order.argsort()                                                # sorted rows -> class order
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(p)[back] for p in zip(*parts))
    return torch.cat(parts)[back]                                         # (C, 512)


def shared_prefix_length(x, eot):
    """The number of leading positions at which all C rows of x (C, L, 512) are equal, at most the first EOT position
    (so that every class keeps its EOT among its own rows). 6 for "X a photo of a {class}." over different names."""
    equal = (x == x[:1]).flatten(2).all(dim=2).all(dim=0)                # (L,) position t is equal in every class
    return min(int(equal.int().cumprod(dim=0).sum()), int(eot.min()))     # length of the leading run of equal rows


def _encode_text(clip_model, x, eot, hook, cut, fast=True, eot_rows=False, share=None):
    L = int(eot.max()) + 1 if cut else x.shape[1]
    x = x[:, :L].to(clip_model.dtype)  # CLIP's own encode_text casts to its weights' dtype: a no-op but in pure fp16
    x = x + clip_model.positional_embedding[:L].to(x.dtype)             # (C, L, 512), L = 77 when not cut
    if share is not None and x.shape[0] > 1:  # one class has nothing to share
        Lp = shared_prefix_length(x, eot)
        if Lp >= max(share, 1):               # the prefix covers every row the hook writes
            return _encode_text_shared(clip_model, x, eot, hook, Lp, eot_rows)
    rows = torch.arange(x.shape[0], device=x.device)
    summaries = []
    for i, block in enumerate(clip_model.transformer.resblocks):
        if hook is not None:
            x = hook(i, x)                                                # (C, L, 512): text prompts keep L fixed
        if eot_rows:
            summaries.append(x[rows, eot])                                # (C, 512)
        x = residual_block(block, x, causal=True, fast=fast)
    x = clip_model.ln_final(x)
    # CLIP pools the EOT token: under the causal mask it is the only position that has seen the whole sentence.
    x = x[rows, eot] @ clip_model.text_projection.to(x.dtype)            # (C, 512)
    return (x, torch.stack(summaries, dim=1)) if eot_rows else x        # rows: (C, layers, 512)


def _encode_text_shared(clip_model, x, eot, hook, Lp, eot_rows=False):
    """_encode_text with the first Lp rows, equal in all classes, encoded once (see encode_text for why it is exact)."""
    C, L, D = x.shape                                                     # (C, L, 512), L = last EOT + 1
    rows = OwnRows.of(eot + 1 - Lp)                                       # each class's own rows: Lp..its EOT
    prefix = x[:1, :Lp]                                                   # (1, Lp, 512), e.g. SOS X "a photo of a"
    own = x[:, Lp:].reshape(C * rows.Ls, D).index_select(0, rows.unpad)   # (T, 512) packed, T = sum of own rows
    summaries = []
    blocks = clip_model.transformer.resblocks
    for l, block in enumerate(blocks):
        if hook is not None:
            prefix = hook(l, prefix)                                      # (1, Lp, 512): the hook's rows are in here
            if prefix.shape != (1, Lp, D):
                raise ValueError(f"the text hook of layer {l} changed the shared prefix's shape from {(1, Lp, D)} "
                                 f"to {tuple(prefix.shape)}: a hook that writes rows past hook_rows, or changes the "
                                 f"length, cannot share a prefix (pass shared_prefix=False)")
        if eot_rows:
            summaries.append(own[rows.last])                              # (C, 512) each class's EOT row
        if l < len(blocks) - 1:
            own = residual_block_after_prefix(block, own, prefix, rows)   # (T, 512), reads the prefix at this input
            prefix = residual_block(block, prefix, causal=True)           # (1, Lp, 512), as every class's rows 0..Lp-1
        else:  # after the last block CLIP reads only the EOT rows (and no row reads the prefix any more)
            own = residual_block_after_prefix(block, own, prefix, rows, eot_only=True)                 # (C, 512)
    x = clip_model.ln_final(own)                                          # (C, 512) each class's EOT row
    x = x @ clip_model.text_projection.to(x.dtype)                        # (C, 512)
    return (x, torch.stack(summaries, dim=1)) if eot_rows else x        # rows: (C, layers, 512)


def encode_text_ids(clip_model, ids, hook=None, cut=True, chunk=None, fast=True, shared_prefix=True, hook_rows=None):
    """Frozen-token text features straight from token ids (C, 77): CLIP's `encode_text`, through our blocks."""
    return encode_text(clip_model, token_embedding(clip_model, ids), eot_index(ids), hook, cut, chunk, fast,
                       shared_prefix=shared_prefix, hook_rows=hook_rows)


def tokenize(texts, context_length=77):
    """`clip.tokenize` with an error that names the offending text."""
    try:
        return clip.tokenize(texts, context_length=context_length)
    except RuntimeError as e:
        raise ValueError(f"prompt too long for CLIP's context of {context_length} tokens: {e}") from e


# ----------------------------------------------------------------------------------------------------------------------
# Image encoder

def encode_image(clip_model, images, hook=None, fast=True):
    """Image features; hook(layer, x) edits the token sequence at the input of every layer.

    The hook at layer 0 sees the sequence after the positional embedding and *before* `ln_pre`: this is where the
    official MaPLe / IVLP / MPL code appends its first vision prompts (they get no positional embedding, but they do go
    through ln_pre). At layers >= 1 it sees the input of block i. The sequence may grow or shrink between layers.
    fast=False runs CLIP's stock blocks (see residual_block), as the official code does.
    Returns (N, E) features from the CLS token, not normalised.
    """
    v = clip_model.visual
    x = v.conv1(images.to(v.conv1.weight.dtype))                         # (N, 768, 14, 14) patch embeddings
    x = x.flatten(2).transpose(1, 2)                                      # (N, 196, 768)
    cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)         # (N, 1, 768)
    x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)   # (N, 197, 768)
    if hook is not None:
        x = hook(0, x)                                                    # (N, 197 + prompts, 768)
    x = v.ln_pre(x)
    blocks = v.transformer.resblocks
    for i, block in enumerate(blocks):
        if hook is not None and i > 0:
            x = hook(i, x)                                                # (N, 197 + prompts at layer i, 768)
        # After the last block CLIP reads only the CLS row: there, only its output is computed (residual_block).
        cls_only = slice(0, 1) if i == len(blocks) - 1 else None
        x = residual_block(block, x, causal=False, fast=fast, rows=cls_only)  # (N, 197 + prompts | 1, 768)
    x = v.ln_post(x[:, 0])                                                # (N, 768) CLS token
    return x @ v.proj.to(x.dtype)                                         # (N, 512)


def n_layers(clip_model):
    """(text layers, vision layers), 12 and 12 for ViT-B/16."""
    return len(clip_model.transformer.resblocks), len(clip_model.visual.transformer.resblocks)


# ----------------------------------------------------------------------------------------------------------------------
# Zero-shot CLIP: no prompts at all, one hand-written template per dataset (CoOp's zsclip.py)

def cosine_logits(image_features, text_features, logit_scale):
    """CLIP's classifier: scaled cosine similarity, (N, E) x (C, E) -> (N, C). logit_scale.exp() = 100 for CLIP."""
    # In fp32 whatever the precision around it: bf16 logits near 30 are spaced 0.125 apart, enough to flip near-ties
    # between fine-grained classes and so the top-1 accuracy.
    with torch.autocast(image_features.device.type, enabled=False):
        image_features = image_features.float() / image_features.float().norm(dim=-1, keepdim=True)
        text_features = text_features.float() / text_features.float().norm(dim=-1, keepdim=True)
        return logit_scale.float().exp() * image_features @ text_features.t()


class ZeroShotCLIP(nn.Module):
    """The zero-shot baseline: text features of `template.format(classname)`, computed once; nothing trains.

    It follows the same contract as the prompt methods: `encode_classes()` gives what the image side needs from the
    class set, `forward(images, classes=None)` gives logits (N, C)."""

    def __init__(self, clip_model, classnames, template="a photo of a {}.", *, fast=True, shared_prefix=True):
        super().__init__()
        self.clip, self.fast, self.shared_prefix = freeze(clip_model), fast, shared_prefix
        ids = tokenize([template.format(c.replace("_", " ")) for c in classnames])
        with torch.no_grad():  # no hook: the template's words before the name ("a photo of a") are encoded once
            features = encode_text_ids(clip_model, ids.to(clip_model.logit_scale.device), fast=fast,
                                       shared_prefix=shared_prefix)                                      # (C, 512)
        self.register_buffer("text_features", features, persistent=False)

    def encode_classes(self):
        return self.text_features

    def forward(self, images, classes=None):
        classes = self.encode_classes() if classes is None else classes
        return cosine_logits(encode_image(self.clip, images, fast=self.fast), classes, self.clip.logit_scale)
