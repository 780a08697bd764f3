"""An embedded NATS cluster: three (or more) nats-servers with JetStream, routed to each other, so the
events stream can keep three replicas and lose a node without losing an acknowledged event.

Each node has its own file store (``<base>/n1``, ``n2``, ...), client port, cluster (route) port,
monitoring port and ``server_name``; the JetStream meta group and every replicated stream are Raft
groups over those names, so a node restarted with the same name, ports and store rejoins and catches
up from the others. ``sync_interval: always`` and ``max_payload: 8MB`` are those of the single node.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from meter_platform.runtime.servers import Server, free_port, nats_server_binary, spawn, wait_for_port

#: The cluster's name (every node's ``cluster { name }``).
CLUSTER_NAME = "meter"


@dataclass
class NatsNode:
    """One node: where it listens and stores; ``server`` while it runs."""

    name: str
    store_dir: Path
    host: str
    port: int
    cluster_port: int
    monitor_port: int
    routes: list[str] = field(default_factory=list)
    server: Server | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def config(self) -> str:
        """The node's nats-server configuration."""
        routes = ", ".join(f'"{route}"' for route in self.routes)
        return (
            f"server_name: {self.name}\n"
            f'listen: "{self.host}:{self.port}"\n'
            f'http: "{self.host}:{self.monitor_port}"\n'
            # Room for a whole 5 MiB request batch in one message (as the single node).
            "max_payload: 8MB\n"
            # fsync every write before the ack, on every replica.
            f'jetstream {{\n  store_dir: "{self.store_dir}"\n  sync_interval: always\n}}\n'
            f'cluster {{\n  name: {CLUSTER_NAME}\n  listen: "{self.host}:{self.cluster_port}"\n'
            f"  routes: [{routes}]\n}}\n"
        )

    def start(self) -> Server:
        """Start the node (again) on its ports and store; returns once it accepts clients."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        conf = self.store_dir / "nats-server.conf"
        conf.write_text(self.config())
        log = self.store_dir / "nats-server.log"
        proc = spawn([nats_server_binary(), "-c", str(conf)], log, signal.SIGTERM)
        try:
            wait_for_port(self.host, self.port, proc, f"nats-server {self.name}", log)
        except Exception:
            proc.kill()
            proc.wait()
            raise
        self.server = Server(f"nats-{self.name}", proc, self.url, log)
        return self.server

    def jsz(self) -> dict:
        """The node's JetStream report (monitoring endpoint ``/jsz``); empty when it does not answer."""
        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.monitor_port}/jsz", timeout=2) as resp:
                return json.loads(resp.read())
        except (OSError, ValueError):
            return {}


@dataclass
class NatsCluster:
    """The running nodes; :attr:`url` lists them all, as ``METER_NATS_URL`` accepts."""

    nodes: list[NatsNode]

    @property
    def url(self) -> str:
        return ",".join(node.url for node in self.nodes)

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def node(self, name: str) -> NatsNode:
        """The node called ``name`` (``n1``...)."""
        return next(node for node in self.nodes if node.name == name)

    def meta_leader(self) -> str | None:
        """The JetStream meta leader, once every node names the same one and the leader sees all current.

        Only the leader knows whether its followers are current (a follower reports the others as not).
        """
        metas = {node.name: node.jsz().get("meta_cluster") or {} for node in self.nodes}
        leaders = {str(meta.get("leader") or "") for meta in metas.values()}
        leader = leaders.pop() if len(leaders) == 1 else ""
        if not leader:
            return None
        meta = metas.get(leader) or {}
        replicas = meta.get("replicas") or []
        if meta.get("cluster_size") != len(self.nodes) or len(replicas) != len(self.nodes) - 1:
            return None
        return leader if all(r.get("current") for r in replicas) else None

    def wait_ready(self, timeout: float = 60) -> str:
        """Wait until the cluster has one meta leader and all nodes are current; the leader's name."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leader = self.meta_leader()
            if leader:
                return leader
            time.sleep(0.2)
        logs = "\n".join(f"{n.name}: {n.store_dir / 'nats-server.log'}" for n in self.nodes)
        raise RuntimeError(
            f"the NATS cluster elected no JetStream meta leader within {timeout:.0f}s; logs:\n{logs}"
        )

    def stop(self) -> None:
        """Stop every node (cleanly: each flushes its store)."""
        for node in self.nodes:
            if node.server is not None:
                node.server.stop()


def plan_cluster(base_dir: Path, nodes: int = 3, host: str = "127.0.0.1") -> NatsCluster:
    """Name the nodes and pick their ports (free now), each route listing the other nodes."""
    planned = [
        NatsNode(f"n{i}", base_dir / f"n{i}", host, free_port(host), free_port(host), free_port(host))
        for i in range(1, nodes + 1)
    ]
    for node in planned:
        node.routes = [f"nats-route://{host}:{o.cluster_port}" for o in planned if o is not node]
    return NatsCluster(planned)


def start_nats_cluster(
    base_dir: Path, nodes: int = 3, host: str = "127.0.0.1", timeout: float = 60
) -> NatsCluster:
    """Start ``nodes`` nats-servers as one JetStream cluster under ``base_dir`` (``n1``, ``n2``, ...).

    Returns once the cluster has a JetStream meta leader with every node current, so a stream with
    as many replicas as nodes can be created right away.
    """
    if nodes < 3:
        raise ValueError("a NATS cluster that survives losing a node needs at least 3 nodes")
    cluster = plan_cluster(base_dir, nodes, host)
    try:
        for node in cluster.nodes:
            node.start()
        cluster.wait_ready(timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster
