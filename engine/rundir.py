"""
Run directories that lose nothing: what a run is (its identity), one process per run directory (a lock), and writes
that either happen completely or not at all (atomic, fsynced, with errors that name the file and the reason).

train.py and protocols.py use it; nothing here knows about CLIP or prompts.

    identity(...)                 the settings that decide a run's result, as a plain dict (stored in checkpoint and
                                  results.json, compared on --resume and before a protocol skips a finished run)
    differences(then, now)        "seed: 1 then, 5 now; ..." for an error message
    with RunLock(run_dir): ...    one process at a time (an flock); a lock left by a dead process is taken over by
                                  exactly one process; steal=True (--steal-lock) takes one whose holder cannot be
                                  checked; LockWait: a wait for a held run that says so and gives up on a silent one
    atomic_save(obj, path, save)  write to a temporary file beside `path`, fsync, rename over `path`
    check_writable(folder)        before any training, not after the first epoch
"""
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
import threading
import time

try:
    import fcntl
except ImportError:  # not on Windows: the lock then relies on the pid and host written in it
    fcntl = None

# Every setting that changes what a run computes. Not in it: where the run writes (--output), how fast it runs
# (--workers, --threads, --text-chunk: exact), and what it is asked to do with an existing directory.
IDENTITY_FLAGS = ("method", "dataset", "shots", "seed", "subsample", "epochs", "lr", "batch_size", "momentum",
                  "weight_decay", "crop_scale", "precision", "cross_dataset", "load")


def identity(args, recipe, method_config, clip_fingerprint, data_fingerprint=None, dataset=None):
    """The run's identity: the flags above with the recipe's values filled in (lr, epochs, batch size as used), the
    method's full config, a fingerprint of the CLIP weights and one of the dataset's split and class names (so the
    same flags on another --root whose dataset differs are another run; dataset: its name, if not --dataset's).
    --load is kept as its real path: the same file named another way (a/../a, relative from elsewhere, through a
    symlink) is the same run."""
    lr, epochs, batch_size = recipe
    out = {k: getattr(args, k) for k in IDENTITY_FLAGS}
    out.update(dataset=dataset or args.dataset, lr=lr, epochs=epochs, batch_size=batch_size,
               method_config=method_config, clip=clip_fingerprint, data=data_fingerprint,
               load=os.path.realpath(args.load) if args.load else args.load)
    return json.loads(json.dumps(out))  # plain JSON values: what results.json and the checkpoint hold


def differences(then, now):
    """'seed: 1 then, 5 now; ...'. A setting a run did not record (written by an earlier version of this code) is
    said to be so, rather than shown as None."""
    keys = sorted(set(then) | set(now))
    said = lambda d, k: repr(d[k]) if k in d else "not recorded"
    return "; ".join(f"{k}: {said(then, k)} then{' (a run from before it was recorded)' if k not in then else ''}, "
                     f"{said(now, k)} now" for k in keys if then.get(k) != now.get(k) or (k in then) != (k in now))


def weights_fingerprint(module):
    """A short hash of a model's weights (names, shapes and a strided sample of each tensor's values, in fp32): two
    different CLIPs, or the same CLIP after a different download, get different fingerprints. Computed before any
    precision change, so fp32 and fp16 copies of one file agree. The sample is taken where the weights are (a GPU) and
    only its at most 256 values per tensor come to the host."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().flatten()
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(t[::max(1, t.numel() // 256)][:256].float().cpu().half().numpy().tobytes())
    return h.hexdigest()[:16]


def file_sha256(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------------
# Writing

def _reason(e, folder=None):
    """Why a write into `folder` failed, in words. A full disk inside torch.save shows as a RuntimeError of its zip
    writer ("unexpected pos ..."), not as ENOSPC, so it is told from the space left."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return "the disk is full"
    try:
        if folder is not None and shutil.disk_usage(folder).free < 1 << 20:
            return "the disk is full"
    except OSError:
        pass
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "no permission to write there (read-only?)"
    return f"{type(e).__name__}: {e}"


# The temporary files of atomic_save: .<name>.<8 random characters>.tmp (tempfile.mkstemp's names have this shape too)
TEMPORARY = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp")


def _new_temporary(folder, name):
    """Create .<name>.<random>.tmp in `folder` for writing: (fd, path). Its mode is a new file's (0666 less the umask,
    as open() gives), not mkstemp's 0600, so that results and checkpoints are as readable as the other files."""
    for _ in range(100):
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", os.path.join(folder, f".{name}.*.tmp"))


def remove_stale_temporaries(folder):
    """Remove the temporary files of atomic_save in `folder` that a killed process left (a kill -9 mid-write): only
    regular files named as atomic_save names them. Call it only where no live process can be writing one, e.g. while
    holding the folder's RunLock (a run directory is written by its lock's holder alone). Returns the names removed."""
    removed = []
    try:
        entries = os.listdir(folder)
    except OSError:
        return removed
    for entry in entries:
        path = os.path.join(folder, entry)
        try:
            if TEMPORARY.fullmatch(entry) and os.path.isfile(path) and not os.path.islink(path):
                os.remove(path)
                removed.append(entry)
        except OSError:
            pass  # gone meanwhile, or not ours to remove (permissions): nothing is lost by leaving it
    return sorted(removed)


def atomic_save(obj, path, save):
    """save(obj, file) into a temporary file next to `path`, fsync it, then rename it over `path`: a crash or a full
    disk leaves the previous file intact and no temporary file behind (a kill -9 leaves one, which the next holder of
    the run directory's lock removes). The file gets a new file's mode (the umask's)."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = _new_temporary(folder, os.path.basename(path))
        with os.fdopen(fd, "wb") as f:
            save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        reason = _reason(e, folder) if isinstance(e, Exception) else None  # before the temporary file frees space
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        if reason is not None:
            raise OSError(f"could not write {path}: {reason}. The previous file, if any, is unchanged.") from e
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
    return _stat(pid)[0] != "Z"  # a zombie has ended; only its exit status waits to be read


def _stat(pid):
    """(state, start time in clock ticks since boot) of process `pid` from Linux's /proc, (None, None) elsewhere. A pid
    that another process reuses has another start time."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the name in (...), which may hold spaces
        return fields[0], int(fields[19])  # fields 3 and 22 of proc(5)
    except (OSError, ValueError, IndexError):
        return None, None


HEARTBEAT_SECONDS = 30  # a lock's holder refreshes the lock file's time this often, to show that it is alive
LOCK_SILENCE_SECONDS = 600  # a process waiting for a held run (LockWait) gives up after this long without a refresh


def _boot_id():
    """This boot of this machine (Linux), or None: a lock written before a reboot names a process that is gone."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _holder(raw):
    """The holder that a lock file's bytes name ({"pid", "host", ...}), or None if they name none the way RunLock
    writes it (empty, cut short, or another file's content)."""
    try:
        holder = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    ok = isinstance(holder, dict) and type(holder.get("pid")) is int and holder["pid"] > 0 and \
        isinstance(holder.get("host"), str)
    return holder if ok else None


def _started_after(pid, when, slack=2.0):
    """Did process `pid` start after `when` (seconds since the epoch)? None where Linux's /proc cannot tell."""
    ticks = _stat(pid)[1]
    try:
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return ticks is not None and boot + ticks / os.sysconf("SC_CLK_TCK") > when + slack
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _holder_alive(holder, written=None):
    """True: the lock's holder is running; False: it is gone; None: this machine cannot tell (another host).
    `written`: when the lock file was last written (its holder was alive then)."""
    if holder["host"] != socket.gethostname():
        return None
    boot = _boot_id()
    if holder.get("boot") is not None and boot is not None and holder["boot"] != boot:
        return False  # written before this machine restarted
    if not pid_alive(holder["pid"]):
        return False
    started = holder.get("started")
    if started is not None and _stat(holder["pid"])[1] not in (None, started):
        return False  # the pid belongs to another process now
    if started is None and written is not None and _started_after(holder["pid"], written):
        return False  # a lock without a start time (written by hand or an older version): the pid's process is newer
    return True


class Locked(RuntimeError):
    """The run directory is held by another process, or by one that this process cannot check (then --steal-lock
    says it is gone). `path`: the lock file; `holder`: who holds it, in words (None if unknown)."""

    def __init__(self, message, path=None, holder=None):
        super().__init__(message)
        self.path, self.holder = path, holder


class RunLock:
    """`with RunLock(run_dir):` holds <run_dir>/.lock: one process per run directory.

    The lock is an flock on that file, which the kernel releases when the holder ends, however it ends. Taking a free
    flock is atomic: of several processes that find one stale lock, exactly one takes it and the others get Locked.
    The file also names its holder (pid, host, boot, start time of the process), for messages, for files written by
    hand or by an older version of this code, and for other hosts, which a file system may not show our flock. Under a
    free flock, a holder that is gone (dead pid, a reboot since, its pid reused by another process) is taken over; one
    that is running, or that cannot be checked (another host), raises Locked saying what to do, unless steal=True
    (--steal-lock: the user says it is gone). A flock held by a running process is never taken, not even with steal.
    Where there is no flock (Windows, a network file system without locks), the file is created with O_EXCL and a dead
    holder's file is removed and created again: not atomic between two takers.

    While held, the file's time is refreshed every HEARTBEAT_SECONDS (LockWait tells a running holder from a silent
    one by it). On taking the lock, the temporaries of atomic_save that a killed process left in the directory go."""

    def __init__(self, run_dir, steal=False):
        self.dir, self.path, self.steal = run_dir, os.path.join(run_dir, ".lock"), steal
        self._fd = None

    def __enter__(self):
        for _ in range(100):  # again only when the file was released (or removed as stale) between open and lock
            try:
                fd, fresh = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), True
            except FileExistsError:
                try:
                    fd, fresh = os.open(self.path, os.O_RDWR), False
                except FileNotFoundError:
                    continue
            except OSError as e:
                raise OSError(f"cannot create the lock file {self.path}: {_reason(e)}") from e
            try:
                taken = self._take(fd, fresh)
            except BaseException:
                os.close(fd)
                raise
            if taken:
                break
            os.close(fd)
        else:
            raise Locked(f"{self.dir}: could not take its lock file {self.path}, which other processes keep taking "
                         f"and releasing; try again, or use another --output", self.path)
        self._fd = fd
        try:
            mine = {"pid": os.getpid(), "host": socket.gethostname(), "boot": _boot_id(),
                    "started": _stat(os.getpid())[1]}
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(mine).encode())
            os.fsync(fd)
        except OSError as e:
            self._release()
            raise OSError(f"could not write the lock file {self.path}: {_reason(e)}") from e
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="RunLock heartbeat", daemon=True)
        self._beat.start()
        removed = remove_stale_temporaries(self.dir)
        if removed:
            print(f"{self.dir}: removed {len(removed)} temporary file(s) that an interrupted write left: "
                  f"{', '.join(removed)}")
        return self

    def _take(self, fd, fresh):
        """Take the lock through `fd`, the open lock file (`fresh`: created by this call): True; False when the
        caller must open the file again (it was released or removed meanwhile); Locked when a process holds it."""
        flocked = False
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                flocked = True
            except BlockingIOError:  # a running process holds it (or its children, for the moment they outlive it)
                holder = _holder(self._read(fd))
                who = _describe(holder)
                raise Locked(f"{self.dir} is {'in use by ' + who if holder else 'being taken by another process'} "
                             f"(lock file {self.path}): wait for it to finish, or use another --output" +
                             (" (--steal-lock takes only a lock whose holder is gone; this one is running)"
                              if self.steal else ""), self.path, who) from None
            except OSError:
                pass  # no flock on this file system: the pid and host in the file decide alone
            # The holder removes the file before it lets go of the flock: a file that is no longer the lock file was
            # released after we opened it, and its lock means nothing.
            if flocked and not self._is_lock_file(fd):
                return False
        raw = self._read(fd)
        holder = _holder(raw)
        if holder is None:
            if not flocked and not fresh and _young(self.path):  # without flock: maybe being written this instant
                raise Locked(f"{self.dir} is being taken by another process (lock file {self.path}); try again in a "
                             f"moment, or use another --output", self.path)
            if raw.strip():
                print(f"{self.path} names no holder ({raw[:60]!r}): it is not a lock this project wrote, and no "
                      f"process holds it; taken over")
        else:
            alive = _holder_alive(holder, os.fstat(fd).st_mtime)
            who = _describe(holder)
            if alive is not False and not self.steal:
                if alive is None:
                    why = ("which this machine cannot check: wait for that run to finish, or use another --output; "
                           "if it is gone (killed, or its machine restarted), re-run with --steal-lock")
                else:
                    why = (f"wait for it to finish, or use another --output; if process {holder['pid']} is not a run "
                           f"of this project (its pid was reused, e.g. after a reboot), re-run with --steal-lock")
                raise Locked(f"{self.dir} is in use by {who} (lock file {self.path}), {why}", self.path, who)
            if alive is not False:
                print(f"{self.path}: taking over the lock of {who} (--steal-lock)")
        if not flocked and not fresh:  # no flock: remove the old file and create ours with O_EXCL (not atomic)
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
            return False
        return True

    @staticmethod
    def _read(fd, limit=4096):
        try:
            return os.pread(fd, limit, 0) if hasattr(os, "pread") else (os.lseek(fd, 0, 0), os.read(fd, limit))[1]
        except OSError:
            return b""

    def _is_lock_file(self, fd):
        try:
            mine, now = os.fstat(fd), os.stat(self.path)
        except OSError:
            return False
        return (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino)

    def _heartbeat(self):
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(self._fd)
            except (OSError, NotImplementedError):
                pass  # a file system that refuses it: waiting processes then give up sooner, nothing worse

    def _release(self):
        try:
            if self._is_lock_file(self._fd):
                os.remove(self.path)  # while still holding the flock (see _take)
            else:
                print(f"{self.path}: the lock of this run was taken over by another process (--steal-lock) while "
                      f"it ran")
        except FileNotFoundError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None

    def __exit__(self, *exc):
        self._stop.set()
        self._beat.join()
        self._release()


def _describe(holder):
    return None if holder is None else f"process {holder['pid']} on {holder['host']}"


def _young(path, seconds=5.0):
    try:
        return time.time() - os.path.getmtime(path) < seconds
    except OSError:
        return False


def _lock_state(path):
    """What changes in a lock file while its holder runs: its inode (a new holder), its time (the heartbeat), its
    size. None if there is none."""
    try:
        st = os.stat(path)
    except (OSError, TypeError):
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class LockWait:
    """A wait for a run directory that another process holds (protocols.py, which leaves a held run to its process
    and collects it later): call check(e) after each Locked. It says once what it waits for, and when the lock file
    has not changed (no heartbeat, no new holder) for LOCK_SILENCE_SECONDS, it gives up with Locked naming the lock
    file and --steal-lock: the holder is gone (another host's, or a pid reused) or stopped. A wait for a running
    holder is as long as its run."""

    def __init__(self):
        self.state, self.since = None, None

    def check(self, locked):
        state, now = _lock_state(locked.path), time.monotonic()
        if self.since is None:
            print(f"waiting for {locked.holder or 'the process that holds it'} to finish "
                  f"{os.path.dirname(locked.path or '') or 'its run'} (lock file {locked.path}); a running holder "
                  f"refreshes its lock every {HEARTBEAT_SECONDS:g} s, and this wait gives up after "
                  f"{LOCK_SILENCE_SECONDS:g} s without a refresh")
        if self.since is None or state != self.state:
            self.state, self.since = state, now
        elif now - self.since >= LOCK_SILENCE_SECONDS:
            raise Locked(f"gave up waiting for {locked.holder or 'the holder of ' + str(locked.path)}: its lock file "
                         f"{locked.path} has not been refreshed for {now - self.since:.0f} s (a running holder "
                         f"refreshes it every {HEARTBEAT_SECONDS:g} s). If that process is stopped, resume it; if it "
                         f"is gone (killed on another machine, or its pid reused after a reboot), re-run with "
                         f"--steal-lock", locked.path, locked.holder)
