"""
train.py's flags and run flow as a user meets them: values refused when the command is parsed, a finished run asked
for again, an --overwrite that trains nothing, --resume of a checkpoint that cannot be resumed, and the one-line
`error: ...` of every command-line entry point (cli.py). CPU, the shared tiny CLIP, a small four-colour benchmark.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from engine import cli
import isp
from tools import protocols
import train
from conftest import colour_benchmark, run_maple as run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project folder


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return colour_benchmark(str(tmp_path_factory.mktemp("flags")), n_train=4, n_test=3)


def saved(path):
    return torch.load(path, weights_only=True)


# ----------------------------------------------------------------------------------------------------------------------
# Values refused at parse time, naming the flag and its valid range

@pytest.mark.parametrize("flags, message", [
    (["--method", "isp", "--sp-lambda", "-5"], "--sp-lambda must be a finite number >= 0, got -5.0"),
    (["--method", "isp", "--prompt-std", "nan"], "--prompt-std must be a finite number >= 0, got nan"),
    (["--method", "isp", "--self-ratio", "0"], "--self-ratio must be a fraction of the width in (0, 1], got 0.0"),
    (["--method", "isp", "--cross-ratio", "1e9"], "--cross-ratio must be a fraction of the width in (0, 1]"),
    (["--method", "isp", "--sp-template", "{x}"], "--sp-template must hold exactly one {} (the class name)"),
    (["--method", "isp", "--sp-template", "a {} of {}"], "--sp-template must hold exactly one {}"),
    (["--lr", "1e308"], "--lr must be a finite number > 0 and <= 1"),
    (["--seed", str(2 ** 40)], "--seed must be an integer >= 0 and <= 4294967295"),
    (["--output", ""], "--output must be a directory path"),
    (["--workers", "100000"], "--workers must be an integer in [0, "),
    (["--resume", "--eval-only"], "--resume continues training"),
])
def test_bad_flags_are_refused_at_parse_time_with_their_range(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.get_args(flags)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_isp_config_validates_itself():
    """The config refuses its own bad values on construction (train.py only names the flag): code that builds an ISP
    without train.py gets the same checks."""
    for bad in (dict(sp_lambda=-5.0), dict(prompt_std=float("nan")), dict(self_ratio=0.0), dict(cross_ratio=1e9),
                dict(sp_template="{x}")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            isp.ISPConfig(**bad)
    isp.ISPConfig(sp_lambda=0.0, prompt_std=0.0, self_ratio=1.0, sp_template="{}")  # the edges of the ranges hold


def test_good_flags_still_parse():
    args = train.get_args(["--method", "isp", "--lr", "1", "--seed", str(2 ** 32 - 1), "--workers", "0",
                           "--sp-template", "itap of a {}.", "--output", "x"])
    assert args.lr == 1 and train.method_config(args).sp_template == "itap of a {}."


# ----------------------------------------------------------------------------------------------------------------------
# A finished run asked for again

def test_a_finished_run_asked_again_prints_its_results_and_trains_nothing(tmp_path, tiny, colours, capsys):
    first = run(tmp_path, tiny, colours)
    kept = {f: (tmp_path / "run" / f).read_bytes() for f in ("checkpoint.pt", "results.json")}
    capsys.readouterr()
    again = run(tmp_path, tiny, colours)
    out = capsys.readouterr().out
    assert again["accuracy"] == first["accuracy"] and again["wall_seconds"] == first["wall_seconds"]
    assert "already finished with these settings" in out and "--overwrite" in out
    assert f"all {first['accuracy']['all']:.2f}" in out
    assert "epoch 1/2" not in out  # nothing trained
    assert {f: (tmp_path / "run" / f).read_bytes() for f in kept} == kept
    # through the command line's way out: exit status 0
    with pytest.raises(SystemExit) as e:
        cli.run(lambda argv: train.main(argv, clip_model=tiny, benchmarks={"all": colours}),
                ["--method", "maple", "--subsample", "all", "--output", str(tmp_path / "run"), "--epochs", "2",
                 "--depth", "2"])
    assert e.value.code == 0


def test_a_finished_run_of_other_settings_is_refused_naming_them(tmp_path, tiny, colours):
    run(tmp_path, tiny, colours)
    with pytest.raises(FileExistsError, match=r"finished run of other settings \(.*epochs: 2 then, 3 now.*--overwrite"):
        run(tmp_path, tiny, colours, "--epochs", "3")


def test_a_finished_evaluation_of_a_changed_load_file_is_not_reused(tmp_path, tiny, colours):
    run(tmp_path, tiny, colours, name="a")
    run(tmp_path, tiny, colours, "--lr", "0.01", name="b")
    loaded = tmp_path / "prompts.pt"
    loaded.write_bytes((tmp_path / "a" / "checkpoint.pt").read_bytes())
    run(tmp_path, tiny, colours, "--eval-only", "--load", str(loaded), name="ev")
    loaded.write_bytes((tmp_path / "b" / "checkpoint.pt").read_bytes())  # the same path, other prompts
    with pytest.raises(FileExistsError, match=r"prompts\.pt, which has changed since.*--overwrite"):
        run(tmp_path, tiny, colours, "--eval-only", "--load", str(loaded), name="ev")


# ----------------------------------------------------------------------------------------------------------------------
# --overwrite of a run that trains nothing: the checkpoint beside the results is what they evaluated

def test_overwrite_with_zero_epochs_replaces_the_checkpoint_with_what_it_evaluated(tmp_path, tiny, colours):
    run(tmp_path, tiny, colours)
    trained = saved(tmp_path / "run" / "checkpoint.pt")["params"]
    res = run(tmp_path, tiny, colours, "--overwrite", "--epochs", "0")
    ckpt = saved(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["identity"] == res["identity"] and ckpt["epoch"] == 0
    assert any(not torch.equal(ckpt["params"][k], trained[k]) for k in trained)
    # what a transfer run loads from it gives exactly these results
    ev = run(tmp_path, tiny, colours, "--eval-only", "--load", str(tmp_path / "run" / "checkpoint.pt"), name="ev")
    assert ev["accuracy"] == res["accuracy"]


def test_overwrite_by_an_evaluation_of_other_prompts_replaces_the_checkpoint(tmp_path, tiny, colours):
    run(tmp_path, tiny, colours, "--lr", "0.01", name="other")
    run(tmp_path, tiny, colours)
    res = run(tmp_path, tiny, colours, "--overwrite", "--eval-only", "--load", str(tmp_path / "other" / "checkpoint.pt"))
    ckpt, other = saved(tmp_path / "run" / "checkpoint.pt"), saved(tmp_path / "other" / "checkpoint.pt")
    assert ckpt["identity"] == res["identity"]
    assert all(torch.equal(ckpt["params"][k], other["params"][k]) for k in other["params"])


def test_overwrite_by_zero_shot_leaves_no_checkpoint(tmp_path, tiny, colours):
    run(tmp_path, tiny, colours)
    train.main(["--method", "zeroshot", "--subsample", "all", "--output", str(tmp_path / "run"), "--overwrite"],
               clip_model=tiny, benchmarks={"all": colours})
    assert sorted(os.listdir(tmp_path / "run")) == ["results.json", "train.log"]


def test_zero_epoch_transfer_source_is_what_its_targets_evaluate(tmp_path, tiny, tree_copy):
    root, _ = tree_copy
    out = str(tmp_path / "out")
    flags = ["--method", "maple", "--depth", "2", "--epochs", "1", "--root", root, "--shots", "2"]
    protocols.run_protocol("domain_generalization", flags, ["imagenet"], [1], out, tiny, targets=["imagenet_r"])
    protocols.run_protocol("domain_generalization", flags + ["--epochs", "0", "--overwrite"], ["imagenet"], [1], out,
                           tiny, targets=["imagenet_r"])
    src = protocols.run_path(out, "source", "maple", "imagenet", 2, 1)
    with open(os.path.join(src, "results.json")) as f:
        results = json.load(f)
    ckpt = saved(os.path.join(src, "checkpoint.pt"))
    assert results["identity"]["epochs"] == 0 and ckpt["identity"] == results["identity"]


# ----------------------------------------------------------------------------------------------------------------------
# --resume of a checkpoint that cannot be resumed

@pytest.mark.parametrize("damage", ["no rng", "a list", "rng not a dict"])
def test_resume_of_an_unresumable_checkpoint_names_the_file(tmp_path, tiny, colours, damage):
    run(tmp_path, tiny, colours)
    path = tmp_path / "run" / "checkpoint.pt"
    ckpt = saved(path)
    if damage == "no rng":
        del ckpt["rng"]
    elif damage == "rng not a dict":
        ckpt["rng"] = [1, 2]
    torch.save([ckpt] if damage == "a list" else ckpt, path)
    with pytest.raises(ValueError) as e:
        run(tmp_path, tiny, colours, "--resume")
    assert str(path) in str(e.value)
    if damage != "a list":  # (a list is refused by the checkpoint reader itself, naming the file)
        assert "lacks what resuming needs (rng missing or malformed)" in str(e.value) and "--overwrite" in str(e.value)


# ----------------------------------------------------------------------------------------------------------------------
# One line for the user's errors, a traceback for bugs (cli.py)

def test_cli_prints_a_user_error_as_one_line_and_exits_1(tmp_path, tiny, colours, capsys):
    run(tmp_path, tiny, colours)
    argv = ["--method", "maple", "--subsample", "all", "--output", str(tmp_path / "run"), "--epochs", "3",
            "--depth", "2", "--resume"]
    main = lambda a: train.main(a, clip_model=tiny, benchmarks={"all": colours})
    with pytest.raises(SystemExit) as e:
        cli.run(main, argv)
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: --resume: ") and err.count("\n") == 1
    with pytest.raises(ValueError, match="other settings"):  # --debug: the traceback
        cli.run(main, argv + ["--debug"])


def test_cli_keeps_the_traceback_of_a_bug():
    def buggy(argv):
        return {}["missing"]

    def library(argv):
        return torch.zeros(2) @ torch.zeros(3)  # a RuntimeError raised inside torch, on a line of ours

    def asserted(argv):
        assert argv == ["x"]

    for main, kind in ((buggy, KeyError), (library, RuntimeError), (asserted, AssertionError)):
        with pytest.raises(kind):
            cli.run(main, [])


ENTRY_POINTS = ("train.py", "tools/protocols.py", "data.py", "world/__main__.py", "bench.py")


def test_entry_points_print_one_line_errors(tmp_path, capsys):
    """Each command line's user errors through cli.run: a missing CLIP file, a missing dataset, a --root that is a
    file; and every entry point's `__main__` is cli.run(main)."""
    import data
    import world.__main__ as world_cli
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    no_clip = str(tmp_path / "no_such_clip.pt")
    for main, argv in ((protocols.main, ["base2new", "--clip", no_clip, "--output", str(tmp_path / "out")]),
                       (data.main, ["--root", str(tmp_path / "no_such_root"), "--dataset", "eurosat"]),
                       (world_cli.main, ["--render", "--root", str(a_file / "inside")])):
        with pytest.raises(SystemExit) as e:
            cli.run(main, argv)
        err = capsys.readouterr().err
        assert e.value.code == 1 and err.startswith("error: ") and err.count("\n") == 1, (main.__module__, err)
    for name in ENTRY_POINTS:
        with open(os.path.join(ROOT, name)) as f:
            assert f.read().rstrip().endswith("cli.run(main)"), name


def test_train_py_prints_a_user_error_as_one_line(tmp_path):
    """train.py as a user runs it, in its own process: one line on stderr, exit status 1."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--clip", str(tmp_path / "no_such_clip.pt"),
                        "--output", str(tmp_path / "run")], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.startswith("error: ") and p.stderr.count("\n") == 1, p.stderr
    assert "no_such_clip.pt" in p.stderr


@pytest.mark.parametrize("root_is", ["missing", "a file"])
def test_a_root_that_is_not_there_is_said_before_clip_loads(tmp_path, monkeypatch, root_is):
    """--dataset eurosat on a --root that does not exist (or is a file): said first, not after (or hidden behind) the
    CLIP's loading; the mini world is drawn into a new --root, so there it is no error."""
    from engine import inputs
    root = tmp_path / "DATA"
    if root_is == "a file":
        root.write_text("not a folder")

    def no_clip(*a, **k):
        raise AssertionError("CLIP was loaded before the --root was checked")

    monkeypatch.setattr(inputs, "clip_for", no_clip)
    said = "is not a folder" if root_is == "a file" else "does not exist"
    with pytest.raises(FileNotFoundError, match=f"--root {root} {said}: .*--dataset eurosat is read from {root}/eurosat"):
        train.main(["--dataset", "EuroSAT", "--root", str(root), "--output", str(tmp_path / "run")])
    inputs.check_root(str(tmp_path / "new"), "mini_world_fine")  # drawn there
    inputs.check_root(str(tmp_path / "new"), None)


def test_one_epoch_is_said_to_be_only_the_warm_up(tmp_path, tiny, colours, capsys):
    """--epochs 1 trains at the warm-up's 1e-5 only: the run and --help say so; two epochs are no warm-up alone."""
    run(tmp_path, tiny, colours, "--epochs", "1")
    note = "note: --epochs 1 trains only the warm-up epoch, at a constant LR of 1e-05; the recipe's LR 0.0035 starts"
    assert note in capsys.readouterr().out
    run(tmp_path, tiny, colours, name="two")
    assert "warm-up" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        train.get_args(["--help"])
    assert "--epochs 1 learns next to nothing" in " ".join(capsys.readouterr().out.split())
