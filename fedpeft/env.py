"""Process environment: offline by default, no telemetry, library noise kept out of the way."""

from __future__ import annotations

import logging
import os
import warnings

OFFLINE_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "RAY_DEDUP_LOGS": "0",
}


def set_offline_env() -> None:
    """Set offline/no-telemetry defaults; values the user already exported win."""
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)


def quiet_libraries(verbose: bool = False) -> None:
    """Silence the warnings and progress bars that transformers, peft and datasets print."""
    if verbose:
        return
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*deprecated.*")
    for name in ("transformers", "datasets", "peft", "filelock", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:  # transformers is a dependency; this only guards partial installs
        pass
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass


def pin_client_threads(cpus_per_client: float) -> int:
    """Give torch in a client worker one intra-op thread per CPU the worker holds; returns the count.

    A worker's torch otherwise keeps the thread count of whenever torch was first imported (Ray
    sets OMP_NUM_THREADS only once an actor is placed, after the warm-up hook has imported
    torch), and the thread count changes the order of floating-point sums: pinned, a client's
    update is the same bits in every worker, which resumed and repeated runs rely on.
    """
    import torch

    n = max(1, int(cpus_per_client))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
