"""How `source = "auto"` picks where data and models come from, given only a path.

A newcomer's first run is the shipped recipe with `--set data.path=...` or `--set model.path=...`;
`auto` makes that path count instead of being ignored behind a recipe's built-in default, and an
explicit source that would ignore a given path is refused rather than silently run on other data.
"""

from __future__ import annotations

from pathlib import Path

# Suffixes `data.source = "file"` reads (datasets' loaders); a path with one of them is a file even
# before it exists, so a typo gets "data file not found" rather than a hub lookup.
DATA_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet", ".arrow", ".txt")


def data_source(source: str, path: str) -> str:
    """The data source a config means: `auto` becomes builtin, file or hub; a contradiction raises ValueError."""
    if source == "auto":
        if not path:
            return "builtin"
        local = Path(path).expanduser()
        return "file" if local.exists() or local.suffix.lower() in DATA_SUFFIXES else "hub"
    if source == "builtin" and path:
        raise ValueError(f"data.path = '{path}' is set but data.source = 'builtin' ignores it: set data.source to "
                         "'file' (a local file or folder), 'hub' (a dataset id) or 'auto' (chosen from the path)")
    if source in ("file", "hub") and not path:
        raise ValueError(f"data.path is required when data.source = '{source}'")
    return source


def model_source(source: str, path: str) -> str:
    """The model source a config means: `auto` becomes embedded, gguf, local or hub; a contradiction raises."""
    if source == "auto":
        if not path:
            return "embedded"
        local = Path(path).expanduser()
        if local.suffix.lower() == ".gguf":
            return "gguf"
        return "local" if local.exists() else "hub"
    if source in ("embedded", "tiny") and path:
        raise ValueError(f"model.path = '{path}' is set but model.source = '{source}' ignores it: set model.source "
                         "to 'local' (a folder), 'gguf' (a .gguf file), 'hub' (a model id) or 'auto' (chosen from "
                         "the path)")
    if source in ("local", "hub", "gguf") and not path:
        raise ValueError(f"model.path is required when model.source = '{source}'")
    return source
