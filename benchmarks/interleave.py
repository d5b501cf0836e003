"""Run one benchmark command alternately in two checkouts (A, B, A, B, ...) and summarise a figure.

For comparing speed before and after a change on a shared, noisy machine: rounds are interleaved so
drift hits both alike, and the summary gives each side's median and range. The command must print
JSON (one document, or JSON lines); ``--field`` names the number to compare (dotted keys for nested values;
repeat it to summarise several figures of the same runs), ``--where`` selects lines (``key=value``).

    python benchmarks/interleave.py --a ../old --b . --rounds 5 --field efficiency --where batch=64 -- \\
        python benchmarks/early_exit_speed.py --batch-sizes 64 1 --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path


def run(checkout: Path, command: list[str]) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(checkout / "src"))
    done = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{checkout}: `{' '.join(command)}` failed:\n{done.stderr[-2000:]}")
    try:  # one JSON document (a list of rows or one row) ...
        whole = json.loads(done.stdout)
        return whole if isinstance(whole, list) else [whole]
    except ValueError:  # ... or JSON lines among other output
        return [json.loads(line) for line in done.stdout.splitlines() if line.strip().startswith("{")]


def pick(rows: list[dict], field: str, where: list[str]) -> list[float]:
    out = []
    for row in rows:
        if all(str(row.get(k)) == v for k, v in (w.split("=", 1) for w in where)):
            value = row
            for part in field.split("."):
                value = value[part]
            out.append(float(value))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", type=Path, required=True, help="first checkout (e.g. the old commit)")
    ap.add_argument("--b", type=Path, required=True, help="second checkout")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--field", action="append", required=True, help="a figure to compare (repeatable)")
    ap.add_argument("--where", action="append", default=[])
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    values: dict[tuple[str, str], list[float]] = {(side, f): [] for f in args.field for side in ("a", "b")}
    for r in range(args.rounds):
        for side in ("a", "b"):
            rows = run(getattr(args, side).resolve(), command)
            for field in args.field:
                got = pick(rows, field, args.where)
                values[side, field] += got
                print(f"round {r + 1} {side} {field}: {', '.join(f'{v:.3f}' for v in got)}", flush=True)
    for (side, field), v in values.items():
        print(json.dumps({"side": side, "checkout": str(getattr(args, side)), "field": field,
                          "median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}))


if __name__ == "__main__":
    main()
