"""fedpeft from Python: load a recipe, run a simulation, open a finished run, write a report, list the methods.

    import fedpeft

    cfg = fedpeft.load_recipe("simulations/smoke.toml", ["sim.rounds=2"])
    run = fedpeft.simulate(cfg, on_round=lambda row: print(row["round"], row["accuracy"]))
    run.metrics()[-1]["accuracy"], run.summary()["bytes_total"]
    model = run.peft_model()            # the trained adapter on its frozen base model (peft)
    fedpeft.write_report([run.path])     # report.html, report.md, CSVs and plots

The command line calls these same functions (`fedpeft simulate`, `fedpeft report`, `fedpeft methods`).
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpeft.config import Config

if TYPE_CHECKING:
    from peft import PeftModel

__all__ = ["MethodInfo", "Run", "list_methods", "load_recipe", "open_run", "resume", "simulate", "write_report"]

RoundCallback = Callable[[dict[str, Any]], None]


def load_recipe(recipe: str | Path, overrides: Sequence[str] = ()) -> Config:
    """A validated run config from a TOML recipe and `key=value` overrides (as `--set` takes them)."""
    from fedpeft.app.recipe import load

    return load(Path(recipe), list(overrides))


@dataclass(frozen=True)
class Run:
    """A run directory: its config, per-round metrics, communication ledger, summary and trained adapter."""

    path: Path

    def config(self) -> Config:
        """The config the run was started with (its config.toml)."""
        return load_recipe(self.path / "config.toml")

    def metrics(self) -> list[dict[str, Any]]:
        """One row per round (round 0 is the initial evaluation), as in metrics.jsonl."""
        from fedpeft.rundir import RunDir

        return RunDir(self.path).metrics()

    def ledger(self) -> list[dict[str, Any]]:
        """Every message's bytes, one row per record and direction, as in comm.csv (integers parsed)."""
        with (self.path / "comm.csv").open(newline="") as f:
            return [{k: int(v) if k in ("round", "client_id", "node_id", "bytes") else v for k, v in row.items()}
                    for row in csv.DictReader(f)]

    def summary(self) -> dict[str, Any]:
        """The run's closing figures (summary.json); empty while the run has not finished."""
        from fedpeft.rundir import SUMMARY_FILE, RunDir

        return RunDir(self.path).summary() if (self.path / SUMMARY_FILE).is_file() else {}

    def status(self) -> dict[str, Any]:
        """Whether the run finished, failed or was interrupted, and why (status.json)."""
        from fedpeft.rundir import read_status

        return read_status(self.path)

    def peft_model(self) -> "PeftModel":
        """The frozen base model with the run's final global adapter loaded (a peft model, on the CPU)."""
        from safetensors.torch import load_file

        from fedpeft.adapters import load_adapter_state
        from fedpeft.models import build_model

        weights = self.path / "adapter" / "adapter_model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"{self.path} has no trained adapter ({weights}): the run did not finish")
        cfg = self.config()
        model = build_model(cfg, len(self.summary().get("label_names") or []))
        load_adapter_state(model, load_file(str(weights)))
        return model.eval()


def open_run(run_dir: str | Path) -> Run:
    """A finished (or stopped) run directory, e.g. runs/smoke-20260101-120000."""
    path = Path(run_dir)
    if not (path / "config.toml").is_file():
        raise FileNotFoundError(f"{path} is not a fedpeft run directory (no config.toml)")
    return Run(path)


def simulate(recipe: Config | str | Path, overrides: Sequence[str] = (), *, on_round: RoundCallback | None = None,
             verbose: bool = False, on_start: Callable[[Path], None] | None = None) -> Run:
    """Run a simulation (Flower + Ray) from a config or recipe; `on_round` gets each round's metrics row."""
    from fedpeft.app.simulate import simulate as run_simulation

    if isinstance(recipe, Config):
        if overrides:
            raise ValueError("overrides apply to a recipe file: pass load_recipe(path, overrides) or the path")
        cfg = recipe
    else:
        cfg = load_recipe(recipe, overrides)
    summary = run_simulation(cfg, on_round=on_round, verbose=verbose, on_start=on_start)
    return Run(Path(summary["run_dir"]))


def resume(run_dir: str | Path, *, on_round: RoundCallback | None = None, verbose: bool = False,
           on_start: Callable[[Path], None] | None = None, ray_address: str | None = None) -> Run:
    """Go on with a killed or interrupted run from its last completed round, with the config it started with."""
    from fedpeft.app.simulate import resume_config
    from fedpeft.app.simulate import simulate as run_simulation

    cfg = resume_config(Path(run_dir))
    if ray_address:
        cfg = cfg.model_copy(update={"sim": cfg.sim.model_copy(update={"ray_address": ray_address})})
    summary = run_simulation(cfg, on_round=on_round, verbose=verbose, on_start=on_start, resume=Path(run_dir))
    return Run(Path(summary["run_dir"]))


def write_report(runs: Sequence[Run | str | Path], out: str | Path | None = None,
                 target: float = 0.9) -> dict[str, Path]:
    """Write the communication-cost report of one or more runs; returns file name -> path (report.html, …)."""
    from fedpeft.report import make_report

    dirs = [r.path if isinstance(r, Run) else Path(r) for r in runs]
    if not dirs:
        raise ValueError("write_report needs at least one run")
    if out is None:
        out = dirs[0] / "report" if len(dirs) == 1 else Path("runs") / f"report-{time.strftime('%Y%m%d-%H%M%S')}"
    return make_report(dirs, out, target)


@dataclass(frozen=True)
class MethodInfo:
    """A registered method: its name, what its clients train, and its options with their defaults."""

    name: str
    trainer: str
    options: dict[str, Any]
    summary: str


def list_methods() -> list[MethodInfo]:
    """Every registered method, in registry order."""
    from strategies import available_methods, method_spec

    out = []
    for name in available_methods():
        spec = method_spec(name)
        defaults = {k: f.default for k, f in spec.options.model_fields.items()}
        out.append(MethodInfo(name, str(spec.trainer), defaults, spec.summary))
    return out
