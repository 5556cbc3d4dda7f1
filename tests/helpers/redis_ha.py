"""Highly available Redis deployments started by the tests on loopback (docs/redis.md):
a three-primary Cluster, and a primary, a replica and three sentinels.

Every process is a real ``redis-server`` on a free 127.0.0.1 port, in its own directory,
killed when its context ends. Without ``redis-server`` (or ``redis-cli`` for the Cluster) the
test is skipped, except under ``CI=true`` (tests/conftest.py, ``redis_missing``).
"""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

from tests.conftest import redis_missing
from tests.helpers.timing import MS

START_TIMEOUT = 10_000 * MS


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cluster_port() -> int:
    """A free port P for a cluster node whose bus port P + 10000 is free too (a node refuses
    a port above 55535)."""
    for _ in range(200):
        port = random.randrange(20_000, 45_000)
        try:
            for candidate in (port, port + 10_000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """A private CA and a server certificate for 127.0.0.1 signed by it (PEM files)."""

    ca: Path
    cert: Path
    key: Path


def make_tls_files(directory: Path) -> TlsFiles:
    openssl = shutil.which("openssl")
    if openssl is None:
        redis_missing("openssl not found on PATH; the TLS test makes its certificates with it")
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    ca_key, csr, ext = directory / "ca.key", directory / "server.csr", directory / "san.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=30)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out",
        str(files.ca), "-days", "1", "-subj", "/CN=xon test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(files.key), "-out", str(csr),
        "-subj", "/CN=127.0.0.1")
    run("x509", "-req", "-in", str(csr), "-CA", str(files.ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-out", str(files.cert), "-days", "1", "-extfile", str(ext))
    return files


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        redis_missing(f"{name} not found on PATH; install redis (7.0+) to run this test")
    return path


@dataclass(slots=True)
class Server:
    """One redis-server (data node or sentinel)."""

    port: int
    proc: subprocess.Popen[bytes]
    args: list[str]
    data_dir: Path
    tls: TlsFiles | None = None

    def kill(self) -> None:
        """``kill -9``: no shutdown, no last save."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    password: str = ""

    def restarted(self) -> Server:
        """The same server started again on its port and directory (its AOF)."""
        return _start(self.args, self.port, self.data_dir, password=self.password, tls=self.tls)

    def client(self, password: str = "") -> redis.Redis:
        tls: dict[str, object] = {}
        if self.tls is not None:
            tls = {"ssl": True, "ssl_ca_certs": str(self.tls.ca)}
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            socket_timeout=1000 * MS,
            username="relay" if password else None,
            password=password or None,
            **tls,  # type: ignore[arg-type]
        )


def _start(
    args: list[str], port: int, data_dir: Path, *, password: str = "", tls: TlsFiles | None = None
) -> Server:
    data_dir.mkdir(parents=True, exist_ok=True)
    log = open(data_dir / "server.log", "ab")  # noqa: SIM115 - the process owns it
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=data_dir)
    log.close()
    server = Server(port, proc, args, data_dir, tls, password)
    client = server.client(password)
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while True:
            if proc.poll() is not None:
                tail = (data_dir / "server.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server on {port} exited: {tail}")
            try:
                client.ping()
                return server
            except redis.RedisError:
                if time.monotonic() > deadline:
                    server.kill()
                    raise RuntimeError(f"redis-server on {port} did not answer") from None
                time.sleep(10 * MS)
    finally:
        client.close()


def _data_args(port: int, data_dir: Path) -> list[str]:
    return [
        _binary("redis-server"),
        "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
        "--save", "", "--appendonly", "yes", "--appendfsync", "always",
        "--protected-mode", "no",
    ]  # fmt: skip


def _wait(check: object, what: str, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(20 * MS)


@dataclass(slots=True)
class Cluster:
    nodes: list[Server] = field(default_factory=list)
    password: str = ""
    tls: TlsFiles | None = None

    @property
    def url(self) -> str:
        auth = f"relay:{self.password}@" if self.password else ""
        scheme = "rediss" if self.tls else "redis"
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)
        query = f"?ssl_ca_certs={self.tls.ca}" if self.tls else ""
        return f"{scheme}+cluster://{auth}{hosts}{query}"


@contextlib.contextmanager
def running_cluster(
    root: Path, primaries: int = 3, *, password: str = "", tls: TlsFiles | None = None
) -> Iterator[Cluster]:
    """A Redis Cluster of ``primaries`` primaries (no replicas), every slot assigned; with
    ``password``, the default user is off and the ACL user ``relay`` has that password; with
    ``tls``, clients and the cluster bus speak TLS only."""
    cli = _binary("redis-cli")
    cluster = Cluster(password=password, tls=tls)
    auth: list[str] = ["--user", "relay", "--pass", password] if password else []
    if tls is not None:
        auth += ["--tls", "--cacert", str(tls.ca)]
    try:
        for i in range(primaries):
            port = cluster_port()
            data = root / f"node{i}"
            args = _data_args(port, data)
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            args += ["--cluster-node-timeout", "2000"]
            if tls is not None:
                args += ["--port", "0", "--tls-port", str(port), "--tls-cluster", "yes"]
                args += ["--tls-replication", "yes", "--tls-auth-clients", "no"]
                args += ["--tls-cert-file", str(tls.cert), "--tls-key-file", str(tls.key)]
                args += ["--tls-ca-cert-file", str(tls.ca)]
            if password:
                args += ["--user", "relay", "on", f">{password}", "~*", "&*", "+@all"]
                args += ["--user", "default", "off"]
                args += ["--masteruser", "relay", "--masterauth", password]
            cluster.nodes.append(_start(args, port, data, password=password, tls=tls))
        hosts = [f"127.0.0.1:{n.port}" for n in cluster.nodes]
        subprocess.run(
            [cli, *auth, "--cluster", "create", *hosts, "--cluster-replicas", "0",
             "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=START_TIMEOUT,
        )

        def ready() -> bool:
            for node in cluster.nodes:
                client = node.client(password)
                try:
                    info = client.execute_command("CLUSTER INFO")
                finally:
                    client.close()
                state = info.get("cluster_state") if isinstance(info, dict) else None
                if state not in ("ok", b"ok"):
                    return False
            return True

        _wait(ready, "cluster_state:ok on every node")
        yield cluster
    finally:
        for node in cluster.nodes:
            node.kill()


@dataclass(slots=True)
class SentinelSet:
    """A primary, its replica and three sentinels watching them as ``service``."""

    root: Path
    service: str = "relaymaster"
    password: str = ""
    data: list[Server] = field(default_factory=list)
    sentinels: list[Server] = field(default_factory=list)

    @property
    def url(self) -> str:
        auth = f"relay:{self.password}@" if self.password else ""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{auth}{hosts}/{self.service}/0"

    def primary_port(self) -> int | None:
        """The primary the sentinels name now (the first one that answers)."""
        for sentinel in self.sentinels:
            if sentinel.proc.poll() is not None:
                continue
            client = sentinel.client()
            try:
                reply = client.execute_command(
                    "SENTINEL", "get-master-addr-by-name", self.service
                )
            except redis.RedisError:
                continue
            finally:
                client.close()
            if reply:
                return int(reply[1])
        return None


@contextlib.contextmanager
def running_sentinels(
    root: Path, *, down_after_ms: int = 1000, failover_timeout_ms: int = 3000, password: str = ""
) -> Iterator[SentinelSet]:
    """One primary, one replica (in sync before this yields) and three sentinels (quorum 2)
    that have seen both; small ``down-after-milliseconds`` so a failover takes seconds. With
    ``password``, the data servers' default user is off and the ACL user ``relay`` has it."""
    setup = SentinelSet(root, password=password)
    acl: list[str] = []
    if password:
        acl = ["--user", "relay", "on", f">{password}", "~*", "&*", "+@all"]
        acl += ["--user", "default", "off", "--masteruser", "relay", "--masterauth", password]
    try:
        primary_port = free_port()
        args = _data_args(primary_port, root / "primary") + acl
        setup.data.append(_start(args, primary_port, root / "primary", password=password))
        replica_port = free_port()
        args = _data_args(replica_port, root / "replica") + acl
        args += ["--replicaof", "127.0.0.1", str(primary_port)]
        setup.data.append(_start(args, replica_port, root / "replica", password=password))

        def in_sync() -> bool:
            client = setup.data[0].client(password)
            try:
                info = client.info("replication")
            finally:
                client.close()
            return int(info.get("connected_slaves", 0)) == 1 and "online" in str(
                info.get("slave0", "")
            )

        _wait(in_sync, "the replica to sync")
        for i in range(3):
            port = free_port()
            directory = root / f"sentinel{i}"
            directory.mkdir(parents=True, exist_ok=True)
            conf = directory / "sentinel.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {directory}\n"
                f"sentinel monitor {setup.service} 127.0.0.1 {primary_port} 2\n"
                f"sentinel down-after-milliseconds {setup.service} {down_after_ms}\n"
                f"sentinel failover-timeout {setup.service} {failover_timeout_ms}\n"
                f"sentinel parallel-syncs {setup.service} 1\n"
                + (
                    f"sentinel auth-user {setup.service} relay\n"
                    f"sentinel auth-pass {setup.service} {password}\n"
                    if password
                    else ""
                )
            )
            args = [_binary("redis-server"), str(conf), "--sentinel"]
            setup.sentinels.append(_start(args, port, directory))

        def watched() -> bool:
            # Each sentinel knows the replica and the two other sentinels: a failover can run.
            for sentinel in setup.sentinels:
                client = sentinel.client()
                try:
                    replicas = client.execute_command("SENTINEL", "replicas", setup.service)
                    others = client.execute_command("SENTINEL", "sentinels", setup.service)
                except redis.RedisError:
                    return False
                finally:
                    client.close()
                if len(replicas) < 1 or len(others) < 2:
                    return False
            return True

        _wait(watched, "the sentinels to discover the replica and each other", 30_000 * MS)
        yield setup
    finally:
        for server in [*setup.sentinels, *setup.data]:
            server.kill()
