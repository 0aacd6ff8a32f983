"""MLflow: one MLflow run per fedpeft run, in the experiment named after the recipe, metrics at step = round.

Unless `output.mlflow.tracking_uri` or `$MLFLOW_TRACKING_URI` names a store, runs go to a SQLite
store beside the run directories (`<output.dir>/mlflow.db`, which `mlflow ui --backend-store-uri`
opens): MLflow 3 keeps its plain-file store (`./mlruns`) in maintenance mode and refuses it by default.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpeft.tracking.base import Outcome, Tracker, flat_config

if TYPE_CHECKING:
    from fedpeft.config import Config

DB_FILE = "mlflow.db"
ARTIFACT_DIR = "mlruns"  # where MLflow puts artifacts of runs in the default store (fedpeft logs none)
STATUS = {"completed": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
BATCH = 100  # MLflow takes at most 100 parameters per log_batch call


def default_store(run_dir: Path) -> str:
    """The SQLite store beside a run directory: `sqlite:///<output.dir>/mlflow.db`."""
    return f"sqlite:///{(Path(run_dir).resolve().parent / DB_FILE)}"


class MlflowTracker(Tracker):
    """Parameters (the flattened config) and per-round metrics through MLflow's client."""

    name = "mlflow"

    def __init__(self) -> None:
        self.client: Any = None
        self.run_id = ""

    def start(self, run_dir: Path, cfg: Config, resumed: bool, saved: dict[str, Any]) -> dict[str, Any]:
        """Create the MLflow run (or, on resume, reopen the one `saved` names) in the recipe's experiment."""
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # fedpeft is offline by default; an export wins
        from mlflow.tracking import MlflowClient

        uri = saved.get("tracking_uri") or cfg.output.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") \
            or default_store(run_dir)
        self.client = MlflowClient(tracking_uri=uri)
        if resumed and saved.get("run_id"):
            self.run_id = self.client.get_run(saved["run_id"]).info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            return {"tracking_uri": uri, "run_id": self.run_id}
        local = uri == default_store(run_dir)
        experiment = self._experiment(cfg.output.mlflow.experiment or cfg.name, Path(run_dir) if local else None)
        run = self.client.create_run(experiment, run_name=Path(run_dir).name,
                                     tags={"fedpeft.run_dir": str(Path(run_dir).resolve())})
        self.run_id = run.info.run_id
        self._log_params(cfg)
        return {"tracking_uri": uri, "run_id": self.run_id}

    def _experiment(self, name: str, local_run_dir: Path | None) -> str:
        """The id of experiment `name`, created if needed (artifacts beside the store when the store is ours)."""
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        where = (local_run_dir.resolve().parent / ARTIFACT_DIR).as_uri() if local_run_dir else None
        try:
            return self.client.create_experiment(name, artifact_location=where)
        except MlflowException:  # another run created it meanwhile
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _log_params(self, cfg: Config) -> None:
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in flat_config(cfg).items()]
        for i in range(0, len(params), BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + BATCH])

    def log_round(self, server_round: int, metrics: dict[str, float]) -> None:
        """Log every metric at step `server_round` in one batch."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, server_round) for k, v in metrics.items()])

    def finish(self, outcome: Outcome = "completed") -> None:
        """Mark the MLflow run FINISHED, FAILED or KILLED."""
        if self.client is not None and self.run_id:
            self.client.set_terminated(self.run_id, status=STATUS[outcome])
        self.client = None
