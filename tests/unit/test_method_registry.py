"""Every method is one registration: shared code reads its declared capabilities, never its name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedpeft.app.cli import app
from fedpeft.config import ConfigError
from fedpeft.app.recipe import load
from strategies import available_methods, method_spec

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "simulations" / "smoke.toml"
CORE = ["fedpeft"]  # the platform: no method's name may appear in its code


def _names_checked(path: Path) -> set[str]:
    """String constants a module compares with or looks up (==, !=, in, dict keys, literal collections)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        parts: list[ast.AST] = []
        if isinstance(node, ast.Compare):
            parts = [node.left, *node.comparators]
        elif isinstance(node, ast.Dict):
            parts = [k for k in node.keys if k is not None]
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            parts = list(node.elts)
        for part in parts:
            for sub in ast.walk(part):
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                    out.add(sub.value)
    return out


def test_no_method_or_trainer_name_appears_in_platform_code():
    names = set(available_methods()) | {str(method_spec(m).trainer) for m in available_methods()}
    for pkg in CORE:
        for path in (ROOT / pkg).rglob("*.py"):
            hits = names & _names_checked(path)
            assert not hits, f"{path.relative_to(ROOT)} names methods {sorted(hits)}"


def test_every_method_declares_its_trainer_options_and_capabilities():
    for name in available_methods():
        spec = method_spec(name)
        assert spec.strategy.method_name == name
        assert spec.options.model_json_schema()  # a pydantic model of its [method] keys
        assert set(spec.capabilities.codecs) <= {"up", "down"}


def test_every_trainer_kind_a_method_names_has_a_client_trainer():
    """Both halves meet: each registered method's TrainerKind is implemented by exactly one trainer class."""
    from clients.registry import trainer_kinds

    kinds = trainer_kinds()
    for name in available_methods():
        assert method_spec(name).trainer in kinds, f"{name}: no client trainer implements {method_spec(name).trainer}"


def test_a_misnamed_trainer_fails_at_registration_naming_the_method():
    """A trainer given by a (misspelled) string, not a declared TrainerKind, fails when the module registers."""
    from strategies.base import AdapterStrategy
    from strategies.registry import register

    with pytest.raises(TypeError, match="method 'typo-method': trainer 'first_ordr' is not a declared TrainerKind"):
        @register("typo-method", trainer="first_ordr")  # type: ignore[arg-type]
        class Typo(AdapterStrategy):
            """A method with a misspelled trainer."""
    assert "typo-method" not in available_methods()
    with pytest.raises(ImportError, match="FIRST_ORDR"):
        exec("from fedpeft.methods.contract import FIRST_ORDR", {})


def _refuses(method: str, *extra: str) -> str:
    # The method's own recipe where there is one (it has the adapter the method needs).
    recipe = ROOT / "simulations" / f"{method}.toml"
    with pytest.raises(ConfigError) as err:
        load(recipe if recipe.is_file() else SMOKE, [f'method.name="{method}"', *extra])
    return str(err.value)


@pytest.mark.parametrize("method", [m for m in available_methods() if method_spec(m).capabilities.refusal("sample_dp")])
def test_sample_level_dp_is_refused_with_the_declared_reason(method):
    why = method_spec(method).capabilities.refusal("sample_dp")
    assert why in _refuses(method, "dp.enabled=true", "dp.noise_multiplier=1.0")


@pytest.mark.parametrize("method", [m for m in available_methods()
                                    if method_spec(m).capabilities.weighted_mean is not True
                                    and not method_spec(m).capabilities.refusal("user_dp")])
def test_user_level_dp_refuses_aggregates_that_are_not_a_mean(method):
    msg = _refuses(method, "dp.user.enabled=true", "dp.user.noise_multiplier=1.0")
    assert "mean of the clipped updates" in msg and str(method_spec(method).capabilities.weighted_mean) in msg


def test_methods_command_fits_80_columns_with_every_name_whole():
    out = CliRunner().invoke(app, ["methods"], env={"COLUMNS": "80"})
    assert out.exit_code == 0, out.output
    assert max(len(ln) for ln in out.output.splitlines()) <= 80 and "…" not in out.output
    rows = {ln.split()[0]: ln.split() for ln in out.output.splitlines() if ln.strip()}
    for name in available_methods():
        assert name in rows, name
    assert rows["fedmedian"][3:6] == ["no", "both", "no"]  # user DP refused, both codecs, not a mean
    assert rows["fedavg"][2:7] == ["yes", "yes", "both", "yes", "no"]


def test_methods_name_gives_options_and_every_refusal_with_its_reason():
    out = CliRunner().invoke(app, ["methods", "fedmedian"], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    assert "user-level DP: its aggregate is not a mean" in out.output
    out = CliRunner().invoke(app, ["methods", "fedprox"], env={"COLUMNS": "200"})
    assert "mu = 0.01" in out.output and "refuses" not in out.output
    out = CliRunner().invoke(app, ["methods", "fedkseed"], env={"COLUMNS": "200"})
    assert "sample-level DP:" in out.output and "codecs (up, down):" in out.output
    out = CliRunner().invoke(app, ["methods", "fedavgg"], env={"COLUMNS": "200"})
    assert out.exit_code == 2 and "'fedavgg' is not a registered method" in out.output
