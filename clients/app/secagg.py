"""The ClientApp's half of secure aggregation: SecAgg+'s stages on a node, its state kept in `context.state`.

Setup, share_keys and unmask are their own message types (`fedpeft.secagg.wire`); the collect
stage is the round's train message with a `secagg` record: the node trains with the method's own
trainer, then uploads its masked, clipped, weighted update instead of the adapter. The node's
SecAggClient state (its keys, the shares it holds) lives in the node's Flower Context between
messages, which Flower keeps per node and run (and never sends anywhere).
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, RecordDict

from clients.base import ClientRuntime, Trainer
from fedpeft.codecs.endpoints import numpy_state
from fedpeft.privacy.distributed import is_distributed, noised_update, share_std
from fedpeft.privacy.noise import SEEDED, noise_source, numpy_noise_rng
from fedpeft.privacy.user_level import plan as user_plan
from fedpeft.records import ARRAYS, CONFIG, SERVER_ROUND, num_examples
from fedpeft.secagg import SecAggClient
from fedpeft.secagg.updates import update_vector, upload_vector
from fedpeft.secagg.wire import CLIENT_STATE, MAX_WEIGHT, from_content, to_content
from fedpeft.seeding import derive_seed


def _client(msg: Message, context: Context) -> SecAggClient:
    """This node's SecAggClient, from its context (a fresh one before its first setup)."""
    if CLIENT_STATE in context.state.config_records:
        return SecAggClient.from_state(dict(context.state[CLIENT_STATE]))
    return SecAggClient(msg.metadata.dst_node_id)


def _keep(context: Context, client: SecAggClient) -> None:
    """Store the client's state in the node's context for its next stage."""
    context.state[CLIENT_STATE] = ConfigRecord(client.state())


def secagg_stage(msg: Message, context: Context) -> Message:
    """Answer a setup, share_keys or unmask request (a SecAggError fails this node for the stage)."""
    client = _client(msg, context)
    payload = client.handle(from_content(msg.content))
    _keep(context, client)
    return Message(to_content(payload), reply_to=msg)


def secure_train(trainer: Trainer, rt: ClientRuntime, msg: Message, cid: int, context: Context) -> RecordDict:
    """Train as the method does, then reply with the masked r·clip(trained − global) instead of the adapter."""
    request = from_content(msg.content)
    sent = {k: v for k, v in numpy_state(msg.content[ARRAYS]).items() if k in trainer.uploads}
    reply = trainer.train(msg, cid)
    client = _client(msg, context)
    server_round = int(msg.content[CONFIG][SERVER_ROUND])
    # stochastic rounding and DP noise: reproducible in simulation, OS entropy where the seed is the server's to know
    source = noise_source(rt.cfg, rt.simulated)
    if is_distributed(rt.cfg):
        # distributed DP: clip to C and add this client's share of the noise; every update weighs 1
        u = rt.cfg.dp.user
        std = share_std(user_plan(rt.cfg).noise_multiplier, u.clipping_norm, client.options.threshold)
        rng = numpy_noise_rng(source, rt.cfg.sim.seed, server_round, cid, "user-dp-share")
        update = noised_update(numpy_state(reply[ARRAYS]), sent, u.clipping_norm, std, rng)
        vector = update_vector(update, 1.0, float(request[MAX_WEIGHT]), client.options)
    else:
        # the weight is the client's own example count; weights above the public maximum are refused
        vector = upload_vector(numpy_state(reply[ARRAYS]), sent, num_examples(reply), float(request[MAX_WEIGHT]),
                               client.options)
    seed = derive_seed(rt.cfg.sim.seed, server_round, cid, "secagg-rounding") if source == SEEDED else None
    payload = client.handle(request, vector, rounding_seed=seed)
    _keep(context, client)
    return to_content(payload)
