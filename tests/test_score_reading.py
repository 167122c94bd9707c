"""What `unlearn score` reads: store.read_npz (the direct reader of the plain .npz files
np.savez writes) gives what np.load gives, and a damaged file is still refused."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from unlearn_cli import store as store_module
from unlearn_cli.errors import StoreError
from unlearn_cli.store import Store, read_npz


def _np_load(path):
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _assert_same(got, expected):
    assert list(got) == list(expected)
    for key in expected:
        assert got[key].dtype == expected[key].dtype, key
        assert got[key].shape == expected[key].shape, key
        np.testing.assert_array_equal(got[key], expected[key])


ARRAYS = {
    "forget_logits": np.random.default_rng(0).normal(size=(7, 3)).astype(np.float32),
    "retain_correct": np.array([True, False, True]),
    "seeds": np.arange(5, dtype=np.int64),
    "big_endian": np.arange(4, dtype=">f8"),
    "empty": np.zeros((0, 3), dtype=np.float32),
    "cube": np.arange(24, dtype=np.int16).reshape(2, 3, 4),
    "scalar": np.array(2.5),
    "meta": np.array(json.dumps({"config_hash": "abc", "wall_seconds": 1.5})),
}


def test_read_npz_equals_np_load_on_what_np_savez_writes(tmp_path):
    path = tmp_path / "outputs.npz"
    np.savez(path, **ARRAYS)
    assert store_module._read_stored_npz(path.read_bytes(), None) is not None  # the direct path
    got = read_npz(path)
    _assert_same(got, _np_load(path))
    got["seeds"][0] = 99  # writable, and a copy: the file is untouched
    assert _np_load(path)["seeds"][0] == 0
    assert list(read_npz(path, only="meta")) == ["meta"]
    assert str(read_npz(path, only="meta")["meta"]) == str(ARRAYS["meta"])


@pytest.mark.parametrize("how", ["compressed", "fortran"])
def test_read_npz_leaves_other_layouts_to_np_load(tmp_path, how):
    path = tmp_path / "other.npz"
    if how == "compressed":
        np.savez_compressed(path, **ARRAYS)
    else:
        np.savez(path, f=np.asfortranarray(np.arange(12.0).reshape(3, 4)), meta=ARRAYS["meta"])
    assert store_module._read_stored_npz(path.read_bytes(), None) is None
    _assert_same(read_npz(path), _np_load(path))


def test_damaged_npz_is_refused_as_before(tmp_path):
    path = tmp_path / "outputs.npz"
    buf = io.BytesIO()
    np.savez(buf, **ARRAYS)
    data = buf.getvalue()
    store = Store(tmp_path)
    cases = {
        "truncated": data[: len(data) // 2],
        "flipped": data[:200] + bytes([data[200] ^ 0xFF]) + data[201:],  # a byte of an array
        "empty": b"",
    }
    for name, damaged in cases.items():
        path.write_bytes(damaged)
        assert store_module._read_stored_npz(damaged, None) is None, name
        with pytest.raises(StoreError, match="damaged or truncated"):
            store._load_npz(path)


def test_experiment_is_read_again_when_the_file_changes(tmp_path):
    store = Store(tmp_path)
    store.experiment_file.write_text(json.dumps({"config_hash": "a", "config": {}}))
    first = store.read_experiment()
    first["config_hash"] = "changed by the caller"  # a copy: the next read is not affected
    assert store.read_experiment()["config_hash"] == "a"
    store.experiment_file.write_text(json.dumps({"config_hash": "bb", "config": {}}))
    assert store.read_experiment()["config_hash"] == "bb"
