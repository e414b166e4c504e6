"""A throwaway redis-server on a loopback port in a temporary folder, for tests (started and stopped here).

If ``redis-server`` is not installed the tests that need it are skipped with the reason, unless
``KV_RAG_REQUIRE_REDIS=1`` (set by ``.ci/run``), where a missing server fails them instead.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process; :meth:`stop` kills it, :meth:`start` brings it back on the same port."""

    def __init__(self, binary: str, directory: Path, extra: tuple[str, ...] = ()) -> None:
        self.binary = binary
        self.directory = directory
        #: more server arguments (a cluster node's)
        self.extra = extra
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server and wait until it answers PING."""
        import redis

        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.time() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        """Kill the server (SIGKILL: as if it crashed) and wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def flush(self) -> None:
        """Empty the database."""
        import redis

        redis.Redis(port=self.port).flushall()


def start_cluster(binary: str, directory: Path, nodes: int = 3, extra: tuple[str, ...] = ()) -> list[RedisServer]:
    """Start ``nodes`` cluster-enabled redis-server processes on loopback, each serving an equal share of
    the 16384 hash slots, and wait until every node sees the others and reports ``cluster_state:ok``.

    ``extra``: more arguments for every node (``--maxmemory``, say). Each node keeps its files in a
    folder of its own under ``directory``. On failure the nodes started so far are stopped; on success
    the caller stops them (:meth:`RedisServer.stop`).
    """
    import redis

    servers = []
    for i in range(nodes):
        d = directory / f"node{i}"
        d.mkdir(parents=True, exist_ok=True)
        args = ("--cluster-enabled", "yes", "--cluster-config-file", str(d / "nodes.conf"))
        args += ("--cluster-node-timeout", "1000", "--cluster-port", str(_free_port()))  # bus port < 65536
        servers.append(RedisServer(binary, d, args + extra))
    try:
        for server in servers:
            server.start()
        clients = [redis.Redis(port=s.port) for s in servers]
        step = 16384 // nodes
        for i, c in enumerate(clients):
            c.execute_command("CLUSTER", "ADDSLOTSRANGE", i * step, 16383 if i == nodes - 1 else (i + 1) * step - 1)
        for s in servers[1:]:
            bus = int(s.extra[s.extra.index("--cluster-port") + 1])
            clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", s.port, bus)
        deadline = time.time() + 30
        while not all(c.cluster("info")["cluster_state"] == "ok" and len(c.cluster("nodes")) == nodes for c in clients):
            if time.time() > deadline:
                raise RuntimeError("the Redis cluster did not come up")
            time.sleep(0.1)
        for c in clients:
            c.close()
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


def redis_binary() -> str | None:
    """Path of redis-server, or None."""
    return shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A running redis-server for this test module (emptied by each test that needs it empty)."""
    binary = redis_binary()
    if binary is None:
        if os.environ.get("KV_RAG_REQUIRE_REDIS") == "1":
            pytest.fail("redis-server is required (KV_RAG_REQUIRE_REDIS=1) but not installed")
        pytest.skip("redis-server is not installed: apt-get install -y redis-server (.ci/run does this)")
    try:
        import redis  # noqa: F401
    except ImportError:
        pytest.skip("the redis client is not installed: pip install 'kv-rag[redis]' (make dev does this)")
    server = RedisServer(binary, tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
