"""The client end of the codec chains: decode a coded download, encode the upload (with error feedback)."""

from __future__ import annotations

from flwr.app import Message, RecordDict

from clients.runtime import ClientRuntime
from fedpeft.adapters import adapter_state
from fedpeft.codecs.endpoints import CODEC_RECORD, Codecs, numpy_state
from fedpeft.state import store_for


def codecs_for(rt: ClientRuntime) -> Codecs | None:
    """The run's codecs, or None when the run sends dense adapters."""
    # Parsing a chain is cheap next to a training step, so it is not cached.
    return Codecs(rt.cfg.codecs, rt.cfg.sim.seed) if rt.cfg.codecs.active else None


def coded_train(trainer, rt: ClientRuntime, msg: Message, cid: int) -> RecordDict:
    """Run `trainer` on `msg` with the run's codecs on both ends."""
    codecs = codecs_for(rt)
    if codecs is None:
        return trainer.train(msg, cid)
    server_round = int(msg.content["config"]["server-round"])
    if codecs.down is not None:
        state = {k: v for k, v in adapter_state(rt.model).items() if k in trainer.keys}
        template = {k: tuple(v.shape) for k, v in state.items()}
        dtypes = {k: v.numpy().dtype for k, v in state.items()}
        dense = codecs.decode_download(msg.content, template, dtypes, server_round)
        msg.content = RecordDict({"arrays": dense, "config": msg.content["config"]})
    # What the server sent, taken before training: a trainer may rewrite the message (e.g. pad it).
    reference = numpy_state(msg.content["arrays"])
    reply = trainer.train(msg, cid)
    if codecs.up is None:
        return reply
    store = store_for(rt.run_dir, msg.metadata.run_id)
    coded = codecs.encode_upload(numpy_state(reply["arrays"]), reference, cid, server_round, store)
    rest = {name: rec for name, rec in reply.items() if name != "arrays"}
    return RecordDict({CODEC_RECORD: coded, **rest})
