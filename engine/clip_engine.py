"""
The engine under clip_layers.py: exact speed-ups of its two encoders, each proven below and tested
against the plain loops (tests/test_clip_layers.py, test_methods.py). A method uses them when it is
handed an engine, e.g. `mpl.MPL(clip_model, classnames, cfg, engine=Engine(text_chunk=128))` (as
train.py's build_model does); clip_layers then calls `engine.encode_text` and, per vision block,
`engine.vision_block`. A method never needs this file: without an engine the plain loops run.

  1. Text: the rows every class shares are encoded once (the shared prefix). Proof in `encode_text`.
  2. Text: classes in chunks, with activation checkpointing while gradients are on
     (`over_class_chunks`): only one chunk's activations are held at a time; the same numbers.
  3. Vision: the last block computes only the CLS row, the only row CLIP reads out (`cls_block`).

The official code's way of running CLIP (stock blocks, all 77 positions), which bench.py and the
parity tests compare against, is bench.py's OfficialEngine.
"""
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

import clip_layers


@dataclass
class Engine:
    """The speed-ups, with their two settings (both exact: they change memory and time only).

    text_chunk:    classes per text pass (None: all at once); train.py's --text-chunk
    shared_prefix: False: every class runs all of its text rows (bench.py --unshared)
    """
    text_chunk: Optional[int] = 128
    shared_prefix: bool = True

    def encode_text(self, clip_model, x, eot, hook=None, hook_rows=None, eot_rows=False):
        return encode_text(clip_model, x, eot, hook, hook_rows, eot_rows, self)

    def vision_block(self, block, x, last):
        """One vision block: the last on the CLS row only (cls_block), the others as they are."""
        return cls_block(block, x) if last else clip_layers.residual_block(block, x, causal=False)

    @contextmanager
    def options(self, **changes):
        """`with engine.options(text_chunk=None): ...` runs the block under other settings, then
        restores them (tests compare the settings on one model)."""
        unknown = [k for k in changes if not hasattr(self, k)]
        if unknown:
            raise TypeError(f"unknown Engine settings {unknown}; they are text_chunk, shared_prefix")
        old = {k: getattr(self, k) for k in changes}
        for k, v in changes.items():
            setattr(self, k, v)
        try:
            yield self
        finally:
            for k, v in old.items():
                setattr(self, k, v)


# ----------------------------------------------------------------------------------------------------------------------
# Text

def encode_text(clip_model, x, eot, hook=None, hook_rows=None, eot_rows=False, settings=None):
    """clip_layers.encode_text (same arguments, same results), fast.

    Which rows are shared, and why it is exact. CLIP's text blocks are pre-LN residual blocks under a causal mask: the
    output of a block at position t is a function of its inputs at positions 0..t only (LayerNorm and MLP act on one
    row; the attention of row t reads the keys and values of rows <= t). Let Lp be the number of leading positions whose
    layer-0 rows are equal in all C classes, and let the hook write only rows < hook_rows <= Lp, as the same function
    of rows < Lp for every class (the method's promise, `hook_rows`). Then, by induction over the layers, rows 0..Lp-1
    stay equal in all classes at the input of every layer, hook included: each is computed from equal rows by the same
    function. So they are computed once, as one sequence (1, Lp, 512), and the hook is called on that sequence (it
    reads as if every class ran its whole sequence: it writes rows 0..k-1 of whatever rows it is given). A class's own
    rows t >= Lp need, per layer, their row-wise work and attention over rows <= t: the prefix's keys and values (the
    same for all classes, computed once) and their own earlier rows (`block_after_prefix`). Lp is at most the first
    EOT, so every class keeps its EOT (and its eot_rows summaries) among its own rows. For "X a photo of a {class}."
    the prefix is SOS, X, "a photo of a" (6 rows), and each class runs name, ".", EOT.
    Gradients: the prefix is one tensor that every class reads, so autograd sums the classes' gradients into it, the
    same sum the per-class copies of the prompts receive without sharing. Rows count as equal only when they are the
    same tensors (shared prompts, frozen tokens), never by coincidence: the promise covers that too.

    A hook without the promise may depend on which class a row is (ISP's self-structural module): it sees all classes,
    in order, unshared and unchunked.
    """
    settings = Engine() if settings is None else settings
    alike = hook is None or hook_rows is not None
    share = (0 if hook is None else hook_rows) if alike and settings.shared_prefix else None
    # One host read for every length below: the EOT positions and the run of leading rows equal in all classes.
    run = equal_run(x) if share is not None else eot.new_zeros(())
    host = torch.cat([eot, run.to(eot.dtype)[None]]).cpu()
    ends, run = host[:-1], int(host[-1])
    x = x[:, :int(ends.max()) + 1]  # the EOT cut first, so that chunks (and their gradients) are not 77 wide

    def encode(rows):
        return _encode_rows(clip_model, x[rows], eot[rows], ends[rows], hook, share, run, eot_rows)

    return over_class_chunks(encode, ends, settings.text_chunk if alike else None)


def _encode_rows(clip_model, x, eot, ends, hook, share, run, eot_rows):
    """The classes in hand: eot (C,) on the model's device, ends the same positions on the CPU; run: the leading rows
    equal in all classes of the class set (so in any chunk of it too)."""
    x = x[:, :int(ends.max()) + 1]                                        # a chunk is cut at its own last EOT
    if share is not None and x.shape[0] > 1:                              # one class has nothing to share
        Lp = prefix_length(run, ends)
        if Lp >= max(share, 1):                                           # the prefix covers every row the hook writes
            return _encode_shared(clip_model, x, ends, hook, Lp, eot_rows)
    return clip_layers.text_transformer(clip_model, x, eot, hook, eot_rows, L=x.shape[1])  # (cut above: no host read)


def over_class_chunks(encode, eot, chunk):
    """encode(rows) for the class rows `rows`, at most `chunk` classes at a time, results back in class order; eot: the
    classes' EOT positions on the CPU.
    encode returns a tensor (R, ...) or a tuple of them. Classes are sorted by length (EOT position), so each chunk is
    cut at its own last EOT. With gradients on, each chunk is recomputed in the backward pass (activation
    checkpointing), so only one chunk's activations are held at a time. Exact: the same numbers as one pass."""
    if not chunk or eot.shape[0] <= chunk:
        return encode(slice(None))
    order = eot.argsort()                                                 # eot on the CPU: so are the row indices
    parts = [torch.utils.checkpoint.checkpoint(encode, rows, use_reentrant=False) if torch.is_grad_enabled()
             else encode(rows) for rows in order.split(chunk)]
    back = order.argsort()                                                # sorted rows -> class order
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(p)[back] for p in zip(*parts))
    return torch.cat(parts)[back]                                         # (C, 512)


def equal_run(x):
    """The number of leading positions at which all C rows of x (C, L, 512) are equal, as a tensor on x's device."""
    equal = (x == x[:1]).flatten(2).all(dim=2).all(dim=0)                # (L,) position t is equal in every class
    return equal.int().cumprod(dim=0).sum()                               # length of the leading run of equal rows


def prefix_length(run, ends):
    """The shared prefix: the leading run of equal rows, at most the first EOT position (so that every class keeps its
    EOT among its own rows); ends on the CPU. 6 for "X a photo of a {class}." over different names."""
    return min(int(run), int(ends.min()))


class OwnRows(NamedTuple):
    """Where the class-specific rows of C text sequences lie after a shared prefix. They are packed, class after class,
    into (T, 512), T = n.sum(): no class pays for another's longer name; attention lays them out padded, (C, Ls, 512)."""
    n: torch.Tensor       # (C,) own rows of each class: its positions Lp..EOT (name, ".", EOT), at least 1
    Ls: int               # the longest of them: the padded layout is (C, Ls)
    unpad: torch.Tensor   # (T,) padded position c * Ls + i of each packed row (own row i of class c)
    last: torch.Tensor    # (C,) packed row of each class's EOT

    @staticmethod
    def of(n, device):
        """n on the CPU (no host sync for Ls or the packing), the index tensors moved to `device`."""
        Ls = int(n.max())
        i = torch.arange(Ls)
        unpad = (i < n[:, None]).flatten().nonzero().squeeze(1)                          # (T,)
        return OwnRows(n.to(device), Ls, unpad.to(device), (n.cumsum(dim=0) - 1).to(device))  # last: start + n - 1


def _encode_shared(clip_model, x, ends, hook, Lp, eot_rows=False):
    """clip_layers.text_transformer with the first Lp rows, equal in all classes, encoded once."""
    C, L, D = x.shape                                                     # (C, L, 512), L = last EOT + 1
    x = x.to(clip_model.dtype) + clip_model.positional_embedding[:L].to(clip_model.dtype)
    rows = OwnRows.of(ends + 1 - Lp, x.device)                            # each class's own rows: Lp..its EOT
    prefix = x[:1, :Lp]                                                   # (1, Lp, 512), e.g. SOS X "a photo of a"
    own = x[:, Lp:].reshape(C * rows.Ls, D).index_select(0, rows.unpad)   # (T, 512) packed, T = sum of own rows
    summaries = []
    blocks = clip_model.transformer.resblocks
    for l, block in enumerate(blocks):
        if hook is not None:
            prefix = hook(l, prefix)                                      # (1, Lp, 512): the hook's rows are in here
            if prefix.shape != (1, Lp, D):
                raise ValueError(f"the text hook of layer {l} changed the shared rows' shape from {(1, Lp, D)} to "
                                 f"{tuple(prefix.shape)}: it writes past its hook_rows or changes the length")
        summaries.append(own[rows.last])                                  # (C, 512) each class's EOT row
        if l < len(blocks) - 1:
            own = block_after_prefix(block, own, prefix, rows)            # (T, 512), reads the prefix at this input
            prefix = clip_layers.residual_block(block, prefix, causal=True)  # (1, Lp, 512), as all classes' 0..Lp-1
        else:  # after the last block CLIP reads only the EOT rows (and no row reads the prefix any more)
            own = block_after_prefix(block, own, prefix, rows, eot_only=True)                          # (C, 512)
    x = clip_model.ln_final(own) @ clip_model.text_projection.to(own.dtype)                           # (C, 512)
    return (x, torch.stack(summaries, dim=1)) if eot_rows else x         # summaries: (C, layers, 512)


def block_after_prefix(block, own, prefix, rows, eot_only=False):
    """CLIP's causal residual block (clip_layers.residual_block, the same math) for the class-specific rows of C text
    sequences that all begin with the same Lp rows.

    own:    (T, 512) the rows of every class after the prefix, packed (`rows` says where each class's are);
    prefix: (1, Lp, 512) the prefix rows at this layer's input: what each class's rows see before their own;
    eot_only: compute only each class's EOT row and return it, (C, 512) (the last block).
    Everything but attention works on one row at a time (LayerNorms, projections, MLP), so it runs on the packed rows.
    Attention runs on the padded layout: own row i of a class (position Lp + i) attends to the Lp prefix rows and to
    its own rows 0..i, CLIP's causal mask shifted by Lp. Padding is only ever a key of later positions (masked), and
    the outputs of padding queries are dropped, so it changes no number, value or gradient.
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
    # Own row i is position Lp + i: it sees keys j <= Lp + i. Written out rather than through SDPA, whose is_causal
    # would align the non-square mask at the top left (j <= i).
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
# Vision

def cls_block(block, x):
    """residual_block(block, x, causal=False)[:, :1]: after the last block CLIP reads only the CLS row, so only its
    output is computed. The other rows are needed only as keys and values; the output projection and the MLP, 3/4 of
    a block's work, run on one row instead of 197. Exact: every step but attention acts on each row on its own."""
    attn, D = block.attn, x.shape[-1]
    W, b, h = attn.in_proj_weight, attn.in_proj_bias, attn.num_heads
    y = block.ln_1(x)                                                     # (N, L, 768)
    q = F.linear(y[:, :1], W[:D], b[:D])                                  # (N, 1, 768) the CLS query
    k, v = F.linear(y, W[D:], b[D:]).chunk(2, dim=-1)                     # 2 x (N, L, 768)
    q, k, v = (t.unflatten(-1, (h, D // h)).transpose(1, 2) for t in (q, k, v))        # (N, 12, 1 | L, 64)
    y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)             # (N, 1, 768)
    out = x[:, :1] + F.linear(y, attn.out_proj.weight, attn.out_proj.bias)
    return out + block.mlp(block.ln_2(out))
