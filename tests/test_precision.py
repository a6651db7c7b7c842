"""
Tests of precision and devices on the CPU: bf16 autocast on the CPU for every method, fp32 without TF32, prompts drawn
from the CPU generator whatever the device, the CUDA defaults kept away from the tests, the loop's host syncs, the
loss scaler's report, the CLIP fingerprint taken on the device, --deterministic. What needs a GPU is skipped
without one.

    python -m pytest -q tests/test_precision.py
"""
import hashlib
from contextlib import nullcontext

import pytest
import torch

import data
from engine import precision as engine_precision
from engine import rundir
from engine import run as engine_run
import mpl
import train
from conftest import colour_benchmark, trainable

METHODS = ["mpl", "maple", "isp", "ivlp"]
CLASSES = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return colour_benchmark(str(tmp_path_factory.mktemp("colours")), n_train=4, n_test=2)


def build(method, clip, **changes):
    r = train.RECIPES[method]
    cfg = mpl.maple(**changes) if method == "maple" else r.config.__class__(**{**r.config.__dict__, **changes})
    return r.model(clip, CLASSES, cfg)


def unlocked_run(args, tmp_path, identity):
    """The run train.train reports to (engine/run.py), in tmp_path, outside its lock and log."""
    args.output = str(tmp_path)
    run = engine_run.Run(args, train.recipe(args))
    run.identity = identity
    return run


def quick(tmp_path, tiny, colours, *flags, method="maple", name="run"):
    argv = ["--method", method, "--subsample", "all", "--output", str(tmp_path / name), "--epochs", "2",
            "--depth", "2", *flags]
    return train.main(argv, clip_model=tiny, benchmarks={"all": colours})


# ----------------------------------------------------------------------------------------------------------------------
# bf16 on the CPU, fp32 without TF32

@pytest.mark.parametrize("method", METHODS)
def test_every_method_steps_under_cpu_bf16_autocast_with_fp32_masters_grads_and_logits(method, tiny):
    torch.manual_seed(0)
    model = build(method, tiny)
    autocast, scaler, precision = engine_precision.precision_setup("bf16", "cpu", model)
    assert precision == "bf16" and not scaler.is_enabled()
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    model.train()
    with autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        logits = model(images)
        weights = model.loss_weights(images, labels, logits)
    loss = train.loss_fn(logits, labels, weights)
    loss.backward()
    model.eval()
    assert logits.float().dtype == torch.float32 and loss.dtype == torch.float32 and torch.isfinite(loss)
    for name, p in trainable(model).items():
        assert p.dtype == torch.float32, name
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
    with torch.no_grad():  # within bf16's noise of the fp32 logits
        ref = model(images)
    assert (logits.float() - ref).abs().max() < 0.1 * ref.abs().max() + 0.1


def test_bf16_on_the_cpu_is_accepted_and_trains_amp_stays_cuda_only(tmp_path, tiny, colours, capsys):
    res = quick(tmp_path, tiny, colours, "--precision", "bf16", "--device", "cpu")
    assert res["precision"] == "bf16" and res["identity"]["precision"] == "bf16"
    assert all(0 <= v <= 100 for v in res["accuracy"].values())
    with pytest.raises(SystemExit):
        train.get_args(["--precision", "amp", "--device", "cpu"])
    assert "--precision amp is CUDA autocast" in capsys.readouterr().err


def test_fp32_turns_tf32_off(tiny):
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        engine_precision.precision_setup("fp32", "cpu", build("mpl", tiny))
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# ----------------------------------------------------------------------------------------------------------------------
# Prompts from the CPU generator

@pytest.mark.parametrize("method,changes", [("mpl", {}), ("maple", dict(ctx_init="")), ("isp", {}), ("ivlp", {})])
def test_initial_prompts_depend_on_the_cpu_generator_only(method, changes, tiny, monkeypatch):
    """The random initial values are drawn on the CPU and moved to CLIP's device: no random draw is given a device,
    and the prompts follow torch.manual_seed alone (not CUDA's seed)."""
    def state(seed, cuda_seed):
        torch.manual_seed(seed)
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(cuda_seed)
        return {k: v.detach().clone() for k, v in trainable(build(method, tiny, **changes)).items()}

    a, b, c = state(1, 5), state(1, 6), state(2, 5)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].numel() > 1)

    given = []
    for fn in ("randn", "empty", "rand"):
        stock = getattr(torch, fn)

        def spy(*args, _stock=stock, **kw):
            given.append(kw.get("device"))
            return _stock(*args, **kw)
        monkeypatch.setattr(torch, fn, spy)
    stock_linear = torch.nn.Linear.__init__

    def linear(self, *args, **kw):
        given.append(kw.get("device"))
        stock_linear(self, *args, **kw)
    monkeypatch.setattr(torch.nn.Linear, "__init__", linear)
    torch.manual_seed(1)
    built = trainable(build(method, tiny, **changes))
    assert given and all(d is None for d in given), given
    assert all(torch.equal(built[k], a[k]) for k in a)


# ----------------------------------------------------------------------------------------------------------------------
# The CUDA defaults, the loader, the loop's syncs, the loss scaler, the fingerprint, --deterministic

def test_tests_run_on_the_cpu_where_cuda_is_the_default(tiny, monkeypatch):
    """conftest's cpu_defaults: with a GPU visible the defaults of train.get_args still say cpu (and so 0 workers)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert train.get_args([]).device == "cpu"


def test_loader_pins_memory_only_for_cuda_and_keeps_its_workers(colours, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    tf = data.test_transform(32)
    assert not data.make_loader(colours.train, tf, 4, True, 0, "cpu").pin_memory
    assert data.make_loader(colours.train, tf, 4, True, 0, "cuda").pin_memory
    assert data.make_loader(colours.train, tf, 4, True, 2, "cpu").persistent_workers
    assert not data.make_loader(colours.train, tf, 4, True, 0, "cpu").persistent_workers


def test_the_loop_checks_finiteness_once_per_step_in_one_reduction(tmp_path, tiny, colours, monkeypatch):
    calls, stock = [], engine_run.all_finite

    def counting(tensors):
        calls.append(len(tensors))
        return stock(tensors)
    monkeypatch.setattr(engine_run, "all_finite", counting)
    monkeypatch.setattr(engine_run, "check_finite", lambda *a, **k: pytest.fail("check_finite on a finite step"))
    res = quick(tmp_path, tiny, colours)
    steps = 2 * (len(colours.train) // 4)
    n_params = len(trainable(train.build_model(train.get_args(["--method", "maple", "--depth", "2"]), tiny,
                                               colours.classnames, colours.template)))
    assert calls == [1 + n_params] * steps and res["accuracy"]


def test_loss_scaler_skips_are_reported_per_epoch(tmp_path, tiny, colours):
    """A scaler whose first scale overflows fp32 gradients skips steps and halves its scale; train() reports both."""
    args = train.get_args(["--method", "maple", "--depth", "2", "--epochs", "2", "--device", "cpu"])
    args.workers = 0
    torch.manual_seed(0)
    model = train.build_model(args, tiny, colours.classnames, colours.template)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 120, growth_interval=1000)  # too large for a few steps
    ident = {"test": 1}
    sec, history = train.train(model, colours.train, args, unlocked_run(args, tmp_path, ident), nullcontext, scaler)
    model.eval()
    steps = len(colours.train) // 4
    assert [h["epoch"] for h in history] == [1, 2]
    skipped = sum(h["skipped_steps"] for h in history)
    assert all(0 <= h["skipped_steps"] <= steps for h in history) and 0 < skipped < 2 * steps  # some, not all
    assert history[-1]["scale"] == scaler.get_scale() < 2.0 ** 120
    assert history[-1]["scale"] == 2.0 ** 120 / 2 ** skipped


def test_fp32_run_reports_no_scaler_fields(tmp_path, tiny, colours):
    args = train.get_args(["--method", "maple", "--depth", "2", "--epochs", "1", "--device", "cpu"])
    args.workers = 0
    model = train.build_model(args, tiny, colours.classnames, colours.template)
    _, _, history = (None, *train.train(model, colours.train, args, unlocked_run(args, tmp_path, {"test": 1}),
                                        nullcontext, torch.amp.GradScaler("cuda", enabled=False)))
    model.eval()
    assert set(history[0]) == {"epoch", "loss", "lr", "seconds"}


def test_weights_fingerprint_moves_only_a_sample_to_the_host(tiny, monkeypatch):
    def reference(module):  # the whole tensors on the host, then sampled
        h = hashlib.sha256()
        for name, t in sorted(module.state_dict().items()):
            t = t.detach().float().flatten().cpu()
            h.update(f"{name}{tuple(t.shape)}".encode())
            h.update(t[::max(1, t.numel() // 256)][:256].half().numpy().tobytes())
        return h.hexdigest()[:16]

    expected = reference(tiny)
    moved, stock = [], torch.Tensor.cpu

    def cpu(self, *a, **k):
        moved.append(self.numel())
        return stock(self, *a, **k)
    monkeypatch.setattr(torch.Tensor, "cpu", cpu)
    assert rundir.weights_fingerprint(tiny) == expected
    assert moved and max(moved) <= 256


def test_deterministic_flag_turns_on_deterministic_algorithms(tmp_path, tiny, colours):
    assert train.get_args([]).deterministic is False
    try:
        quick(tmp_path, tiny, colours, "--deterministic")
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


# ----------------------------------------------------------------------------------------------------------------------
# On a GPU only

cuda = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.device_count()), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("precision", ["bf16", "amp", "fp16"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_steps_on_cuda(method, precision, tiny):
    import copy
    clip = copy.deepcopy(tiny).cuda()
    torch.manual_seed(0)
    model = build(method, clip)
    autocast, scaler, _ = engine_precision.precision_setup(precision, "cuda", model)
    images, labels = torch.randn(2, 3, 32, 32, device="cuda"), torch.tensor([0, 2], device="cuda")
    model.train()
    with autocast():
        logits = model(images)
        weights = model.loss_weights(images, labels, logits)
    loss = train.loss_fn(logits, labels, weights)
    scaler.scale(loss).backward()
    model.eval()
    master = torch.float16 if precision == "fp16" else torch.float32
    assert torch.isfinite(loss)
    for name, p in trainable(model).items():
        assert p.dtype == master and p.grad is not None and p.grad.dtype == master, name


@cuda
@pytest.mark.parametrize("method", METHODS)
def test_initial_prompts_on_cuda_equal_those_on_the_cpu(method, tiny):
    import copy
    torch.manual_seed(3)
    on_cpu = {k: v.detach() for k, v in trainable(build(method, tiny)).items()}
    torch.manual_seed(3)
    on_gpu = {k: v.detach().cpu() for k, v in trainable(build(method, copy.deepcopy(tiny).cuda())).items()}
    assert all(torch.equal(on_cpu[k], on_gpu[k]) for k in on_cpu)
