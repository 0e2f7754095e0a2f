"""file:// (local and JuiceFS): escapes through symlinks, collisions, killed writers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvswap.connectors import open_connector
from kvswap.errors import InvalidKeyError, NotFoundError
from kvswap.testing.connector_suite import env_or_skip


def test_symlinked_directory_inside_root_is_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"do not read")
    store = open_connector(f"file://{tmp_path}/root")
    os.symlink(outside, tmp_path / "root" / "evil")
    with pytest.raises(InvalidKeyError):
        store.get("evil/secret")
    with pytest.raises(InvalidKeyError):
        store.put("evil/planted", b"x")
    with pytest.raises(InvalidKeyError):
        store.delete("evil/secret")
    assert (outside / "secret").read_bytes() == b"do not read"
    assert not (outside / "planted").exists()
    assert list(store.list()) == []


def test_symlinked_file_is_never_read_and_overwrite_replaces_the_link(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"outside")
    store = open_connector(f"file://{tmp_path}/root")
    os.symlink(target, tmp_path / "root" / "link")
    with pytest.raises(InvalidKeyError):
        store.get("link")
    with pytest.raises(InvalidKeyError):
        store.size("link")
    assert list(store.list()) == []
    store.put("link", b"inside")  # rename replaces the link itself
    assert bytes(store.get("link")) == b"inside"
    assert target.read_bytes() == b"outside"


def test_value_and_directory_cannot_share_a_key(tmp_path: Path) -> None:
    store = open_connector(f"file://{tmp_path}/root")
    store.put("a/b", b"1")
    with pytest.raises(InvalidKeyError, match="directory"):
        store.put("a", b"2")
    with pytest.raises(InvalidKeyError):
        store.put("a/b/c", b"3")
    with pytest.raises(NotFoundError):
        store.get("a")
    with pytest.raises(InvalidKeyError):
        store.put("x" * 256, b"segment too long for a file name")


def test_leftover_temporaries_are_invisible(tmp_path: Path) -> None:
    store = open_connector(f"file://{tmp_path}/root")
    store.put("k/v", b"1")
    (tmp_path / "root" / "k" / ".kvswap-tmp-deadbeef").write_bytes(b"partial")
    assert list(store.list()) == ["k/v"]


WRITER = """
import sys
from kvswap.connectors import open_connector
store = open_connector(sys.argv[1])
store.put("victim/key", bytes(512 << 20))
print("finished", flush=True)
"""


def _kill_writer_mid_put(uri: str, root: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, uri], stdout=subprocess.PIPE)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            temps = list((root / "victim").glob(".kvswap-tmp-*")) if (root / "victim").exists() else []
            if temps and temps[0].stat().st_size > 0:
                break
            assert proc.poll() is None, "writer finished before it could be killed"
            time.sleep(0.005)
        else:
            pytest.fail("the writer never started writing")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.stdout is not None and b"finished" not in proc.stdout.read()
    store = open_connector(uri)
    assert not store.exists("victim/key")
    assert list(store.list()) == []
    with pytest.raises(NotFoundError):
        store.get("victim/key")
    store.put("victim/key", b"whole")  # the key is usable afterwards
    assert bytes(store.get("victim/key")) == b"whole"
    # The killed writer's temporary is garbage: young ones are spared, old ones collected.
    assert list((root / "victim").glob(".kvswap-tmp-*"))
    assert store.collect_garbage(older_than=3600) == 0
    assert store.collect_garbage(older_than=0) == 1 and not list((root / "victim").glob(".kvswap-tmp-*"))
    assert bytes(store.get("victim/key")) == b"whole"


def test_writer_killed_mid_put_leaves_no_partial_value(tmp_path: Path) -> None:
    _kill_writer_mid_put(f"file://{tmp_path}/root", tmp_path / "root")


def test_writer_killed_mid_put_on_juicefs_leaves_no_partial_value(unique: str) -> None:
    mount = Path(env_or_skip("KVSWAP_TEST_JUICEFS_DIR"))
    _kill_writer_mid_put(f"file://{mount}/{unique}", mount / unique)
