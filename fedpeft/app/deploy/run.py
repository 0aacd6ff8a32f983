"""`fedpeft deploy`: a recipe's clients as real SuperNodes on this machine, one run, then everything stopped."""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedpeft.app.recipe import load
from fedpeft.app.deploy.local import DeployError, LocalDeployment
from fedpeft.app.deploy.shards import write_shards
from fedpeft.app.runconfig import APP_ROOT, NODE_WAIT_KEY, OVERRIDES_KEY, RECIPE_KEY


@dataclass
class DeployResult:
    """What a local deployment run produced and how its processes ended."""

    run_dir: Path | None
    returncode: int  # of `flwr run`
    node_exit: dict[str, int | None]  # SuperNode name -> exit code (None: was still running at the end)
    refused: list[str]  # unregistered nodes that the SuperLink refused (they exited on their own)
    online: int  # nodes online when the run was submitted
    pids: dict[int, int | None]  # every PID started or seen as a child -> its start time
    alive_after: list[int]  # of those, alive after stop (should be empty)
    log_dir: Path
    output: str  # `flwr run` output
    wire: dict = field(default_factory=dict)  # relay counts when run through the wire-check relay


def app_dir() -> Path:
    """The Flower app folder (`pyproject.toml` with `[tool.flwr.app]`) that `flwr run` submits."""
    if not (APP_ROOT / "pyproject.toml").is_file():
        raise DeployError(f"no pyproject.toml in {APP_ROOT}: `fedpeft deploy` needs a source checkout "
                          "(pip install -e .) so that `flwr run` can build the app")
    return APP_ROOT


def deploy_recipe(recipe: Path, overrides: list[str], base: Path, nodes: int | None = None, tls: bool = True,
                  auth: bool = True, unregistered: int = 0, timeout: float = 1800.0, relay: bool = False,
                  node_wait_s: float = 60.0) -> DeployResult:
    """Write per-node shards, start a SuperLink and SuperNodes, run the recipe with `flwr run`, stop everything."""
    recipe = Path(recipe).resolve()
    base = Path(base).resolve()
    runs = base / "runs"
    overrides = [*overrides, f"output.dir={runs}"]
    cfg = load(recipe, overrides)  # bad recipes fail here, before any process starts
    n = cfg.sim.num_clients if nodes is None else nodes
    if not 1 <= n <= cfg.sim.num_clients:
        raise DeployError(f"--nodes must be 1..sim.num_clients ({cfg.sim.num_clients}), got {n}")
    if unregistered and not auth:
        raise DeployError("unregistered nodes only make sense with SuperNode authentication on")
    shards = write_shards(cfg, base / "shards")
    app = app_dir()
    wire_relay = None
    with LocalDeployment(base, tls=tls, auth=auth) as dep:
        try:
            dep.start_superlink()
            dial = None
            if relay:
                from fedpeft.app.deploy.wirecheck import CountingRelay

                wire_relay = CountingRelay("127.0.0.1", dep.port).start()
                dial = wire_relay.address
            for cid in range(n):
                dep.start_node(cid, shards[cid], superlink=dial)
            rogues = [dep.start_node(n + j, shards[0], register=False, name=f"unregistered-{j}", superlink=dial)
                      for j in range(unregistered)]
            online = len(dep.wait_online(n, timeout=node_wait_s))
            for r in rogues:  # an unregistered node is refused at activation and exits
                _wait_exit(r.proc.proc, 60.0)
            before = set(runs.glob("*")) if runs.exists() else set()
            run_config = {RECIPE_KEY: str(recipe), OVERRIDES_KEY: shlex.join(overrides), NODE_WAIT_KEY: node_wait_s}
            r = dep.run_app(app, run_config, timeout=timeout)
            new = sorted(set(runs.glob("*")) - before) if runs.exists() else []
            node_exit = {nd.name: nd.proc.proc.poll() for nd in dep.nodes}
            refused = [nd.name for nd in dep.nodes if not nd.registered and auth and nd.proc.proc.poll() not in (None, 0)]
        finally:
            if wire_relay is not None:
                wire_relay.stop()
            dep.stop()
        wire = wire_relay.report() if wire_relay else {}
        if wire:
            (base / "wire.json").write_text(json.dumps(wire, indent=1))
        return DeployResult(
            run_dir=new[-1] if new else None, returncode=r.returncode, node_exit=node_exit, refused=refused,
            online=online, pids=dict(dep.procs.seen_pids), alive_after=dep.procs.alive(), log_dir=base / "logs",
            output=r.stdout + r.stderr, wire=wire,
        )


def _wait_exit(proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
