"""The CUDA path: bf16 autocast, fp16 loss scale, channels_last, CUDA-graph steps, lockstep
ensembles, compile once per worker, GPU workers end to end.

Run with `pytest -m gpu` (benchmarks/gpu_check.sh does, with the benchmark). Every test here is
skipped, with the reason, where torch sees no CUDA GPU.
"""

import numpy as np
import pytest
import torch
from test_cifar import CONFIGS, write_archive
from typer.testing import CliRunner

from unlearn_cli import cifar, training
from unlearn_cli.augment import crop_flip, draw
from unlearn_cli.cli import app
from unlearn_cli.config import load_config
from unlearn_cli.lockstep import fit_lockstep
from unlearn_cli.models import fresh_model, init_from_data, init_model, model_spec
from unlearn_cli.store import REFERENCE, UNLEARNED, Store
from unlearn_cli.training import fit, per_sample_outputs, recipe, warm_up

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]
CUDA = torch.device("cuda")


def spec_of(name, *extra):
    cfg = load_config(CONFIGS[name], list(extra))
    return model_spec(cfg.model, (3, 32, 32), 10, mean=cifar.MEAN, std=cifar.STD), cfg


def learnable(n, seed=0):
    """uint8 images whose class sets the mean colour (plus noise): a few steps learn it."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=gen)
    colours = torch.randint(0, 256, (10, 3, 1, 1), generator=gen).float()
    noise = torch.randn(n, 3, 32, 32, generator=gen) * 20
    x = (colours[y] + noise).clamp(0, 255).to(torch.uint8)
    return x.to(CUDA), y.to(CUDA)


def test_fast_recipe_learns_in_bf16_with_float32_weights_and_batchnorm():
    spec, cfg = spec_of("fast")
    x, y = learnable(4096)
    model = fresh_model(spec, 0, CUDA)
    init_from_data(model, x)
    options = {**recipe(cfg.train), "epochs": 3, "batch_size": 512, "compile": "none"}
    assert options["precision"] == "bf16" and options["channels_last"]
    fit(model, x, y, seed=0, **options)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(b.dtype in (torch.float32, torch.int64) for b in model.buffers())
    conv = model[-1].blocks[0].conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    split = {"forget": np.arange(100), "test": np.arange(100, 600), "retain": np.arange(600, 4096)}
    out = per_sample_outputs(model, x, y, split)
    assert out["test_logits"].dtype == np.float32 and np.isfinite(out["test_logits"]).all()
    accuracy = (out["test_logits"].argmax(1) == y[100:600].cpu().numpy()).mean()
    assert accuracy > 0.9, accuracy


def test_fp16_with_its_dynamic_loss_scale_trains():
    spec, cfg = spec_of("fast")
    x, y = learnable(4096, seed=1)
    model = init_model(spec, 0).to(CUDA)
    init_from_data(model, x)
    options = {**recipe(cfg.train), "epochs": 3, "batch_size": 512, "precision": "fp16"}
    fit(model, x, y, seed=0, **options)
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert accuracy > 0.5, accuracy


def test_cuda_graph_step_equals_eager_steps():
    spec, cfg = spec_of("resnet18", "model.widths=[8, 16, 16, 32]")
    x, y = learnable(200, seed=3)  # batch 64: 3 full batches and a partial one (eager)
    options = {**recipe(cfg.train), "epochs": 3, "batch_size": 64, "precision": "fp32"}
    with training.exact_float32():  # no TF32: only the capture may differ, and it must not
        eager = fit(init_model(spec, 1).to(CUDA), x, y, seed=1, **options)
        graphed = fit(init_model(spec, 1).to(CUDA), x, y, seed=1, cuda_graph=True, **options)
    assert training.last_run["cuda_graph"] is True, training.last_run
    for a, b in zip(eager.state_dict().values(), graphed.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_lockstep_members_on_the_gpu_equal_lone_models():
    spec, cfg = spec_of("resnet18", "model.widths=[8, 16, 16, 32]")
    x, y = learnable(256, seed=4)
    options = {**recipe(cfg.train), "epochs": 1, "batch_size": 64, "precision": "fp32"}
    with training.exact_float32():
        members = fit_lockstep([init_model(spec, s).to(CUDA) for s in (5, 6)], x, y,
                               seeds=[5, 6], **options)
        alone = fit(init_model(spec, 6).to(CUDA), x, y, seed=6, **options)
    for a, b in zip(members[1].state_dict().values(), alone.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    bf16 = {**options, "precision": "bf16", "cuda_graph": True, "epochs": 2}
    trained = fit_lockstep([init_model(spec, s).to(CUDA) for s in (5, 6)], x, y, seeds=[5, 6],
                           **bf16)
    assert all(torch.isfinite(p).all() for m in trained for p in m.parameters())


def test_augmentation_on_gpu_equals_cpu():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=gen)
    shifts, flips = draw(64, padding=4, flip=True, generator=gen)
    on_gpu = crop_flip(images.to(CUDA), shifts.to(CUDA), flips.to(CUDA), 4)
    assert torch.equal(on_gpu.cpu(), crop_flip(images, shifts, flips, 4))


def test_worker_model_is_reused_with_each_seeds_cpu_weights():
    spec, _ = spec_of("resnet18")
    a = fresh_model(spec, 1, CUDA)
    b = fresh_model(spec, 2, CUDA)
    assert a is b and next(b.parameters()).is_cuda
    for key, value in init_model(spec, 2).state_dict().items():
        assert torch.equal(b.state_dict()[key].cpu(), value), key


def test_compile_happens_once_per_worker_and_architecture():
    from torch._dynamo.utils import counters

    spec, cfg = spec_of("fast", "model.widths=[16, 32, 32]")
    x, y = learnable(1024, seed=2)
    options = {**recipe(cfg.train), "epochs": 2, "batch_size": 256, "compile": "default"}
    model = fresh_model(spec, 0, CUDA)
    assert warm_up(model, x, y, **options) is True
    graphs = counters["stats"]["unique_graphs"]
    model = fresh_model(spec, 0, CUDA)
    assert warm_up(model, x, y, **options) is False  # warmed up already: nothing to do
    init_from_data(model, x)
    fit(model, x, y, seed=0, **options)
    other = init_model(spec, 1).to(CUDA)  # a new module of the same architecture
    init_from_data(other, x)
    fit(other, x, y, seed=1, **options)
    assert counters["stats"]["unique_graphs"] == graphs  # no recompilation
    with torch.no_grad():
        assert torch.isfinite(model(x[:8])).all()


def test_train_refs_and_apply_on_the_gpu_with_two_workers(tmp_path):
    root = tmp_path / "data"
    write_archive(root)
    store = tmp_path / "store"
    runner = CliRunner()
    sets = [x for s in (f"data.root={root}", "data.forget_size=50", "train.epochs=2",
                        "train.batch_size=25") for x in ("--set", s)]
    gpu = ["--store", str(store), "--device", "cuda:0", "--workers-per-gpu", "2"]
    result = runner.invoke(app, ["train-refs", "--config", str(CONFIGS["fast"]), "--num-models",
                                 "3", *gpu, *sets])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["apply", "--method", "finetune", *gpu,
                                 "--set", "method.finetune.epochs=1"])
    assert result.exit_code == 0, result.output
    s = Store(store)
    assert s.done_seeds(REFERENCE) == [0, 1, 2]
    assert s.done_seeds(UNLEARNED, "finetune") == [1_000_000, 1_000_001, 1_000_002]
    arrays, meta = s.load_outputs(REFERENCE, 2)
    assert meta["device"] == "cuda:0" and np.isfinite(arrays["forget_logits"]).all()
