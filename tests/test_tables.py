"""
protocols.py summary in the papers' layout: one table per protocol, rows the datasets and the average, columns per
method B / N / HM (mean ± std over the seeds found, the mean alone for one seed), the published numbers beside where
they exist and a note where they do not, transfer tables with the source run's accuracy.

    python -m pytest -q test_tables.py
"""
import json
import os

import pytest

from tools import protocols


def put(out, protocol, method, dataset, seed, source=None, **acc):
    r = dict(protocol=protocol, method=method.removesuffix("_xd"), dataset=dataset, seed=seed, shots=16,
             accuracy=acc, config=dict(args=dict(cross_dataset=method.endswith("_xd"))))
    if source is not None:
        r["source"] = dict(dataset=source[0], accuracy=dict(all=source[1]))
    run_dir = protocols.run_path(out, protocol, method, dataset, 16, seed)
    os.makedirs(run_dir)
    json.dump(r, open(os.path.join(run_dir, "results.json"), "w"))


def row(text, name):
    return next(line for line in text.splitlines() if line.startswith(f"| {name} |"))


def test_base2new_is_one_table_with_the_methods_side_by_side(tmp_path):
    out = str(tmp_path)
    for s, (b, n) in ((1, (90.0, 60.0)), (2, (92.0, 64.0))):
        put(out, "base2new", "maple", "eurosat", s, base=b, new=n)
        put(out, "base2new", "maple", "dtd", s, base=b - 10, new=n - 10)
    put(out, "base2new", "mpl", "eurosat", 1, base=95.0, new=70.0)
    put(out, "base2new", "mpl", "dtd", 1, base=85.0, new=60.0)
    text = protocols.summarize(out)
    assert text.count("### base2new") == 1
    header = next(line for line in text.splitlines() if line.startswith("| dataset"))
    assert "| maple B | maple N | maple HM | maple published B / N / HM | maple HM difference |" in header
    assert header.endswith("| mpl B | mpl N | mpl HM |")
    eurosat = row(text, "eurosat")
    assert "| 91.00 ± 1.41 | 62.00 ± 2.83 |" in eurosat and "| 95.00 | 70.00 | 80.61 |" in eurosat
    assert "± 0.00" not in text  # mpl's single seed shows its mean only
    b, n = (91 + 81) / 2, (62 + 52) / 2  # the average row: HM of the averaged B and N
    assert f"| {b:.2f} | {n:.2f} | {2 * b * n / (b + n):.2f} |" in row(text, "**average**")
    assert "mpl: no published numbers" in text
    csv = open(os.path.join(out, "summary.csv")).read().splitlines()
    assert f"base2new,maple,average,hm,{2 * b * n / (b + n):.4f},,2," in csv
    assert "base2new,mpl,eurosat,base,95.0000,,1," in csv


def test_the_mini_world_says_it_has_no_published_numbers(tmp_path):
    out = str(tmp_path)
    put(out, "base2new", "maple", "mini_world", 1, base=80.0, new=70.0)
    text = protocols.summarize(out, write=False)
    assert "no published numbers for the mini world" in text
    assert "**average**" not in text  # one dataset: no average row repeating it


def test_transfer_tables_show_the_source_accuracy(tmp_path):
    out = str(tmp_path)
    for s, src in ((1, 70.0), (2, 72.0)):
        put(out, "domain_generalization", "maple_xd", "imagenet_v2", s, source=("imagenet", src), all=60.0 + s)
        put(out, "domain_generalization", "maple_xd", "imagenet_r", s, source=("imagenet", src), all=76.0 + s)
    text = protocols.summarize(out, write=False)
    assert "| maple_xd accuracy | maple_xd published | maple_xd difference |" in text
    assert row(text, "imagenet (source)").startswith("| imagenet (source) | 71.00 ± 1.41 | 70.72 |")
    assert row(text, "**average**").startswith(f"| **average** | {(61.5 + 77.5) / 2:.2f} |")  # targets only


def test_the_chart_is_written_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    out = str(tmp_path)
    for s in (1, 2):
        put(out, "base2new", "maple", "eurosat", s, base=90.0 + s, new=60.0 + s)
        put(out, "base2new", "mpl", "eurosat", s, base=91.0 + s, new=61.0 + s)
    protocols.summarize(out)
    assert open(os.path.join(out, "summary_base2new.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_the_source_row_expects_the_seeds_of_its_table(tmp_path):
    out = str(tmp_path)
    put(out, "cross_dataset", "maple_xd", "eurosat", 1, source=("imagenet", 70.0), all=40.0)
    text = protocols.summarize(out, write=False, seeds=[1, 2])
    assert "| imagenet (source) | missing seed 2 |" in text


class FakeAxes:
    """What _bar_chart asks of matplotlib, recorded: a stand-in where matplotlib is not installed."""

    def __init__(self, calls):
        self.calls = calls

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs)) or []


def fake_matplotlib(monkeypatch, calls):
    import sys
    import types
    import numpy
    axes = FakeAxes(calls)
    figure = types.SimpleNamespace(tight_layout=lambda: None, savefig=lambda f, **k: f.write(b"png"))
    grid = lambda n: numpy.array([[axes] for _ in range(n)], dtype=object)  # noqa: E731
    plt = types.SimpleNamespace(subplots=lambda n, *a, **k: (figure, grid(n)),
                                close=lambda fig: None)
    mpl = types.SimpleNamespace(use=lambda backend: None, pyplot=plt)
    monkeypatch.setitem(sys.modules, "matplotlib", mpl)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", plt)


@pytest.mark.parametrize("seeds", [(1,), (1, 2)])
def test_the_chart_starts_at_zero_and_shows_a_spread_only_over_seeds(tmp_path, monkeypatch, seeds):
    calls = []
    fake_matplotlib(monkeypatch, calls)
    out = str(tmp_path)
    for s in seeds:
        put(out, "base2new", "zeroshot", "eurosat", s, base=42.8, new=40.0)
        put(out, "base2new", "mpl", "eurosat", s, base=83.8 + s, new=61.0 + s)
    protocols.summarize(out)
    bars = [kwargs for name, _, kwargs in calls if name == "bar"]
    assert bars and all((kwargs["yerr"] is None) == (len(seeds) == 1) for kwargs in bars)
    assert all(args[0] == 0.0 for name, args, _ in calls if name == "set_ylim")
    (title,) = [args[0] for name, args, _ in calls if name == "set_title"]
    assert title == ("base2new: one seed" if len(seeds) == 1 else "base2new: mean over seeds, error bars ± std")
