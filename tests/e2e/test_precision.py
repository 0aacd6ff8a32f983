"""train.precision: bf16 and fp32 both run every method family on a tiny decoder; wire and state stay fp32.

One method per client-trainer kind (the registry declares each method's trainer), plus FedPara's
LoHa adapter and DP-SGD through Opacus, run one round through the real ClientApp in each precision.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeft.precision import compute, resolve
from strategies import available_methods, get_strategy_class
from test_causal_methods import _identity, _one_round, _raw, task_dir  # noqa: F401  (fixtures)


def _families() -> list[str]:
    """The first registered method of each client-trainer kind, and FedPara (the LoHa adapter)."""
    seen: dict[str, str] = {}
    for name in sorted(available_methods(), key=lambda m: m != "fedavg"):
        seen.setdefault(get_strategy_class(name).client_trainer, name)
    return sorted({*seen.values(), "fedpara"})


def _run(method: str, precision: str, task_dir, run_dir, dp: bool = False):
    raw = _raw(method)
    raw["train"]["precision"] = precision
    if dp:
        raw["dp"] = {"enabled": True, "noise_multiplier": 0.8, "max_grad_norm": 1.0}
    return _one_round(raw, task_dir, run_dir)


def test_families_cover_every_trainer_kind():
    kinds = {get_strategy_class(m).client_trainer for m in available_methods()}
    assert kinds == {get_strategy_class(m).client_trainer for m in _families()}
    assert len(kinds) >= 5


@pytest.mark.parametrize("method", _families())
def test_every_method_family_trains_in_bf16_and_fp32(method, task_dir, tmp_path):  # noqa: F811
    moved = {}
    for precision in ("fp32", "bf16"):
        before, after, rejected, metrics = _run(method, precision, task_dir, tmp_path / precision)
        assert not rejected, (precision, [r.reason for r in rejected])
        assert np.isfinite(float(metrics["train-loss"])), precision
        moved[precision] = {k: after[k] - before[k] for k in before if k in after}
        assert sum(float(np.abs(d).sum()) for d in moved[precision].values()) > 0, f"{method} {precision}: no move"
    # bf16 changes the arithmetic of the forward pass, not the update it computes: the two rounds'
    # updates point the same way.
    a = np.concatenate([d.ravel() for d in moved["fp32"].values()])
    b = np.concatenate([d.ravel() for d in moved["bf16"].values()])
    cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    assert cos > 0.5, f"{method}: bf16 update disagrees with fp32 (cosine {cos:.3f})"


@pytest.mark.parametrize("method,dp", [("fedkseed", False), ("fedavg", True)])
def test_same_seed_same_result_in_bf16(method, dp, task_dir, tmp_path):  # noqa: F811
    runs = [_run(method, "bf16", task_dir, tmp_path / str(i), dp=dp) for i in range(2)]
    (b0, a0, _, m0), (b1, a1, _, m1) = runs
    assert any(np.abs(a0[k] - b0[k]).sum() > 0 for k in b0), "the adapter did not move"
    assert a0.keys() == a1.keys()
    for k in a0:
        np.testing.assert_array_equal(a0[k], a1[k], err_msg=k)
    timing = {"train-s"}  # wall time is the only metric allowed to differ
    assert {k: v for k, v in dict(m0).items() if k not in timing} == {
        k: v for k, v in dict(m1).items() if k not in timing}


def test_bf16_autocasts_the_forward_but_keeps_fp32_weights():
    layer = torch.nn.Linear(8, 8)
    with compute("bf16", torch.device("cpu")):
        out = layer(torch.randn(2, 8))
    assert out.dtype == torch.bfloat16 and layer.weight.dtype == torch.float32
    with compute("fp32", torch.device("cpu")):
        assert layer(torch.randn(2, 8)).dtype == torch.float32


def test_auto_names_its_reason():
    precision, why = resolve("auto", torch.device("cpu"))
    assert precision in ("fp32", "bf16") and why.startswith("auto:")
    with pytest.raises(ValueError, match="train.precision"):
        resolve("fp16", torch.device("cpu"))
