"""LocalCluster: several local KRaft brokers as one cluster, for the tests of replication and of the broker."""

from __future__ import annotations

from pathlib import Path

from ops.broker import BrokerStatus, LocalBroker, _cluster_id, free_port, wait_gone, wait_ready


class LocalCluster:
    """N KRaft nodes on consecutive ports, each in <root>/node-<id>, all voters of one quorum."""

    def __init__(self, root: str | Path, size: int = 3, base_port: int | None = None, heap: str = "768m"):
        self.root = Path(root).resolve()
        ports = [base_port + i for i in range(size)] if base_port else [free_port() for _ in range(size)]
        self.nodes = [LocalBroker(self.root / f"node-{i + 1}", ports[i], node_id=i + 1, heap=heap) for i in range(size)]

    @property
    def bootstrap(self) -> str:
        return ",".join(n.bootstrap for n in self.nodes)

    def start(self, timeout_s: float = 120) -> list[BrokerStatus]:
        if not all((n.data_dir / "server.properties").exists() for n in self.nodes):
            voters = {n.node_id: free_port() for n in self.nodes}
            cid = _cluster_id()
            for n in self.nodes:
                n.configure(voters, cid, cluster_size=len(self.nodes))
        for n in self.nodes:
            n.launch()
        wait_ready(self.nodes, timeout_s)
        return [n.status() for n in self.nodes]

    def stop(self, timeout_s: float = 30) -> None:
        # all at once: stopped one by one, the last nodes wait out their timeout for a lost quorum
        pids = [pid for pid in (n.terminate() for n in self.nodes) if pid is not None]
        for pid in pids:
            wait_gone(pid, timeout_s)
