"""Shared fixtures: tiny experiments on the digits default, on CPU."""

from __future__ import annotations

import concurrent.futures.process
import hashlib
import signal
from pathlib import Path

import pytest

from unlearn_cli.config import load_config

# A suite started in the background by a script (`make test &`, `nohup ... &`) inherits SIGINT
# ignored, and so would every command the tests start: Python installs no Ctrl-C handler for an
# ignored signal, and the Ctrl-C tests' commands would run to the end. Tests stand for a user at a
# terminal, so give this process (and the commands it starts) Python's own handler back.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# A fast variant of the default: few epochs, in-process jobs. Used by most tests.
# launch.timed_alone=8: the small banks of the suite (6 models, one job) keep both kinds, two
# models timed alone and four in lockstep (8 are dealt over four jobs' seeds, train_refs.
# timed_alone: positions 0 and 1 of each; the default, 32, would time all six alone).
FAST = ["train.epochs=3", "method.finetune.epochs=1", "method.reset-head.epochs=1",
        "launch.workers=1", "launch.timed_alone=8"]


@pytest.fixture
def fast_cfg():
    return load_config(None, FAST)


def tree_digest(root: Path) -> dict[str, str]:
    """path -> sha256 of every file under root (to prove a command left a store untouched)."""
    out = {}
    for path in sorted(Path(root).rglob("*")):
        if path.is_file() and path.name != ".lock":
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="session")
def trained_store(tmp_path_factory):
    """A store with the original, 6 reference models, and 6 runs of finetune and none."""
    from unlearn_cli import apply, train_refs

    root = tmp_path_factory.mktemp("store") / "digits"
    cfg = load_config(None, FAST)
    train_refs.run(cfg, root, num_models=6)
    apply.run(cfg, root, method_spec="finetune")
    apply.run(cfg, root, method_spec="none")
    return root


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's in-process work, as each launcher worker has
    (`launch.threads`): tiny models are fastest that way, and a second thread fighting other
    processes for two cores made a tiny ShuffleNet forward 40x slower (5.6 s against 0.14 s at
    load 16)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)



class LostHelpers:
    """An executor whose every task has failed, as when a helper process is killed
    (`helpers.pool` replaced by this in tests of the fallback to this process)."""

    def submit(self, *args, **kwargs):
        future = concurrent.futures.Future()
        future.set_exception(concurrent.futures.process.BrokenProcessPool("helper died"))
        return future
