"""
What a run leaves beside its numbers: train.log (what it printed), the per-epoch history and the per-class accuracy in
results.json; and the programs' --help, which shows every flag's default. CPU, the shared tiny CLIP, a colour benchmark.
"""
import json
import os

import pytest

import train
from conftest import COLOURS, colour_benchmark, run_maple as run


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return colour_benchmark(str(tmp_path_factory.mktemp("runs")), n_train=4, n_test=3)


def test_results_hold_the_history_of_every_epoch(tmp_path, tiny, colours):
    res = run(tmp_path, tiny, colours)
    history = res["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[0]["lr"] == train.WARMUP_LR and history[1]["lr"] == train.get_lr(1, train.RECIPES["maple"].lr, 2)
    for h in history:
        assert h["loss"] > 0 and h["seconds"] >= 0
    with open(tmp_path / "run" / "results.json") as f:
        assert json.load(f)["history"] == history


def test_results_hold_the_per_class_accuracy_of_each_test_split(tmp_path, tiny, colours):
    res = run(tmp_path, tiny, colours)
    per_class = res["per_class_accuracy"]["all"]
    assert list(per_class) == list(COLOURS)
    assert all(0 <= v <= 100 for v in per_class.values())
    # three test images per class: the micro accuracy is the mean of the per-class ones
    assert sum(per_class.values()) / len(per_class) == pytest.approx(res["accuracy"]["all"])
    two = train.main(["--method", "zeroshot", "--output", str(tmp_path / "b2n")], clip_model=tiny,
                     benchmarks={"base": colours, "new": colours})
    assert set(two["per_class_accuracy"]) == {"base", "new"}


def test_the_run_directory_holds_a_log_of_what_was_printed(tmp_path, tiny, colours, capsys):
    run(tmp_path, tiny, colours)
    printed = capsys.readouterr().out
    with open(tmp_path / "run" / "train.log") as f:
        log = f.read()
    assert "epoch 2/2" in log and "maple colours seed 1: all" in log
    assert printed.strip().splitlines()[-1] in log
    run(tmp_path, tiny, colours)  # a second start appends: the log keeps the run's whole story
    with open(tmp_path / "run" / "train.log") as f:
        assert "already finished" in f.read()
    assert os.path.exists(tmp_path / "run" / "results.json")


# ----------------------------------------------------------------------------------------------------------------------
# --help: every flag explained, with its default

def parser_of(main, argv, monkeypatch):
    """The ArgumentParser that a program's main builds (caught when it parses)."""
    import argparse

    class Caught(Exception):
        pass

    def catch(self, *a, **k):
        if self.add_help:  # train.py's first look at --method has no --help: let it parse
            raise Caught(self)
        return real(self, *a, **k)

    real = argparse.ArgumentParser.parse_known_args
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", catch)
    with pytest.raises(Caught) as e:
        main(argv)
    return e.value.args[0]


def programs():
    import bench
    import data
    from tools import protocols
    import world.__main__ as world_cli
    return {"train.py": (train.get_args, []), "train.py --method isp": (train.get_args, ["--method", "isp"]),
            "data.py": (data.main, []), "bench.py": (bench.main, []), "protocols.py": (protocols.main, ["summary"]),
            "python -m world": (world_cli.main, [])}


@pytest.mark.parametrize("program", list(programs()))
def test_every_flag_has_help_that_shows_its_one_default(program, monkeypatch):
    import argparse
    main, argv = programs()[program]
    parser = parser_of(main, argv, monkeypatch)
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{program} {action.option_strings or action.dest}: no help"
        if action.option_strings and action.nargs != 0:  # a flag that takes a value (switches default to off)
            shown = formatter._expand_help(action)
            # one default: a method flag's is its preset's value, not also argparse's None
            assert ("default" in shown) != ("(preset: " in shown), f"{program} {action.option_strings}: {shown}"


# ----------------------------------------------------------------------------------------------------------------------
# $DATA and the mini world: one --root rule; data.py checks the world as it checks a CoOp tree

def test_data_check_reads_the_mini_world(tmp_path, capsys):
    import data
    from world import mini_world
    root = str(tmp_path)
    assert data.main(["--check", "--root", root, "--dataset", "mini_world"]) == 0  # not there yet: missing, no error
    assert "missing" in capsys.readouterr().out
    mini_world.render_world(root, datasets=("mini_world",))
    assert data.main(["--check", "--root", root, "--dataset", "mini_world"]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("mini_world ")]
    assert row and " ok " in row[0]


def test_every_program_takes_its_root_from_data_the_same_way(monkeypatch):
    import data
    import world.__main__ as world_cli
    for value, expected in (("/somewhere/DATA", "/somewhere/DATA"), (None, "data")):
        if value is None:
            monkeypatch.delenv("DATA", raising=False)
        else:
            monkeypatch.setenv("DATA", value)
        for main, argv in ((train.get_args, []), (data.main, []), (world_cli.main, [])):
            assert parser_of(main, argv, monkeypatch).get_default("root") == expected


def test_data_alone_does_not_switch_a_protocol_to_the_papers_datasets(monkeypatch):
    from tools import protocols
    monkeypatch.setenv("DATA", "/somewhere/DATA")
    assert not protocols.papers_datasets(["--method", "mpl"])  # as train.py without --dataset: the mini world
    assert protocols.papers_datasets(["--method", "mpl", "--root", "/somewhere/DATA"])
    assert protocols.papers_datasets(["--method", "mpl"], datasets=["eurosat"])
    assert not protocols.papers_datasets(["--root", "x"], datasets=["mini_world"])


# ----------------------------------------------------------------------------------------------------------------------
# protocols.py --list: the pending runs as commands for a scheduler

def test_listed_commands_run_as_printed_and_leave_nothing_pending(tmp_path, capsys):
    import subprocess
    import sys
    from tools import protocols
    out = str(tmp_path / "runs")
    flags = ["base2new", "--method", "zeroshot", "--seeds", "1", "2", "--output", out, "--list"]
    assert protocols.main(flags) == 0  # the world's suite: 4 datasets x 2 seeds
    assert len(capsys.readouterr().out.splitlines()) == 2 * len(protocols.WORLD["b2n"]) == 8
    flags += ["--datasets", "mini_world"]
    assert protocols.main(flags) == 0
    commands = capsys.readouterr().out.splitlines()
    assert len(commands) == 2 and all(c.startswith("python -m tools.protocols base2new ") for c in commands)
    assert "--datasets mini_world --seeds 2" in commands[1]
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(commands[0], shell=True, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert protocols.main(flags) == 0
    assert capsys.readouterr().out.splitlines() == commands[1:]  # the run finished is no longer listed


def test_transfer_protocols_list_one_command_per_seed(tmp_path, capsys):
    from tools import protocols
    assert protocols.main(["cross_dataset", "--method", "mpl", "--cross-dataset", "--root", str(tmp_path),
                           "--output", str(tmp_path / "o"), "--list"]) == 0
    commands = capsys.readouterr().out.splitlines()
    assert [c.split("--seeds ")[1].split()[0] for c in commands] == ["1", "2", "3"]
    assert all("--datasets imagenet" in c and "--cross-dataset" in c for c in commands)


def test_default_run_directory_names_the_dataset_method_shots_and_seed(tmp_path, tiny, colours, monkeypatch):
    """Without --output a run writes into output/<dataset>/<method>[_xd]/shots<K>_seed<S> under the current folder;
    no --dataset is the mini world's name there, as in its identity."""
    monkeypatch.chdir(tmp_path)
    argv = ["--method", "maple", "--subsample", "all", "--epochs", "1", "--depth", "2", "--shots", "3", "--seed", "7"]
    res = train.main(argv, clip_model=tiny, benchmarks={"all": colours})
    assert os.path.isfile(tmp_path / "output" / "mini_world" / "maple" / "shots3_seed7" / "results.json")
    assert res["identity"]["dataset"] == "mini_world"
    train.main(argv + ["--cross-dataset", "--dataset", "eurosat"], clip_model=tiny, benchmarks={"all": colours})
    assert os.path.isfile(tmp_path / "output" / "eurosat" / "maple_xd" / "shots3_seed7" / "results.json")
