"""The Python API as a notebook uses it: load a recipe, simulate with a per-round callback, open the run, report."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SMOKE
from peft import get_peft_model_state_dict
from safetensors.numpy import load_file

import fedpeft
from strategies import available_methods


def test_the_api_example_runs_end_to_end(tmp_path):
    cfg = fedpeft.load_recipe(SMOKE, ["sim.rounds=2", f'output.dir="{tmp_path}"'])
    seen = []
    run = fedpeft.simulate(cfg, on_round=lambda row: seen.append((row["round"], row["accuracy"])))
    assert [r for r, _ in seen] == [0, 1, 2]

    again = fedpeft.open_run(run.path)
    metrics, summary = again.metrics(), again.summary()
    assert [m["accuracy"] for m in metrics] == [a for _, a in seen]
    assert again.status()["status"] == "completed" and again.config().sim.rounds == 2
    assert sum(r["bytes"] for r in again.ledger()) == summary["bytes_total"]

    model = again.peft_model()
    saved = load_file(run.path / "adapter" / "adapter_model.safetensors")
    state = {k: v.detach().numpy() for k, v in get_peft_model_state_dict(model).items()}  # saved-file keys
    for key, value in saved.items():
        assert np.array_equal(state[key], value), key

    files = fedpeft.write_report([run])
    assert files["report.html"].is_file() and files["report.html"].parent == run.path / "report"


def test_list_methods_names_every_registered_method_with_its_defaults():
    methods = {m.name: m for m in fedpeft.list_methods()}
    assert sorted(methods) == sorted(available_methods())
    assert methods["fedprox"].options["mu"] > 0 and methods["fedavg"].summary


def test_bad_calls_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a fedpeft run directory"):
        fedpeft.open_run(tmp_path)
    with pytest.raises(ValueError, match="overrides apply to a recipe file"):
        fedpeft.simulate(fedpeft.load_recipe(SMOKE), ["sim.rounds=1"])
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fedpeft.nope  # noqa: B018
