"""The GPU path's logic, checked on the CPU (issue 11).

The speed options act on CUDA only; these tests add "cpu" to `training.SPEED_DEVICES` so that the
same code runs here: autocast, the fp16 loss scale, compilation (with torch.compile's "eager"
backend: inductor works on this machine but takes ~40 s per graph on 2 loaded cores, too slow for a
unit test; Dynamo's tracing, guards and recompilation counting are the same), the captured-step
plumbing of `cuda_graph` (replayed by calling the step: no CUDA graph on a CPU), warm-up.
"""

import gc
import types
import weakref

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from unlearn_cli import apply, train_refs, training
from unlearn_cli.augment import Augmenter, crop_flip, translate
from unlearn_cli.config import load_config
from unlearn_cli.context import gpu_workers, timing
from unlearn_cli.launch import Slot
from unlearn_cli.methods import finetune, retrain
from unlearn_cli.methods.api import UnlearnData
from unlearn_cli.models import init_model, model_spec
from unlearn_cli.score import _kept

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def speed_on_cpu(monkeypatch):
    monkeypatch.setattr(training, "SPEED_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(training, "COMPILE_BACKEND", "eager")
    monkeypatch.setattr(training, "_COMPILED", {})


def mlp(seed=0):
    spec = model_spec(load_config(None).model, (64,), 10)
    return init_model(spec, seed), spec


def data(n=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 64, generator=gen), torch.randint(0, 10, (n,), generator=gen)


class ShapeSpy(nn.Module):
    """Wraps a model; records the batch size of every training-mode forward pass."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.sizes = []

    def forward(self, x):
        if self.training:
            self.sizes.append(len(x))
        return self.inner(x)


# ---------------------------------------------------------------- warm-up


def test_warm_up_happens_without_compile_and_covers_every_shape(speed_on_cpu):
    x, y = data(40)  # batch 16: two full batches and a partial one of 8
    model = ShapeSpy(mlp()[0])
    options = {"epochs": 5, "batch_size": 16, "lr": 0.1, "compile": "none"}
    assert training.warm_up(model, x, y, **options) is True
    assert sorted(set(model.sizes)) == [8, 16] and len(model.sizes) <= training.WARM_UP_STEPS + 1
    model.sizes.clear()
    assert training.warm_up(model, x, y, **options) is False  # warmed for these shapes already
    assert model.sizes == []
    assert training.warm_up(model, x, y, **{**options, "drop_last": True}) is True
    assert model.sizes == [16, 16]  # the partial batch is not a shape of that run


def test_warm_up_is_a_no_op_on_a_plain_cpu():
    x, y = data(40)
    assert training.warm_up(mlp()[0], x, y, epochs=1, batch_size=16, lr=0.1) is False


def test_a_method_is_warmed_up_once_per_worker_with_short_fits(speed_on_cpu, monkeypatch):
    monkeypatch.setattr(training, "_WARMED_RUNS", set())
    x, y = data(200)
    model = ShapeSpy(mlp()[0])
    runs = []

    def run():
        runs.append(1)
        training.fit(model, x, y, epochs=3, batch_size=16, lr=0.1, seed=0)

    assert training.warm_up_method(run, "cpu", key="finetune") is True
    assert len(model.sizes) == training.WARM_UP_STEPS + 1  # 2 full batches + the last 8
    assert training.warm_up_method(run, "cpu", key="finetune") is False
    assert runs == [1]


# ---------------------------------------------------------------- speed options reach methods


def test_methods_train_with_the_experiments_speed_options(speed_on_cpu, monkeypatch, tmp_path):
    seen = []
    real = training._autocast

    def spy(precision, device, **kwargs):
        seen.append(precision)
        return real("fp32", device)  # record, but keep the arithmetic plain

    monkeypatch.setattr(training, "_autocast", spy)
    cfg = load_config(None, ["train.epochs=1", "train.precision=bf16", "launch.workers=1",
                             "method.finetune.epochs=1", "train.engine=loop"])
    train_refs.run(cfg, tmp_path / "s", num_models=1, inline=True)
    seen.clear()
    apply.run(cfg, tmp_path / "s", method_spec="finetune", num_models=1, inline=True)
    assert seen and set(seen) == {"bf16"}, seen  # finetune passes no precision of its own
    # The same method called outside `apply`, without speed options: fit's defaults.
    seen.clear()
    x, y = data(40)
    plain = UnlearnData(x[:8], y[:8], x[8:], y[8:], 10)
    finetune.unlearn(mlp()[0], plain, finetune.Params(epochs=1), device="cpu", seed=0)
    assert set(seen) == {"fp32"}
    with training.speed_options(precision="fp16"):
        seen.clear()
        training.fit(mlp()[0], x, y, epochs=1, batch_size=16, lr=0.1, seed=0, precision="bf16")
    assert set(seen) == {"bf16"}  # an explicit argument wins


# ---------------------------------------------------------------- compile


@pytest.mark.slow  # importing and running Dynamo: ~5 s idle, 15 s on a loaded 2-core machine
def test_compile_is_static_shaped_and_never_recompiles_across_jobs(speed_on_cpu, monkeypatch):
    from torch._dynamo.utils import counters

    calls = []
    real_compile = torch.compile

    def recording(fn, **kwargs):
        calls.append(kwargs)
        return real_compile(fn, **kwargs)

    monkeypatch.setattr(torch, "compile", recording)
    torch._dynamo.reset()
    counters.clear()
    x, y = data(40)
    options = {"epochs": 2, "batch_size": 16, "lr": 0.1, "compile": "default"}
    spec = mlp()[1]
    data_ = UnlearnData(x[:8], y[:8], x, y, 10, model_spec=spec,
                        train_recipe={**options, "momentum": 0.9})
    first = retrain.unlearn(mlp()[0], data_, retrain.Params(), device="cpu", seed=1)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 2  # the full batch and the last partial batch: one static graph each
    again = retrain.unlearn(mlp()[0], data_, retrain.Params(), device="cpu", seed=2)
    assert again is first  # one module per worker and spec, each seed's weights loaded into it
    training.fit(mlp(5)[0], x, y, seed=5, **options)  # even a new module of the architecture
    assert counters["stats"]["unique_graphs"] == graphs, dict(counters["stats"])
    assert len(calls) == 1 and calls[0]["dynamic"] is False


def test_a_compiled_model_is_freed_without_the_cycle_collector(speed_on_cpu):
    x, y = data(40)
    model = mlp()[0]
    training.fit(model, x, y, epochs=1, batch_size=16, lr=0.1, seed=0, compile="default")
    ref = weakref.ref(model)
    gc.disable()
    try:
        del model
        assert ref() is None  # freed by reference counting: nothing holds it in a cycle
    finally:
        gc.enable()


# ---------------------------------------------------------------- fp16 loss scale


def test_fp16_skips_a_step_whose_gradient_is_inf(speed_on_cpu):
    x, y = data(16)
    model = mlp()[0]
    before = [p.detach().clone() for p in model.parameters()]

    def overflowing(m, xb, yb):
        return F.cross_entropy(m(xb), yb) * float("inf")

    training.fit(model, x, y, epochs=1, batch_size=16, lr=0.1, seed=0, precision="fp16",
                 loss_fn=overflowing)
    assert training.last_run["skipped_steps"] == 1
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)  # not written into the weights
    # The same run with finite losses takes its step.
    training.fit(model, x, y, epochs=1, batch_size=16, lr=0.1, seed=0, precision="fp16")
    assert training.last_run["skipped_steps"] == 0
    assert not torch.equal(next(model.parameters()), before[0])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_loss_scale_halves_on_overflow_and_grows_after_finite_steps(monkeypatch):
    monkeypatch.setattr(training, "LOSS_SCALE_GROWTH_INTERVAL", 2)
    scaler = training.LossScaler(torch.device("cpu"), init=8.0)
    grads = [torch.tensor([16.0, float("inf")])]
    scaler.unscale(grads)
    assert scaler.found_inf.item() == 1
    scaler.update()
    assert scaler.scale.item() == 4.0
    for _ in range(2):
        g = [torch.tensor([8.0])]
        scaler.unscale(g)
        assert scaler.found_inf.item() == 0 and g[0].item() == 2.0  # divided by the scale
        scaler.update()
    assert scaler.scale.item() == 8.0


# ---------------------------------------------------------------- per-sample outputs


def test_outputs_are_computed_with_tf32_off_and_the_settings_restored():
    seen = []

    class Spy(nn.Module):
        def forward(self, x):
            seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                         torch.get_float32_matmul_precision()))
            return x.float()[:, :3]

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    try:
        x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
        split = {"forget": np.arange(2), "test": np.arange(2, 5), "retain": np.arange(5, 10)}
        training.per_sample_outputs(Spy(), x, y, split)
        assert seen and set(seen) == {(False, False, "highest")}
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def test_tta_averages_airbench94s_six_views():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3)
    model = nn.Sequential(conv, nn.Flatten(), nn.LazyLinear(4))
    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    y = torch.randint(0, 4, (6,))
    model(x.float())

    def net(images):
        return model(images.float())

    split = {"forget": np.arange(2), "test": np.arange(2, 4), "retain": np.arange(4, 6)}

    class Float(nn.Module):
        def forward(self, images):
            return net(images)

    wrapped = Float()
    plain = training.per_sample_outputs(wrapped, x, y, split)
    flip = training.per_sample_outputs(wrapped, x, y, split, tta="flip")
    six = training.per_sample_outputs(wrapped, x, y, split, tta="flip-translate")
    xf = x[:2].float()
    with torch.no_grad():
        def mirror(z):
            return 0.5 * net(z) + 0.5 * net(z.flip(-1))
        padded = F.pad(xf, (1, 1, 1, 1), mode="reflect")
        want = 0.5 * mirror(xf) + 0.25 * mirror(padded[:, :, 2:, 2:]) + 0.25 * mirror(
            padded[:, :, :-2, :-2])
        torch.testing.assert_close(torch.from_numpy(flip["forget_logits"]), mirror(xf))
        torch.testing.assert_close(torch.from_numpy(six["forget_logits"]), want)
        torch.testing.assert_close(torch.from_numpy(plain["forget_logits"]), net(xf))
    assert not np.allclose(plain["forget_logits"], six["forget_logits"])


# ---------------------------------------------------------------- augmentation


def test_reflect_crop_and_translate_match_reflect_padding():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8, generator=gen)
    aug = Augmenter(6, padding=2, flip=True)
    shifts, flips = aug.draw(torch.arange(6), gen)
    out = crop_flip(images, shifts, flips, 2, "reflect")
    padded = F.pad(images.float(), (2, 2, 2, 2), mode="reflect")
    for i in range(6):
        r, c = shifts[i].tolist()
        want = padded[i, :, r:r + 8, c:c + 8]
        want = want.flip(-1) if flips[i] else want
        assert torch.equal(out[i].float(), want), i
    one = F.pad(images.float(), (1, 1, 1, 1), mode="reflect")
    assert torch.equal(translate(images, 1, 1).float(), one[:, :, :8, :8])
    assert torch.equal(translate(images, -1, -1).float(), one[:, :, 2:, 2:])


def test_alternating_flips_turn_every_image_the_other_way_each_epoch():
    gen = torch.Generator().manual_seed(0)
    aug = Augmenter(50, padding=0, flip=True, flip_mode="alternate")
    by_image = []
    for _ in range(3):
        order = torch.randperm(50, generator=gen)
        _, flips = aug.draw(order, gen)
        per_image = torch.empty(50, dtype=torch.bool)
        per_image[order] = flips  # position -> image
        by_image.append(per_image)
    assert torch.equal(by_image[1], ~by_image[0]) and torch.equal(by_image[2], by_image[0])
    assert 10 < int(by_image[0].sum()) < 40
    random = Augmenter(50, padding=0, flip=True)
    a = random.draw(torch.arange(50), torch.Generator().manual_seed(1))[1]
    b = random.draw(torch.arange(50), torch.Generator().manual_seed(2))[1]
    assert not torch.equal(a, ~b)


# ---------------------------------------------------------------- captured step (cuda_graph)


def test_captured_step_equals_eager_training(speed_on_cpu):
    x, y = data(56)  # batch 16: three full batches and a partial one (run eagerly)
    options = {"epochs": 3, "batch_size": 16, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
               "lookahead": True}
    eager = training.fit(mlp()[0], x, y, seed=3, **options)
    graphed = training.fit(mlp()[0], x, y, seed=3, cuda_graph=True, **options)
    assert training.last_run["cuda_graph"] is True and training.last_run["steps"] == 12
    for a, b in zip(eager.parameters(), graphed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    training.fit(mlp()[0], x, y, seed=3, cuda_graph=True, precision="fp16", **options)
    assert training.last_run["cuda_graph"] is False
    assert training.last_run["graph_fallback"] == "fp16 loss scaling"


# ---------------------------------------------------------------- timing labels


def test_workers_sharing_a_gpu_are_not_recorded_as_sequential():
    slots = [Slot("cuda:0", {}, 1, f"gpu{g}#{k}", gpu=g) for k in range(2) for g in range(2)]
    assert gpu_workers(slots) == 2 and gpu_workers(slots[:2]) == 1
    assert gpu_workers([Slot("cpu", {}, 1, "cpu#0")]) == 1
    gpu = types.SimpleNamespace(device=torch.device("cuda"))
    label = timing(gpu, {"gpu_workers": 2})
    assert label["timing"] == "shared-gpu" and label["gpu_workers"] == 2
    assert timing(gpu, {"gpu_workers": 1}) == {"timing": "sequential"}
    assert timing(types.SimpleNamespace(device=torch.device("cpu")), {"gpu_workers": 4}) == {
        "timing": "sequential"}
    # No model timed alone: the retraining time comes from the shared-GPU ones, labelled so.
    keep, how = _kept({"timing": ["shared-gpu", "ensemble-share", "shared-gpu"]}, alone_only=True)
    assert keep == [0, 2] and "shared their GPU" in how


def test_stores_made_before_the_new_train_keys_stay_compatible():
    from unlearn_cli.config import ADDED_LATER, identity

    new_keys = ("padding_mode", "flip_mode", "lookahead", "tta", "ensemble_size", "cuda_graph")
    assert all(k in ADDED_LATER["train"] for k in new_keys)
    now = load_config(None).to_dict()
    before = {**now, "train": {k: v for k, v in now["train"].items() if k not in new_keys}}
    assert identity(before) == identity(now)
    assert identity(load_config(None, ["train.ensemble_size=4"]).to_dict()) != identity(now)


def test_gpu_sharing_is_counted_per_gpu_and_bounded_by_the_share():
    """Timing labels: how many workers take turns on one GPU (Ray numbers every slot's GPU 0)."""
    from unlearn_cli.context import gpu_workers
    from unlearn_cli.launch import Slot

    def slots(count, gpu_of, share):
        return [Slot("cuda:0", {}, 1, f"s{k}", gpu=gpu_of(k), gpu_share=share)
                for k in range(count)]

    assert gpu_workers(slots(4, lambda k: 0, 1.0)) == 1  # Ray: 4 whole GPUs, one job each
    assert gpu_workers(slots(8, lambda k: 0, 0.5)) == 2  # Ray: 2 jobs per GPU
    assert gpu_workers(slots(4, lambda k: k % 2, 0.5)) == 2  # local: 2 GPUs, 2 workers each
    assert gpu_workers(slots(1, lambda k: 0, 0.5)) == 1  # local: one job left for 2 slots
    assert gpu_workers([Slot("cpu", {}, 1, "c")]) == 1

