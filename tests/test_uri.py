from __future__ import annotations

import pytest

from kvswap.connectors import CONNECTORS, open_connector
from kvswap.errors import ConfigError
from kvswap.registry import Backend, LazyRegistry
from kvswap.uri import URI, Option, parse_bool, parse_seconds, parse_size


def test_parse_all_parts_and_mask_password() -> None:
    uri = URI.parse("redis://alice:p%40ss%3Aword@127.0.0.1:6380/2?timeout=1.5&prefix=a%3Ab")
    assert (uri.scheme, uri.username, uri.password, uri.host, uri.port, uri.path) == (
        "redis", "alice", "p@ss:word", "127.0.0.1", 6380, "/2")
    assert dict(uri.query) == {"timeout": "1.5", "prefix": "a:b"}
    for text in (str(uri), repr(uri), uri.render(), f"{uri}", str([uri])):
        assert "p@ss" not in text and "p%40ss" not in text
        assert "***" in text
    assert URI.parse(uri.render(hide_password=False)) == uri


def test_immutable_and_hashable() -> None:
    uri = URI.parse("file:///tmp/x")
    with pytest.raises(AttributeError):
        uri.path = "/etc"  # type: ignore[misc]
    assert {uri: 1}[URI.parse("file:///tmp/x")] == 1


def test_ipv6_host() -> None:
    uri = URI.parse("redis://[::1]:6379/0")
    assert uri.host == "::1" and uri.port == 6379
    assert uri.render() == "redis://[::1]:6379/0"


@pytest.mark.parametrize("text", ["", "no-scheme", "://x", "1redis://x", "redis://h:notaport/0", "redis://h:99999/0",
                                  "redis://h/0?a=1#frag", "file:///tmp/a b", "redis://h/0?x", "redis://h\x00/0"])
def test_malformed_uris(text: str) -> None:
    with pytest.raises(ConfigError):
        URI.parse(text)


def test_malformed_uri_error_hides_password() -> None:
    with pytest.raises(ConfigError) as info:
        URI.parse("redis://u:secretpw@h:port/0")
    assert "secretpw" not in str(info.value)


TABLE = {"timeout": Option(parse_seconds, 5.0), "size": Option(parse_size, 1), "flag": Option(parse_bool, False)}


def test_options_typed_defaults_and_overrides() -> None:
    uri = URI.parse("x://h/?timeout=2&size=4MiB")
    assert uri.options(TABLE) == {"timeout": 2.0, "size": 4 << 20, "flag": False}
    assert uri.options(TABLE, {"flag": True, "timeout": 2.0})["flag"] is True


@pytest.mark.parametrize("query,overrides,match", [
    ("timeout=2&timeout=3", {}, "twice"),
    ("bogus=1", {}, "unknown query parameter 'bogus'"),
    ("timeout=-1", {}, "bad value"),
    ("size=lots", {}, "bad value"),
    ("flag=maybe", {}, "bad value"),
    ("timeout=2", {"timeout": 3.0}, "conflict|but"),
    ("", {"nope": 1}, "unknown option"),
])
def test_options_errors(query: str, overrides: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        URI.parse(f"x://h/?{query}" if query else "x://h/").options(TABLE, overrides)


@pytest.mark.parametrize("text,value", [("1048576", 1 << 20), ("4MiB", 4 << 20), ("4mib", 4 << 20), ("2MB", 2_000_000),
                                        ("1.5GiB", 3 << 29), ("512b", 512), ("8k", 8000)])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


def test_unknown_scheme_names_known_schemes_and_extras() -> None:
    with pytest.raises(ConfigError) as info:
        open_connector("ftp://host/x")
    message = str(info.value)
    for scheme in ("file://", "mem://", "redis://", "valkey://", "s3://"):
        assert scheme in message
    assert "kvswap[s3]" in message and "kvswap[redis]" in message


def test_missing_driver_says_which_extra() -> None:
    registry: LazyRegistry = LazyRegistry("connector", {"fake": Backend("backend_with_missing_driver:Thing", "fake")})
    with pytest.raises(ConfigError, match=r"pip install 'kvswap\[fake\]'"):
        registry.resolve("fake://x")


def test_connector_rejects_bad_uris(tmp_path) -> None:
    for text in ["file://relative/path", "file:///", "file://host:1/x", f"file://{tmp_path}?threads=0",
                 f"file://{tmp_path}?unknown=1", "redis://127.0.0.1:6379/notadb", "redis:///0",
                 "redis://127.0.0.1:6379/0?chunk_size=1GiB", "s3:///nobucket", "s3://b/p?part_size=1MiB",
                 "mem://x:5", "mem://a/b"]:
        with pytest.raises(ConfigError):
            open_connector(text)
    assert "s3" in CONNECTORS.schemes
