"""A 3-node OpenBao cluster with integrated storage (raft) on loopback, for the HA tests.

``RaftCluster`` writes one config per node (``performance_multiplier = 1`` and short autopilot
intervals so it forms in seconds), starts every ``bao server``, initialises the first node with
one key share, unseals it, lets the others join through ``retry_join`` and unseals them, waits
until autopilot has promoted all of them to voters, then enables transit. A node that is killed
and started again comes back sealed; :meth:`RaftCluster.start_node` unseals it.

Use it as a context manager: every process it started is killed on exit, even on failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import hvac
import requests

from sidecar.devserver import find_bao, free_port

_T = TypeVar("_T")


def wait_for(condition: Callable[[], _T | None], what: str, timeout: float) -> _T:
    """Poll ``condition`` until it returns something truthy; connection errors count as no."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = condition()
        except (requests.RequestException, hvac.exceptions.VaultError):
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


class RaftNode:
    """One ``bao server`` of the cluster: its ports, directory and process."""

    def __init__(self, index: int, home: Path) -> None:
        self.index = index
        self.node_id = f"node{index}"
        self.api_port = free_port()
        self.cluster_port = free_port()
        self.address = f"http://127.0.0.1:{self.api_port}"
        self.home = home / self.node_id
        self.process: subprocess.Popen[bytes] | None = None

    def write_config(self, peers: list[RaftNode]) -> None:
        (self.home / "data").mkdir(parents=True, exist_ok=True)
        joins = "".join(
            f'  retry_join {{\n    leader_api_addr = "{peer.address}"\n  }}\n'
            for peer in peers
            if peer is not self
        )
        (self.home / "bao.hcl").write_text(
            f"""disable_mlock = true
log_level = "warn"
api_addr = "{self.address}"
cluster_addr = "http://127.0.0.1:{self.cluster_port}"
listener "tcp" {{
  address = "127.0.0.1:{self.api_port}"
  cluster_address = "127.0.0.1:{self.cluster_port}"
  tls_disable = true
}}
storage "raft" {{
  path = "{self.home / "data"}"
  node_id = "{self.node_id}"
  performance_multiplier = 1
  autopilot_reconcile_interval = "1s"
  autopilot_update_interval = "1s"
{joins}}}
"""
        )

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BAO_", "VAULT_"))}
        with open(self.home / "bao.log", "ab") as log:
            self.process = subprocess.Popen(
                [find_bao(), "server", f"-config={self.home / 'bao.hcl'}"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**env, "HOME": str(self.home)},
                cwd=self.home,
            )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """Kill the server at once (a crash), keeping its data."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        if self.process is not None:
            self.process.wait()

    def health(self) -> int:
        """``/v1/sys/health``'s status: 200 active, 429 standby, 503 sealed, 501 uninitialised."""
        return requests.get(f"{self.address}/v1/sys/health", timeout=2).status_code

    def log_tail(self) -> str:
        path = self.home / "bao.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


class RaftCluster:
    """``size`` OpenBao nodes forming one raft cluster, transit enabled at ``mount``."""

    def __init__(self, size: int = 3, *, mount: str = "transit") -> None:
        self._home = Path(tempfile.mkdtemp(prefix="kms-raft-"))
        self.nodes = [RaftNode(i, self._home) for i in range(size)]
        self.mount = mount
        self.root_token = ""
        self._unseal_key = ""

    @property
    def addresses(self) -> list[str]:
        return [node.address for node in self.nodes]

    def start(self, timeout: float = 60.0) -> RaftCluster:
        """Start, initialise, unseal and join every node; enable transit. Raises on failure."""
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            node.write_config(self.nodes)
            node.start()
        first = self.nodes[0]
        wait_for(lambda: first.health() == 501, "the first node to answer", timeout)
        init = requests.put(
            f"{first.address}/v1/sys/init",
            json={"secret_shares": 1, "secret_threshold": 1},
            timeout=30,
        )
        init.raise_for_status()
        self.root_token = init.json()["root_token"]
        self._unseal_key = init.json()["keys_base64"][0]
        self._unseal([first], deadline - time.monotonic())
        wait_for(lambda: first.health() == 200, "the first node to become active", timeout)
        self.client(0).adapter.post(
            "/v1/sys/storage/raft/autopilot/configuration",
            json={"server_stabilization_time": "1s"},
        )
        self._unseal(self.nodes[1:], deadline - time.monotonic())

        def all_voters() -> bool:
            state = self.client(0).adapter.get("/v1/sys/storage/raft/autopilot/state")["data"]
            return bool(state["healthy"]) and len(state.get("voters") or []) == len(self.nodes)

        wait_for(all_voters, "every node to become a voter", deadline - time.monotonic())
        self.client(0).sys.enable_secrets_engine("transit", path=self.mount)
        return self

    def create_key(self, name: str, timeout: float = 30.0) -> None:
        """Create transit key ``name`` and wait until every node has replicated it."""
        self.client().secrets.transit.create_key(name, mount_point=self.mount)
        for index in range(len(self.nodes)):
            wait_for(
                lambda i=index: self.client(i).secrets.transit.read_key(  # type: ignore[misc]
                    name, mount_point=self.mount
                ),
                f"key {name} on node {index}",
                timeout,
            )

    def client(self, index: int | None = None) -> hvac.Client:
        """An hvac client with the root token, for node ``index`` (default: the leader)."""
        if index is None:
            index = self.leader()
            if index is None:
                raise RuntimeError("the cluster has no active node")
        return hvac.Client(url=self.nodes[index].address, token=self.root_token, timeout=10)

    def leader(self) -> int | None:
        """The index of the active node, or None."""
        for node in self.nodes:
            try:
                if node.running and node.health() == 200:
                    return node.index
            except requests.RequestException:
                continue
        return None

    def wait_for_leader(self, timeout: float = 30.0) -> int:
        """The index of the active node, once there is one."""
        found = wait_for(
            lambda: None if (index := self.leader()) is None else (index,),
            "an active node",
            timeout,
        )
        return found[0]

    def kill(self, index: int) -> None:
        self.nodes[index].kill()

    def start_nodes(self, *indexes: int, timeout: float = 30.0) -> None:
        """Start killed nodes again and unseal them (a restarted node always comes back sealed)."""
        nodes = [self.nodes[i] for i in indexes]
        for node in nodes:
            if not node.running:
                node.start()
        self._unseal(nodes, timeout)

    def _unseal(self, nodes: list[RaftNode], timeout: float) -> None:
        """Offer the unseal key to each node until all are unsealed (joining ones take a while)."""
        sealed = list(nodes)

        def all_unsealed() -> bool:
            for node in list(sealed):
                if not node.running:
                    raise RuntimeError(f"{node.node_id} exited: {node.log_tail()}")
                try:
                    answer = requests.put(
                        f"{node.address}/v1/sys/unseal", json={"key": self._unseal_key}, timeout=5
                    )
                except requests.RequestException:
                    continue
                if answer.status_code == 200 and answer.json().get("sealed") is False:
                    sealed.remove(node)
            return not sealed

        wait_for(all_unsealed, ", ".join(n.node_id for n in nodes) + " to unseal", timeout)

    def stop(self) -> None:
        """Kill every node and remove the cluster's directory."""
        for node in self.nodes:
            node.kill()
        shutil.rmtree(self._home, ignore_errors=True)

    def __enter__(self) -> RaftCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
