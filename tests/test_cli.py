"""The command line as a user sees it: help, and one clear line for every bad input."""

import json
import re

import pytest
from conftest import FAST, tree_digest
from typer.testing import CliRunner

from unlearn_cli.cli import app

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result, result.output  # stdout and stderr, as a terminal shows them


def error_line(text):
    lines = [line for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, text
    return errors[0]


def test_help_lists_the_commands():
    result, out = invoke("--help")
    assert result.exit_code == 0
    for name in ("train-refs", "apply", "score"):
        assert name in out


@pytest.mark.parametrize("command", ["train-refs", "apply", "score"])
def test_each_help_ends_with_examples(command):
    result, out = invoke(command, "--help")
    assert result.exit_code == 0
    tail = out[out.index("Examples"):]
    assert f"unlearn {command}" in tail


def sets():
    return [x for s in FAST for x in ("--set", s)]


@pytest.fixture
def store_copy(trained_store, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(trained_store, dst)
    return dst


def test_unknown_method_lists_valid_ones(store_copy):
    before = tree_digest(store_copy)
    result, out = invoke("apply", "--method", "forgetful", "--store", store_copy)
    assert result.exit_code == 1
    line = error_line(out)
    assert "unknown method 'forgetful'" in line and "finetune" in line and "reset-head" in line
    assert tree_digest(store_copy) == before


def test_unknown_config_key(tmp_path):
    result, out = invoke("train-refs", "--num-models", 2, "--store", tmp_path / "s",
                         "--set", "train.epoch=3")
    assert result.exit_code == 1
    assert "train.epoch: unknown key" in error_line(out)
    assert not (tmp_path / "s").exists()


def test_wrong_value_type(tmp_path):
    result, out = invoke("train-refs", "--store", tmp_path / "s", "--set", "train.lr=fast")
    assert result.exit_code == 1
    assert "train.lr: expected a finite number, got 'fast'" in error_line(out)


@pytest.mark.parametrize("n", [0, -3])
def test_num_models_must_be_positive(tmp_path, n):
    result, out = invoke("train-refs", "--num-models", n, "--store", tmp_path / "s")
    assert result.exit_code == 1
    assert "--num-models must be at least 1" in error_line(out)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("command", [["score"], ["apply", "--method", "finetune"]])
def test_missing_store(tmp_path, command):
    result, out = invoke(*command, "--store", tmp_path / "nowhere")
    assert result.exit_code == 1
    assert "unlearn train-refs" in error_line(out)
    assert not (tmp_path / "nowhere").exists()


def test_empty_store_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    result, out = invoke("score", "--store", tmp_path / "empty")
    assert result.exit_code == 1
    assert "no experiment in store" in error_line(out)


def test_score_before_apply(tmp_path):
    store = tmp_path / "s"
    result, _ = invoke("train-refs", "--num-models", 2, "--store", store, *sets())
    assert result.exit_code == 0
    before = tree_digest(store)
    result, out = invoke("score", "--store", store)
    assert result.exit_code == 1
    assert "no unlearning runs yet" in error_line(out) and "unlearn apply" in out
    result, out = invoke("score", "--store", store, "--method", "finetune")
    assert "no runs of method 'finetune'" in error_line(out)
    assert tree_digest(store) == before


@pytest.mark.parametrize("spec, expected", [
    ("no/such/file.py:fn", "does not exist"),
    ("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"),
    ("json:no_such_function", "has no function 'no_such_function'"),
])
def test_bad_plugins(store_copy, spec, expected):
    before = tree_digest(store_copy)
    result, out = invoke("apply", "--method", spec, "--store", store_copy)
    assert result.exit_code == 1
    assert expected in error_line(out)
    assert tree_digest(store_copy) == before


def test_truncated_checkpoint(store_copy):
    ckpt = store_copy / "original" / "model.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    before = tree_digest(store_copy)
    result, out = invoke("apply", "--method", "reset-head", "--store", store_copy)
    assert result.exit_code == 1
    line = error_line(out)
    assert "damaged or truncated" in line and "model.pt" in line
    assert tree_digest(store_copy) == before


def test_corrupted_outputs(store_copy):
    path = store_copy / "reference" / "seed-000002" / "outputs.npz"
    path.write_bytes(b"garbage" * 10)
    result, out = invoke("score", "--store", store_copy)
    assert result.exit_code == 1
    assert re.search(r"seed-000002.*damaged or truncated", error_line(out))


def test_incompatible_config(store_copy):
    result, out = invoke("apply", "--method", "finetune", "--store", store_copy,
                         "--config", "configs/digits.yaml")
    assert result.exit_code == 1
    assert "different config (train.epochs: 3 -> 30)" in error_line(out)


def test_methods_listing():
    result, out = invoke("methods")
    assert result.exit_code == 0
    from unlearn_cli.methods import REGISTRY

    listed = {line.split()[0] for line in out.splitlines() if line.strip()}
    missing = sorted(set(REGISTRY) - listed)
    assert not missing, f"built-in methods not listed: {missing}"


def test_score_writes_the_report(store_copy, tmp_path):
    out_path = tmp_path / "report.json"
    result, out = invoke("score", "--store", store_copy, "--method", "none", "--out", out_path,
                         "--bootstrap", 20)
    assert result.exit_code == 0, out
    assert "forget quality F" in out and "ceiling" in out
    report = json.loads(out_path.read_text())
    assert report["schema"] == "unlearn.report/2" and report["method"] == "none"
    assert report["forget_quality"] == 0.0


def test_dry_run_prints_accuracies_and_stores_nothing(store_copy):
    before = tree_digest(store_copy)
    result, out = invoke("apply", "--method", "finetune", "--dry-run", "--store", store_copy)
    assert result.exit_code == 0, out
    assert "original" in out and "unlearned" in out and "forget acc" in out
    assert re.search(r"unlearned\s*│\s*\d+\.\d%", out)
    assert "nothing was stored" in out
    assert tree_digest(store_copy) == before


def test_paths_that_are_not_what_they_should_be(store_copy, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    result, out = invoke("train-refs", "--num-models", 2, "--store", a_file)
    assert result.exit_code == 1 and "is a file, not a folder" in error_line(out)
    result, out = invoke("score", "--store", store_copy, "--out", tmp_path)
    assert result.exit_code == 1 and "is a folder" in error_line(out)
    result, out = invoke("score", "--store", store_copy, "--bootstrap", 0,
                         "--out", a_file / "r.json")
    assert result.exit_code == 1 and "check the path" in error_line(out)


@pytest.mark.parametrize("text, expected", [
    ("name: ..\n", "name: expected a folder name"),
    ("name: 2024-01-01\n", "name: expected a folder name"),
    ("- a\n- b\n", "expected a mapping"),
])
def test_odd_config_files(tmp_path, text, expected):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    result, out = invoke("train-refs", "--config", path, "--store", tmp_path / "s",
                         "--set", "train.epochs=1")
    assert result.exit_code == 1 and expected in error_line(out)
    path.write_bytes(b"\xff\xfe\x00bad")
    result, out = invoke("train-refs", "--config", path, "--store", tmp_path / "s")
    assert result.exit_code == 1 and "not a UTF-8 text file" in error_line(out)


def test_launch_flags_are_named_as_command_line_options(tmp_path):
    result, out = invoke("train-refs", "--store", tmp_path / "s", "--device", "cuda:")
    assert result.exit_code == 1
    line = error_line(out)  # checked with the config, before anything is loaded
    assert "with the command-line options" in line and "launch.device: expected auto, cpu" in line
    result, out = invoke("train-refs", "--store", tmp_path / "s", "--workers", -1)
    line = error_line(out)
    assert "with the command-line options" in line and "launch.workers" in line


def test_set_name_picks_the_default_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result, out = invoke("train-refs", "--num-models", 2, *sets())
    assert result.exit_code == 0, out
    result, out = invoke("train-refs", "--num-models", 2, *sets(), "--set", "name=other")
    assert result.exit_code == 0, out
    assert "store runs/other" in out and (tmp_path / "runs" / "other" / "experiment.json").is_file()


def test_a_plugin_section_does_not_block_builtin_methods(store_copy):
    result, out = invoke("apply", "--method", "none", "--num-models", 3, "--store", store_copy,
                         "--set", "method.my_own_thing.lr=0.1", "--workers", 1)
    assert result.exit_code == 0, out
    result, out = invoke("apply", "--method", "none", "--store", store_copy,
                         "--set", "method.finetun.lr=0.1")
    assert result.exit_code == 1 and "did you mean method.finetune?" in error_line(out)


# Issue 9, items 6-8: runaway and silent inputs, each one line and nothing written.
@pytest.mark.parametrize("args, expected", [
    (["train-refs", "--num-models", 99999999999], "more than 10,000 models per bank"),
    (["apply", "--method", "none", "--num-models", 10001], "more than 10,000 models per bank"),
    (["apply", "--method", "none", "--num-models", 0], "--num-models must be at least 1"),
    (["train-refs", "--set", "model.hidden=128"],
     "model.hidden: expected a list of integers, got 128 (write [128] for one)"),
    (["train-refs", "--set", "train.lr=[1, 2"], "the value '[1, 2' is not valid YAML"),
    (["train-refs", "--set", "model.widths=7"], "model.widths: expected a list of integers"),
], ids=["train-refs-huge", "apply-huge", "apply-zero", "hidden-number", "bad-set-yaml",
        "widths-number"])
def test_runaway_and_silent_inputs(tmp_path, args, expected):
    result, out = invoke(*args, "--store", tmp_path / "s")
    assert result.exit_code == 1
    assert expected in error_line(out)
    assert len(out.strip().splitlines()) == 1, out  # one line, not a YAML parser's drawing
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("text", ["", "# only a comment\n", "\n\n"])
def test_an_empty_config_file_is_refused(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    result, out = invoke("train-refs", "--config", path, "--store", tmp_path / "s")
    assert result.exit_code == 1
    assert f"config file {path} is empty" in error_line(out)
    assert not (tmp_path / "s").exists()


def test_a_broken_config_file_is_one_line_with_its_position(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: [3\n")
    result, out = invoke("train-refs", "--config", path, "--store", tmp_path / "s")
    assert result.exit_code == 1 and len(out.strip().splitlines()) == 1, out
    assert "is not valid YAML at line 3, column 1" in error_line(out)


def test_commands_that_import_torch_exit_fast_with_their_code_and_whole_output(trained_store,
                                                                              tmp_path):
    """cli._exit skips Python's teardown once torch is loaded: the exit code and every line of
    output (stdout a pipe, so buffered) must come through as before."""
    import shutil
    import subprocess
    import sys

    store = tmp_path / "s"
    shutil.copytree(trained_store, store)
    plugin = tmp_path / "bad.py"
    plugin.write_text("def m(model, data, params, *, device, seed):\n    raise ValueError('no')\n")
    ok = subprocess.run([sys.executable, "-m", "unlearn_cli", "apply", "--method", "none",
                         "--num-models", "8", "--store", str(store)],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.rstrip().endswith("2 run(s) of none done, 6 reused"), ok.stdout
    bad = subprocess.run([sys.executable, "-m", "unlearn_cli", "apply", "--method", f"{plugin}:m",
                          "--num-models", "2", "--store", str(store)],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "ValueError: no" in bad.stderr + bad.stdout
