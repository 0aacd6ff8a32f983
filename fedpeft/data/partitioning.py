"""Split a training set over clients with flwr-datasets partitioners; returns row indices per client."""

from __future__ import annotations

from datasets import Dataset

from fedpeft.config import PartitionConfig
from fedpeft.data.sources import DataError
from fedpeft.seeding import derive_seed

INDEX_COLUMN = "__row"


def partition_column(cfg: PartitionConfig, columns: list[str]) -> str:
    """The column a non-IID partitioner skews on: `partition.by`, or the first of its list the data has."""
    wanted = [cfg.by] if isinstance(cfg.by, str) else list(cfg.by)
    for name in wanted:
        if name in columns:
            return name
    shown = f"'{wanted[0]}' is not a column" if len(wanted) == 1 else f"{wanted}: none is a column"
    raise DataError(f"partition.by = {shown} (columns: {', '.join(columns)})")


def make_partitioner(cfg: PartitionConfig, num_clients: int, seed: int, by: str = "label"):
    """The flwr-datasets partitioner for this config, skewing on column `by`."""
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, ShardPartitioner

    pseed = derive_seed(seed, "partition") % 2**32
    if cfg.type == "iid":
        return IidPartitioner(num_partitions=num_clients)
    if cfg.type == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_clients,
            partition_by=by,
            alpha=cfg.alpha,
            min_partition_size=cfg.min_partition_size,
            self_balancing=True,
            seed=pseed,
        )
    return ShardPartitioner(
        num_partitions=num_clients, partition_by=by, num_shards_per_partition=cfg.shards_per_client, seed=pseed
    )


def partition_indices(train: Dataset, cfg: PartitionConfig, num_clients: int, seed: int) -> list[list[int]]:
    """Row indices of `train` held by each client (list position = client id)."""
    by = partition_column(cfg, train.column_names) if cfg.type != "iid" else ""
    if len(train) < num_clients:
        raise DataError(f"{len(train)} training examples cannot be split over {num_clients} clients")
    partitioner = make_partitioner(cfg, num_clients, seed, by)
    partitioner.dataset = train.add_column(INDEX_COLUMN, list(range(len(train))))
    try:
        parts = [list(partitioner.load_partition(i)[INDEX_COLUMN]) for i in range(num_clients)]
    except ValueError as err:
        raise DataError(f"partitioning ({cfg.type}) failed: {err}") from None
    empty = [i for i, p in enumerate(parts) if not p]
    if empty:
        raise DataError(
            f"{len(empty)} of {num_clients} clients got no examples with partition.type = '{cfg.type}' "
            "(use more data, fewer clients, a larger alpha or partition.min_partition_size)"
        )
    return parts
