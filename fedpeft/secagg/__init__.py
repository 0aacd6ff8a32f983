"""Secure aggregation (SecAgg+) of adapter updates: the protocol core, free of Ray, the round loop and trainers.

Built on Flower's primitives (`flwr.common.secure_aggregation`: Shamir shares, ECDH + Fernet,
the mask PRG, quantization) and on the message keys of Flower's `secaggplus_mod`, so each
payload is a dict a Flower ConfigRecord holds as is (masked vectors: a list of arrays for an
ArrayRecord). `SecAggServer` and `SecAggClient` run the four stages; `weights` turns a weighted
mean into a secure sum; `quant` bounds and measures the quantization error.
"""

from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage

from fedpeft.secagg.client import Payload, SecAggClient, options_of, setup_request
from fedpeft.secagg.options import (
    SecAggError,
    SecAggOptions,
    SecAggReplyError,
    neighbourhoods,
)
from fedpeft.secagg.quant import clipped_sum, error_bound, measure_error
from fedpeft.secagg.server import DONE, SecAggResult, SecAggServer
from fedpeft.secagg.weights import (
    weight_ratio,
    weighted_mean,
    weighted_mean_error_bound,
    with_weight,
)

__all__ = [
    "DONE", "Key", "Payload", "SecAggClient", "SecAggError", "SecAggOptions", "SecAggReplyError", "SecAggResult",
    "SecAggServer", "Stage", "clipped_sum", "error_bound", "measure_error", "neighbourhoods", "options_of",
    "setup_request", "weight_ratio", "weighted_mean", "weighted_mean_error_bound", "with_weight",
]
