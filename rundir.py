"""
Run directories that lose nothing: what a run is (its identity), one process per run directory (a lock), and writes
that either happen completely or not at all (atomic, fsynced, with errors that name the file and the reason).

train.py and protocols.py use it; nothing here knows about CLIP or prompts.

    identity(...)                 the settings that decide a run's result, as a plain dict (stored in checkpoint and
                                  results.json, compared on --resume and before a protocol skips a finished run)
    differences(then, now)        "seed: 1 then, 5 now; ..." for an error message
    with RunLock(run_dir): ...    one process at a time; a lock left by a dead process is taken over
    atomic_save(obj, path, save)  write to a temporary file beside `path`, fsync, rename over `path`
    check_writable(folder)        before any training, not after the first epoch
"""
import errno
import hashlib
import json
import os
import socket
import tempfile
import time

# Every setting that changes what a run computes. Not in it: where the run writes (--output), how fast it runs
# (--workers, --threads, --text-chunk: exact), and what it is asked to do with an existing directory.
IDENTITY_FLAGS = ("method", "dataset", "shots", "seed", "subsample", "epochs", "lr", "batch_size", "momentum",
                  "weight_decay", "crop_scale", "precision", "cross_dataset", "load")


def identity(args, recipe, method_config, clip_fingerprint):
    """The run's identity: the flags above with the recipe's values filled in (lr, epochs, batch size as used), the
    method's full config, and a fingerprint of the CLIP weights."""
    lr, epochs, batch_size = recipe
    out = {k: getattr(args, k) for k in IDENTITY_FLAGS}
    out.update(dataset=args.dataset or "mini_world", lr=lr, epochs=epochs, batch_size=batch_size,
               method_config=method_config, clip=clip_fingerprint)
    return json.loads(json.dumps(out))  # plain JSON values: what results.json and the checkpoint hold


def differences(then, now):
    keys = sorted(set(then) | set(now))
    return "; ".join(f"{k}: {then.get(k)!r} then, {now.get(k)!r} now" for k in keys if then.get(k) != now.get(k))


def weights_fingerprint(module):
    """A short hash of a model's weights (names, shapes and a strided sample of each tensor's values, in fp32): two
    different CLIPs, or the same CLIP after a different download, get different fingerprints. Computed before any
    precision change, so fp32 and fp16 copies of one file agree."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().float().flatten().cpu()
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(t[::max(1, t.numel() // 256)][:256].half().numpy().tobytes())
    return h.hexdigest()[:16]


def file_sha256(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------------
# Writing

def _reason(e):
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return "the disk is full"
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "no permission to write there (read-only?)"
    return f"{type(e).__name__}: {e}"


def atomic_save(obj, path, save):
    """save(obj, file) into a temporary file next to `path`, fsync it, then rename it over `path`: a crash or a full
    disk leaves the previous file intact and no temporary file behind."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, Exception):
            raise OSError(f"could not write {path}: {_reason(e)}. The previous file, if any, is unchanged.") from e
        raise


def save_json(obj, path):
    atomic_save(obj, path, lambda o, f: f.write((json.dumps(o, indent=2) + "\n").encode()))


def check_writable(folder):
    """Create `folder` and write a probe file into it now, so that a read-only or full output fails before training."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        raise OSError(f"output directory {folder} is not writable: {_reason(e)}. Pick another --output.") from e


# ----------------------------------------------------------------------------------------------------------------------
# One process per run directory

def pid_alive(pid, host=None):
    """Is process `pid` running? On another host (shared storage) we cannot tell, so we assume it is."""
    if host is not None and host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Locked(RuntimeError):
    """The run directory is held by another live process."""


class RunLock:
    """`with RunLock(run_dir):` holds <run_dir>/.lock, a file with the holder's pid and host, created atomically
    (O_EXCL). A lock whose process is gone (killed, crashed) is taken over; a live holder raises Locked, naming it."""

    def __init__(self, run_dir):
        self.path = os.path.join(run_dir, ".lock")

    def __enter__(self):
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    with open(self.path) as f:
                        holder = json.load(f)
                except (OSError, ValueError):
                    holder = None  # being written this instant, or left half-written by a kill
                if holder is not None and pid_alive(holder["pid"], holder["host"]):
                    raise Locked(f"{os.path.dirname(self.path)} is in use by process {holder['pid']} on "
                                 f"{holder['host']} (lock file {self.path}); wait for it, or use another --output")
                if holder is None and _young(self.path):
                    raise Locked(f"{os.path.dirname(self.path)} is being taken by another process ({self.path})")
                os.remove(self.path)  # stale: its process is dead
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname()}, f)
            return self
        raise Locked(f"could not take {self.path}")

    def __exit__(self, *exc):
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass


def _young(path, seconds=5.0):
    try:
        return time.time() - os.path.getmtime(path) < seconds
    except OSError:
        return False
