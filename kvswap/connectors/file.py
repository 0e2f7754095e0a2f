"""``file:///abs/dir``: a local directory or a mounted shared file system (3FS, JuiceFS).

Each key is a file below the root; '/' in a key makes subdirectories. Publishing is
atomic: write a temporary file in the target directory, fsync it, rename it over the
key (or hard-link it, for ``mode="create"``), fsync the directory. A reader never sees a
partial value, also after the writer is killed; leftover temporaries are named
``.kvswap-tmp-*`` and never listed.

Keys cannot escape the root: every path is walked one component at a time relative to
an open directory descriptor with ``O_NOFOLLOW``, so ``..``, absolute paths and symlinks
planted inside the store (to files or directories) are refused, whatever races occur.
A key cannot be both a value and a directory of other keys on this backend.

Options: ``fsync`` (default true), ``threads`` (parallel read threads, default 8),
``parallel_min`` (values from this size are read by several threads, default 16MiB),
``io_chunk`` (bytes per read task, default 8MiB), ``create`` (make the root directory if
missing, default true). Writes are sequential: parallel writes measured no faster, on
a local disk or on JuiceFS.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

from kvswap.connectors.base import Connector, PutMode, check_range
from kvswap.errors import (
    AlreadyExistsError,
    BackendUnavailableError,
    ConfigError,
    IntegrityError,
    InvalidKeyError,
    KVSwapError,
    NotFoundError,
    StorageFullError,
)
from kvswap.uri import URI, Option, parse_bool, parse_positive_int, parse_size

TMP_PREFIX = ".kvswap-tmp-"
NAME_MAX = 255
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

_ERRNO_KINDS: dict[int, type[KVSwapError]] = {
    errno.ENOENT: NotFoundError,
    errno.EEXIST: AlreadyExistsError,
    errno.ENOSPC: StorageFullError,
    errno.EDQUOT: StorageFullError,
    errno.ELOOP: InvalidKeyError,  # a symlink where the key walks
    errno.ENOTDIR: InvalidKeyError,  # a file where the key needs a directory
    errno.EISDIR: InvalidKeyError,  # a directory where the key needs a file
    errno.ENAMETOOLONG: InvalidKeyError,
    errno.EACCES: ConfigError,
    errno.EPERM: ConfigError,
    errno.EROFS: ConfigError,
}


@contextlib.contextmanager
def _os_errors(what: str) -> Iterator[None]:
    """The one point where this backend's OSErrors become kvswap kinds."""
    try:
        yield
    except KVSwapError:
        raise
    except OSError as exc:
        kind = _ERRNO_KINDS.get(exc.errno or 0, BackendUnavailableError)
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        if kind is InvalidKeyError:
            reason += " (keys may not pass through symlinks, or be both a value and a directory)"
        raise kind(f"{what}: {reason}") from exc


class FileConnector(Connector):
    OPTIONS: ClassVar[Mapping[str, Option]] = {
        "fsync": Option(parse_bool, True, "fsync each value and its directory on publish"),
        "threads": Option(parse_positive_int, 8, "parallel read threads for large values"),
        "parallel_min": Option(parse_size, 16 << 20, "values from this size are read in parallel"),
        "io_chunk": Option(parse_size, 8 << 20, "bytes per parallel read task"),
        "create": Option(parse_bool, True, "create the root directory if missing"),
    }

    def __init__(self, uri: URI, **options: Any) -> None:
        super().__init__(uri, **options)
        if uri.host not in (None, "localhost") or uri.port or uri.username or uri.password:
            raise ConfigError(f"file:// URIs name a local path, like file:///var/kvswap; got {uri}")
        if not uri.path.startswith("/") or uri.path == "/":
            raise ConfigError(f"file:// needs an absolute directory below /, like file:///var/kvswap; got {uri}")
        self.root = os.path.normpath(uri.path)
        with _os_errors(f"opening root {self.root}"):
            if self.options["create"]:
                os.makedirs(self.root, exist_ok=True)
            self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._pool: ThreadPoolExecutor | None = None

    # ---- walking keys safely ------------------------------------------------------

    def _split(self, key: str) -> tuple[list[str], str]:
        segments = key.split("/")
        for segment in segments:
            if len(segment.encode()) > NAME_MAX:
                raise InvalidKeyError(f"key segment longer than {NAME_MAX} bytes on file://: {segment[:40]!r}...")
        return segments[:-1], segments[-1]

    def _open_dirs(self, dirs: list[str], create: bool) -> int:
        """An fd of the key's directory, walked without following any symlink."""
        fd = os.dup(self._root_fd)
        try:
            for segment in dirs:
                try:
                    next_fd = os.open(segment, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(segment, 0o755, dir_fd=fd)
                    next_fd = os.open(segment, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = next_fd
            return fd
        except BaseException:
            os.close(fd)
            raise

    @contextlib.contextmanager
    def _opened(self, key: str) -> Iterator[tuple[int, int]]:
        """(fd, size) of the value file for reading; NotFoundError if missing."""
        dirs, name = self._split(key)
        with _os_errors(f"reading {key!r} in {self.uri}"):
            dir_fd = self._open_dirs(dirs, create=False)
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            finally:
                os.close(dir_fd)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise NotFoundError(f"{key!r} not found in {self.uri} (not a regular file)")
                yield fd, st.st_size
            finally:
                os.close(fd)

    # ---- the contract ---------------------------------------------------------------

    def _put(self, key: str, parts: list[memoryview], size: int, mode: PutMode) -> None:
        dirs, name = self._split(key)
        tmp = f"{TMP_PREFIX}{uuid.uuid4().hex}"
        with _os_errors(f"writing {key!r} to {self.uri}"):
            dir_fd = self._open_dirs(dirs, create=True)
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o644, dir_fd=dir_fd)
                try:
                    try:
                        for part in parts:  # sequential: parallel writes measured no faster
                            _write_all(fd, part)
                        if self.options["fsync"]:
                            os.fsync(fd)
                    finally:
                        os.close(fd)
                    if mode == "create":
                        os.link(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
                        os.unlink(tmp, dir_fd=dir_fd)
                    else:
                        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp, dir_fd=dir_fd)
                    raise
                if self.options["fsync"]:
                    os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def _get(self, key: str, offset: int, length: int | None) -> bytearray:
        with self._opened(key) as (fd, size):  # one walk and open, not size() then read
            check_range(key, offset, size)
            buffer = bytearray(size - offset if length is None else min(length, size - offset))
            self._fill(key, fd, memoryview(buffer), offset)
            return buffer

    def _read_into(self, key: str, buffer: memoryview, offset: int) -> int:
        with self._opened(key) as (fd, size):
            check_range(key, offset, size)
            count = min(len(buffer), size - offset)
            self._fill(key, fd, buffer[:count], offset)
            return count

    def _fill(self, key: str, fd: int, target: memoryview, offset: int) -> None:
        """Fill ``target`` from ``offset``; on several threads when it is large."""
        count, chunk = len(target), self.options["io_chunk"]
        with _os_errors(f"reading {key!r} in {self.uri}"):
            if count >= self.options["parallel_min"] and self.options["threads"] > 1:
                tasks = [(target[s:min(s + chunk, count)], offset + s) for s in range(0, count, chunk)]
                self._run_parallel(lambda task: _pread_exact(fd, task[0], task[1], key), tasks)
            else:
                _pread_exact(fd, target, offset, key)

    def _size(self, key: str) -> int:
        with self._opened(key) as (_, size):
            return size

    def _delete(self, key: str) -> None:
        dirs, name = self._split(key)
        with _os_errors(f"deleting {key!r} in {self.uri}"):
            try:
                dir_fd = self._open_dirs(dirs, create=False)
            except FileNotFoundError:
                return
            try:
                os.unlink(name, dir_fd=dir_fd)
            except (FileNotFoundError, IsADirectoryError):
                pass
            finally:
                os.close(dir_fd)

    def _list(self, prefix: str) -> Iterator[str]:
        with _os_errors(f"listing {prefix!r} in {self.uri}"):
            yield from self._walk(os.dup(self._root_fd), "", prefix)

    def _walk(self, dir_fd: int, rel: str, prefix: str) -> Iterator[str]:
        """Keys below ``dir_fd`` (which this closes), pruned to those matching ``prefix``."""
        try:
            with os.scandir(dir_fd) as entries:
                found = [(e.name, e.is_dir(follow_symlinks=False), e.is_file(follow_symlinks=False))
                         for e in entries if not e.name.startswith(".kvswap")]
            for name, is_dir, is_file in found:
                path = rel + name
                if is_file and path.startswith(prefix):
                    yield path
                elif is_dir and (path + "/").startswith(prefix[:len(path) + 1]):
                    try:
                        sub_fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
                    except OSError as exc:
                        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                            continue  # removed or replaced by a symlink while we listed
                        raise
                    yield from self._walk(sub_fd, path + "/", prefix)
        finally:
            os.close(dir_fd)

    def collect_garbage(self, older_than: float = 600.0) -> int:
        """Unlink ``.kvswap-tmp-*`` files (writers killed mid-put) older than ``older_than`` s."""
        self._check_open()
        horizon = time.time() - older_than
        with _os_errors(f"collecting garbage in {self.uri}"):
            return self._sweep(os.dup(self._root_fd), horizon)

    def _sweep(self, dir_fd: int, horizon: float) -> int:
        removed = 0
        try:
            with os.scandir(dir_fd) as entries:
                found = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
            for name, is_dir in found:
                if is_dir and not name.startswith(".kvswap"):
                    try:
                        sub_fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
                    except OSError as exc:
                        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                            continue
                        raise
                    removed += self._sweep(sub_fd, horizon)
                elif name.startswith(TMP_PREFIX):
                    try:
                        if os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mtime < horizon:
                            os.unlink(name, dir_fd=dir_fd)
                            removed += 1
                    except FileNotFoundError:
                        continue  # its writer finished (renamed it) or another sweep took it
        finally:
            os.close(dir_fd)
        return removed

    def _run_parallel(self, fn: Any, tasks: list[Any]) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.options["threads"], thread_name_prefix="kvswap-file")
        for future in [self._pool.submit(fn, task) for task in tasks]:
            future.result()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown()
        os.close(self._root_fd)


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data):]


def _pread_exact(fd: int, buffer: memoryview, offset: int, key: str) -> None:
    while buffer:
        count = os.preadv(fd, [buffer], offset)
        if count == 0:
            raise IntegrityError(f"{key!r} is shorter than its size said (truncated behind kvswap's back?)")
        buffer = buffer[count:]
        offset += count
