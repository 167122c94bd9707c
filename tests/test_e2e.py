"""End to end on the digits default with a small N: the files produced and the numbers."""

import json
import math
import textwrap

import numpy as np
import pytest
from conftest import FAST
from typer.testing import CliRunner

from unlearn_cli import apply, score, train_refs
from unlearn_cli.cli import app
from unlearn_cli.config import load_config
from unlearn_cli.store import ORIGINAL, REFERENCE, UNLEARNED, Store


def test_store_layout(trained_store):
    s = Store(trained_store)
    exp = json.loads((trained_store / "experiment.json").read_text())
    assert exp["schema"] == "unlearn.store/1" and exp["config"]["train"]["epochs"] == 3
    assert {"unlearn", "python", "numpy", "torch"} <= set(exp["versions"])
    assert s.done_seeds(REFERENCE) == list(range(6))
    assert s.done_seeds(UNLEARNED, "finetune") == [1_000_000 + i for i in range(6)]
    for seed in range(6):
        d = trained_store / "reference" / f"seed-{seed:06d}"
        assert sorted(p.name for p in d.iterdir()) == ["model.pt", "outputs.npz"]
    arrays, meta = s.load_outputs(REFERENCE, 0)
    split = s.load_split()
    assert arrays["forget_logits"].shape == (len(split["forget"]), 10)
    assert arrays["test_logits"].shape == (len(split["test"]), 10)
    assert arrays["retain_loss"].shape == arrays["retain_correct"].shape == (len(split["retain"]),)
    assert meta["seed"] == 0 and meta["wall_seconds"] > 0 and meta["config_hash"]
    assert s.load_model(ORIGINAL)["meta"]["kind"] == "original"


def test_none_scores_exactly_zero_and_finetune_does_not(trained_store):
    (none_report,) = score.run(trained_store, methods=["none"], bootstrap=0)
    assert none_report["forget_quality"] == 0.0
    assert none_report["final_score"] == 0.0
    assert all(e == 50.0 for e in none_report["per_example"]["epsilon"])
    (ft,) = score.run(trained_store, methods=["finetune"], bootstrap=0)
    assert ft["forget_quality"] > 0
    assert ft["num_models"] == {"retrained": 6, "unlearned": 6, "scored": 6}
    # The original model is what `none` returns: identical utility.
    assert none_report["utility"]["test_accuracy"]["unlearned"] == pytest.approx(
        none_report["original"]["test_accuracy"])


def test_report_fields(trained_store, tmp_path):
    out = tmp_path / "r.json"
    result = CliRunner().invoke(app, ["score", "--store", str(trained_store), "--out", str(out),
                                      "--bootstrap", "10"])
    assert result.exit_code == 0, result.output
    assert "finetune" in result.output and "none" in result.output  # side by side
    doc = json.loads(out.read_text())
    assert doc["schema"] == "unlearn.report/2"
    by_name = {r["method"]: r for r in doc["methods"]}
    rep = by_name["finetune"]
    for key in ("forget_quality", "final_score", "config", "versions", "reading"):
        assert key in rep
    for part in ("retain_accuracy", "test_accuracy", "forget_accuracy"):
        assert set(rep["utility"][part]) >= {"unlearned", "retrained"}
    assert set(rep["runtime"]["seconds_per_model"]) == {"unlearned", "retrained"}
    assert rep["runtime"]["ratio"] > 0
    split = Store(trained_store).load_split()
    n_forget = len(split["forget"])
    assert len(rep["per_example"]["index"]) == len(rep["per_example"]["epsilon"]) == n_forget
    # The values, not only the keys: each derived number follows from the report's own parts.
    assert rep["per_example"]["index"] == split["forget"].tolist()
    n = rep["num_models"]["scored"]
    assert n == 6 and rep["num_models"] == {"retrained": 6, "unlearned": 6, "scored": 6}
    buckets = math.ceil(math.log(n - 1)) / 0.5  # worth 2^-k for k < buckets, else 0
    for eps, h in zip(rep["per_example"]["epsilon"], rep["per_example"]["score"]):
        assert 0 <= eps <= 50
        k = math.floor(eps / 0.5)
        assert h == (2.0 ** -k if k < buckets else 0.0)
    assert rep["forget_quality"] == pytest.approx(sum(rep["per_example"]["score"]) / n_forget)
    lo, hi = rep["forget_quality_interval"]
    assert 0 <= lo <= hi <= 1
    for part in ("retain_accuracy", "test_accuracy", "forget_accuracy"):
        u = rep["utility"][part]
        assert 0 < u["unlearned"] <= 1 and 0 < u["retrained"] <= 1
        assert u["ratio"] == pytest.approx(u["unlearned"] / u["retrained"])
    ra, ta = rep["utility"]["retain_accuracy"]["ratio"], rep["utility"]["test_accuracy"]["ratio"]
    assert rep["final_score"] == pytest.approx(rep["forget_quality"] * ra * ta)
    assert rep["final_score_clipped"] == pytest.approx(
        rep["forget_quality"] * min(ra, 1) * min(ta, 1))
    secs = rep["runtime"]["seconds_per_model"]
    assert rep["runtime"]["ratio_raw"] == pytest.approx(secs["unlearned"] / secs["retrained"])
    # The reported ratio divides each time by the speed probe taken around it (test_runtime_probe)
    assert rep["runtime"]["normalised"] and rep["runtime"]["ratio"] > 0
    assert rep["runtime"]["over_gate"] == (rep["runtime"]["ratio"] > 0.2)
    # `none` returns the original: its runs are identical, so every example is capped (F = 0),
    # and its accuracies are the original model's.
    none = by_name["none"]
    assert none["forget_quality"] == 0.0 and set(none["per_example"]["epsilon"]) == {50.0}
    assert none["utility"]["test_accuracy"]["unlearned"] == pytest.approx(
        none["original"]["test_accuracy"])
    # The terminal shows the same F as the file.
    assert f"{rep['forget_quality']:.4f}" in result.output


def test_larger_n_trains_only_the_missing(trained_store, tmp_path):
    import shutil

    from unlearn_cli import train_refs

    root = tmp_path / "grow"
    shutil.copytree(trained_store, root)
    result = train_refs.run(load_config(None, FAST), root, num_models=8)
    assert result.trained == [6, 7] and result.reused == list(range(6))
    assert not result.trained_original
    applied = apply.run(load_config(None, FAST), root, method_spec="finetune")
    assert applied.trained == [1_000_006, 1_000_007]


PLUGIN = '''
import torch

def shrink(model, data, params, *, device, seed):
    """Scale every weight by a factor (a toy method)."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(params.get("factor", 0.5))
    return model

def broken(model, data, params, *, device, seed):
    raise RuntimeError("kaboom")
'''


@pytest.fixture
def plugin_file(tmp_path, monkeypatch):
    path = tmp_path / "my_methods.py"
    path.write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    return path


def test_plugins_from_a_file_and_from_a_module(trained_store, tmp_path, plugin_file):
    import shutil

    root = tmp_path / "p"
    shutil.copytree(trained_store, root)
    cfg = load_config(None, FAST + ["method.shrink.factor=0.9"])
    apply.run(cfg, root, method_spec=f"{plugin_file}:shrink", num_models=2)
    apply.run(cfg, root, method_spec="my_methods:shrink", num_models=2)
    s = Store(root)
    original = s.load_model(ORIGINAL)["state_dict"]
    for spec in (f"{plugin_file}:shrink", "my_methods:shrink"):
        assert len(s.done_seeds(UNLEARNED, spec)) == 2
        state = s.load_model(UNLEARNED, 1_000_000, spec)["state_dict"]
        for key, value in original.items():
            np.testing.assert_allclose(state[key].numpy(), 0.9 * value.numpy(), rtol=1e-6)
    assert set(s.stored_methods()) >= {f"{plugin_file}:shrink", "my_methods:shrink"}


def test_a_plugin_that_raises_is_reported_with_method_and_seed(trained_store, tmp_path,
                                                               plugin_file):
    import shutil

    root = tmp_path / "p"
    shutil.copytree(trained_store, root)
    result = CliRunner().invoke(app, ["apply", "--method", f"{plugin_file}:broken", "--store",
                                      str(root), "--num-models", "2", "--workers", "1"])
    assert result.exit_code == 1
    assert "failed at seed 1000000: RuntimeError: kaboom" in result.output
    assert Store(root).done_seeds(UNLEARNED, f"{plugin_file}:broken") == []


def test_apply_with_two_worker_processes(trained_store, tmp_path):
    import shutil

    root = tmp_path / "w"
    shutil.copytree(trained_store, root)
    cfg = load_config(None, [s for s in FAST if not s.startswith("launch")] +
                      ["launch.workers=2", "launch.chunk_size=2"])
    res = apply.run(cfg, root, method_spec="reset-head", num_models=4)
    assert len(res.trained) == 4 and all(o.ok for o in res.outcomes)
    assert apply.run(load_config(None, FAST), root, method_spec="reset-head",
                     num_models=4).trained == []  # resumed: nothing left to do
    # The same seeds in one process, in another store, give the same models: runs depend on
    # their seed only, not on the worker or the job they ran in.
    other = tmp_path / "inline"
    shutil.copytree(trained_store, other)
    apply.run(load_config(None, FAST), other, method_spec="reset-head", num_models=4)
    for seed in range(1_000_000, 1_000_004):
        a = Store(root).load_model(UNLEARNED, seed, "reset-head")["state_dict"]
        b = Store(other).load_model(UNLEARNED, seed, "reset-head")["state_dict"]
        for key in a:
            np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())


@pytest.mark.slow
def test_train_refs_gives_the_same_models_on_one_or_two_workers(tmp_path):
    """The ensemble engine's jobs are cut by seed, not by worker count: equal bits either way."""
    sets = [s for s in FAST if not s.startswith("launch.workers")] + ["train.epochs=2"]
    for workers in (1, 2):
        cfg = load_config(None, sets + [f"launch.workers={workers}"])
        train_refs.run(cfg, tmp_path / f"w{workers}", num_models=6)
    one, two = Store(tmp_path / "w1"), Store(tmp_path / "w2")
    assert one.done_seeds(REFERENCE) == two.done_seeds(REFERENCE) == list(range(6))
    # Both kinds of training are compared: two models alone, four in lockstep (conftest.FAST).
    timing = [one.load_outputs(REFERENCE, s)[1]["timing"] for s in range(6)]
    assert timing == ["sequential"] * 2 + ["ensemble-share"] * 4
    for seed in [None, *range(6)]:
        kind = ORIGINAL if seed is None else REFERENCE
        a, _ = one.load_outputs(kind, seed)
        b, _ = two.load_outputs(kind, seed)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{kind} {seed} {key}")


def test_the_readme_plugin_example_runs(trained_store, tmp_path, monkeypatch):
    """The plugin shown in the README works as shown."""
    import re
    import shutil
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"```python\n# my_methods.py\n(.*?)```", readme, re.S).group(1)
    (tmp_path / "my_methods.py").write_text(code)
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "readme"
    shutil.copytree(trained_store, root)
    spec = "my_methods.py:forget_by_finetuning"
    result = CliRunner().invoke(app, ["apply", "--method", spec, "--store", str(root),
                                      "--num-models", "2", "--workers", "1",
                                      "--set", "method.forget_by_finetuning.lr=0.05"])
    assert result.exit_code == 0, result.output
    assert Store(root).done_seeds(UNLEARNED, spec) == [1_000_000, 1_000_001]
    assert Store(root).method_record(spec)["params"] == {"lr": 0.05}


def test_metric_all_adds_the_seed_variant_and_the_simple_mia(trained_store):
    (rep,) = score.run(trained_store, methods=["finetune"], metric="all", bootstrap=0)
    seed = rep["seed_metric"]
    assert set(seed) == {"variant", "score", "dropped", "above_one", "attack_accuracy",
                         "simple_mia_accuracy", "per_example"}
    assert seed["variant"] == "seed" and rep["seed_converged"]["variant"] == "seed-converged"
    assert 0.0 <= rep["lira"]["balanced_accuracy"] <= 1.0 and rep["klom"]["forget"]["p95"] >= 0
    assert len(seed["per_example"]["score"]) == rep["num_forget_examples"]
    assert 0.0 <= seed["attack_accuracy"] <= 1.0 and 0.0 <= seed["simple_mia_accuracy"] <= 1.0
    assert 0 <= seed["dropped"] <= rep["num_forget_examples"]
    (seed_only,) = score.run(trained_store, methods=["finetune"], metric="seed", bootstrap=0)
    assert "forget_quality" not in seed_only
    again = dict(seed_only["seed_metric"])  # the same numbers (NaN where NaN: compare arrays)
    np.testing.assert_array_equal(again.pop("per_example")["score"], seed["per_example"]["score"])
    assert again == {k: v for k, v in seed.items() if k != "per_example"}


def test_score_refuses_too_few_models_and_bad_bootstrap(trained_store, tmp_path):
    import shutil

    from unlearn_cli.errors import StoreError, UnlearnError

    with pytest.raises(UnlearnError, match="--bootstrap 1"):
        score.run(trained_store, bootstrap=1)
    root = tmp_path / "few"
    shutil.copytree(trained_store, root)
    for seed in range(2, 6):
        shutil.rmtree(root / "reference" / f"seed-{seed:06d}")
    with pytest.raises(StoreError, match="at least 3 models per bank"):
        score.run(root, methods=["finetune"])


DIVERGE = '''
import torch

def nan_at_odd_seeds(model, data, params, *, device, seed):
    """Diverges (NaN weights) on odd seeds only."""
    if seed % 2:
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float("nan"))
    return model
'''


def test_one_failing_seed_does_not_cost_the_others_nor_poison_score(trained_store, tmp_path):
    import shutil

    from unlearn_cli.errors import JobsFailed

    root = tmp_path / "d"
    shutil.copytree(trained_store, root)
    plugin = tmp_path / "diverge.py"
    plugin.write_text(DIVERGE)
    spec = f"{plugin}:nan_at_odd_seeds"
    cfg = load_config(None, FAST)
    with pytest.raises(JobsFailed, match="diverged at seed 1000001.*and 2 more seed"):
        apply.run(cfg, root, method_spec=spec, num_models=6)
    # Every even seed of the same job was still run and stored; nothing non-finite was.
    assert Store(root).done_seeds(UNLEARNED, spec) == [1_000_000, 1_000_002, 1_000_004]
    reports = score.run(root, bootstrap=0)  # the other methods still score
    assert {r["method"] for r in reports} >= {"finetune", "none", spec}


def test_a_failed_first_try_does_not_lock_in_its_settings(trained_store, tmp_path):
    import shutil

    from unlearn_cli.errors import JobsFailed, StoreError

    root = tmp_path / "retry"
    shutil.copytree(trained_store, root)
    (tmp_path / "touchy.py").write_text(
        "def touchy(model, data, params, *, device, seed):\n"
        "    if params.get('boom'):\n"
        "        raise RuntimeError('bad setting')\n"
        "    return model\n"
    )
    spec = f"{tmp_path / 'touchy.py'}:touchy"
    with pytest.raises(JobsFailed, match="bad setting"):
        apply.run(load_config(None, FAST + ["method.touchy.boom=true"]), root,
                  method_spec=spec, num_models=2)
    assert Store(root).done_seeds(UNLEARNED, spec) == []
    # Nothing was stored under the bad setting, so the corrected one is accepted.
    apply.run(load_config(None, FAST + ["method.touchy.boom=false"]), root, method_spec=spec,
              num_models=2)
    assert Store(root).method_record(spec)["params"] == {"boom": False}
    # Once runs are stored, other settings are refused.
    with pytest.raises(StoreError, match="boom: False -> True"):
        apply.run(load_config(None, FAST + ["method.touchy.boom=true"]), root,
                  method_spec=spec, num_models=2)
