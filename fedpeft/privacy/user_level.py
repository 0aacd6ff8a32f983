"""User-level DP: Flower's DP strategy wrappers around a fedpeft strategy, and the user-level ε.

Each sampled client's whole adapter update (its returned tensors minus the global ones) is clipped
to an L2 bound, by the server (`side = "server"`) or by Flower's client mod (`side = "client"`), and
Gaussian noise of std σ·C/m is added to the uniform mean of the m clipped updates (Flower's
`DifferentialPrivacy{Server,Client}Side{Fixed,Adaptive}Clipping`). One release per round; ε is
Opacus's accountant over `releases` steps at sampling rate q = clients_per_round / num_clients.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.supercore import log

from fedpeft.config import Config, ConfigError
from fedpeft.privacy import accounting
from fedpeft.records import reply_metrics
from fedpeft.seeding import derive_seed

# Each clipped update enters the mean with weight 1/m: the noise std σ·C/m assumes exactly that
# (an example-count weight could give one client more than 1/m of the aggregate).
UNIFORM_KEY = "user-dp-weight"


@dataclass(frozen=True)
class UserPlan:
    """The user-level mechanism: noise multiplier, client sampling rate, δ."""

    noise_multiplier: float
    sample_rate: float
    delta: float
    accountant: str


def plan(cfg: Config) -> UserPlan:
    """The run's user-level plan; the noise is dp.user.noise_multiplier or solved for dp.user.target_epsilon."""
    u = cfg.dp.user
    q = cfg.sim.clients_per_round / cfg.sim.num_clients
    delta = u.delta if u.delta is not None else 1.0 / (10 * cfg.sim.num_clients)
    nm = u.noise_multiplier
    if nm is None:
        nm = accounting.solve_noise(u.target_epsilon, delta, q, cfg.sim.rounds, u.accountant,
                                    "dp.user.target_epsilon", "raise dp.user.target_epsilon or lower sim.rounds")
    return UserPlan(noise_multiplier=nm, sample_rate=q, delta=delta, accountant=u.accountant)


def epsilon(p: UserPlan, releases: int) -> float:
    """User-level ε at p.delta after `releases` noised aggregates (Opacus's accountant; 0 before any)."""
    return accounting.epsilon(p.accountant, [[p.noise_multiplier, p.sample_rate, releases]] if releases else [], p.delta)


def check_config(cfg: Config) -> None:
    """Refuse user-level DP settings that cannot run or would not give the stated guarantee.

    What the method itself supports is checked against its declared capabilities at recipe load.
    """
    u = cfg.dp.user
    if not u.enabled:
        return
    if cfg.codecs.merge != "mean":
        raise ConfigError(
            f"dp.user.enabled = true needs codecs.merge = 'mean' (got '{cfg.codecs.merge}'): the noise is "
            "calibrated to the mean of the clipped updates"
        )
    if u.side == "client" and (cfg.codecs.up or cfg.codecs.down):
        raise ConfigError(
            "dp.user.side = 'client' clips with Flower's client mod, which needs the dense adapter in both "
            "directions: remove codecs.up / codecs.down, or use dp.user.side = 'server' (clips the decoded updates)"
        )
    p = plan(cfg)
    if p.delta >= 1.0 / cfg.sim.num_clients:
        raise ConfigError(
            f"dp.user.delta = {p.delta:g} is >= 1/sim.num_clients = {1.0 / cfg.sim.num_clients:g}; "
            "lower dp.user.delta or leave it unset"
        )
    if u.clipping == "adaptive":
        try:
            _adaptive_noise(cfg, p.noise_multiplier)
        except ValueError as err:
            raise ConfigError(f"dp.user: adaptive clipping cannot reach noise multiplier {p.noise_multiplier:g}: "
                              f"{err} (set dp.user.clipped_count_stddev)") from None


def _adaptive_noise(cfg: Config, noise_multiplier: float) -> tuple[float, float]:
    from flwr.supercore.differential_privacy import compute_adaptive_noise_params

    return compute_adaptive_noise_params(noise_multiplier, cfg.sim.clients_per_round, cfg.dp.user.clipped_count_stddev)


class _Combine(Strategy):
    """What Flower's DP wrapper wraps: the fedpeft strategy's send, and its combine of validated replies."""

    def __init__(self, strategy) -> None:
        super().__init__()
        self.strategy = strategy

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid) -> Iterable[Message]:
        """The fedpeft strategy's messages (the wrapper may have added the clipping norm to `config`)."""
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Combine (the mean, before any server step) replies that fedpeft already validated and the wrapper clipped."""
        return self.strategy.combine(server_round, list(replies))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid) -> Iterable[Message]:
        """No federated evaluation (the server evaluates the global adapter itself)."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """No federated evaluation."""
        return None

    def summary(self) -> None:
        """The fedpeft strategy's summary."""
        self.strategy.summary()


class _Adaptive:
    """Fixes to Flower 1.41's adaptive clipping (Andrew et al., 2019), kept out of the wrapped classes' logic.

    1. The bound must follow the γ-quantile of update norms: C ← C·exp(-η(b̄ - γ)) with b̄ the (noised)
       fraction of updates left *unclipped*. Flower feeds the clipped fraction into the same formula, so
       the bound runs away from the quantile (all updates clipped → C shrinks further).
    2. Flower updates the bound before adding the round's noise, so the noise followed the next round's
       bound (up to exp(η/2) too small for the sensitivity); the noise here uses the bound applied.
    """

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        self._round_norm = self.clipping_norm
        return super().aggregate_train(server_round, replies)

    def _geometric_update(self, clipped_fraction: float) -> None:
        unclipped = 1.0 - clipped_fraction
        self.clipping_norm *= math.exp(-self.clip_norm_lr * (unclipped - self.target_clipped_quantile))

    def _add_noise_to_aggregated_arrays(self, aggregated: ArrayRecord) -> ArrayRecord:
        nxt, self.clipping_norm = self.clipping_norm, self._round_norm
        try:
            return super()._add_noise_to_aggregated_arrays(aggregated)
        finally:
            self.clipping_norm = nxt


class _ServerAdaptive(_Adaptive, DifferentialPrivacyServerSideAdaptiveClipping):
    pass


class _ClientAdaptive(_Adaptive, DifferentialPrivacyClientSideAdaptiveClipping):
    pass


def flower_wrapper(cfg: Config, inner: Strategy, noise_multiplier: float) -> Strategy:
    """The Flower DP wrapper named by dp.user.side and dp.user.clipping around `inner`."""
    u, m = cfg.dp.user, cfg.sim.clients_per_round
    if u.clipping == "fixed":
        cls = DifferentialPrivacyServerSideFixedClipping if u.side == "server" else DifferentialPrivacyClientSideFixedClipping
        return cls(inner, noise_multiplier, u.clipping_norm, m)
    cls = _ServerAdaptive if u.side == "server" else _ClientAdaptive
    return cls(inner, noise_multiplier, m, initial_clipping_norm=u.clipping_norm,
               target_clipped_quantile=u.target_quantile, clip_norm_lr=u.clip_norm_lr,
               clipped_count_stddev=u.clipped_count_stddev)


class UserDPStrategy:
    """A fedpeft strategy with user-level DP: validate replies, then Flower's wrapper clips, combines, noises.

    Everything else (initial arrays, export, rejections, per-client metrics) is the wrapped strategy's.
    """

    def __init__(self, strategy, cfg: Config) -> None:
        self.strategy = strategy
        self.cfg = cfg
        self.plan = plan(cfg)
        strategy.weighted_by_key = UNIFORM_KEY
        self.dp = flower_wrapper(cfg, _Combine(strategy), self.plan.noise_multiplier)
        self.releases = 0
        self.keys: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.strategy, name)

    def state_dict(self) -> dict[str, np.ndarray]:
        """The wrapped strategy's state, the releases so far and the (adaptive) clipping bound."""
        return {**self.strategy.state_dict(), "user-dp/releases": np.asarray(self.releases),
                "user-dp/clipping-norm": np.asarray(float(self.dp.clipping_norm), dtype=np.float64)}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore what `state_dict` returned."""
        self.strategy.load_state_dict({k: v for k, v in state.items() if not k.startswith("user-dp/")})
        self.releases = int(state["user-dp/releases"])
        self.dp.clipping_norm = float(state["user-dp/clipping-norm"])

    def summary(self) -> None:
        """Log the DP wrapper's settings and the method."""
        log(INFO, "user-level DP: %r, noise multiplier %.4g, q = %.4g, δ = %g",
            self.dp, self.plan.noise_multiplier, self.plan.sample_rate, self.plan.delta)
        self.dp.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid) -> Iterable[Message]:
        """The method's messages, through the wrapper (client side: with the clipping norm in the config)."""
        self.keys = list(arrays.keys())
        return self.dp.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate and decode (fedpeft), then clip, average uniformly and noise (Flower's wrapper)."""
        valid = self.strategy.accept(server_round, replies)
        if not valid:
            return None, None
        for msg in valid:
            # Flower clips position by position against the global record: same key order for every reply.
            rec = msg.content["arrays"]
            msg.content["arrays"] = ArrayRecord({k: rec[k] for k in self.keys})
            reply_metrics(msg.content)[UNIFORM_KEY] = 1
        # Flower's wrappers draw their noise from numpy's global generator: seed it per round (determinism).
        np.random.seed(derive_seed(self.cfg.sim.seed, server_round, "user-dp-noise") % 2**32)
        arrays, metrics = self.dp.aggregate_train(server_round, valid)
        if arrays is None:
            return None, metrics
        self.releases += 1
        # A server optimizer acts on the noised mean: post-processing, so ε is unchanged.
        return self.strategy.server_step(server_round, arrays), metrics

    def privacy(self) -> dict[str, float]:
        """User-level ε, δ, noise multiplier, releases so far and the current clipping bound."""
        return {"user_epsilon": epsilon(self.plan, self.releases), "user_delta": self.plan.delta,
                "user_noise_multiplier": self.plan.noise_multiplier, "user_releases": self.releases,
                "user_sample_rate": self.plan.sample_rate, "user_clipping_norm": float(self.dp.clipping_norm)}


def with_user_dp(strategy, cfg: Config):
    """`strategy` wrapped for user-level DP when dp.user.enabled, else `strategy` itself."""
    return UserDPStrategy(strategy, cfg) if cfg.dp.user.enabled else strategy
