"""bench.py's choice of precisions: what each device runs, the autocast it times, what it says of a CPU's bf16,
and one run that prints every precision's table and the ratio against fp32 (a tiny CLIP, one step)."""
import pytest
import torch

import bench


def test_each_device_runs_its_precisions():
    assert bench.device_precisions("cpu") == ["fp32", "bf16"]
    assert bench.device_precisions("cuda:0") == ["fp32", "bf16", "fp16"]
    with pytest.raises(SystemExit) as e:
        bench.main(["--device", "cpu", "--precision", "fp16"])
    assert e.value.code == 2


def test_bf16_on_the_cpu_is_autocast():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with bench.autocast_for("cpu", "bf16")():
        assert (a @ b).dtype == torch.bfloat16
    with bench.autocast_for("cpu", "fp32")():
        assert (a @ b).dtype == torch.float32


@pytest.mark.parametrize("flags, native", [("fpu sse avx2 avx512f avx512_bf16", True), ("fpu sse avx2", False)])
def test_the_cpus_bf16_instructions_are_read_from_its_flags(tmp_path, monkeypatch, flags, native):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    monkeypatch.setattr(bench, "CPUINFO", str(info))
    assert bench.cpu_bf16() == (native, ["avx512_bf16"] if native else [])
    monkeypatch.setattr(bench, "CPUINFO", str(tmp_path / "none"))
    assert bench.cpu_bf16() == (None, [])


def test_one_run_times_every_precision_and_compares_them(capsys):
    bench.main(["--device", "cpu", "--arch", "tiny", "--methods", "zeroshot", "--classes", "2", "--steps", "1"])
    out = capsys.readouterr().out
    assert "precision fp32" in out and "precision bf16" in out and out.startswith("CPU bf16: ")
    assert "ours' step time per precision, against fp32" in out
    (line,) = [line for line in out.splitlines() if line.strip().startswith("zeroshot") and "classes:" in line]
    assert "fp32 " in line and "bf16 " in line and line.rstrip().endswith("x)")
