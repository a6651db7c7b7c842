"""
One run's bookkeeping behind one object, so that train.py shows only the lesson. A run writes into
its own directory: checkpoint.pt (only the trainable prompt parameters with their optimizer state,
28-55 MB for MaPLe, MPL and ISP at ViT-B/16 (README), and where the run stands), train.log (what
it printed) and results.json (the accuracies, per class too, and the history: per epoch the mean
loss, LR and seconds). What the directory guarantees: docs/runs.md.

    with Run(args, recipe) as run:       the directory (checked), its lock (rundir.RunLock), the log
      done = run.start(identity)         a finished run of these very settings: its results, or None
      start = run.restore(model, optimizer, scaler)     --resume: the epoch to go on from, else 0
      for images, labels, index in run.batches(loader, epoch, optimizer):
          ...                            one step
          run.after_step(loss, params, scaler)  nothing non-finite goes on; the loss summed
      run.end_epoch(model, optimizer, scaler)   checkpoint.pt (atomic), history, the epoch's line
      run.finish(results, model, trained)  results.json, with the run's identity, config, timing, history
                                         (a run that trained nothing: its checkpoint too)

Ctrl-C or SIGTERM (engine/cli.py) leaves the checkpoint of the last epoch that finished; the `with` releases the lock
and writes on the exception what is kept and the command that goes on from it (interrupted), which cli.run prints.

It knows train.py's flags (args) and a method's interface (prompt_state_dict), nothing of CLIP.
"""
import dataclasses
import json
import os
import random
import shlex
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager

import torch
from tqdm import tqdm

import clip_layers
from engine import checkpoints
from engine import rundir
from engine.precision import PRECISION_HELP, PRECISIONS

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the folder of train.py


class Run:
    def __init__(self, args, recipe, argv=None, dataset=None):
        """recipe: (lr, epochs, batch size) as used; dataset: the name in the default directory
        (default: --dataset). The directory is checked now (prepare_run_dir), before any model
        loads."""
        self.args, self.recipe, self.argv = args, recipe, argv
        self.dir = prepare_run_dir(args, dataset or args.dataset)
        self.checkpoint = os.path.join(self.dir, "checkpoint.pt")
        self.identity, self.ckpt, self.history, self.step_times = None, None, [], []
        self.scale = None
        self.kept = None  # the epoch that checkpoint.pt holds, once this run wrote or resumed it
        self._stack = ExitStack()

    def __enter__(self):
        """One process per run directory (a second one stops with rundir.Locked); what it prints
        also goes to train.log."""
        self._stack.enter_context(rundir.RunLock(self.dir, steal=self.args.steal_lock))
        self._stack.enter_context(log_to(os.path.join(self.dir, "train.log"), self.argv))
        self.t_start = time.time()
        return self

    def __exit__(self, *exc):
        if isinstance(exc[1], KeyboardInterrupt) and getattr(exc[1], "kept", None) is None:
            exc[1].kept = self.interrupted()  # Ctrl-C or SIGTERM: cli.run prints it
        return self._stack.__exit__(*exc)

    def interrupted(self):
        """What an interrupted run leaves, and how to go on, in words: the checkpoint of its last
        finished epoch and the same command with --resume."""
        if self.kept is None:
            return "no epoch of this run finished, nothing new is saved; run the same command again"
        return (f"{self.checkpoint} keeps epoch {self.kept} of {self.recipe[1]}; to go on from it: "
                f"{resume_command(self.argv)}")

    def start(self, identity):
        """The run's identity known: the results of a finished run of these very settings (then
        nothing is to be done), else None; under --resume, the checkpoint to go on from."""
        self.identity = identity
        done = finished_run(self.dir, identity, self.args)
        if done is None and self.args.resume and os.path.exists(self.checkpoint):
            self.ckpt = resumable_checkpoint(self.checkpoint, identity)
            self.kept = self.ckpt["epoch"]
        return done

    def use_cpu_threads(self, clip_model):
        """On the CPU, the threads torch uses (--threads, else cpu_threads' choice for this CLIP),
        said in the log."""
        if not self.args.device.startswith("cuda"):
            threads, why = cpu_threads(self.args.threads, clip_layers.widths(clip_model)[1])
            torch.set_num_threads(threads)
            print(f"CPU threads: {threads} ({why})")

    def config(self, model):
        """The flags, the recipe as used and the model's config, as plain values."""
        return plain_config(self.args, self.recipe, model)

    def restore(self, model, optimizer, scaler):
        """--resume: the prompts, momentum, loss scaler and RNG states of the checkpoint; returns
        the epoch to go on from (0 without one)."""
        epoch, epochs = 0, self.recipe[1]
        if self.ckpt:
            epoch = restore(self.ckpt, model, optimizer, scaler, self.checkpoint)
            print(f"--resume: {self.checkpoint} holds epoch {epoch} of {epochs}; "
                  + (f"continuing with epoch {epoch + 1}" if epoch < epochs else
                     "its training is done, it is evaluated"))
        elif self.args.resume:
            print(f"--resume: no {self.checkpoint} yet; starting with epoch 1")
        self.scale = scaler.get_scale() if scaler.is_enabled() else None  # amp: to count skips
        return epoch

    def batches(self, loader, epoch, optimizer):
        """The epoch's batches under a progress bar; each step is timed from its batch's arrival
        to after_step."""
        self.epoch, self.loader, self.optimizer = epoch, loader, optimizer
        self.t_epoch = time.time()
        self.loss_sum, self.skipped = None, 0
        lr, epochs = optimizer.param_groups[0]["lr"], self.recipe[1]
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs} lr {lr:.6f}", disable=None)
        for self.step, batch in enumerate(bar):
            self.t0 = time.time()
            self.index = batch[2]
            yield batch

    def after_step(self, loss, params, scaler=None):
        """Nothing non-finite is ever saved: the loss and all prompts checked in one reduction (one
        host sync); under amp, a step GradScaler skipped (an inf gradient: the scale halved) is
        counted, from the scale it reads back (GradScaler's public get_scale, a second sync)."""
        if not all_finite([loss, *params]):  # a finite loss can still give an infinite step
            where = (self.epoch, self.step, len(self.loader), self.optimizer, self.checkpoint)
            items = self.loader.dataset.items
            check_finite("loss", [loss], where, [items[i].impath for i in self.index.tolist()])
            check_finite("prompts", params, where)
        if scaler is not None and scaler.is_enabled():  # a skipped step halved the scale
            scale = scaler.get_scale()
            self.skipped += scale < self.scale
            self.scale = scale
        self.loss_sum = loss.detach() if self.loss_sum is None else self.loss_sum + loss.detach()
        self.step_times.append(time.time() - self.t0)

    def end_epoch(self, model, optimizer, scaler):
        """checkpoint.pt of the epoch (atomic; --overwrite: the old results go now), its history
        and its line."""
        epoch = self.epoch + 1
        save_checkpoint(self.checkpoint, model, self.args, self.recipe, self.identity, epoch,
                        optimizer, scaler)
        self.kept = epoch
        remove_replaced_results(self.dir, self.args)
        loss = float("nan") if self.loss_sum is None else float(self.loss_sum) / len(self.loader)
        h = dict(epoch=epoch, loss=loss, lr=optimizer.param_groups[0]["lr"],
                 seconds=time.time() - self.t_epoch)
        amp = scaler.is_enabled()
        if amp:
            h.update(skipped_steps=int(self.skipped), scale=scaler.get_scale())
        self.history.append(h)
        print(f"epoch {epoch}/{self.recipe[1]}  lr {h['lr']:.6f}  loss {h['loss']:.4f}"
              + (f"  amp: {h['skipped_steps']} steps skipped, scale {h['scale']:g}" if amp else ""))

    def timing(self):
        """(seconds per step, leaving out the first: the warm-up of kernels and allocators; or None
        if nothing trained here, history). A finished run resumed keeps its recorded timing."""
        if not self.step_times and self.ckpt is not None:
            previous = _previous_results(self.dir)
            return previous.get("sec_per_step"), previous.get("history", [])
        if not self.step_times:
            return None, self.history
        return sum(self.step_times[1:]) / max(1, len(self.step_times) - 1), self.history

    def finish(self, results, model, trained):
        """results.json (atomic): the run's results, with its config, identity, timing, history and
        the commit of the code; a run that trained nothing first writes the checkpoint of what it
        evaluated (untrained_checkpoint), so the two agree."""
        if not trained:
            untrained_checkpoint(self.checkpoint, model, self.args, self.recipe, self.identity)
        sec_per_step, history = self.timing() if trained else (None, [])
        results = dict(results, config=self.config(model), identity=self.identity,
                       device=self.args.device, sec_per_step=sec_per_step, history=history,
                       wall_seconds=time.time() - self.t_start, git_commit=git_commit())
        rundir.save_json(results, os.path.join(self.dir, "results.json"))
        return results


# --------------------------------------------------------------------------------------------------
# The flags of the run directory and the machine (train.py's --help lists them with its own)

def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_flags(p):
    """train.py's flags for where and how a run computes and keeps its results; none of them changes
    what the method is."""
    add = p.add_argument
    add("--device", default=default_device(), help="default: cuda when a GPU is visible, else cpu")
    add("--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP)
    add("--test-batch-size", type=int, default=100, help="images per evaluation batch")
    add("--text-chunk", type=int, default=128, help="encode at most this many classes at a time "
        "(exact; saves memory for large class sets); 0: all at once")
    add("--output", default=None, help="this one run's directory (default: output/<dataset>/"
        "<method>/shots<K>_seed<S>); tools/protocols.py's --output is the root folder above its "
        "runs' directories")
    add("--overwrite", action="store_true", help="allow writing into an existing run directory")
    add("--resume", action="store_true", help="continue from <output>/checkpoint.pt")
    add("--steal-lock", action="store_true", help="take over the run directory's lock although "
        "the process it names may be alive: a process on another machine, or a pid reused after a "
        "reboot. Safe only when you know that process no longer runs this run (a lock held by a "
        "running process of this machine is never taken)")
    add("--deterministic", action="store_true", help="deterministic CUDA kernels (torch."
        "use_deterministic_algorithms, cuDNN benchmark off): bitwise repeatable on one GPU, slower")
    add("--workers", type=int, default=None, help="data loader workers (default 4 on CUDA, 0 on "
        "CPU)")
    add("--threads", type=int, default=None, help="CPU threads for torch (default on the CPU: 1 "
        "for the mini world's small CLIP, else the cores not busy with other processes)")
    add("--debug", action="store_true", help="on an error, show Python's traceback, not only the "
        "one line `error: ...` (cli.py; any command line of this project takes it)")


def resume_command(argv=None):
    """The command line of this run (argv: train.py's flags, default the process's) with --resume in
    place of --overwrite, as a POSIX shell reads it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # argparse also takes a flag's unambiguous prefix (--overw)
    argv = [a for a in argv if not (len(a) >= 4 and "--overwrite".startswith(a))]
    argv += [] if "--resume" in argv else ["--resume"]
    script = sys.argv[0] if os.path.basename(sys.argv[0]) == "train.py" else \
        os.path.relpath(os.path.join(PROJECT, "train.py"))  # e.g. run by tools/protocols.py
    return shlex.join(["python", script, *argv])


# --------------------------------------------------------------------------------------------------
# The run directory

def run_dir(args, dataset):
    """--output, else output/<dataset>/<method>[_xd]/shots<K>_seed<S>."""
    method = args.method + ("_xd" if args.cross_dataset else "")
    seeded = f"shots{args.shots}_seed{args.seed}"
    return args.output or os.path.join("output", dataset, method, seeded)


def prepare_run_dir(args, dataset):
    """The run directory, checked writable now. A directory that holds an unfinished run (a
    checkpoint, no results) needs --resume (continue it) or --overwrite (start again); one that
    holds a finished run is looked at once its identity is known (finished_run). --overwrite removes
    nothing here: the old checkpoint is replaced by the new run's first checkpoint (atomically) and
    the old results.json goes at that moment, or, for a run that trains nothing, both are replaced
    when its results are written; so a run that fails before then, or a file that --load reads from
    this directory, loses nothing."""
    path = run_dir(args, dataset)
    unfinished = os.path.exists(os.path.join(path, "checkpoint.pt")) and \
        not os.path.exists(os.path.join(path, "results.json"))
    if unfinished and not (args.resume or args.overwrite):
        raise FileExistsError(f"run directory {path} holds an unfinished run (checkpoint.pt, no "
                              f"results.json); pass --resume to continue it, --overwrite to start "
                              f"it again, or --output for a new directory")
    rundir.check_writable(path)
    return path


def finished_run(run_dir, identity, args):
    """Without --resume or --overwrite, a run directory that holds results.json: its results if
    they are of this very run (the same identity, and for --load the same file), printed with how
    to train again; a finished run of other settings is refused. None when there is nothing to look
    at."""
    path = os.path.join(run_dir, "results.json")
    if args.resume or args.overwrite or not os.path.exists(path):
        return None
    again = "pass --overwrite to replace it, or --output for a new directory"
    try:
        with open(path) as f:
            old = json.load(f)
    except ValueError as e:
        raise FileExistsError(f"{path} is not a readable results file ({e}); {again}") from e
    if not isinstance(old, dict) or not isinstance(old.get("accuracy"), dict):
        raise FileExistsError(f"{path} is not a results file of train.py (no 'accuracy'); {again}")
    if old.get("identity") != identity:
        changed = rundir.differences(old.get("identity") or {}, identity)
        raise FileExistsError(f"run directory {run_dir} holds a finished run of other settings "
                              f"({changed}); {again}")
    load = rundir.file_sha256(args.load) if args.load and os.path.isfile(args.load) else None
    if args.load and old.get("load_sha256") != load:
        raise FileExistsError(f"run directory {run_dir} holds an evaluation of --load {args.load}, "
                              f"which has changed since (its SHA-256 is not the one recorded in "
                              f"{path}); pass --overwrite to evaluate it again, or --output for a "
                              f"new directory")
    accuracy = "  ".join(f"{k} {v:.2f}" if isinstance(v, (int, float)) else f"{k} {v}"
                         for k, v in old["accuracy"].items())
    print(f"{path}: this run already finished with these settings. {old.get('method')} "
          f"{old.get('dataset')} seed {old.get('seed')}: {accuracy}")
    print("Nothing was trained. To train it again, add --overwrite (or give another --output).")
    return old


def remove_replaced_results(run_dir, args):
    """--overwrite: once the new run's first checkpoint has replaced the old one, the old run's
    results.json no longer describes anything and goes (prepare_run_dir: nothing is removed
    before)."""
    stale = os.path.join(run_dir, "results.json")
    if args.overwrite and os.path.exists(stale):
        os.remove(stale)


def _previous_results(run_dir):
    try:
        with open(os.path.join(run_dir, "results.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


# --------------------------------------------------------------------------------------------------
# Checkpoints: only the trainable tensors and plain values, written atomically; checkpoints.read
# reads them back (PyTorch's weights_only unpickler: see engine/checkpoints.py for what is trusted)

def plain_config(args, recipe, model):
    lr, epochs, batch_size = recipe
    cfg = getattr(model, "cfg", None)  # the config the model was built with
    return dict(args=vars(args), lr=lr, epochs=epochs, batch_size=batch_size,
                method_config=dataclasses.asdict(cfg) if cfg is not None else None)


def save_checkpoint(path, model, args, recipe, identity, epoch, optimizer, scaler=None):
    """checkpoint.pt, written atomically: the trainable prompts, which run they are (identity,
    config) and where it stands (epoch, optimizer, loss scaler, RNG states), all that --resume
    needs."""
    rng = dict(torch=torch.get_rng_state(), python=random.getstate(),
               cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])
    scaler_state = scaler.state_dict() if scaler is not None and scaler.is_enabled() else None
    rundir.atomic_save(dict(params=model.prompt_state_dict(), method=args.method, epoch=epoch,
                            identity=identity, config=plain_config(args, recipe, model),
                            optimizer=optimizer.state_dict(), scaler=scaler_state, rng=rng),
                       path, torch.save)


def untrained_checkpoint(path, model, args, recipe, identity):
    """The checkpoint beside the results of a run that trained nothing (--epochs 0, --eval-only,
    zero-shot), written right before them, so the two never disagree: a checkpoint left there by
    an earlier run (--overwrite) is replaced by the prompts evaluated now (removed, for a method
    without prompts), and an --epochs 0 run writes its initial prompts as its checkpoint, as a
    trained run writes its last epoch (a transfer source of 0 epochs is loadable)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        if os.path.exists(path):
            os.remove(path)
            print(f"removed {path}: it held the prompts of the run replaced (--overwrite); "
                  f"--method {args.method} has none")
        return
    if args.eval_only and not os.path.exists(path):
        return  # an evaluation of prompts trained elsewhere: they stay in the file it loaded
    optimizer = torch.optim.SGD(params, lr=recipe[0], momentum=args.momentum,
                                weight_decay=args.weight_decay)
    save_checkpoint(path, model, args, recipe, identity, 0, optimizer)


def resumable_checkpoint(path, identity):
    """--resume's checkpoint: a checkpoint of this run (the same identity) that holds what resuming
    uses."""
    ckpt = checkpoints.read(path)
    again = "--overwrite starts the run again, or give another --output"
    if not isinstance(ckpt, dict):
        raise ValueError(f"--resume: {path} holds a {type(ckpt).__name__}, not a checkpoint of "
                         f"train.py; {again}")
    if ckpt.get("identity") != identity:
        changed = rundir.differences(ckpt.get("identity") or {}, identity)
        raise ValueError(f"--resume: {path} is a run of other settings ({changed}); give that "
                         f"run's flags to continue it, --overwrite to start a new run in its "
                         f"place, or another --output")
    rng, epoch = ckpt.get("rng"), ckpt.get("epoch")
    wrong = [name for name, ok in (
        ("params", isinstance(ckpt.get("params"), dict)),
        ("optimizer", isinstance(ckpt.get("optimizer"), dict)),
        ("epoch", isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 0),
        ("rng", isinstance(rng, dict) and isinstance(rng.get("torch"), torch.Tensor)
         and isinstance(rng.get("python"), tuple))) if not ok]
    if wrong:
        raise ValueError(f"--resume: {path} lacks what resuming needs ({', '.join(wrong)} missing "
                         f"or malformed): it was not written by train.py, or was changed since; "
                         f"{again}")
    return ckpt


def restore(ckpt, model, optimizer, scaler, path):
    """--resume: the prompts, the optimizer's momentum, the loss scaler and the RNG states (the
    batch order and the random crops of the epochs to come) of a checkpoint. The schedule is a
    function of the epoch, so the epoch is its whole state; returned, it is where the loop
    continues. The checkpoint's structure was checked (resumable_checkpoint); values that still do
    not fit are named here."""
    try:
        checkpoints.load_trainable(model, ckpt["params"], f"--resume checkpoint {path}")
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler.is_enabled() and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        random.setstate(ckpt["rng"]["python"])
        if ckpt["rng"].get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as e:
        raise ValueError(f"--resume: {path} cannot be resumed ({type(e).__name__}: {e}); "
                         f"--overwrite starts the run again, or give another --output") from e
    return ckpt["epoch"]


# --------------------------------------------------------------------------------------------------
# Nothing non-finite is saved

def all_finite(tensors):
    """Whether every value of every tensor is finite: one reduction on the device, so one host sync
    for all."""
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def check_finite(name, tensors, where, batch=None):
    """After each step the loss and the prompts are checked (all_finite), and a value that is inf or
    NaN stops the run (FloatingPointError) before the epoch's checkpoint, naming the loss if it was
    the loss. `where`: (epoch, step, steps, optimizer, checkpoint path); the checkpoint on disk, if
    any, is that of the epoch before."""
    if all(torch.isfinite(t).all() for t in tensors):
        return
    epoch, step, steps, optimizer, path = where
    what = f"loss is {tensors[0].item()}" if name == "loss" else \
        f"the {name} became non-finite in this step"
    detail = f"; images of this batch: {batch}" if batch is not None else ""
    kept = (f"The last checkpoint of this run, {path} (epoch {epoch}), is finite and kept; "
            f"--resume restarts from it." if epoch else "No checkpoint of this run was written.")
    raise FloatingPointError(f"{what} at epoch {epoch + 1}, step {step + 1} of {steps}, LR "
                             f"{optimizer.param_groups[0]['lr']:.6g}{detail}. {kept}")


# --------------------------------------------------------------------------------------------------
# The log, the code's commit

class _Tee:
    """A stream that writes to the terminal's stream and to the log. The log is a copy: a failed
    write to it (a full disk) ends the copy, never the run."""
    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def to_log(self, text):
        try:
            if self.log is not None:
                self.log.write(text)
                self.log.flush()
        except (OSError, ValueError):
            self.log = None

    def write(self, text):
        self.to_log(text)
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextmanager
def log_to(path, argv=None):
    """What the run prints, also appended to its run directory's train.log (a resumed run adds to
    it), under a line with the time and the command; an error that stops the run is written there
    too."""
    log = open(path, "a")
    tee = _Tee(sys.stdout, log)
    command = " ".join(sys.argv[:1] + list(sys.argv[1:] if argv is None else argv))
    tee.to_log(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {command}\n")
    stdout, sys.stdout = sys.stdout, tee
    try:
        yield
    except BaseException as e:
        tee.to_log(f"error: {type(e).__name__}: {e}\n")
        raise
    finally:
        sys.stdout = stdout
        try:
            log.close()
        except OSError:
            pass


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except OSError:
        return None


# --------------------------------------------------------------------------------------------------
# The machine

def cpu_count():
    """The CPUs this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_threads(threads, vision_width):
    """Threads for torch on the CPU, and why. A CLIP narrower than 256 (the mini world's) runs small
    matrices, whose per-op cost is largely thread synchronisation: a second thread gains little
    on an idle machine and, with another process busy on a core, makes every op wait for it. So
    one thread for a small CLIP, which also lets two protocol processes share two cores; a large
    CLIP gets the cores that other processes leave free (by the 1-minute load average)."""
    if threads:
        return threads, "--threads"
    cores = cpu_count()
    if vision_width < 256:
        return 1, (f"this small CLIP's ops are too small to share between threads; {cores} cores "
                   f"here; --threads sets it")
    busy = round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    why = f"{cores} cores, about {busy} busy with other processes; --threads sets it"
    return max(1, cores - busy), why


def set_deterministic():
    """--deterministic: deterministic kernels only (an op without one raises), cuDNN's autotuner
    off. On one GPU and software stack a run then repeats bitwise; across GPUs or versions it
    does not."""
    # cuBLAS needs it for deterministic matmuls
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
