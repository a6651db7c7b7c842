"""
Whole protocols of the papers, the many runs behind each table, and the tables themselves: every run is one call of
train.py's `main` with that run's flags, so a protocol is a list of runs plus a reader of their results.json files.

    python -m tools.protocols base2new --method mpl --root $DATA --clip ViT-B/16 --output runs
    python -m tools.protocols cross_dataset --method mpl --cross-dataset --root $DATA --clip ViT-B/16 --output runs
    python -m tools.protocols domain_generalization --method mpl --cross-dataset --root $DATA --clip ViT-B/16 \\
        --output runs
    python -m tools.protocols ablation --method isp --output runs       # ISP's 2 x 2 x 2 switches, base-to-new
    python -m tools.protocols ablation --method mpl --output runs       # MPL's n_add x n_rm grid, base-to-new
    python -m tools.protocols summary runs                              # runs/summary.md, summary.csv, summary_*.png

Every flag besides --datasets, --seeds and --output is handed to each run (see `python train.py --help`). Each run has
its own directory under --output; a finished one (results.json present) is skipped and an interrupted one resumes, so
the same command completes a protocol after a crash. Without --root or --datasets the protocols run in the mini world
(drawn under $DATA if set, else data: $DATA, as in every program here, is only --root's default).

The tables follow the papers: one per protocol, the methods side by side; per dataset the mean +- std over seeds of
base (B) and new (N) accuracy, HM computed from those means, the 11-dataset average as HM of the averaged B and N (not
the mean of per-dataset HMs), transfer tables averaged over the targets (the source run's accuracy a row of its own),
and the published numbers of zero-shot CLIP, MaPLe and IVLP beside ours.
"""
import argparse
import json
import math
import os
import re
import shlex
import sys
import time

import numpy as np

import data
from engine import cli
from engine import inputs
from engine import rundir
import train

B2N = ["imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft",
       "sun397", "dtd", "eurosat", "ucf101"]                         # base-to-new: 11 datasets
XD_SOURCE, XD_TARGETS = "imagenet", B2N[1:]       # cross-dataset: train on ImageNet, test the other 10
DG_TARGETS = ["imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"]  # domain generalisation
# The same three protocols in the built-in mini world (no download): its suite of four base-to-new datasets
# (generic, fine-grained, texture, satellite: world/mini_world.py), its cross-dataset target and its domain-shift
# target.
WORLD = dict(b2n=["mini_world", "mini_world_fine", "mini_world_texture", "mini_world_satellite"],
             source="mini_world", xd=["mini_world_xd"], dg=["mini_world_shift"])


def papers_datasets(argv, datasets=None, dataset=None):
    """True when a protocol runs the papers' datasets: those named (--datasets), or, with none named, when --root is
    given on the command line (a CoOp tree). $DATA alone chooses nothing: like train.py, a protocol without --root or
    --datasets runs the mini world's analogues, drawn under --root's default ($DATA if set, else data)."""
    if datasets or dataset:
        return not data.is_world(datasets[0] if datasets else dataset)
    return any(a == "--root" or a.startswith("--root=") for a in argv)


def run_protocol(protocol, argv, datasets=None, seeds=(1, 2, 3), out="output", clip_model=None, targets=None,
                 poll_seconds=10):
    """Run every (dataset, seed) of a protocol with the flags `argv` (method, root, clip, ...). Each run has its own
    directory <out>/<protocol>/<method>/<dataset>/shots<K>_seed<S>/. A finished run of the same settings is skipped
    (its identity, and for a transfer run the source checkpoint it evaluated, must match); a finished run of other
    settings is an error, unless --overwrite is given, which re-runs exactly those; an interrupted one resumes. So the
    same command completes a protocol after a crash, and several copies of it (one per GPU) share the work: a run
    another process holds is left to it and collected at the end."""
    args = train.get_args(argv)
    for name in list(datasets or []) + list(targets or []):  # a misspelt name fails now, before CLIP is loaded
        inputs.check_dataset_name(name)
    real = papers_datasets(argv, datasets, args.dataset)
    if clip_model is None:
        clip_model = inputs.clip_for(args, (datasets or [B2N[0] if real else WORLD["source"]])[0])
    fingerprint = rundir.weights_fingerprint(clip_model)
    method = args.method + ("_xd" if args.cross_dataset else "")
    results, pending = [], []

    def attempt(job, wait=False):
        waiting = rundir.LockWait()  # says what it waits for; gives up when the holder shows no sign of life
        while True:
            try:
                return _run_once(*job, clip_model, fingerprint)
            except rundir.Locked as e:
                if not wait:
                    print(f"{e}: left to that process, collected at the end")
                    pending.append(job)
                    return None
                waiting.check(e)
                time.sleep(poll_seconds)

    for seed in seeds:
        if protocol == "base2new":
            for d in datasets or (B2N if real else WORLD["b2n"]):
                run_dir = run_path(out, "base2new", method, inputs.name_of(d), args.shots, seed)
                results.append(attempt((argv + ["--dataset", d, "--seed", str(seed), "--output", run_dir], run_dir,
                                        "base2new", None)))
        else:  # cross_dataset / domain_generalization: train once on the source, all classes, then transfer
            source = (datasets or [XD_SOURCE if real else WORLD["source"]])[0]
            src_dir = run_path(out, "source", method, inputs.name_of(source), args.shots, seed)
            src = attempt((argv + ["--dataset", source, "--seed", str(seed), "--subsample", "all", "--output",
                                   src_dir], src_dir, "source", None), wait=True)  # the targets need its prompts
            targets = targets or {"cross_dataset": XD_TARGETS if real else WORLD["xd"],
                                  "domain_generalization": DG_TARGETS if real else WORLD["dg"]}[protocol]
            for t in targets:
                run_dir = run_path(out, protocol, method, inputs.name_of(t), args.shots, seed)
                load = [] if args.method == "zeroshot" else \
                    ["--eval-only", "--load", os.path.join(src_dir, "checkpoint.pt")]  # the source's prompts
                job = (argv + ["--dataset", t, "--seed", str(seed), "--subsample", "all", *load, "--output", run_dir],
                       run_dir, protocol, _source_record(src, src_dir))
                results.append(attempt(job))
    for job in pending:  # runs other processes were doing: wait for them, then read (or redo) their results
        results[results.index(None)] = attempt(job, wait=True)
    return results


def pending_commands(protocol, argv, datasets=None, seeds=(1, 2, 3), out="output"):
    """--list: the runs of a protocol without results.json yet, as commands of this program, one a line: a
    base-to-new run per (dataset, seed); a transfer protocol per seed (its source run, then its targets). Each is
    this protocol narrowed by --datasets and --seeds, so a scheduler may run them in any order and at once (the run
    directories' locks and identities keep that safe)."""
    args = train.get_args(argv)
    real = papers_datasets(argv, datasets, args.dataset)
    method = args.method + ("_xd" if args.cross_dataset else "")
    finished = lambda run_dir: os.path.exists(os.path.join(run_dir, "results.json"))  # noqa: E731
    commands = []
    for seed in seeds:
        if protocol == "base2new":
            units = [(d, [run_path(out, "base2new", method, inputs.name_of(d), args.shots, seed)])
                     for d in datasets or (B2N if real else WORLD["b2n"])]
        else:
            source = (datasets or [XD_SOURCE if real else WORLD["source"]])[0]
            targets = {"cross_dataset": XD_TARGETS if real else WORLD["xd"],
                       "domain_generalization": DG_TARGETS if real else WORLD["dg"]}[protocol]
            units = [(source, [run_path(out, "source", method, inputs.name_of(source), args.shots, seed)] +
                      [run_path(out, protocol, method, inputs.name_of(t), args.shots, seed) for t in targets])]
        for dataset, run_dirs in units:
            if not all(finished(r) for r in run_dirs):
                words = ["python", "-m", "tools.protocols", protocol, *argv, "--datasets", dataset, "--seeds", str(seed),
                         "--output", out]
                commands.append(shlex.join(one_line(words)))
    return commands


def one_line(words):
    """--list prints one command a line, and schedulers run each line (GNU parallel, `sed -n ${ID}p` in a SLURM
    array): a value with a newline in it (or any control character) would make two lines and run the second as a
    command, so it is refused, naming it. shlex.join quotes everything else (spaces, $, quotes, ;)."""
    for i, word in enumerate(words):
        if not word.isprintable():
            flag = next((w for w in reversed(words[:i]) if w.startswith("--")), "a value")
            raise ValueError(f"--list: {flag} {word!r} holds a control character (a newline?), and a listed command "
                             f"must be one line; rename it")
    return words


def run_path(out, protocol, method, dataset, shots, seed):
    """The protocols' layout: the directory of one run (method: --method, with "_xd" for --cross-dataset). summarize
    reads exactly these directories."""
    return os.path.join(out, protocol, method, dataset, f"shots{shots}_seed{seed}")


def _source_record(src, src_dir):
    """What a transfer result records of its source run: enough to notice when the source is retrained."""
    ckpt = os.path.join(src_dir, "checkpoint.pt")
    return dict(dataset=src["dataset"], accuracy=src["accuracy"], identity=src.get("identity"),
                checkpoint_sha256=rundir.file_sha256(ckpt) if os.path.exists(ckpt) else None)


def _run_once(argv, run_dir, protocol, source, clip_model, fingerprint):
    args = train.get_args(argv)
    done = os.path.join(run_dir, "results.json")
    if os.path.exists(done):
        old, problem = read_results(done)
        if problem is not None:  # cut short, edited, not ours: nothing to compare
            if not args.overwrite:
                raise ValueError(f"{done} {problem}: it is not a finished run this protocol can read. Move it away, "
                                 f"or add --overwrite to run it again")
            print(f"{done} {problem}; re-running it (--overwrite)")
        else:
            expected = train.run_identity(args, clip_model, fingerprint)
            stale_source = source is not None and (old.get("source") or {}).get("checkpoint_sha256") != \
                source["checkpoint_sha256"]
            if old.get("identity") == expected and not stale_source:
                print(f"{done}: done with these settings, skipped")
                return old
            why = "its source run was retrained since" if old.get("identity") == expected else \
                f"other settings: {rundir.differences(old.get('identity') or {}, expected)}"
            if not args.overwrite:
                raise ValueError(f"{done} is a finished run of {why}. Give the flags it was run with, add "
                                 f"--overwrite to re-run the runs whose settings differ, or use another --output")
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


def ablation_cells(argv, out="output"):
    """The runs of a method's ablation grid (ablation_grid): per cell (row labels, the train.py flags of its
    base-to-new runs, the --output they go to, the preset it is or None); flags None where the cell is not a valid
    config. A cell that is a preset (ISP's own; IVLP, which is ISP with every switch off) is that preset's base2new
    run (<out>/base2new/<preset>/...), shared, not re-run."""
    method = train.get_args(argv).method
    columns = ABLATION_COLUMNS[method]

    def preset(m):  # the flags of this ablation, but method m at its preset
        return train.get_args(argv + ["--method", m])

    cells = []
    for labels, flags in ablation_grid(method, argv):
        if flags is None:
            cells.append((labels, None, None, None))
            continue
        # the presets whose config and recipe equal this cell's: the same config, recipe and seed compute the same run
        cell = train.get_args(argv + flags)
        computes = (train.method_config(cell), train.recipe(cell))
        same = [m for m, r in train.RECIPES.items() if r.model is train.RECIPES[method].model and
                (train.method_config(preset(m)), train.recipe(preset(m))) == computes]
        shared = method if method in same else (same[0] if same else None)
        cell_out = out if shared else os.path.join(out, "ablation", method, "_".join(
            f"{c.replace(' ', '-')}-{v}" for c, v in zip(columns, labels)))
        cells.append((labels, argv + ["--method", shared] if shared else argv + flags, cell_out, shared))
    return cells


def run_ablation(argv, datasets=None, seeds=(1, 2, 3), out="output", clip_model=None):
    """A method's ablation grid (ablation_cells), each cell base-to-new on the same seeds and datasets, and one table
    (<out>/ablation/ablation_<method>.md) of mean +- std over seeds (then the mean over datasets) and HM of the
    means."""
    method = train.get_args(argv).method
    columns = ABLATION_COLUMNS[method]
    lines = ["| " + " | ".join(columns) + " | base | new | HM |", "|" + "---|" * (len(columns) + 3)]
    for labels, run_argv, cell_out, shared in ablation_cells(argv, out):
        if run_argv is None:
            lines.append("| " + " | ".join(labels) + " | not a valid config | | |")
            continue
        runs = run_protocol("base2new", run_argv, datasets, seeds, cell_out, clip_model)
        by_seed = {}
        for r in runs:  # per seed the mean over datasets
            by_seed.setdefault(r["seed"], []).append(r["accuracy"])
        b = [np.mean([a["base"] for a in accs]) for accs in by_seed.values()]
        n = [np.mean([a["new"] for a in accs]) for accs in by_seed.values()]
        (bm, bs), (nm, ns) = _mean_std(b), _mean_std(n)
        shown = labels[:-1] + (labels[-1] + (f" (= {shared})" if shared else ""),)
        lines.append("| " + " | ".join(shown) + f" | {bm:.2f} ± {bs:.2f} | {nm:.2f} ± {ns:.2f} | "
                     f"{train.hm(bm, nm):.2f} |")
    datasets_run = sorted({r["dataset"] for r in runs})
    text = (f"{method} ablation, base-to-new, {', '.join(datasets_run)}, seeds {', '.join(map(str, seeds))} "
            f"(mean +- std over seeds of the mean over datasets; HM of the means)\n\n" + "\n".join(lines))
    print(text)
    os.makedirs(os.path.join(out, "ablation"), exist_ok=True)
    rundir.atomic_save((text + "\n").encode(), ablation_table_path(out, method), lambda b, f: f.write(b))
    print(f"wrote {ablation_table_path(out, method)}")
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
    "domain_generalization": {"zeroshot": dict(zip(DG_TARGETS, [60.83, 46.15, 47.77, 73.96]), average=57.18,
                                               imagenet=66.73),
                              "maple": dict(zip(DG_TARGETS, [64.07, 49.15, 50.90, 76.98]), average=60.28,
                                            imagenet=70.72)},
}


def _mean_std(values):
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _spread(values):
    """The mean and the std over seeds, None for the std of a single seed (nothing to show)."""
    mean, sd = _mean_std(values)
    return mean, sd if len(values) > 1 else None


TABLED = ("base2new", "cross_dataset", "domain_generalization")  # the protocols with a table; "source" has none
METRICS = {"base2new": ("base", "new"), "cross_dataset": ("all",), "domain_generalization": ("all",)}
RUN_DIR = re.compile(r"shots(\d+)_seed(\d+)")
# identity entries that differ between the seeds of one row by design (a transfer run loads its own seed's source)
PER_SEED = ("seed", "load")


class SummaryError(ValueError):
    """results.json files the summary cannot tabulate, each named with what is wrong with it."""


def read_results(path):
    """(the dict of a results.json, None), or (None, what is wrong with the file) for one that cannot be used."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        return None, f"cannot be read ({e.strerror or e})"
    if not raw.strip():
        return None, "is empty"
    try:
        results = json.loads(raw)
    except (ValueError, RecursionError) as e:
        return None, f"is not valid JSON ({type(e).__name__}: {e})"
    if not isinstance(results, dict):
        return None, f"holds a {type(results).__name__}, not the dict of results train.py writes"
    return results, None


def _shown(value):
    return json.dumps(value) if isinstance(value, float) else repr(value)  # NaN, Infinity as JSON writes them


def _mismatch(r, protocol, method_dir, dataset_dir, shots, seed):
    """What is wrong with results `r` read from the run directory <protocol>/<method_dir>/<dataset_dir>/
    shots<shots>_seed<seed>, or None: fields missing, a run of another directory (copied there?), accuracies that are
    not percentages."""
    for key in ("protocol", "method", "dataset", "seed", "shots", "accuracy", "config"):
        if key not in r:
            return f"has no {key!r}: it is not a results.json that train.py writes"
    if not isinstance(r["config"], dict) or not isinstance(r["config"].get("args"), dict):
        return "has a 'config' without the run's flags ('args'): it is not a results.json that train.py writes"
    if not isinstance(r["accuracy"], dict):
        return f"has an 'accuracy' that is a {type(r['accuracy']).__name__}, not a dict of accuracies"
    xd = "_xd" if r["config"]["args"].get("cross_dataset") else ""
    said = [("protocol", r["protocol"], protocol), ("method", f"{r['method']}{xd}", method_dir),
            ("seed", r["seed"], seed), ("shots", r["shots"], shots)]
    if r["dataset"] != _dataset_key(dataset_dir):
        said.append(("dataset", r["dataset"], dataset_dir))
    for what, value, expected in said:
        if value != expected or type(value) is not type(expected):
            return f"says {what} {value!r}, but its directory says {expected!r}" if what != "seed" else \
                f"says seed {value!r}, but its directory says seed {expected}"
    ident = r.get("identity")
    if ident is not None:
        if not isinstance(ident, dict):
            return f"has an 'identity' that is a {type(ident).__name__}, not the dict train.py writes"
        expected = dict(method=r["method"], dataset=dataset_dir, seed=seed, shots=shots, cross_dataset=bool(xd))
        wrong = [f"{k} {ident[k]!r}" for k, v in expected.items() if k in ident and ident[k] != v]
        if wrong:
            return f"holds the run of another directory: its identity says {', '.join(wrong)}"
    for k in METRICS[protocol]:
        v = r["accuracy"].get(k)
        if k not in r["accuracy"]:
            return f"has no {k!r} accuracy (a {protocol} run has {', '.join(map(repr, METRICS[protocol]))})"
        if type(v) not in (int, float) or not math.isfinite(v) or not 0 <= v <= 100:
            return f"has the {k!r} accuracy {_shown(v)}, not a percentage in [0, 100]"
    return None


def _dataset_key(name):
    """The dataset a run directory names, as results.json records it (--dataset EuroSAT runs eurosat)."""
    try:
        return name if data.is_world(name) else data.resolve_name(name)
    except (KeyError, ValueError):
        return name


def _layout_runs(out_dir):
    """The results.json of the protocols' run directories under out_dir ({path: (protocol, method, dataset, shots,
    seed)}, run_path's layout), and those found anywhere else (backups, earlier tries), which are not read. The
    ablation's own runs (<out_dir>/ablation/) have their own table."""
    runs, elsewhere = {}, []
    for dirpath, dirnames, files in os.walk(out_dir):
        dirnames.sort()
        rel = os.path.relpath(dirpath, out_dir)
        parts = [] if rel == "." else rel.split(os.sep)
        if not parts and "ablation" in dirnames:
            dirnames.remove("ablation")
        if "results.json" not in files:
            continue
        path = os.path.join(dirpath, "results.json")
        match = len(parts) == 4 and RUN_DIR.fullmatch(parts[3])
        if match and parts[0] in TABLED:
            runs[path] = (parts[0], parts[1], parts[2], int(match[1]), int(match[2]))
        elif not (match and parts[0] == "source"):  # a transfer protocol's source run: no table of its own
            elsewhere.append(path)
    return runs, elsewhere


def _read_protocol_runs(out_dir):
    """{(protocol, method): {dataset: {seed: accuracy}}} of the run directories under out_dir, and what transfer
    runs record of their source ({(protocol, method): {seed: (source dataset, its accuracy or None)}}). Every file
    that cannot be tabulated as it is (malformed, not the run of its directory, one run in two directories, seeds of
    one row run with other settings) is collected, and then all of them are refused at once, by path."""
    runs, elsewhere = _layout_runs(out_dir)
    if elsewhere:
        print(f"ignored {len(elsewhere)} results.json outside the protocols' run directories "
              f"(<protocol>/<method>/<dataset>/shots<K>_seed<S>/ under {out_dir}), not read:")
        for path in elsewhere:
            print(f"  {path}")
    groups, sources, problems, rows = {}, {}, [], {}
    for path, (protocol, method_dir, dataset_dir, shots, seed) in sorted(runs.items()):
        r, problem = read_results(path)
        problem = problem or _mismatch(r, protocol, method_dir, dataset_dir, shots, seed)
        if problem:
            problems.append(f"{path} {problem}")
            continue
        method = method_dir + (f" ({shots} shots)" if shots != 16 else "")
        row = rows.setdefault((protocol, method, r["dataset"]), {})
        if seed in row:
            problems.append(f"{row[seed][0]} and {path} are the same run ({protocol}, {method}, {r['dataset']}, "
                            f"seed {seed}) in two directories: move one of them out of {out_dir}")
            continue
        row[seed] = (path, r.get("identity"))
        groups.setdefault((protocol, method), {}).setdefault(r["dataset"], {})[seed] = r["accuracy"]
        src = r.get("source")
        if isinstance(src, dict) and isinstance(src.get("accuracy"), dict):  # a transfer run's source: one per seed
            acc = src["accuracy"].get("all")
            ok = type(acc) in (int, float) and math.isfinite(acc) and 0 <= acc <= 100
            sources.setdefault((protocol, method), {})[seed] = (str(src.get("dataset")), acc if ok else None)
    for row in rows.values():  # the seeds of one row: the same settings, seed aside
        (first, (path0, ident0)), *others = sorted(row.items())
        for seed, (path, ident) in others:
            if ident0 is None or ident is None:
                continue
            a, b = ({k: v for k, v in i.items() if k not in PER_SEED} for i in (ident0, ident))
            if a != b:
                diff = "; ".join(f"{k}: {_shown(a.get(k))} in seed {first}, {_shown(b.get(k))} in seed {seed}"
                                 for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
                problems.append(f"{path} is a run of other settings ({diff}) than {path0}: re-run one of them "
                                f"with the other's flags (python -m tools.protocols ... --overwrite)")
    if problems:
        raise SummaryError(f"{len(problems)} results.json under {out_dir} cannot be tabulated; nothing was written "
                           f"(the previous summary, if any, is kept):\n  " + "\n  ".join(problems))
    return groups, sources


def summarize(out_dir, write=True, seeds=None):
    """Read the results.json of the protocols' run directories under `out_dir` (run_path's layout; files anywhere
    else are listed and ignored, files that cannot be tabulated are refused by path: SummaryError) and build the
    papers' tables, one per protocol: rows the datasets and the average, columns per method B, N and HM (base2new) or
    the accuracy (transfer), each the mean ± std over seeds (the mean alone for one seed), HM = HM(mean B, mean N) (as
    MaPLe's authors compute it), the average row as HM of the averaged B and N, transfer tables averaged over the
    targets with the source run's accuracy as a row of its own; the published numbers beside them, or a note saying
    why there are none. `seeds`: the seeds every table must have (a list), or per protocol ({protocol: list});
    default: the seeds found. A dataset with fewer seeds than its method's is shown as missing, and that method's
    average is then not computed. summary.md, summary.csv and the charts are written atomically."""
    groups, sources = _read_protocol_runs(out_dir)
    if not groups:
        raise SummaryError(f"no protocol results under {out_dir}: expected <protocol>/<method>/<dataset>/"
                           f"shots<K>_seed<S>/results.json there, the --output of protocols.py")
    tables, csv_rows, chart = [], ["protocol,method,dataset,metric,mean,std,seeds,published"], {}
    for protocol in TABLED:
        methods = {m: by_dataset for (p, m), by_dataset in sorted(groups.items(), key=lambda g: (
            g[0][0], not g[0][1].startswith("zeroshot"), g[0][1])) if p == protocol}  # zero-shot CLIP first
        if methods:
            expected = seeds.get(protocol) if isinstance(seeds, dict) else seeds
            table = _protocol_table(protocol, methods, sources, expected, csv_rows)
            tables.append(table["text"])
            chart[protocol] = table["chart"]
    text = "\n\n".join(tables)
    print(text)
    if write:
        for name, content in (("summary.md", text + "\n"), ("summary.csv", "\n".join(csv_rows) + "\n")):
            rundir.atomic_save(content.encode(), os.path.join(out_dir, name), lambda b, f: f.write(b))
        for protocol, by_method in chart.items():
            _bar_chart(by_method, os.path.join(out_dir, f"summary_{protocol}.png"), protocol)
        charts = [f"summary_{p}.png" for p in chart if os.path.exists(os.path.join(out_dir, f"summary_{p}.png"))]
        print(f"wrote {', '.join(['summary.md', 'summary.csv'] + charts)} in {out_dir}")
    return text


def _cell(mean, sd):
    """A table cell: the mean, and ± the std when there is a spread to show (more than one seed)."""
    return f"{mean:.2f}" + (f" ± {sd:.2f}" if sd is not None else "")


def _no_published(method, datasets, anchors):
    """Why a method's column group has no published numbers beside it."""
    if " shots" in method:
        return f"{method}: no published numbers (the papers' numbers are 16-shot runs)"
    if all(data.is_world(d) for d in datasets):
        return f"{method}: no published numbers for the mini world (its numbers are not comparable to the papers')"
    if not anchors:
        return f"{method}: no published numbers (only zero-shot CLIP, MaPLe and IVLP's are stored: ANCHORS)"
    return f"{method}: no published numbers for these datasets"


def _protocol_table(protocol, methods, sources, expected, csv_rows):
    """One protocol's table in markdown ("text") and its CSV rows (appended to csv_rows), and the chart's values
    ({method: {dataset: {metric: (mean, std)}}}, "chart"). methods: {method: {dataset: {seed: accuracy}}}."""
    metrics = ["base", "new", "hm"] if protocol == "base2new" else ["all"]
    names = {"base": "B", "new": "N", "hm": "HM", "all": "accuracy"}
    all_datasets = {d for by_dataset in methods.values() for d in by_dataset}
    order = [d for d in B2N + DG_TARGETS if d in all_datasets] + sorted(all_datasets - set(B2N + DG_TARGETS))
    full = len(B2N) if protocol == "base2new" else len(XD_TARGETS if protocol == "cross_dataset" else DG_TARGETS)
    headings, header, notes, chart = [], ["dataset"], [], {}
    source_names = sorted({src for m in methods for src, _ in sources.get((protocol, m), {}).values() if src})
    rows = {name: [] for name in [f"{s} (source)" for s in source_names] + order + ["**average**"]}
    for method, by_dataset in methods.items():
        found = sorted({s for d in by_dataset.values() for s in d})
        table_seeds = sorted(set(expected or []) | set(found))
        headings.append(f"{method} (seeds {', '.join(map(str, table_seeds))}" +
                        ("" if found == table_seeds else f"; found {', '.join(map(str, found))}") + ")")
        anchors = ANCHORS[protocol].get(method.removesuffix("_xd"), {}) if " shots" not in method else {}
        pub_of = {d: anchors.get(d) for d in order}
        pub_of.update({f"{s} (source)": anchors.get(s) for s in source_names})
        src_seeds = sources.get((protocol, method), {})
        cells, means = {}, {}
        for src in source_names:  # the source run's accuracy, as the transfer runs of each seed record it
            name = f"{src} (source)"
            of_seed = {seed: acc for seed, (n, acc) in src_seeds.items() if n == src and acc is not None}
            missing = [seed for seed in table_seeds if seed not in of_seed]
            if missing:
                cells[name] = ["missing seed " + ", ".join(map(str, missing)) if of_seed else "-"], None
                continue
            mean, sd = _spread([of_seed[seed] for seed in table_seeds])
            cells[name] = [_cell(mean, sd)], mean
            chart.setdefault(method, {})[name] = {"all": (mean, sd)}
            csv_rows.append(f"{protocol},{method},{name},all,{mean:.4f},{'' if sd is None else f'{sd:.4f}'},"
                            f"{len(table_seeds)},{'' if anchors.get(src) is None else anchors[src]}")
        for d in order:
            if d not in by_dataset:
                cells[d] = ["not run"] * len(metrics), None
                continue
            missing = [s for s in table_seeds if s not in by_dataset[d]]
            if missing:
                cells[d] = ["missing seed " + ", ".join(map(str, missing))] * len(metrics), None
                continue
            m, shown = {}, []
            for k in metrics:
                if k == "hm":  # HM of the seed-averaged B and N, not the mean of per-seed HMs
                    m[k], sd = 2 * m["base"] * m["new"] / (m["base"] + m["new"]) if m["base"] + m["new"] else 0.0, None
                else:
                    m[k], sd = _spread([by_dataset[d][s][k] for s in table_seeds])
                shown.append(_cell(m[k], sd))
                pub = pub_of[d]
                published = "" if pub is None else pub if not isinstance(pub, tuple) else pub[metrics.index(k)]
                csv_rows.append(f"{protocol},{method},{d},{k},{m[k]:.4f},{'' if sd is None else f'{sd:.4f}'},"
                                f"{len(table_seeds)},{published}")
                chart.setdefault(method, {}).setdefault(d, {})[k] = (m[k], sd)
            means[d] = m
            cells[d] = shown, m[metrics[-1]]
        if len(order) > 1:
            if len(means) == len(order):
                if protocol == "base2new":
                    b, n = np.mean([m["base"] for m in means.values()]), np.mean([m["new"] for m in means.values()])
                    avg = dict(base=b, new=n, hm=train.hm(b, n))
                else:
                    avg = dict(all=float(np.mean([m["all"] for m in means.values()])))
                pub_of["**average**"] = anchors.get("average") if len(means) == full else None
                for k in metrics:
                    pub = pub_of["**average**"]
                    published = "" if pub is None else pub if not isinstance(pub, tuple) else pub[metrics.index(k)]
                    csv_rows.append(f"{protocol},{method},average,{k},{avg[k]:.4f},,{len(table_seeds)},{published}")
                cells["**average**"] = [f"{avg[k]:.2f}" for k in metrics], avg[metrics[-1]]
                chart.setdefault(method, {})["average"] = {k: (avg[k], None) for k in metrics}
            else:
                cells["**average**"] = ["incomplete"] * len(metrics), None
        header += [f"{method} {names[k]}" for k in metrics]
        with_pub = any(pub_of.get(name) is not None for name in rows)
        if with_pub:
            header += [f"{method} published" + (" B / N / HM" if protocol == "base2new" else ""),
                       f"{method} {'HM ' if protocol == 'base2new' else ''}difference"]
        else:
            notes.append(_no_published(method, order, anchors))
        if with_pub and len(order) > 1 and pub_of.get("**average**") is None and "average" in anchors:
            notes.append(f"{method}: the published average is over the papers' {full} datasets, shown when all are "
                         f"in the table")
        for name in rows:
            shown, value = cells.get(name, ([""] * len(metrics), None))
            rows[name] += shown
            if with_pub:
                pub = pub_of.get(name)
                rows[name] += [_fmt_pub(pub), "" if value is None else _diff(value, pub)]
    lines = [f"### {protocol}: " + ", ".join(headings), "", "| " + " | ".join(header) + " |",
             "|---" * len(header) + "|"]
    lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows.items() if name != "**average**" or
              len(order) > 1]
    if notes:
        lines += [""] + [f"- {note}" for note in notes]
    return dict(text="\n".join(lines), chart=chart)


def _fmt_pub(pub):
    if pub is None:
        return ""
    return " / ".join(f"{v:.2f}" for v in pub) if isinstance(pub, tuple) else f"{pub:.2f}"


def _diff(value, pub):
    if pub is None:
        return ""
    return f"{value - (pub[-1] if isinstance(pub, tuple) else pub):+.2f}"


def _bar_chart(chart, path, title):
    """One protocol's chart: per dataset (and the average) a bar per method with its value and the spread over seeds
    (± std, where there are several seeds), one panel each for B, N and HM (base2new) or the accuracy (transfer).
    The bars start at 0, so that their heights compare; each carries its value. chart: {method: {dataset: {metric: (mean, std or None)}}}. matplotlib is
    optional."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (pip install matplotlib)")
        return
    rows = list(dict.fromkeys(d for values in chart.values() for d in values))
    metrics = [k for k in ("base", "new", "hm", "all") if any(k in v for values in chart.values()
                                                              for v in values.values())]
    names = {"base": "base (B)", "new": "new (N)", "hm": "harmonic mean (HM)", "all": "accuracy"}
    fig, axes = plt.subplots(len(metrics), 1, figsize=(max(7, 1.1 * len(rows) * max(1, len(chart)) ** 0.5),
                                                      3.2 * len(metrics)), squeeze=False)
    width = 0.8 / max(1, len(chart))
    # a spread only where some value is over several seeds (one seed: no std, no error bars)
    spread = any(v[1] is not None for values in chart.values() for by_metric in values.values()
                 for v in by_metric.values())
    for ax, k in zip(axes[:, 0], metrics):
        shown = []
        for i, (method, values) in enumerate(chart.items()):
            xs = [j for j, d in enumerate(rows) if k in values.get(d, {})]
            means = [values[rows[j]][k][0] for j in xs]
            errs = [values[rows[j]][k][1] or 0.0 for j in xs]
            bars = ax.bar([j - 0.4 + (i + 0.5) * width for j in xs], means, width,
                          yerr=errs if spread else None, capsize=3, label=method)
            ax.bar_label(bars, [f"{m:.1f}" for m in means], fontsize=7, padding=2)
            shown += [m + e for m, e in zip(means, errs)]
        ax.set_ylim(0.0, min(100.0, 1.12 * max(shown, default=100.0)))  # bars from 0: their heights compare
        ax.set_xticks(range(len(rows)), rows, rotation=20, ha="right")
        ax.set_ylabel(f"{names[k]} (%)")
    axes[0, 0].set_title(f"{title}: mean over seeds, error bars ± std" if spread else f"{title}: one seed")
    axes[0, 0].legend(bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    rundir.atomic_save(fig, path, lambda figure, f: figure.savefig(f, format="png", dpi=120))
    plt.close(fig)


def check_ablation(p, run_flags):
    if train.get_args(run_flags).method not in ABLATION_COLUMNS:
        p.error("ablation switches a method's modules: give --method isp (2 x 2 x 2) or --method mpl (add/remove)")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tools.protocols", description=__doc__,
                                formatter_class=cli.HelpFormatter,
                                epilog="Every other flag is handed to each run as a train.py flag: --method (default "
                                       "mpl), --root, --clip, --shots, ... (see python train.py --help).")
    p.add_argument("protocol", choices=["base2new", "cross_dataset", "domain_generalization", "ablation", "summary"],
                   help="the protocol to run, or summary: the tables of the runs found")
    p.add_argument("dir", nargs="?", default=None, help="summary: the folder of results.json files to tabulate "
                   "(default: --output)")
    p.add_argument("--datasets", nargs="+", default=None, help="base2new: the datasets (default: the papers' 11 with "
                   "--root, else the mini world); transfer: the source (default imagenet with --root)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default 1 2 3; summary: the seeds every "
                   "table must have (default: the seeds found)")
    p.add_argument("--output", default="output", help="the root folder of all runs and tables (each run's directory "
                   "is <output>/<protocol>/<method>/<dataset>/shots<K>_seed<S>; train.py's --output is one run's)")
    p.add_argument("--steal-lock", action="store_true", help="handed to every run (see train.py): take over a run's "
                   "lock that names a process on another machine or a pid reused after a reboot. Safe only when no "
                   "copy of this protocol runs on another machine on this --output")
    p.add_argument("--list", action="store_true", help="run nothing; print the runs of the protocol not yet finished "
                   "as commands, one a line, for a scheduler (GNU parallel, a SLURM array: see docs/runs.md)")
    args, run_flags = p.parse_known_args(argv)  # everything else goes to each run, as train.py flags
    run_flags += ["--steal-lock"] if args.steal_lock else []
    seen = argparse.ArgumentParser(add_help=False)  # the runs' flags that these checks read
    seen.add_argument("--method", default="mpl")
    seen.add_argument("--cross-dataset", action="store_true")
    seen.add_argument("--root", default=os.environ.get("DATA", "data"))
    flags = seen.parse_known_args(run_flags)[0]
    transfer = args.protocol in ("cross_dataset", "domain_generalization")
    if args.protocol != "summary" and not args.list and papers_datasets(run_flags, args.datasets):
        inputs.check_root(flags.root, (args.datasets or [XD_SOURCE if transfer else B2N[0]])[0])  # before CLIP
    if transfer:  # the papers' transfer recipe, asked for
        if not flags.cross_dataset and flags.method != "zeroshot":
            p.error(f"{args.protocol} is run with train.py's --cross-dataset recipe (depth 3; MPL and MaPLe: lr "
                    f"0.0026, 2 epochs), as in the papers: add --cross-dataset (flags such as --depth or --epochs "
                    f"still override it)")
    if args.list:
        if args.protocol == "summary":
            p.error("--list lists the runs of a protocol or of an ablation; summary runs nothing")
        seeds = args.seeds or [1, 2, 3]
        if args.protocol == "ablation":  # each valid cell's base-to-new runs; the table then only reads them
            check_ablation(p, run_flags)
            commands = [c for _, run_argv, cell_out, _ in ablation_cells(run_flags, args.output) if run_argv
                        for c in pending_commands("base2new", run_argv, args.datasets, seeds, cell_out)]
        else:
            commands = pending_commands(args.protocol, run_flags, args.datasets, seeds, args.output)
        for command in commands:
            print(command)
        return 0
    try:
        if args.protocol == "summary":
            summarize(args.dir or args.output, seeds=args.seeds)
        elif args.protocol == "ablation":
            check_ablation(p, run_flags)
            run_ablation(run_flags, args.datasets, args.seeds or [1, 2, 3], args.output)
        else:
            seeds = args.seeds or [1, 2, 3]
            run_protocol(args.protocol, run_flags, args.datasets, seeds, args.output)
            summarize(args.output, seeds={args.protocol: seeds})  # the other protocols' tables: the seeds found
    except SummaryError as e:
        print(f"tools/protocols.py summary: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":  # one line `error: ...` for the user's errors, a traceback for bugs
    cli.run(main)
