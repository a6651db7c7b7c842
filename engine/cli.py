"""
How the command-line entry points end (train.py, protocols.py, data.py, mini_world.py, bench.py):

    if __name__ == "__main__":
        cli.run(main)

An error about the user's input or machine is printed as one line, `error: <message>`, and the process exits with
status 1. Such an error is an OSError (a file, a folder, a disk, a permission) or an exception that a `raise` statement
of this project's own files raised on purpose, with a message written for the user (a flag, a dataset, a checkpoint, a
held lock, a run of other settings). Anything else (an exception from inside a library, an AttributeError, a failed
assert) is a bug and keeps its full traceback. `--debug` anywhere on the command line shows the traceback of every
error; it is taken out before the script reads its own flags.
"""
import argparse
import dis
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project's folder


def run(main, argv=None):
    """sys.exit(main(argv)), errors for the user as one line. main returns an exit status, or anything else for 0."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        status = main(argv)
    except Exception as e:
        message = worker_message(e)
        if debug or not (is_user_error(e) if message is None else message[1]):
            raise
        print(f"error: {str(e) if message is None else message[0]}", file=sys.stderr)
        sys.exit(1)
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
    help already says it (the word "default"); a list default is written as on the command line, no default as
    "none", and a switch (a flag that takes no value) is off unless given. The description keeps its layout."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or "%(default)" in text or action.nargs == 0 or action.default == argparse.SUPPRESS:
            return text
        if not action.option_strings and action.nargs not in ("?", "*"):
            return text  # a required positional argument
        value = action.default
        shown = "none" if value is None else " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
        return f"{text} (default: {str(shown).replace('%', '%%')})"
