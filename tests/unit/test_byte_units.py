"""Byte figures are in binary units, labelled as such; recipes and run directories from before the rename still get answers."""

from __future__ import annotations

import csv
import json

import pytest
from run_fixtures import ledger_sums, write_run

from fedpeft.app.recipe import load
from fedpeft.config import ConfigError
from fedpeft.ledger import KIB, MIB, format_bytes
from fedpeft.report import make_report
from fedpeft.report.tables import fmt_bytes

RECIPE = 'name = "units"\n[model]\nsource = "tiny"\n'


def test_a_byte_count_renders_in_mib_with_its_label():
    assert (KIB, MIB) == (1024, 1024 * 1024)
    assert format_bytes(36_766_090) == "35.063 MiB"  # 36,766,090 / 2^20, not / 10^6 (36.766)
    assert format_bytes(3 * MIB, 1) == "3.0 MiB"
    assert fmt_bytes(36_766_090) == "35.063 MiB (36,766,090 B)"


@pytest.mark.parametrize("old,new,value", [
    ("comm_budget_mb", "comm_budget_mib", 5.0),
    ("max_reply_mb", "max_reply_mib", 2.0),
    ("object_store_mb", "object_store_mib", 512),
])
def test_an_old_mb_key_names_its_new_name(tmp_path, old, new, value):
    recipe, old_recipe = tmp_path / "recipe.toml", tmp_path / "old.toml"
    recipe.write_text(RECIPE)
    old_recipe.write_text(f"{RECIPE}[sim]\n{old} = {value}\n")
    with pytest.raises(ConfigError, match=rf"sim\.{old} was renamed sim\.{new} \(MiB = 2\^20 bytes\)"):
        load(old_recipe)
    with pytest.raises(ConfigError, match=rf"sim\.{old} was renamed sim\.{new}"):  # as a --set override too
        load(recipe, [f"sim.{old}={value}"])
    assert getattr(load(recipe, [f"sim.{new}={value}"]).sim, new) == value


def test_report_reads_a_run_directory_written_before_the_rename(tmp_path):
    run = write_run(tmp_path / "yesterday")
    # Written before the rename: the config says sim.comm_budget_mb and the stop record budget_mb/spent_mb/needed_mb.
    with (run / "config.toml").open("a") as f:
        f.write("[sim]\ncomm_budget_mb = 1.5\nmax_reply_mb = 0.0\nobject_store_mb = 256\n")
    summary = json.loads((run / "summary.json").read_text())
    summary["stopped"] = {"reason": "comm_budget", "before_round": 4, "budget_mb": 1.5, "spent_mb": 1.2, "needed_mb": 1.6}
    (run / "summary.json").write_text(json.dumps(summary))

    files = make_report([run], tmp_path / "out", 0.8)
    md = files["report.md"].read_text()
    assert ("stopped at the communication budget before round 4: 1.200 MiB sent in rounds 0–3, round 4 would "
            "bring the total to about 1.600 MiB, over the budget of 1.500 MiB") in md
    sums = ledger_sums(run)
    row = next(csv.DictReader(files["runs.csv"].open()))
    assert float(row["total_mib"]) == pytest.approx((sums["down"] + sums["up"]) / MIB) and "total_mb" not in row
    assert " MB" not in md and " MB" not in files["report.html"].read_text()
