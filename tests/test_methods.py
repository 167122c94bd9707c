"""The unlearning methods: each runs on the digits default, keeps its promise, is seeded, and scores
through the real pipeline.

Most tests call the method functions directly on one original model trained for a few epochs
(cheap); the end-to-end test goes through `train_refs.run`, `apply.run` and `score.run`.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from unlearn_cli import apply, metrics, score, train_refs
from unlearn_cli.config import TrainConfig, load_config
from unlearn_cli.data import load_dataset, make_split
from unlearn_cli.errors import ConfigError
from unlearn_cli.methods import REGISTRY, UnlearnData, method_params
from unlearn_cli.models import init_model, model_spec
from unlearn_cli.store import REFERENCE, UNLEARNED, Store
from unlearn_cli.training import fit, recipe

BASELINES = ["none", "retrain", "finetune", "reset-head", "neggrad", "neggrad-plus",
             "random-label", "scrub", "salun", "l1-sparse", "bad-teacher", "ssd"]
# The NeurIPS 2023 challenge's entries (their own checks: test_methods_challenge.py).
CHALLENGE = ["forget-contrastive", "masked-small-gradients", "noisy-finetune", "prune-reinit",
             "conv-transpose", "reset-distill", "noisy-subsets"]
EXPECTED = BASELINES + CHALLENGE
CHANGING = [name for name in EXPECTED if name != "none"]
# Methods that push the forget examples' loss up by construction (ascent, wrong or random labels,
# disobeying the teacher, or a random teacher).
RAISE_FORGET_LOSS = ["neggrad", "neggrad-plus", "random-label", "scrub", "salun", "bad-teacher"]
SEED = 1_000_000  # the first seed `apply` uses
ORIGINAL_EPOCHS = 15  # enough for the original to fit its forget set (train accuracy ~100%)


@dataclasses.dataclass(frozen=True)
class Setup:
    cfg: object
    spec: dict
    original: torch.nn.Module
    data: UnlearnData
    test_x: torch.Tensor
    test_y: torch.Tensor


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup() -> Setup:
    return make_setup()


def make_setup() -> Setup:
    """The digits default's split and an original trained for ORIGINAL_EPOCHS (about 1 s)."""
    cfg = load_config(None)
    ds = load_dataset(cfg.data)
    split = make_split(ds.y.numpy(), cfg.data)
    spec = model_spec(cfg.model, ds.input_shape, ds.num_classes)

    def part(name):
        idx = torch.as_tensor(split[name])
        return ds.x[idx], ds.y[idx]

    original = init_model(spec, 7)
    fit(original, *part("train"), seed=7, **{**recipe(cfg.train), "epochs": ORIGINAL_EPOCHS})
    data = UnlearnData(*part("forget"), *part("retain"), ds.num_classes)
    return Setup(cfg, spec, original.eval(), data, *part("test"))


def run(setup: Setup, name: str, seed: int = SEED, **overrides) -> torch.nn.Module:
    """One run of a method on a private copy of the original, with default params."""
    method = REGISTRY[name]
    params = dataclasses.replace(method.params(), **overrides)
    model = copy.deepcopy(setup.original).eval()
    return method.fn(model, setup.data, params, device=torch.device("cpu"), seed=seed)


def weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


@torch.no_grad()
def accuracy(model, x, y) -> float:
    return (model(x).argmax(1) == y).float().mean().item()


@torch.no_grad()
def mean_loss(model, x, y) -> float:
    return F.cross_entropy(model(x), y).item()


def test_registry_lists_every_method_with_a_summary_and_a_cited_source():
    assert list(REGISTRY) == EXPECTED
    for name, method in REGISTRY.items():
        assert method.name == method.spec == name
        assert method.group == ("challenge" if name in CHALLENGE else "baseline"), name
        # `unlearn methods` prints name and summary on one 80-column line (names padded to the
        # longest of their group).
        width = max(len(n) for n in (CHALLENGE if name in CHALLENGE else BASELINES))
        assert method.summary and width + 1 + len(method.summary) <= 79, name
        assert dataclasses.is_dataclass(method.params)
        assert method.params.__dataclass_params__.frozen, name
        doc = __import__(method.fn.__module__, fromlist=["_"]).__doc__
        assert doc and doc.startswith(f"`{name}`"), name
        if name not in ("none", "finetune", "reset-head"):
            assert "Source:" in doc, name


def test_none_returns_the_original_untouched(setup):
    model = copy.deepcopy(setup.original)
    out = REGISTRY["none"].fn(model, setup.data, REGISTRY["none"].params(),
                              device=torch.device("cpu"), seed=SEED)
    assert out is model and same(out, setup.original)


@pytest.mark.parametrize("name", CHANGING)
def test_method_changes_the_model_and_keeps_it_usable(setup, name):
    out = run(setup, name)
    assert isinstance(out, torch.nn.Module) and not out.training
    assert not same(out, setup.original)
    assert all(torch.isfinite(p).all() for p in out.parameters())
    # Usable: no method's default may wreck the model (the original tests at ~0.96 here).
    original_test = accuracy(setup.original, setup.test_x, setup.test_y)
    assert accuracy(out, setup.test_x, setup.test_y) >= original_test - 0.05, name
    assert accuracy(out, setup.data.retain_x, setup.data.retain_y) >= 0.9, name


@pytest.mark.parametrize("name", RAISE_FORGET_LOSS)
def test_method_raises_the_forget_loss(setup, name):
    before = mean_loss(setup.original, setup.data.forget_x, setup.data.forget_y)
    after = mean_loss(run(setup, name), setup.data.forget_x, setup.data.forget_y)
    assert after > before, (name, before, after)


def test_neggrad_lowers_forget_accuracy_when_pushed(setup):
    # At its default the digits forget accuracy barely moves (retrained models also get ~99% of
    # the forget examples right); twice the default lr shows the direction unmistakably.
    before = accuracy(setup.original, setup.data.forget_x, setup.data.forget_y)
    out = run(setup, "neggrad", lr=2 * REGISTRY["neggrad"].params().lr)
    assert accuracy(out, setup.data.forget_x, setup.data.forget_y) < before


def test_retrain_is_a_reference_model_trained_from_scratch(setup):
    """retrain(seed) is bit for bit what train-refs makes with that seed: nothing of the original
    survives. Without a recipe from the caller it uses the train section's defaults, which must
    stay the digits recipe."""
    assert recipe(TrainConfig()) == recipe(setup.cfg.train)
    out = run(setup, "retrain")
    expected = init_model(setup.spec, SEED)
    fit(expected, setup.data.retain_x, setup.data.retain_y, seed=SEED, **recipe(setup.cfg.train))
    assert same(out, expected)


def test_retrain_follows_the_spec_and_recipe_it_is_given(setup):
    short = recipe(load_config(None, ["train.epochs=2", "train.lr=0.05"]).train)
    data = dataclasses.replace(setup.data, model_spec=setup.spec, train_recipe=short)
    method = REGISTRY["retrain"]
    original = copy.deepcopy(setup.original)
    out = method.fn(original, data, method.params(), device=torch.device("cpu"), seed=SEED)
    expected = init_model(setup.spec, SEED)
    fit(expected, setup.data.retain_x, setup.data.retain_y, seed=SEED, **short)
    assert same(out, expected)
    assert same(original, setup.original)  # a new model: the original copy is left alone


def test_ssd_only_shrinks_weights(setup):
    out = run(setup, "ssd")
    before, after = weights(setup.original), weights(out)
    shrunk = 0
    for b, a in zip(before, after):
        assert (a.abs() <= b.abs()).all() and (torch.sign(a) * torch.sign(b) >= 0).all()
        shrunk += int((a != b).sum())
    assert shrunk > 0


def test_ssd_without_shuffle_is_deterministic_across_seeds(setup):
    # The authors' fixed batches: the same model whatever the seed (the reason shuffle is on).
    a = run(setup, "ssd", seed=SEED, shuffle=False)
    b = run(setup, "ssd", seed=SEED + 1, shuffle=False)
    assert same(a, b)


def test_salun_moves_only_the_salient_share_of_the_weights(setup):
    out = run(setup, "salun")
    changed = sum(int((a != b).sum()) for a, b in zip(weights(out), weights(setup.original)))
    total = sum(p.numel() for p in out.parameters())
    share = REGISTRY["salun"].params().saliency_share
    assert 0 < changed <= share * total + 1  # + 1: a tie at the threshold may be kept


def test_l1_sparse_ends_with_smaller_weights_than_plain_fine_tuning(setup):
    """Same data order, same learning rate and epochs: the l1 penalty is the only difference."""
    p = REGISTRY["l1-sparse"].params()
    sparse = run(setup, "l1-sparse")
    plain = run(setup, "l1-sparse", gamma=0.0)
    l1 = [sum(float(w.detach().abs().sum()) for w in m.parameters()) for m in (sparse, plain)]
    assert l1[0] < 0.98 * l1[1], (l1, p.gamma)


def test_bad_teacher_pulls_forget_predictions_towards_uniform(setup):
    """The incompetent teacher is a random network: near-uniform outputs on digits."""
    x = setup.data.forget_x

    def entropy(model):
        with torch.no_grad():
            logp = F.log_softmax(model(x), dim=1)
        return float(-(logp.exp() * logp).sum(1).mean())

    assert entropy(run(setup, "bad-teacher")) > entropy(setup.original)


@pytest.mark.parametrize("name", CHANGING)
def test_method_is_decided_by_its_seed_alone(setup, name):
    torch.manual_seed(0)
    a = run(setup, name)
    torch.manual_seed(123)  # the global RNG must not matter: all randomness comes from `seed`
    b = run(setup, name)
    assert same(a, b), f"{name}: same seed, different weights"
    c = run(setup, name, seed=SEED + 1)
    assert not same(a, c), f"{name}: different seeds, same weights"


@pytest.mark.parametrize("name", EXPECTED)
def test_params_validate_through_the_config(name):
    method = REGISTRY[name]
    fields = [f.name for f in dataclasses.fields(method.params)]
    cfg = load_config(None, [f"method.{name}.no_such_key=1"])
    with pytest.raises(ConfigError) as err:
        method_params(method, cfg)
    message = str(err.value)
    if not fields:
        assert f"{name} takes no hyperparameters, got no_such_key" in message
        return
    assert f"method.{name}.no_such_key: unknown key" in message
    assert all(f in message for f in fields)  # the valid keys are listed
    # A valid key is applied, a value of the wrong type is refused.
    first = dataclasses.fields(method.params)[0]
    value = 3 if first.type in ("int", int) else True if first.type in ("bool", bool) else 0.5
    cfg = load_config(None, [f"method.{name}.{first.name}={value}"])
    assert getattr(method_params(method, cfg), first.name) == value
    cfg = load_config(None, [f"method.{name}.{first.name}=lots"])
    with pytest.raises(ConfigError, match=f"method.{name}.{first.name}: expected"):
        method_params(method, cfg)


# --------------------------------------------------------------------------- end to end

E2E_MODELS = 20  # runs per method; retrain's F at this N moves by about +-0.01 between draws
E2E_REFERENCES = 2 * E2E_MODELS  # so that a half split has E2E_MODELS models (see the last test)
# The baselines added with this test (the challenge entries run end to end at small N in
# test_methods_challenge.py: 20 runs each would double this fixture's time).
NEW_METHODS = [name for name in BASELINES if name not in ("none", "finetune", "reset-head")]
# The digits default with in-process jobs. Not FAST: `apply` does not hand methods the train
# recipe yet, so `retrain` trains with the default recipe, which the references must share.
E2E_CONFIG = ["launch.workers=1"]


@pytest.fixture(scope="module")
def method_store(tmp_path_factory):
    """A digits store with 40 references and 20 runs of every new method."""
    root = tmp_path_factory.mktemp("methods") / "digits"
    cfg = load_config(None, E2E_CONFIG)
    train_refs.run(cfg, root, num_models=E2E_REFERENCES)
    for name in NEW_METHODS:
        apply.run(cfg, root, method_spec=name, num_models=E2E_MODELS)
    return root


def reports(store, methods) -> dict[str, dict]:
    return {r["method"]: r for r in score.run(store, methods=methods, bootstrap=0)}


def test_every_new_method_is_stored_with_its_params_and_times(method_store):
    store = Store(method_store)
    cfg = load_config(None, E2E_CONFIG)
    for name in NEW_METHODS:
        seeds = store.done_seeds(UNLEARNED, name)
        assert seeds == [apply.unlearn_seed(i) for i in range(E2E_MODELS)], name
        record = store.method_record(name)
        assert record["params"] == dataclasses.asdict(method_params(REGISTRY[name], cfg)), name
        _, meta = store.load_outputs(UNLEARNED, seeds[0], name)
        assert meta["wall_seconds"] > 0, name


def test_new_methods_score_through_the_pipeline(method_store):
    by_name = reports(method_store, NEW_METHODS)
    assert list(by_name) == NEW_METHODS
    for name, rep in by_name.items():
        assert rep["num_models"]["scored"] == E2E_MODELS
        assert 0 < rep["forget_quality"] <= 1, name  # every method varies across seeds
        assert np.isfinite(rep["final_score"]), name
        assert rep["runtime"]["ratio"] > 0, name
    # The oracle beats every approximate method, and costs about a retraining.
    best_other = max(r["forget_quality"] for n, r in by_name.items() if n != "retrain")
    assert by_name["retrain"]["forget_quality"] > best_other
    assert by_name["retrain"]["runtime"]["ratio"] > 0.5


def forget_confidences(store: Store, seeds: list[int]) -> np.ndarray:
    """Logit-scaled confidences [len(seeds), F] of stored reference models on the forget set."""
    labels = store.load_split()["forget_labels"]
    rows = []
    for seed in seeds:
        arrays, _ = store.load_outputs(REFERENCE, seed)
        rows.append(metrics.logit_scaled_confidence(arrays["forget_logits"], labels))
    return np.stack(rows)


def test_retrain_scores_near_the_calibrated_ceiling(method_store):
    """retrain's models are draws from the references' own distribution: a perfect unlearner.

    Compared like with like, since F falls with N on digits (about 0.17 at 10 models per bank,
    0.13 at 20, measured): the report's share (retrain and the ceiling both at N // 2 = 10 against
    the same reference halves), and retrain's F at N = 20 against the ceiling at 20 per half,
    from all 40 references.
    """
    rep = reports(method_store, ["retrain"])["retrain"]
    assert rep["num_models"]["scored"] == E2E_MODELS
    # The share moves by ~0.02 with the split seed (measured) and more with the draw of models.
    assert rep["ceiling"]["share"] == pytest.approx(1.0, abs=0.2), rep["ceiling"]
    store = Store(method_store)
    ceiling = metrics.calibrated_ceiling(
        forget_confidences(store, store.done_seeds(REFERENCE)), seed=0)
    assert ceiling["num_models"] == E2E_MODELS
    # +-0.03: both estimates move by about 0.01 between draws of models at this N (measured).
    assert rep["forget_quality"] == pytest.approx(ceiling["forget_quality"], abs=0.03), ceiling
