"""Run tracking: each round's metrics, bytes and ε sent to TensorBoard, MLflow or Weights & Biases.

The run directory stays the source of truth; a tracker is a copy for watching a run live. One module
per tool (`tensorboard`, `mlflow`, `wandb`) behind the name → class registry in `registry`;
`session.Tracking` starts the trackers a config names, feeds them each round and closes them.
"""
