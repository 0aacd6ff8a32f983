"""The `[output.mlflow]` and `[output.wandb]` sub-tables of a recipe: where each tool puts its runs."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class MlflowOptions(BaseModel):
    """MLflow's store and experiment (used when output.trackers has "mlflow")."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    tracking_uri: str = Field("", description="'' = $MLFLOW_TRACKING_URI if set, else a SQLite store beside the "
                              "run directories: sqlite:///<output.dir>/mlflow.db")
    experiment: str = Field("", description="'' = the recipe's name")


class WandbOptions(BaseModel):
    """Weights & Biases' project and mode (used when output.trackers has "wandb")."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    project: str = Field("", description="'' = the recipe's name")
    entity: str = Field("", description="'' = your default entity")
    mode: Literal["auto", "offline", "online"] = Field(
        "auto", description="auto: $WANDB_MODE if set, online when logged in (wandb login), else offline "
        "(files under <run dir>/wandb, upload later with `wandb sync`)")
