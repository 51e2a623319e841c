"""The `mowbench` command: `mowbench COMMAND [ARGS]` runs the tool of that name, the same as its
`python -m mowbench.X` form (which keeps working); `mowbench --help` lists them, `mowbench COMMAND --help` shows
that tool's own help."""

from __future__ import annotations

import importlib
import sys

# command -> (the module whose main(argv) it runs, one line of what it does); modules import lazily so that
# `mowbench --help` answers at once
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("mowbench.run", "train and evaluate runs (resumable); grid=NAME dispatches a grid"),
    "grid": ("mowbench.grid", "a grid's status (`mowbench grid status grid=NAME`) and submission"),
    "analyze": ("mowbench.analysis.__main__", "tables, figures and report.html from results/ (rliable intervals)"),
    "evaluate": ("mowbench.evaluate", "evaluate a finished run's weights again (another protocol, more episodes)"),
    "video": ("mowbench.video", "watch a run's policy and its world model's open-loop predictions (MP4, GIF)"),
    "bench": ("mowbench.bench", "speed and size of an agent: acting, updates, evaluation, memory"),
    "cost": ("mowbench.cost", "a grid's projected device-hours per cell and in total, before it is submitted"),
    "verify": ("mowbench.verify", "replay numbers recorded from a method's published code through ours"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: mowbench COMMAND [ARGS]  (each the same as `python -m mowbench.<module>`)", "", "commands:"]
    lines += [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    lines += ["", "`mowbench COMMAND --help` shows the command's own options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        raise SystemExit(f"error: unknown command {name!r}; allowed: {', '.join(COMMANDS)}")
    code = importlib.import_module(COMMANDS[name][0]).main(rest)
    if isinstance(code, int) and code:  # the analysis returns its exit status
        raise SystemExit(code)


if __name__ == "__main__":
    main()
