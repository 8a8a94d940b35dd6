"""Run every `benchmarks/bench_*.py` and print one table (`make bench`).

Each benchmark module exposes `run() -> list[dict]`: one dict per measured case, with any keys
(conventionally `case`, `unit`, `ours`, the baseline's name, `ratio` = how many times better ours
is, `threads`, `notes`). Each module runs in its own process (they initialise torch.distributed
and Megatron state, and must not disturb each other's timings); a module that fails shows up as a
row with its error, and the exit status is then 1.

    python benchmarks/run.py [--threads N] [-k SUBSTRING] [--json FILE]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MARKER = "BENCH_ROWS_JSON:"


def discover(pattern: str = "") -> list[str]:
    return [p.stem for p in sorted(HERE.glob("bench_*.py")) if pattern in p.stem]


def run_one(name: str, threads: int, timeout: float) -> list[dict]:
    """Run `benchmarks/<name>.py`'s `run()` in a child process; its rows, or one error row."""
    env = {**os.environ, "BENCH_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    env["MKL_NUM_THREADS"] = str(threads)
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", name],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return [{"benchmark": name, "error": f"timed out after {timeout:.0f} s"}]
    for line in proc.stdout.splitlines():
        if line.startswith(MARKER):
            return [
                {"benchmark": name.removeprefix("bench_"), **row} for row in json.loads(line[len(MARKER) :])
            ]
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return [{"benchmark": name, "error": f"exit {proc.returncode}: {tail}"}]


def _child(name: str) -> None:
    # Import as `benchmarks.<name>` from the repository root; the script's own folder must not
    # shadow top-level packages.
    sys.path[:] = [str(ROOT)] + [p for p in sys.path if p and Path(p).resolve() != HERE]
    module = importlib.import_module(f"benchmarks.{name}")
    rows = module.run()
    print(MARKER + json.dumps(rows), flush=True)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def table(rows: list[dict]) -> str:
    """A plain-text table over the union of the rows' keys (in first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    cells = [[_cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "1")))
    parser.add_argument("-k", dest="pattern", default="", help="only benchmarks whose name contains this")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per benchmark module")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child)
        return 0
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    names = discover(args.pattern)
    if not names:
        print(f"run.py: error: no benchmarks/bench_*.py matches {args.pattern!r}", file=sys.stderr)
        return 2
    rows: list[dict] = []
    for name in names:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        rows += run_one(name, args.threads, args.timeout)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
