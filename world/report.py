"""
The mini world's report: what its frozen CLIP knows before any prompt method runs, checked against the targets the
world was designed to meet (world/mini_world.py's header). Only `python -m world --report` (and
`--pretrain`, after training) needs this file.

    python -m world --report --root data

Per dataset: zero-shot top-1 with "a photo of a {}." on base, new and all classes, zero-shot on base with the dataset's
own template (CoOp gives each benchmark one), and linear probes on the frozen image features of the base classes with
1, 4 and 16 shots and with every training image, as CoOp's Figure 3 shows for real CLIP. Then the targets, met or not.
"""
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import clip_layers
import data
from data import WORLD, images_to_tensor
from world.mini_world import SUITE, WORLD_DATASETS, WORLD_SPLIT_FILES, base_new_labels, read_world_split

# -----------------------------------------------------------------------------
# Zero-shot accuracy


@torch.no_grad()
def encode_split(model, root, name, split="test", max_per_class=None, batch_size=500, transform=None, seed=0):
    """A rendered split through CLIP's image encoder, once: (normalised features (N, D), labels (N,),
    {label: classname}). zero_shot_accuracy scores it against any template and class subset. transform: a torchvision
    transform of each PIL image instead of the plain one (e.g. the training augmentation), its random draws seeded by
    `seed`."""
    items = read_world_split(root, name)[split]
    names = dict((label, classname) for _, label, classname in items)
    kept, per_class = [], {}
    for impath, label, _ in items:
        if per_class.get(label, 0) < (max_per_class or len(items)):
            per_class[label] = per_class.get(label, 0) + 1
            kept.append((impath, label))
    device = next(model.parameters()).device
    features = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(0, len(kept), batch_size):
            images = [Image.open(os.path.join(root, name, "images", p)).convert("RGB")
                      for p, _ in kept[i:i + batch_size]]
            x = (images_to_tensor([np.asarray(im) for im in images]) if transform is None
                 else torch.stack([transform(im) for im in images]))
            features.append(F.normalize(clip_layers.encode_image(model, x.to(device)), dim=-1))
    return torch.cat(features), torch.tensor([label for _, label in kept], device=device), names


def subset(encoded, classes):
    """An encoded split's images of "all", "base" or "new" classes (CoOp's rule: sorted labels, the first ceil(n/2)
    are base), relabelled as CoOp does, by position among the kept labels: (features, targets, kept labels)."""
    if classes not in ("all", "base", "new"):
        raise ValueError(f"classes must be 'all', 'base' or 'new', not {classes!r}")
    features, image_labels, names = encoded
    labels = sorted(names)
    if classes != "all":
        base, new = base_new_labels(len(labels))
        labels = [labels[i] for i in (base if classes == "base" else new)]
    labels = torch.tensor(labels, device=image_labels.device)
    keep = torch.isin(image_labels, labels)
    return features[keep], torch.searchsorted(labels, image_labels[keep]), labels


@torch.no_grad()
def zero_shot_accuracy(model, root, name="mini_world", split="test", classes="all", template="a photo of a {}.",
                       max_per_class=None, batch_size=500, encoded=None):
    """Top-1 accuracy (%) of zero-shot CLIP on a rendered split, with CoOp's base/new relabelling.

    classes: "all", "base" or "new" (sorted labels, first ceil(n/2) are base). Goes through clip_layers' encoders
    (equal to CLIP's own to 1e-6), so it measures exactly what a prompt learner starts from. encoded: encode_split's
    result for this split, to score one encoding with several templates or class subsets.
    """
    if encoded is None:
        encoded = encode_split(model, root, name, split, max_per_class, batch_size)
    features, target, labels = subset(encoded, classes)
    names = encoded[2]
    prompts = [template.format(names[label].replace("_", " ")) for label in labels.tolist()]
    text_features = F.normalize(clip_layers.encode_text_ids(model, clip_layers.tokenize(prompts).to(labels.device)),
                                dim=-1)
    pred = (features @ text_features.t()).argmax(dim=-1)
    return 100.0 * (pred == target).float().mean().item()


GENERIC_TEMPLATE = "a photo of a {}."  # the template the targets are stated in, as CLIP's paper and MaPLe start from
PROBE_SHOTS = (1, 4, 16)  # CoOp's Figure 3 (linear probe CLIP), plus "all": every training image of the class
PROBE_SEEDS = (1, 2, 3)
AUG_DRAWS = (1, 2, 3)  # seeds of the augmented views of the training images
AUG_TOLERANCE = 1.0  # the training views keep the class: zero-shot on them at most this many points below clean


def linear_probe(train_x, train_y, val_x, val_y, test_x, test_y, decays=(1e-4, 1e-3, 1e-2, 1e-1)):
    """Top-1 accuracy (%) of a linear probe on frozen, normalised image features, as CLIP's paper evaluates them:
    multinomial logistic regression (L-BFGS, full batch), its L2 weight decay picked on the validation split."""
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    best = (-1.0, None)
    for decay in decays:
        with torch.random.fork_rng(devices=[]):  # the same start for every decay and every call
            torch.manual_seed(0)
            linear = torch.nn.Linear(train_x.shape[1], n_classes).to(train_x.device)
        optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=200, history_size=20,
                                      line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(linear(train_x), train_y) + decay * linear.weight.square().sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
        with torch.no_grad():
            val = (linear(val_x).argmax(-1) == val_y).float().mean().item()
            if val > best[0]:
                best = (val, 100.0 * (linear(test_x).argmax(-1) == test_y).float().mean().item())
    return best[1]


@torch.no_grad()
def dataset_report(model, root, name):
    """One dataset's row of the report: zero-shot base / new / all with GENERIC_TEMPLATE, base with the dataset's
    own template, zero-shot on the base classes' training images, clean ("train") and through the dataset's training
    augmentation ("aug"), and linear probes on the base classes with 1, 4, 16 shots (mean of PROBE_SEEDS) and all
    images."""
    row = {}
    test = encode_split(model, root, name, "test")
    for classes in ("base", "new", "all"):
        row[classes] = zero_shot_accuracy(model, root, name, classes=classes, encoded=test)
    row["own"] = zero_shot_accuracy(model, root, name, classes="base", template=WORLD[name].template,
                                    encoded=test)
    if WORLD_DATASETS[name]["split_sizes"][0]:
        # the training images the prompts learn from, as the frozen CLIP reads them: clean, and through the dataset's
        # training augmentation (the views training sees; mean of AUG_DRAWS draws)
        train = encode_split(model, root, name, "train")
        row["train"] = zero_shot_accuracy(model, root, name, classes="base", encoded=train)
        augment = data.train_transform(model.visual.input_resolution, WORLD[name].crop_scale)
        row["aug"] = sum(zero_shot_accuracy(model, root, name, classes="base", encoded=encode_split(
            model, root, name, "train", transform=augment, seed=seed)) for seed in AUG_DRAWS) / len(AUG_DRAWS)
        train_x, train_y, _ = subset(train, "base")
        val_x, val_y, _ = subset(encode_split(model, root, name, "val"), "base")
        test_x, test_y, _ = subset(test, "base")
        for shots in PROBE_SHOTS + ("all",):
            accs = []
            for seed in (PROBE_SEEDS if shots != "all" else (0,)):
                g = torch.Generator().manual_seed(seed)
                pick = torch.arange(len(train_y)) if shots == "all" else torch.cat(
                    [torch.nonzero(train_y == c).flatten()[torch.randperm(int((train_y == c).sum()), generator=g)[:shots]]
                     for c in range(int(train_y.max()) + 1)])
                accs.append(linear_probe(train_x[pick], train_y[pick], val_x, val_y, test_x, test_y))
            row[f"probe {shots}"] = sum(accs) / len(accs)
    return row


def report_targets(rows):
    """The targets the world was designed to meet, checked on the suite's rows: [(description, value, met)]."""
    names = [name for name in SUITE if name in rows]
    mean = lambda key: sum(rows[n][key] for n in names) / len(names)
    gain = lambda name, key: rows[name][key] - rows[name]["base"]  # over zero-shot on base
    # over zero-shot on base with the dataset's own template: CoOp's baseline, what prompts must beat
    over_own = lambda name, key: rows[name][key] - rows[name]["own"]
    framed = [name for name in names if WORLD[name].template != GENERIC_TEMPLATE]
    inf = float("inf")
    targets = [  # (description, value, lowest allowed, highest allowed)
        ("zero-shot base, suite average, in [55, 75]", mean("base"), 55, 75),
        ("zero-shot base, best dataset >= 85", max(rows[n]["base"] for n in names), 85, inf),
        ("zero-shot base, worst dataset <= 50", min(rows[n]["base"] for n in names), -inf, 50),
        ("zero-shot new minus base, suite average >= -5", mean("new") - mean("base"), -5, inf),
        *[(f"{name}: its own frame minus the generic one, base >= 5", gain(name, "own"), 5, inf) for name in framed],
        ("probe on all train images minus zero-shot, base, suite average >= 15", mean("probe all") - mean("base"),
         15, inf),
        *[(f"{name}: probe on all train images minus zero-shot with its own template, base >= 3",
           over_own(name, "probe all"), 3, inf) for name in names],
        *[(f"{name}: 16-shot probe minus zero-shot with its own template, base >= -2", over_own(name, "probe 16"),
           -2, inf) for name in names],
        *[(f"{name}: zero-shot on augmented minus clean training views, base >= -{AUG_TOLERANCE:g}",
           rows[name]["aug"] - rows[name]["train"], -AUG_TOLERANCE, inf) for name in names],
    ]
    return [(description, value, low <= value <= high) for description, value, low, high in targets]


def world_report(model, root):
    """Print the world's report on a CLIP (the targets of the world's design, checked before any prompt method ran):
    per dataset zero-shot with GENERIC_TEMPLATE on base / new / all classes, base with the dataset's own template,
    linear probes on base with 1, 4, 16 shots and all training images; then the targets, met or not. Returns
    ({name: row}, targets)."""
    print(f"temperature (logit scale): {model.logit_scale.exp().item():.1f}  (CLIP ViT-B/16: 100)")
    rows = {name: dataset_report(model, root, name) for name in WORLD_DATASETS
            if os.path.exists(os.path.join(root, name, WORLD_SPLIT_FILES[name]))}
    probes = [f"probe {k}" for k in PROBE_SHOTS + ("all",)]
    print(f"zero-shot with {GENERIC_TEMPLATE!r} (base, new, all), with the dataset's own template (own, base), and "
          f"linear probes on the base classes (1/4/16 shots: mean of {len(PROBE_SEEDS)} draws; all: every train image)")
    print(f"zero-shot on the base classes' training images (generic template): clean (train) and through the "
          f"dataset's training augmentation (aug: RandomResizedCrop keeping >= crop_scale of the area, and flips; "
          f"mean of {len(AUG_DRAWS)} draws)")
    cols = ("base", "new", "all", "own", "train", "aug")
    print(f"{'dataset':22s} " + " ".join(f"{c:>6s}" for c in cols) + " " + " ".join(f"{p:>9s}" for p in probes)
          + "  own template")
    for name, row in rows.items():
        print(f"{name:22s} " + " ".join(f"{row[c]:6.1f}" if c in row else f"{'-':>6s}" for c in cols) + " "
              + " ".join(f"{row[p]:9.1f}" if p in row else f"{'-':>9s}" for p in probes)
              + f"  {WORLD[name].template!r}")
    suite = [rows[n] for n in SUITE if n in rows]
    if len(suite) == len(SUITE):
        print(f"{'suite average':22s} " + " ".join(f"{sum(r[k] for r in suite) / len(suite):6.1f}" for k in cols)
              + " " + " ".join(f"{sum(r[p] for r in suite) / len(suite):9.1f}" for p in probes))
        targets = report_targets(rows)
        print("targets:")
        for description, value, met in targets:
            print(f"  {'met    ' if met else 'NOT MET'}  {description}: {value:+.1f}" if "minus" in description
                  else f"  {'met    ' if met else 'NOT MET'}  {description}: {value:.1f}")
    else:
        targets = []
    return rows, targets
