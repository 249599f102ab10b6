"""Throwaway Redis Clusters on loopback, for the tests of the job store on a cluster: masters
sharing the 16384 slots in equal ranges, optionally each with a replica."""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path

import redis
from redis.crc import key_slot

from tests.conftest import answers, free_port, wait_until

SLOTS = 16384


def _per_master(masters: int) -> int:
    return -(-SLOTS // masters)


def master_of(name: str, masters: int) -> int:
    """Which of a `Cluster`'s masters holds the slot `name` hashes to (a key, or a channel: where
    a cluster client's subscription to it is connected)."""
    return key_slot(name.encode()) // _per_master(masters)


class Cluster:
    def __init__(self, root: Path, masters: int, replicas: bool = False) -> None:
        self.root = root
        self.masters = masters
        self.ports = [free_port() for _ in range(2 * masters if replicas else masters)]
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def urls(self) -> list[str]:
        return [f"redis://127.0.0.1:{port}/0" for port in self.ports]

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None
        for port in self.ports:
            workdir = self.root / str(port)
            workdir.mkdir()
            argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
            argv += ["--appendonly", "no", "--dir", str(workdir), "--cluster-enabled", "yes"]
            # The bus defaults to the port + 10000, past 65535 for much of the range free_port
            # draws from (the server then refuses to start): give it a port of its own.
            argv += ["--cluster-port", str(free_port()), "--cluster-node-timeout", "1000"]
            argv += ["--cluster-config-file", str(workdir / "nodes.conf")]
            log = (self.root / f"{port}.log").open("wb")
            self.procs.append(subprocess.Popen(argv, stdout=log, stderr=log))
        for client in map(self.client, self.ports):
            wait_until(functools.partial(answers, client), 10, "a cluster node")
        masters, replicas = self.ports[: self.masters], self.ports[self.masters :]
        for i, port in enumerate(masters):
            self.client(port).cluster("ADDSLOTSRANGE", *self._slots(i))
        first = self.client(masters[0])
        for port in self.ports[1:]:
            bus = int(str(self.client(port).config_get("cluster-port")["cluster-port"]))
            first.cluster("MEET", "127.0.0.1", port, bus)
        wait_until(
            lambda: all(len(self._nodes(p)) == len(self.ports) for p in self.ports),
            30,
            "the nodes to meet",
        )
        for master, replica in zip(masters, replicas, strict=False):
            self.client(replica).cluster("REPLICATE", self.client(master).cluster("MYID"))
        wait_until(self._healthy, 60, "the cluster, its replicas in sync")

    def _slots(self, master: int) -> tuple[int, int]:
        per = _per_master(self.masters)
        return master * per, min(SLOTS, (master + 1) * per) - 1

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=2)

    def _nodes(self, port: int) -> list[str]:
        raw = self.client(port).execute_command("CLUSTER", "NODES")  # type: ignore[no-untyped-call]
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        return [line for line in text.splitlines() if line]

    def _healthy(self) -> bool:
        for port in self.ports:
            if self.client(port).cluster("INFO")["cluster_state"] != "ok":
                return False
        return all(
            self.client(p).info("replication").get("master_link_status") == "up"
            for p in self.ports[self.masters :]
        )

    def promoted(self, dead: int) -> bool:
        """Whether every surviving node says the cluster is whole again without `dead`."""
        try:
            alive = [p for p in self.ports if p != dead]
            return all(self.client(p).cluster("INFO")["cluster_state"] == "ok" for p in alive)
        except redis.RedisError:
            return False

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
            proc.wait(timeout=10)
