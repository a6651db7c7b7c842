"""
CLIP's two encoders written out as plain loops over CLIP's own residual blocks, with a hook at the
input of every layer: the one place where a prompt-learning method (mpl.py, isp.py) inserts,
replaces or removes prompt tokens.

    encode_text(clip_model, x, eot, hook)   x: (C, 77, 512) token embeddings of C prompts, the
                                            prompts already placed
    encode_image(clip_model, images, hook)  images: (N, 3, 224, 224)
    hook(layer, x) -> x                     called at the input of layer `layer`, x batch-first
                                            (C or N, L, D)

The blocks are CLIP's stock `ResidualAttentionBlock`s with their stock parameter names (so stock
checkpoints load with `strict=True`); only their *call* is written out below, batch-first, with
attention through PyTorch's fused `scaled_dot_product_attention` (the same math as CLIP's
`nn.MultiheadAttention`). The equations are the transformer's (Vaswani et al. 2017) in CLIP's
pre-LayerNorm form; the code follows OpenAI CLIP's clip/model.py.

Exact speed-ups of these loops (text rows that every class shares encoded once, classes in chunks,
the last vision block on the CLS row only) live in engine/clip_engine.py, with their proofs. A
method runs the plain loops below unless it is handed an engine, `engine=clip_engine.Engine()`
(train.py's build_model does): both give the same numbers.

Shapes in comments are for ViT-B/16: text width 512, context 77; vision width 768, 14 x 14 = 196
patches + 1 CLS = 197 tokens. Letters: N images, C classes (text sequences), L sequence length, D
width, h heads. No width is hard-coded.
"""
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

# clip imports pkg_resources, which warns about its own deprecation on every run
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import clip
    from clip.model import CLIP


# --------------------------------------------------------------------------------------------------
# One residual attention block, called through its stock parameters

def attention(attn: nn.MultiheadAttention, x, causal):
    """Multi-head self-attention with the weights of CLIP's `nn.MultiheadAttention`:

        q, k, v = x W_in^T + b_in                       (one stacked projection, split in three)
        y = softmax(q k^T / sqrt(D / h) + mask) v       per head; mask: -inf above the diagonal
                                                        when causal (text)
        out = y W_out^T + b_out
    """
    N, L, D = x.shape  # text (C, L <= 77, 512) / vision (N, 197 + prompts, 768)
    h = attn.num_heads                                  # 8 / 12
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)  # 3 x (N, L, D)
    # 3 x (N, h, L, D/h)
    q, k, v = (t.unflatten(-1, (h, D // h)).transpose(1, 2) for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (N, h, L, D/h)
    y = y.transpose(1, 2).flatten(2)                                                   # (N, L, D)
    return F.linear(y, attn.out_proj.weight, attn.out_proj.bias)


def residual_block(block, x, causal):
    """CLIP's `ResidualAttentionBlock.forward` (pre-LN), batch-first:
    x + attn(ln_1(x)), then x + mlp(ln_2(x))."""
    x = x + attention(block.attn, block.ln_1(x), causal)
    return x + block.mlp(block.ln_2(x))


# --------------------------------------------------------------------------------------------------
# Text encoder

def tokenize(texts, context_length=77):
    """`clip.tokenize` with an error that names the offending text."""
    try:
        return clip.tokenize(texts, context_length=context_length)
    except RuntimeError as e:
        raise ValueError(f"prompt too long for CLIP's context of {context_length} tokens: "
                         f"{e}") from e


def eot_index(ids):
    """Position of the end-of-text token of each sequence. EOT has the largest id of CLIP's
    vocabulary (49407), so argmax finds it (CLIP's model.py does the same)."""
    return ids.argmax(dim=-1)


def token_embedding(clip_model, ids):
    """Token ids (C, 77) -> frozen token embeddings (C, 77, 512). Prompt methods overwrite some rows
    of the result."""
    return clip_model.token_embedding(ids)


def encode_text(clip_model, x, eot, hook=None, hook_rows=None, eot_rows=False, engine=None):
    """Text features (C, E) of prompts given as token embeddings, E = 512 for ViT-B/16, not
    normalised.

    x:   (C, 77, 512) token embeddings, the layer-0 prompts already written into them (before the
         positional embedding is added, as CoOp / MaPLe / MPL do); eot: (C,) EOT positions
         (eot_index);
    hook(layer, x) -> x at the input of every block, x (C, L, 512); deep prompts replace rows there;
    hook_rows: k if the hook writes only rows 0..k-1, the same way for every class (a fact about
         the method that lets the engine encode the rows all classes share once); None if it may
         write anywhere;
    eot_rows: also return each class's EOT row at the input of every layer, (C, layers, 512): the
         token CLIP reads out at the end, as a per-layer summary of the class's text (ISP's cross
         module reads it);
    engine: None, the plain loop (text_transformer); or an engine whose encode_text gives the same
         numbers faster (engine/clip_engine.py).
    """
    if engine is not None:
        return engine.encode_text(clip_model, x, eot, hook, hook_rows, eot_rows)
    return text_transformer(clip_model, x, eot, hook, eot_rows)


def text_transformer(clip_model, x, eot, hook=None, eot_rows=False, L=None):
    """The plain text path of encode_text. The sequence is cut right after the last EOT: under
    CLIP's causal mask no token attends to a later one, so the EOT features (the only ones CLIP
    reads out) are exactly those of all 77 positions, and "a photo of a dog." costs 7 positions,
    not 77. (L: that length, when the caller knows it.)"""
    L = int(eot.max()) + 1 if L is None else L
    # CLIP's own encode_text casts to its weights' dtype (fp16 only in pure fp16)
    x = x[:, :L].to(clip_model.dtype)
    x = x + clip_model.positional_embedding[:L].to(x.dtype)              # (C, L, 512)
    rows, summaries = torch.arange(x.shape[0], device=x.device), []
    for layer, block in enumerate(clip_model.transformer.resblocks):
        if hook is not None:
            x = hook(layer, x)  # (C, L, 512): text prompts keep L fixed
        summaries.append(x[rows, eot])                                    # (C, 512)
        x = residual_block(block, x, causal=True)
    # CLIP pools the EOT token: under the causal mask it is the only position that has seen the
    # whole sentence.
    x = clip_model.ln_final(x[rows, eot]) @ clip_model.text_projection.to(x.dtype)       # (C, 512)
    return (x, torch.stack(summaries, dim=1)) if eot_rows else x  # summaries: (C, layers, 512)


def encode_text_ids(clip_model, ids, engine=None):
    """Frozen-token text features straight from token ids (C, 77): CLIP's `encode_text`, through
    our blocks."""
    return encode_text(clip_model, token_embedding(clip_model, ids), eot_index(ids), engine=engine)


# --------------------------------------------------------------------------------------------------
# Image encoder

def patch_tokens(clip_model, images):
    """Images (N, 3, 224, 224) -> CLIP's input tokens (N, 197, 768): CLS + patch embeddings, plus
    positions."""
    v = clip_model.visual
    x = v.conv1(images.to(v.conv1.weight.dtype))  # (N, 768, 14, 14) patch embeddings
    x = x.flatten(2).transpose(1, 2)                                      # (N, 196, 768)
    cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)         # (N, 1, 768)
    return torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)  # (N, 197, 768)


def class_names(classnames):
    """The class names a method is built for, as a list: a non-empty list or tuple of non-empty
    strings. One class is a list of one name; a bare string would be taken letter by letter."""
    if isinstance(classnames, str) or not isinstance(classnames, (list, tuple)):
        one = f" (for one class: [{classnames!r}])" if isinstance(classnames, str) else ""
        raise TypeError(f"classnames must be a list of class names, not a "
                        f"{type(classnames).__name__}{one}")
    bad = [c for c in classnames if not isinstance(c, str) or not c.strip()]
    if not classnames or bad:
        raise ValueError(f"classnames must be non-empty strings, at least one; got "
                         f"{'an empty list' if not classnames else f'{bad[:3]!r}'}")
    return list(classnames)


def check_images(clip_model, images):
    """Images as this CLIP reads them: (N, 3, R, R), R its input resolution (224 for ViT-B/16)."""
    R = clip_model.visual.input_resolution
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or \
            tuple(images.shape[1:]) != (3, R, R):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images of shape {shape}: this CLIP reads (N, 3, {R}, {R}) tensors, "
                         f"resized and normalised as clip.load's preprocess does")


def check_classes(model, classes, kind):
    """`classes` handed to a method's forward must be what its own encode_classes() returns."""
    ok = isinstance(classes, tuple) and len(classes) == 2 if kind == "pair" else \
        isinstance(classes, torch.Tensor) and classes.dim() == 2
    if not ok:
        what = "a (text features, summaries) pair" if kind == "pair" else "a (C, E) tensor"
        raise TypeError(f"{type(model).__name__}: classes must be what this model's "
                        f"encode_classes() returns, {what}; got a {type(classes).__name__} "
                        f"(the class side of another method?)")


def encode_image(clip_model, images, hook=None, engine=None):
    """Image features (N, E) from the CLS token, not normalised; hook(layer, x) edits the token
    sequence at the input of every layer. At layer 0 it sees the sequence after the positional
    embedding and *before* `ln_pre`: where the official MaPLe / IVLP / MPL code appends its first
    vision prompts (no positional embedding, but through ln_pre). At layers >= 1 it sees the input
    of block `layer`. The sequence may grow or shrink between layers. engine: None, each block is
    residual_block; or an engine whose `vision_block(block, x, last)` runs it (the same numbers)."""
    check_images(clip_model, images)
    v = clip_model.visual
    x = patch_tokens(clip_model, images)                                  # (N, 197, 768)
    blocks = v.transformer.resblocks
    for layer, block in enumerate(blocks):
        if hook is not None:
            x = hook(layer, x)  # (N, 197 + prompts at this layer, 768)
        if layer == 0:
            x = v.ln_pre(x)
        if engine is None:
            x = residual_block(block, x, causal=False)
        else:
            x = engine.vision_block(block, x, last=layer == len(blocks) - 1)
    return v.ln_post(x[:, 0]) @ v.proj.to(x.dtype)            # (N, 768) CLS token -> (N, 512)


def n_layers(clip_model):
    """(text layers, vision layers), 12 and 12 for ViT-B/16."""
    return len(clip_model.transformer.resblocks), len(clip_model.visual.transformer.resblocks)


# --------------------------------------------------------------------------------------------------
# Logits; what every method shares; zero-shot CLIP: no prompts at all, one hand-written template per
# dataset (CoOp)

def cosine_logits(image_features, text_features, logit_scale):
    """CLIP's classifier: scaled cosine similarity, (N, E) x (C, E) -> (N, C). logit_scale.exp() =
    100 for CLIP. In fp32 whatever the precision around it: bf16 logits near 30 are 0.125 apart,
    enough to flip near-ties."""
    with torch.autocast(image_features.device.type, enabled=False):
        image_features = image_features.float() / image_features.float().norm(dim=-1, keepdim=True)
        text_features = text_features.float() / text_features.float().norm(dim=-1, keepdim=True)
        return logit_scale.float().exp() * image_features @ text_features.t()


class PromptMethod(nn.Module):
    """What every method shares: a frozen CLIP, `self.clip` (freeze), and prompts, its only
    trainable tensors.

        classes = model.encode_classes()            the class side, computed once per class set
        logits = model(images, classes=None)        (N, C), fp32 (cosine_logits)
        model.loss_weights(images, labels, logits)  (N,) detached per-sample loss weights, or None:
                                                    a plain mean
        model.prompt_state_dict()                   {name: tensor}, the prompts only (not CLIP's)
        model.load_prompt_state_dict(sd)            strict names and shapes; also into a model of
                                                    other classes
    """

    def __init__(self, clip_model, engine=None):
        super().__init__()
        self.clip = freeze(clip_model)
        self.engine = engine  # None: the plain loops; else clip_engine.Engine(): the same, faster

    def train(self, mode=True):
        """Training mode for the prompts only: the frozen CLIP stays in eval mode."""
        super().train(mode)
        self.clip.eval()
        return self

    def loss_weights(self, images, labels, logits=None):
        return None

    def prompt_state_dict(self):
        return {k: p.detach().clone() for k, p in self.named_parameters() if p.requires_grad}

    def load_prompt_state_dict(self, state_dict):
        own = {k: p for k, p in self.named_parameters() if p.requires_grad}
        wrong = sorted(k for k in own.keys() | state_dict.keys() if k not in own
                       or k not in state_dict or own[k].shape != state_dict[k].shape)
        if wrong:
            raise ValueError(f"prompts missing, unexpected or of another shape for this "
                             f"{type(self).__name__}: {wrong}")
        with torch.no_grad():
            for k, p in own.items():
                p.copy_(state_dict[k])


class ZeroShotCLIP(PromptMethod):
    """The zero-shot baseline: text features of `template.format(classname)`, computed once; nothing
    trains."""

    def __init__(self, clip_model, classnames, template="a photo of a {}.", engine=None):
        super().__init__(clip_model, engine)
        ids = tokenize([template.format(c.replace("_", " ")) for c in class_names(classnames)])
        with torch.no_grad():
            ids = ids.to(clip_model.logit_scale.device)
            features = encode_text_ids(clip_model, ids, engine)                     # (C, 512)
        self.register_buffer("text_features", features, persistent=False)

    def encode_classes(self):
        return self.text_features

    def forward(self, images, classes=None):
        if classes is not None:
            check_classes(self, classes, "tensor")
        classes = self.encode_classes() if classes is None else classes
        image_features = encode_image(self.clip, images, engine=self.engine)     # (N, 512)
        return cosine_logits(image_features, classes, self.clip.logit_scale)


# Architectures of random CLIPs, for tests and bench.py: same class, same code path as the real
# weights.
RANDOM_CLIPS = {"ViT-B/16": dict(embed_dim=512, image_resolution=224, vision_layers=12,
                                 vision_width=768, vision_patch_size=16, context_length=77,
                                 vocab_size=49408, transformer_width=512, transformer_heads=8,
                                 transformer_layers=12)}
# tiny: ViT-B/16's 12 layers at width 64 (every preset at its published depth), 32 x 32 images,
# 8 x 8 patches
RANDOM_CLIPS["tiny"] = dict(RANDOM_CLIPS["ViT-B/16"], embed_dim=64, image_resolution=32,
                            vision_width=64, vision_patch_size=8, transformer_width=64,
                            transformer_heads=1)


def random_clip(arch="tiny", seed=0, device="cpu"):
    """A random CLIP, frozen fp32, built by `clip.model.build_model` as real weights are (heads =
    width // 64)."""
    torch.manual_seed(seed)
    state_dict = CLIP(**RANDOM_CLIPS[arch]).state_dict()
    return freeze(clip.model.build_model(state_dict).float().to(device))


def freeze(model):
    """The contract every method relies on, applied in place to any CLIP it is handed (e.g. from
    `clip.load`): a ViT CLIP, in eval mode, no gradients for any CLIP parameter, fp32 weights
    (OpenAI's fp16 ones converted, with a warning: the compute precision is the caller's,
    torch.autocast or to_official_fp16)."""
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("this CLIP is a TorchScript module (clip.load(..., jit=True)); its blocks "
                        "cannot be called one by one. Load it with clip.load(name, jit=False).")
    if not isinstance(model, CLIP) or not hasattr(model.visual, "conv1"):
        raise TypeError(f"expected an OpenAI ViT CLIP (clip.model.CLIP with a VisionTransformer, as "
                        f"clip.load returns for ViT-B/16), got {type(model).__name__}"
                        f"{' with a ResNet image encoder' if isinstance(model, CLIP) else ''}")
    if model.visual.conv1.weight.dtype != torch.float32:
        warnings.warn(f"CLIP's weights are {model.visual.conv1.weight.dtype} (clip.load on CUDA "
                      f"returns fp16): converted to fp32 in place. Choose the compute precision with "
                      f"torch.autocast, or call clip_layers.to_official_fp16(model) on the method "
                      f"for the official pure-fp16 setting.")
        model.float()
    model.eval()
    model.requires_grad_(False)
    return model


def to_official_fp16(model):
    """The official pure-fp16 setting (PREC "fp16" of CoOp / MaPLe / MPL), for parity runs: CLIP's
    weights as OpenAI ships them (`clip.model.convert_weights`: LayerNorms and embeddings stay
    fp32) and the method's own parameters (all but `model.clip`) in fp16, trained with plain SGD."""
    clip_ids = {id(p) for p in model.clip.parameters()}
    clip.model.convert_weights(model.clip)
    for p in model.parameters():
        if id(p) not in clip_ids:
            p.data = p.data.half()
    return model


def widths(clip_model):
    """(text width, vision width), e.g. (512, 768) for ViT-B/16, read from the weights."""
    return clip_model.ln_final.weight.shape[0], clip_model.visual.conv1.weight.shape[0]
