"""
ISP: Integrated Structural Prompt Learning for Vision-Language Models, by Jiahui Wang, Qin Xu,
Bo Jiang, Bin Luo (Anhui University), arXiv 2507.05677 (July 2025; the venue could not be read).
All of it is in this file and clip_layers.py (CLIP's forward with hooks).

RECONSTRUCTED FROM THE ABSTRACT. Only the abstract, the keywords, the opening of the introduction
and part of the overview caption could be read, and no code is public. This file builds an ISP-style
method to what those say; the equations are ours, not the paper's. Tags: [PAPER] stated in the
readable text, [CLIP] a fact of the backbone, [BASELINE-SRC] taken from a baseline's public code
(IVLP as in PromptSRC, MaPLe), INFERRED ours. Each INFERRED choice carries an `# INFERRED:` comment
in the code. Every decision, its alternatives and why we took it are written up in
docs/isp_reconstruction.md (cited below as §n).

The idea [PAPER]: CLIP stays frozen, and learnable prompts are concatenated with the text tokens and
with the image tokens. Inside the frozen encoders the prompts become an "integrated structural
prompt". A self-structural module models the relations between one modality's prompts and its frozen
tokens; a cross-structural module does the same across the modalities. Information thus passes
between the branches while the frozen features stay stable. A sample-probing module weights each
sample's loss by its difficulty, read from the frozen CLIP's prediction probability, so the model
does not overfit the easy samples and generalises better to new classes.

The three modules, in the paper's order and this file's: SelfStructuralPrompt (§3),
CrossStructuralPrompt (§4), SampleProbe (§5); ISP composes them over IVLP's deep prompts (§2).

Whose is what:
  [PAPER]        prompts in both branches; frozen encoders that take in the structural prompt; a
                 self-structural module (prompts <-> frozen tokens, one modality); a cross-structural
                 module (across modalities); per-sample loss coefficients from the frozen CLIP's
                 prediction probability.
  [BASELINE-SRC] the prompts: IVLP deep prompting as in PromptSRC (4 text + 4 vision tokens, depth
                 9, "a photo of a", std 0.02), text prompts at rows 1..n after SOS, vision prompts
                 after the patches, replaced at layers 1..J-1; MaPLe's linear text->vision coupling
                 (isp_cross="linear").
  INFERRED       the bottleneck-attention form of both modules, their widths (d_s = d/8, d_c = text
                 width/8), one module per layer, zero-initialised outputs (so ISP starts exactly as
                 IVLP), self before cross, what the cross module reads (class_summaries: vision
                 prompts read per-class text EOT summaries, text prompts read the vision prompts, so
                 the text branch stays image-independent), the weights w = 1 + lambda (1 - p_clip).
Left out: a GLCN-style learned graph (§3.1), other cross and weighting variants (§4.2, §5), any
extra loss (none could be confirmed), the training recipe (train.py), every number of the paper
(none could be read).

Equation labels such as (SSP-2), (CSP-1), (SP-1) are ours: the paper's numbering could not be read.
Letters: C classes, N images, n = n_ctx prompt tokens, J = depth, L text length after the EOT cut
(<= 77). Shapes in comments are for ViT-B/16: text width 512, vision width 768, 197 = 1 CLS + 196
patch tokens.
"""
import math
import string
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn as nn

import clip_layers

# --------------------------------------------------------------------------------------------------
# Config: one line per hyper-parameter, its source in brackets: [BASELINE-SRC] PromptSRC's IVLP
# config, [PAPER], or [INFERRED] ours (explained in docs/isp_reconstruction.md, § in brackets).

CROSS_MODES = ("none", "class_summaries", "linear")  # what the cross-structural module reads (§4.2)


@dataclass
class ISPConfig:
    n_ctx: Annotated[int, "learnable prompt tokens per layer in each branch (text, vision) [BASELINE-SRC]"] = 4
    depth: Annotated[int, "prompt depth J: prompts at the inputs of layers 0..J-1, both towers [BASELINE-SRC]"] = 9
    ctx_init: Annotated[str, "words whose embeddings start the layer-0 text prompts ('': random) "
                             "[BASELINE-SRC]"] = "a photo of a"
    prompt_std: Annotated[float, "std of the randomly initialised prompts [BASELINE-SRC]"] = 0.02
    isp_self: Annotated[bool, "self-structural: prompts attend to [prompts; frozen tokens] [PAPER, form §3]"] = True
    self_ratio: Annotated[float, "self-module bottleneck d_s as a fraction of the branch width [INFERRED §3.2]"] = 0.125
    isp_cross: Annotated[str, "cross-structural prompts: none, class_summaries, linear [§4]"] = "class_summaries"
    cross_ratio: Annotated[float, "cross-module bottleneck d_c as a fraction of the text width [INFERRED §4.1]"] = 0.125
    sample_probing: Annotated[bool, "weight each sample's CE by its difficulty 1 - p_clip(y|x) "
                                    "[PAPER, formula §5]"] = True
    sp_lambda: Annotated[float, "lambda of the weights w = 1 + lambda * (1 - p_clip) [INFERRED §5.2]"] = 1.0
    sp_template: Annotated[str, "template of the frozen text features behind p_clip "
                                "[INFERRED §5.1]"] = "a photo of a {}."

    # isp_cross: "class_summaries": vision prompts read each class's text EOT summary, text prompts
    # read the vision prompts (text features stay image-independent); "linear": MaPLe-like linear
    # text -> vision coupling.

    def __post_init__(self):
        if self.isp_cross not in CROSS_MODES:
            raise ValueError(f"isp_cross must be one of {', '.join(CROSS_MODES)}; got {self.isp_cross!r}")
        if self.n_ctx < 1 or self.depth < 1:
            raise ValueError(f"ISP needs n_ctx >= 1 and depth >= 1; got n_ctx={self.n_ctx}, depth={self.depth}")
        # (field, ok, valid range): a NaN fails every comparison, so each range also refuses it
        for name, ok, expected in [
                ("prompt_std", math.isfinite(self.prompt_std) and self.prompt_std >= 0, "a finite number >= 0"),
                ("self_ratio", 0 < self.self_ratio <= 1, "a fraction of the width in (0, 1]"),
                ("cross_ratio", 0 < self.cross_ratio <= 1, "a fraction of the width in (0, 1]"),
                ("sp_lambda", math.isfinite(self.sp_lambda) and self.sp_lambda >= 0, "a finite number >= 0")]:
            if not ok:
                raise ValueError(f"{name} must be {expected}, got {getattr(self, name)}")
        if not _one_placeholder(self.sp_template):
            raise ValueError(f"sp_template must hold exactly one {{}} (the class name), as in 'a "
                             f"photo of a {{}}.'; got {self.sp_template!r}")


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
    # PromptSRC's IVLP baseline
    "ivlp": ISPConfig(isp_self=False, isp_cross="none", sample_probing=False),
}


# --------------------------------------------------------------------------------------------------
# Structural prompt modules. Both only *read* the frozen tokens and return an update of the prompts;
# the frozen tokens pass untouched: our reading of "the frozen features stay stable" (§1.3).

class SelfStructuralPrompt(nn.Module):
    """Self-structural prompt (SSP), §3, of one modality at one layer. INFERRED form: the prompts P
    (n x d) attend over a learned adjacency to the nodes Z = [P; X], X the frozen tokens of the same
    modality:

        Q = LN(P) W_q,  K = LN(Z) W_k,  U = LN(Z) W_u,    W_q, W_k, W_u: d -> d_s      (SSP-1)
        A = softmax(Q K^T / sqrt(d_s) + Mask)              A: n x (n + N)               (SSP-2)
        dP_self = A U W_o,                                 W_o: d_s -> d, zero at init  (SSP-3)
    """

    def __init__(self, width, bottleneck):
        super().__init__()
        # INFERRED: pre-LN, affine LN, bias-free projections (as written)
        self.ln = nn.LayerNorm(width)
        self.q = nn.Linear(width, bottleneck, bias=False)
        self.k = nn.Linear(width, bottleneck, bias=False)
        self.u = nn.Linear(width, bottleneck, bias=False)
        self.o = nn.Linear(bottleneck, width, bias=False)
        nn.init.zeros_(self.o.weight)  # INFERRED: zero-init, so ISP starts exactly as IVLP

    def forward(self, P, X, mask=None):
        """P (B, n, d) prompts, X (B, N, d) frozen tokens, mask (B, n + N) bool, False = no edge.
        Returns (B, n, d)."""
        n = P.shape[1]
        Z = self.ln(torch.cat([P, X], dim=1))  # text (C, L, 512) / vision (N, n + 197, 768)
        # (B, n, d_s), (B, n + N, d_s), (B, n + N, d_s)
        q, k, u = self.q(Z[:, :n]), self.k(Z), self.u(Z)
        a = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])  # (B, n, n + N)   Eq. (SSP-2)
        if mask is not None:
            a = a.masked_fill(~mask[:, None, :], float("-inf"))
        return self.o(a.softmax(dim=-1) @ u)               # (B, n, d)       Eq. (SSP-3)


class CrossStructuralPrompt(nn.Module):
    """Cross-structural prompt (CSP), §4, one direction at one layer. INFERRED form: the prompts P
    of modality a (width d_a) attend to tokens Y of modality b (width d_b) through a bottleneck d_c,
    which also bridges the widths (512 <-> 768):

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
        """P (B, n, d_a); Y (M, d_b), shared by all B rows -> (B, n, d_a)."""
        q = self.q(self.ln_a(P))                              # (B, n, d_c)
        Y = self.ln_b(Y)
        k, u = self.k(Y), self.u(Y)                           # (M, d_c)
        a = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, n, M)   Eq. (CSP-2)
        return self.o(a.softmax(dim=-1) @ u)                  # (B, n, d_a)


# --------------------------------------------------------------------------------------------------
# Sample probing (§5): loss coefficients from the frozen CLIP's probability of the true class

class SampleProbe(nn.Module):
    """Sample probing, §5. [PAPER] a sample's difficulty from the frozen CLIP's prediction
    probability; INFERRED the rest: the zero-shot text features h_c of `template` (computed once per
    class set), the un-prompted image features of the very view being trained on, and the weight
    formula:

        p_clip,i = softmax_c(s cos(CLIP_image(x_i), h_c))[y_i],   d_i = 1 - p_clip,i      (§5.1)
        w_i = 1 + lambda d_i                                                               (SP-1)

    with s = exp(logit_scale), the frozen CLIP's own temperature: 100 for OpenAI's CLIP, about 30
    for the mini world's.

    The frozen CLIP is passed in (ISP owns it), so that it is no submodule of this one.
    """

    def __init__(self, clip_model, names, template, lam, engine=None):
        super().__init__()
        self.lam, self.engine = lam, engine  # engine: as the ISP's (clip_layers.PromptMethod)
        ids = clip_layers.tokenize([template.format(name) for name in names])
        with torch.no_grad():
            ids = ids.to(clip_model.logit_scale.device)
            h = clip_layers.encode_text_ids(clip_model, ids, engine)                    # (C, 512)
        self.register_buffer("text_features", h / h.norm(dim=-1, keepdim=True), persistent=False)

    @torch.no_grad()
    def p_clip(self, clip_model, images, labels):
        """(N,) the frozen, un-prompted CLIP's probability of each image's true class: one no-grad
        pass of the image encoder per step (the crops are random, so it cannot be cached)."""
        u = clip_layers.encode_image(clip_model, images, engine=self.engine)   # (N, 512) no prompts
        # (N, C)
        p = clip_layers.cosine_logits(u, self.text_features, clip_model.logit_scale).softmax(dim=-1)
        return p.gather(1, labels[:, None]).squeeze(1)                                      # (N,)

    def forward(self, clip_model, images, labels):
        d = 1 - self.p_clip(clip_model, images, labels)                           # (N,)  (§5.1)
        return 1 + self.lam * d                                                   # (N,)  Eq. (SP-1)


# --------------------------------------------------------------------------------------------------
# The model: IVLP's deep prompts, refined by the structural modules; sample probing for the loss

class ISP(clip_layers.PromptMethod):
    """IVLP deep prompts refined, at the input of every prompted layer l < J, into the integrated
    structural prompt, self first, then cross on its output (INFERRED §4.5):

        P' = P + dP_self(P; X_same),    P~ = P' + dP_cross(P'; Y_other)

    which is written into the prompt positions. Text prompts become class-specific (C, n, 512),
    vision prompts image-specific (N, n, 768). With both modules off this is exactly IVLP
    (PRESETS["ivlp"]). The rest of the interface is clip_layers.PromptMethod's.

    clip_model: an OpenAI ViT CLIP as `clip.load` returns it (clip_layers.freeze freezes it and
    turns fp16 weights into fp32 in place; the compute precision is the caller's: torch.autocast
    or to_official_fp16).
    """

    def __init__(self, clip_model, classnames, cfg=None, engine=None):
        super().__init__(clip_model, engine)  # engine: clip_engine.Engine() for the speed-ups
        self.cfg = cfg = ISPConfig() if cfg is None else cfg
        n_layers = min(clip_layers.n_layers(self.clip))
        if cfg.depth > n_layers:
            raise ValueError(f"ISP prompt depth must be in 1..{n_layers} for this CLIP (its "
                             f"layers); got depth={cfg.depth}")
        Dt, Dv = clip_layers.widths(self.clip)                          # 512, 768
        n, J, dev = cfg.n_ctx, cfg.depth, self.clip.logit_scale.device
        # as the official trainers do
        names = [name.replace("_", " ") for name in clip_layers.class_names(classnames)]

        # Class prompts "<ctx_init> <name>." [BASELINE-SRC PromptSRC IVLP]: rows 1..n are learnable.
        # With fewer learnable tokens than ctx_init words the remaining words stay fixed tokens (as
        # MaPLe's "of a"); with more, or no ctx_init, the placeholder "X X X X" and a random init
        # (§2.2). Deliberate difference from the official IVLP code, which uses ctx_init whenever it
        # is given and n <= 4: with more learnable tokens than ctx_init has (n = 4, "a photo") it
        # starts ctx from ctx_init's EOT and padding embeddings and its suffix loses the first
        # class-name tokens (a bug); and with n > 4 it draws ctx at random even when ctx_init has
        # enough words. At the presets (n = 4, "a photo of a") both agree exactly.
        n_words = int(clip_layers.eot_index(clip_layers.tokenize([cfg.ctx_init]))[0]) - 1 if cfg.ctx_init else 0
        use_init = 0 < n <= n_words                                # n_words: BPE tokens of ctx_init
        words = cfg.ctx_init if use_init else " ".join(["X"] * n)
        ids = clip_layers.tokenize([f"{words} {name}." for name in names]).to(dev)    # (C, 77)
        with torch.no_grad():
            embeds = clip_layers.token_embedding(self.clip, ids)                      # (C, 77, 512)
        self.register_buffer("token_embeds", embeds, persistent=False)
        # (C,) EOT positions
        self.register_buffer("eot", clip_layers.eot_index(ids), persistent=False)

        # Deep prompts P_t^l, P_v^l, l = 0..J-1 [BASELINE-SRC IVLP: independent per layer, branch].
        # Drawn on the CPU, then moved: a seed gives the same prompts on every device.
        # (J, n, 512)
        self.text_prompts = nn.Parameter((torch.randn(J, n, Dt) * cfg.prompt_std).to(dev))
        # (J, n, 768)
        self.vision_prompts = nn.Parameter((torch.randn(J, n, Dv) * cfg.prompt_std).to(dev))
        if use_init:
            with torch.no_grad():
                self.text_prompts[0] = embeds[0, 1:1 + n]                           # "a photo of a"

        # Structural modules, one per prompted layer (INFERRED §3.2: not shared across layers).
        # Widths are fractions of the model's widths, never below 1.
        d_s_t, d_s_v = (max(1, round(d * cfg.self_ratio)) for d in (Dt, Dv))        # 64, 96
        d_c = max(1, round(Dt * cfg.cross_ratio))                                      # 64

        def per_layer(make):
            return nn.ModuleList(make() for _ in range(J)).to(dev)

        self.self_text = self.self_vision = self.cross_text = self.cross_vision = self.coupling = None
        if cfg.isp_self:
            self.self_text = per_layer(lambda: SelfStructuralPrompt(Dt, d_s_t))
            self.self_vision = per_layer(lambda: SelfStructuralPrompt(Dv, d_s_v))
        if cfg.isp_cross == "class_summaries":
            # text prompts read the vision prompts P_v^l; vision prompts the EOT summaries S_t^l
            self.cross_text = per_layer(lambda: CrossStructuralPrompt(Dt, Dv, d_c))
            self.cross_vision = per_layer(lambda: CrossStructuralPrompt(Dv, Dt, d_c))
        elif cfg.isp_cross == "linear":
            self.coupling = per_layer(lambda: nn.Linear(Dt, Dv))  # MaPLe's V-L coupling, 512 -> 768
            for lin in self.coupling:  # INFERRED: zero-init (MaPLe's is not), so ISP starts as IVLP
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)

        # h_c: frozen zero-shot text features of the class set, for p_clip (§5.1)
        self.probe = None
        if cfg.sample_probing:
            self.probe = SampleProbe(self.clip, names, cfg.sp_template, cfg.sp_lambda, engine)

    def encode_classes(self):
        """Everything class-dependent that does not depend on images, for evaluation to compute once
        per class set: (text features (C, 512), EOT summaries S_t (C, layers, 512) or None).
        INFERRED (§4.4): a class's text is summarised by its EOT row at the input of each layer, the
        token CLIP reads out at the end; the vision prompts read the summaries under
        isp_cross="class_summaries"."""
        n, J = self.cfg.n_ctx, self.cfg.depth

        def text_hook(l, x):                                # x: (C, L, 512), L = last EOT + 1 <= 77
            if l >= J:
                return x  # IVLP: after layer J-1 the prompt rows go through the frozen layers
            # Layer 0: P^0 was written into the token embeddings and got their position embeddings
            # (as in CoOp/IVLP). Layers >= 1: IVLP *replaces* rows 1..n by the next prompts,
            # dropping the previous layer's prompt outputs; the frozen tokens (SOS, name, ".", EOT)
            # carry on.
            # (C, n, 512)
            P = x[:, 1:1 + n] if l == 0 else self.text_prompts[l].expand(x.shape[0], -1, -1)
            if self.self_text is not None:
                X = torch.cat([x[:, :1], x[:, 1 + n:]], dim=1)       # (C, L - n, 512) frozen tokens
                # Node j of [P; X] is text position j for j > n; positions after a class's own EOT
                # are padding (the cut keeps them up to the *longest* prompt), so they are no nodes
                # of its graph (§3.4).
                mask = torch.arange(x.shape[1], device=x.device) <= self.eot[:, None]  # (C, L)
                P = P + self.self_text[l](P, X, mask)                # Eq. (SSP): class-specific
            if self.cross_text is not None:
                # reads P_v^l: image-independent
                P = P + self.cross_text[l](P, self.vision_prompts[l])
            return torch.cat([x[:, :1], P, x[:, 1 + n:]], dim=1)     # [SOS, P~, name, ., EOT, ..]

        emb = self.token_embeds
        P0 = self.text_prompts[0].expand(emb.shape[0], -1, -1)                  # (C, n, 512)
        # (C, 77, 512) = [SOS, P^0, name, ., EOT, pad]
        x = torch.cat([emb[:, :1], P0, emb[:, 1 + n:]], dim=1)
        summaries = self.cross_vision is not None
        # hook_rows: without the self module the hook writes rows 0..n the same way for every class.
        out = clip_layers.encode_text(self.clip, x, self.eot, text_hook, eot_rows=summaries,
                                      hook_rows=1 + n if self.self_text is None else None,
                                      engine=self.engine)
        return out if summaries else (out, None)

    def encode_images(self, images, summaries=None):
        """(N, 512) image features; summaries: S_t (C, layers, 512) from encode_classes, or None."""
        n, J = self.cfg.n_ctx, self.cfg.depth

        # l = 0: (N, 197, 768) after pos-emb, before ln_pre; l >= 1: (N, 197 + n, 768)
        def vision_hook(l, x):
            if l >= J:
                return x
            # IVLP: the prompts go after the patches at layer 0 (no position embedding, through
            # ln_pre); at layers >= 1 the last n rows, the previous prompts' outputs, are replaced.
            X = x if l == 0 else x[:, :-n]                         # (N, 197, 768) frozen tokens
            # INFERRED: at layer 0 the refined prompts go through ln_pre with the others, as IVLP's.
            P = self.vision_prompts[l].expand(x.shape[0], -1, -1)  # (N, n, 768)
            if self.self_vision is not None:
                P = P + self.self_vision[l](P, X)                  # Eq. (SSP): image-specific
            if self.cross_vision is not None:
                # Reads S_t^l (C, 512) of *all* classes (the class set is the graph), for any image.
                P = P + self.cross_vision[l](P, summaries[:, l])
            elif self.coupling is not None:
                P = P + self.coupling[l](self.text_prompts[l])     # linear: (n, 512) -> (n, 768)
            return torch.cat([X, P], dim=1)                        # (N, 197 + n, 768)

        return clip_layers.encode_image(self.clip, images, vision_hook, engine=self.engine)

    def forward(self, images, classes=None):
        """images (N, 3, 224, 224) -> fp32 logits (N, C). classes: the output of encode_classes(),
        computed here if None."""
        if classes is not None:
            clip_layers.check_classes(self, classes, "pair")
        text_features, summaries = self.encode_classes() if classes is None else classes
        image_features = self.encode_images(images, summaries)                            # (N, 512)
        # (N, C)
        return clip_layers.cosine_logits(image_features, text_features, self.clip.logit_scale)

    @torch.no_grad()
    def loss_weights(self, images, labels, logits=None):
        """Sample probing's (N,) weights, detached, for loss = mean_i w_i CE_i; None when off."""
        return None if self.probe is None else self.probe(self.clip, images, labels)


# --------------------------------------------------------------------------------------------------

if __name__ == "__main__":
    import argparse
    import torch.nn.functional as F
    argparse.ArgumentParser(description="A smoke test of ISP and its IVLP preset on a tiny random "
                            "CLIP (no download): trainable parameters, "
                            "sample probing's loss weights, and 10 SGD steps on 8 random images, "
                            "whose loss falls. Training on real data: train.py.").parse_args()
    clip_model = clip_layers.random_clip("tiny")
    classnames = ["cat", "dog", "sea lion"]
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8) % 3
    for name, preset in PRESETS.items():
        torch.manual_seed(0)
        model = ISP(clip_model, classnames, preset)
        n_train = sum(p.numel() for p in model.prompt_state_dict().values())
        w = model.loss_weights(images, labels)
        print(f"{name}: {preset}\n  trainable parameters {n_train:,}; sample probing's weights "
              f"{None if w is None else [round(v, 3) for v in w.tolist()]}")
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1,
                                    momentum=0.9)
        for step in range(10):
            logits = model(images)
            w = model.loss_weights(images, labels, logits)
            ce = F.cross_entropy(logits, labels, reduction="none")
            loss = ce.mean() if w is None else (w * ce).mean()
            if step in (0, 9):
                print(f"  step {step + 1:2d}  loss {loss.item():.4f}")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
