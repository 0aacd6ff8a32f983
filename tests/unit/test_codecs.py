"""Update codecs: exact round trips, packed sizes, error feedback, seeded masks, merges, config errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import RecordDict

from fedpeft.codecs import Chain, CodecSpecError
from fedpeft.codecs.endpoints import Codecs, to_record
from fedpeft.codecs.merge import merge_updates
from fedpeft.codecs.registry import Draw
from fedpeft.config import ConfigError
from fedpeft.app.recipe import validate
from fedpeft.state import ClientStateStore

SHAPES = {"a.lora_A.weight": (4, 96), "a.lora_B.weight": (96, 4), "classifier.bias": (3,), "z.big": (40, 50)}
HEADER = len(b"FP") + 1 + 1 + 2  # magic, version, chain-text length, tensor count (+ the chain text itself)


def _tensors(seed: int = 0, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}


def _roundtrip(chain: Chain, x: dict, draw: Draw | None = None) -> tuple[dict, dict, bytes]:
    draw = draw or Draw(0, 1, 5)
    payload = chain.encode(x, draw)
    dense, support = chain.decode(payload, {k: v.shape for k, v in x.items()}, draw)
    return dense, support, payload


@pytest.mark.parametrize("stages", [["fp32"], ["delta"], ["delta", "fp32"]])
def test_lossless_chains_round_trip_bit_for_bit(stages):
    x = _tensors()
    x["a.lora_A.weight"][0, :3] = [np.float32(1e-38), np.float32(-0.0), np.float32(3.4e38)]
    dense, _, _ = _roundtrip(Chain(stages), x)
    for k in x:
        assert dense[k].tobytes() == x[k].tobytes()


@pytest.mark.parametrize("cast,dtype", [("fp16", np.float16), ("bf16", None)])
def test_casts_are_exact_on_representable_values_and_take_two_bytes(cast, dtype):
    x = _tensors()
    if dtype is not None:
        x = {k: v.astype(dtype).astype(np.float32) for k, v in x.items()}
    else:  # bfloat16-representable: float32 with the low 16 bits cleared
        x = {k: (v.view(np.uint32) & 0xFFFF0000).view(np.float32) for k, v in x.items()}
    chain = Chain(["delta", cast])
    dense, _, payload = _roundtrip(chain, x)
    assert all(np.array_equal(dense[k], x[k]) for k in x)
    n = sum(v.size for v in x.values())
    assert len(payload) == HEADER + len(chain.text) + 2 * n


def test_payload_sizes_follow_the_packing():
    x = _tensors()
    sizes = {k: math.prod(s) for k, s in SHAPES.items()}
    n = sum(sizes.values())

    def size(stages: list[str]) -> int:
        return len(Chain(stages).encode(x, Draw(0, 1, 5)))

    def header(stages: list[str]) -> int:
        return HEADER + len(",".join(stages))

    # ternary: one float32 scale + one sign bit per value
    assert size(["delta", "ternary"]) == header(["delta", "ternary"]) + sum(4 + (m + 7) // 8 for m in sizes.values())
    # int8: scale + a byte per value; int4: two codes per byte; per-block scales
    assert size(["delta", "int8"]) == header(["delta", "int8"]) + sum(4 + m for m in sizes.values())
    assert size(["delta", "int4"]) == header(["delta", "int4"]) + sum(4 + (m + 1) // 2 for m in sizes.values())
    assert size(["delta", "int8:64"]) == header(["delta", "int8:64"]) + sum(4 * -(-m // 64) + m for m in sizes.values())
    # rand-k: the mask derives from the shared seed, so only the kept values travel (no positions)
    kept = {k: max(1, round(0.1 * m)) for k, m in sizes.items()}
    assert size(["delta", "randk:0.1"]) == header(["delta", "randk:0.1"]) + 4 * sum(kept.values())
    # top-k: positions in the smallest of indices / gaps / bitmap, then the values
    topk = size(["delta", "topk:0.1"])
    assert topk < header(["delta", "topk:0.1"]) + 4 * sum(kept.values()) + 2 * sum(kept.values()) + 6 * len(SHAPES)
    assert size(["delta", "topk:0.1", "ternary"]) < topk / 3
    assert size(["delta", "ternary"]) < 4 * n / 25  # ~32x smaller than float32, less the per-tensor scales


def test_topk_keeps_the_largest_entries_per_tensor_or_globally():
    x = _tensors()
    dense, support, _ = _roundtrip(Chain(["delta", "topk:0.05"]), x)
    for k, v in x.items():
        kept = support[k]
        assert len(kept) == max(1, round(0.05 * v.size))
        threshold = np.sort(np.abs(v).ravel())[-len(kept)]
        assert (np.abs(v.ravel()[kept]) >= threshold).all()
        np.testing.assert_array_equal(dense[k].ravel()[kept], v.ravel()[kept])  # fp32 values exact
    x["z.big"] *= 100  # with one global threshold the large tensor takes (almost) everything
    _, support, _ = _roundtrip(Chain(["delta", "topk:200:global"]), x)
    assert sum(len(s) for s in support.values()) == 200 and len(support["z.big"]) >= 195


def test_randk_and_dare_masks_are_reproducible_from_the_seed_and_differ_per_client():
    x = _tensors()
    chain = Chain(["delta", "randk:0.2"])
    _, s1, _ = _roundtrip(chain, x, Draw(3, 2, 7))
    _, s2, _ = _roundtrip(chain, x, Draw(3, 2, 7))
    _, s3, _ = _roundtrip(chain, x, Draw(3, 2, 8))
    assert all(np.array_equal(s1[k], s2[k]) for k in x)
    assert any(not np.array_equal(s1[k], s3[k]) for k in x)
    dense, support, _ = _roundtrip(Chain(["delta", "dare:0.75"]), x)
    for k, v in x.items():  # survivors rescaled by 1 / (1 - p) keep the expected update unbiased
        np.testing.assert_allclose(dense[k].ravel()[support[k]], 4 * v.ravel()[support[k]], rtol=1e-6)


def test_ternary_sends_sign_times_mean_magnitude():
    x = _tensors()
    dense, _, _ = _roundtrip(Chain(["delta", "ternary"]), x)
    for k, v in x.items():
        scale = np.abs(v).mean()
        np.testing.assert_allclose(np.abs(dense[k]), scale, rtol=1e-6)
        assert (np.sign(dense[k]) == np.where(v < 0, -1, 1)).all()


@pytest.mark.parametrize("coder", ["int8", "int4", "int4:32"])
def test_stochastic_rounding_is_unbiased_and_bounded_by_one_step(coder):
    x = {"w": np.linspace(-1, 1, 301, dtype=np.float32)}
    chain = Chain(["delta", coder])
    qmax = 127 if coder == "int8" else 7
    draws = np.stack([_roundtrip(chain, x, Draw(0, r, 1))[0]["w"] for r in range(400)])
    assert (np.abs(draws - x["w"]) <= 1.0 / qmax + 1e-6).all()
    # the mean of 400 independent roundings sits within 4 standard errors of the true value
    assert (np.abs(draws.mean(0) - x["w"]) <= 4 * (0.5 / qmax) / math.sqrt(400) + 1e-6).all()


def test_error_feedback_conserves_mass(tmp_path):
    """Over several rounds, what was sent plus what is still held equals everything the client produced."""
    codecs = Codecs(validate({"codecs": {"up": ["delta", "topk:0.05", "ternary"]}}).codecs, seed=0)
    assert codecs.error_feedback
    store = ClientStateStore(tmp_path)
    reference = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    produced = {k: np.zeros(s, np.float64) for k, s in SHAPES.items()}
    sent = {k: np.zeros(s, np.float64) for k, s in SHAPES.items()}
    for rnd in range(1, 6):
        local = _tensors(rnd, scale=0.01)
        record = codecs.encode_upload(local, reference, client=3, server_round=rnd, store=store)
        decoded = codecs.decode_upload(RecordDict({"codec": record}), to_record(reference, reference), 3, rnd)
        for k in SHAPES:
            produced[k] += local[k]
            sent[k] += decoded.update[k]
    residual = store.load_arrays(3, "residual")
    for k in SHAPES:
        np.testing.assert_allclose(sent[k] + residual[k], produced[k], atol=1e-6)
    assert max(np.abs(residual[k]).max() for k in SHAPES) > 0  # something was actually held back


def test_merges_use_peft_and_weight_by_examples():
    u1 = {"w": np.array([1.0, -2.0, 0.0, 4.0], np.float32)}
    u2 = {"w": np.array([3.0, 2.0, 0.0, -4.0], np.float32)}
    full = [{"w": None}, {"w": None}]
    mean = merge_updates("mean", [u1, u2], full, [1, 3], 1.0, 0)["w"]
    np.testing.assert_allclose(mean, [2.5, 1.0, 0.0, -2.0])
    np.testing.assert_allclose(merge_updates("task_arithmetic", [u1, u2], full, [1, 3], 1.0, 0)["w"], mean)
    # sparse mean: an entry is averaged over the clients that sent it
    sparse = merge_updates("sparse-mean", [u1, u2], [{"w": np.array([0, 1])}, {"w": np.array([1, 3])}], [1, 1], 1.0, 0)
    np.testing.assert_allclose(sparse["w"], [1.0, 0.0, 0.0, -4.0])
    # TIES keeps, per entry, only the values agreeing with the elected sign
    ties = merge_updates("ties", [u1, u2], full, [1, 1], 0.99, 0)["w"]
    assert ties[0] == pytest.approx(2.0) and ties[1] in (pytest.approx(2.0), pytest.approx(-2.0))
    d1 = merge_updates("dare_linear", [u1, u2], full, [1, 1], 0.5, seed=4)["w"]
    d2 = merge_updates("dare_linear", [u1, u2], full, [1, 1], 0.5, seed=4)["w"]
    np.testing.assert_array_equal(d1, d2)  # seeded: the server's merge is reproducible


@pytest.mark.parametrize("stages,match", [
    (["delta", "zip"], "unknown codec 'zip'"),
    (["topk:0.1"], "needs 'delta'"),
    (["delta", "ternary", "topk:0.1"], "cannot follow"),
    (["delta", "topk:1.5"], "topk"),
    (["delta", "int8:x"], "block size"),
])
def test_bad_chains_are_refused_with_the_reason(stages, match):
    with pytest.raises(CodecSpecError, match=match):
        Chain(stages)
    with pytest.raises(ConfigError, match=match):
        validate({"codecs": {"up": stages}})


def test_codecs_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match="download chains may only cast"):
        validate({"codecs": {"down": ["delta", "topk:0.1"]}})
    with pytest.raises(ConfigError, match="codecs.up is not supported by method.name = .fedkseed."):
        validate({"method": {"name": "fedkseed"}, "codecs": {"up": ["delta", "int8"]}})
    with pytest.raises(ConfigError, match="sparse-mean"):
        validate({"codecs": {"merge": "sparse-mean"}})
    with pytest.raises(ConfigError, match="lora_aggregation"):
        validate({"method": {"name": "fedavg", "lora_aggregation": "exact"}, "codecs": {"merge": "ties"}})
    with pytest.raises(ConfigError, match="codecs.upp|upp"):
        validate({"codecs": {"upp": ["delta"]}})


def test_torch_global_rng_is_untouched_by_a_dare_merge():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    merge_updates("dare_ties", [{"w": np.ones(8, np.float32)}] * 2, [{"w": None}] * 2, [1, 1], 0.5, 9)
    assert torch.equal(torch.rand(3), expected)
