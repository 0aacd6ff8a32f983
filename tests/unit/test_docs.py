"""The documentation site builds strictly, shows the API's own docstrings and the README's commands, and the
README's links into docs/ lead to pages that exist."""

from __future__ import annotations

import ast
import html
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
README = ROOT / "README.md"


def _mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    try:
        import mkdocstrings_handlers.python  # noqa: F401  (the API reference's handler, the last package in)
    except ImportError:
        pytest.fail("the docs packages are not installed: pip install -c constraints.txt -e '.[docs]'")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # the theme's notice about its successor: not our output
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config), "--site-dir", str(site)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    done = _mkdocs_build(ROOT / "mkdocs.yml", out)
    assert done.returncode == 0, f"mkdocs build --strict failed (exit {done.returncode}):\n{done.stdout}{done.stderr}"
    return out


def _text(page: Path) -> str:
    """A built page's visible text: tags dropped, entities decoded, whitespace runs kept as they are."""
    return html.unescape(re.sub(r"<[^>]+>", "", page.read_text(encoding="utf-8")))


def _nav_files(nav: list) -> list[str]:
    files = []
    for entry in nav:
        for value in (entry.values() if isinstance(entry, dict) else [entry]):
            files.extend(_nav_files(value) if isinstance(value, list) else [value])
    return [f for f in files if not re.match(r"[a-z]+://", f)]


def _built_page(site: Path, doc: str) -> Path:
    stem = doc.removesuffix(".md")
    return site / "index.html" if stem == "index" else site / stem.removesuffix("/index") / "index.html"


def _docstring_summary(module: Path, name: str) -> str:
    tree = ast.parse(module.read_text(encoding="utf-8"))
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef) and n.name == name)
    return ast.get_docstring(node).splitlines()[0].replace("`", "")  # Markdown code spans lose their backticks


def _readme_test_command() -> str:
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", README.read_text(encoding="utf-8"), re.DOTALL | re.MULTILINE)
    commands = [line for block in blocks for line in block.splitlines() if "-m pytest" in line]
    assert commands, "README.md shows no test command (a code line running `python -m pytest`)"
    return commands[0]


def test_every_page_in_the_nav_is_built(site: Path) -> None:
    nav = _nav_files(yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))["nav"])
    assert "index.md" in nav and "reference/python-api.md" in nav
    missing = [doc for doc in nav if not _built_page(site, doc).is_file()]
    assert not missing, f"nav pages that were not built: {missing}"


def test_api_reference_shows_the_docstrings_of_simulate_and_open_run(site: Path) -> None:
    page = _text(_built_page(site, "reference/python-api.md"))
    for name in ("simulate", "open_run", "load_recipe"):
        summary = _docstring_summary(ROOT / "fedpeft" / "app" / "api.py", name)
        assert summary in page, f"the API reference lacks {name}'s docstring: {summary!r}"


def test_recipe_reference_shows_field_descriptions(site: Path) -> None:
    page = _text(_built_page(site, "reference/config.md"))
    assert "attach to this running Ray cluster (host:port) instead of starting Ray" in page  # sim.ray_address
    assert "clients_per_round" in page and "SecAggConfig" in page


def test_front_page_shows_the_readme_test_command_verbatim(site: Path) -> None:
    command = _readme_test_command()
    assert command in _text(_built_page(site, "index.md")), f"docs/index.md lacks README's test command:\n{command}"


def _readme_links() -> list[str]:
    """The targets of README's Markdown links, URLs and README's own anchors left out."""
    text = README.read_text(encoding="utf-8")
    text = re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)  # code blocks hold no links
    targets = re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)  # [text](target "title")
    targets += re.findall(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", text, re.MULTILINE)  # [label]: target
    return [t for t in targets if not (re.match(r"[a-z][a-z0-9+.-]*:", t, re.IGNORECASE) or t.startswith("#"))]


def test_readme_links_into_docs_lead_to_existing_files() -> None:
    broken = []
    for target in _readme_links():
        path = (README.parent / target.split("#")[0]).resolve()
        if path.is_relative_to(DOCS.resolve()) and not path.exists():
            broken.append(target)
    assert not broken, f"README.md links to docs/ files that do not exist: {broken}"


def test_readme_links_into_docs_lead_to_sections_that_exist(site: Path) -> None:
    missing = []
    for target in _readme_links():
        doc, _, anchor = target.partition("#")
        path = (README.parent / doc).resolve()
        if not anchor or not path.is_relative_to(DOCS.resolve()) or path.suffix != ".md":
            continue
        page = _built_page(site, path.relative_to(DOCS.resolve()).as_posix())
        if not page.is_file() or f'id="{anchor}"' not in page.read_text(encoding="utf-8"):
            missing.append(target)
    assert not missing, f"README.md links to sections of docs/ pages that do not exist: {missing}"


def test_a_broken_link_or_anchor_fails_the_strict_build(tmp_path: Path) -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n\nSee [the guide](guide.md#no-such-section) and [gone](gone.md).\n")
    (docs / "guide.md").write_text("# Guide\n\n## A section\n")
    # The project's own settings (validation, theme, extensions), on two pages and without the API reference.
    config.update(docs_dir=str(docs), nav=["index.md", "guide.md"], exclude_docs="",
                  plugins=[p for p in config["plugins"] if p == "search"])
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))
    done = _mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    output = done.stdout + done.stderr
    assert done.returncode != 0, f"a strict build with broken links passed:\n{output}"
    assert "no-such-section" in output and "gone.md" in output, output
