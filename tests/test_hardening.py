"""Issue 9, items 3-9: what a new and then a hostile user found, each kept fixed by a test.

Stores are copies of the session's tiny trained store (conftest.trained_store); commands go
through the CLI as a user types them, and every fix an error message names is followed.
"""

from __future__ import annotations

import io
import json
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST, tree_digest
from typer.testing import CliRunner

from unlearn_cli.cli import app
from unlearn_cli.errors import StoreError
from unlearn_cli.store import REFERENCE, UNLEARNED, Store

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def error_line(text):
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text
    return errors[0]


@pytest.fixture
def store_copy(trained_store, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(trained_store, dst)
    return dst


def sets():
    return [x for s in FAST for x in ("--set", s)]


def rewrite_npz(path, change):
    """Rewrite an outputs.npz with `change(arrays)` applied (keeping its meta)."""
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    change(arrays)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.write_bytes(buf.getvalue())


# ------------------------------------------------------------------ 4. outputs checked


WIDE_PLUGIN = '''
import torch


def wide(model, data, params, *, device, seed):
    """A model with 20 outputs for 10 classes."""
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 20))
'''


def test_outputs_of_the_wrong_width_are_refused_when_made(store_copy, tmp_path):
    plugin = tmp_path / "wide.py"
    plugin.write_text(WIDE_PLUGIN)
    spec = f"{plugin}:wide"
    code, out = invoke("apply", "--method", spec, "--num-models", 2, "--store", store_copy)
    assert code == 1
    line = error_line(out)
    assert f"{spec} run seed 1000000" in line and "(135, 20), expected (135, 10)" in line, line
    assert Store(store_copy).done_seeds(UNLEARNED, spec) == []  # nothing stored for it


@pytest.mark.parametrize("change, expected", [
    (lambda a: a.pop("forget_logits"), "forget_logits is missing"),
    (lambda a: a.update(forget_logits=a["forget_logits"][:, :5]), "expected (135, 10)"),
    (lambda a: a.update(test_logits=a["test_logits"][:-1]), "test_logits has shape (449, 10)"),
    (lambda a: a.update(retain_correct=a["retain_correct"].astype(np.float32)),
     "retain_correct has dtype float32, expected bool"),
    (lambda a: a.update(forget_logits=a["forget_logits"].astype(np.int64)), "dtype int64"),
    (lambda a: a["forget_logits"].__setitem__((0, 0), np.nan), "NaN or infinity"),
], ids=["key-missing", "class-count", "shape", "dtype-bool", "dtype-float", "nan"])
def test_outputs_that_do_not_fit_are_refused_when_read(store_copy, change, expected):
    path = store_copy / "reference" / "seed-000003" / "outputs.npz"
    rewrite_npz(path, change)
    before = tree_digest(store_copy)
    code, out = invoke("score", "--store", store_copy, "--bootstrap", 0)
    assert code == 1
    line = error_line(out)
    assert "reference model seed 3" in line and str(path) in line and expected in line, line
    assert tree_digest(store_copy) == before


def test_unlearned_outputs_are_checked_too(store_copy):
    path = store_copy / "unlearned" / "finetune" / "seed-1000001" / "outputs.npz"
    rewrite_npz(path, lambda a: a.pop("retain_loss"))
    code, out = invoke("score", "--store", store_copy, "--method", "finetune", "--bootstrap", 0)
    assert code == 1
    line = error_line(out)
    assert "finetune run seed 1000001" in line and "retain_loss is missing" in line, line
    assert "unlearn apply --method finetune" in line


# ------------------------------------------------------------------ 3. advice that works


def follow(line, cwd_store):
    """Do what an error line says: delete the paths it names, then run its commands in order."""
    for path in re.findall(r"delete (/\S+?)[,;:]? ", line + " "):
        Path(path).unlink()
    commands = re.findall(r"`(unlearn [^`]+)`", line)
    assert commands, f"no command to follow in: {line}"
    for command in commands:
        args = shlex.split(command)[1:]
        if args[0] == "score":
            args += ["--bootstrap", "0"]
        code, out = invoke(*args)
        assert code == 0, f"following `{command}` failed:\n{out}"
    return commands


def _truncate(path):
    path.write_bytes(path.read_bytes()[:200])


DAMAGE = {  # name: (what is done to the store, the command that then fails)
    "original-model-truncated": (lambda s: _truncate(s / "original" / "model.pt"),
                                 ["apply", "--method", "none"]),
    "original-model-missing": (lambda s: (s / "original" / "model.pt").unlink(),
                               ["apply", "--method", "none", "--dry-run"]),
    "reference-outputs-garbage": (
        lambda s: (s / "reference" / "seed-000002" / "outputs.npz").write_bytes(b"x" * 50),
        ["score", "--bootstrap", 0]),
    "reference-outputs-nan": (
        lambda s: rewrite_npz(s / "reference" / "seed-000004" / "outputs.npz",
                              lambda a: a["test_logits"].__setitem__((1, 1), np.inf)),
        ["score", "--bootstrap", 0]),
    "unlearned-outputs-truncated": (
        lambda s: _truncate(s / "unlearned" / "finetune" / "seed-1000005" / "outputs.npz"),
        ["score", "--method", "finetune", "--bootstrap", 0]),
    "method-record-garbage": (lambda s: (s / "unlearned" / "none" / "method.json").write_text("{"),
                              ["score", "--bootstrap", 0]),
    "split-garbage": (lambda s: (s / "split.npz").write_bytes(b"PK"),
                      ["score", "--bootstrap", 0]),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DAMAGE))
def test_every_fix_an_error_names_works_when_followed(store_copy, name):
    damage, command = DAMAGE[name]
    damage(store_copy)
    code, out = invoke(*command, "--store", store_copy)
    assert code == 1, out
    follow(error_line(out), store_copy)
    code, out = invoke(*command, "--store", store_copy)
    assert code == 0, out
    # The fix made no more models than the store had.
    s = Store(store_copy)
    assert s.done_seeds(REFERENCE) == list(range(6))
    assert len(s.done_seeds(UNLEARNED, "finetune")) == 6


def test_train_refs_finds_damaged_and_incomplete_models_and_redoes_them(store_copy):
    s = Store(store_copy)
    (store_copy / "reference" / "seed-000001" / "model.pt").unlink()  # outputs.npz stays
    _truncate(store_copy / "original" / "model.pt")
    rewrite_npz(store_copy / "reference" / "seed-000003" / "outputs.npz",
                lambda a: a.pop("retain_correct"))
    untouched = tree_digest(store_copy / "reference" / "seed-000000")
    code, out = invoke("train-refs", "--num-models", 6, "--store", store_copy)
    assert code == 0, out
    out = " ".join(out.split())  # unwrap the terminal's lines
    assert "the original model was damaged (model.pt is damaged or truncated" in out
    assert "reference model seed 1 was damaged (model.pt is missing)" in out
    assert "reference model seed 3 was damaged" in out and "retain_correct is missing" in out
    assert "2 reference model(s) trained, 4 reused, original trained" in out
    assert s.damaged("original") == {} and s.damaged(REFERENCE, range(6)) == {}
    assert tree_digest(store_copy / "reference" / "seed-000000") == untouched
    s.load_model("original")  # whole again
    code, out = invoke("train-refs", "--num-models", 6, "--store", store_copy)
    assert code == 0 and "nothing to do" in out, out


# ------------------------------------------------------------------ 5. the store's identity


def _edit_experiment(store, change):
    path = store / "experiment.json"
    exp = json.loads(path.read_text())
    change(exp)
    path.write_text(json.dumps(exp))


def test_a_hand_edited_experiment_is_refused_before_any_training(store_copy):
    _edit_experiment(store_copy, lambda e: e["config"]["train"].update(epochs=5))
    before = tree_digest(store_copy)
    code, out = invoke("train-refs", "--num-models", 7, "--store", store_copy)
    assert code == 1 and "experiment.json was edited" in error_line(out), out
    code, out = invoke("score", "--store", store_copy, "--bootstrap", 0)
    assert code == 1 and "experiment.json was edited" in error_line(out), out
    assert tree_digest(store_copy) == before  # model 6 was not trained with 5 epochs


def test_an_edit_that_also_rewrote_the_hash_is_refused_by_the_models(store_copy):
    from unlearn_cli.config import from_mapping

    def change(exp):
        exp["config"]["train"]["epochs"] = 5
        exp["config_hash"] = from_mapping(exp["config"]).identity_hash()

    _edit_experiment(store_copy, change)
    code, out = invoke("train-refs", "--num-models", 7, "--store", store_copy)
    line = error_line(out)
    assert code == 1 and "mixes models made under other settings" in line, out
    assert "the original model" in line and "reference model seed 0" in line
    assert not (store_copy / "reference" / "seed-000006").exists()


def test_a_bank_whose_models_disagree_is_refused(store_copy):
    path = store_copy / "reference" / "seed-000004" / "outputs.npz"
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(str(arrays["meta"]))
    meta["config_hash"] = "0123456789abcdef"  # made under another config
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(path.with_suffix(".tmp.npz"), **arrays)
    path.with_suffix(".tmp.npz").replace(path)
    code, out = invoke("score", "--store", store_copy, "--bootstrap", 0)
    line = error_line(out)
    assert code == 1 and "1 model(s), reference model seed 4" in line, line
    code, out = invoke("apply", "--method", "none", "--num-models", 7, "--store", store_copy)
    assert code == 1 and "reference model seed 4" in error_line(out)
    # Reading that one model alone is refused too: the check is the store's.
    with pytest.raises(StoreError, match="made under config 0123456789abcdef"):
        Store(store_copy).load_outputs(REFERENCE, 4)


def test_score_checks_the_provenance_of_the_runs_it_reads(store_copy):
    # A run of `none` made under another config: scoring finetune alone does not read it (and
    # is not refused), scoring `none` or every method is, naming that run.
    path = store_copy / UNLEARNED / "none" / "seed-1000002" / "outputs.npz"
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(str(arrays["meta"]))
    meta["config_hash"] = "0123456789abcdef"
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(path.with_suffix(".tmp.npz"), **arrays)
    path.with_suffix(".tmp.npz").replace(path)
    code, out = invoke("score", "--store", store_copy, "--method", "finetune", "--bootstrap", 0,
                       "--out", store_copy / "report.json")
    assert code == 0, out
    for only in (["--method", "none"], []):
        code, out = invoke("score", "--store", store_copy, *only, "--bootstrap", 0)
        line = error_line(out)
        assert code == 1 and "mixes models made under other settings" in line, out
        assert "none" in line


def test_a_deleted_experiment_is_rebuilt_only_from_matching_provenance(store_copy):
    original = json.loads((store_copy / "experiment.json").read_text())
    (store_copy / "experiment.json").unlink()
    code, out = invoke("score", "--store", store_copy, "--bootstrap", 0)
    line = error_line(out)
    assert code == 1 and "lost its experiment.json" in line
    assert f"unlearn train-refs --store {store_copy} --num-models 6" in line
    before = tree_digest(store_copy)
    code, out = invoke("train-refs", "--num-models", 6, "--store", store_copy)  # the default config
    assert code == 1 and "were not made under this config" in error_line(out)
    assert tree_digest(store_copy) == before
    code, out = invoke("train-refs", "--num-models", 6, "--store", store_copy, *sets())
    assert code == 0 and "rebuilt" in out, out
    rebuilt = json.loads((store_copy / "experiment.json").read_text())
    assert rebuilt["config_hash"] == original["config_hash"]
    assert rebuilt["split_hash"] == original["split_hash"]
    code, out = invoke("score", "--store", store_copy, "--bootstrap", 0)
    assert code == 0, out


def test_every_identity_key_is_known_to_the_hash():
    """A key added to data/model/train must be listed in config.ADDED_LATER with the value that
    reproduces older stores, or the hash of every existing store would change."""
    import dataclasses

    from unlearn_cli.config import ADDED_LATER, FIRST_KEYS, REFERENCE_SECTIONS, Config

    for section in REFERENCE_SECTIONS:
        fields = {f.name for f in dataclasses.fields(getattr(Config(), section))}
        known = set(FIRST_KEYS[section]) | set(ADDED_LATER.get(section, {}))
        assert fields == known, f"{section}: add {sorted(fields - known)} to ADDED_LATER"


# ------------------------------------------------------------------ 6. what is planned


def test_train_refs_says_what_it_plans_before_training(tmp_path):
    code, out = invoke("train-refs", "--num-models", 2, "--store", tmp_path / "s", *sets())
    assert code == 0, out
    lines = out.splitlines()
    plan = next(i for i, line in enumerate(lines) if line.startswith("training the original"))
    # One CPU slot (sets() has launch.workers=1): the jobs run in the command's own process.
    assert re.fullmatch(r"training the original and 2 reference model\(s\): \d+ job\(s\) in "
                        r"this process, \d+ thread\(s\) \((ensemble|loop) engine\)",
                        lines[plan]), lines[plan]
    assert plan < next(i for i, line in enumerate(lines) if line.startswith("store "))


# ------------------------------------------------------------------ 7. plugins that exit

EXITING_PLUGINS = {
    "exit-at-import": ("import sys\nsys.exit(5)\n\ndef m(model, data, params, *, device, seed):\n"
                       "    return model\n",
                       "importing {file} called sys.exit(5)"),
    "exit-in-method": ("import sys\n\ndef m(model, data, params, *, device, seed):\n"
                       "    sys.exit(5)\n",
                       "method '{spec}' called sys.exit(5) (a method must return the model or "
                       "raise) at seed 1000000"),
    "interrupt-in-method": ("def m(model, data, params, *, device, seed):\n"
                            "    raise KeyboardInterrupt\n",
                            "method '{spec}' raised KeyboardInterrupt itself (no Ctrl-C was "
                            "pressed) at seed 1000000"),
    "interrupt-at-import": ("raise KeyboardInterrupt\n", "importing {file} raised "
                            "KeyboardInterrupt itself"),
}


@pytest.mark.parametrize("name, workers", [(name, 1) for name in EXITING_PLUGINS] + [
    # In worker processes SIGINT is ignored: a KeyboardInterrupt there is the method's own.
    # (Imports happen in the parent first, before any worker starts.)
    pytest.param(name, 2, marks=pytest.mark.slow) for name in EXITING_PLUGINS if "method" in name
])
def test_plugins_that_exit_are_one_line_with_method_and_seed(store_copy, tmp_path, name,
                                                             workers):
    source, expected = EXITING_PLUGINS[name]
    plugin = tmp_path / f"{name.replace('-', '_')}.py"
    plugin.write_text(source)
    spec = f"{plugin}:m"
    before = tree_digest(store_copy / "reference")
    result = runner.invoke(app, ["apply", "--method", spec, "--num-models", 2, "--workers",
                                 workers, "--store", str(store_copy)])
    assert result.exit_code == 1, result.output
    line = " ".join(error_line(result.output).split())
    assert expected.format(spec=spec, file=plugin) in line, line
    assert "Traceback" not in result.output
    assert Store(store_copy).done_seeds(UNLEARNED, spec) == []
    assert tree_digest(store_copy / "reference") == before


def test_user_text_is_not_read_as_markup_or_emoji(store_copy, tmp_path):
    code, out = invoke("train-refs", "--store", tmp_path / "s", "--set", "name=a:m:b/c")
    assert code == 1 and "got 'a:m:b/c'" in error_line(out), out
    code, out = invoke("train-refs", "--store", tmp_path / "s", "--set", "train.lr=x[/bold]")
    assert code == 1 and "got 'x[/bold]'" in error_line(out), out
    plugin = tmp_path / "keep.py"
    plugin.write_text("def m(model, data, params, *, device, seed):\n    return model\n")
    spec = f"{plugin}:m"
    code, out = invoke("apply", "--method", spec, "--num-models", 3, "--store", store_copy)
    assert code == 0 and f"of {spec} done" in " ".join(out.split()), out
    code, out = invoke("score", "--method", spec, "--store", store_copy, "--bootstrap", 0)
    assert code == 0 and f"{spec}:" in out and "\u24c2" not in out, out  # no Ⓜ emoji


# ------------------------------------------------------------------ 8. answers without torch

# Each line: the arguments of one `unlearn` call that must answer (help, a listing, or one error
# line) without importing torch; {store} is a trained store. Timed as whole processes by
# benchmarks/bench_cli.py (the same list); here only what they import is checked.
QUICK = [
    "--help", "--version", "methods", "apply --help", "train-refs --help", "score --help",
    "train-refs --num-models 0 --store {tmp}/a",
    "train-refs --num-models 99999999999 --store {tmp}/a",
    "train-refs --device cuda: --store {tmp}/a",
    "train-refs --set train.epoch=3 --store {tmp}/a",
    "train-refs --set train.lr=[1 --store {tmp}/a",
    "apply --method none --num-models 0 --store {store}",
    "apply --method forgetful --store {store}",
    "apply --method none --store {tmp}/nowhere",
    "apply --method finetune --store {store} --set train.epochs=5",
    "score --metric nope --store {store}",
    "score --bootstrap 1 --store {store}",
    "score --store {tmp}/nowhere",
]

QUICK_SCRIPT = """
import json
import sys
from typer.testing import CliRunner
from unlearn_cli.cli import app

runner, codes = CliRunner(), []
for line in sys.argv[1:]:
    result = runner.invoke(app, line.split())
    codes.append(result.exit_code)
heavy = sorted(m for m in ("torch", "sklearn", "scipy") if m in sys.modules)
print(json.dumps({"codes": codes, "heavy": heavy}))
"""


def test_help_listing_and_argument_errors_never_import_torch(trained_store, tmp_path):
    import subprocess
    import sys

    lines = [q.format(store=trained_store, tmp=tmp_path) for q in QUICK]
    proc = subprocess.run([sys.executable, "-c", QUICK_SCRIPT, *lines], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["codes"] == [0] * 6 + [1] * (len(QUICK) - 6), seen
    assert seen["heavy"] == [], f"imported {seen['heavy']} to answer: {lines}"
    assert not (tmp_path / "a").exists()


def test_the_registry_lists_methods_without_importing_them():
    import subprocess
    import sys

    script = ("import sys; from unlearn_cli.methods import REGISTRY; "
              "names = [m.name + m.summary for m in REGISTRY.values()]; "
              "print(len(names), 'torch' in sys.modules); "
              "REGISTRY['finetune'].params(); print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert proc.stdout.split() == [str(len(__import__("unlearn_cli.methods").methods.REGISTRY)),
                                   "False", "True"], proc.stdout + proc.stderr


# ------------------------------------------------------------------ 9. small lies


@pytest.mark.slow
def test_retrain_reads_a_runtime_ratio_of_one(tmp_path):
    """`retrain` is retraining: both sides timed the same way (warm, alone, median, same kind of
    worker, CPU seconds) read about 1, and the load of each side is recorded.

    The goal is 1.0 +- 0.15 under load. Each time is divided by a speed probe taken around it
    (train_refs.Probe). Measured on this project's 2-core machine under a load average of 6-10:
    0.84-1.16 in 6 runs of this recipe (median distance from 1: 0.06; in CPU seconds without the
    probe 0.81-1.37, median distance 0.14), so the bound here is what holds there: it catches the
    cold-start bias that read 0.33-0.57 before."""
    import torch

    from unlearn_cli import apply, score, train_refs
    from unlearn_cli.config import load_config

    # Loop engine: every reference model is timed alone; 10 epochs so that a model takes long
    # enough (~0.2 s) for a timer to mean something. In-process jobs with one torch thread, as
    # each launcher worker has when there are as many workers as cores (with more threads, idle
    # threads spin and their CPU time depends on the load).
    cfg = load_config(None, ["train.epochs=10", "launch.workers=1", "train.engine=loop"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_refs.run(cfg, tmp_path / "s", num_models=7)
        apply.run(cfg, tmp_path / "s", method_spec="retrain")
    finally:
        torch.set_num_threads(threads)
    (rep,) = score.run(tmp_path / "s", methods=["retrain"], bootstrap=0)
    runtime = rep["runtime"]
    assert runtime["clock"] == "cpu"  # on a CPU: what else the machine runs does not count
    assert runtime["normalised"] == {"unlearned": 7, "retrained": 7}  # every one probed
    assert 0.6 <= runtime["ratio"] <= 1.6, runtime
    assert runtime["retrained_timing"] == "median of 7 models timed alone"
    assert runtime["threads"]["unlearned"] == runtime["threads"]["retrained"]
    assert all(v is not None for v in runtime["load_average"].values())


@pytest.mark.parametrize("command", [[], ["train-refs"], ["apply"], ["score"]])
def test_help_shows_flags_and_plain_metavars(command):
    code, out = invoke(*command, "--help")
    assert code == 0
    assert not re.search(r"<(bool|int|str|path|list\[str\])>", out), out
    if command == ["apply"]:
        assert re.search(r"--dry-run\s+Run the method once", out)
        assert "--set KEY=VALUE" in out and "--num-models N" in out
        # Examples stay one per line, unwrapped, so that they can be copied.
        assert "  unlearn apply --method reset-head --num-models 50 --set " \
               "method.reset-head.epochs=3\n" in out


def test_version():
    from unlearn_cli import __version__

    code, out = invoke("--version")
    assert code == 0 and out.strip() == f"unlearn {__version__}"


def test_the_resume_line_counts_reference_models_only(store_copy):
    code, out = invoke("train-refs", "--num-models", 6, "--store", store_copy)
    assert code == 0, out
    assert "6 reference model(s) already stored: reused" in out  # the original is not one
    assert "0 reference model(s) trained, 6 reused" in out


def test_too_few_unlearning_runs_suggests_apply(store_copy, tmp_path):
    plugin = tmp_path / "keep.py"
    plugin.write_text("def keep(model, data, params, *, device, seed):\n    return model\n")
    spec = f"{plugin}:keep"
    assert invoke("apply", "--method", spec, "--num-models", 2, "--store", store_copy)[0] == 0
    code, out = invoke("score", "--method", spec, "--store", store_copy, "--bootstrap", 0)
    line = error_line(out)
    assert code == 1 and "unlearn train-refs" not in line, line
    assert f"`unlearn apply --method {spec} --num-models 6 --store {store_copy}`" in line
    follow(line, store_copy)
    code, out = invoke("score", "--method", spec, "--store", store_copy, "--bootstrap", 0)
    assert code == 0, out


def test_dry_run_says_how_its_seconds_were_taken(store_copy):
    code, out = invoke("apply", "--method", "finetune", "--dry-run", "--store", store_copy)
    assert code == 0, out
    out = " ".join(out.split())
    assert "seconds, unlearned: the method's second run in this process (warm" in out
    assert "its first took" in out and "seconds, original: its training as train-refs timed" in out


def test_the_seed_rows_are_explained(store_copy):
    code, out = invoke("score", "--method", "finetune", "--metric", "all", "--store", store_copy,
                       "--bootstrap", 0)
    assert code == 0, out
    assert "seed: dropped / above 1" in out
    assert "seed: dropped / above 1 = forget examples the seed's attack could not score" in \
        " ".join(out.split())
