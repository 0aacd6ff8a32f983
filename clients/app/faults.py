"""The ClientApp's part of fault injection: a mod that crashes, delays or corrupts a client as the plan says.

The plan (`fedpeft.faults.FaultPlan`) is drawn from (run seed, round, client), so a deployed
SuperNode injects exactly what a simulated client does, and the server knows what was injected.
"""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from clients.app.runtime import client_id, runtime
from fedpeft.faults import FaultPlan
from fedpeft.faults.attacks import LABEL_FLIP_KEY
from fedpeft.faults.malformed import applies, corrupt
from fedpeft.faults.plan import CRASH, MALFORMED, STRAGGLE
from fedpeft.records import CONFIG, SERVER_ROUND

class InjectedFault(RuntimeError):
    """A crash the fault plan injected (the server sees it as a failed client, marked injected)."""


def fault_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Inject this client's planned fault for this round (none unless `[faults]` asks for some)."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    cfg = runtime(context).cfg
    if not cfg.faults.active:
        return call_next(msg, context)
    cid, server_round = client_id(context), int(msg.content[CONFIG][SERVER_ROUND])
    plan = FaultPlan(cfg.faults, cfg.sim.seed, cfg.sim.num_clients)
    fault = plan.fault(server_round, cid)
    if fault is not None and fault.kind == CRASH:
        raise InjectedFault(f"{fault.reason()}: client {cid}, round {server_round}")
    if fault is not None and fault.kind == STRAGGLE:
        time.sleep(cfg.faults.straggle_s)
    if cfg.faults.attack == "label_flip" and plan.is_byzantine(cid):
        content = RecordDict(dict(msg.content.items()))
        content[CONFIG] = ConfigRecord({**dict(msg.content[CONFIG]), LABEL_FLIP_KEY: True})
        msg.content = content
    reply = call_next(msg, context)
    if fault is not None and fault.kind == MALFORMED and not reply.has_error() and applies(fault.detail, reply.content):
        reply.content = corrupt(fault.detail, reply.content)
    return reply
