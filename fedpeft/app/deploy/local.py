"""A SuperLink and N SuperNodes on this machine, with TLS and SuperNode authentication, for trying deployment.

Every process is started by `ProcessGroup` and stopped by PID when the deployment closes (also on errors
and at interpreter exit). `FLWR_HOME` (Flower's CLI config and installed apps) lives in the deployment
folder, never in the user's home.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedpeft.app.deploy.certs import TlsFiles, make_tls_files
from fedpeft.app.deploy.keys import NodeKeys, make_node_keys
from fedpeft.app.deploy.processes import ProcessGroup, Started, free_port, wait_for_port
from fedpeft.env import OFFLINE_DEFAULTS

CONNECTION = "local"
HOST = "127.0.0.1"


class DeployError(RuntimeError):
    """A deployment step failed; the message names the step and where its log is."""


@dataclass
class Node:
    """One SuperNode this deployment started."""

    name: str
    client_id: int
    proc: Started
    keys: NodeKeys | None
    registered: bool


@dataclass
class LocalDeployment:
    """SuperLink + SuperNodes on loopback under `base`; use as a context manager so everything stops."""

    base: Path
    tls: bool = True
    auth: bool = True
    env: dict[str, str] = field(init=False)
    procs: ProcessGroup = field(init=False)
    nodes: list[Node] = field(default_factory=list)
    tls_files: TlsFiles | None = None
    port: int = 0
    superlink: Started | None = None

    def __post_init__(self) -> None:
        if self.auth and not self.tls:
            raise DeployError("SuperNode authentication needs TLS (Flower refuses --enable-supernode-auth without it)")
        self.base = Path(self.base).resolve()
        self.bin = Path(sys.executable).parent
        env = dict(os.environ)
        for k, v in OFFLINE_DEFAULTS.items():
            env.setdefault(k, v)
        env.update({
            # flower-superlink starts flower-superexec from PATH: it must be this environment's.
            "PATH": f"{self.bin}{os.pathsep}{env.get('PATH', '')}",
            "FLWR_HOME": str(self.base / "flwr-home"),
            # Offline: the app's dependencies are this environment; never `uv sync` them per run.
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FEDPEFT_CACHE": str(self.base / "cache"),
        })
        self.env = env
        self.procs = ProcessGroup(self.base / "logs", env)

    # ----- lifecycle ------------------------------------------------------------------------
    def __enter__(self) -> "LocalDeployment":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop every process started here (and their children) by PID."""
        self.procs.stop()

    @property
    def address(self) -> str:
        """The SuperLink's address (HOST:PORT)."""
        return f"{HOST}:{self.port}"

    def _tool(self, name: str) -> str:
        return str(self.bin / name)

    # ----- SuperLink ------------------------------------------------------------------------
    def start_superlink(self, timeout: float = 60.0) -> str:
        """Start the SuperLink (in-memory state) on a free port and write the `local` connection; return its address."""
        self.port = free_port()
        argv = [self._tool("flower-superlink"), "--database", ":flwr-in-memory:", "--host", HOST, "--port", str(self.port)]
        if self.tls:
            self.tls_files = make_tls_files(self.base / "tls")
            argv += ["--ssl-ca-certfile", str(self.tls_files.ca_cert), "--ssl-certfile", str(self.tls_files.server_cert),
                     "--ssl-keyfile", str(self.tls_files.server_key)]
        else:
            argv += ["--insecure"]
        if self.auth:
            argv += ["--enable-supernode-auth"]
        self.superlink = self.procs.start("superlink", argv, cwd=self.base)
        try:
            wait_for_port(HOST, self.port, timeout, self.superlink.proc)
        except (RuntimeError, TimeoutError) as err:
            raise DeployError(f"SuperLink did not start: {err} (log: {self.superlink.log})") from None
        self.write_connection()
        return self.address

    def write_connection(self) -> Path:
        """Write `$FLWR_HOME/config.toml` with a `[superlink.local]` entry for this SuperLink."""
        home = Path(self.env["FLWR_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]", f'address = "{self.address}"']
        lines.append(f'root-certificates = "{self.tls_files.ca_cert}"' if self.tls_files else "insecure = true")
        path = home / "config.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run a `flwr` CLI command against this deployment's FLWR_HOME."""
        return subprocess.run([self._tool("flwr"), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=self.base)

    # ----- SuperNodes -----------------------------------------------------------------------
    def register(self, keys: NodeKeys) -> None:
        """Register a node's public key with the SuperLink (`flwr supernode register`)."""
        r = self.flwr("supernode", "register", str(keys.public), CONNECTION)
        if r.returncode != 0:
            raise DeployError(f"flwr supernode register {keys.public} failed ({r.returncode}): {r.stdout}{r.stderr}")

    def start_node(self, client_id: int, data_file: Path | None = None, register: bool = True,
                   superlink: str | None = None, name: str | None = None, env: dict[str, str] | None = None) -> Node:
        """Start a SuperNode for `client_id` (its node config names its data file); with auth, make and
        (unless `register` is False) register its key pair first. `superlink` overrides the address
        the node dials (e.g. a relay); `env` adds to the node's environment (e.g. its own `FEDPEFT_CACHE`,
        as on a machine of its own)."""
        name = name or f"node-{client_id}"
        keys = None
        argv = [self._tool("flower-supernode"), "--superlink", superlink or self.address, "--port", str(free_port()),
                "--host", HOST]
        argv += ["--root-certificates", str(self.tls_files.ca_cert)] if self.tls_files else ["--insecure"]
        if self.auth:
            keys = make_node_keys(self.base / "keys" / name)
            if register:
                self.register(keys)
            argv += ["--auth-supernode-private-key", str(keys.private)]
        config = f"client-id={client_id}" + (f' data-file="{Path(data_file).resolve()}"' if data_file else "")
        argv += ["--node-config", config]
        proc = self.procs.start(name, argv, cwd=self.base, env={**self.env, **env} if env else None)
        node = Node(name, client_id, proc, keys, register and self.auth)
        self.nodes.append(node)
        return node

    def online_nodes(self) -> list[dict]:
        """The SuperLink's node list (`flwr supernode list --format json`), online nodes only."""
        r = self.flwr("supernode", "list", CONNECTION, "--format", "json")
        if r.returncode != 0:
            raise DeployError(f"flwr supernode list failed ({r.returncode}): {r.stdout}{r.stderr}")
        data = json.loads(r.stdout)
        return [n for n in data.get("nodes", []) if str(n.get("status", "")).lower() == "online"]

    def wait_online(self, count: int, timeout: float = 60.0) -> list[dict]:
        """Wait until `count` nodes are online; returns them."""
        deadline = time.monotonic() + timeout
        while True:
            online = self.online_nodes()
            if len(online) >= count or time.monotonic() > deadline:
                return online
            time.sleep(0.5)

    # ----- runs -----------------------------------------------------------------------------
    def run_app(self, app_dir: Path, run_config: dict[str, object], timeout: float = 1800.0) -> subprocess.CompletedProcess:
        """`flwr run APP local --stream` with the given run config; returns when the run has ended."""
        args = ["run", str(app_dir), CONNECTION, "--stream"]
        for k, v in run_config.items():
            args += ["--run-config", f"{k}={json.dumps(v)}"]
        self.procs.note_children()
        r = self.flwr(*args, timeout=timeout)
        (self.base / "logs" / "flwr-run.log").write_text(r.stdout + r.stderr)
        self.procs.note_children()
        return r
