"""One way every benchmark writes its JSON record to bench/results/."""

from __future__ import annotations

import datetime
import json
import os
import platform
import signal
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def write_record(out: Path, name: str, fields: dict[str, Any]) -> Path:
    """``out/<name>-<UTC stamp>.json`` holding ``fields`` plus when, host, CPUs and Python."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}-{stamp}.json"
    record = {"when": stamp, "host": platform.node(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
              **fields}
    path.write_text(json.dumps(record, indent=1, default=str))
    print(f"\nwrote {path}")
    return path


def stop_servers_on_sigterm() -> None:
    """Make SIGTERM (a ``timeout`` running out, a ``kill``) raise SystemExit, so the bench's
    ``finally`` stops the servers and processes it started instead of leaving them running.
    Later SIGTERMs are ignored while that runs (``timeout`` sends two: to the bench and to
    its process group)."""
    def leave(signum: int, _frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, leave)
