"""Update codecs: composable chains (delta, top-k, rand-k, DARE, fp16/bf16, ternary, int8/int4) packed tightly."""

from fedpeft.codecs import quantize, sparsify  # noqa: F401  (importing registers the stages)
from fedpeft.codecs.chain import Chain
from fedpeft.codecs.registry import (
    CodecSpecError,
    Draw,
    available_codecs,
    register_codec,
)
from fedpeft.codecs.wire import PayloadError

__all__ = ["Chain", "CodecSpecError", "Draw", "PayloadError", "available_codecs", "register_codec"]
