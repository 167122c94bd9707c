import os

import numpy as np
import pytest

from unlearn_cli import store as store_mod
from unlearn_cli.config import load_config
from unlearn_cli.errors import StoreError
from unlearn_cli.store import REFERENCE, UNLEARNED, Store, atomic_write_bytes


def _split():
    return {"train": np.arange(10), "test": np.arange(10, 14), "forget": np.arange(2),
            "retain": np.arange(2, 10)}


def _outputs(classes=10):
    """Outputs that fit _split(): 2 forget, 4 test, 8 retain examples."""
    return {"forget_logits": np.ones((2, classes), np.float32),
            "test_logits": np.zeros((4, classes), np.float32),
            "retain_loss": np.zeros(8, np.float32), "retain_correct": np.ones(8, bool)}


def test_round_trip(tmp_path):
    import torch

    s = Store(tmp_path / "exp")
    cfg = load_config(None)
    s.init_experiment(cfg, _split())
    assert s.exists()
    np.testing.assert_array_equal(s.load_split()["forget"], [0, 1])
    state = {"w": torch.arange(6.0).view(2, 3)}
    meta = {"seed": 3, "wall_seconds": 0.5, "config_hash": cfg.identity_hash()}
    s.save_model(REFERENCE, 3, state, meta, model_spec={"arch": "mlp"})
    arrays = _outputs()
    s.save_outputs(REFERENCE, 3, arrays, meta)
    assert s.done_seeds(REFERENCE) == [3]
    loaded = s.load_model(REFERENCE, 3)
    assert torch.equal(loaded["state_dict"]["w"], state["w"])
    assert loaded["meta"] == meta and loaded["model"] == {"arch": "mlp"}
    out, out_meta = s.load_outputs(REFERENCE, 3)
    assert out_meta == meta
    np.testing.assert_array_equal(out["forget_logits"], arrays["forget_logits"])
    # Layout: one folder per model, named by its seed.
    assert (tmp_path / "exp" / "reference" / "seed-000003" / "model.pt").is_file()


def test_atomic_write_leaves_old_file_on_crash(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(store_mod.os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new content")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]  # the temp file was removed


def test_written_files_get_the_usual_permissions(tmp_path):
    target = tmp_path / "report.json"
    atomic_write_bytes(target, b"{}")
    assert target.stat().st_mode & 0o777 == store_mod.FILE_MODE


def test_temp_files_of_killed_runs_are_cleaned(tmp_path):
    s = Store(tmp_path)
    leftover = tmp_path / "reference" / "seed-000001" / ".outputs.npz.tmp-abc"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half")
    with s.writing():
        pass
    assert not leftover.exists()
    # A half-written file never counts as done.
    assert s.done_seeds(REFERENCE) == []


def test_second_writer_is_refused(tmp_path):
    s = Store(tmp_path)
    with s.writing():
        with pytest.raises(StoreError, match="another unlearn command is writing"):
            with Store(tmp_path).writing():
                pass


def test_incompatible_config_is_refused_naming_the_difference(tmp_path):
    s = Store(tmp_path)
    s.init_experiment(load_config(None), _split())
    with pytest.raises(StoreError, match=r"train.epochs: 30 -> 5"):
        s.check_compatible(load_config(None, ["train.epochs=5"]))
    # Method and launch settings do not define the experiment.
    s.check_compatible(load_config(None, ["launch.workers=2", "method.finetune.epochs=1"]))
    other = _split()
    other["forget"] = np.array([5, 6])
    with pytest.raises(StoreError, match="different forget/retain split"):
        s.init_experiment(load_config(None), other)


def test_moved_data_and_keys_added_later_keep_a_store_compatible(tmp_path):
    import json

    s = Store(tmp_path)
    s.init_experiment(load_config(None), _split())
    s.check_compatible(load_config(None, ["data.root=/mnt/elsewhere"]))
    # A store written before train.nesterov existed: the missing key counts as its default.
    exp = json.loads(s.experiment_file.read_text())
    del exp["config"]["train"]["nesterov"]
    s.experiment_file.write_text(json.dumps(exp))
    s.check_compatible(load_config(None))
    with pytest.raises(StoreError, match="train.nesterov: True -> False"):
        s.check_compatible(load_config(None, ["train.nesterov=false"]))


def test_damaged_files_are_reported(tmp_path):
    s = Store(tmp_path)
    path = s.model_dir(UNLEARNED, 1_000_000, "finetune") / "outputs.npz"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(StoreError, match="damaged or truncated"):
        s.load_outputs(UNLEARNED, 1_000_000, "finetune")
    ckpt = s.model_dir(REFERENCE, 0) / "model.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"\x80\x02garbage")
    with pytest.raises(StoreError, match="damaged or truncated"):
        s.load_model(REFERENCE, 0)


def test_method_record_refuses_other_params_once_a_run_is_stored(tmp_path):
    s = Store(tmp_path)

    def record(epochs):
        return {"name": "finetune", "spec": "finetune", "params": {"epochs": epochs}}

    s.save_method("finetune", record(9))
    s.save_method("finetune", record(5))  # no run stored yet: the record is replaced
    assert s.method_record("finetune")["params"] == {"epochs": 5}
    s.init_experiment(load_config(None), _split())
    s.save_outputs(UNLEARNED, 1_000_000, _outputs(), {}, method="finetune")
    s.save_method("finetune", record(5))
    with pytest.raises(StoreError, match="epochs: 5 -> 2"):
        s.save_method("finetune", record(2))
