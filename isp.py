"""
ISP: Integrated Structural Prompt Learning for Vision-Language Models.
Jiahui Wang, Qin Xu, Bo Jiang, Bin Luo (Anhui University), arXiv 2507.05677 (July 2025; the venue could not be read).

RECONSTRUCTED FROM THE ABSTRACT. Only the abstract, the keywords, the opening of the introduction and part of the
overview caption could be read, and no code is public. This file builds an ISP-style method to what those say; the
equations are ours, not the paper's. Tags: [PAPER] stated in the readable text, [CLIP] a fact of the backbone,
[BASELINE-SRC] taken from a baseline's public code (IVLP as in PromptSRC, MaPLe), INFERRED ours. Each INFERRED choice
carries an `# INFERRED:` comment in the code. Every decision, its alternatives and why we took it are written up in
docs/isp_reconstruction.md (cited below as §n).

The idea [PAPER]: CLIP stays frozen, and learnable prompts are concatenated with the text tokens and with the image
tokens. Inside the frozen encoders the prompts become an "integrated structural prompt". A self-structural module models
the relations between one modality's prompts and its frozen tokens; a cross-structural module does the same across the
modalities. Information thus passes between the branches while the frozen features stay stable. A sample-probing module
weights each sample's loss by its difficulty, read from the frozen CLIP's prediction probability, so the model does not
overfit the easy samples and generalises better to new classes.

Whose is what:
  [PAPER]        prompts in both branches; frozen encoders that take in the structural prompt; a self-structural module
                 (prompts <-> frozen tokens, one modality); a cross-structural module (across modalities); per-sample
                 loss coefficients from the frozen CLIP's prediction probability.
  [BASELINE-SRC] the prompts: IVLP deep prompting as in PromptSRC (4 text + 4 vision tokens, depth 9, "a photo of a",
                 std 0.02), text prompts at rows 1..n after SOS, vision prompts after the patches, replaced at layers
                 1..J-1; MaPLe's linear text->vision coupling (isp_cross="linear").
  INFERRED       the bottleneck-attention form of both modules, their widths (d_s = d/8, d_c = text width/8), one module
                 per layer, zero-initialised outputs (so ISP starts exactly as IVLP), self before cross, what the cross
                 module reads (class_summaries: vision prompts read per-class text EOT summaries, text prompts read
                 the vision prompts, so the text branch stays image-independent), the weights
                 w = 1 + lambda (1 - p_clip) and their variants.
Left out: a GLCN-style learned graph (§3.1), any extra loss (none could be confirmed), the training recipe
(train.py), and every number of the paper (none could be read).

Equation labels such as (SSP-2), (CSP-1), (SP-1) are ours: the paper's numbering could not be read.
Letters: C classes, N images, n = n_ctx prompt tokens, J = depth, L text length after the EOT cut (<= 77). Shapes in
comments are for ViT-B/16: text width 512, vision width 768, 197 = 1 CLS + 196 patch tokens.
"""
import math
import string
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

import clip_layers

# ----------------------------------------------------------------------------------------------------------------------
# Config: one line per hyper-parameter, its source in brackets: [BASELINE-SRC] PromptSRC's IVLP config, [PAPER], or
# [INFERRED] ours (each explained in docs/isp_reconstruction.md, section in parentheses).

CROSS_MODES = ("none", "image_tokens", "class_summaries", "linear")  # what the cross-structural module reads (§4.2)
SP_MODES = ("linear", "focal", "batch-softmax", "dynamic")            # sample probing's weight formula (§5.2)


@dataclass
class ISPConfig:
    n_ctx: int = 4                  # learnable prompt tokens per layer in each branch (text, vision) [BASELINE-SRC]
    depth: int = 9                  # prompt depth J: prompts at the inputs of layers 0..J-1, both towers [BASELINE-SRC]
    ctx_init: str = "a photo of a"  # words whose embeddings start the layer-0 text prompts ('': random) [BASELINE-SRC]
    prompt_std: float = 0.02        # std of the randomly initialised prompts [BASELINE-SRC]
    isp_self: bool = True           # self-structural: prompts attend to [prompts; frozen tokens] [PAPER, form §3]
    self_ratio: float = 0.125       # self-module bottleneck d_s as a fraction of the branch width [INFERRED §3.2]
    isp_cross: str = "class_summaries"  # cross-structural prompts: none, image_tokens, class_summaries, linear [§4]
    cross_ratio: float = 0.125      # cross-module bottleneck d_c as a fraction of the text width [INFERRED §4.1]
    sample_probing: bool = True     # weight each sample's CE by its difficulty 1 - p_clip(y|x) [PAPER, formula §5]
    sp_lambda: float = 1.0          # lambda of w = 1 + lambda * d (sp_mode linear and dynamic) [INFERRED §5.2]
    sp_mode: str = "linear"         # weight formula: linear, focal, batch-softmax, dynamic [INFERRED §5.2]
    sp_gamma: float = 2.0           # focal mode: power gamma, the focal loss default [INFERRED §5.2]
    sp_eps: float = 1e-3            # focal mode: eps added to d (a batch of easy samples gives 0/0) [INFERRED §5.2]
    sp_temperature: float = 1.0     # batch-softmax mode: temperature T [INFERRED §5.2]
    sp_template: str = "a photo of a {}."  # template of the frozen text features behind p_clip [INFERRED §5.1]
    sp_view: str = "crop"           # p_clip of the trained crop, or of a "fixed" centre view once [INFERRED §5.1]

    # isp_cross: "image_tokens": text prompts read each image's frozen tokens (per-image text, CoCoOp's cost);
    # "class_summaries": vision prompts read each class's text EOT summary, text prompts read the vision prompts (text
    # features stay image-independent); "linear": MaPLe-like linear text -> vision coupling.

    def __post_init__(self):
        if self.isp_cross not in CROSS_MODES:
            raise ValueError(f"isp_cross must be one of {', '.join(CROSS_MODES)}; got {self.isp_cross!r}")
        if self.sp_view not in ("crop", "fixed"):
            raise ValueError(f"sp_view must be crop or fixed; got {self.sp_view!r}")
        if self.sp_mode not in SP_MODES:
            raise ValueError(f"sp_mode must be one of {', '.join(SP_MODES)}; got {self.sp_mode!r}")
        if self.n_ctx < 1 or self.depth < 1:
            raise ValueError(f"ISP needs n_ctx >= 1 and depth >= 1; got n_ctx={self.n_ctx}, depth={self.depth}")
        # (field, ok, valid range): a NaN fails every comparison, so each range also refuses it
        finite = {k: math.isfinite(getattr(self, k)) for k in ("prompt_std", "sp_lambda", "sp_gamma", "sp_eps",
                                                                 "sp_temperature")}
        ranges = [("prompt_std", finite["prompt_std"] and self.prompt_std >= 0, "a finite number >= 0"),
                  ("self_ratio", 0 < self.self_ratio <= 1, "a fraction of the width in (0, 1]"),
                  ("cross_ratio", 0 < self.cross_ratio <= 1, "a fraction of the width in (0, 1]"),
                  ("sp_lambda", finite["sp_lambda"] and self.sp_lambda >= 0, "a finite number >= 0"),
                  ("sp_gamma", finite["sp_gamma"] and self.sp_gamma >= 0, "a finite number >= 0"),
                  ("sp_eps", finite["sp_eps"] and self.sp_eps > 0, "a finite number > 0"),
                  ("sp_temperature", finite["sp_temperature"] and self.sp_temperature > 0, "a finite number > 0")]
        for name, ok, expected in ranges:
            if not ok:
                raise ValueError(f"{name} must be {expected}, got {getattr(self, name)}")
        if not _one_placeholder(self.sp_template):
            raise ValueError(f"sp_template must hold exactly one {{}} (the class name), as in 'a photo of a {{}}.'; "
                             f"got {self.sp_template!r}")


def _one_placeholder(template):
    """Does str.format fill `template` with one class name, through exactly one {}?"""
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
        template.format("a class")
    except (ValueError, IndexError, KeyError):
        return False
    return fields == [""]


PRESETS = {
    "isp": ISPConfig(),
    "ivlp": ISPConfig(isp_self=False, isp_cross="none", sample_probing=False),  # PromptSRC's IVLP baseline
}


# ----------------------------------------------------------------------------------------------------------------------
# Structural prompt modules. Both only *read* the frozen tokens and return an update of the prompts; the frozen tokens
# pass through untouched, our reading of the paper's aim to keep the frozen features stable (§1.3).

class SelfStructuralPrompt(nn.Module):
    """Self-structural prompt (SSP), §3. INFERRED form: the prompts P (n x d) of one modality attend
    over a learned adjacency to the nodes Z = [P; X], X the frozen tokens of the same modality:

        Q = LN(P) W_q,  K = LN(Z) W_k,  U = LN(Z) W_u,    W_q, W_k, W_u: d -> d_s      (SSP-1)
        A = softmax(Q K^T / sqrt(d_s) + Mask)              A: n x (n + N)               (SSP-2)
        dP_self = A U W_o,                                 W_o: d_s -> d, zero at init  (SSP-3)
    """

    def __init__(self, width, bottleneck):
        super().__init__()
        self.ln = nn.LayerNorm(width)  # INFERRED: pre-LN attention, affine LN, bias-free projections (as written)
        self.q = nn.Linear(width, bottleneck, bias=False)
        self.k = nn.Linear(width, bottleneck, bias=False)
        self.u = nn.Linear(width, bottleneck, bias=False)
        self.o = nn.Linear(bottleneck, width, bias=False)
        nn.init.zeros_(self.o.weight)  # INFERRED: zero-init, so ISP starts exactly as IVLP

    def forward(self, P, X, mask=None):
        """P (B, n, d) prompts, X (B, N, d) frozen tokens, mask (B, n + N) bool, False = no edge. Returns (B, n, d)."""
        n = P.shape[1]
        Z = self.ln(torch.cat([P, X], dim=1))              # text (C, L, 512) / vision (N, n + 197, 768)
        q, k, u = self.q(Z[:, :n]), self.k(Z), self.u(Z)   # (B, n, d_s), (B, n + N, d_s), (B, n + N, d_s)
        a = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])  # (B, n, n + N)   Eq. (SSP-2)
        if mask is not None:
            a = a.masked_fill(~mask[:, None, :], float("-inf"))
        return self.o(a.softmax(dim=-1) @ u)               # (B, n, d)       Eq. (SSP-3)


class CrossStructuralPrompt(nn.Module):
    """Cross-structural prompt (CSP), §4. INFERRED form: the prompts P of modality a (width d_a) attend to
    tokens Y of modality b (width d_b) through a bottleneck d_c, which also bridges the widths (512 <-> 768):

        Q = LN_a(P) W_q (d_a -> d_c),  K = LN_b(Y) W_k,  U = LN_b(Y) W_u (d_b -> d_c)  (CSP-1)
        dP_cross = softmax(Q K^T / sqrt(d_c)) U W_o,   W_o: d_c -> d_a, zero at init   (CSP-2)
    """

    def __init__(self, width_a, width_b, bottleneck):
        super().__init__()
        self.ln_a, self.ln_b = nn.LayerNorm(width_a), nn.LayerNorm(width_b)
        self.q = nn.Linear(width_a, bottleneck, bias=False)
        self.k = nn.Linear(width_b, bottleneck, bias=False)
        self.u = nn.Linear(width_b, bottleneck, bias=False)
        self.o = nn.Linear(bottleneck, width_a, bias=False)
        nn.init.zeros_(self.o.weight)  # INFERRED: zero-init, so ISP starts exactly as IVLP

    def forward(self, P, Y):
        """P (B, n, d_a); Y (M, d_b), shared by all B rows, or (B, M, d_b). Returns (B, n, d_a)."""
        q = self.q(self.ln_a(P))                             # (B, n, d_c)
        Y = self.ln_b(Y)
        k, u = self.k(Y), self.u(Y)                          # (M, d_c) or (B, M, d_c)
        a = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, n, M)   Eq. (CSP-2)
        return self.o(a.softmax(dim=-1) @ u)                 # (B, n, d_a)


# ----------------------------------------------------------------------------------------------------------------------
# Sample probing: per-sample loss coefficients from the frozen CLIP's probability of the true class (§5)

def sample_probing_weights(p_clip, mode="linear", lam=1.0, gamma=2.0, eps=1e-3, temperature=1.0, p_model=None):
    """(B,) probabilities of the true class -> (B,) loss coefficients. [PAPER] difficulty from the frozen CLIP's
    probability; every formula here is INFERRED (§5.2: the default and the alternatives (a)-(c))."""
    d = 1 - p_clip                                             # difficulty d_i
    if mode == "linear":
        return 1 + lam * d                                     # w_i = 1 + lambda d_i                      (SP-1)
    if mode == "focal":
        f = (d + eps) ** gamma
        return f / f.mean()                                    # w_i = (d_i + eps)^gamma / mean_B(...)     (SP-a)
    if mode == "batch-softmax":
        return d.shape[0] * (d / temperature).softmax(dim=0)   # w_i = B softmax_i(d_i / T)                (SP-b)
    if mode == "dynamic":
        if p_model is None:
            raise ValueError("sp_mode 'dynamic' needs the current model's probabilities (p_model)")
        # INFERRED reading of "dynamically" and of the cut-off "frozen clip a[nd ...]": mix in the model's own view.
        return 1 + lam * (1 - (p_clip * p_model).sqrt())      # d_i = 1 - sqrt(p_clip p_model)            (SP-c)
    raise ValueError(f"unknown sp_mode {mode!r}; choose from {SP_MODES}")


# ----------------------------------------------------------------------------------------------------------------------
# The model

class ISP(nn.Module):
    """IVLP deep prompts refined, at the input of every prompted layer l < J, into the integrated structural prompt

        P~ = P + dP_self(P; X_same) + dP_cross(P'; Y_other)        (INFERRED §4.5: self first, cross on its output)

    which is written into the prompt positions. Text prompts become class-specific (C, n, 512), vision prompts
    image-specific (N, n, 768). With both modules off this is exactly IVLP (PRESETS["ivlp"]).

    Arguments besides the config: an OpenAI ViT CLIP as `clip.load` returns it (clip_layers.freeze freezes it and turns
    fp16 weights into fp32 in place; the compute precision is the caller's: torch.autocast or to_official_fp16), and
    the class names.
    """

    def __init__(self, clip_model, classnames, cfg=None):
        super().__init__()
        cfg = ISPConfig() if cfg is None else cfg
        self.clip, self.cfg = clip_layers.freeze(clip_model), cfg
        if cfg.depth > min(clip_layers.n_layers(clip_model)):
            raise ValueError(f"ISP prompt depth must be in 1..{min(clip_layers.n_layers(clip_model))} for this CLIP "
                             f"(its layers); got depth={cfg.depth}")
        Dt, Dv = clip_layers.widths(clip_model)                         # 512, 768
        n, J, dev = cfg.n_ctx, cfg.depth, clip_model.logit_scale.device
        names = [name.replace("_", " ") for name in classnames]         # as the official trainers do in the model

        # Class prompts "<ctx_init> <name>." [BASELINE-SRC PromptSRC IVLP]: rows 1..n are learnable. With fewer
        # learnable tokens than ctx_init words the remaining words stay fixed tokens (as MaPLe's "of a"); with more, or
        # no ctx_init, the placeholder "X X X X" and a random init (§2.2).
        # Deliberate difference from the official IVLP code, which uses ctx_init whenever it is given and n <= 4: with
        # more learnable tokens than ctx_init has (n = 4, "a photo") it starts ctx from ctx_init's EOT and padding
        # embeddings and its suffix loses the first class-name tokens (a bug); and with n > 4 it draws ctx at random
        # even when ctx_init has enough words. At the presets (n = 4, "a photo of a") both agree exactly.
        n_words = int(clip_layers.eot_index(clip_layers.tokenize([cfg.ctx_init]))[0]) - 1 if cfg.ctx_init else 0
        use_init = 0 < n <= n_words                                     # n_words: BPE tokens of ctx_init
        prefix = cfg.ctx_init if use_init else " ".join(["X"] * n)
        ids = clip_layers.tokenize([f"{prefix} {name}." for name in names]).to(dev)   # (C, 77)
        with torch.no_grad():
            embeds = clip_layers.token_embedding(clip_model, ids)                     # (C, 77, 512)
        self.register_buffer("token_embeds", embeds, persistent=False)
        self.register_buffer("eot", clip_layers.eot_index(ids), persistent=False)    # (C,) EOT position per class

        # Deep prompts P_t^l, P_v^l for l = 0..J-1 [BASELINE-SRC IVLP: independent per layer and per branch].
        self.text_prompts = nn.Parameter(torch.randn(J, n, Dt, device=dev) * cfg.prompt_std)    # (J, n, 512)
        self.vision_prompts = nn.Parameter(torch.randn(J, n, Dv, device=dev) * cfg.prompt_std)  # (J, n, 768)
        if use_init:
            with torch.no_grad():
                self.text_prompts[0] = embeds[0, 1:1 + n]                                 # "a photo of a"

        # Structural modules, one per prompted layer (INFERRED §3.2: not shared across layers). Widths are fractions
        # of the model's widths, never below 1 (the tiny test CLIP has width 64).
        d_s_t, d_s_v = (max(1, round(d * cfg.self_ratio)) for d in (Dt, Dv))        # 64, 96
        d_c = max(1, round(Dt * cfg.cross_ratio))                                      # 64

        def per_layer(make):
            return nn.ModuleList(make() for _ in range(J)).to(dev)

        self.self_text = self.self_vision = self.cross_text = self.cross_vision = self.coupling = None
        if cfg.isp_self:
            self.self_text = per_layer(lambda: SelfStructuralPrompt(Dt, d_s_t))
            self.self_vision = per_layer(lambda: SelfStructuralPrompt(Dv, d_s_v))
        if cfg.isp_cross in ("image_tokens", "class_summaries"):
            # class_summaries: text prompts read the vision prompts P_v^l; image_tokens: text prompts read each image's
            # frozen tokens X_v^l. Both: vision prompts read the per-class text EOT summaries S_t^l.
            # INFERRED (§4.2, image_tokens): the literal option has each encoder read the other's layer-l tokens,
            # which needs the two encoders run in lock-step; clip_layers runs one encoder at a time. So here too the
            # vision prompts read the summaries of the image-free text pass (encode_classes, text prompts without the
            # cross term), and only the text prompts read the image: the two options differ in exactly what the text
            # prompts read.
            self.cross_text = per_layer(lambda: CrossStructuralPrompt(Dt, Dv, d_c))
            self.cross_vision = per_layer(lambda: CrossStructuralPrompt(Dv, Dt, d_c))
        elif cfg.isp_cross == "linear":
            self.coupling = per_layer(lambda: nn.Linear(Dt, Dv))  # MaPLe's V-L coupling function, 512 -> 768
            for lin in self.coupling:  # INFERRED: zero-init (MaPLe uses the default init), so ISP starts as IVLP
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)

        if cfg.sample_probing:  # h_c: frozen zero-shot text features, computed once for the class set (§5.1)
            zs_ids = clip_layers.tokenize([cfg.sp_template.format(name) for name in names]).to(dev)
            with torch.no_grad():
                h = clip_layers.encode_text_ids(clip_model, zs_ids)
            self.register_buffer("zs_text_features", h / h.norm(dim=-1, keepdim=True), persistent=False)

    def train(self, mode=True):
        """Training mode for the prompts only: the frozen CLIP stays in eval mode (clip_layers.freeze's contract)."""
        super().train(mode)
        self.clip.eval()
        return self

    # -- text branch ---------------------------------------------------------------------------------------------------

    def _text_hook(self, eot, image_tokens=None):
        """hook(l, x) for clip_layers.encode_text over the text rows in hand, whose EOT positions are `eot`: all
        classes, or the N*C image-major rows (i*C + c) of isp_cross="image_tokens".
        image_tokens: the list X_v^l (N, 197, 768) filled by the vision hook (isp_cross="image_tokens" only)."""
        cfg, n = self.cfg, self.cfg.n_ctx

        def hook(l, x):                                                   # x: (R, L, 512), L = last EOT + 1 <= 77
            if l >= cfg.depth:
                return x  # IVLP: after layer J-1 the prompt positions pass through the frozen layers
            R, L = x.shape[:2]
            # Layer 0: P^0 was written into the token embeddings and got their position embeddings (as in CoOp/IVLP).
            # Layers >= 1: IVLP *replaces* rows 1..n by the next prompts, dropping the previous layer's prompt outputs;
            # the frozen tokens (SOS, name, ".", EOT) carry on.
            P = x[:, 1:1 + n] if l == 0 else self.text_prompts[l].expand(R, -1, -1)  # (R, n, 512)
            if self.self_text is not None:
                X = torch.cat([x[:, :1], x[:, 1 + n:]], dim=1)            # (R, L - n, 512) frozen tokens
                # Node j of [P; X] is text position j for j > n; positions after a row's own EOT are padding (the cut
                # keeps them up to the *longest* prompt in hand), so they are no nodes of that row's graph (§3.4).
                mask = torch.arange(L, device=x.device) <= eot[:, None]  # (R, L) over the n + (L - n) nodes
                P = P + self.self_text[l](P, X, mask)                     # Eq. (SSP): class-specific prompts
            # INFERRED (§4.5): self first, then cross on its output, both residual.
            if cfg.isp_cross == "class_summaries":
                P = P + self.cross_text[l](P, self.vision_prompts[l])     # reads P_v^l (n, 768): image-independent
            elif cfg.isp_cross == "image_tokens" and image_tokens is not None:  # (absent in the image-free pass)
                Y = image_tokens[l]                                       # (N, 197, 768) frozen tokens of each image
                N = Y.shape[0]
                # Group the queries by image instead of copying each image's keys C times: (N, C * n, 512).
                P = P + self.cross_text[l](P.reshape(N, -1, P.shape[-1]), Y).reshape(P.shape)
            return torch.cat([x[:, :1], P, x[:, 1 + n:]], dim=1)          # (R, L, 512) = [SOS, P~, name, ., EOT, ..]

        return hook

    def _encode_text(self, rows, image_tokens=None, eot_rows=False):
        """Text features (R, 512) of the class rows `rows` (a slice or index tensor), once per image under
        isp_cross="image_tokens"; with eot_rows also the EOT summaries S_t^l of every layer, (R, layers, 512)."""
        n = self.cfg.n_ctx
        emb, eot = self.token_embeds[rows], self.eot[rows]                # (C, 77, 512), (C,)
        if image_tokens is not None:
            N = image_tokens[0].shape[0]
            emb, eot = emb.repeat(N, 1, 1), eot.repeat(N)                 # (N * C, 77, 512), rows i * C + c
        P0 = self.text_prompts[0].expand(emb.shape[0], -1, -1)           # (R, n, 512)
        x = torch.cat([emb[:, :1], P0, emb[:, 1 + n:]], dim=1)            # (R, 77, 512) = [SOS, P^0, name, ., EOT, pad]
        # The hook writes only rows 0..n, the same way for every row (hook_rows), unless the prompts read the row's
        # own tokens: the self-structural module (class-specific prompts) and image_tokens (per-image prompts).
        alike = not self.cfg.isp_self and self.cfg.isp_cross != "image_tokens"
        return clip_layers.encode_text(self.clip, x, eot, self._text_hook(eot, image_tokens),
                                       hook_rows=1 + n if alike else None, eot_rows=eot_rows)

    def encode_classes(self):
        """Everything class-dependent that does not depend on images, for evaluation to compute once per class set:
        (text features (C, 512), EOT summaries S_t (C, layers, 512) or None). INFERRED (§4.4): a class's text is
        summarised by its EOT row at the input of each layer, the token CLIP reads out at the end; the vision prompts
        read the summaries under image_tokens / class_summaries. Under image_tokens the text features returned here
        are the image-free ones; forward() re-encodes the classes per image.
        """
        summaries_needed = self.cfg.isp_cross in ("image_tokens", "class_summaries")
        out = self._encode_text(slice(None), eot_rows=summaries_needed)
        return out if summaries_needed else (out, None)

    # -- image branch and logits ---------------------------------------------------------------------------------------

    def _vision_hook(self, summaries=None, image_tokens=None):
        cfg, n = self.cfg, self.cfg.n_ctx

        def hook(l, x):  # l = 0: (N, 197, 768) after pos-emb, before ln_pre; l >= 1: (N, 197 + n, 768)
            if l >= cfg.depth:
                return x
            # IVLP: the prompts go after the patches at layer 0 (no position embedding, through ln_pre); at layers >= 1
            # the last n rows, the previous prompts' outputs, are replaced.
            X = x if l == 0 else x[:, :-n]                                # (N, 197, 768) frozen tokens
            if image_tokens is not None:
                image_tokens.append(X)                                    # read by the text prompts (image_tokens)
            # INFERRED: at layer 0 the refined prompts still go through ln_pre with the other tokens, like IVLP's.
            P = self.vision_prompts[l].expand(x.shape[0], -1, -1)         # (N, n, 768)
            if self.self_vision is not None:
                P = P + self.self_vision[l](P, X)                         # Eq. (SSP): image-specific prompts
            if self.cross_vision is not None:
                # Reads S_t^l (C, 512) of *all* classes (the class set is the graph), so the vision branch needs
                # encode_classes() of the whole class set.
                P = P + self.cross_vision[l](P, summaries[:, l])          # shared by all images
            elif self.coupling is not None:
                P = P + self.coupling[l](self.text_prompts[l])            # linear: (n, 512) -> (n, 768), over N
            return torch.cat([X, P], dim=1)                               # (N, 197 + n, 768)

        return hook

    def forward(self, images, classes=None):
        """images (N, 3, 224, 224) -> logits (N, C). classes: the output of encode_classes(), computed here if None."""
        text_features, summaries = self.encode_classes() if classes is None else classes
        image_tokens = [] if self.cfg.isp_cross == "image_tokens" else None
        image_features = clip_layers.encode_image(self.clip, images,
                                                  self._vision_hook(summaries, image_tokens))    # (N, 512)
        if image_tokens is None:
            return clip_layers.cosine_logits(image_features, text_features, self.clip.logit_scale)  # (N, C)
        # image_tokens: class features g_{c|i} per image (§4.2): N * C text sequences, the CoCoOp cost.
        N, C = image_features.shape[0], self.eot.shape[0]
        per_image = self._encode_text(slice(None), image_tokens=image_tokens).view(N, C, -1)      # (N, C, 512)
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        per_image = per_image / per_image.norm(dim=-1, keepdim=True)
        return self.clip.logit_scale.exp() * (per_image @ image_features[:, :, None]).squeeze(-1)  # (N, C)

    # -- sample probing ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def frozen_p_clip(self, images, labels):
        """p_clip(y_i | x_i), (N,): the frozen, un-prompted CLIP's probability of each image's true class, from one
        no-grad pass of the frozen image encoder and the zero-shot text features h_c computed once in __init__ (§5.1).
        The pass is one more forward of the image encoder, about half the image side of a training step (a forward
        and a backward, which costs as much again): on a ViT-B/16-sized CLIP (CPU, batch 4) 0.84 s of ISP's 2.70 s
        step at 10 classes, 0.97 s of 4.42 s at 100 (bench.py's probe s)."""
        u = clip_layers.encode_image(self.clip, images)                  # (N, 512) no prompts
        p = clip_layers.cosine_logits(u, self.zs_text_features, self.clip.logit_scale).softmax(dim=-1)   # (N, C)
        return p.gather(1, labels[:, None]).squeeze(1)                                                  # (N,)

    @torch.no_grad()
    def sample_weights(self, images, labels, logits=None, p_clip=None):
        """(N,) detached loss coefficients for train.py's `loss = (w * CE(logits, y, reduction="none")).mean()`.
        train.py passes its training logits (only sp_mode "dynamic" uses them).

        p_clip: None (default) computes p_clip on the view being trained on (frozen_p_clip: one pass of the frozen
        encoder per step; it cannot be cached, since the crops are random; no cheaper exact way exists: the prompted
        pass shares nothing with it past the patch embedding, the prompts change every token from block 0 on).
        Or (N,) probabilities the caller computed once per training image, e.g. frozen_p_clip on a fixed view (the
        centre crop the test transform gives) kept beside the dataset: then a step pays no extra pass, but this is
        another method, INFERRED either way (§5.1): the weight of an image no longer follows the crop it is trained
        on, so a crop that cuts the object away keeps the weight of the whole image."""
        cfg = self.cfg
        if not cfg.sample_probing:
            return images.new_ones(images.shape[0])
        if p_clip is None:
            p_clip = self.frozen_p_clip(images, labels)                                    # p_clip(y_i | x_i)
        p_model = None
        if cfg.sp_mode == "dynamic":
            if logits is None:
                raise ValueError("sp_mode 'dynamic' needs the training logits: sample_weights(images, labels, logits)")
            p_model = logits.detach().softmax(dim=-1).gather(1, labels[:, None]).squeeze(1)
        return sample_probing_weights(p_clip, cfg.sp_mode, cfg.sp_lambda, cfg.sp_gamma, cfg.sp_eps,
                                      cfg.sp_temperature, p_model)


# ----------------------------------------------------------------------------------------------------------------------

if __name__ == "__main__":
    clip_model = clip_layers.random_clip("tiny")
    classnames = ["cat", "dog", "sea lion"]
    images = torch.randn(2, 3, 32, 32)
    for name, preset in PRESETS.items():
        for cross in (CROSS_MODES if name == "isp" else (preset.isp_cross,)):
            cfg = replace(preset, isp_cross=cross)
            model = ISP(clip_model, classnames, cfg)
            logits = model(images)
            w = model.sample_weights(images, torch.tensor([0, 2]), logits)
            n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
            print(f"{name:5s} cross={cfg.isp_cross}: logits {tuple(logits.shape)}, weights {w.tolist()}, "
                  f"trainable {n_train:,}")
