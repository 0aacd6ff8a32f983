"""Recipes: validation errors name the key and what is allowed; overrides are typed."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedpeft.config import ConfigError

from fedpeft.app.recipe import load, validate

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("recipe", sorted((ROOT / "simulations").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(recipe):
    cfg = load(recipe)
    assert cfg.sim.clients_per_round <= cfg.sim.num_clients


def test_overrides_are_typed():
    cfg = load(ROOT / "simulations/smoke.toml", ["train.lr=3e-4", "sim.rounds=5", "adapter.target_modules=['query']"])
    assert cfg.train.lr == 3e-4 and cfg.sim.rounds == 5
    assert cfg.adapter.peft_kwargs()["target_modules"] == ["query"]


def test_unknown_key_names_key_and_allowed():
    with pytest.raises(ConfigError) as e:
        load(ROOT / "simulations/smoke.toml", ["train.lrr=0.1"])
    assert "train.lrr" in str(e.value) and "lr" in str(e.value) and "batch_size" in str(e.value)


def test_unknown_section_is_rejected():
    with pytest.raises(ConfigError, match="unknown key 'trian'"):
        validate({"trian": {"lr": 1.0}})


def test_bad_value_is_named():
    with pytest.raises(ConfigError, match="sim.clients_per_round"):
        validate({"sim": {"num_clients": 5, "clients_per_round": 6}})
    with pytest.raises(ConfigError, match="train.lr"):
        validate({"train": {"lr": -1}})
    with pytest.raises(ConfigError, match="model.source"):
        validate({"model": {"source": "cloud"}})


def test_unknown_adapter_option_and_type():
    with pytest.raises(ConfigError, match="adapter.rank"):
        validate({"adapter": {"type": "lora", "rank": 8}})
    with pytest.raises(ConfigError, match="not a peft method"):
        validate({"adapter": {"type": "lorax"}})
    validate({"adapter": {"type": "loha", "r": 4, "target_modules": ["query"]}})


def test_unknown_method_and_option():
    with pytest.raises(ConfigError, match="not a registered method"):
        validate({"method": {"name": "fedmagic"}})
    with pytest.raises(ConfigError, match="method.mu"):
        validate({"method": {"name": "fedavg", "mu": 0.1}})


def test_missing_recipe_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[sim\nrounds = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(bad)


def test_malformed_override():
    with pytest.raises(ConfigError, match="key=value"):
        load(ROOT / "simulations/smoke.toml", ["train.lr"])
