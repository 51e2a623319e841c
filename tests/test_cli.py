"""The `mowbench` console command (installed by the package): it lists its commands, each is the same as its
`python -m mowbench.X` form, and a bad command is one line naming the allowed ones."""

import subprocess
import sys
from pathlib import Path

import pytest

from mowbench.cli import COMMANDS
from tests.conftest import REPO

MOWBENCH = Path(sys.executable).parent / "mowbench"  # the console script pip installed beside this python


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, cwd=REPO, timeout=300)


def test_help_lists_every_command_with_one_line():
    assert MOWBENCH.exists(), f"{MOWBENCH} missing: the package's [project.scripts] entry is not installed"
    out = run(str(MOWBENCH), "--help")
    assert out.returncode == 0
    listed = [line.split()[0] for line in out.stdout.splitlines() if line.startswith("  ")]
    assert listed == ["run", "grid", "analyze", "evaluate", "video", "bench", "cost", "verify"] == list(COMMANDS)


@pytest.mark.slow(seconds=40)
def test_each_command_is_its_module_form():
    for command, module in (("run", "mowbench.run"), ("bench", "mowbench.bench"), ("grid", "mowbench.grid"),
                            ("verify", "mowbench.verify"), ("analyze", "mowbench.analysis"),
                            ("evaluate", "mowbench.evaluate"), ("video", "mowbench.video"),
                            ("cost", "mowbench.cost")):
        ours, theirs = run(str(MOWBENCH), command, "--help"), run(sys.executable, "-m", module, "--help")
        assert ours.returncode == theirs.returncode == 0, (command, ours.stderr)
        assert ours.stdout == theirs.stdout and ours.stdout.strip(), command
    # a real command with arguments, and a failing one keeps its exit status
    ours, theirs = run(str(MOWBENCH), "verify", "agent=storm"), run(sys.executable, "-m", "mowbench.verify",
                                                                    "agent=storm")
    assert ours.returncode == theirs.returncode == 0 and ours.stdout == theirs.stdout
    bad = run(str(MOWBENCH), "verify", "agent=nonesuch")
    assert bad.returncode != 0 and bad.stderr.strip().startswith("error: unknown agent 'nonesuch'")


def test_an_unknown_command_is_one_line():
    out = run(str(MOWBENCH), "evalute")
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [
        "error: unknown command 'evalute'; allowed: run, grid, analyze, evaluate, video, bench, cost, verify"]
