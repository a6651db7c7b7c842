"""
One process per run directory (rundir.RunLock): an atomic takeover of a stale lock by real processes racing for it,
locks whose holder cannot be checked (a reused pid, another host) and --steal-lock, a protocol that waits for a held
run and says so, and the debris of a killed write (stale temporaries, file modes). CPU only, a few seconds.
"""
import json
import multiprocessing
import os
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

from engine import rundir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project folder

# torch, train and protocols are imported by the tests that use them: the racing processes of the first tests start
# by importing this file, and should not spend seconds importing torch first.


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    from conftest import colour_benchmark
    return colour_benchmark(str(tmp_path_factory.mktemp("locks")), n_train=2, n_test=2)


def write_lock(folder, **holder):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".lock"), "w") as f:
        json.dump(holder, f)


# ----------------------------------------------------------------------------------------------------------------------
# Real processes racing over one stale lock

def _slow_file_system(delay):
    """Every file-system call of rundir takes `delay` seconds more, as on a busy network file system: racing
    processes then interleave between any two calls, even when they share one core."""
    import builtins
    import fcntl

    def slow(call):
        def slowed(*args, **kwargs):
            time.sleep(delay)
            return call(*args, **kwargs)
        return slowed

    for module, names in [(os, ("open", "remove", "stat", "fstat", "pread", "read", "write", "ftruncate", "fsync",
                                "lseek", "listdir", "kill")), (fcntl, ("flock",))]:
        for name in names:
            setattr(module, name, slow(getattr(module, name)))
    rundir.open = slow(builtins.open)


def _race(arrived, tried, folders, outcomes, index, n_workers, delay):
    """For each folder: start at the same instant as the other workers, try the lock, and keep it (if taken) until
    every worker has tried, so that two holders at once would both be counted. The start is a busy wait for the
    others to arrive (waking from a barrier would spread them over the scheduler's latencies): each spins on the CPU
    until the last one arrives, and all go at once."""
    if delay:
        _slow_file_system(delay)
    count = arrived.get_obj()  # read without the lock while spinning
    for trial, folder in enumerate(folders):
        with arrived.get_lock():
            arrived.value += 1
        while count.value < n_workers * (trial + 1):
            pass
        lock = rundir.RunLock(folder)
        try:
            lock.__enter__()
            outcome = "held"
        except rundir.Locked as e:
            outcome = "locked" if ".lock" in str(e) else f"Locked without naming the lock file: {e}"
        except Exception as e:  # noqa: BLE001 - a raw error is what this test looks for
            outcome = f"{type(e).__name__}: {e}"
        outcomes.put((trial, index, outcome))
        tried.wait(timeout=60)
        if outcome == "held":
            lock.__exit__(None, None, None)
        tried.wait(timeout=60)  # let go before the next trial starts


@pytest.mark.parametrize("delay", [0, 0.001], ids=["local", "slow-file-system"])
def test_processes_racing_over_a_stale_lock_give_it_to_exactly_one(tmp_path, delay):
    n_workers, trials = 3, (50 if delay else 100)
    stale = dict(pid=dead_pid(), host=socket.gethostname())  # a killed run's lock, in every folder
    folders = [str(tmp_path / f"run{t}") for t in range(trials)]
    for folder in folders:
        write_lock(folder, **stale)
    ctx = multiprocessing.get_context("spawn")
    arrived, tried, outcomes = ctx.Value("l", 0), ctx.Barrier(n_workers), ctx.Queue()
    workers = [ctx.Process(target=_race, args=(arrived, tried, folders, outcomes, i, n_workers, delay))
               for i in range(n_workers)]
    for w in workers:
        w.start()
    got = [outcomes.get(timeout=120) for _ in range(n_workers * trials)]
    for w in workers:
        w.join(timeout=30)
    per_trial = {}
    for trial, _, outcome in got:
        per_trial.setdefault(trial, []).append(outcome)
    bad = {t: sorted(o) for t, o in per_trial.items() if sorted(o) != ["held"] + ["locked"] * (n_workers - 1)}
    assert not bad, f"{len(bad)} of {trials} trials did not give the lock to exactly one process: {bad}"
    assert all(not os.path.exists(os.path.join(f, ".lock")) for f in folders)  # every holder released it


def _take_and_release(folder, inside, clashes, taken, seconds):
    """Take the lock, check that nobody else is inside, release; again and again for `seconds`."""
    end = time.time() + seconds
    while time.time() < end:
        try:
            with rundir.RunLock(folder):
                with inside.get_lock():
                    inside.value += 1
                    clashes.value += inside.value > 1
                time.sleep(0.0005)
                with inside.get_lock():
                    inside.value -= 1
                taken.value += 1
        except rundir.Locked:
            pass


def test_processes_taking_and_releasing_one_lock_never_hold_it_together(tmp_path):
    """A holder lets go while others open the file: none of them may lock the file it has just removed."""
    ctx = multiprocessing.get_context("spawn")
    inside, clashes, taken = ctx.Value("i", 0), ctx.Value("i", 0), ctx.Value("i", 0)
    workers = [ctx.Process(target=_take_and_release, args=(str(tmp_path), inside, clashes, taken, 1.5))
               for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert taken.value > 20 and clashes.value == 0, (taken.value, clashes.value)
    assert not (tmp_path / ".lock").exists()


# ----------------------------------------------------------------------------------------------------------------------
# Holders that are gone although their pid runs, holders that cannot be checked, --steal-lock

@pytest.fixture
def sleeper():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield p
    p.kill()
    p.wait()


@pytest.mark.parametrize("other", [dict(started=1), dict(boot="another-boot")], ids=["pid-reused", "rebooted"])
def test_a_lock_whose_pid_now_belongs_to_another_process_is_taken_over(tmp_path, sleeper, other):
    if not os.path.exists("/proc/self/stat"):
        pytest.skip("process start times and boot ids are read from Linux's /proc")
    write_lock(tmp_path, **{**dict(pid=sleeper.pid, host=socket.gethostname(), boot=rundir._boot_id(),
                                   started=rundir._stat(sleeper.pid)[1]), **other})
    with rundir.RunLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


def test_a_lock_without_start_time_whose_pid_started_after_it_was_written_is_taken_over(tmp_path, sleeper):
    """A lock of an older version (pid and host only), written a minute before its pid was given to a new process."""
    if not os.path.exists("/proc/self/stat"):
        pytest.skip("process start times are read from Linux's /proc")
    write_lock(tmp_path, pid=sleeper.pid, host=socket.gethostname())
    os.utime(tmp_path / ".lock", (time.time() - 60, time.time() - 60))
    with rundir.RunLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


def test_a_lock_of_the_same_live_process_is_refused(tmp_path, sleeper):
    write_lock(tmp_path, pid=sleeper.pid, host=socket.gethostname(), boot=rundir._boot_id(),
               started=rundir._stat(sleeper.pid)[1])
    with pytest.raises(rundir.Locked, match=f"in use by process {sleeper.pid}"):
        with rundir.RunLock(tmp_path):
            pass


@pytest.mark.parametrize("case", ["another host", "a live pid, no start time"])
def test_a_holder_that_cannot_be_checked_is_reported_with_steal_lock_and_taken_with_it(tmp_path, sleeper, case,
                                                                                         capsys):
    if case == "another host":
        write_lock(tmp_path, pid=12345, host="some-other-machine")
        said = r"process 12345 on some-other-machine .*cannot check.*--steal-lock"
    else:  # a lock file written by hand or by an older version: its pid may be a reused one
        write_lock(tmp_path, pid=sleeper.pid, host=socket.gethostname())
        said = f"process {sleeper.pid} .*lock file .*\\.lock.*not a run of this project.*--steal-lock"
    with pytest.raises(rundir.Locked, match=said):
        with rundir.RunLock(tmp_path):
            pass
    with rundir.RunLock(tmp_path, steal=True):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert "taking over the lock" in capsys.readouterr().out


HOLD = "import sys, time; from engine import rundir; lock = rundir.RunLock(sys.argv[1]).__enter__(); print('held', flush=True); " \
       "time.sleep(60)"


def test_steal_lock_never_takes_a_lock_that_a_running_process_holds(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(rundir.Locked, match=f"in use by process {holder.pid}.*holder is gone; this one is running"):
            with rundir.RunLock(tmp_path, steal=True):
                pass
    finally:
        holder.kill()  # killed with its lock: the kernel lets go of it
        holder.wait()
    with rundir.RunLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


@pytest.mark.parametrize("content", ["[1, 2]", '{"a": 1}', '{"pid": "12", "host": 3}', '{"pid": true, "host": "h"}',
                                     "not json", ""])
def test_a_lock_file_naming_no_holder_is_taken_over_and_named(tmp_path, content, capsys):
    (tmp_path / ".lock").write_text(content)
    os.utime(tmp_path / ".lock", (time.time() - 60, time.time() - 60))  # not being written this instant
    with rundir.RunLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    if content:
        assert f"{tmp_path / '.lock'} names no holder" in capsys.readouterr().out


def test_train_steal_lock_runs_in_a_directory_locked_by_another_host(tmp_path, tiny, colours):
    import train
    write_lock(tmp_path / "run", pid=12345, host="some-other-machine")
    argv = ["--method", "maple", "--depth", "2", "--subsample", "all", "--epochs", "1", "--output",
            str(tmp_path / "run")]
    with pytest.raises(rundir.Locked, match="--steal-lock"):
        train.main(argv, clip_model=tiny, benchmarks={"all": colours})
    result = train.main(argv + ["--steal-lock"], clip_model=tiny, benchmarks={"all": colours})
    assert result["method"] == "maple"
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint.pt", "results.json", "train.log"]  # the lock went


def test_protocols_hands_steal_lock_to_its_runs(monkeypatch, capsys):
    from tools import protocols
    seen = {}
    monkeypatch.setattr(protocols, "run_protocol", lambda protocol, flags, *a, **k: seen.setdefault("flags", flags))
    monkeypatch.setattr(protocols, "summarize", lambda *a, **k: None)
    protocols.main(["base2new", "--method", "maple", "--steal-lock", "--output", "nowhere"])
    assert "--steal-lock" in seen["flags"]
    with pytest.raises(SystemExit):
        protocols.main(["--help"])
    assert "--steal-lock" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------------
# Waiting for a held run: said once, never endless on a silent holder

def test_a_wait_for_a_running_holder_lasts_as_long_as_it_beats(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(rundir, "LOCK_SILENCE_SECONDS", 0.8)
    beating = "from engine import rundir; rundir.HEARTBEAT_SECONDS = 0.1; " + HOLD.replace("time.sleep(60)", "time.sleep(2.5)")
    holder = subprocess.Popen([sys.executable, "-c", beating, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT)
    try:
        assert holder.stdout.readline() == "held\n"
        waiting, start = rundir.LockWait(), time.time()
        while True:
            try:
                with rundir.RunLock(tmp_path):
                    break
            except rundir.Locked as e:
                waiting.check(e)  # would give up after 0.8 s without a heartbeat
                time.sleep(0.05)
        assert time.time() - start > 2
    finally:
        holder.kill()
        holder.wait()
    assert capsys.readouterr().out.count(f"waiting for process {holder.pid}") == 1


def test_protocol_gives_up_on_a_silent_holder_naming_the_lock_and_steal_lock(tmp_path, tiny, tree_copy, sleeper,
                                                                             monkeypatch, capsys):
    from tools import protocols
    root, _ = tree_copy
    out = str(tmp_path / "out")
    flags = ["--method", "maple", "--depth", "2", "--epochs", "1", "--root", root, "--shots", "2"]
    held = os.path.join(out, "base2new", "maple", "eurosat", "shots2_seed1")
    write_lock(held, pid=sleeper.pid, host="some-other-machine")  # gone, say; it never refreshes its lock
    monkeypatch.setattr(rundir, "LOCK_SILENCE_SECONDS", 1.0, raising=False)
    guard = threading.Timer(10, os.remove, [os.path.join(held, ".lock")])  # a wait that never ends: end it, and fail
    guard.start()
    try:
        with pytest.raises(rundir.Locked, match=f"gave up waiting for process {sleeper.pid} on some-other-machine: "
                                                f"its lock file {held}/.lock has not been refreshed.*--steal-lock"):
            protocols.run_protocol("base2new", flags, ["eurosat"], [1], out, tiny, poll_seconds=0.1)
    finally:
        guard.cancel()
    assert capsys.readouterr().out.count("waiting for process") == 1
    done = protocols.run_protocol("base2new", flags + ["--steal-lock"], ["eurosat"], [1], out, tiny)
    assert done[0]["dataset"] == "eurosat" and not os.path.exists(os.path.join(held, ".lock"))


# ----------------------------------------------------------------------------------------------------------------------
# What a killed write leaves, and the mode of what a write makes

KILLED_WRITE = "import sys, time; from engine import rundir; rundir.atomic_save(None, sys.argv[1], lambda o, f: (f.write(b'half'), " \
               "f.flush(), print('writing', flush=True), time.sleep(60)))"


def test_temporaries_of_a_killed_write_go_when_the_run_directory_is_next_locked(tmp_path, sleeper):
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITE, str(tmp_path / "checkpoint.pt")],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert writer.stdout.readline() == "writing\n"
    writer.kill()  # kill -9 in the middle of the write
    writer.wait()
    left = [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    assert len(left) == 1 and left[0].startswith(".checkpoint.pt.")
    mkstemps = ".results.json.k2_9xq0z.tmp"  # the shape of an older version's temporaries (tempfile.mkstemp)
    not_ours = ["notes.tmp", ".x.tmp", ".results.json.short.tmp", ".a.ABCDEFGH.tmp", "results.json"]
    for name in [mkstemps] + not_ours:
        (tmp_path / name).write_text("x")
    (tmp_path / ".d.abcdefgh.tmp").mkdir()
    os.symlink(tmp_path / "results.json", tmp_path / ".l.abcdefgh.tmp")
    write_lock(tmp_path, pid=sleeper.pid, host=socket.gethostname())
    with pytest.raises(rundir.Locked):  # held by a live process: it may be writing them
        with rundir.RunLock(tmp_path):
            pass
    assert left[0] in os.listdir(tmp_path) and mkstemps in os.listdir(tmp_path)
    os.remove(tmp_path / ".lock")
    with rundir.RunLock(tmp_path):
        assert sorted(os.listdir(tmp_path)) == sorted(not_ours + [".d.abcdefgh.tmp", ".l.abcdefgh.tmp", ".lock"])


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_get_the_mode_of_a_new_file(tmp_path, umask):
    import torch
    old = os.umask(umask)
    try:
        rundir.save_json({"a": 1}, str(tmp_path / "results.json"))
        rundir.atomic_save({"p": torch.zeros(2)}, str(tmp_path / "checkpoint.pt"), torch.save)
        with open(tmp_path / "summary.md", "w") as f:  # what a plain open makes
            f.write("x")
    finally:
        os.umask(old)
    modes = {f: stat.S_IMODE(os.stat(tmp_path / f).st_mode) for f in ("results.json", "checkpoint.pt", "summary.md")}
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)
