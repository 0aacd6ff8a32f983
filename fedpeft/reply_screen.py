"""Screening replies as messages, before any strategy reads their content.

A reply is only worth decoding if it answers a message this round sent, comes from the node that
message went to, is the first answer to it, belongs to this round, and is not absurdly large.
Flower's links already refuse most such replies; this screen makes the server's own guarantee
independent of the transport (and of a SuperNode that is not what it claims). An error reply from
the SuperLink itself (it answers so for a node whose heartbeats stopped) is that node's failure.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import Message
from flwr.common.constant import SUPERLINK_NODE_ID

MIB = 1 << 20  # fedpeft.ledger.MIB (the ledger imports this module)


@dataclass(frozen=True)
class Screened:
    """A reply refused as a message, and why."""

    node_id: int
    reason: str


def reply_limit(max_reply_mib: float, largest_download: int) -> int:
    """The largest reply accepted: `max_reply_mib` MiB, or by default 4x the largest download + 1 MiB."""
    return int(max_reply_mib * MIB) if max_reply_mib > 0 else 4 * largest_download + MIB


def screen(sent: dict[str, Message], replies: list[Message], sizes: list[int], limit: int) -> tuple[list[Message], list[Screened]]:
    """Split `replies` (with their charged `sizes`) into those fit to read and those refused, with reasons.

    `sent` maps the message ids this round pushed to the messages themselves.
    """
    ok: list[Message] = []
    refused: list[Screened] = []
    answered: set[str] = set()
    for reply, size in zip(replies, sizes):
        md = reply.metadata
        original = sent.get(md.reply_to_message_id)
        reason = None
        if original is None:
            reason = f"reply to message {md.reply_to_message_id!r}, which this round did not send (another round's, or none)"
        elif md.src_node_id == SUPERLINK_NODE_ID and reply.has_error():
            # The SuperLink answers for a node whose heartbeats stopped (e.g. a killed SuperNode): that node failed.
            answered.add(md.reply_to_message_id)
            refused.append(Screened(original.metadata.dst_node_id, f"node unavailable ({reply.error.reason})"))
            continue
        elif md.src_node_id != original.metadata.dst_node_id:
            reason = f"reply from node {md.src_node_id} to a message sent to node {original.metadata.dst_node_id}"
        elif md.reply_to_message_id in answered:
            reason = "a second reply to one message (duplicate)"
        elif original.metadata.group_id and md.group_id != original.metadata.group_id:
            reason = f"reply for round {md.group_id!r}, the message was for round {original.metadata.group_id!r}"
        elif size > limit:
            reason = f"oversized: {size:,} B, the limit is {limit:,} B (sim.max_reply_mib)"
        if reason is None:
            answered.add(md.reply_to_message_id)
            ok.append(reply)
        else:
            refused.append(Screened(md.src_node_id, reason))
    return ok, refused
