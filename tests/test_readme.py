"""The README's "Copying a method" code runs as written on the CPU, and does what it says: one training step that leaves
CLIP bitwise unchanged, a file holding the prompts only, and those prompts reloaded into a model of other classes. It
runs twice: as written (ISP), and with what the `# or` comments of its `import isp` and `model = ` lines name (MPL)."""
import os

import pytest
import torch

import clip_layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project folder


def readme_snippet():
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme.split("\n## Copying a method\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def variants():
    code = alternative = readme_snippet()
    for start, then in (("import isp", "import "), ("model = ", "model = ")):
        line = next(line for line in code.splitlines() if line.startswith(start))
        alternative = alternative.replace(line, then + line.split("# or ")[1].strip())
    return {"as written": code, "the alternative": alternative}


@pytest.mark.parametrize("variant", ["as written", "the alternative"])
def test_readme_copy_a_method_runs_as_written(tmp_path, monkeypatch, capsys, variant):
    code = variants()[variant]
    monkeypatch.chdir(tmp_path)  # the snippet saves prompts.pt into the current folder
    ns = {"__name__": "readme"}
    exec(compile(code, "README.md (Copying a method)", "exec"), ns)
    model, other = ns["model"], ns["other"]
    assert type(model).__name__ == ("ISP" if variant == "as written" else "MPL")

    # CLIP is bitwise the one random_clip built: the step trained the prompts only
    fresh = clip_layers.random_clip("tiny")
    assert all(torch.equal(a, b) for a, b in zip(ns["clip_model"].state_dict().values(), fresh.state_dict().values()))
    untrained = type(model)(fresh, ns["classnames"], model.cfg)  # the same draw of initial prompts
    assert any(not torch.equal(a, b) for a, b in
               zip(model.prompt_state_dict().values(), untrained.prompt_state_dict().values()))

    # the file holds every trainable tensor and nothing of CLIP; the other model has them, for 2 classes
    saved = torch.load(tmp_path / "prompts.pt", weights_only=True)
    assert sum(v.numel() for v in saved.values()) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert not any(k.startswith("clip.") for k in saved)
    assert all(torch.equal(saved[k], v) for k, v in other.prompt_state_dict().items())
    printed = capsys.readouterr().out.strip()  # e.g. "tensor([1, 0, 0, 1])": one of the 2 classes per image
    assert printed.startswith("tensor([") and len(printed.split(",")) == 4 and set(printed[8:-2]) <= set("01, ")
