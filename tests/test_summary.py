"""
protocols.py summary and a run's identity: the summary reads only the run directories of the protocols' own layout
(<out>/<protocol>/<method>/<dataset>/shots<K>_seed<S>/results.json) whose contents match them, names every file it
cannot use, tabulates the seeds that are there, and writes its tables atomically; a run's identity holds a fingerprint
of the dataset's split and class names, and --load as a real path.

    python -m pytest -q test_summary.py
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

import data
from world import mini_world
from tools import protocols
import train

ACC = {1: (90.0, 60.0), 2: (92.0, 64.0), 3: (94.0, 62.0)}  # seed: (base, new)


def result(seed, base, new, dataset="eurosat", method="maple", shots=16, protocol="base2new", **more):
    out = dict(protocol=protocol, method=method, dataset=dataset, seed=seed, shots=shots,
               accuracy=dict(base=base, new=new, hm=2 * base * new / (base + new)),
               config=dict(args=dict(cross_dataset=False)),
               identity=dict(method=method, dataset=dataset, seed=seed, shots=shots, lr=0.0035))
    out.update(more)
    return out


def put(path, content):
    """Write a results.json (a dict as JSON, or raw text) at `path`, creating its folders."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(content if isinstance(content, str) else json.dumps(content))


def run_path(out, seed, dataset="eurosat", method="maple", shots=16, protocol="base2new"):
    return os.path.join(out, protocol, method, dataset, f"shots{shots}_seed{seed}", "results.json")


def protocol_out(tmp_path, seeds=(1, 2, 3)):
    out = str(tmp_path / "runs")
    for s in seeds:
        put(run_path(out, s), result(s, *ACC[s]))
    return out


def eurosat_row(text):
    return next(line for line in text.splitlines() if line.startswith("| eurosat"))


# ----------------------------------------------------------------------------------------------------------------------
# Only the protocols' own run directories, each matching its path

def test_summary_ignores_backups_and_earlier_tries_outside_the_layout(tmp_path, capsys):
    out = protocol_out(tmp_path)
    clean = eurosat_row(protocols.summarize(out, write=False))
    assert "92.00 ± 2.00 | 62.00 ± 2.00" in clean
    backup = os.path.join(os.path.dirname(run_path(out, 1)), "backup", "results.json")
    earlier = os.path.join(out, "old_try", "base2new", "maple", "eurosat", "shots16_seed1", "results.json")
    put(backup, result(1, 50.0, 10.0))
    put(earlier, result(1, 60.0, 20.0))
    capsys.readouterr()
    assert eurosat_row(protocols.summarize(out, write=False)) == clean  # neither replaces seed 1
    printed = capsys.readouterr().out
    assert backup in printed and earlier in printed and "ignored" in printed  # and both are named


@pytest.mark.parametrize("what, edit, message", [
    ("seed", dict(seed=1), "seed 1, but its directory says seed 2"),
    ("dataset", dict(dataset="dtd"), "dataset 'dtd', but its directory says 'eurosat'"),
    ("identity", dict(identity=dict(method="maple", dataset="eurosat", seed=1, shots=16)), "its identity"),
    ("protocol", dict(protocol="source"), "protocol 'source', but its directory says 'base2new'"),
])
def test_summary_refuses_a_results_json_that_does_not_match_its_directory(tmp_path, what, edit, message):
    out = protocol_out(tmp_path)
    wrong = result(2, *ACC[1])
    wrong.update(edit)
    put(run_path(out, 2), wrong)  # e.g. seed 1's file copied into seed 2's directory
    with pytest.raises(ValueError, match=message) as e:
        protocols.summarize(out)
    assert run_path(out, 2) in str(e.value)
    assert not os.path.exists(os.path.join(out, "summary.md"))


def test_summary_refuses_two_directories_of_one_run(tmp_path):
    """--datasets EuroSAT and --datasets eurosat are one dataset in two directories: which to tabulate is not ours
    to guess."""
    out = protocol_out(tmp_path)
    other = run_path(out, 1, dataset="EuroSAT")
    put(other, dict(result(1, 50.0, 10.0), identity=dict(method="maple", dataset="EuroSAT", seed=1, shots=16)))
    with pytest.raises(ValueError, match="the same run") as e:
        protocols.summarize(out)
    assert other in str(e.value) and run_path(out, 1) in str(e.value)


def test_summary_refuses_seeds_of_other_settings_in_one_row(tmp_path):
    out = protocol_out(tmp_path)
    put(run_path(out, 3), dict(result(3, *ACC[3]), identity=dict(method="maple", dataset="eurosat", seed=3,
                                                                shots=16, lr=0.02)))
    with pytest.raises(ValueError, match=r"other settings \(lr: 0.0035 .*, 0.02 ") as e:
        protocols.summarize(out)
    assert run_path(out, 3) in str(e.value)


# ----------------------------------------------------------------------------------------------------------------------
# Malformed files are named, with what is wrong; nothing is written

MALFORMED = [
    ("not JSON", "{\"protocol\": ", "is not valid JSON"),
    ("empty", "", "is empty"),
    ("a list", "[1, 2]", "holds a list, not"),
    ("no new", dict(result(1, *ACC[1]), accuracy=dict(base=90.0)), "no 'new' accuracy"),
    ("no config", {k: v for k, v in result(1, *ACC[1]).items() if k != "config"}, "no 'config'"),
    ("NaN", json.dumps(result(1, *ACC[1])).replace("90.0", "NaN"), "'base' accuracy NaN"),
    ("1000 %", dict(result(1, *ACC[1]), accuracy=dict(base=1000.0, new=60.0, hm=105.0)), "'base' accuracy 1000.0"),
    ("a string", dict(result(1, *ACC[1]), accuracy=dict(base="90", new=60.0, hm=70.0)), "'base' accuracy '90'"),
]


@pytest.mark.parametrize("what, content, message", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_summary_names_a_malformed_results_json(tmp_path, what, content, message):
    out = protocol_out(tmp_path)
    protocols.summarize(out)
    before = {f: open(os.path.join(out, f)).read() for f in ("summary.md", "summary.csv")}
    put(run_path(out, 1), content)
    with pytest.raises(ValueError, match=message) as e:
        protocols.summarize(out)
    assert run_path(out, 1) in str(e.value)
    assert {f: open(os.path.join(out, f)).read() for f in before} == before  # the previous tables are kept


def test_summary_command_exits_nonzero_naming_the_file(tmp_path, capsys):
    out = protocol_out(tmp_path)
    put(run_path(out, 2), "")
    with pytest.raises(SystemExit) as e:
        protocols.main(["summary", out])
    assert e.value.code not in (0, None)
    assert run_path(out, 2) in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------------
# The seeds that are there

@pytest.mark.parametrize("seeds", [(1,), (1, 2)])
def test_summary_command_tabulates_the_seeds_that_are_there(tmp_path, seeds, capsys):
    out = protocol_out(tmp_path, seeds)
    protocols.main(["summary", out])
    text = capsys.readouterr().out
    assert "missing seed" not in text
    assert f"(seeds {', '.join(map(str, seeds))})" in text
    csv = open(os.path.join(out, "summary.csv")).read().splitlines()
    assert any(line.startswith("base2new,maple,eurosat,base,") and line.endswith(f",{len(seeds)},94.07")
               for line in csv)
    # a protocol run with seeds 1-3 still asks its own table for all three
    missing = "| eurosat | missing seed " + ("3" if seeds == (1, 2) else "2, 3")
    assert missing in protocols.summarize(out, write=False, seeds=[1, 2, 3])


def test_summary_after_a_protocol_expects_its_seeds_only_in_its_own_tables(tmp_path):
    out = protocol_out(tmp_path, (1,))
    put(run_path(out, 1, dataset="imagenet_r", protocol="domain_generalization", method="maple_xd"),
        dict(result(1, 1, 1, dataset="imagenet_r", protocol="domain_generalization"), accuracy=dict(all=70.0),
             config=dict(args=dict(cross_dataset=True))))
    text = protocols.summarize(out, write=False, seeds={"domain_generalization": [1, 2]})
    assert "missing seed" not in eurosat_row(text)
    assert "missing seed 2" in next(line for line in text.splitlines() if line.startswith("| imagenet_r"))


# ----------------------------------------------------------------------------------------------------------------------
# Atomic tables

def test_summary_tables_are_written_atomically(tmp_path):
    """A full disk (here a file-size limit) while writing the tables keeps the previous ones whole."""
    out = protocol_out(tmp_path, (1,))
    protocols.summarize(out)
    before = open(os.path.join(out, "summary.md")).read()
    for s in (2, 3):
        put(run_path(out, s), result(s, *ACC[s]))
    script = ("import resource, signal, sys; from tools import protocols; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              f"resource.setrlimit(resource.RLIMIT_FSIZE, ({len(before) // 2}, resource.RLIM_INFINITY)); "
              f"protocols.summarize({out!r})")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(protocols.__file__))))
    assert open(os.path.join(out, "summary.md")).read() == before
    assert done.returncode != 0 and "summary.md" in done.stderr
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


# ----------------------------------------------------------------------------------------------------------------------
# Identity: the dataset's data, --load as a real path

FLAGS = ["--method", "zeroshot", "--shots", "2"]


def rewrite_eurosat(root, edit):
    path = os.path.join(root, "eurosat", data.DATASETS["eurosat"].split_file)
    with open(path) as f:
        split = json.load(f)
    edit(split)
    with open(path, "w") as f:
        json.dump(split, f)


def test_identity_holds_the_split_and_class_names(tiny, tree_copy, tmp_path):
    root, _ = tree_copy
    other = str(tmp_path / "OTHER")
    shutil.copytree(root, other)
    ident = lambda r: train.run_identity(train.get_args(FLAGS + ["--dataset", "eurosat", "--root", r]), tiny)
    assert ident(root) == ident(other) and ident(root)["data"]  # the same files: the same run, stable
    first = json.load(open(os.path.join(root, "eurosat", data.DATASETS["eurosat"].split_file)))["train"][0][2]
    rename = lambda split: [e.__setitem__(2, e[2] + "_x") for k in split for e in split[k] if e[2] == first]
    rewrite_eurosat(other, rename)  # one class renamed, same images
    assert ident(root)["data"] != ident(other)["data"]
    other2 = str(tmp_path / "OTHER2")  # a split that lists one image fewer
    shutil.copytree(root, other2)
    rewrite_eurosat(other2, lambda split: split["test"].pop())
    assert ident(root)["data"] != ident(other2)["data"]


def test_protocol_on_another_root_with_other_data_is_not_skipped(tiny, tree_copy, tmp_path):
    root, _ = tree_copy
    out = str(tmp_path / "out")
    first = protocols.run_protocol("base2new", FLAGS + ["--root", root], ["eurosat"], [1], out, tiny)
    same = protocols.run_protocol("base2new", FLAGS + ["--root", root], ["eurosat"], [1], out, tiny)
    assert same[0]["wall_seconds"] == first[0]["wall_seconds"]  # skipped: the same data
    other = str(tmp_path / "OTHER")
    shutil.copytree(root, other)
    rewrite_eurosat(other, lambda split: [e.__setitem__(2, e[2] + "_renamed") for k in split for e in split[k]])
    with pytest.raises(ValueError, match=r"other settings: data: '\w+' then, '\w+' now"):
        protocols.run_protocol("base2new", FLAGS + ["--root", other], ["eurosat"], [1], out, tiny)
    redone = protocols.run_protocol("base2new", FLAGS + ["--root", other, "--overwrite"], ["eurosat"], [1], out, tiny)
    assert redone[0]["identity"]["data"] != first[0]["identity"]["data"]


def test_results_without_the_data_fingerprint_are_other_settings(tiny, tree_copy, tmp_path):
    root, _ = tree_copy
    out = str(tmp_path / "out")
    protocols.run_protocol("base2new", FLAGS + ["--root", root], ["eurosat"], [1], out, tiny)
    path = run_path(out, 1, method="zeroshot", shots=2)
    old = json.load(open(path))
    del old["identity"]["data"]  # as written before the identity held it
    put(path, old)
    with pytest.raises(ValueError, match=r"other settings: data: not recorded then .*, '\w+' now"):
        protocols.run_protocol("base2new", FLAGS + ["--root", root], ["eurosat"], [1], out, tiny)


def test_mini_world_identity_is_stable(tiny, tmp_path, monkeypatch):
    for name, sizes in {"mini_world": (3, 1, 2)}.items():  # fewer images, the same classes: a quick render
        monkeypatch.setitem(mini_world.WORLD_DATASETS, name, dict(mini_world.WORLD_DATASETS[name], split_sizes=sizes))
    ident = lambda r: train.run_identity(train.get_args(["--method", "maple", "--root", r]), tiny)
    a = ident(str(tmp_path / "a"))  # draws the world first
    assert ident(str(tmp_path / "a")) == a == ident(str(tmp_path / "b")) and a["data"]


def test_output_spelled_another_way_finds_the_finished_transfer_runs(tiny, tree_copy, tmp_path, monkeypatch):
    root, _ = tree_copy
    out = str(tmp_path / "out")
    flags = ["--method", "maple", "--depth", "2", "--epochs", "1", "--root", root, "--shots", "2"]
    first = protocols.run_protocol("domain_generalization", flags, ["imagenet"], [1], out, tiny,
                                   targets=["imagenet_r"])
    spelled = os.path.join(out, "..", "out")
    again = protocols.run_protocol("domain_generalization", flags, ["imagenet"], [1], spelled, tiny,
                                   targets=["imagenet_r"])
    assert again[0]["wall_seconds"] == first[0]["wall_seconds"]  # skipped: the same run
    monkeypatch.chdir(tmp_path)  # relative, from elsewhere: the same files
    again = protocols.run_protocol("domain_generalization", flags, ["imagenet"], [1], "out", tiny,
                                   targets=["imagenet_r"])
    assert again[0]["wall_seconds"] == first[0]["wall_seconds"]


def test_protocol_rerun_over_an_unreadable_results_json_names_it(tiny, tree_copy, tmp_path):
    root, _ = tree_copy
    out = str(tmp_path / "out")
    protocols.run_protocol("base2new", FLAGS + ["--root", root], ["eurosat"], [1], out, tiny)
    path = run_path(out, 1, method="zeroshot", shots=2)
    put(path, "")  # a results.json cut to nothing
    with pytest.raises(ValueError, match="is empty: it is not a finished run .* --overwrite") as e:
        protocols.run_protocol("base2new", FLAGS + ["--root", root], ["eurosat"], [1], out, tiny)
    assert path in str(e.value)
    redone = protocols.run_protocol("base2new", FLAGS + ["--root", root, "--overwrite"], ["eurosat"], [1], out, tiny)
    assert json.load(open(path))["accuracy"] == redone[0]["accuracy"]
