"""`source = "auto"`: a path given on the shipped recipes is read, never silently ignored."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedpeft.app.recipe import load
from fedpeft.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT / "simulations" / "default.toml"
LLM = ROOT / "simulations" / "llm-default.toml"


def test_no_path_keeps_the_built_in_task_and_the_embedded_model():
    cfg = load(DEFAULT)
    assert (cfg.data.source, cfg.model.source) == ("builtin", "embedded")


@pytest.mark.parametrize("path,expected", [
    ("reviews.csv", "file"),            # not there yet: still a file, so a typo reads "data file not found"
    ("dolly.JSONL", "file"),
    ("databricks/databricks-dolly-15k", "hub"),
])
def test_a_data_path_picks_file_or_hub(path, expected):
    assert load(DEFAULT, [f'data.path="{path}"']).data.source == expected


def test_an_existing_folder_is_a_file_source(tmp_path):
    assert load(DEFAULT, [f'data.path="{tmp_path}"']).data.source == "file"


def test_a_model_path_picks_gguf_local_or_hub(tmp_path):
    assert load(LLM, [f'model.path="{tmp_path / "m.gguf"}"']).model.source == "gguf"
    assert load(LLM, [f'model.path="{tmp_path}"']).model.source == "local"
    assert load(LLM, ['model.path="HuggingFaceTB/SmolLM2-360M-Instruct"']).model.source == "hub"


def test_an_explicit_source_that_would_ignore_the_path_is_refused():
    with pytest.raises(ConfigError, match="data.source = 'builtin' ignores it"):
        load(DEFAULT, ['data.source="builtin"', 'data.path="reviews.csv"'])
    with pytest.raises(ConfigError, match="model.source = 'embedded' ignores it"):
        load(DEFAULT, ['model.source="embedded"', 'model.path="/models/bert"'])


def test_a_source_that_needs_a_path_still_asks_for_one():
    with pytest.raises(ConfigError, match="data.path is required when data.source = 'file'"):
        load(DEFAULT, ['data.source="file"'])
