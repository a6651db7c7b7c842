"""
Modular Prompt Learning (MPL) for CLIP: this file and clip_layers.py (CLIP's forward with hooks).

Paper: Zhenhan Huang, Tejaswini Pedapati, Pin-Yu Chen, Jianxi Gao, "Modular Prompt Learning Improves
Vision-Language Models", ICASSP 2025, arXiv:2502.14125. Official code:
github.com/Zhenhan-Huang/Modular-Prompt-Learning (commit cb5f63f), `trainers/mpl.py` and
`clip/model.py` (`ResidualAttentionBlock_MPL`); a fork of MaPLe (Khattak et al., CVPR 2023,
github.com/muzairkhattak/multimodal-prompt-learning).

Idea. Deep prompting (VPT, IVLP, MaPLe) puts fresh prompt tokens into the input of every prompted
layer and throws away the prompt tokens that came out of the layer before, so whatever attention
wrote into them is lost. MPL edits the prompt tokens of the vision sequence with three operations at
the input of each deep layer: *remove* (O_rm) drops some of the tokens that the previous layer
produced, *add* (O_add) appends new ones, and *carry* (O_cr) lets all the others go on, so the
sequence can grow from layer to layer. The text side is MaPLe's: n_ctx learnable tokens right after
SOS, replaced at every deep layer by new "compound" prompts; the vision tokens are linear
projections of those text prompts (MaPLe's V-L coupling), so both towers learn from one set of
prompts.

MaPLe is a preset of the same class: n_add = 1 and n_rm = n_ctx remove exactly what the previous
layer added and add as many, so every deep layer replaces its prompts and nothing is carried.

Equation numbers: the paper's method section could not be read (only its abstract and third-party
summaries), so the code cites the operations by their names (O_add, O_rm, O_cr) and the official
code.

Left out on purpose: the Dassl trainer, YAML configs and the loss (train.py owns the loss,
optimizer, schedule and precision; the official model returns the CE loss in training mode); the
official `.half()` casts and hard-coded 512 / 768 widths (read from the model); ResNet backbones;
fp16 master weights.

Shapes in comments are for ViT-B/16: text width 512, 77 tokens; vision width 768, 196 patches + CLS
= 197 tokens. Letters: C classes (text sequences), N images, L sequence length.
"""
import copy
from dataclasses import dataclass, replace
from typing import Annotated

import torch
import torch.nn as nn

import clip_layers

# --------------------------------------------------------------------------------------------------
# Config: one line per hyper-parameter, its source in brackets. Defaults: the official MPL config
# vit_b4_c1_add2_rm1.


@dataclass
class MPLConfig:
    n_ctx: Annotated[int, "learnable text tokens after SOS, and vision tokens per add [MPL N_CTX]"] = 1
    n_add: Annotated[int, "O_add: projections of the text prompts appended per deep layer [MPL N_ADD_OP]"] = 2
    n_rm: Annotated[int, "O_rm: vision tokens removed from the end per deep layer [MPL N_RM_OP]"] = 1
    depth: Annotated[int, "prompt depth J: prompts at the inputs of layers 0..J-1 [MPL PROMPT_DEPTH]"] = 9
    ctx_init: Annotated[str, "the template's words, between the prompts and the class name "
                             "[MPL CTX_INIT]"] = "a photo of a"
    x_placeholders: Annotated[bool, """MPL's text "X a photo of a {}." (off: MaPLe's "a photo of a {}.") """
                                    "[MPL code]"] = True

    # With the defaults the vision sequence grows by n_add * n_ctx - n_rm = 1 token per deep layer:
    # 198, 199, ..., 206 tokens at the inputs of layers 0..8 of ViT-B/16, then 206.
    # x_placeholders: the official MPL code writes "X " * n_ctx + ctx_init + " {class}." and its ctx
    # starts as the embedding of "X"; the MaPLe repository writes ctx_init + " {class}." and its ctx
    # starts as the first n_ctx words ("a photo"), the rest staying fixed tokens.

    def __post_init__(self):
        if self.n_ctx < 1 or self.n_add < 1 or self.n_rm < 0 or self.depth < 1:
            # the official code crashes on n_add = 0 with depth > 1 (an empty cat)
            raise ValueError(f"MPL needs n_ctx >= 1, n_add >= 1, n_rm >= 0 and depth >= 1; got "
                             f"n_ctx={self.n_ctx}, n_add={self.n_add}, n_rm={self.n_rm}, "
                             f"depth={self.depth}")
        # the official code asserts it: the sequence never shrinks
        if self.n_rm > self.n_add * self.n_ctx:
            raise ValueError(f"MPL removes at most what it adds: n_rm={self.n_rm} > n_add * n_ctx "
                             f"= {self.n_add * self.n_ctx}")


PRESETS = {
    "mpl": MPLConfig(),  # official vit_b4_c1_add2_rm1
    # MaPLe (vit_b16_c2_ep5_batch4_2ctx: 2 tokens, depth 9): one projection per layer, n_rm = n_ctx
    # (for another n_ctx: maple(n_ctx)), and MaPLe's text, "a photo of a {class}." with ctx
    # initialised from "a photo", "of a" staying fixed.
    "maple": MPLConfig(n_ctx=2, n_add=1, n_rm=2, x_placeholders=False),
}


def maple(n_ctx=2, **changes):
    """The MaPLe preset for another number of context tokens, which MaPLe removes as it adds them."""
    return replace(PRESETS["maple"], n_ctx=n_ctx, n_rm=n_ctx, **changes)


# Cross-dataset / domain generalisation (official `vit_b4_c1_add2_rm1_cross_datasets.yaml`):
# shallower prompts. Its LR 0.0026 and 2 epochs are train.py's business.
CROSS_DATASET = dict(depth=3)


# --------------------------------------------------------------------------------------------------
# Prompt learner: every learnable tensor, under the official parameter names

class ModularPromptLearner(nn.Module):
    """The learnable prompts of MPL, under the official names: the `prompt_learner.*` keys of an
    official checkpoint map one to one onto `state_dict()` (the token buffers are non-persistent,
    as the official loader drops them).

      ctx                       (n_ctx, 512)        text prompts of layer 0, from the embedding of "X"
      proj                      Linear(512 -> 768)  shallow vision prompts proj(ctx), added at layer 0
      compound_prompts_text[l]  (n_ctx, 512)        text prompts of layer l+1, N(0, 0.02^2)
      txt2img_proj[a][l]        Linear(512 -> 768)  a = 0..n_add-1: vision tokens added at layer l+1
    """

    def __init__(self, clip_model, classnames, *, n_ctx, n_add, n_rm, depth, ctx_init, x_placeholders=True):
        super().__init__()
        text_width, vision_width = clip_layers.widths(clip_model)         # 512, 768
        n_layers = min(clip_layers.n_layers(clip_model))                  # 12
        # the official code does not check this; its extra prompts would go unused
        if depth > n_layers:
            raise ValueError(f"MPL prompt depth must be in 1..{n_layers} for this CLIP, got {depth}")
        # Not checked, as in the official code: with n_rm > n_ctx the first removal (layer 1) cuts
        # patch tokens, as only n_ctx prompt tokens sit at the end of the sequence then.
        self.n_ctx, self.n_add, self.n_rm, self.depth = n_ctx, n_add, n_rm, depth
        device = clip_model.logit_scale.device

        # "american_bulldog" -> "american bulldog", as the official trainers do inside the model
        names = [name.replace("_", " ") for name in classnames]
        ctx_init = ctx_init.replace("_", " ")
        random_ctx = None
        if x_placeholders:
            # MPL's text: n_ctx placeholder words before the template ("X a photo of a {class}.").
            # Only the X positions learn, from the embedding of "X"; the template's words stay
            # fixed.
            words = " ".join(["X"] * n_ctx) + " " + ctx_init
        elif ctx_init and n_ctx <= 4:
            # MaPLe's rule: its text is "a photo of a {class}.", and ctx starts as the embeddings of
            # the first n_ctx tokens of ctx_init alone ("a photo"), the rest ("of a") staying fixed.
            # As in MaPLe's code, with more tokens than ctx_init has (n_ctx 4, "a photo") ctx starts
            # from its EOT/padding embeddings and the first class-name tokens fall out of the
            # suffix; we keep that: MaPLe's checkpoints were trained with it.
            words = ctx_init
        else:
            # MaPLe's rule otherwise (no ctx_init, or n_ctx > 4): ctx from N(0, 0.02^2), drawn here,
            # before proj (MaPLe's order, so the same RNG state gives its values), and n_ctx "X"
            # placeholders before the class name.
            random_ctx = nn.init.normal_(torch.empty(n_ctx, text_width), std=0.02).to(device)
            words = " ".join(["X"] * n_ctx)
        ids = clip_layers.tokenize([f"{words} {name}." for name in names]).to(device)     # (C, 77)
        with torch.no_grad():
            embedding = clip_layers.token_embedding(clip_model, ids)                  # (C, 77, 512)
            ctx_vectors = clip_layers.token_embedding(clip_model, clip_layers.tokenize([words]).to(device))[0]
        dtype = embedding.dtype
        ctx_vectors = ctx_vectors[1:1 + n_ctx] if random_ctx is None else random_ctx.to(dtype)

        # Created in the official order (proj, ctx, compound prompts, projections), so the same
        # torch RNG state on entry gives the official initial values. Drawn on the CPU and then
        # moved, as the official code does, so a seed gives the same values on every device.
        self.proj = nn.Linear(text_width, vision_width, dtype=dtype).to(device)
        self.ctx = nn.Parameter(ctx_vectors.clone())                                  # (n_ctx, 512)
        self.compound_prompts_text = nn.ParameterList(
            [nn.Parameter(nn.init.normal_(torch.empty(n_ctx, text_width, dtype=dtype), std=0.02).to(device))
             for _ in range(depth - 1)])
        # Quirk kept from the official code: all n_add * (depth-1) projections start as copies of
        # one Linear, with identical weights; only training tells them apart.
        coupling = nn.Linear(text_width, vision_width, dtype=dtype).to(device)
        self.txt2img_proj = nn.ModuleList(
            [nn.ModuleList([copy.deepcopy(coupling) for _ in range(depth - 1)]) for _ in range(n_add)])

        # Frozen tokens around ctx, rebuilt from the class names in hand (never loaded).
        self.register_buffer("token_sos", embedding[:, :1], persistent=False)  # (C, 1, 512)
        # (C, 76 - n_ctx, 512)
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx:], persistent=False)
        self.register_buffer("eot", clip_layers.eot_index(ids), persistent=False)         # (C,)

    def text_input(self):
        """Layer-0 text input, token embeddings: [SOS, ctx, "a photo of a {class}." EOT, padding]."""
        ctx = self.ctx.expand(self.token_sos.shape[0], -1, -1)                   # (C, n_ctx, 512)
        return torch.cat([self.token_sos, ctx, self.token_suffix], dim=1)        # (C, 77, 512)

    def vision_added(self):
        """The vision tokens each prompted layer adds: [proj(ctx)] for layer 0, then for each layer
        l = 1..depth-1 the n_add projections of its text prompt, one after the other (the V-L
        coupling: made from the text prompts, which so get gradients from both towers)."""
        tokens = [self.proj(self.ctx)]                                           # (n_ctx, 768)
        for l, text_prompt in enumerate(self.compound_prompts_text):
            # (n_add * n_ctx, 768)
            tokens.append(torch.cat([proj[l](text_prompt) for proj in self.txt2img_proj]))
        return tokens


# --------------------------------------------------------------------------------------------------
# The model: frozen CLIP + the prompt learner, through clip_layers' hooks

class MPL(clip_layers.PromptMethod):
    """MPL on a frozen CLIP: `forward(images)` -> logits (N, C). `cfg` is an `MPLConfig`;
    `PRESETS["maple"]` gives MaPLe. The rest of the interface is clip_layers.PromptMethod's.

    clip_model: any OpenAI ViT CLIP, e.g. straight from `clip.load`; it is frozen and made fp32 in
    place (clip_layers.freeze); the caller picks the compute precision (torch.autocast, or
    to_official_fp16).
    """

    def __init__(self, clip_model, classnames, cfg=None, engine=None):
        super().__init__(clip_model, engine)  # engine: clip_engine.Engine() for the speed-ups
        self.cfg = cfg = cfg if cfg is not None else MPLConfig()
        classnames = clip_layers.class_names(classnames)
        self.prompt_learner = ModularPromptLearner(self.clip, classnames, n_ctx=cfg.n_ctx, n_add=cfg.n_add,
                                                   n_rm=cfg.n_rm, depth=cfg.depth, ctx_init=cfg.ctx_init,
                                                   x_placeholders=cfg.x_placeholders)

    def encode_classes(self):
        """(C, 512) text features of all classes (MaPLe's deep text prompting, which MPL keeps)."""
        prompts = self.prompt_learner

        def text_hook(layer, x):                            # x: (C, L, 512), L = last EOT + 1 <= 77
            if 1 <= layer < prompts.depth:
                # Rows 1..n_ctx (right after SOS) are *replaced* by this layer's prompts: nothing is
                # carried, and the text length never changes.
                # (C, n_ctx, 512)
                deep = prompts.compound_prompts_text[layer - 1].expand(x.shape[0], -1, -1)
                x = torch.cat([x[:, :1], deep, x[:, 1 + prompts.n_ctx:]], dim=1)  # (C, L, 512)
            return x

        # hook_rows: the hook writes rows 0..n_ctx only, the same prompts into every class.
        return clip_layers.encode_text(self.clip, prompts.text_input(), prompts.eot, text_hook,
                                       hook_rows=1 + prompts.n_ctx, engine=self.engine)  # (C, 512)

    def encode_images(self, images):
        """(N, 512) image features; this is where MPL's add / remove / carry happen."""
        prompts = self.prompt_learner
        new_tokens = prompts.vision_added()     # per prompted layer: the vision tokens it appends

        def vision_hook(layer, x):                                            # x: (N, L_layer, 768)
            if layer == 0:
                # After the positional embedding and before ln_pre, as in the official code: the
                # prompts have no position of their own, but they do go through ln_pre.
                # (N, 197 + n_ctx, 768)
                x = torch.cat([x, new_tokens[0].expand(x.shape[0], -1, -1)], dim=1)
            elif layer < prompts.depth:
                # O_rm: drop the *last* n_rm tokens, the previous layer's newest prompt outputs.
                x = x[:, :x.shape[1] - prompts.n_rm]                            # (N, L - n_rm, 768)
                # O_add: append n_add * n_ctx new tokens; O_cr: everything not removed goes on.
                x = torch.cat([x, new_tokens[layer].expand(x.shape[0], -1, -1)], dim=1)
            return x                            # L_layer by default: 198, 199, ..., 206, 206, ...

        return clip_layers.encode_image(self.clip, images, vision_hook, engine=self.engine)

    def forward(self, images, classes=None):
        """images (N, 3, 224, 224) -> fp32 logits (N, C). classes: the output of encode_classes(),
        computed here if None."""
        if classes is not None:
            clip_layers.check_classes(self, classes, "tensor")
        text_features = self.encode_classes() if classes is None else classes   # (C, 512)
        image_features = self.encode_images(images)                              # (N, 512)
        return clip_layers.cosine_logits(image_features, text_features, self.clip.logit_scale)


# --------------------------------------------------------------------------------------------------

if __name__ == "__main__":
    import argparse
    import torch.nn.functional as F
    argparse.ArgumentParser(description="A smoke test of MPL and its MaPLe preset on a tiny random "
                            "CLIP (no download): the vision sequence's length at each layer, the "
                            "trainable parameters, and 10 SGD steps on 8 random images, whose loss "
                            "falls. Training on real data: train.py.").parse_args()
    clip_model = clip_layers.random_clip("tiny")
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8) % 3
    for preset, cfg in PRESETS.items():
        torch.manual_seed(0)
        model = MPL(clip_model, ["cat", "dog", "sea lion"], cfg)
        # 1 + 16 patches of the tiny CLIP, + n_ctx at layer 0, then + n_add * n_ctx - n_rm per layer
        lengths = [17 + cfg.n_ctx + l * (cfg.n_add * cfg.n_ctx - cfg.n_rm) for l in range(cfg.depth)]
        n_train = sum(p.numel() for p in model.prompt_state_dict().values())
        print(f"{preset}: {cfg}\n  vision tokens at layers 0..{cfg.depth - 1}: {lengths}; "
              f"trainable parameters {n_train:,}")
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1,
                                    momentum=0.9)
        for step in range(10):
            loss = F.cross_entropy(model(images), labels)
            if step in (0, 9):
                print(f"  step {step + 1:2d}  loss {loss.item():.4f}")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
