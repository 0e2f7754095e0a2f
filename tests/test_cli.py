"""Every failure a user can cause at the command line is one clear line and a non-zero exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvswap.cli import main

NO_CUDA = not torch.cuda.is_available()


def run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse: usage line and an error line, exit 2
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    if args[0] == "check" and "FAILED" in captured.out:  # check's own report, one row per step
        return code, "kvswap check: FAILED"
    return code, captured.err


def one_clear_line(err: str) -> bool:
    # What a terminal keeps of a progress bar: the text after its last carriage return.
    shown = [line.rsplit("\r", 1)[-1].lstrip() if "\r" in line else line for line in err.splitlines()]
    lines = [line for line in shown if line.strip() and not line.startswith("usage:")
             and not line.startswith(" ")]
    return len(lines) == 1 and "Traceback" not in err and (lines[0].startswith("kvswap") or "error:" in lines[0])


@pytest.mark.parametrize("args", [
    *([["demo", "--device", "cuda"], ["serve", "--device", "cuda:0"], ["weights", "load", "x", "--device", "cuda"]]
      if NO_CUDA else []),
    ["demo", "--device", "tpu"], ["demo", "--dtype", "int8"], ["demo", "--model", "nope"],
    ["demo", "--meta", "nosuch://x"], ["demo", "--store", "redis://127.0.0.1:1/0?timeout=1&retries=0"],
    ["serve", "--model", "/does/not/exist"], ["serve", "--model", "valkey://127.0.0.1:1/0?timeout=1"],
    ["serve", "--meta", "postgresql://u:secret@127.0.0.1:1/db?connect_timeout=1"],
    ["weights", "load", "/does/not/exist"], ["weights", "save", "/does/not/exist", "file:///tmp/x"],
    ["weights", "gc", "/does/not/exist"], ["weights", "load", "instance://127.0.0.1:1"],
    ["sessions", "--url", "http://127.0.0.1:1", "list"], ["sessions", "--url", "not a url", "list"],
    ["check", "s3://bucket?endpoint=http://127.0.0.1:1&timeout=1&retries=0", "--size", "1KiB"],
    ["check", "file:///dev/null/x"], ["demo", "--sessions", "-3"],
])
def test_user_errors_are_one_line(capsys: pytest.CaptureFixture, args: list[str]) -> None:
    code, err = run(capsys, *args)
    assert code != 0, err
    assert one_clear_line(err), err
    assert "secret" not in err


@pytest.mark.parametrize("args", [["demo", "--model", "nope"], ["weights", "load", "nope"],
                                  ["weights", "save", "nope", "file:///dev/null/x"]])
def test_a_mistyped_source_leaves_no_directory_behind(capsys: pytest.CaptureFixture, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch, args: list[str]) -> None:
    monkeypatch.chdir(tmp_path)
    code, err = run(capsys, *args)
    assert code != 0 and one_clear_line(err), err
    assert list(tmp_path.iterdir()) == []


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(uri=st.text(max_size=60), command=st.sampled_from(["weights load", "weights gc", "check"]))
def test_any_location_is_an_answer_not_a_traceback(capsys: pytest.CaptureFixture, tmp_path: Path, uri: str,
                                                   command: str) -> None:
    if not uri.strip() or "://" not in uri or uri.startswith(("file:", "mem:")):
        uri = f"file://{tmp_path}/{uri.encode('utf-8', 'surrogatepass').hex()[:40] or 'x'}"
    code, err = run(capsys, *command.split(), uri, *(["--size", "1KiB"] if command == "check" else []))
    assert "Traceback" not in err
    assert code == 0 or one_clear_line(err), err


def test_a_subprocess_sees_the_same_line() -> None:
    done = subprocess.run([sys.executable, "-m", "kvswap.cli", "weights", "load", "/does/not/exist"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and done.stderr.startswith("kvswap: NotFoundError")


def test_serve_refuses_a_tensor_parallel_save_and_says_what_to_do(capsys: pytest.CaptureFixture,
                                                                   tmp_path: Path) -> None:
    from kvswap.engine import build_model
    from kvswap.weights import save

    model, _ = build_model("tiny")
    model.save_pretrained(tmp_path / "ckpt")
    save(tmp_path / "ckpt", f"file://{tmp_path}/tp2", tp=2, progress=False)
    capsys.readouterr()
    code, err = run(capsys, "serve", "--model", f"file://{tmp_path}/tp2", "--dir", str(tmp_path / "serve"))
    assert code == 2 and one_clear_line(err) and "--tp 1" in err, err
