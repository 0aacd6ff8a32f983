"""Which Flower node is which client, and deterministic sampling of clients per round."""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore import log

from fedpeft.seeding import rng

CLIENT_ID_KEY = "client-id"


class NodeDirectory:
    """A two-way map between Flower node ids and fedpeft client ids.

    Under `flwr run` a SuperNode that comes back may get a new node id: `update` maps its client to the
    new id, and the old one (dead, though Flower may list it online for a while) is never sampled again.
    """

    def __init__(self, node_to_client: dict[int, int]) -> None:
        self.node_to_client = dict(node_to_client)
        self.client_to_node = {c: n for n, c in self.node_to_client.items()}
        if len(self.client_to_node) != len(self.node_to_client):
            raise ValueError("two nodes report the same client id")
        self.former: dict[int, int] = {}  # node id -> client id of nodes a later node id of that client replaced

    def client_of(self, node_id: int) -> int:
        """The client id of a node (-1 for a node not in the directory; a replaced node id keeps its client)."""
        return self.node_to_client.get(node_id, self.former.get(node_id, -1))

    def unknown(self, online: Iterable[int]) -> list[int]:
        """The online node ids that are neither in the directory nor replaced ones, in increasing order."""
        return sorted(set(online) - set(self.node_to_client) - set(self.former))

    def update(self, mapping: dict[int, int]) -> list[int]:
        """Add (node id → client id) answers; a new node id of a known client replaces its old one (returned)."""
        replaced = []
        for node, client in mapping.items():
            old = self.client_to_node.get(client)
            if old == node:
                continue
            if old is not None:
                del self.node_to_client[old]
                self.former[old] = client
                replaced.append(old)
                log(INFO, "client %d is now node %d (was node %d)", client, node, old)
            self.former.pop(node, None)
            self.node_to_client[node] = client
            self.client_to_node[client] = node
        return replaced

    def sample(self, seed: int, server_round: int, k: int, online: Iterable[int]) -> list[int]:
        """Node ids of `k` clients drawn from (seed, round) among the online nodes, in client-id order.

        With fewer than `k` online known nodes, all of them (the failure policy judges the round).
        """
        clients = sorted(self.node_to_client[n] for n in set(online) if n in self.node_to_client)
        if len(clients) < k:
            log(WARNING, "round %d: %d clients wanted but only %d are online; sampling all of them",
                server_round, k, len(clients))
            return [self.client_to_node[c] for c in clients]
        picked = rng(seed, server_round, "sample-clients").choice(len(clients), size=k, replace=False)
        return [self.client_to_node[clients[i]] for i in sorted(picked)]

    def sample_poisson(self, gen: np.random.Generator, q: float, online: Iterable[int]) -> list[int]:
        """Node ids of the online known clients, each taken independently with probability q, in client-id order."""
        clients = sorted(self.node_to_client[n] for n in set(online) if n in self.node_to_client)
        keep = gen.random(len(clients)) < q
        return [self.client_to_node[c] for c, k in zip(clients, keep) if k]


def wait_for_nodes(grid, want: int, wait_s: float, poll_s: float = 1.0) -> list[int]:
    """Node ids online once `want` nodes are connected, or after `wait_s` seconds with those there are."""
    deadline = time.monotonic() + wait_s
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < want and time.monotonic() < deadline:
        time.sleep(poll_s)
        node_ids = list(grid.get_node_ids())
    if len(node_ids) < want:
        log(INFO, "%d of %d nodes connected after %.0f s; going on with them", len(node_ids), want, wait_s)
    return node_ids


def query_clients(grid, node_ids: Iterable[int], timeout: float) -> dict[int, int]:
    """Ask these nodes for their client ids (a small QUERY message each way); node id → client id of each answer."""
    msgs = [
        Message(RecordDict({"config": ConfigRecord({"ask": CLIENT_ID_KEY})}), dst_node_id=n, message_type=MessageType.QUERY)
        for n in node_ids
    ]
    if not msgs:
        return {}
    mapping: dict[int, int] = {}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        if reply.has_error():
            log(INFO, "node %s did not report a client id: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        mapping[reply.metadata.src_node_id] = int(reply.content["info"][CLIENT_ID_KEY])
    return mapping


def discover(grid, timeout: float, want: int = 0, wait_s: float = 0.0) -> NodeDirectory:
    """Ask every connected node for its client id.

    With `want`, first wait up to `wait_s` seconds for that many nodes (real SuperNodes connect at their own pace).
    """
    node_ids = wait_for_nodes(grid, want, wait_s) if want else list(grid.get_node_ids())
    return NodeDirectory(query_clients(grid, node_ids, timeout))


def rediscover(grid, directory: NodeDirectory, timeout: float) -> dict[int, int]:
    """Ask the online nodes the directory does not know (new, restarted or not yet answered) and add their answers."""
    new = directory.unknown(grid.get_node_ids())
    if not new:
        return {}
    mapping = query_clients(grid, new, timeout)
    directory.update(mapping)
    log(INFO, "%d new nodes online, %d reported a client id: %s", len(new), len(mapping),
        {n: c for n, c in sorted(mapping.items())})
    return mapping
