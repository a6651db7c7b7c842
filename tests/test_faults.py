"""
Nothing lost, nothing silently wrong: bad flags, faults and interruptions as a user meets them, on train.py,
protocols.py and rundir.py (the run directory's identity, lock and atomic writes). CPU, the shared tiny CLIP, a small
four-colour benchmark written here.
"""
import errno
import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

import data
from tools import protocols
from engine import rundir
import train
from conftest import colour_benchmark, run_maple as run

@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return colour_benchmark(str(tmp_path_factory.mktemp("faults")), n_train=4, n_test=3)


def files(folder):
    return sorted(os.listdir(folder))


# ----------------------------------------------------------------------------------------------------------------------
# Flags refused before anything runs

@pytest.mark.parametrize("flags, message", [
    (["--lr", "nan"], "--lr must be a finite number > 0"), (["--lr", "-1"], "--lr must be"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1"),
    (["--test-batch-size", "0"], "--test-batch-size must be"), (["--crop-scale", "2"], "--crop-scale must be"),
    (["--seed", "-1"], "--seed must be an integer >= 0"), (["--epochs", "-2"], "--epochs must be an integer >= 0"),
    (["--weight-decay", "inf"], "--weight-decay must be"), (["--resume", "--overwrite"], "give one of them"),
    (["--n-rm", "9"], "MPL removes at most what it adds"), (["--precision", "amp", "--device", "cpu"], "is CUDA autocast")])
def test_bad_flags_are_refused_at_parse_time(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.get_args(["--method", "maple", *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_cuda_without_a_gpu_is_refused(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here: --device cuda is valid")
    with pytest.raises(SystemExit):
        train.get_args(["--device", "cuda"])
    assert "no CUDA GPU is visible" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------------
# --overwrite removes nothing before the new run has a checkpoint; --resume needs the same run

def test_overwrite_of_an_eval_only_run_keeps_the_prompts_it_reads(tmp_path, tiny, colours):
    run(tmp_path, tiny, colours)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    before = torch.load(ckpt, weights_only=True)["params"]
    res = run(tmp_path, tiny, colours, "--eval-only", "--load", str(ckpt), "--overwrite")
    assert ckpt.exists() and res["accuracy"]["all"] >= 0
    after = torch.load(ckpt, weights_only=True)["params"]
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_overwrite_with_a_bad_clip_loses_nothing(tmp_path, tiny, colours):
    run(tmp_path, tiny, colours)
    kept = {f: (tmp_path / "run" / f).read_bytes() for f in ("checkpoint.pt", "results.json")}
    with pytest.raises(FileNotFoundError, match="--clip"):
        train.main(["--method", "maple", "--output", str(tmp_path / "run"), "--overwrite", "--clip", "/no/such.pt"],
                   benchmarks={"all": colours, "base": colours, "new": colours})
    assert {f: (tmp_path / "run" / f).read_bytes() for f in kept} == kept


def test_overwrite_replaces_the_old_run_at_its_first_checkpoint(tmp_path, tiny, colours, monkeypatch):
    run(tmp_path, tiny, colours)
    old = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    real = train.evaluate
    monkeypatch.setattr(train, "evaluate", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # dies after training, before its results
        run(tmp_path, tiny, colours, "--overwrite", "--lr", "0.01")
    monkeypatch.setattr(train, "evaluate", real)
    # the old results no longer describe the checkpoint beside them, so they are gone; the new checkpoint is there
    assert files(tmp_path / "run") == ["checkpoint.pt", "train.log"] and (tmp_path / "run" / "checkpoint.pt").read_bytes() != old


def test_resume_with_other_data_is_refused_naming_the_settings(tmp_path, tiny, colours, monkeypatch):
    real = rundir.atomic_save

    def die_after_epoch_1(obj, path, save):
        real(obj, path, save)
        if path.endswith("checkpoint.pt"):
            raise KeyboardInterrupt

    monkeypatch.setattr(rundir, "atomic_save", die_after_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, tiny, colours)
    monkeypatch.setattr(rundir, "atomic_save", real)
    with pytest.raises(ValueError, match=r"other settings \(seed: 1 then, 5 now; shots: 16 then, 8 now\)"):
        run(tmp_path, tiny, colours, "--resume", "--shots", "8", "--seed", "5")
    res = run(tmp_path, tiny, colours, "--resume")  # the same flags continue it
    assert res["identity"]["seed"] == 1


def test_resume_of_a_finished_run_keeps_its_timing(tmp_path, tiny, colours):
    first = run(tmp_path, tiny, colours)
    again = run(tmp_path, tiny, colours, "--resume")
    assert first["sec_per_step"] is not None and again["sec_per_step"] == first["sec_per_step"]
    assert again["accuracy"] == first["accuracy"]


# ----------------------------------------------------------------------------------------------------------------------
# Non-finite values are never saved

def test_prompts_that_become_infinite_stop_the_run_and_are_not_saved(tmp_path, tiny, colours, monkeypatch):
    real_step, calls = torch.optim.SGD.step, {"n": 0}

    def step_to_inf(self, *a, **kw):  # the 10th step (epoch 2) leaves a prompt infinite, with a finite loss
        out = real_step(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] == 10:
            self.param_groups[0]["params"][0].data.fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", step_to_inf)
    with pytest.raises(FloatingPointError, match=r"prompts became non-finite.*epoch 2.*checkpoint\.pt \(epoch 1\), "
                                                 r"is finite and kept"):
        run(tmp_path, tiny, colours, "--batch-size", "2")
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 1 and all(torch.isfinite(v).all() for v in saved["params"].values())
    assert not (tmp_path / "run" / "results.json").exists()


# ----------------------------------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM: one line saying what is kept and how to go on, exit status 130 / 143, the lock released

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project folder
TRAIN_PY = os.path.join(ROOT, "train.py")


def checkpoint_epoch(path):
    try:
        return torch.load(path, weights_only=True)["epoch"]
    except (OSError, RuntimeError, EOFError):  # not written yet
        return None


def test_ctrl_c_then_sigterm_of_train_py_keep_the_last_epoch_and_resume_from_it(tmp_path):
    """A real run of the mini world (python train.py, its own process): Ctrl-C once an epoch is saved, then the
    command the line names, which says where it continues, SIGTERM once it has saved a later epoch."""
    import shlex
    import signal
    run_dir = tmp_path / "run"
    flags = ["--method", "maple", "--depth", "2", "--shots", "1", "--epochs", "1000", "--root", str(tmp_path / "data"),
             "--output", str(run_dir)]
    command, kept = [sys.executable, TRAIN_PY, *flags], 0
    for signum, status, said in ((signal.SIGINT, 130, "interrupted (Ctrl-C)"), (signal.SIGTERM, 143,
                                                                                 "terminated (SIGTERM)")):
        with open(tmp_path / "out.txt", "w") as out:
            # Ctrl-C's default in the child, whatever this suite inherited: a shell starts a job it sends to the
            # background (`.ci/run &`) with SIGINT ignored, and Python then never raises KeyboardInterrupt.
            p = subprocess.Popen(command, cwd=tmp_path, stdout=out, stderr=subprocess.PIPE, text=True,
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.time() + 120
            while (checkpoint_epoch(run_dir / "checkpoint.pt") or 0) <= kept and time.time() < deadline:
                assert p.poll() is None, p.stderr.read()
                time.sleep(0.05)
            p.send_signal(signum)
            rc, err = p.wait(timeout=60), p.stderr.read()
        finally:
            p.kill()
            p.wait()
        epoch = checkpoint_epoch(run_dir / "checkpoint.pt")
        resume = f"python {TRAIN_PY} {shlex.join(flags)} --resume"
        assert (rc, err) == (status, f"{said}: {run_dir}/checkpoint.pt keeps epoch {epoch} of 1000; to go on from "
                                     f"it: {resume}\n")
        assert epoch > kept and not (run_dir / ".lock").exists()
        if signum == signal.SIGTERM:  # the resumed run said where it went on
            assert (f"--resume: {run_dir}/checkpoint.pt holds epoch {kept} of 1000; continuing with epoch {kept + 1}"
                    in (tmp_path / "out.txt").read_text())
        command, kept = [sys.executable, *shlex.split(resume)[1:]], epoch  # the command it said, as it said it


def test_an_interrupted_run_names_its_checkpoint_and_the_command_without_overwrite(tmp_path, tiny, colours,
                                                                                   monkeypatch, capsys):
    """Ctrl-C in the evaluation after the last epoch: --resume in place of --overwrite, which evaluates it; before an
    epoch finished: nothing new is saved. The lock goes either way."""
    from engine import cli
    run(tmp_path, tiny, colours)
    argv = ["--method", "maple", "--subsample", "all", "--output", str(tmp_path / "run"), "--epochs", "2",
            "--depth", "2"]

    def main(argv):
        return train.main(argv, clip_model=tiny, benchmarks={"all": colours})

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    real = train.evaluate
    monkeypatch.setattr(train, "evaluate", interrupt)
    with pytest.raises(SystemExit) as e:
        cli.run(main, argv + ["--overwrite"])
    script = os.path.relpath(TRAIN_PY)
    assert e.value.code == 130 and capsys.readouterr().err == (
        f"interrupted (Ctrl-C): {tmp_path}/run/checkpoint.pt keeps epoch 2 of 2; to go on from it: python {script} "
        f"{' '.join(argv)} --resume\n")
    assert files(tmp_path / "run") == ["checkpoint.pt", "train.log"]  # the old results went at the first epoch
    monkeypatch.setattr(train, "evaluate", real)
    with pytest.raises(SystemExit) as e:
        cli.run(main, argv + ["--resume"])
    assert e.value.code == 0
    assert f"{tmp_path}/run/checkpoint.pt holds epoch 2 of 2; its training is done, it is evaluated" in \
        capsys.readouterr().out
    monkeypatch.setattr(train, "train", interrupt)
    with pytest.raises(SystemExit) as e:
        cli.run(main, ["--method", "maple", "--subsample", "all", "--output", str(tmp_path / "new")])
    assert e.value.code == 130 and capsys.readouterr().err == (
        "interrupted (Ctrl-C): no epoch of this run finished, nothing new is saved; run the same command again\n")
    assert files(tmp_path / "new") == ["train.log"]


# ----------------------------------------------------------------------------------------------------------------------
# Disk, files, datasets

def test_unwritable_output_fails_before_training(tmp_path, tiny, colours):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match=r"output directory .*a_file/run is not writable"):
        train.main(["--method", "maple", "--output", str(blocker / "run")], clip_model=tiny,
                   benchmarks={"base": colours})


def test_full_disk_names_the_file_and_leaves_no_debris(tmp_path, tiny, colours, monkeypatch):
    run(tmp_path, tiny, colours)
    old = (tmp_path / "run" / "checkpoint.pt").read_bytes()

    def full(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match=r"could not write .*checkpoint\.pt: the disk is full\. The previous file"):
        run(tmp_path, tiny, colours, "--overwrite")
    assert files(tmp_path / "run") == ["checkpoint.pt", "results.json", "train.log"]  # no temporary file, no lock left
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == old


@pytest.mark.parametrize("content, message", [(b"", "is an empty file"), (b'{"accuracy": 1}', "is a JSON file"),
                                              (None, "truncated")])
def test_unreadable_checkpoints_say_what_they_are(tmp_path, tiny, colours, content, message):
    run(tmp_path, tiny, colours)
    bad = tmp_path / "bad.pt"
    good = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    bad.write_bytes(good[:len(good) // 2] if content is None else content)
    with pytest.raises((ValueError, RuntimeError), match=message):
        run(tmp_path, tiny, colours, "--eval-only", "--load", str(bad), name="ev")


def test_truncated_image_is_named(tmp_path, tiny, colours):
    broken = tmp_path / "broken.png"
    broken.write_bytes(open(colours.test[0].impath, "rb").read()[:60])
    bench = data.Benchmark("colours", colours.train, [], colours.test[:2] + [data.Datum(str(broken), 0, "red")],
                           colours.classnames, colours.template)
    with pytest.raises(OSError, match=r"broken\.png"):
        train.main(["--method", "zeroshot", "--subsample", "all", "--output", str(tmp_path / "z")], clip_model=tiny,
                   benchmarks={"all": bench})


def test_training_on_a_test_only_set_says_so(tmp_path, tiny, colours):
    test_only = data.Benchmark("sketches", [], [], colours.test, colours.classnames, colours.template)
    with pytest.raises(ValueError, match="no training images .*--eval-only --load"):
        train.main(["--method", "maple", "--subsample", "all", "--output", str(tmp_path / "t")], clip_model=tiny,
                   benchmarks={"all": test_only})


# ----------------------------------------------------------------------------------------------------------------------
# One process per run directory

def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    with rundir.RunLock(tmp_path):
        with pytest.raises(rundir.Locked, match=f"in use by process {os.getpid()}"):
            with rundir.RunLock(tmp_path):
                pass
    assert not (tmp_path / ".lock").exists()
    (tmp_path / ".lock").write_text(json.dumps({"pid": dead_pid(), "host": os.uname().nodename}))
    with rundir.RunLock(tmp_path):  # a killed run's lock
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


def test_a_second_run_on_the_same_directory_is_refused(tmp_path, tiny, colours):
    (tmp_path / "run").mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "run" / ".lock").write_text(json.dumps({"pid": sleeper.pid, "host": os.uname().nodename}))
        with pytest.raises(rundir.Locked, match=f"process {sleeper.pid}"):
            run(tmp_path, tiny, colours)
        assert files(tmp_path / "run") == [".lock"]
    finally:
        sleeper.kill()


def test_protocol_leaves_a_held_run_to_its_process_and_collects_it(tmp_path, tiny, tree_copy, monkeypatch):
    root, _ = tree_copy
    out = str(tmp_path / "out")
    flags = ["--method", "maple", "--depth", "2", "--epochs", "1", "--root", root, "--shots", "2"]
    held = os.path.join(out, "base2new", "maple", "eurosat", "shots2_seed1")
    os.makedirs(held)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    with open(os.path.join(held, ".lock"), "w") as f:
        json.dump({"pid": other.pid, "host": os.uname().nodename}, f)
    order = []
    real_main = train.main

    def main(argv, **kw):  # records the runs done here, in order
        result = real_main(argv, **kw)
        order.append(result["dataset"])
        return result

    monkeypatch.setattr(train, "main", main)
    threading.Timer(1.0, lambda: (other.kill(), other.wait())).start()  # it dies; its run is then done here
    res = protocols.run_protocol("base2new", flags, ["eurosat", "oxford_pets"], [1], out, tiny, poll_seconds=0.2)
    other.wait()
    assert order == ["oxford_pets", "eurosat"]  # the held run did not block the free one
    assert [r["dataset"] for r in res] == ["eurosat", "oxford_pets"]


# ----------------------------------------------------------------------------------------------------------------------
# Protocols: settings identity and transfer re-scoring

def test_protocol_rerun_with_other_settings_is_refused_then_overwritten(tmp_path, tiny, tree_copy):
    root, _ = tree_copy
    out = str(tmp_path / "out")
    flags = ["--method", "maple", "--depth", "2", "--epochs", "1", "--root", root, "--shots", "2"]
    first = protocols.run_protocol("base2new", flags, ["eurosat"], [1], out, tiny)
    same = protocols.run_protocol("base2new", flags, ["eurosat"], [1], out, tiny)
    assert same[0]["wall_seconds"] == first[0]["wall_seconds"]  # skipped: the same settings
    changed = flags + ["--lr", "0.02"]
    with pytest.raises(ValueError, match=r"finished run of other settings: lr: 0\.0035 then, 0\.02 now.*--overwrite"):
        protocols.run_protocol("base2new", changed, ["eurosat"], [1], out, tiny)
    redone = protocols.run_protocol("base2new", changed + ["--overwrite"], ["eurosat"], [1], out, tiny)
    assert redone[0]["identity"]["lr"] == 0.02


def test_transfer_targets_are_rescored_when_the_source_is_retrained(tmp_path, tiny, tree_copy):
    root, _ = tree_copy
    out = str(tmp_path / "out")
    flags = ["--method", "maple", "--depth", "2", "--epochs", "1", "--root", root, "--shots", "2"]
    first = protocols.run_protocol("domain_generalization", flags, ["imagenet"], [1], out, tiny,
                                   targets=["imagenet_r"])
    sha = first[0]["source"]["checkpoint_sha256"]
    again = protocols.run_protocol("domain_generalization", flags, ["imagenet"], [1], out, tiny, targets=["imagenet_r"])
    assert again[0]["wall_seconds"] == first[0]["wall_seconds"]  # nothing changed: skipped
    retrained = protocols.run_protocol("domain_generalization", flags + ["--lr", "0.05", "--overwrite"], ["imagenet"],
                                       [1], out, tiny, targets=["imagenet_r"])
    assert retrained[0]["source"]["checkpoint_sha256"] != sha
    assert retrained[0]["source"]["identity"]["lr"] == 0.05
    with open(os.path.join(out, "domain_generalization", "maple", "imagenet_r", "shots2_seed1", "results.json")) as f:
        assert json.load(f)["source"]["checkpoint_sha256"] == retrained[0]["source"]["checkpoint_sha256"]


@pytest.mark.parametrize("flags, message", [(["--classes", "0"], "--classes must be >= 1"),
                                            (["--precision", "fp16", "--device", "cpu"],
                                             "--precision fp16: --device cpu runs fp32 bf16")])
def test_bench_refuses_what_it_cannot_measure(flags, message, capsys):
    import bench
    with pytest.raises(SystemExit):
        bench.main(flags)
    assert message in capsys.readouterr().err
