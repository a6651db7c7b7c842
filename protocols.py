"""
Whole protocols of the papers, the many runs behind each table, and the tables themselves: every run is one call of
train.py's `main` with that run's flags, so a protocol is a list of runs plus a reader of their results.json files.

    python protocols.py base2new --method mpl --root $DATA --clip ViT-B/16 --output runs
    python protocols.py cross_dataset --method mpl --cross-dataset --root $DATA --clip ViT-B/16 --output runs
    python protocols.py domain_generalization --method mpl --cross-dataset --root $DATA --clip ViT-B/16 --output runs
    python protocols.py ablation --method isp --output runs       # ISP's 2 x 2 x 2 switches, base-to-new
    python protocols.py ablation --method mpl --output runs       # MPL's n_add x n_rm grid, base-to-new
    python protocols.py summary runs                              # runs/summary.md, summary.csv, summary_*.png

Every flag besides --datasets, --seeds and --output is handed to each run (see `python train.py --help`). Each run has
its own directory under --output; a finished one (results.json present) is skipped and an interrupted one resumes, so
the same command completes a protocol after a crash. Without --root or $DATA the protocols run in the mini world.

The tables follow the papers: per dataset the mean +- std over seeds of base (B) and new (N) accuracy, HM computed from
those means, the 11-dataset average as HM of the averaged B and N (not the mean of per-dataset HMs), transfer tables
averaged over the targets (the source excluded), and the published numbers of zero-shot CLIP, MaPLe and IVLP beside
ours.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

import mini_world
import rundir
import train

B2N = ["imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft",
       "sun397", "dtd", "eurosat", "ucf101"]                         # base-to-new: 11 datasets
XD_SOURCE, XD_TARGETS = "imagenet", B2N[1:]       # cross-dataset: train on ImageNet, test the other 10
DG_TARGETS = ["imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"]  # domain generalisation
# The same three protocols in the built-in mini world (no download): mini_world.py's datasets.
WORLD = dict(b2n=["mini_world"], source="mini_world", xd=["mini_world_xd"], dg=["mini_world_shift"])


def run_protocol(protocol, argv, datasets=None, seeds=(1, 2, 3), out="output", clip_model=None, targets=None,
                 poll_seconds=10):
    """Run every (dataset, seed) of a protocol with the flags `argv` (method, root, clip, ...). Each run has its own
    directory <out>/<protocol>/<method>/<dataset>/shots<K>_seed<S>/. A finished run of the same settings is skipped
    (its identity, and for a transfer run the source checkpoint it evaluated, must match); a finished run of other
    settings is an error, unless --overwrite is given, which re-runs exactly those; an interrupted one resumes. So the
    same command completes a protocol after a crash, and several copies of it (one per GPU) share the work: a run
    another process holds is left to it and collected at the end."""
    args = train.get_args(argv)
    if datasets or args.dataset:
        real = not mini_world.is_world(datasets[0] if datasets else args.dataset)
    else:  # the papers' datasets when a CoOp tree is named (--root or $DATA), else the mini world's analogues
        real = any(a == "--root" or a.startswith("--root=") for a in argv) or "DATA" in os.environ
    if clip_model is None:
        clip_model = train.load_clip(args, real)
    fingerprint = rundir.weights_fingerprint(clip_model)
    method = args.method + ("_xd" if args.cross_dataset else "")
    results, pending = [], []

    def attempt(job, wait=False):
        while True:
            try:
                return _run_once(*job, clip_model, fingerprint)
            except rundir.Locked as e:
                if not wait:
                    print(f"{e}: left to that process, collected at the end")
                    pending.append(job)
                    return None
                time.sleep(poll_seconds)

    for seed in seeds:
        if protocol == "base2new":
            for d in datasets or (B2N if real else WORLD["b2n"]):
                run_dir = os.path.join(out, "base2new", method, d, f"shots{args.shots}_seed{seed}")
                results.append(attempt((argv + ["--dataset", d, "--seed", str(seed), "--output", run_dir], run_dir,
                                        "base2new", None)))
        else:  # cross_dataset / domain_generalization: train once on the source, all classes, then transfer
            source = (datasets or [XD_SOURCE if real else WORLD["source"]])[0]
            src_dir = os.path.join(out, "source", method, source, f"shots{args.shots}_seed{seed}")
            src = attempt((argv + ["--dataset", source, "--seed", str(seed), "--subsample", "all", "--output",
                                   src_dir], src_dir, "source", None), wait=True)  # the targets need its prompts
            targets = targets or {"cross_dataset": XD_TARGETS if real else WORLD["xd"],
                                  "domain_generalization": DG_TARGETS if real else WORLD["dg"]}[protocol]
            for t in targets:
                run_dir = os.path.join(out, protocol, method, t, f"shots{args.shots}_seed{seed}")
                load = [] if args.method == "zeroshot" else \
                    ["--eval-only", "--load", os.path.join(src_dir, "checkpoint.pt")]  # the source's prompts
                job = (argv + ["--dataset", t, "--seed", str(seed), "--subsample", "all", *load, "--output", run_dir],
                       run_dir, protocol, _source_record(src, src_dir))
                results.append(attempt(job))
    for job in pending:  # runs other processes were doing: wait for them, then read (or redo) their results
        results[results.index(None)] = attempt(job, wait=True)
    return results


def _source_record(src, src_dir):
    """What a transfer result records of its source run: enough to notice when the source is retrained."""
    ckpt = os.path.join(src_dir, "checkpoint.pt")
    return dict(dataset=src["dataset"], accuracy=src["accuracy"], identity=src.get("identity"),
                checkpoint_sha256=rundir.file_sha256(ckpt) if os.path.exists(ckpt) else None)


def _run_once(argv, run_dir, protocol, source, clip_model, fingerprint):
    args = train.get_args(argv)
    expected = train.run_identity(args, clip_model, fingerprint)
    done = os.path.join(run_dir, "results.json")
    if os.path.exists(done):
        with open(done) as f:
            old = json.load(f)
        stale_source = source is not None and (old.get("source") or {}).get("checkpoint_sha256") != \
            source["checkpoint_sha256"]
        if old.get("identity") == expected and not stale_source:
            print(f"{done}: done with these settings, skipped")
            return old
        why = "its source run was retrained since" if old.get("identity") == expected else \
            f"other settings: {rundir.differences(old.get('identity') or {}, expected)}"
        if not args.overwrite:
            raise ValueError(f"{done} is a finished run of {why}. Give the flags it was run with, add --overwrite "
                             f"to re-run the runs whose settings differ, or use another --output")
        print(f"{done}: {why}; re-running it (--overwrite)")
    elif os.path.exists(os.path.join(run_dir, "checkpoint.pt")) and not args.eval_only and not args.overwrite:
        argv = argv + ["--resume"]
    extra = dict(protocol=protocol)
    if source is not None:  # a transfer result also records the run it transfers from
        extra["source"] = source
    return train.main(argv, clip_model=clip_model, extra=extra)


def ablation_grid(method, argv):
    """The ablation cells of a method: a list of (row labels, train.py flags), flags None where the cell is not a valid
    config. isp: self-structural on/off x cross-structural none/class_summaries x sample probing on/off (the row
    off/none/off is IVLP). mpl: n_add in {1, 2} x n_rm in {0, 1, 2} at the preset's n_ctx; n_rm > n_add * n_ctx is not
    a valid cell (the official code asserts that the vision sequence never shrinks)."""
    if method == "isp":
        return [((on(s), cross, on(p)), ["--isp-self" if s else "--no-isp-self", "--isp-cross", cross,
                                         "--sample-probing" if p else "--no-sample-probing"])
                for s in (False, True) for cross in ("none", "class_summaries") for p in (False, True)]
    if method == "mpl":
        n_ctx = train.method_config(train.get_args(argv)).n_ctx
        return [((str(a), str(r)), ["--n-add", str(a), "--n-rm", str(r)] if r <= a * n_ctx else None)
                for a in (1, 2) for r in (0, 1, 2)]
    raise ValueError(f"no ablation for --method {method}: give --method isp or --method mpl")


def on(flag):
    return "on" if flag else "off"


ABLATION_COLUMNS = {"isp": ("self-structural", "cross-structural", "sample probing"), "mpl": ("n_add", "n_rm")}


def run_ablation(argv, datasets=None, seeds=(1, 2, 3), out="output", clip_model=None):
    """A method's ablation grid (ablation_grid), each cell base-to-new on the same seeds and datasets, and one table
    (<out>/ablation/ablation_<method>.md) of mean +- std over seeds (then the mean over datasets) and HM of the means.
    A cell that is a preset (ISP's own; IVLP, which is ISP with every switch off) is that preset's base2new run
    (<out>/base2new/<preset>/...), shared, not re-run."""
    method = train.get_args(argv).method
    columns = ABLATION_COLUMNS[method]

    def preset(m):  # the flags of this ablation, but method m at its preset
        return train.get_args(argv + ["--method", m])

    lines = ["| " + " | ".join(columns) + " | base | new | HM |", "|" + "---|" * (len(columns) + 3)]
    for labels, flags in ablation_grid(method, argv):
        if flags is None:
            lines.append("| " + " | ".join(labels) + " | not a valid config | | |")
            continue
        # the presets whose config and recipe equal this cell's: the same config, recipe and seed compute the same run
        cell = train.get_args(argv + flags)
        computes = (train.method_config(cell), train.recipe(cell))
        same = [m for m, r in train.RECIPES.items() if r.model is train.RECIPES[method].model and
                (train.method_config(preset(m)), train.recipe(preset(m))) == computes]
        shared = method if method in same else (same[0] if same else None)
        cell_out = out if shared else os.path.join(out, "ablation", method, "_".join(
            f"{c.replace(' ', '-')}-{v}" for c, v in zip(columns, labels)))
        runs = run_protocol("base2new", argv + ["--method", shared] if shared else argv + flags, datasets, seeds,
                            cell_out, clip_model)
        by_seed = {}
        for r in runs:  # per seed the mean over datasets
            by_seed.setdefault(r["seed"], []).append(r["accuracy"])
        b = [np.mean([a["base"] for a in accs]) for accs in by_seed.values()]
        n = [np.mean([a["new"] for a in accs]) for accs in by_seed.values()]
        (bm, bs), (nm, ns) = _mean_std(b), _mean_std(n)
        shown = labels[:-1] + (labels[-1] + (f" (= {shared})" if shared else ""),)
        lines.append("| " + " | ".join(shown) + f" | {bm:.2f} ± {bs:.2f} | {nm:.2f} ± {ns:.2f} | "
                     f"{2 * bm * nm / (bm + nm):.2f} |")
    datasets_run = sorted({r["dataset"] for r in runs})
    text = (f"{method} ablation, base-to-new, {', '.join(datasets_run)}, seeds {', '.join(map(str, seeds))} "
            f"(mean +- std over seeds of the mean over datasets; HM of the means)\n\n" + "\n".join(lines))
    print(text)
    os.makedirs(os.path.join(out, "ablation"), exist_ok=True)
    with open(ablation_table_path(out, method), "w") as f:
        f.write(text + "\n")
    return text


def ablation_table_path(out, method):
    """Where run_ablation writes a method's table (markdown)."""
    return os.path.join(out, "ablation", f"ablation_{method}.md")


# Published anchors (the papers' tables; ViT-B/16, 16 shots, mean of seeds 1-3): base2new (B, N, HM), transfer accuracy.
# MPL and ISP publish no per-dataset table that could be read; IVLP only its 11-dataset average.
_B2N_CLIP = [(72.43, 68.14, 70.22), (96.84, 94.00, 95.40), (91.17, 97.26, 94.12), (63.37, 74.89, 68.65),
             (72.08, 77.80, 74.83), (90.10, 91.22, 90.66), (27.19, 36.29, 31.09), (69.36, 75.35, 72.23),
             (53.24, 59.90, 56.37), (56.48, 64.05, 60.03), (70.53, 77.50, 73.85)]
_B2N_MAPLE = [(76.66, 70.54, 73.47), (97.74, 94.36, 96.02), (95.43, 97.76, 96.58), (72.94, 74.00, 73.47),
              (95.92, 72.46, 82.56), (90.71, 92.05, 91.38), (37.44, 35.61, 36.50), (80.82, 78.70, 79.75),
              (80.36, 59.18, 68.16), (94.07, 73.23, 82.35), (83.00, 78.66, 80.77)]
ANCHORS = {
    "base2new": {"zeroshot": dict(zip(B2N, _B2N_CLIP), average=(69.34, 74.22, 71.70)),
                 "maple": dict(zip(B2N, _B2N_MAPLE), average=(82.28, 75.14, 78.55)),
                 "ivlp": dict(average=(84.21, 71.79, 77.51))},        # PromptSRC repo, IVLP 4+4 depth 9
    "cross_dataset": {"maple": dict(zip(XD_TARGETS, [93.53, 90.49, 65.57, 72.23, 86.20, 24.74, 67.01, 46.49, 48.06,
                                                     68.69]), average=66.30, imagenet=70.72)},
    "domain_generalization": {"zeroshot": dict(zip(DG_TARGETS, [60.83, 46.15, 47.77, 73.96]), average=57.18),
                              "maple": dict(zip(DG_TARGETS, [64.07, 49.15, 50.90, 76.98]), average=60.28)},
}


def _mean_std(values):
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarize(out_dir, write=True, seeds=None):
    """Read every results.json under `out_dir` and build the papers' tables: per dataset the 3-seed mean (and std)
    of B, N and HM = HM(mean B, mean N) (as MaPLe's authors compute it), the average row as HM of the averaged B and N,
    transfer tables averaged over the targets; the published anchors beside them. A dataset with fewer seeds than the
    table's seed set is shown as missing, and the average is then not computed."""
    runs = []
    for dirpath, dirnames, files in os.walk(out_dir):
        if "ablation" in dirnames:  # ISP's ablation variants have their own table (ablation.md)
            dirnames.remove("ablation")
        if "results.json" in files:
            with open(os.path.join(dirpath, "results.json")) as f:
                runs.append(json.load(f))
    seeds_expected = seeds  # every table must have these seeds (default: the union of the seeds found)
    tables, csv_rows, chart = [], ["protocol,method,dataset,metric,mean,std,seeds,published"], {}
    groups = {}
    for r in runs:
        if r.get("protocol") in ("base2new", "cross_dataset", "domain_generalization"):
            method = r["method"] + ("_xd" if r["config"]["args"].get("cross_dataset") else "") + \
                (f" ({r['shots']} shots)" if r.get("shots", 16) != 16 else "")
            groups.setdefault((r["protocol"], method), {}).setdefault(r["dataset"], {})[r["seed"]] = r["accuracy"]
    for (protocol, method), by_dataset in sorted(groups.items()):
        seeds = sorted(set(seeds_expected or []) | {s for d in by_dataset.values() for s in d})
        anchors = ANCHORS[protocol].get(method.removesuffix("_xd"), {}) if " shots" not in method else {}
        order = [d for d in B2N + DG_TARGETS if d in by_dataset] + sorted(d for d in by_dataset
                                                                           if d not in B2N + DG_TARGETS)
        metrics = ["base", "new", "hm"] if protocol == "base2new" else ["all"]
        lines = [f"### {protocol}: {method} (seeds {', '.join(map(str, seeds))})", "",
                 "| dataset | " + " | ".join(m.upper() if m != "all" else "accuracy" for m in metrics) +
                 " | published | difference |", "|---" * (len(metrics) + 3) + "|"]
        means, complete = {}, True
        for d in order:
            missing = [s for s in seeds if s not in by_dataset[d]]
            pub = anchors.get(d)
            if missing:
                complete = False
                lines.append(f"| {d} | " + " | ".join(["missing seed " + ", ".join(map(str, missing))] * len(metrics))
                             + f" | {_fmt_pub(pub)} | |")
                continue
            cells, m = [], {}
            for k in metrics:
                if k == "hm":  # HM of the seed-averaged B and N, not the mean of per-seed HMs
                    m[k] = 2 * m["base"] * m["new"] / (m["base"] + m["new"]) if m["base"] + m["new"] else 0.0
                    sd = None
                else:
                    m[k], sd = _mean_std([by_dataset[d][s][k] for s in seeds])
                cells.append(f"{m[k]:.2f}" + (f" ± {sd:.2f}" if sd is not None else ""))
                csv_rows.append(f"{protocol},{method},{d},{k},{m[k]:.4f},{'' if sd is None else f'{sd:.4f}'},"
                                f"{len(seeds)},{'' if pub is None else (pub if not isinstance(pub, tuple) else pub[metrics.index(k)])}")
            means[d] = m
            lines.append(f"| {d} | " + " | ".join(cells) + f" | {_fmt_pub(pub)} | {_diff(m[metrics[-1]], pub)} |")
            chart.setdefault(protocol, {}).setdefault(method, {})[d] = m[metrics[-1]]
        if complete and means:
            if protocol == "base2new":
                b, n = np.mean([m["base"] for m in means.values()]), np.mean([m["new"] for m in means.values()])
                avg = dict(base=b, new=n, hm=2 * b * n / (b + n) if b + n else 0.0)
            else:
                avg = dict(all=float(np.mean([m["all"] for m in means.values()])))
            pub = anchors.get("average") if len(means) == (len(B2N) if protocol == "base2new" else
                                                           len(XD_TARGETS if protocol == "cross_dataset" else
                                                               DG_TARGETS)) else None
            lines.append(f"| **average ({len(means)})** | " + " | ".join(f"{avg[k]:.2f}" for k in metrics) +
                         f" | {_fmt_pub(pub)} | {_diff(avg[metrics[-1]], pub)} |")
        else:
            lines.append("| **average** | " + " | ".join(["incomplete"] * len(metrics)) + " | | |")
        tables.append("\n".join(lines))
    text = "\n\n".join(tables) if tables else f"no protocol results.json under {out_dir}"
    print(text)
    if write and tables:
        for name, content in (("summary.md", text + "\n"), ("summary.csv", "\n".join(csv_rows) + "\n")):
            with open(os.path.join(out_dir, name), "w") as f:
                f.write(content)
        for protocol, by_method in chart.items():
            _bar_chart(by_method, os.path.join(out_dir, f"summary_{protocol}.png"),
                       "HM (%)" if protocol == "base2new" else "accuracy (%)", protocol)
    return text


def _fmt_pub(pub):
    if pub is None:
        return ""
    return " / ".join(f"{v:.2f}" for v in pub) if isinstance(pub, tuple) else f"{pub:.2f}"


def _diff(value, pub):
    if pub is None:
        return ""
    return f"{value - (pub[-1] if isinstance(pub, tuple) else pub):+.2f}"


def _bar_chart(chart, path, ylabel, title):
    """HM (base2new) or accuracy (transfer) per dataset per method, one chart per protocol; matplotlib is optional."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no bar chart (pip install matplotlib)")
        return
    datasets = sorted({d for v in chart.values() for d in v})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(datasets)), 4))
    width = 0.8 / max(1, len(chart))
    for i, (method, values) in enumerate(sorted(chart.items())):
        ax.bar([j + i * width for j in range(len(datasets))], [values.get(d, 0) for d in datasets], width,
               label=method)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(datasets))], datasets, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("protocol", choices=["base2new", "cross_dataset", "domain_generalization", "ablation", "summary"])
    p.add_argument("dir", nargs="?", default=None, help="summary: the folder of results.json files to tabulate")
    p.add_argument("--datasets", nargs="+", default=None, help="base2new: the datasets (default: the papers' 11, or "
                   "the mini world without $DATA); transfer: the source (default imagenet)")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="default 1 2 3")
    p.add_argument("--output", default="output", help="root folder of the protocol's runs and tables")
    args, run_flags = p.parse_known_args(argv)  # everything else goes to each run, as train.py flags
    if args.protocol == "summary":
        summarize(args.dir or args.output, seeds=args.seeds)
    elif args.protocol == "ablation":
        if train.get_args(run_flags).method not in ABLATION_COLUMNS:
            p.error("ablation switches a method's modules: give --method isp (2 x 2 x 2) or --method mpl (add/remove)")
        run_ablation(run_flags, args.datasets, args.seeds, args.output)
    else:
        run_protocol(args.protocol, run_flags, args.datasets, args.seeds, args.output)
        summarize(args.output, seeds=args.seeds)


if __name__ == "__main__":
    main(sys.argv[1:])
