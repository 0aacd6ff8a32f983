"""Recipe loading: the config schema, then the method's registration (options, own checks, capabilities).

This sits above the platform's core and the methods: it reads each method's declared capabilities
(`fedpeft.methods.contract.Capabilities`) to refuse what a method cannot do, and never checks a method
by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedpeft.adapters import build_peft_config
from fedpeft.config import Config, ConfigError
from fedpeft.recipe_file import read_recipe, schema_validate
from fedpeft.faults.attacks import REWRITING
from fedpeft.faults.malformed import ANY, DENSE, KINDS
from fedpeft.privacy import user_level
from fedpeft.secagg.updates import round_options
from strategies import MethodSpec, method_options, method_spec


def validate(raw: dict[str, Any]) -> Config:
    """Validate a raw mapping into a Config: schema, method options and checks, adapter options, DP, codecs."""
    cfg = schema_validate(raw)
    spec = method_spec(cfg.method.name)
    method_options(cfg.method.name, cfg.method.options())
    spec.strategy.validate_config(cfg)  # may also complete the config (e.g. set adapter.r)
    build_peft_config(cfg.adapter)
    check_capabilities(cfg, spec)
    check_secagg(cfg, spec)
    user_level.check_config(cfg)
    return cfg


def load(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a TOML recipe, apply `key=value` overrides and validate it."""
    return validate(read_recipe(path, overrides))


def check_faults(cfg: Config, spec: MethodSpec) -> None:
    """Refuse injected faults and attacks that need adapter tensors from a method whose uploads carry none."""
    f, name = cfg.faults, f"method.name = '{spec.name}'"
    why = spec.capabilities.refusal("tensor_uploads")
    if why and f.byzantine_fraction > 0 and f.attack in REWRITING:
        raise ConfigError(f"faults.attack = '{f.attack}' rewrites uploaded adapter tensors, but {name} uploads none "
                          f"({why}); use faults.attack = 'label_flip'")
    payload = KINDS[f.malformed_kind].payload
    if f.malformed and payload not in (ANY, spec.capabilities.uploads):
        raise ConfigError(f"faults.malformed_kind = '{f.malformed_kind}' malforms {payload}, which {name} does not "
                          f"upload (its replies carry {spec.capabilities.uploads})")
    if f.malformed and payload == DENSE and cfg.codecs.up:
        raise ConfigError(f"faults.malformed_kind = '{f.malformed_kind}' malforms dense adapter tensors, but codecs.up "
                          "sends coded payloads (use a metrics kind such as 'nan_examples')")


def check_capabilities(cfg: Config, spec: MethodSpec) -> None:
    """Refuse DP levels, codec directions and merge rules the method does not declare it supports."""
    caps, name = spec.capabilities, f"method.name = '{spec.name}'"
    why = caps.refusal("sample_dp")
    if cfg.dp.enabled and why:
        raise ConfigError(f"dp.enabled = true is not supported by {name} ({why})")
    if cfg.dp.user.enabled:
        why = caps.refusal("user_dp")
        if why:
            raise ConfigError(f"dp.user.enabled = true needs a method whose clients all train and return the global "
                              f"adapter, but {name} does not ({why})")
        if caps.weighted_mean is not True:
            raise ConfigError(f"dp.user.enabled = true needs an aggregate that is the mean of the clipped updates "
                              f"(the noise is calibrated to it), but {name} aggregates by {caps.weighted_mean}")
    check_faults(cfg, spec)
    for direction in ("up", "down"):
        if getattr(cfg.codecs, direction) and direction not in caps.codecs:
            supported = ", ".join(f"codecs.{d}" for d in caps.codecs) or "no codecs"
            raise ConfigError(f"codecs.{direction} is not supported by {name} (it supports: {supported}"
                              f"{'; ' + caps.codecs_why if caps.codecs_why else ''})")
    if cfg.codecs.merge != "mean":
        if "up" not in caps.codecs:
            raise ConfigError(f"codecs.merge is not supported by {name} (its uploads are not adapter updates)")
        if caps.weighted_mean is not True:
            raise ConfigError(f"codecs.merge = '{cfg.codecs.merge}' replaces the mean of the client updates, but "
                              f"{name} aggregates by {caps.weighted_mean}: use codecs.merge = 'mean'")
    if cfg.codecs.merge == "sparse-mean" and not cfg.codecs.up:
        raise ConfigError("codecs.merge = 'sparse-mean' averages over the entries each client sent: set codecs.up")


def check_secagg(cfg: Config, spec: MethodSpec) -> None:
    """Refuse `[secagg]` with a method, mechanism or option that needs what secure aggregation hides."""
    if not cfg.secagg.enabled:
        return
    refused = []
    if (why := spec.capabilities.refusal("secagg")) is not None:
        refused.append(f"method.name = '{spec.name}' ({why})")
    if cfg.codecs.active:
        refused.append("[codecs] (a masked upload is uniformly random in the ring, so no codec compresses it, and the "
                       "codecs decode and merge each client's own update, which the server never sees)")
    if cfg.dp.user.enabled and cfg.dp.user.side != "distributed":
        refused.append(f"dp.user.side = '{cfg.dp.user.side}' (it clips each client's update where secure "
                       "aggregation hides it: use dp.user.side = 'distributed', the clients clip and noise)")
    if cfg.dp.enabled:
        refused.append("dp.enabled = true (DP-SGD replies report each client's ε and example count in the clear, "
                       "and the privacy ledger reads them; not wired into the masked upload yet)")
    if cfg.faults.byzantine_fraction > 0 and cfg.faults.attack in REWRITING:
        refused.append(f"faults.attack = '{cfg.faults.attack}' (it rewrites each client's dense update on the "
                       "server, which holds only masked vectors; use 'label_flip')")
    if cfg.faults.malformed:
        refused.append("faults.malformed (its kinds rewrite dense adapter tensors or reply metrics, and a masked "
                       "upload carries neither)")
    if cfg.sim.comm_budget_mib:
        refused.append("sim.comm_budget_mib (the budget predicts a round from its train messages, not yet from "
                       "the SecAgg stages)")
    if refused:
        raise ConfigError("secagg.enabled = true cannot be combined with " + "; ".join(refused))
    try:
        round_options(cfg.secagg, cfg.sim.clients_per_round)
    except ValueError as err:
        raise ConfigError(f"[secagg] with sim.clients_per_round = {cfg.sim.clients_per_round}: {err}") from None
