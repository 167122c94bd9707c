"""The runtime ratio in units of a speed probe (train_refs.Probe): each side's times divided by
the machine's speed of their moment, so that loads that differ between train-refs and apply do not
read as costs."""

import numpy as np
import pytest

from unlearn_cli import score
from unlearn_cli.store import REFERENCE, UNLEARNED, Store


def _bank(cpu, probe):
    n = len(cpu)
    return {"cpu_seconds": np.asarray(cpu, float), "wall_seconds": np.full(n, np.nan),
            "probe_cpu_seconds": np.asarray(probe, float),
            "probe_wall_seconds": np.full(n, np.nan)}


def test_worked_example_of_the_probed_ratio():
    # Unlearning runs: 0.2 s, 0.3 s, 0.9 s under probes of 0.1, 0.1, 0.3 s -> 2, 3, 3 probes: 3.
    # Retrained: 4 s and 8 s under probes 0.1 and 0.2 s (the second under twice the load) -> 40.
    unl, refs = _bank([0.2, 0.3, 0.9], [0.1, 0.1, 0.3]), _bank([4.0, 8.0], [0.1, 0.2])
    assert score._probed_ratio(unl, [0, 1, 2], refs, [0, 1], "cpu") == (pytest.approx(3 / 40),
                                                                         3, 2)
    # Seconds over seconds would read median 0.3 / median 6 = 0.05.
    assert score._ratio(np.median(unl["cpu_seconds"]),
                        np.median(refs["cpu_seconds"])) == pytest.approx(0.05)
    # Only the counted models matter, and of them only those timed between probes (the first of
    # every job); a side without any: no probed ratio.
    assert score._probed_ratio(unl, [0, 1], refs, [0], "cpu")[0] == pytest.approx(2.5 / 40)
    refs["probe_cpu_seconds"][1] = np.nan
    assert score._probed_ratio(unl, [0, 1, 2], refs, [0, 1], "cpu") == (pytest.approx(3 / 40),
                                                                         3, 1)
    refs["probe_cpu_seconds"][0] = np.nan
    assert score._probed_ratio(unl, [0, 1, 2], refs, [0, 1], "cpu") is None


def test_models_timed_alone_carry_their_probe_and_the_report_uses_it(trained_store):
    s = Store(trained_store)
    metas = [s.load_outputs(REFERENCE, i)[1] for i in s.done_seeds(REFERENCE)]
    metas += [s.load_outputs(UNLEARNED, i, "finetune")[1]
              for i in s.done_seeds(UNLEARNED, "finetune")]
    # conftest.FAST's launch.timed_alone, one job each (6 reference models: jobs of 25; 6
    # finetune runs): seeds 0, 1, 1,000,000 and 1,000,001, and only they, timed between two
    # probes.
    probed = sorted(m["seed"] for m in metas if "probe_cpu_seconds" in m)
    assert probed == [0, 1, 1_000_000, 1_000_001]
    assert all(m["probe_cpu_seconds"] > 0 and m["probe_wall_seconds"] > 0
               for m in metas if "probe_cpu_seconds" in m)
    (rep,) = score.run(trained_store, methods=["finetune"], bootstrap=0)
    rt = rep["runtime"]
    assert rt["normalised"] == {"unlearned": 2, "retrained": 2}
    assert rt["ratio_raw"] == pytest.approx(rt["seconds_per_model"]["unlearned"]
                                            / rt["seconds_per_model"]["retrained"])
    assert 0 < rt["ratio"] < 1  # finetune (1 epoch) is cheaper than retraining (3 epochs)


@pytest.mark.parametrize(("n", "batch", "epochs", "expected"), [
    (1212, 64, 30, 24),  # digits: 24 steps (two epochs of 768 examples)
    (100, 512, 3, 3),  # a tiny test recipe: its own 3 steps, never more
    (10, 4, 1, 3),
    (5000, 512, 30, 24),
])
def test_a_probe_takes_its_steps_and_never_more_than_the_recipe(n, batch, epochs, expected,
                                                                monkeypatch):
    import torch

    from unlearn_cli import train_refs, training

    steps = []
    real_fit = training.fit

    def counting_fit(model, x, y, **options):
        steps.append(options["epochs"] * -(-len(y) // options["batch_size"]))
        return real_fit(model, x, y, **{**options, "epochs": 0})

    monkeypatch.setattr(training, "fit", counting_fit)

    class Ctx:
        device = torch.device("cpu")
        spec = {"arch": "mlp", "hidden": [4], "input_shape": [3], "num_classes": 2}

        def subset(self, name):
            return torch.zeros(n, 3), torch.zeros(n, dtype=torch.long)

    probe = train_refs.Probe(Ctx(), {"batch_size": batch, "epochs": epochs, "lr": 0.1})
    assert probe.take() == {}  # the first probe opens the chain
    assert set(probe.take()) == {"probe_cpu_seconds", "probe_wall_seconds"}
    assert steps == [expected, expected]


def test_timed_alone_deals_the_total_by_seed():
    from unlearn_cli.train_refs import timed_alone

    # The demo: 100 models in jobs of 25, 12 alone: positions 0-2 of the four jobs.
    assert timed_alone(list(range(100)), 25, 12) == [0, 1, 2, 25, 26, 27, 50, 51, 52, 75, 76, 77]
    # A bank of 1,000 (40 jobs): still 12, the same seeds.
    assert timed_alone(list(range(1000)), 25, 12) == timed_alone(list(range(100)), 25, 12)
    # By seed: a smaller or a resumed bank times alone what a full one would (of the seeds it has).
    assert timed_alone(list(range(10)), 25, 12) == [0, 1, 2]
    assert timed_alone([1, 2, 3, 26, 90], 25, 12) == [1, 2, 26]
    # The deal goes round the jobs: 13 adds position 3 of the first job, not of the last.
    assert timed_alone(list(range(100)), 25, 13) == [0, 1, 2, 3, 25, 26, 27, 50, 51, 52, 75, 76,
                                                     77]
    # More than four jobs' worth when the total needs it; never more than the seeds.
    assert timed_alone(list(range(10)), 1, 6) == [0, 1, 2, 3, 4, 5]
    assert timed_alone(list(range(8)), 2, 100) == list(range(8))
    assert timed_alone([], 25, 12) == [] and timed_alone(list(range(5)), 25, 0) == []


def test_a_job_splits_into_runs_timed_alone_and_a_lockstep_group():
    from unlearn_cli.train_refs import split_alone

    assert split_alone([0, 1, 2, 3], [0], True) == ([0], [1, 2, 3])
    assert split_alone([5, 6], [], True) == ([], [5, 6])  # nothing chosen: no probe, all at once
    # A single seed left over is trained alone too (timed), not as a lockstep group of one.
    assert split_alone([0, 1, 2], [0, 1], True) == ([0, 1, 2], [])
    # The loop engine: every seed one by one, in seed order.
    assert split_alone([3, 4, 5], [4], False) == ([3, 4, 5], [])


def test_launch_timed_alone_chooses_the_models_timed_alone(tmp_path):
    from conftest import FAST

    from unlearn_cli import apply, train_refs
    from unlearn_cli.config import load_config

    cfg = load_config(None, [s for s in FAST if not s.startswith("launch.timed_alone")]
                      + ["train.epochs=1", "launch.timed_alone=5", "launch.chunk_size=4"])
    # Four models first, then four more (a bank grown, as a resumed run sees it): seeds 0, 1
    # (positions 0 and 1 of job 0) and 4 (position 0 of job 1), as one run of 8 would choose.
    train_refs.run(cfg, tmp_path, num_models=4, inline=True)
    train_refs.run(cfg, tmp_path, num_models=8, inline=True)
    apply.run(cfg, tmp_path, method_spec="finetune", num_models=8, inline=True)
    s = Store(tmp_path)
    metas = {"reference": [s.load_outputs(REFERENCE, i)[1] for i in range(8)],
             "unlearned": [s.load_outputs(UNLEARNED, 1_000_000 + i, "finetune")[1]
                           for i in range(8)]}
    for kind, bank in metas.items():
        assert [i for i, m in enumerate(bank) if m["timing"] == "sequential"] == [0, 1, 4], kind
        assert all(m["timing"] == "ensemble-share" for i, m in enumerate(bank)
                   if i not in (0, 1, 4)), kind
    (rep,) = score.run(tmp_path, methods=["finetune"], bootstrap=0)
    assert rep["runtime"]["normalised"] == {"unlearned": 3, "retrained": 3}
