from pathlib import Path

import pytest

from unlearn_cli.config import CONFIG_DIR, apply_overrides, from_mapping, load_config
from unlearn_cli.errors import ConfigError
from unlearn_cli.methods import REGISTRY, check_method_sections, method_params


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_bundled_config_loads(path: Path):
    cfg = load_config(path)
    check_method_sections(cfg)
    for name in cfg.method:
        method_params(REGISTRY[name], cfg)
    # The first line says which commands use the file.
    assert path.read_text().splitlines()[0].startswith("# Used by: unlearn")


def test_default_is_digits():
    cfg = load_config(None)
    assert cfg.name == "digits" and cfg.data.dataset == "digits"
    assert cfg.data.forget_size == 0.1 and cfg.train.epochs == 30


def test_overrides_are_yaml_typed():
    cfg = load_config(None, ["train.epochs=7", "train.lr=0.5", "model.hidden=[32, 16]",
                             "method.finetune.epochs=2"])
    assert cfg.train.epochs == 7 and cfg.train.lr == 0.5
    assert cfg.model.hidden == (32, 16)
    assert method_params(REGISTRY["finetune"], cfg).epochs == 2


def test_all_problems_reported_together():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.epoch=3", "train.lr=fast", "data.forget_size=-1", "bogus=1"])
    msg = str(info.value)
    assert "4 problem(s)" in msg
    for key in ("train.epoch: unknown key", "train.lr: expected a finite number, got 'fast'",
                "data.forget_size", "bogus: unknown key"):
        assert key in msg


def test_bool_is_not_an_int():
    with pytest.raises(ConfigError, match="train.epochs: expected an integer, got True"):
        from_mapping({"train": {"epochs": True}})


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        apply_overrides({}, ["train.epochs"])
    with pytest.raises(ConfigError, match="holds a value, not a section"):
        apply_overrides({"name": "x"}, ["name.sub=1"])


def test_unknown_method_section_and_param():
    cfg = load_config(None, ["method.finetun.epochs=2"])
    with pytest.raises(ConfigError, match="method.finetun: unknown method"):
        check_method_sections(cfg)
    cfg = load_config(None, ["method.finetune.epoch=2"])
    with pytest.raises(ConfigError, match="method.finetune.epoch: unknown key"):
        method_params(REGISTRY["finetune"], cfg)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist.*digits.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_identity_hash_tracks_what_defines_the_models():
    a = load_config(None)
    b = load_config(None, ["method.finetune.epochs=9", "launch.workers=3", "data.root=/else"])
    c = load_config(None, ["train.epochs=9"])
    assert a.identity_hash() == b.identity_hash()
    assert a.identity_hash() != c.identity_hash()


def test_exponent_floats_and_non_finite_values():
    # YAML 1.1 reads 1e-3 as a string; a float key takes the number it spells.
    assert load_config(None, ["train.lr=1e-3"]).train.lr == 0.001
    assert load_config(None, ["method.finetune.lr=5e-2"]).method["finetune"]["lr"] == "5e-2"
    assert method_params(REGISTRY["finetune"], load_config(None, ["method.finetune.lr=5e-2"])).lr \
        == 0.05
    for bad in ("train.lr=.inf", "train.lr=.nan", "train.weight_decay=inf"):
        with pytest.raises(ConfigError, match="expected a finite number"):
            load_config(None, [bad])


def test_method_ranges_are_checked():
    for bad, key in (("method.reset-head.batch_size=0", "batch_size: expected >= 1"),
                     ("method.neggrad.epochs=0", "epochs: expected >= 1"),
                     ("method.finetune.lr=0", "lr: expected > 0")):
        name = bad.split(".")[1]
        with pytest.raises(ConfigError, match=key):
            method_params(REGISTRY[name], load_config(None, [bad]))


def test_launch_timed_alone_must_be_at_least_one():
    assert load_config(None).launch.timed_alone == 32
    with pytest.raises(ConfigError, match="launch.timed_alone: expected an integer >= 1, got 0"):
        load_config(None, ["launch.timed_alone=0"])
