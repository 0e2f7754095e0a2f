"""schemathesis against a running ``kvswap serve``: no generated input, valid or not, gets a 5xx."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kvswap.testing.service import start_serve

ADMIN = "admin-token-for-schemathesis"


@pytest.mark.timeout(600)
def test_no_input_makes_the_service_fail(tmp_path: Path) -> None:
    served = start_serve(["--dir", str(tmp_path), "--max-new-tokens", "8", "--hbm-blocks", "64", "--max-body", "65536"],
                         tmp_path / "serve.log", env={"KVSWAP_API_TOKEN": "api", "KVSWAP_ADMIN_TOKEN": ADMIN})
    try:
        run = subprocess.run(
            [str(Path(sys.executable).parent / "schemathesis"), "run", f"{served.url}/openapi.json",
             "--checks", "not_a_server_error", "--header", f"Authorization: Bearer {ADMIN}",
             # One worker: hypothesis parses lambdas' source with ast.parse, and concurrent
             # ast.parse on CPython 3.11.7 can raise a spurious SystemError (cpython gh-106905).
             "--phases", "examples,coverage,fuzzing", "--max-examples", "30", "--workers", "1",
             "--request-timeout", "30", "--generation-database", "none", "--no-color"],
            capture_output=True, text=True, timeout=540, cwd=tmp_path)  # its cache stays out of the tree
    finally:
        served.stop()
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "failed" not in run.stdout.split("SUMMARY")[-1]


def test_the_entry_view_shows_every_field_of_the_record() -> None:
    """The admin view of an entry lists the record's fields, in its order (the view reads them by name)."""
    from kvswap.meta import Entry
    from kvswap.service.schemas import EntryView

    entry = Entry(0, 16, "file:///kv", "k", 100, "xxh3_128:00", "h", "s", 1, 2.5)
    assert tuple(EntryView.model_fields) == Entry._fields
    assert EntryView(**entry._asdict()).model_dump() == entry._asdict()
