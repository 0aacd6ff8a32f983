"""What every fedpeft strategy shares: seeded client sampling, reply validation, a global adapter.

A round on the server: `configure_train` (what each sampled client is sent) → `accept` (validate
and decode each reply) → `combine` (the aggregate of the accepted client tensors: the weighted
mean, or the `codecs.merge` rule, or a method's own rule) → `server_step` (the new global from
that aggregate; FedAvg takes it as is, server optimizers step towards it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log
from pydantic import BaseModel

from fedpeft.adapters import adapter_state, load_adapter_state
from fedpeft.codecs import PayloadError
from fedpeft.codecs.endpoints import CODEC_RECORD, Codecs, DecodedUpdate, numpy_state, to_record
from fedpeft.codecs.merge import merge_updates
from fedpeft.config import Config
from fedpeft.nodes import NodeDirectory
from fedpeft.privacy import ledger
from fedpeft.records import ARRAYS, NUM_EXAMPLES, SERVER_ROUND, num_examples, reply_metrics
from fedpeft.seeding import derive_seed
from fedpeft.methods.contract import FIRST_ORDER, TrainerKind
from strategies.registry import Capabilities, NoOptions
from strategies.strategy_utils import check_arrays, check_metrics, required_replies

if TYPE_CHECKING:
    from peft import PeftModel

    from fedpeft.ledger import CommLedger


RELEASE_STATE = "user-dp/"  # the prefix of a release mechanism's keys in the server state


class ReleaseMechanism(Protocol):
    """A privacy mechanism in the base pipeline (`fedpeft.privacy.user_level.UserLevelDP`): it samples, adds to
    the config, aggregates in place of `combine`, keeps state under RELEASE_STATE and reports its figures."""

    def install(self, strategy: "AdapterStrategy") -> None:
        """Set the strategy's sampler and weighting."""

    def configure(self, arrays: ArrayRecord, config: ConfigRecord) -> ConfigRecord:
        """This round's config record, with what the mechanism's clients need."""

    def aggregate(self, strategy: "AdapterStrategy", server_round: int,
                  valid: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The release from the valid replies (before the server step), or None."""

    def secure_mean(self, strategy: "AdapterStrategy", server_round: int, mean: dict[str, np.ndarray] | None,
                    count: int) -> dict[str, np.ndarray] | None:
        """Under `[secagg]`: the release from the decoded mean of `count` updates the clients noised (or None)."""

    def state_dict(self) -> dict[str, np.ndarray]:
        """The mechanism's state, keys prefixed by RELEASE_STATE."""

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore what `state_dict` returned."""

    def summary(self) -> None:
        """Log its settings."""

    def report(self) -> dict[str, Any]:
        """Its figures for the round's metrics row and the run summary (e.g. user-level ε)."""


@dataclass(frozen=True)
class Rejection:
    """A reply that was not aggregated, and why."""

    round: int
    client_id: int
    reason: str


class AdapterStrategy(FedAvg):
    """Base for methods whose global state is a set of adapter tensors.

    Sampling is drawn from (run seed, round), so the same seed samples the same clients. Each
    reply is validated before aggregation; a rejected reply is logged with its reason and never
    touches the global adapter.
    """

    # Set by `strategies.registry.register` from the method's one registration.
    Options: type[BaseModel] = NoOptions
    client_trainer: TrainerKind = FIRST_ORDER
    capabilities = Capabilities()
    method_name = ""

    def __init__(self, cfg: Config, directory: NodeDirectory, model: "PeftModel", workdir: Path | None = None) -> None:
        super().__init__(fraction_evaluate=0.0, weighted_by_key=NUM_EXAMPLES, min_train_nodes=1, min_available_nodes=1)
        self.cfg = cfg
        self.options = self.Options.model_validate(cfg.method.options())
        self.directory = directory
        self.workdir = workdir
        self.prepare_model(model)
        self.initial_state = {k: v for k, v in adapter_state(model).items() if self.exchanged(k)}
        self.template = {k: (tuple(v.shape), str(v.numpy().dtype)) for k, v in self.initial_state.items()}
        # What a reply carries: the sent tensors its clients send back (all of them unless `uploaded` excludes some).
        self.upload_template = {k: v for k, v in self.template.items() if self.uploaded(k)}
        self.rejections: list[Rejection] = []
        self.sent: dict[int, ArrayRecord] = {}
        self.codecs = Codecs(cfg.codecs, cfg.sim.seed) if cfg.codecs.active else None
        self.decoded: dict[int, DecodedUpdate] = {}
        self.client_metrics: list[tuple[int, dict]] = []
        self.global_arrays: ArrayRecord | None = None  # what this round's clients start from
        self.example_limits: dict[int, int] = {}  # client id -> its example count, where the server knows it
        self.failure: str | None = None  # why the last round failed (sim.min_replies), or None
        # (round, online node ids) -> sampled node ids; a privacy mechanism installs its own (user-level DP: Poisson)
        self.sampler: Callable[[int, list[int]], list[int]] | None = None
        self.release: ReleaseMechanism | None = None  # replaces `combine` when installed (user-level DP)

    def install(self, mechanism: "ReleaseMechanism") -> None:
        """Put a release mechanism (user-level DP) into this strategy's pipeline: sampling, config, aggregate."""
        mechanism.install(self)
        self.release = mechanism

    # ----- what the method changes about models and configs --------------------------------
    @classmethod
    def validate_config(cls, cfg: Config) -> None:
        """Refuse (ConfigError) or complete a config for this method; called when a recipe is loaded."""

    @classmethod
    def prepare_model(cls, model: "PeftModel") -> None:
        """Adjust a freshly built model for this method, identically on the server and every client."""

    @classmethod
    def exchanged(cls, key: str) -> bool:
        """Whether the adapter tensor named `key` travels to clients (all do, unless the method keeps some fixed)."""
        return True

    @classmethod
    def uploaded(cls, key: str) -> bool:
        """Whether the adapter tensor named `key` also travels back in every reply (by default: what is exchanged)."""
        return cls.exchanged(key)

    # ----- what the server loop uses ------------------------------------------------------
    def initial_arrays(self) -> ArrayRecord:
        """The first global record sent to clients (the freshly initialized adapter)."""
        return ArrayRecord({k: v.contiguous() for k, v in self.initial_state.items()})

    def load_global(self, model: "PeftModel", arrays: ArrayRecord) -> None:
        """Put the current global model into `model` (the server's copy) for evaluation and export."""
        load_adapter_state(model, arrays.to_torch_state_dict(), keys=set(self.template))

    def export(self, model: "PeftModel", rundir) -> None:
        """Write the final global model into the run directory (the adapter, in peft format)."""
        rundir.save_adapter(model, rundir.adapter_dir)

    def pop_client_metrics(self) -> list[tuple[int, dict]]:
        """(client id, reply metrics) of each accepted reply since the last call (e.g. per-client ε)."""
        out, self.client_metrics = self.client_metrics, []
        return out

    def round_metrics(self, server_round: int, ledger: "CommLedger") -> dict[str, Any]:
        """Method-specific entries for this round's metrics row (e.g. per-tier bytes); none by default."""
        return {}

    def run_metrics(self, ledger: "CommLedger", rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Method-specific entries for the run summary; none by default."""
        return {}

    def report(self, server_round: int, ledger: "CommLedger") -> dict[str, Any]:
        """Everything this strategy adds to a round's metrics row: the method's entries and its mechanism's."""
        return {**self.round_metrics(server_round, ledger), **(self.release.report() if self.release else {})}

    def run_report(self, ledger: "CommLedger", rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Everything this strategy adds to the run summary: the method's entries and its mechanism's."""
        return {**self.run_metrics(ledger, rows), **(self.release.report() if self.release else {})}

    def server_state(self) -> dict[str, np.ndarray]:
        """The whole server state a resumed run restores: the method's and its mechanism's."""
        return {**self.state_dict(), **(self.release.state_dict() if self.release else {})}

    def load_server_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore what `server_state` returned."""
        own = {k: v for k, v in state.items() if not k.startswith(RELEASE_STATE)}
        self.load_state_dict(own)
        if self.release is not None:
            self.release.load_state_dict({k: v for k, v in state.items() if k.startswith(RELEASE_STATE)})

    def state_dict(self) -> dict[str, np.ndarray]:
        """Server state beyond the global adapter that a resumed run must restore (optimizer moments…)."""
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore what `state_dict` returned."""

    def pop_rejections(self) -> list[Rejection]:
        """Rejections since the last call."""
        out, self.rejections = self.rejections, []
        return out

    # ----- Flower strategy hooks ------------------------------------------------------------
    def summary(self) -> None:
        """Log the mechanism (if any), then the method and its options."""
        if self.release is not None:
            self.release.summary()
        log(INFO, "fedpeft method '%s' with options %s", self.method_name, self.options)

    def sample(self, server_round: int, grid) -> list[int]:
        """Node ids of this round's clients: a seeded fixed-size draw, or the installed `sampler`'s."""
        if self.sampler is not None:
            return self.sampler(server_round, list(grid.get_node_ids()))
        return self.directory.sample(self.cfg.sim.seed, server_round, self.cfg.sim.clients_per_round, grid.get_node_ids())

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid
    ) -> Iterable[Message]:
        """Send the global adapter and the round number to this round's sampled clients."""
        nodes = self.sample(server_round, grid)
        self.global_arrays = arrays
        if self.release is not None:  # e.g. the clipping bound client-side clipping reads
            config = self.release.configure(arrays, config)
        config = ConfigRecord({**dict(config or {}), SERVER_ROUND: server_round})
        extra = self.extra_records(server_round)
        if self.codecs is not None and self.codecs.down is not None:
            coded, dense = self.codecs.encode_download(arrays, server_round)
            self.sent = dict.fromkeys(nodes, dense)
            record = RecordDict({CODEC_RECORD: coded, "config": config, **extra})
        else:
            self.sent = dict.fromkeys(nodes, arrays)
            record = RecordDict({ARRAYS: arrays, "config": config, **extra})
        return self._construct_messages(record, nodes, MessageType.TRAIN)

    def extra_records(self, server_round: int) -> dict[str, ArrayRecord | ConfigRecord]:
        """Records a method sends every client besides the adapter and the config (e.g. SCAFFOLD's variate)."""
        return {}

    def reference(self, node_id: int) -> ArrayRecord:
        """The dense adapter tensors this round sent to `node_id` (what a client's update is relative to).

        A method that sends different tensors to different clients fills `self.sent` per node.
        """
        return self.sent[node_id]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """accept → combine (or the installed mechanism's aggregate) → server step; None keeps the global unchanged."""
        valid = self.accept(server_round, replies)
        if self.release is not None:
            aggregate, metrics = self.release.aggregate(self, server_round, valid)
        elif not valid:
            return None, None
        else:
            aggregate, metrics = self.combine(server_round, valid)
        return (self.server_step(server_round, aggregate) if aggregate is not None else None), metrics

    def aggregate_secure(self, server_round: int, mean_update: dict[str, np.ndarray] | None, count: int,
                         failure: str | None) -> ArrayRecord | None:
        """Global + the securely aggregated weighted mean update → server step; None keeps the global unchanged.

        Under `[secagg]` this replaces accept → combine: the strategy gets the decoded mean of the
        clients' updates (`count` of them), never one client's own. `failure` is why the protocol stopped.
        """
        self.decoded, self.failure = {}, failure
        if self.release is not None:  # distributed DP: the clients noised their updates, the mechanism scales
            mean_update = self.release.secure_mean(self, server_round, None if failure else mean_update, count)
        sampled = len(self.sent) or self.cfg.sim.clients_per_round
        need = required_replies(self.cfg.sim.min_replies, sampled)
        if failure is None and count < need:
            self.failure = (f"{count} updates in the secure sum of {sampled} sampled clients; "
                            f"sim.min_replies needs {need}")
        if self.failure is not None or mean_update is None or self.global_arrays is None:
            log(WARNING, "round %d failed: %s; the global model is unchanged", server_round, self.failure)
            return None
        out = {}
        for k in self.global_arrays.keys():
            base = self.global_arrays[k].numpy()
            # tensors sent but not uploaded (none for a method that supports secagg) stay as they were
            out[k] = Array((base.astype(np.float64) + mean_update[k]).astype(base.dtype)) if k in mean_update \
                else self.global_arrays[k]
        return self.server_step(server_round, ArrayRecord(out))

    def server_step(self, server_round: int, aggregate: ArrayRecord) -> ArrayRecord:
        """The new global adapter from the round's aggregate (FedAvg: the aggregate itself)."""
        return aggregate

    def combine(self, server_round: int, valid: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate replies that passed validation: Flower's example-weighted FedAvg, or the `codecs.merge` rule."""
        if self.codecs is None or self.codecs.cfg.merge == "mean":
            return FedAvg.aggregate_train(self, server_round, valid)
        return self.merge(server_round, valid)

    def merge(self, server_round: int, valid: list[Message]) -> tuple[ArrayRecord, MetricRecord | None]:
        """Global + the clients' updates combined by `codecs.merge` (sparse mean or a peft merge)."""
        nodes = [m.metadata.src_node_id for m in valid]
        reference = numpy_state(self.reference(nodes[0]))
        updates, supports = [], []
        for node, msg in zip(nodes, valid):
            if node in self.decoded:
                updates.append(self.decoded[node].update)
                supports.append(self.decoded[node].support)
            else:  # a dense upload: the update is what changed
                updates.append({k: msg.content[ARRAYS][k].numpy() - v for k, v in reference.items()})
                supports.append(dict.fromkeys(reference))
        contents = [m.content for m in valid]
        weights = [num_examples(c) for c in contents]
        cfg = self.codecs.cfg
        merged = merge_updates(cfg.merge, updates, supports, weights, cfg.merge_density,
                               derive_seed(self.cfg.sim.seed, server_round))
        arrays = to_record({k: reference[k] + merged[k] for k in reference}, reference)
        return arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)

    # ----- validation ---------------------------------------------------------------------
    def accept(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """The replies that pass validation; the others are recorded as rejections.

        Fewer valid replies than `sim.min_replies` asks of the round's sampled clients: the round
        fails (`self.failure` says why) and nothing is accepted, so the global model is unchanged.

        `client_metrics` gets every accepted reply's metrics, plus those of each rejected or
        round-failed reply that carries ε (its client trained and spent it all the same), each
        tagged with its privacy-ledger status.
        """
        valid, metrics, unused = [], [], []
        self.decoded = {}
        self.failure = None
        for msg in replies:
            client = self.directory.client_of(msg.metadata.src_node_id)
            reason = f"client failed: {msg.error.reason}" if msg.has_error() else self.decode(server_round, msg, client)
            reason = reason or self.check_reply(msg.content, client)
            if reason is None:
                valid.append(msg)
                metrics.append((client, {**reply_metrics(msg.content), ledger.STATUS: ledger.ACCEPTED}))
                continue
            self.rejections.append(Rejection(server_round, client, reason))
            log(WARNING, "round %d: rejected reply from client %d: %s", server_round, client, reason)
            if not msg.has_error() and (dp := ledger.spent(msg.content, ledger.REJECTED)) is not None:
                unused.append((client, dp))
        sampled = len(self.sent) or self.cfg.sim.clients_per_round
        need = required_replies(self.cfg.sim.min_replies, sampled)
        if len(valid) < need:
            self.failure = f"{len(valid)} valid replies of {sampled} sampled clients; sim.min_replies needs {need}"
            log(WARNING, "round %d failed: %s; the global model is unchanged", server_round, self.failure)
            self.decoded = {}
            self.client_metrics.extend([(c, {**m, ledger.STATUS: ledger.ROUND_FAILED}) for c, m in metrics
                                        if "epsilon" in m] + unused)
            return []
        self.client_metrics.extend(metrics + unused)
        return valid

    def decode(self, server_round: int, msg: Message, client: int) -> str | None:
        """Turn a coded upload into the dense `arrays` record in place; why it cannot be, or None."""
        if self.codecs is None or self.codecs.up is None:
            return None
        node = msg.metadata.src_node_id
        if node not in self.sent:
            return f"node {node} was not sent anything this round"
        try:
            decoded = self.codecs.decode_upload(msg.content, self.reference(node), client, server_round)
        except PayloadError as err:
            return f"malformed payload: {err}"
        rest = {name: rec for name, rec in msg.content.items() if name != CODEC_RECORD}
        msg.content = RecordDict({ARRAYS: decoded.arrays, **rest})
        self.decoded[node] = decoded
        return None

    def reply_templates(self) -> dict[str, dict[str, tuple[tuple[int, ...], str]]]:
        """The array records a reply must carry and the (shape, dtype) of every tensor in each."""
        return {ARRAYS: self.upload_template}

    def check_reply(self, content: RecordDict, client: int = -1) -> str | None:
        """Why client `client`'s reply cannot be aggregated, or None if it is fine."""
        reason = check_metrics(content, self.example_limits.get(client))
        if reason:
            return reason
        templates = self.reply_templates()
        if set(content.array_records) != set(templates):
            return f"expected array records {sorted(templates)}, got {sorted(content.array_records)}"
        for name, template in templates.items():
            reason = check_arrays(content[name], template)
            if reason:
                return reason if name == ARRAYS else f"record '{name}': {reason}"
        return None
