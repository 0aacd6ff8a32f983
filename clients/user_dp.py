"""Client side of user-level DP: Flower's clipping mods, on train messages of runs with dp.user.side = "client"."""

from __future__ import annotations

from flwr.app import Context, Message, MessageType
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

from clients.runtime import runtime


def user_dp_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Clip this client's update with Flower's fixed or adaptive clipping mod when the run asks for it."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    user = runtime(context).cfg.dp.user
    if not (user.enabled and user.side == "client"):
        return call_next(msg, context)
    # Flower's mod clips (reply - received) to the norm the server's wrapper put in the config, and
    # answers with an error message (rejected by the server, with its reason) when the norm is missing.
    mod = adaptiveclipping_mod if user.clipping == "adaptive" else fixedclipping_mod
    return mod(msg, context, call_next)
