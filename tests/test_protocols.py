"""
Tests of protocols.py: the summary tables (seed means, harmonic means, missing seeds, the published rows beside ours),
whole protocols run end to end on fake CoOp trees (conftest.py) with the tiny random CLIP, and the ablation grids (ISP, MPL).

    python -m pytest -q test_protocols.py
"""
import json
import os

import pytest

import isp
from tools import protocols
import train


# ----------------------------------------------------------------------------------------------------------------------
# Summary tables

def fake_result(protocol, method, dataset, seed, **acc):
    return dict(protocol=protocol, method=method, dataset=dataset, seed=seed, shots=16, accuracy=acc,
                config=dict(args=dict(cross_dataset=False)))


def test_summary_means_hm_average_and_missing_seed(tmp_path):
    runs = [fake_result("base2new", "maple", "eurosat", s, base=b, new=n)
            for s, b, n in ((1, 90.0, 60.0), (2, 92.0, 64.0), (3, 94.0, 62.0))]
    runs += [fake_result("base2new", "maple", "dtd", s, base=b, new=n)
             for s, b, n in ((1, 80.0, 50.0), (2, 82.0, 52.0))]
    runs += [fake_result("domain_generalization", "maple", t, 1, all=a)
             for t, a in (("imagenet_v2", 60.0), ("imagenet_sketch", 40.0))]
    for r in runs:  # the protocols' layout (protocols.run_path): summarize reads only those directories
        run_dir = protocols.run_path(str(tmp_path), r["protocol"], r["method"], r["dataset"], 16, r["seed"])
        os.makedirs(run_dir)
        json.dump(r, open(os.path.join(run_dir, "results.json"), "w"))
    text = protocols.summarize(str(tmp_path))
    eurosat = next(l for l in text.splitlines() if l.startswith("| eurosat"))
    hm = 2 * 92 * 62 / (92 + 62)  # HM of the seed means, not the mean of per-seed HMs
    assert f"| 92.00 ± 2.00 | 62.00 ± 2.00 | {hm:.2f} |" in eurosat
    assert "| 94.07 / 73.23 / 82.35 | " + f"{hm - 82.35:+.2f} |" in eurosat  # MaPLe's published row beside it
    dtd = next(l for l in text.splitlines() if l.startswith("| dtd"))
    assert "missing seed 3" in dtd and "81.00" not in dtd  # never averaged over fewer seeds
    assert "| **average** | incomplete" in text
    dg = next(l for l in text.splitlines() if l.startswith("| imagenet_sketch"))
    assert "| 40.00 | 49.15 | -9.15 |" in dg  # one seed: the mean alone
    assert "| **average** | 50.00 |" in text
    csv = open(tmp_path / "summary.csv").read().splitlines()
    assert f"base2new,maple,eurosat,hm,{hm:.4f},,3,82.35" in csv
    assert os.path.exists(tmp_path / "summary.md")


# ----------------------------------------------------------------------------------------------------------------------
# Protocols end to end

def test_protocols_end_to_end_on_fake_trees(tmp_path, tiny, tree_copy):
    root = tree_copy[0]  # eurosat, oxford_pets, imagenet, imagenet-r and imagenet-v2 among others (conftest.py)
    out = str(tmp_path / "out")
    flags = ["--method", "maple", "--depth", "2", "--epochs", "1", "--root", root, "--shots", "2"]
    protocols.run_protocol("base2new", flags, ["eurosat", "oxford_pets"], [1, 2], out, tiny)
    for d in ("eurosat", "oxford_pets"):
        for s in (1, 2):
            res = json.load(open(os.path.join(out, "base2new", "maple", d, f"shots2_seed{s}", "results.json")))
            assert set(res["accuracy"]) == {"base", "new", "hm"} and res["protocol"] == "base2new"
    protocols.run_protocol("cross_dataset", flags, ["imagenet"], [1], out, tiny, targets=["eurosat", "oxford_pets"])
    protocols.run_protocol("domain_generalization", flags, ["imagenet"], [1], out, tiny,
                           targets=["imagenet_r", "imagenet_v2"])
    src = os.path.join(out, "source", "maple", "imagenet", "shots2_seed1")
    assert sorted(os.listdir(src)) == ["checkpoint.pt", "results.json", "train.log"]  # trained once, for both
    for protocol, targets in (("cross_dataset", ["eurosat", "oxford_pets"]),
                              ("domain_generalization", ["imagenet_r", "imagenet_v2"])):
        for t in targets:
            res = json.load(open(os.path.join(out, protocol, "maple", t, "shots2_seed1", "results.json")))
            assert set(res["accuracy"]) == {"all"} and res["source"]["dataset"] == "imagenet"
            assert res["config"]["args"]["load"] == os.path.join(src, "checkpoint.pt")
    zs = protocols.run_protocol("domain_generalization", ["--method", "zeroshot", "--root", root], ["imagenet"], [1],
                                out, tiny, targets=["imagenet_r"])  # nothing trains: the targets are evaluated directly
    assert zs[0]["dataset"] == "imagenet_r" and zs[0]["protocol"] == "domain_generalization"
    text = protocols.summarize(out)
    assert "### base2new: maple (2 shots) (seeds 1, 2)" in text
    assert "### cross_dataset: maple (2 shots) (seeds 1)" in text
    dg = next(line for line in text.splitlines() if line.startswith("### domain_generalization: "))
    assert "maple (2 shots) (seeds 1)" in dg and "zeroshot (seeds 1)" in dg  # one table, the methods side by side
    assert "| imagenet (source) |" in text  # the transfer tables show the source run's accuracy
    assert "published" in text and "64.07" not in text  # MaPLe's 16-shot anchors are not shown beside 2-shot runs
    # a table must hold every expected seed: asking for seeds 1-3 turns the 2-seed rows into "missing seed 3"
    assert "missing seed 3" in protocols.summarize(out, write=False, seeds=[1, 2, 3])
    assert {"summary.md", "summary.csv"} <= set(os.listdir(out))


# ----------------------------------------------------------------------------------------------------------------------
# Ablation grids: ISP's 2 x 2 x 2 switches, MPL's add/remove

def fake_protocol(seen, score):
    def run(protocol, argv, datasets, seeds, out, clip_model=None):
        cfg = train.method_config(train.get_args(argv))
        seen.append((cfg, out))
        return [dict(dataset="mini_world", seed=s, accuracy=dict(base=score(cfg) + s, new=40.0)) for s in seeds]
    return run


def test_isp_ablation_grid_writes_one_table(tmp_path, monkeypatch):
    """The 8 switch combinations, one table of mean +- std over seeds; the preset's cell is base2new's own run."""
    seen = []
    score = lambda c: 50.0 + 10 * c.isp_self + 5 * (c.isp_cross == "class_summaries") + 2 * c.sample_probing
    monkeypatch.setattr(protocols, "run_protocol", fake_protocol(seen, score))
    text = protocols.run_ablation(["--method", "isp"], None, [1, 3], str(tmp_path))
    assert len({(c.isp_self, c.isp_cross, c.sample_probing) for c, _ in seen}) == 8
    assert "| off | none | off (= ivlp) | 52.00 ± 1.41 | 40.00 ± 0.00 |" in text    # seeds 1 and 3: 51, 53
    assert "| on | class_summaries | on (= isp) | 69.00 ± 1.41 | 40.00 ± 0.00 | 50.64 |" in text
    assert [out for c, out in seen if c in (isp.PRESETS["isp"], isp.PRESETS["ivlp"])] == [str(tmp_path)] * 2
    assert len({out for _, out in seen}) == 7  # 6 cells of their own, 2 shared with base2new (isp, ivlp)
    assert open(protocols.ablation_table_path(str(tmp_path), "isp")).read().strip() == text.strip()


def test_mpl_ablation_grid_skips_what_the_official_code_forbids(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(protocols, "run_protocol", fake_protocol(seen, lambda c: 60.0 + c.n_add + c.n_rm))
    text = protocols.run_ablation(["--method", "mpl"], None, [1, 2, 3], str(tmp_path))
    assert sorted((c.n_add, c.n_rm) for c, _ in seen) == [(1, 0), (1, 1), (2, 0), (2, 1), (2, 2)]
    assert "| 1 | 2 | not a valid config |" in text    # n_rm 2 > n_add * n_ctx = 1
    assert "| 2 | 1 (= mpl) | 65.00 ± 1.00 | 40.00 ± 0.00 | 49.52 |" in text
    with pytest.raises(ValueError, match="no ablation for --method maple"):
        protocols.ablation_grid("maple", ["--method", "maple"])


def test_ablation_list_prints_every_cells_runs(tmp_path, capsys):
    """ablation --list: the base-to-new runs of each valid cell, into the cell's own --output (a preset's cell into
    base2new's), so that a scheduler runs the grid; the ablation command then only reads them for its table."""
    out = str(tmp_path / "runs")
    assert protocols.main(["ablation", "--method", "mpl", "--list", "--seeds", "1", "2", "--output", out]) == 0
    lines = capsys.readouterr().out.splitlines()
    suite = len(protocols.pending_commands("base2new", ["--method", "mpl"], None, [1], out))  # datasets of the suite
    assert len(lines) == 5 * suite * 2 and all(line.startswith("python -m tools.protocols base2new") for line in lines)
    by_cell = {line.split("--output ")[1] for line in lines}
    assert out in by_cell and len(by_cell) == 5  # the (2, 1) cell is mpl's preset: base2new's own runs
    assert all("--n-add 1 --n-rm 2" not in line for line in lines)  # not a valid config: nothing to run


@pytest.mark.parametrize("protocol", ["cross_dataset", "domain_generalization"])
def test_transfer_protocols_without_cross_dataset_are_refused_naming_the_flag(protocol, monkeypatch, capsys):
    """The transfer protocols train with the papers' --cross-dataset recipe; left out, the command says so instead of
    running the base-to-new recipe. Zero-shot CLIP has no recipe to choose."""
    ran = []
    monkeypatch.setattr(protocols, "run_protocol", lambda *a, **k: ran.append(a[1]))
    monkeypatch.setattr(protocols, "summarize", lambda *a, **k: None)
    for flags in (["--list"], []):
        with pytest.raises(SystemExit) as e:
            protocols.main([protocol, "--method", "maple", "--output", "nowhere", *flags])
        assert e.value.code == 2 and f"{protocol} is run with train.py's --cross-dataset recipe" in \
            capsys.readouterr().err
    protocols.main([protocol, "--method", "maple", "--cross-dataset", "--output", "nowhere"])
    protocols.main([protocol, "--method", "zeroshot", "--output", "nowhere"])
    assert ran == [["--method", "maple", "--cross-dataset"], ["--method", "zeroshot"]]


def test_a_protocol_on_a_root_that_is_not_there_says_so_before_clip_loads(tmp_path, monkeypatch):
    from engine import inputs

    def no_clip(*a, **k):
        raise AssertionError("CLIP was loaded before the --root was checked")

    monkeypatch.setattr(inputs, "clip_for", no_clip)
    missing = str(tmp_path / "DATA")
    for argv in (["base2new", "--root", missing], ["cross_dataset", "--cross-dataset", "--root", missing],
                 ["base2new", "--datasets", "dtd", "--root", missing]):
        with pytest.raises(FileNotFoundError, match=f"--root {missing} does not exist"):
            protocols.main(argv + ["--method", "maple", "--output", str(tmp_path / "out")])
