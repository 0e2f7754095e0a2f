"""Where each thread's time went in each phase of a run recorded by py-spy (chrome trace format).

    py-spy record --subprocesses --nonblocking --idle --threads --format chrometrace -o run.json -- python ...
    python bench/pyspy_phases.py run.json --marker requests --phases warmup,alone,beside_saves,...

A phase is one call of the ``--marker`` function on a main thread (the n-th call is the n-th
name of ``--phases``; names repeat, so ``alone,beside_saves`` twice is two repeats); each
thread's samples inside a phase's window are summed by their innermost frame and by the
innermost frame of kvswap's own code, so two phases of the same work can be compared thread
by thread. Prints a table per phase and returns the same figures as JSON (``summarise``).
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path
from typing import Any

Frame = tuple[str, str, int]  # name, file, line


def timelines(events: list[dict[str, Any]]) -> dict[tuple[int, int], list[tuple[float, float, tuple[Frame, ...]]]]:
    """Per (pid, tid): (start, end, stack) intervals in seconds, the stack outermost first
    (py-spy's frames naming the processes and the thread come first)."""
    by_thread: dict[tuple[int, int], list[dict[str, Any]]] = collections.defaultdict(list)
    for event in events:
        if event.get("ph") in ("B", "E"):
            by_thread[(event["pid"], event["tid"])].append(event)
    out: dict[tuple[int, int], list[tuple[float, float, tuple[Frame, ...]]]] = {}
    for thread, items in by_thread.items():
        stack: list[Frame] = []
        last = None
        intervals = []
        for event in items:  # py-spy writes each thread's events in time order
            ts = event["ts"] / 1e6
            if last is not None and stack and ts > last:
                intervals.append((last, ts, tuple(stack)))
            frame = (event["name"], event["args"].get("filename", ""), event["args"].get("line", 0))
            if event["ph"] == "B":
                stack.append(frame)
            elif stack:
                stack.pop()
            last = ts
        out[thread] = intervals
    return out


def windows(lines: dict[tuple[int, int], list[tuple[float, float, tuple[Frame, ...]]]], marker: str,
            names: list[str]) -> list[tuple[str, float, float]]:
    """The phases: each contiguous stretch inside ``marker`` of the thread that calls it most,
    named in order."""
    stretches: list[tuple[float, float]] = []
    for intervals in lines.values():
        inside = [(a, b) for a, b, stack in intervals if any(frame[0] == marker for frame in stack)]
        merged: list[list[float]] = []
        for a, b in inside:
            if merged and a <= merged[-1][1]:  # no sample outside the marker between
                merged[-1][1] = b
            else:
                merged.append([a, b])
        if len(merged) > len(stretches):
            stretches = [(a, b) for a, b in merged]
    return [(name, a, b) for name, (a, b) in zip(names, stretches)]


def label(pid: int, stack: tuple[Frame, ...]) -> str:
    """A thread's name: its process's command (shortened) and py-spy's thread frame."""
    command = next((f[0] for f in stack if f[0].startswith(f"process {pid}:")), f"process {pid}")
    thread = next((f[0] for f in stack if f[0].startswith("thread (")), "thread ?")
    return f"{command[:70]}... {thread}"


def summarise(path: Path, marker: str, names: list[str], top: int = 12) -> dict[str, Any]:
    """Per phase name (repeats summed): seconds, and per thread its seconds by innermost frame
    and by innermost kvswap frame (the ``top`` largest)."""
    lines = timelines(json.loads(path.read_text()))
    phases = windows(lines, marker, names)
    result: dict[str, Any] = {}
    for name, begin, end in phases:
        phase = result.setdefault(name, {"seconds": 0.0, "threads": {}})
        phase["seconds"] += end - begin
        for (pid, _tid), intervals in lines.items():
            for a, b, stack in intervals:
                overlap = min(b, end) - max(a, begin)
                if overlap <= 0:
                    continue
                thread = phase["threads"].setdefault(label(pid, stack), {"seconds": 0.0, "leaf": {}, "kvswap": {}})
                thread["seconds"] += overlap
                leaf = stack[-1]
                key = f"{leaf[0]} ({Path(leaf[1]).name}:{leaf[2]})"
                thread["leaf"][key] = thread["leaf"].get(key, 0.0) + overlap
                own = [f for f in stack if "kvswap" in f[1] and "bench" not in f[1]]
                if own:
                    key = f"{own[-1][0]} ({Path(own[-1][1]).name}:{own[-1][2]})"
                    thread["kvswap"][key] = thread["kvswap"].get(key, 0.0) + overlap
    for phase in result.values():
        for thread in phase["threads"].values():
            for kind in ("leaf", "kvswap"):
                thread[kind] = dict(sorted(thread[kind].items(), key=lambda kv: -kv[1])[:top])
    return result


def report(summary: dict[str, Any]) -> None:
    for name, phase in summary.items():
        print(f"== {name}: {phase['seconds']:.2f} s of wall time")
        for thread, row in sorted(phase["threads"].items(), key=lambda kv: -kv[1]["seconds"]):
            waiting = max(row["leaf"].values(), default=0.0) > 0.95 * row["seconds"]
            if waiting and not row["kvswap"]:
                continue  # a helper thread that spent the phase in one wait
            print(f"  {thread}: {row['seconds']:.2f} s sampled")
            for key, seconds in row["leaf"].items():
                print(f"      {seconds:7.3f} s  {key}")
            for key, seconds in row["kvswap"].items():
                print(f"    k {seconds:7.3f} s  {key}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace", type=Path)
    parser.add_argument("--marker", default="requests")
    parser.add_argument("--phases", required=True, help="comma-separated names, one per call of the marker")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    report(summarise(args.trace, args.marker, args.phases.split(","), args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
