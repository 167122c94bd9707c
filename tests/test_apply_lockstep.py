"""apply's ensemble engine: methods with a lockstep form (finetune, retrain) run K seeds at once.

What must hold: each run is the model the method alone gives for its seed, up to float rounding;
the bits do not depend on --workers (jobs are cut by run index); the runs chosen by
train_refs.timed_alone are timed alone and only those times reach the runtime ratio.
"""

import shutil

import numpy as np
import pytest
from conftest import FAST

from unlearn_cli import apply, score
from unlearn_cli.config import load_config
from unlearn_cli.errors import JobsFailed
from unlearn_cli.methods import resolve
from unlearn_cli.store import UNLEARNED, Store

SEEDS = [apply.unlearn_seed(i) for i in range(6)]


def _states(root, method):
    return [Store(root).load_model(UNLEARNED, seed, method)["state_dict"] for seed in SEEDS]


def _metas(root, method):
    return [Store(root).load_outputs(UNLEARNED, seed, method)[1] for seed in SEEDS]


@pytest.mark.parametrize("name", ["finetune", "retrain"])
def test_builtin_lockstep_forms_exist(name):
    assert apply.lockstep_of(resolve(name)) is not None
    assert apply.lockstep_of(resolve("reset-head")) is None


@pytest.mark.slow
@pytest.mark.parametrize("method", ["finetune", "retrain"])
def test_lockstep_runs_match_runs_alone_and_do_not_depend_on_workers(trained_store, tmp_path,
                                                                      method):
    sets = [s for s in FAST if not s.startswith("launch.workers")] + ["launch.chunk_size=6"]
    roots = {}
    for name, workers in (("one", 1), ("two", 2), ("loop", 1)):
        roots[name] = tmp_path / name
        shutil.copytree(trained_store, roots[name])
        shutil.rmtree(roots[name] / "unlearned", ignore_errors=True)
        with pytest.MonkeyPatch.context() as patch:
            if name == "loop":  # the method as if it had no lockstep form: one run at a time
                patch.setattr(apply, "lockstep_of", lambda method: None)
            res = apply.run(load_config(None, sets + [f"launch.workers={workers}"]), roots[name],
                            method_spec=method, num_models=6)
        assert sorted(res.trained) == SEEDS and all(o.ok for o in res.outcomes)
    one, two, loop = (_states(roots[n], method) for n in ("one", "two", "loop"))
    for a, b, c in zip(one, two, loop):
        for key in a:
            np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())  # bits, any workers
            np.testing.assert_allclose(a[key].numpy(), c[key].numpy(), atol=1e-4, rtol=0)
    # One job of six runs: the first two (conftest.FAST's launch.timed_alone) timed alone, four in
    # lockstep as shares of their group.
    metas = _metas(roots["one"], method)
    assert [m["timing"] for m in metas] == ["sequential"] * 2 + ["ensemble-share"] * 4
    assert all(m["engine"] == "ensemble" and m["ensemble_size"] == 4 for m in metas[2:])
    assert all(m["timing"] == "sequential" for m in _metas(roots["loop"], method))


def test_only_runs_timed_alone_reach_the_runtime_ratio():
    bank = {"timing": ["sequential", "ensemble-share", "ensemble-share", "sequential"]}
    keep, how = score._kept(bank, alone_only=True)
    assert keep == [0, 3] and how == "median of 2 models timed alone"


def test_apply_chunks_for_lockstep_are_cut_by_run_index_whatever_the_workers():
    missing = [apply.unlearn_seed(i) for i in (0, 1, 2, 30, 31, 60)]
    for slots in (1, 2, 8):
        chunks = apply._chunks(missing, 0, slots, "ensemble")
        assert [[s - apply.UNLEARN_SEED_BASE for s in c] for c in chunks] == [[0, 1, 2],
                                                                               [30, 31], [60]]
    # Methods without a lockstep form keep the balanced cut (each run is independent of it).
    assert len(apply._chunks(missing, 0, 2, "loop")) == 2


def test_a_lockstep_form_that_returns_the_wrong_thing_is_one_clear_error(trained_store, tmp_path,
                                                                        monkeypatch):
    root = tmp_path / "s"
    shutil.copytree(trained_store, root)
    method = resolve("finetune")
    monkeypatch.setattr(method.fn, "lockstep", lambda models, *a, **k: models[:1])
    # Runs 6..11 in jobs 6-7 and 8-11 (chunks 1 and 2 of 4). launch.timed_alone=10 deals over
    # four chunks: positions 0-1 of each and position 2 of chunks 0-1, so runs 6, 8 and 9 alone,
    # and 7 too (a single run left over); 10 and 11 in lockstep.
    cfg = load_config(None, FAST + ["launch.chunk_size=4", "launch.timed_alone=10"])
    with pytest.raises(JobsFailed) as info:
        apply.run(cfg, root, method_spec="finetune", num_models=12)
    assert "must return one torch.nn.Module per seed" in str(info.value)
    # The runs that worked are stored; the lockstep group's are not.
    done = Store(root).done_seeds(UNLEARNED, "finetune")
    assert [s - apply.UNLEARN_SEED_BASE for s in done] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
