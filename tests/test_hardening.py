"""Issue 9, items 3-9: what a new and then a hostile user found, each kept fixed by a test.

Stores are copies of the session's tiny trained store (conftest.trained_store); commands go
through the CLI as a user types them, and every fix an error message names is followed.
"""

from __future__ import annotations

import io
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import tree_digest
from typer.testing import CliRunner

from unlearn_cli.cli import app
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
