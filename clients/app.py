"""The fedpeft ClientApp: the same code runs in simulation and on real SuperNodes."""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.codec import coded_train
from clients.registry import get_trainer_class
from clients.runtime import client_id, runtime
from clients.user_dp import user_dp_mod
from fedpeft.env import quiet_libraries
from fedpeft.nodes import CLIENT_ID_KEY
from strategies import get_strategy_class

app = ClientApp(mods=[user_dp_mod])
_trainers: dict[int, object] = {}


def _trainer(context: Context):
    rt = runtime(context)
    key = id(rt)
    if key not in _trainers:
        name = get_strategy_class(rt.cfg.method.name).client_trainer
        _trainers[key] = get_trainer_class(name)(rt)
    return _trainers[key]


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train locally with the method's client trainer and reply with its upload."""
    quiet_libraries()
    return Message(coded_train(_trainer(context), runtime(context), msg, client_id(context)), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which client this node is."""
    return Message(RecordDict({"info": MetricRecord({CLIENT_ID_KEY: client_id(context)})}), reply_to=msg)
