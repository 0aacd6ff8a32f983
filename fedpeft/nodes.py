"""Which Flower node is which client, and deterministic sampling of clients per round."""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore import log

from fedpeft.seeding import rng

CLIENT_ID_KEY = "client-id"


class NodeDirectory:
    """A two-way map between Flower node ids and fedpeft client ids."""

    def __init__(self, node_to_client: dict[int, int]) -> None:
        self.node_to_client = dict(node_to_client)
        self.client_to_node = {c: n for n, c in self.node_to_client.items()}
        if len(self.client_to_node) != len(self.node_to_client):
            raise ValueError("two nodes report the same client id")

    def client_of(self, node_id: int) -> int:
        """The client id of a node (-1 for a node not in the directory)."""
        return self.node_to_client.get(node_id, -1)

    def sample(self, seed: int, server_round: int, k: int, online: Iterable[int]) -> list[int]:
        """Node ids of `k` clients drawn from (seed, round) among the online nodes, in client-id order."""
        clients = sorted(self.node_to_client[n] for n in set(online) if n in self.node_to_client)
        if len(clients) < k:
            raise RuntimeError(f"round {server_round}: {k} clients wanted but only {len(clients)} are online")
        picked = rng(seed, server_round, "sample-clients").choice(len(clients), size=k, replace=False)
        return [self.client_to_node[clients[i]] for i in sorted(picked)]


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


def discover(grid, timeout: float, want: int = 0, wait_s: float = 0.0) -> NodeDirectory:
    """Ask every connected node for its client id (a small QUERY message each way).

    With `want`, first wait up to `wait_s` seconds for that many nodes (real SuperNodes connect at their own pace).
    """
    node_ids = wait_for_nodes(grid, want, wait_s) if want else list(grid.get_node_ids())
    msgs = [
        Message(RecordDict({"config": ConfigRecord({"ask": CLIENT_ID_KEY})}), dst_node_id=n, message_type=MessageType.QUERY)
        for n in node_ids
    ]
    mapping: dict[int, int] = {}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        if reply.has_error():
            log(INFO, "node %s did not report a client id: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        mapping[reply.metadata.src_node_id] = int(reply.content["info"][CLIENT_ID_KEY])
    return NodeDirectory(mapping)
