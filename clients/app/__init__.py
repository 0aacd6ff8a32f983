"""The fedpeft ClientApp: the same code runs in simulation and on real SuperNodes."""

from __future__ import annotations

from flwr.app import Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

from clients.base import Trainer
from clients.codec import coded_train
from clients.app.faults import fault_mod
from clients.app.secagg import secagg_stage, secure_train
from clients.registry import get_trainer_class
from clients.app.runtime import client_id, runtime
from fedpeft.app.engine.cluster import SERVICE_KEY, record_placement
from fedpeft.env import quiet_libraries
from fedpeft.records import SERVER_ROUND
from fedpeft.nodes import CLIENT_ID_KEY
from fedpeft.secagg.wire import ACTIONS as SECAGG_ACTIONS, SECAGG
from strategies import method_spec

_trainers: dict[int, Trainer] = {}


def _trainer(context: Context) -> Trainer:
    # One trainer per process runtime: the trainer the method's registration names.
    rt = runtime(context)
    key = id(rt)
    if key not in _trainers:
        spec = method_spec(rt.cfg.method.name)
        _trainers[key] = get_trainer_class(spec.trainer)(rt, spec.strategy)
    return _trainers[key]


def user_dp_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Clip this client's update with Flower's fixed or adaptive clipping mod when dp.user.side = "client"."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    user = runtime(context).cfg.dp.user
    if not (user.enabled and user.side == "client"):
        return call_next(msg, context)
    # Flower's mod clips (reply - received) to the norm the server's wrapper put in the config, and
    # answers with an error message (rejected by the server, with its reason) when the norm is missing.
    mod = adaptiveclipping_mod if user.clipping == "adaptive" else fixedclipping_mod
    return mod(msg, context, call_next)


app = ClientApp(mods=[fault_mod, user_dp_mod])  # fault_mod outermost: a malformed reply is what travels


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train locally with the method's client trainer and reply with its upload (masked, under secagg)."""
    quiet_libraries()
    trainer, rt, cid = _trainer(context), runtime(context), client_id(context)
    if SECAGG in msg.content.config_records:  # the collect stage of secure aggregation
        reply = Message(secure_train(trainer, rt, msg, cid, context), reply_to=msg)
    else:
        reply = Message(coded_train(trainer, rt, msg, cid), reply_to=msg)
    service = context.run_config.get(SERVICE_KEY)
    if service:  # on a Ray cluster: note which node ran this client (outside the message, so uncharged)
        record_placement(str(service), int(msg.content["config"][SERVER_ROUND]), client_id(context))
    return reply


for _action in SECAGG_ACTIONS.values():  # train.secagg_setup, train.secagg_share_keys, train.secagg_unmask
    app.train(_action)(secagg_stage)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which client this node is."""
    return Message(RecordDict({"info": MetricRecord({CLIENT_ID_KEY: client_id(context)})}), reply_to=msg)
