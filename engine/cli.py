"""
How the command-line entry points end (train.py, protocols.py, data.py, python -m world, bench.py):

    if __name__ == "__main__":
        cli.run(main)

An error about the user's input or machine is printed as one line, `error: <message>`, and the process exits with
status 1. Such an error is an OSError (a file, a folder, a disk, a permission) or an exception that a `raise` statement
of this project's own files raised on purpose, with a message written for the user (a flag, a dataset, a checkpoint, a
held lock, a run of other settings). Anything else (an exception from inside a library, an AttributeError, a failed
assert) is a bug and keeps its full traceback. `--debug` anywhere on the command line shows the traceback of every
error; it is taken out before the script reads its own flags.

Ctrl-C (KeyboardInterrupt) and SIGTERM (kill, a scheduler's time limit; made an exception here, Terminated, so that
every `with` on the way out runs and a run directory's lock is released) also end in one line, with exit status 130 and
143 as a shell reports a process ended by those signals: what is kept and how to go on, as a run (engine/run.py's Run)
wrote it on the exception (`e.kept`), else only that it was interrupted.
"""
import argparse
import dataclasses
import dis
import math
import os
import re
import signal
import sys
import threading
import traceback
import typing

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project's folder


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread while cli.run runs. A KeyboardInterrupt, so that what cleans up after Ctrl-C
    cleans up after it too (a DataLoader worker that receives it ends quietly, as on Ctrl-C)."""


def _terminate(signum, frame):
    raise Terminated()


def run(main, argv=None):
    """sys.exit(main(argv)), errors for the user as one line. main returns an exit status, or anything else for 0."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    main_thread = threading.current_thread() is threading.main_thread()  # only there can a handler be set
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        status = main(argv)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (Terminated)
        if debug:
            traceback.print_exc()
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted (Ctrl-C)"
        kept = getattr(e, "kept", None)
        print(what + (f": {kept}" if kept else ""), file=sys.stderr)
        sys.exit(143 if isinstance(e, Terminated) else 130)  # 128 + the signal's number, as a shell reports it
    except Exception as e:
        message = worker_message(e)
        if debug or not (is_user_error(e) if message is None else message[1]):
            raise
        print(f"error: {str(e) if message is None else message[0]}", file=sys.stderr)
        sys.exit(1)
    finally:
        if main_thread:  # (None: a handler not set from Python; the default then)
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    sys.exit(status if isinstance(status, int) else 0)


# How PyTorch's DataLoader hands on an exception raised in a worker process: an exception of the same type whose
# message is the worker's whole traceback as text (torch/utils/data/_utils/worker.py, ExceptionWrapper).
_WORKER = re.compile(r"Caught (\w+) in DataLoader worker process \d+\.\nOriginal Traceback \(most recent call last\):\n")


def worker_message(e):
    """For an exception re-raised from a DataLoader worker: (the worker's own message, whether it is the user's
    error as is_user_error decides it: an OSError, or a `raise` in this project's files); None for any other."""
    text = str(e)
    if not _WORKER.match(text):
        return None
    name = type(e).__name__
    message = text.rstrip("\n").rpartition(f"\n{name}: ")[2]  # the last exception of the chain, its message
    frames = re.findall(r'File "([^"]+)", line \d+, in \S+\n +(.*)\n', text)
    where, line = frames[-1] if frames else ("", "")
    ours = os.path.commonpath([os.path.abspath(where or "/"), ROOT]) == ROOT and "site-packages" not in where
    return message, isinstance(e, OSError) or (ours and line.startswith("raise "))


def is_user_error(e):
    """True for an OSError, or an exception raised by a `raise` statement in one of this project's files (not an
    assert); False for anything raised inside a library or by the interpreter (a bug)."""
    if isinstance(e, OSError):
        return True
    if isinstance(e, (AssertionError, NotImplementedError)) or e.__traceback__ is None:
        return False
    tb = e.__traceback__
    while tb.tb_next is not None:  # the frame where it was raised
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    if os.path.commonpath([os.path.abspath(code.co_filename), ROOT]) != ROOT or "site-packages" in code.co_filename:
        return False
    # the instruction that raised: a `raise` statement, not an operation or call that failed on that line
    return any(i.offset == tb.tb_lasti and i.opname == "RAISE_VARARGS" for i in dis.get_instructions(code))


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help with each flag's default after its help, as argparse.ArgumentDefaultsHelpFormatter writes it, unless the
    help already says it (the word "default", or a method flag's "(preset: ...)": config_flags); a list default is written as on the command line, no default as
    "none", and a switch (a flag that takes no value) is off unless given. The description keeps its layout."""

    def _get_help_string(self, action):
        text = action.help or ""
        said = "default" in text or "(preset: " in text
        if said or action.nargs == 0 or action.default == argparse.SUPPRESS:
            return text
        if not action.option_strings and action.nargs not in ("?", "*"):
            return text  # a required positional argument
        value = action.default
        shown = "none" if value is None else " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
        return f"{text} (default: {str(shown).replace('%', '%%')})"


# ----------------------------------------------------------------------------------------------------------------------
# train.py's flags: the method's config as flags, and the values refused when the command is parsed

def peek(argv, flag, **kw):
    """One flag's value, read before the whole parser is built (train.py's --method, whose config's fields become
    flags); kw as for add_argument."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument(flag, **kw)
    return vars(pre.parse_known_args(argv)[0])[flag.lstrip("-").replace("-", "_")]


def config_flags(parser, config):
    """One flag per field of a method's config dataclass, e.g. --n-ctx, --isp-self/--no-isp-self. Its help is the
    field's annotation in mpl.py / isp.py, `Annotated[type, "help [source]"]`, so the config stays the one place where
    a setting is explained. No config (zero-shot CLIP): no flags."""
    if config is None:
        return
    hints = typing.get_type_hints(type(config), include_extras=True)
    group = parser.add_argument_group(f"{type(config).__name__} (defaults: the preset)")
    for f in dataclasses.fields(config):
        kind, text = typing.get_args(hints[f.name])                      # Annotated[int, "help"] -> int, "help"
        kw = dict(default=None, dest=f"cfg_{f.name}", help=f"{text} (preset: {getattr(config, f.name)!r})")
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw.update(type=kind, metavar=f.name.upper())
        group.add_argument("--" + f.name.replace("_", "-"), **kw)


def config_error_with_flags(message, config):
    """A config's message with its field names written as their flags ("sp_lambda must be" -> "--sp-lambda must
    be"), leaving quoted values alone."""
    for f in dataclasses.fields(config):
        message = re.sub(rf"(?<![\w'-]){f.name}(?![\w'])", "--" + f.name.replace("_", "-"), message)
    return message


def check_train_args(p, args, cpus, method_config, config):
    """Values of train.py's flags that would fail only after training started, or silently do something else:
    refused now, through the parser (`p.error`). method_config(args) builds the method's config, which checks its
    own values; config: the preset, whose field names become flags in its messages."""
    checks = [("--shots", args.shots, args.shots >= 1, "an integer >= 1"),
              ("--seed", args.seed, 0 <= args.seed < 2 ** 32, f"an integer >= 0 and <= "
                                                              f"{2 ** 32 - 1} (numpy's seeds; "
                                                              f"Dassl does not seed for negative "
                                                              f"seeds)"),
              ("--epochs", args.epochs, args.epochs is None or args.epochs >= 0, "an integer >= 0"),
              ("--lr", args.lr, args.lr is None or (math.isfinite(args.lr) and 0 < args.lr <= 1),
               "a finite number > 0 and <= 1 (the recipes use 0.0025-0.0035; far larger rates "
               "drive the prompts to inf or NaN)"),
              ("--batch-size", args.batch_size, args.batch_size is None or args.batch_size >= 1, "an integer >= 1"),
              ("--test-batch-size", args.test_batch_size, args.test_batch_size >= 1, "an integer >= 1"),
              ("--momentum", args.momentum, 0 <= args.momentum < 1, "a number in [0, 1)"),
              ("--weight-decay", args.weight_decay, math.isfinite(args.weight_decay) and args.weight_decay >= 0,
               "a finite number >= 0"),
              ("--crop-scale", args.crop_scale, 0 < args.crop_scale <= 1, "a fraction of the image area in (0, 1]"),
              ("--text-chunk", args.text_chunk, args.text_chunk >= 0, "an integer >= 0 (0: all classes at once)"),
              ("--threads", args.threads, args.threads is None or args.threads >= 1, "an integer >= 1"),
              ("--workers", args.workers, args.workers is None or 0 <= args.workers <= cpus,
               f"an integer in [0, {cpus}] (the CPUs this process may use)"),
              ("--output", repr(args.output), args.output is None or args.output.strip() != "",
               "a directory path (leave the flag out for the default)")]
    for flag, value, ok, expected in checks:
        if not ok:
            p.error(f"{flag} must be {expected}, got {value}")
    if args.resume and args.overwrite:
        p.error("--resume continues the run in --output, --overwrite starts it again: give one of them")
    if args.resume and args.eval_only:
        p.error("--resume continues training, --eval-only trains nothing: give one of them")
    if args.precision == "amp" and not args.device.startswith("cuda"):
        p.error(f"--precision amp is CUDA autocast with a loss scaler; on --device {args.device} "
                f"use fp32 or bf16 (or fp16, the official pure-fp16 setting)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA GPU is visible to torch here (torch "
                f"{torch.__version__}); use --device cpu")
    try:
        method_config(args)  # the config checks its own values, so a bad flag stops here, before anything loads
    except ValueError as e:
        p.error(config_error_with_flags(str(e), config))

