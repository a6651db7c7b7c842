"""
Files and values from strangers, round 3 (engine/checkpoints.py, engine/cli.py, engine/rundir.py, tools/protocols.py):
a pickle that crashes PyTorch's reader, a TorchScript --clip file that runs its code, a --list value that splits a
command in two, files that cost time and memory out of proportion to their size, and the files of neighbouring
methods. The crash and the two ways to run code are tried in a subprocess, so that a crash fails the test instead of
the test run; for each, a test shows that the danger is real without the guard.

    python -m pytest -q tests/test_hostile_files.py
"""
import os
import struct
import subprocess
import sys
import time
from collections import namedtuple
from typing import Tuple

import pytest
import torch

from engine import checkpoints, cli, rundir
import data
import mpl
from test_checkpoints import TINY, dassl_save, ivlp_state_dict, make_ivlp, make_mpl, mpl_state_dict, with_pickle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.s"),            # the TorchScript file is made on purpose
              pytest.mark.filterwarnings("ignore:Validating sparse tensor")]  # PyTorch, reading the sparse file


def in_subprocess(code, *args, timeout=300):
    """Run `code` in a fresh interpreter in the project's folder: (return code, stdout, stderr)."""
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    return done.returncode, done.stdout, done.stderr


def unicode(s):  # BINUNICODE, an opcode of protocol 2 (what torch.save writes)
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def one_line_error(err):
    return err.count("\n") == 1 and err.startswith("error: ") and "\x1b" not in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------------------------------------
# Nesting: PyTorch's reader builds a nested value without recursing; hashing it as a dict key recurses in C

def deep_tuple_key(depth):
    """{'params': {}, 'junk': {T: 1}}, T a tuple nested `depth` deep: `depth` one-byte TUPLE1 opcodes."""
    return b"\x80\x02}" + unicode("params") + b"}s" + unicode("junk") + b"}" + b")" + b"\x85" * depth + b"K\x01ss."


READ = "from engine import checkpoints, cli; cli.run(lambda argv: checkpoints.read(argv[0]) and 0)"


def test_a_pickle_nested_a_million_deep_is_refused_in_one_line(tmp_path):
    path = with_pickle(tmp_path, deep_tuple_key(10 ** 6))
    assert os.path.getsize(path) < 1.1e6
    rc, _, err = in_subprocess(READ, path)
    assert rc == 1, f"return code {rc} (a negative one is a signal: the reader crashed): {err[-300:]}"
    assert one_line_error(err) and "evil.pt nests containers more than 64 deep" in err


def test_the_deep_pickle_crashes_pytorchs_own_reader(tmp_path):
    path = with_pickle(tmp_path, deep_tuple_key(10 ** 6))
    rc, _, err = in_subprocess("import sys, torch; torch.load(sys.argv[1], weights_only=True)", path)
    assert rc < 0 and "Error" not in err  # killed by a signal (SIGSEGV), with no message


def test_nesting_that_the_scan_cannot_see_is_refused_after_reading(tmp_path):
    """Lists kept in the memo and filled afterwards, each into the one before: the scan sees each as 2 deep, the
    result is a chain 10,000 deep. The walk after reading, which does not recurse, refuses it."""
    n = 10_000
    put = lambda i: b"r" + struct.pack("<I", i)   # noqa: E731  LONG_BINPUT i
    get = lambda i: b"j" + struct.pack("<I", i)   # noqa: E731  LONG_BINGET i
    lists = b"".join(b"]" + put(i) for i in range(n))                    # EMPTY_LIST, stored as memo i
    chain = b"".join(get(i) + get(i + 1) + b"a" for i in range(n - 1))   # list i .append(list i+1)
    payload = b"\x80\x02}" + unicode("params") + b"}s" + unicode("junk") + b"(" + lists + chain + b"ts."
    path = with_pickle(tmp_path, payload)
    with pytest.raises(ValueError, match=r"evil\.pt nests containers more than 64 deep"):
        checkpoints.read(str(path))


def test_a_checkpoint_nested_as_a_real_one_is_read(tmp_path):
    path = tmp_path / "fine.pt"
    nested = [1.0]
    for _ in range(30):  # 61 containers deep
        nested = {"x": [nested]}
    torch.save({"params": {}, "identity": nested}, path)
    assert checkpoints.read(str(path))["identity"] == nested


# ----------------------------------------------------------------------------------------------------------------------
# --clip: a TorchScript archive runs its code when loaded; only OpenAI's own files (by SHA-256) are

class Talks(torch.nn.Module):
    """A TorchScript module whose __setstate__, run by torch.jit.load, prints a line: code from the file."""

    def __init__(self):
        super().__init__()
        self.x = 1

    @torch.jit.export
    def __getstate__(self) -> Tuple[int, bool]:
        return self.x, self.training

    @torch.jit.export
    def __setstate__(self, state: Tuple[int, bool]) -> None:
        print("CODE FROM THE FILE RAN")
        self.x = state[0]
        self.training = state[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.x


@pytest.fixture
def talking_archive(tmp_path):
    path = tmp_path / "ViT-B-16.pt"
    torch.jit.save(torch.jit.script(Talks()), str(path))
    return path


LOAD_CLIP = "from engine import checkpoints, cli; cli.run(lambda argv: checkpoints.load_clip(argv[0]) and 0)"


def test_a_torchscript_clip_file_runs_nothing(talking_archive):
    rc, out, err = in_subprocess(LOAD_CLIP, talking_archive)
    assert "CODE FROM THE FILE RAN" not in out + err
    assert rc == 1 and one_line_error(err) and "ViT-B-16.pt is a TorchScript archive" in err


def test_the_torchscript_file_runs_code_under_clip_load(talking_archive):
    rc, out, _ = in_subprocess("import sys, clip; clip.load(sys.argv[1], jit=False)", talking_archive)
    assert "CODE FROM THE FILE RAN" in out


def test_only_openai_files_go_to_clip_load(tmp_path, tiny, monkeypatch):
    path = tmp_path / "tiny.pt"
    torch.save(tiny.state_dict(), path)
    calls = []
    monkeypatch.setattr(checkpoints.clip, "load", lambda *a, **k: calls.append(a) or (tiny, None))
    model = checkpoints.load_clip(str(path))  # a state dict: read as data, clip.load never called
    assert calls == [] and all(not p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    ids = checkpoints.clip_layers.tokenize(["a photo of a dog."])
    with torch.no_grad():
        assert torch.equal(model.encode_text(ids), tiny.encode_text(ids))
    # a file whose SHA-256 OpenAI published goes to clip.load (here: pretend the tiny file is one of them)
    monkeypatch.setattr(checkpoints, "openai_files", lambda: {rundir.file_sha256(path): "ViT-B/16"})
    checkpoints.load_clip(str(path))
    assert calls == [(str(path),)]


def test_load_clip_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # an empty ~/.cache/clip
    with pytest.raises(FileNotFoundError, match=r"ViT-B-16\.pt.*--clip"):
        checkpoints.load_clip("ViT-B/16")
    with pytest.raises(FileNotFoundError, match="neither a CLIP model name"):
        checkpoints.load_clip(str(tmp_path / "nothing.pt"))
    bad = tmp_path / "ViT-B-16.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"CLIP weights .*ViT-B-16\.pt is not a torch file"):
        checkpoints.load_clip(str(bad))
    cache = tmp_path / ".cache" / "clip"
    cache.mkdir(parents=True)
    (cache / "ViT-B-16.pt").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="corrupt.*SHA-256"):
        checkpoints.load_clip("ViT-B/16")


def clip_file(tmp_path, state_dict, name="clip.pt"):
    torch.save(state_dict, tmp_path / name)
    return str(tmp_path / name)


def test_clip_state_dicts_are_checked_before_a_clip_is_built(tmp_path, tiny, monkeypatch):
    sd = tiny.state_dict()
    built = []
    real_build = checkpoints.clip.model.build_model
    monkeypatch.setattr(checkpoints.clip.model, "build_model",
                        lambda s: built.append(torch.get_default_device()) or real_build(s))
    huge = dict(sd, **{"visual.conv1.weight": torch.zeros(1).expand(100_000, 3, 8, 8)})  # stride 0: 4 bytes stored
    with pytest.raises(ValueError, match=r"'visual\.conv1\.weight' has shape \(100000, 3, 8, 8\) but stores 4 bytes"):
        checkpoints.load_clip(clip_file(tmp_path, huge))
    deep = dict(sd, **{f"transformer.resblocks.{i}.ln_1.weight": torch.ones(64) for i in range(4, 2000)})
    with pytest.raises(ValueError, match=r"clip\.pt does not describe one OpenAI CLIP: RuntimeError"):
        checkpoints.load_clip(clip_file(tmp_path, deep))  # 2000 layers: only ever built on the meta device
    assert built and all(d.type == "meta" for d in built)
    resnet = {"visual.layer1.0.conv1.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="a ResNet CLIP: only the ViT backbones are supported"):
        checkpoints.load_clip(clip_file(tmp_path, resnet))
    with pytest.raises(ValueError, match=r"not an OpenAI CLIP state dict \(no 'visual\.conv1\.weight'; keys: "
                                         r"\['w'\]\)"):
        checkpoints.load_clip(clip_file(tmp_path, {"w": torch.zeros(1)}))
    with pytest.raises(ValueError, match=r"holds a torch\.nn\.modules\.linear\.Linear"):
        checkpoints.load_clip(clip_file(tmp_path, {"model": torch.nn.Linear(2, 2)}))


# ----------------------------------------------------------------------------------------------------------------------
# --list: one command a line, whatever the values

LIST = "from tools import protocols; from engine import cli; cli.run(protocols.main)"


def in_list(cwd, *flags):
    done = subprocess.run([sys.executable, "-c", LIST, "base2new", "--method", "maple", "--list", *flags], cwd=cwd,
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    return done.returncode, done.stdout, done.stderr


@pytest.mark.parametrize("flag, value", [("--output", "o\ntouch PWNED\n"), ("--root", "a\rb"),
                                         ("--output", "runs1\nruns2")])
def test_list_never_prints_two_lines_for_one_run(tmp_path, flag, value):
    rc, out, err = in_list(tmp_path, flag, value)
    assert rc == 1 and out == "" and one_line_error(err) and f"--list: {flag} " in err and "control character" in err
    assert not (tmp_path / "PWNED").exists()


def test_list_quotes_what_a_shell_would_read(tmp_path):
    from tools import protocols
    commands = protocols.pending_commands("base2new", ["--method", "maple", "--root", "my data; $(touch x) 'q'"],
                                          ["mini_world"], [1], out=str(tmp_path / "o"))
    assert len(commands) == 1 and "\n" not in commands[0]
    assert "'my data; $(touch x) '\"'\"'q'\"'\"''" in commands[0]


# ----------------------------------------------------------------------------------------------------------------------
# Files that cost far more than their size, and PyTorch's messages in place of ours

def test_a_million_views_of_one_storage_are_refused_at_once(tmp_path):
    """60,000 tensors that view one 4-byte storage (a 5 MB file): refused by the scan before one is built."""
    one = torch.zeros(1)
    path = tmp_path / "views.pt"
    torch.save({"params": {f"t{i}": one[0:1] for i in range(60_000)}}, path)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"views\.pt holds more than 50,000 tensors or objects"):
        checkpoints.read(str(path))
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("protocol, name", [(0, "0 or 1"), (1, "0 or 1"), (4, "4"), (5, "5")])
def test_other_pickle_protocols_are_named(tmp_path, protocol, name):
    path = tmp_path / "p.pt"
    torch.save({"params": {"a": torch.zeros(2)}}, path, pickle_protocol=protocol)
    with pytest.raises(ValueError, match=rf"p\.pt was pickled with protocol {name} \(opcode \w+\), which PyTorch's "
                                         rf"safe reader does not read; torch\.save writes protocol 2"):
        checkpoints.read(str(path))


def test_a_refused_global_is_named_without_pytorchs_banner(tmp_path):
    path = tmp_path / "module.pt"
    torch.save({"params": {"x": torch.nn.Linear(2, 2)}}, path)
    with pytest.raises(ValueError) as e:
        checkpoints.read(str(path))
    assert "module.pt holds a torch.nn.modules.linear.Linear, which is not a tensor" in str(e.value)
    assert "\x1b" not in str(e.value) and "weights_only" not in str(e.value)


def test_a_sparse_prompt_is_refused_in_one_line(tmp_path, tiny):
    model = make_mpl(tiny, TINY["maple"])
    params = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    params["prompt_learner.ctx"] = params["prompt_learner.ctx"].to_sparse()
    path = tmp_path / "checkpoint.pt"
    torch.save({"params": params}, path)
    with pytest.raises(ValueError, match=r"checkpoint\.pt holds a torch\.sparse_coo tensor; checkpoints hold dense"):
        checkpoints.load_prompts(model, str(path), "maple")
    with pytest.raises(ValueError, match=r"prompts 'p' is a torch\.sparse_coo tensor; prompts are dense"):
        checkpoints.check_tensors({"p": torch.eye(2).to_sparse()}, "x")


def test_a_million_unexpected_keys_make_a_short_message(tmp_path, tiny):
    model = make_mpl(tiny, TINY["maple"])
    params = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    params.update({f"junk.{i}": 0 for i in range(100_000)})
    path = tmp_path / "checkpoint.pt"
    torch.save({"params": params}, path)
    with pytest.raises(ValueError, match=r"unexpected \['junk\.0', .*, \.\.\. \(100,000 in all\)\]") as e:
        checkpoints.load_prompts(model, str(path), "maple")
    assert len(str(e.value)) < 1000


def test_a_run_directory_given_to_load_names_its_checkpoint(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(IsADirectoryError, match=rf"{tmp_path} is a directory, not a file: did you mean "
                                                rf"{tmp_path / 'checkpoint.pt'}\?"):
        checkpoints.read(str(tmp_path))


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints of neighbouring methods: named, with the flags that read them

def test_coop_and_cocoop_files_are_named(tmp_path, tiny):
    model = make_mpl(tiny, TINY["mpl"])
    coop = {"ctx": torch.zeros(16, 64), "token_prefix": torch.zeros(3, 1, 64), "token_suffix": torch.zeros(3, 60, 64)}
    cocoop = dict(coop, **{"meta_net.linear1.weight": torch.zeros(4, 64), "meta_net.linear1.bias": torch.zeros(4)})
    for name, sd in (("CoOp", coop), ("CoCoOp", cocoop)):
        path = tmp_path / f"{name}.pth.tar-10"
        torch.save({"state_dict": sd, "epoch": 10}, path)
        with pytest.raises(ValueError, match=rf"{name}\.pth\.tar-10 is a {name} checkpoint, which this project does "
                                             r"not read") as e:
            checkpoints.load_prompts(model, str(path), "mpl")
        assert len(str(e.value)) < 300


def test_a_promptsrc_file_loads_as_ivlp(tmp_path, tiny):
    """PromptSRC (trainers/promptsrc.py) saves IVLP's prompts, under IVLP's names, and a frozen, prompt-free copy of
    the image encoder (prompt_learner.ZS_image_encoder) used only by its training losses; at test time its forward is
    IVLP's. So its file loads into --method ivlp and predicts what its prompts predict."""
    source = make_ivlp(tiny)
    sd = ivlp_state_dict(source, tiny)
    sd.update({"prompt_learner.ZS_image_encoder." + k: v.half() for k, v in tiny.visual.state_dict().items()})
    path = tmp_path / "model.pth.tar-20"
    saved = dassl_save(sd, path, epoch=20)
    with torch.no_grad():
        for key, (param, l) in checkpoints.ivlp_names(source.cfg.depth).items():
            getattr(source, param)[l] = saved[key]
    target = make_ivlp(tiny, seed=1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        checkpoints.load_prompts(target, str(path), "ivlp")
        assert torch.equal(target(x), source(x))
    with pytest.raises(ValueError, match=r"is an official PromptSRC checkpoint that this model does not match: read "
                                         r"it with --method ivlp --n-ctx 4 --depth 3$"):
        checkpoints.load_prompts(make_mpl(tiny, TINY["mpl"]), str(path), "mpl")


def test_a_file_of_another_config_shows_the_flags_that_read_it(tmp_path, tiny):
    maple4 = make_mpl(tiny, mpl.maple(4, depth=4))
    path = tmp_path / "model.pth.tar-5"
    torch.save({"state_dict": mpl_state_dict(maple4, tiny, maple=True)}, path)
    with pytest.raises(ValueError, match=r"official MaPLe checkpoint that this model does not match: read it with "
                                         r"--method maple --n-ctx 4 --depth 4$"):
        checkpoints.load_prompts(make_mpl(tiny, TINY["maple"]), str(path), "maple")
    mpl_file = tmp_path / "mpl.pth.tar-5"
    torch.save({"state_dict": mpl_state_dict(make_mpl(tiny, TINY["mpl"]), tiny)}, mpl_file)
    with pytest.raises(ValueError, match=r"official MPL checkpoint .* read it with --method mpl --n-ctx 1 --n-add 2 "
                                         r"--depth 3 and the --n-rm it was trained with"):
        checkpoints.load_prompts(make_mpl(tiny, TINY["maple"]), str(mpl_file), "maple")


def test_our_checkpoint_of_another_method_says_which(tmp_path, tiny):
    source = make_mpl(tiny, TINY["mpl"])
    path = tmp_path / "checkpoint.pt"
    torch.save({"params": source.prompt_state_dict(), "method": "mpl"}, path)
    with pytest.raises(ValueError, match=r"holds prompts of --method mpl \(its 'method'\), not of --method maple: "
                                         r"load it with --method mpl") as e:
        checkpoints.load_prompts(make_mpl(tiny, TINY["maple"]), str(path), "maple")
    assert "prompt_learner" not in str(e.value)


# ----------------------------------------------------------------------------------------------------------------------
# A DataLoader worker's error, and a full disk inside torch.save

class Unreadable(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        return data.ImageDataset([data.Datum("/nowhere/cat.jpg", 0, "cat")], lambda x: x)[0]


def test_a_worker_error_is_its_own_one_line(capsys):
    def main(argv):
        for _ in torch.utils.data.DataLoader(Unreadable(), num_workers=1):
            pass
    with pytest.raises(SystemExit) as e:
        cli.run(main, [])
    err = capsys.readouterr().err
    assert e.value.code == 1 and one_line_error(err) and err.startswith("error: could not read image /nowhere/cat.jpg")


def test_a_bug_in_a_worker_keeps_its_traceback():
    class Buggy(Unreadable):
        def __getitem__(self, index):
            return {}["missing"]

    def main(argv):
        for _ in torch.utils.data.DataLoader(Buggy(), num_workers=1):
            pass
    with pytest.raises(KeyError, match="Original Traceback"):
        cli.run(main, [])


def test_a_full_disk_inside_torch_save_is_said(tmp_path, monkeypatch):
    def save(obj, f):
        f.write(b"x" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 288064 vs 287952")

    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"the previous checkpoint")
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda p: Usage(100, 100, 0))
    with pytest.raises(OSError, match=r"could not write .*checkpoint\.pt: the disk is full\. The previous file"):
        rundir.atomic_save(None, str(target), save)
    assert target.read_bytes() == b"the previous checkpoint" and os.listdir(tmp_path) == ["checkpoint.pt"]
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda p: Usage(1 << 40, 0, 1 << 40))
    with pytest.raises(OSError, match=r"RuntimeError: \[enforce fail"):  # another failure keeps its own words
        rundir.atomic_save(None, str(target), save)
