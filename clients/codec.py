"""The client end of the codec chains: decode a coded download, encode the upload (with error feedback)."""

from __future__ import annotations

from flwr.app import Message, RecordDict

from clients.base import ClientRuntime, Trainer
from fedpeft.adapters import adapter_state
from fedpeft.codecs.endpoints import CODEC_RECORD, Codecs, numpy_state
from fedpeft.records import ARRAYS, SERVER_ROUND


def codecs_for(rt: ClientRuntime) -> Codecs | None:
    """The run's codecs, or None when the run sends dense adapters."""
    # Parsing a chain is cheap next to a training step, so it is not cached.
    return Codecs(rt.cfg.codecs, rt.cfg.sim.seed) if rt.cfg.codecs.active else None


def coded_train(trainer: Trainer, rt: ClientRuntime, msg: Message, cid: int) -> RecordDict:
    """Run `trainer` on `msg` with the run's codecs on both ends."""
    codecs = codecs_for(rt)
    if codecs is None:
        return trainer.train(msg, cid)
    server_round = int(msg.content["config"][SERVER_ROUND])
    if codecs.down is not None:
        state = {k: v for k, v in adapter_state(rt.model).items() if k in trainer.keys}
        template = {k: tuple(v.shape) for k, v in state.items()}
        dtypes = {k: v.numpy().dtype for k, v in state.items()}
        dense = codecs.decode_download(msg.content, template, dtypes, server_round)
        # Records other than the coded adapter (e.g. a method's control variate) pass through.
        rest = {name: rec for name, rec in msg.content.items() if name != CODEC_RECORD}
        msg.content = RecordDict({ARRAYS: dense, **rest})
    # What the server sent, taken before training: a trainer may rewrite the message (e.g. pad it).
    reference = numpy_state(msg.content[ARRAYS])
    reply = trainer.train(msg, cid)
    if codecs.up is None:
        return reply
    coded = codecs.encode_upload(numpy_state(reply[ARRAYS]), reference, cid, server_round, trainer.store(msg))
    rest = {name: rec for name, rec in reply.items() if name != ARRAYS}
    return RecordDict({CODEC_RECORD: coded, **rest})
