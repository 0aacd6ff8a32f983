"""User-level DP (DP-FedAvg, McMahan et al. 2018): Poisson client sampling, clipped updates, a fixed denominator.

The mechanism, per round:
1. Each known client is sampled independently with probability q = clients_per_round / num_clients
   (Poisson sampling; the draw is seeded in simulation, from OS entropy in deployment).
2. Each reply's update Δ_i (its tensors minus the global ones it was sent) is clipped to L2 norm C, on
   the server (`side = "server"`) or by Flower's clipping mod on the client (`side = "client"`; the
   server clips again, a no-op for an honest client, so a client cannot exceed C).
3. The release is global + (Σ_i Δ_i + N(0, σ²C²)) / m, with m = q·N the *expected* count, whatever
   number of replies arrived. Adding or removing one user moves the sum by at most C, so the noise
   per user never shrinks when clients fail, time out or are rejected (Flower's wrappers divide by
   the replies that arrived, which does).
4. ε is the Poisson-subsampled Gaussian mechanism at (σ, q) under add/remove adjacency, composed
   over every round the mechanism ran (Opacus's accountant; cross-checked against Google's
   `dp_accounting` in the tests).

Adaptive clipping (Andrew et al. 2019) follows the bound C towards the γ-quantile of update norms
from a noised count of *unclipped* updates. The indicators are centred (b_i − ½, sensitivity ½,
as in TF Privacy's quantile estimator), so the combination z = (z_Δ⁻² + (2σ_b)⁻²)^(−½) holds;
Flower 1.41 counts raw 0/1 bits with that formula, which overstates the combined noise.
Flower's primitives are used for clipping (`compute_clip_model_update`) and for the client mods.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.supercore import log
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT, get_norm

from fedpeft.config import Config, ConfigError
from fedpeft.privacy import accounting, distributed
from fedpeft.privacy.noise import noise_source, numpy_noise_rng
from fedpeft.records import reply_metrics
from fedpeft.secagg.updates import resolve_threshold

# Each clipped update enters the sum with weight 1 (the noise is calibrated to one user's C).
UNIFORM_KEY = "user-dp-weight"
SAMPLING = "poisson"
ADJACENCY = "add/remove one user"


@dataclass(frozen=True)
class UserPlan:
    """The user-level mechanism: total noise multiplier, client sampling rate, δ, expected clients per round."""

    noise_multiplier: float
    sample_rate: float
    delta: float
    accountant: str
    expected_clients: float


def plan(cfg: Config) -> UserPlan:
    """The run's user-level plan; the noise is dp.user.noise_multiplier or solved for dp.user.target_epsilon."""
    u = cfg.dp.user
    q = cfg.sim.clients_per_round / cfg.sim.num_clients
    delta = u.delta if u.delta is not None else 1.0 / (10 * cfg.sim.num_clients)
    nm = u.noise_multiplier
    if nm is None:
        nm = accounting.solve_noise(u.target_epsilon, delta, q, cfg.sim.rounds, u.accountant,
                                    "dp.user.target_epsilon", "raise dp.user.target_epsilon or lower sim.rounds")
    return UserPlan(noise_multiplier=nm, sample_rate=q, delta=delta, accountant=u.accountant,
                    expected_clients=q * cfg.sim.num_clients)


def epsilon(p: UserPlan, releases: int) -> float:
    """User-level ε at p.delta after `releases` rounds of the mechanism (Opacus's accountant; 0 before any)."""
    return accounting.epsilon(p.accountant, [[p.noise_multiplier, p.sample_rate, releases]] if releases else [], p.delta)


def adaptive_noise(noise_multiplier: float, expected_clients: float, count_stddev: float | None) -> tuple[float, float]:
    """(σ_b, z_Δ): the count's noise std and the update's noise multiplier whose combination is `noise_multiplier`.

    The centred count Σ(b_i − ½) has sensitivity ½, so it is a Gaussian mechanism with multiplier 2σ_b;
    two Gaussian mechanisms compose like one with z⁻² = z_Δ⁻² + (2σ_b)⁻².
    """
    sigma_b = count_stddev if count_stddev is not None else expected_clients / 20
    if noise_multiplier >= 2 * sigma_b:
        raise ValueError(f"the clipped-count noise σ_b = {sigma_b:g} must exceed noise_multiplier / 2 = "
                         f"{noise_multiplier / 2:g} (the count alone would spend more than the whole budget)")
    return sigma_b, (noise_multiplier ** -2 - (2 * sigma_b) ** -2) ** -0.5


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
            "calibrated to the sum of the clipped updates"
        )
    if u.side == "client" and (cfg.codecs.up or cfg.codecs.down):
        raise ConfigError(
            "dp.user.side = 'client' clips with Flower's client mod, which needs the dense adapter in both "
            "directions: remove codecs.up / codecs.down, or use dp.user.side = 'server' (clips the decoded updates)"
        )
    p = plan(cfg)
    if u.side == distributed.DISTRIBUTED:
        distributed.check_config(cfg, p.noise_multiplier, resolve_threshold(cfg.secagg, cfg.sim.clients_per_round))
    if p.delta >= 1.0 / cfg.sim.num_clients:
        raise ConfigError(
            f"dp.user.delta = {p.delta:g} is >= 1/sim.num_clients = {1.0 / cfg.sim.num_clients:g}; "
            "lower dp.user.delta or leave it unset"
        )
    if u.clipping == "adaptive":
        try:
            adaptive_noise(p.noise_multiplier, p.expected_clients, u.clipped_count_stddev)
        except ValueError as err:
            raise ConfigError(f"dp.user: adaptive clipping cannot reach noise multiplier {p.noise_multiplier:g}: "
                              f"{err} (raise dp.user.clipped_count_stddev)") from None


class UserLevelDP:
    """User-level DP as a hook of a strategy's pipeline: Poisson sampling, then clip, sum, noise, fixed denominator.

    Installed on a strategy (`with_user_dp`), it draws the round's clients (`sampler`), adds the
    clipping bound to what client-side clipping reads (`configure`), and takes the place of the
    strategy's `combine` (`aggregate`): the strategy still validates every reply first and takes its
    server step after. Its settings and ε are what the strategy reports (`report`).
    """

    def __init__(self, cfg: Config, simulated: bool = True) -> None:
        self.cfg = cfg
        self.plan = plan(cfg)
        self.source = noise_source(cfg, simulated)
        u = cfg.dp.user
        self.adaptive = u.clipping == "adaptive"
        if self.adaptive:
            self.count_stddev, self.update_multiplier = adaptive_noise(
                self.plan.noise_multiplier, self.plan.expected_clients, u.clipped_count_stddev)
        else:
            self.count_stddev, self.update_multiplier = 0.0, self.plan.noise_multiplier
        self.clipping_norm = float(u.clipping_norm)
        self.releases = 0
        self.keys: list[str] = []
        self.last_round: dict[str, float] = {}
        self.directory = None

    def install(self, strategy) -> None:
        """Make `strategy` sample by Poisson draws and weigh each clipped update alike."""
        self.directory = strategy.directory
        strategy.weighted_by_key = UNIFORM_KEY
        strategy.sampler = self._sample

    def _sample(self, server_round: int, online: list[int]) -> list[int]:
        # The draw must be secret for the amplification by sampling to hold: OS entropy outside simulation.
        gen = numpy_noise_rng(self.source, self.cfg.sim.seed, server_round, "user-dp-sample")
        return self.directory.sample_poisson(gen, self.plan.sample_rate, online)

    def state_dict(self) -> dict[str, np.ndarray]:
        """The releases so far and the (adaptive) clipping bound."""
        return {"user-dp/releases": np.asarray(self.releases),
                "user-dp/clipping-norm": np.asarray(self.clipping_norm, dtype=np.float64)}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore what `state_dict` returned."""
        self.releases = int(state["user-dp/releases"])
        self.clipping_norm = float(state["user-dp/clipping-norm"])

    def summary(self) -> None:
        """Log the mechanism's settings."""
        p = self.plan
        log(INFO, "user-level DP: %s client sampling at q = %.4g (expected %.4g per round), %s adjacency, "
            "%s clipping at C = %.4g (%s side), noise multiplier %.4g (update %.4g, clipped count σ_b %.4g), "
            "fixed denominator %.4g, δ = %g, %s noise", SAMPLING, p.sample_rate, p.expected_clients, ADJACENCY,
            self.cfg.dp.user.clipping, self.clipping_norm, self.cfg.dp.user.side, p.noise_multiplier,
            self.update_multiplier, self.count_stddev, p.expected_clients, p.delta, self.source)

    def configure(self, arrays: ArrayRecord, config: ConfigRecord) -> ConfigRecord:
        """The round's config, with the clipping bound Flower's client mods read when clients clip."""
        self.keys = list(arrays.keys())
        config = ConfigRecord(dict(config or {}))
        if self.cfg.dp.user.side == "client":
            config[KEY_CLIPPING_NORM] = self.clipping_norm
        return config

    def aggregate(self, strategy, server_round: int, valid: list[Message]) -> tuple[ArrayRecord | None, None]:
        """Clip each valid reply's update, sum, add N(0, σ²C²), divide by the expected count (before the server step)."""
        self._account(strategy)
        reference = strategy.global_arrays
        if not valid or reference is None:
            self.last_round = {}
            return None, None
        ref = [reference[k].numpy().astype(np.float64) for k in self.keys]
        total = [np.zeros_like(r) for r in ref]
        unclipped = 0
        bound = self.clipping_norm  # the bound this round's updates were clipped to (the noise must match it)
        for msg in valid:
            rec, sent = msg.content["arrays"], strategy.reference(msg.metadata.src_node_id)
            delta = [rec[k].numpy().astype(np.float64) - sent[k].numpy().astype(np.float64) for k in self.keys]
            norm = get_norm(delta)
            scale = min(1.0, bound / norm) if norm > 0 else 1.0
            if self.cfg.dp.user.side == "client":
                was_clipped = bool(reply_metrics(msg.content).get(KEY_NORM_BIT, False)) if self.adaptive else False
            else:
                was_clipped = scale < 1.0
            unclipped += 0 if was_clipped else 1
            for t, d in zip(total, delta):
                t += scale * d
        gen = numpy_noise_rng(self.source, self.cfg.sim.seed, server_round, "user-dp-noise")
        m = self.plan.expected_clients
        std_sum = self.update_multiplier * bound
        new = {}
        for k, r, t in zip(self.keys, ref, total):
            noised = (t + gen.normal(0.0, std_sum, size=t.shape)) / m
            new[k] = Array(np.asarray(r + noised, dtype=reference[k].numpy().dtype))
        self.last_round = {"user_replies": len(valid), "user_noise_std": std_sum / m,
                           "user_effective_noise_multiplier": std_sum / bound, "user_round_clipping_norm": bound}
        if self.adaptive:
            self._update_bound(unclipped, len(valid), gen)
        # A server optimizer acts on the noised mean: post-processing, so ε is unchanged.
        return ArrayRecord(new), None

    def _account(self, strategy) -> None:
        """Count a release: the mechanism runs every round clients were sampled, whatever arrives."""
        if strategy.sent:
            self.releases += 1
        else:
            strategy.failure = (f"Poisson client sampling (q = {self.plan.sample_rate:.4g}) drew no client "
                                "this round")

    def secure_mean(self, strategy, server_round: int, mean: dict[str, np.ndarray] | None,
                    count: int) -> dict[str, np.ndarray] | None:
        """Distributed DP: the secure mean of `count` noised, clipped updates (weight 1 each) over the fixed denominator."""
        self._account(strategy)
        if mean is None:
            self.last_round = {}
            return None
        m = self.plan.expected_clients
        bound = self.clipping_norm
        self.last_round = {"user_replies": count, "user_noise_std": self.update_multiplier * bound / m,
                           "user_effective_noise_multiplier": self.update_multiplier,
                           "user_round_clipping_norm": bound}
        # the decoded mean is Σ / count (every weight is 1): rescale it to Σ / m
        return {k: v * (count / m) for k, v in mean.items()}

    def _update_bound(self, unclipped: int, replies: int, gen: np.random.Generator) -> None:
        """C ← C·exp(−η(b̃ − γ)), b̃ the noised fraction of unclipped updates from centred indicators."""
        m = self.plan.expected_clients
        centred = unclipped - 0.5 * replies + gen.normal(0.0, self.count_stddev)
        fraction = centred / m + 0.5
        u = self.cfg.dp.user
        self.clipping_norm *= math.exp(-u.clip_norm_lr * (fraction - u.target_quantile))
        self.last_round["user_unclipped_fraction_noised"] = fraction

    def report(self) -> dict[str, Any]:
        """User-level ε, δ, noise multiplier, sampling, releases so far, this round's noise and the clipping bound."""
        return {"user_epsilon": epsilon(self.plan, self.releases), "user_delta": self.plan.delta,
                "user_noise_multiplier": self.plan.noise_multiplier, "user_releases": self.releases,
                "user_sample_rate": self.plan.sample_rate, "user_clipping_norm": self.clipping_norm,
                "user_sampling": SAMPLING, "user_adjacency": ADJACENCY, "user_noise_source": self.source,
                **self.last_round}


def with_user_dp(strategy, cfg: Config, simulated: bool = True):
    """`strategy` with user-level DP installed in its pipeline when dp.user.enabled; returns `strategy`."""
    if cfg.dp.user.enabled:
        strategy.install(UserLevelDP(cfg, simulated))
    return strategy
