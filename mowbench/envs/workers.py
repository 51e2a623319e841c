"""Env worker processes: the envs of a run stepped and rendered in N processes (`train.env_workers=N`), frames
returned through shared memory.

A run's envs are otherwise stepped one after another in the training process, and on Meta-World from pixels each
step is a software (osmesa) or EGL render of ~15-45 ms: 50 tasks make a round of 50 renders in a row while the
other cores idle. Here each env lives in one of N workers (`EnvWorkers.make` returns a `RemoteEnv`, a TaskEnv
like any other), and `envs.step_all` / `envs.reset_all` send every worker its envs' actions before reading any
reply, so the workers render at the same time. Each env is built in its worker by `envs.make_env` with the seed
it would have in the training process, and owns all of its randomness, so the frames, rewards and episodes are the
same as with N=0 (tests compare them).

The workers are plain `python -m mowbench.envs.workers` processes, not multiprocessing children: a spawned child
would import the parent's `__main__` (the trainer, torch and all) before doing anything. Each gets one end of a
socket pair for requests and an anonymous shared-memory file that holds one frame slot per env; replies carry only
the scalars. They ignore SIGINT, SIGTERM and SIGUSR2, which a scheduler sends to every process of a job: the
training process, which does checkpoint on them, still needs its envs' states for the checkpoint. A worker leaves
when its socket closes (the training process ended, however it ended).
"""

from __future__ import annotations

import itertools
import mmap
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np

from mowbench.envs import make_env, suite_module
from mowbench.envs.base import Step, TaskEnv, TaskInfo

SLOTS = 256  # frame slots per worker: more envs alive on one worker than this pass their frames in the replies
WORKER_SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR2")  # what the training process handles, never its workers


# a send's envs, and per worker: (worker, request, its envs)
Ticket = tuple[list["RemoteEnv"], list[tuple[int, int, list["RemoteEnv"]]]]


class WorkerDied(RuntimeError):
    """A worker process ended while the training process still needed it (killed, out of memory)."""


EnvMaker = Callable[..., TaskEnv]  # (task index, seed, evaluation=False) -> the env envs.make_env makes


def env_maker(n: int, suite: str, tasks: Sequence[str], cfg: dict[str, Any], opened: ExitStack
              ) -> tuple[EnvMaker, EnvWorkers | None]:
    """Where a run's envs are made: in `n` worker processes (closed with `opened`) when n > 0, else in this process;
    either way make(index, seed, evaluation) is the env envs.make_env(suite, tasks, index, cfg, seed, evaluation)
    makes. Also returns the workers (None for n=0)."""
    if n:
        workers = opened.enter_context(env_workers(n, suite, tasks, cfg))
        return workers.make, workers
    suite_module(suite).check(cfg)

    def make(index: int, seed: int, evaluation: bool = False) -> TaskEnv:
        return make_env(suite, tasks, index, cfg, seed, evaluation)

    return make, None


def env_workers(n: int, suite: str, tasks: Sequence[str], cfg: dict[str, Any]) -> EnvWorkers:
    """`n` env worker processes for a run of `tasks` (close them when done): their `make(index, seed, evaluation)`
    builds the env envs.make_env builds, in a worker. Frame slots are sized for the suite's image_size."""
    size = int(cfg.get("image_size", 64))
    return EnvWorkers(n, suite, tasks, cfg, frame_bytes=size * size * 3)


class EnvWorkers:
    """`n` worker processes that build, step, render and close the envs of one run (suite `suite`, its task list
    `tasks`, the suite's config `cfg`, frames of at most `frame_bytes` bytes through shared memory). Close it (or use
    it as a context manager) to end the workers; their envs are closed with them."""

    def __init__(self, n: int, suite: str, tasks: Sequence[str], cfg: dict[str, Any], frame_bytes: int) -> None:
        if n < 1:
            raise ValueError(f"train.env_workers={n}; allowed: a positive integer here (0: no workers)")
        mod = suite_module(suite)
        mod.check(cfg)
        if hasattr(mod, "prepare_workers"):  # e.g. Meta-World's MUJOCO_GL, chosen once here and inherited
            mod.prepare_workers(cfg)
        self.frame_bytes = max(1, int(frame_bytes))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.conns: list[Connection] = []
        self.frames: list[mmap.mmap] = []
        self.free: list[list[int]] = []  # per worker: its free frame slots
        self.live: list[int] = []  # per worker: envs alive there
        self.replies: list[dict[int, tuple[bool, Any]]] = []  # per worker: replies read before they were waited for
        self.stepped = 0  # env steps requested (what a benchmark counts)
        self.seq = itertools.count()
        self.env_ids = itertools.count()
        spec = pickle.dumps({"suite": suite, "tasks": list(tasks), "cfg": cfg, "frame_bytes": self.frame_bytes})
        try:
            for k in range(n):
                self._start(k, spec)
        except BaseException:
            self.close()
            raise

    def _start(self, k: int, spec: bytes) -> None:
        size = SLOTS * self.frame_bytes
        fd, path = tempfile.mkstemp(prefix="mowbench-frames-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
        os.unlink(path)  # anonymous: freed when the last of the two processes closes it
        os.ftruncate(fd, size)
        ours, theirs = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[2]),
                                                                           os.environ.get("PYTHONPATH")]))}
        proc = subprocess.Popen([sys.executable, "-m", "mowbench.envs.workers", str(theirs.fileno()), str(fd),
                                 str(k)], pass_fds=(theirs.fileno(), fd), env=env, stdin=subprocess.DEVNULL)
        theirs.close()
        self.frames.append(mmap.mmap(fd, size))
        os.close(fd)
        self.procs.append(proc)
        self.conns.append(Connection(ours.detach()))
        self.free.append(list(range(SLOTS - 1, -1, -1)))
        self.live.append(0)
        self.replies.append({})
        self._wait(k, self._send(k, "init", spec, reply=True))

    # ---- requests ----
    def _send(self, k: int, op: str, payload: Any, reply: bool) -> int | None:
        seq = next(self.seq) if reply else None
        try:
            self.conns[k].send((seq, op, payload))
        except OSError:
            raise self._died(k) from None
        return seq

    def _died(self, k: int) -> WorkerDied:
        code = self.procs[k].poll()
        return WorkerDied(f"env worker {k} (pid {self.procs[k].pid}) ended with exit code {code} while its envs were "
                          "in use; see the lines above for its error (out of memory, killed)")

    def _wait(self, k: int, seq: int | None) -> Any:
        """The reply to request `seq` of worker `k` (replies to other requests read meanwhile are kept)."""
        assert seq is not None
        box = self.replies[k]
        while seq not in box:
            conn = self.conns[k]
            while not wait([conn], timeout=5.0):  # a dead worker is noticed, not waited on for ever
                if self.procs[k].poll() is not None:
                    raise self._died(k)
            try:
                got, ok, value = conn.recv()
            except (EOFError, OSError):
                raise self._died(k) from None
            box[got] = (ok, value)
        ok, value = box.pop(seq)
        if not ok:
            raise value
        return value

    def _frame(self, k: int, slot: int | None, shape: tuple[int, ...] | None, inline: np.ndarray | None) -> np.ndarray:
        if inline is not None:
            return inline
        assert slot is not None and shape is not None
        view = np.frombuffer(self.frames[k], np.uint8, int(np.prod(shape)), slot * self.frame_bytes)
        return view.reshape(shape).copy()

    # ---- envs ----
    def make(self, index: int, seed: int, evaluation: bool = False) -> RemoteEnv:
        """The env of task `index` that envs.make_env(suite, tasks, index, cfg, seed, evaluation) makes, built in the
        worker with the fewest live envs (the call returns at once; its info is read when first needed)."""
        k = min(range(len(self.procs)), key=lambda w: (self.live[w], w))
        slot = self.free[k].pop() if self.free[k] else None
        env_id = next(self.env_ids)
        seq = self._send(k, "make", (env_id, index, seed, evaluation, slot), reply=True)
        self.live[k] += 1
        return RemoteEnv(self, k, env_id, slot, seq)

    def send(self, op: str, envs: Sequence[RemoteEnv], args: Sequence[Any]) -> Ticket:
        """Request `op` ("step" with one action per env, or "reset") of `envs` (all of this pool's): one request per
        worker, all sent before any reply is read (gather), so the workers step and render at the same time."""
        groups: dict[int, list[tuple[RemoteEnv, Any]]] = {}
        for env, arg in zip(envs, args, strict=True):
            if env.closed:
                raise ValueError(f"env {env.env_id} of env worker {env.worker} is closed")
            groups.setdefault(env.worker, []).append((env, arg))
        self.stepped += len(envs) if op == "step" else 0
        return list(envs), [(k, self._send(k, op, [(e.env_id, arg) for e, arg in members], reply=True),
                             [e for e, _ in members]) for k, members in groups.items()]

    def gather(self, ticket: Ticket) -> list[Any]:
        """The replies to a send, in the order of its envs: Steps, or first frames."""
        envs, requests = ticket
        out: dict[int, Any] = {}
        for k, seq, members in requests:
            for env, reply in zip(members, self._wait(k, seq), strict=True):
                if len(reply) == 2:  # reset: (shape, inline frame)
                    out[id(env)] = self._frame(k, env.slot, *reply)
                else:
                    reward, terminated, truncated, life_loss, success, shape, inline = reply
                    out[id(env)] = Step(self._frame(k, env.slot, shape, inline), reward, terminated, truncated,
                                        life_loss, success)
        return [out[id(e)] for e in envs]

    def call(self, env: RemoteEnv, op: str, arg: Any = None) -> Any:
        return self._wait(env.worker, self._send(env.worker, op, (env.env_id, arg), reply=True))

    def release(self, env: RemoteEnv) -> None:
        """Close `env` in its worker (no reply awaited) and free its frame slot."""
        if self.procs[env.worker].poll() is None:
            self._send(env.worker, "close", env.env_id, reply=False)
        if env.slot is not None:
            self.free[env.worker].append(env.slot)
        self.live[env.worker] -= 1

    def close(self) -> None:
        """End every worker (their envs closed first); idempotent."""
        for conn in self.conns:
            try:
                conn.send((None, "quit", None))
            except OSError:
                pass
            conn.close()
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for frames in self.frames:
            frames.close()
        self.conns, self.procs, self.frames = [], [], []

    def __enter__(self) -> EnvWorkers:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class RemoteEnv(TaskEnv):
    """A TaskEnv living in an EnvWorkers process. `envs.step_all` / `envs.reset_all` step many of them at once;
    `step` and `reset` on one env wait for it alone."""

    def __init__(self, workers: EnvWorkers, worker: int, env_id: int, slot: int | None, made: int | None) -> None:
        self.workers, self.worker, self.env_id, self.slot = workers, worker, env_id, slot
        self._made, self._info, self._life_loss_terminal, self._observe = made, None, False, True
        self.closed = False

    def _ready(self) -> None:
        if self._made is not None:  # the make request's reply: the env's info, or the error that building it raised
            made, self._made = self._made, None
            self._info, self._life_loss_terminal = self.workers._wait(self.worker, made)

    @property
    def info(self) -> TaskInfo:  # type: ignore[override]
        self._ready()
        assert self._info is not None
        return self._info

    @property
    def life_loss_terminal(self) -> bool:  # type: ignore[override]
        self._ready()
        return self._life_loss_terminal

    @property
    def observe(self) -> bool:  # type: ignore[override]
        return self._observe

    @observe.setter
    def observe(self, value: bool) -> None:
        if bool(value) != self._observe:
            self._observe = bool(value)
            self.workers._send(self.worker, "observe", (self.env_id, self._observe), reply=False)

    def reset(self) -> np.ndarray:
        return self.workers.gather(self.workers.send("reset", [self], [None]))[0]

    def step(self, action: np.ndarray | int) -> Step:
        return self.workers.gather(self.workers.send("step", [self], [action]))[0]

    def get_state(self) -> Any:
        return self.workers.call(self, "get_state")

    def set_state(self, state: Any) -> None:
        self.workers.call(self, "set_state", state)

    def expert_action(self) -> np.ndarray | int:
        return self.workers.call(self, "expert_action")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.workers.release(self)


# ---- the worker process ----
def serve(conn: Connection, frames: mmap.mmap, index: int) -> None:
    """Answer requests until the socket closes or "quit" comes: (seq, op, payload) -> (seq, ok, value); seq None
    asks for no reply (close, observe), and an error there is printed."""
    spec: dict[str, Any] = {}
    envs: dict[int, tuple[TaskEnv, int | None]] = {}
    broken: dict[int, Exception] = {}  # envs whose making failed: any later request of theirs raises that error

    def env_of(env_id: int) -> tuple[TaskEnv, int | None]:
        if env_id in broken:
            raise broken[env_id]
        return envs[env_id]

    def frame(env_slot: int | None, obs: np.ndarray) -> tuple[tuple[int, ...] | None, np.ndarray | None]:
        obs = np.ascontiguousarray(obs, dtype=np.uint8)
        if env_slot is None or obs.nbytes > spec["frame_bytes"]:
            return None, obs
        np.frombuffer(frames, np.uint8, obs.size, env_slot * spec["frame_bytes"])[:] = obs.ravel()
        return obs.shape, None

    def handle(op: str, payload: Any) -> Any:
        if op == "init":
            spec.update(pickle.loads(payload))
            return None
        if op == "make":
            env_id, task, seed, evaluation, slot = payload
            try:
                env = make_env(spec["suite"], spec["tasks"], task, spec["cfg"], seed, evaluation)
            except Exception as err:
                broken[env_id] = err
                raise
            envs[env_id] = (env, slot)
            return env.info, bool(env.life_loss_terminal)
        if op == "step":
            out = []
            for env_id, action in payload:
                env, slot = env_of(env_id)
                s = env.step(action)
                out.append((s.reward, s.terminated, s.truncated, s.life_loss, s.success, *frame(slot, s.obs)))
            return out
        if op == "reset":
            return [frame(env_of(env_id)[1], env_of(env_id)[0].reset()) for env_id, _ in payload]
        env_id, arg = payload if op != "close" else (payload, None)
        if env_id in broken and op in ("close", "observe"):  # asked without a reply: the error was raised before
            if op == "close":
                del broken[env_id]
            return None
        env = env_of(env_id)[0]
        if op == "close":
            del envs[env_id]
            env.close()
            return None
        if op == "observe":
            env.observe = arg
            return None
        if op == "get_state":
            return env.get_state()
        if op == "set_state":
            return env.set_state(arg)
        if op == "expert_action":
            return env.expert_action()
        raise ValueError(f"unknown env worker request {op!r}")

    try:
        while True:
            try:
                seq, op, payload = conn.recv()
            except (EOFError, OSError):
                break
            if op == "quit":
                break
            try:
                value, ok = handle(op, payload), True
            except Exception as err:  # noqa: BLE001 - sent back and raised in the training process
                if not any("in env worker" in note for note in getattr(err, "__notes__", [])):  # raised once per use
                    err.add_note(f"(in env worker {index}, pid {os.getpid()}:\n{traceback.format_exc().rstrip()})")
                value, ok = err, False
                try:
                    pickle.dumps(err)
                except Exception:  # noqa: BLE001 - an exception that does not pickle: its text
                    value = RuntimeError(f"{type(err).__name__}: {err}\n{traceback.format_exc()}")
                if seq is None:
                    print(f"[mowbench] env worker {index}: {op} failed:\n{traceback.format_exc()}", file=sys.stderr)
            if seq is not None:
                conn.send((seq, ok, value))
    finally:
        for env, _ in envs.values():
            try:
                env.close()
            except Exception:  # noqa: BLE001, S110 - leaving anyway
                pass


def main(argv: list[str]) -> None:
    for name in WORKER_SIGNALS:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    sock_fd, frames_fd, index = (int(a) for a in argv)
    conn = Connection(sock_fd)
    frames = mmap.mmap(frames_fd, 0)
    os.close(frames_fd)
    serve(conn, frames, index)


if __name__ == "__main__":
    main(sys.argv[1:])
