"""Command line: `python -m mowbench.run [agent=.. env=.. task=.. seed=.. preset=..]` trains and evaluates;
`python -m mowbench.run grid=NAME ...` dispatches a grid (mowbench.grid).

With no arguments it runs the quickstart (QUICKSTART below): tiny STORM on MinAtar breakout, printing its final
return beside a random policy's.

Modules by job, imports pointing one way: run (command line) -> grid (dispatch) -> runner (run lifecycle)
-> config (compose, validate, Plan) -> agents.base (registry).
"""

from __future__ import annotations

import sys

from mowbench.config import compose_config
from mowbench.runner import execute

# `python -m mowbench.run` with no arguments: tiny STORM on MinAtar, a CPU's minutes (README); the table compares
# each game's final return with a random policy's.
# breakout: the MinAtar game where 2000 steps beat a random policy at every seed measured (docs/performance.md)
QUICKSTART = ["env=minatar", "agent=storm", "preset=tiny", "task=breakout"]


def main(argv: list[str] | None = None) -> None:
    """Compose the configuration once (one-line errors for bad groups, keys and values), then train it."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(f"[mowbench] quickstart: python -m mowbench.run {' '.join(QUICKSTART)}")
        args = list(QUICKSTART)
    if args[0] in ("-h", "--help"):
        from mowbench.config import usage

        print(__doc__)
        print(usage())
        return
    if any(arg.startswith("grid=") for arg in args):  # a named grid: dispatch it (mowbench.grid)
        from mowbench.grid import main as grid_main

        grid_main(["submit", *args])
        return
    try:
        execute(compose_config(args))
    except ValueError as err:  # bad input: one line, no traceback
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
