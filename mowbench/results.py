"""The results layout (results/<suite>/<method>/<task>/seed_<k>/, schema in results/README.md):
atomic writes, run metadata, and the completion marker that makes a finished run immutable."""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import math
import os
import platform
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
DONE = "DONE.json"
# a run that went wrong in a way a rerun would repeat (diverged): {"reason", "step", "last_checkpoint", ...}
FAILED = "FAILED.json"
# Config keys a rerun may change: where the run is written, how it is shown, when it checkpoints, which tasks
# the command named (the folder fixes the run's own tasks, compared from metadata.json), and how the same maths is
# computed (evaluation envs at once, replay placement, compile, CUDA graphs, expert kernel: equal up to float
# rounding). They cannot change what the run learns or reports; any other difference from the run's config.yaml is
# refused. The analysis groups runs by the same rule.
INERT_KEYS = ("results_dir", "threads", "task", "method", "preset_name", "train.progress", "train.tensorboard",
              "train.log_every", "train.checkpoint_every", "train.stop_at", "train.keep_checkpoint",
              "train.eval_envs", "train.replay_on_device", "train.video_every", "train.env_workers",
              "agent.compile", "agent.cuda_graphs", "agent.expert_kernel", "deterministic", "logger.wandb",
              "logger.project", "logger.entity", "logger.group")


def flat_items(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys -> leaf values (lists stay values)."""
    if isinstance(node, dict):
        return {k: v for key, sub in node.items() for k, v in flat_items(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def changed_settings(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'key: old -> new' for every result-relevant key whose value differs (INERT_KEYS ignored). A key only
    one side has (a field a later mowbench added or removed, at its default) is not a difference."""
    a, b = flat_items(old), flat_items(new)
    keys = sorted(k for k in set(a) & set(b) if k not in INERT_KEYS and a[k] != b[k])
    return [f"{k}: {a[k]} -> {b[k]}" for k in keys]


def remove_partial_writes(folder: Path) -> None:
    """Delete the temporary files of atomic writes a killed process left in `folder` (e.g.
    .checkpoint.pt.x1y2.tmp); call it only while holding the run's lock. A racing acquirer's lock draft
    (.RUNNING.lock.*.tmp) is its own, and left alone."""
    for tmp in folder.glob(".*.tmp"):
        if not tmp.name.startswith(f".{LOCK}."):
            tmp.unlink(missing_ok=True)


# A method, task or grid name becomes one folder of the results layout: letters, digits and _ . = + , - only, not
# starting with '.' or '-', so that no name can climb out of results_dir ('..'), point elsewhere (an absolute
# path), nest a level the analysis does not read ('x/y') or hide (a leading dot)
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=+,-]{0,199}")
NAME_RULE = "one folder name of letters, digits and _ . = + , - (not starting with . or -, at most 200 characters)"


def check_name(kind: str, name: Any) -> str:
    """`name` if it is one safe path component, else a ValueError naming it and what is allowed."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"{kind}={name!r}; allowed: {NAME_RULE}")
    return name


def run_dir(root: str | Path, suite: str, method: str, task: str, seed: int) -> Path:
    """Where a run lives. Multi-task runs use the task-set name (e.g. 'all5') as `task`."""
    return Path(root) / suite / method / task / f"seed_{seed}"


def is_done(path: Path) -> bool:
    return (path / DONE).is_file()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        raise _named(err, path) from None


def umask() -> int:
    """The process's umask, read without changing it (Linux: /proc; elsewhere set and restored at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temporary(path: Path) -> tuple[int, str]:
    """A temporary file beside `path` for an atomic write, with the mode a plain open() would give the file
    (0666 less the umask): mkstemp makes it 0600, and renamed into place it would hide results, reports and
    checkpoints from colleagues on a shared cluster."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~umask())
    except OSError:  # a filesystem without modes (some network mounts): its own default
        pass
    return fd, tmp


def _named(err: BaseException, path: Path) -> BaseException:
    """An OSError (full disk, read-only, no permission) that names the file being written; others as they are."""
    if isinstance(err, OSError) and err.errno is not None:
        return OSError(err.errno, err.strerror, str(path))
    return err


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_csv(path: Path, header: list[str], rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def atomic_torch_save(path: Path, obj: Any) -> None:
    import torch  # here, not at the top: the analysis reads results without importing torch

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temporary(path)
    writer = None
    try:
        with os.fdopen(fd, "wb") as f:
            writer = _RecordingWriter(f)
            torch.save(obj, writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        # torch's zip writer turns a failed write (e.g. a full disk) into "unexpected pos": report the OSError
        raise _named(writer.error if writer is not None and writer.error else err, path) from None


class _RecordingWriter:
    """A file for torch.save that remembers the first OSError a write raised."""

    def __init__(self, f: Any) -> None:
        self.f, self.error = f, None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.f.flush()


def read_json(path: Path, recovery: str = "restore it or delete it") -> Any:
    """A JSON file's content; a truncated or garbage file is a ValueError naming it and the recovery."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is corrupt (not JSON: {err}); {recovery}") from None


def read_failure(folder: Path) -> dict[str, Any] | None:
    """The run's failure record (FAILED), or None if it has none; the one reader of it (runner, grid, analysis). A
    record that is not a JSON object still marks the run failed; a corrupt one is a ValueError naming it."""
    path = Path(folder) / FAILED
    if not path.exists():
        return None
    failure = read_json(path, "delete it to let the run resume from its last checkpoint")
    return failure if isinstance(failure, dict) else {"reason": "unreadable failure record"}


def read_summary(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / "summary.json"
    return read_json(path, "the run finished; delete its folder to train it again") if path.exists() else None


class TruncatedFile(ValueError):
    """An empty file or one that ends mid-line. The run's own writes are atomic, so a copy cut short (a full
    disk, a killed rsync) made it."""


def read_csv_rows(path: Path, required: tuple[str, ...] = (), whole_lines: bool = False
                  ) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """A CSV's header and its rows as (line number, {column: value}); lines starting with '#' are comments.

    Strict, so that no value lands in the wrong column: a row with more or fewer fields than the header, or a
    missing required column, is a ValueError naming the file and line. whole_lines: the file was written
    by mowbench, which ends every write with a newline, so an empty file or a cut last line is a TruncatedFile."""
    try:
        text = Path(path).read_text()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text CSV (not UTF-8)") from None
    if whole_lines and not text.endswith("\n"):
        raise TruncatedFile(f"{path} is truncated ({'empty' if not text else 'its last line is cut off'})")
    lines = [(i, line) for i, line in enumerate(text.splitlines(), 1) if line.strip() and not line.startswith("#")]
    if not lines:
        raise ValueError(f"{path} is empty (no header line)")
    records = list(csv.reader([line for _, line in lines]))
    header = records[0]
    missing = [c for c in required if c not in header]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; required: {','.join(required)}")
    rows = []
    for (number, _), fields in zip(lines[1:], records[1:], strict=True):
        if len(fields) != len(header):
            raise ValueError(f"{path}: line {number}: {len(fields)} fields, the header has {len(header)} "
                             f"({','.join(header)})")
        rows.append((number, dict(zip(header, fields, strict=True))))
    return header, rows


def finite_number(value: str, path: Path, line: int, column: str, integer: bool = False) -> float:
    """`value` as a finite float (an int with `integer`), else a ValueError naming file, line and column (inf
    and nan are refused: one of them would turn every aggregate into inf or nan)."""
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{path}: line {line}: {column}={value!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{path}: line {line}: {column}={value!r} is not finite; allowed: a finite number")
    if integer:
        if number != int(number):
            raise ValueError(f"{path}: line {line}: {column}={value!r} is not an integer")
        return int(number)
    return number


def evaluations(folder: Path, column: str = "return") -> dict[str, dict[int, float]]:
    """Per task and evaluation step: the mean of `column` over that evaluation's episodes (eval.csv).

    A cut-off last line is a TruncatedFile; a row of the wrong width, or a step or `column` value that is not
    a finite number, is a ValueError naming the file and line."""
    path = Path(folder) / "eval.csv"
    if not path.exists():
        return {}
    sums: dict[str, dict[int, list[float]]] = {}
    for line, row in read_csv_rows(path, ("step", "task", column), whole_lines=True)[1]:
        step = finite_number(row["step"], path, line, "step", integer=True)
        value = finite_number(row[column], path, line, column)
        sums.setdefault(row["task"], {}).setdefault(step, []).append(value)
    return {task: {step: sum(v) / len(v) for step, v in sorted(steps.items())} for task, steps in sorted(sums.items())}


def last_evaluation(folder: Path, column: str = "return") -> dict[str, tuple[int, float]]:
    """Per task: (step, mean of `column`) over the episodes of the latest evaluation in eval.csv."""
    return {task: max(steps.items()) for task, steps in evaluations(folder, column).items()}


LOCK = "RUNNING.lock"
HEARTBEAT_S = 60.0  # a held lock's file is touched this often
STALE_S = 600.0  # a lock untouched this long belongs to a dead process, whatever its host


class RunLock:
    """Exclusive claim on a run folder, so two processes never train the same run at once.

    The lock file holds pid and host, and a background thread touches it every HEARTBEAT_S seconds. It
    appears with its content (written to a temporary file, then hard-linked to the lock's name, which fails
    if the name exists), so an empty or unreadable lock is never one being written: it is stale (e.g. left
    by a full disk). A lock is also stale when its process is dead on this host, or when it has not been
    touched for STALE_S seconds (its host, e.g. a preempted SLURM node, is gone). Any other lock is
    respected. Taking over a stale lock (check, remove, create) happens under an exclusive `flock` on a
    guard file beside it, so of two processes racing for one stale lock exactly one gets it.
    """

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK
        self.held = False
        self.owner: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with exclusive(self.path.with_name(f".{self.path.name}.guard")):
            if not self._create():
                self.owner = lock_owner(self.path)
                if self.owner is not None:
                    return False
                self.path.unlink(missing_ok=True)  # stale: dead process, empty or unreadable, or untouched
                if not self._create():
                    return False
        self.held = True
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True)
        self._beat.start()
        return True

    def _create(self) -> bool:
        """Create the lock file with its content in one step; False if it exists."""
        content = json.dumps({"pid": os.getpid(), "host": platform.node()})
        fd, tmp = _temporary(self.path)  # readable by others as the umask allows: a status reader sees the owner
        try:
            with os.fdopen(fd, "w") as f:
                f.write(content)
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: exclusive creation, then the content
            try:
                with os.fdopen(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY), "w") as f:
                    f.write(content)
            except FileExistsError:
                return False
        finally:
            Path(tmp).unlink(missing_ok=True)
        return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        if self.held:
            self._stop.set()
            self.path.unlink(missing_ok=True)
            self.held = False


@contextlib.contextmanager
def exclusive(guard: Path) -> Any:
    """An exclusive flock on `guard` (created if needed) for the block; a filesystem without flock support
    runs the block unguarded (the lock's atomic creation still keeps two fresh acquirers apart)."""
    fd = os.open(guard, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the flock


def lock_owner(path: Path) -> dict[str, Any] | None:
    """The live owner {pid, host} of a lock file, or None when there is no lock or it is stale: untouched
    for STALE_S, empty or unreadable (a lock appears with its content, so this is never one being
    written), or held by a dead process on this host."""
    try:
        if time.time() - path.stat().st_mtime > STALE_S:
            return None
        owner = read_json(path)
    except (OSError, ValueError):
        return None
    if not isinstance(owner, dict) or not owner.get("pid"):
        return None
    if owner.get("host") == platform.node() and not pid_alive(owner.get("pid")):
        return None
    return owner


def pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, TypeError, ValueError):
        return False
    return True


def step_budget(env: dict[str, Any], steps: int, offline_updates: int | None = None) -> dict[str, Any]:
    """metadata.json's step_budget: what train.steps (agent steps per task) counts. `reading` is how a budget the
    paper gives in "steps" was read where the suite's paper preset offers a choice (env.paper_steps: simulator |
    agent, Meta-World's "300k steps" at action_repeat 2), "train.steps" where train.steps was set to something
    else, and null where no reading applies. simulator_steps_per_task only where the env config has an
    action_repeat (Atari's frame skip is the protocol's: atari100k.yaml)."""
    repeat = env.get("action_repeat")
    if offline_updates is not None:  # an offline method: no env step, its loop counts updates
        return {"agent_steps_per_task": 0, "offline_updates": offline_updates,
                "action_repeat": None if repeat is None else int(repeat), "simulator_steps_per_task": 0,
                "reading": None}
    reading, budgets = env.get("paper_steps"), env.get("paper_step_budgets") or {}
    if reading is not None and budgets.get(reading) != steps:
        reading = "train.steps"  # an explicit train.steps won over the preset's reading
    return {"agent_steps_per_task": steps, "action_repeat": None if repeat is None else int(repeat),
            "simulator_steps_per_task": None if repeat is None else steps * int(repeat), "reading": reading}
