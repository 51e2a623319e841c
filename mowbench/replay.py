"""Per-task replay of transitions with uniform sampling of fixed-length sequences (STORM section 'Training loop'),
stratified by task for multi-task agents."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mowbench.envs.base import TaskInfo


@dataclass(frozen=True)
class StepField:
    """An optional per-step replay field a method declares (Agent.replay_fields), e.g. MCTS visit counts
    StepField((A,)) or root values StepField(()): its shape per step and its dtype. A field named `first` is
    filled by the trainer: 1.0 at the first step of an episode (after a reset), else 0.0."""

    shape: tuple[int, ...] = ()
    dtype: torch.dtype = torch.float32


@dataclass
class Batch:
    """Sequences from replay. obs (B, T, S, S, 3) uint8; action (B, T) long or (B, T, A) float;
    reward, terminal (B, T) float; task (B,) long; legal (B, A) bool; extras: the optional per-step fields
    the agent declared, name -> (B, T, *shape); task_counts: the rows of each task, known on the host where
    the batch was drawn (so a world model need not read them back from the device; None: not known)."""

    obs: torch.Tensor
    action: torch.Tensor
    reward: torch.Tensor
    terminal: torch.Tensor
    task: torch.Tensor
    legal: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    task_counts: tuple[int, ...] | None = None

    def tensors(self) -> list[torch.Tensor]:
        """obs, action, reward, terminal, task and legal, in that order."""
        return [self.obs, self.action, self.reward, self.terminal, self.task, self.legal]

    def to(self, device: torch.device) -> Batch:
        """The batch on `device`. From CPU to CUDA through pinned (page-locked) memory with non-blocking copies:
        the host queues them and goes on while the GPU still runs earlier work, which the copies overlap."""
        if self.obs.device == device:
            return self
        pin = device.type == "cuda" and self.obs.device.type == "cpu"

        def move(x: torch.Tensor) -> torch.Tensor:
            return (x.pin_memory() if pin else x).to(device, non_blocking=pin)

        return Batch(*map(move, self.tensors()), extras={k: move(v) for k, v in self.extras.items()},
                     task_counts=self.task_counts)

    def rows(self, index: torch.Tensor) -> Batch:
        """The sequences at `index` (R,) as a smaller Batch (its task counts unknown on the host)."""
        return Batch(*(x[index] for x in self.tensors()), extras={k: v[index] for k, v in self.extras.items()})


def random_batch(tasks: list[TaskInfo], n: int, length: int, device: torch.device,
                 fields: dict[str, StepField] | None = None) -> Batch:
    """n random sequences of `length` steps over `tasks`, stratified like Replay.sample (rows of task k: k,
    k + N, ...): uniform pixels, legal random actions, normal rewards, 1% terminals. For benchmarks and tests."""
    task = torch.arange(n, device=device) % len(tasks)
    counts = tuple(n // len(tasks) + (k < n % len(tasks)) for k in range(len(tasks)))
    space, size = tasks[0].action, tasks[0].image_size
    legal = torch.as_tensor(np.stack([t.action.legal_mask() for t in tasks]), device=device)
    if space.discrete:  # a uniform choice among each row's legal actions
        scores = torch.rand(n, length, space.n, device=device).masked_fill(~legal[task][:, None], -1.0)
        action = scores.argmax(-1)
    else:
        action = torch.rand(n, length, space.n, device=device) * (space.high - space.low) + space.low
    extras = {name: torch.rand(n, length, *f.shape, device=device).to(f.dtype) for name, f in (fields or {}).items()}
    return Batch(obs=torch.randint(0, 256, (n, length, size, size, 3), dtype=torch.uint8, device=device),
                 action=action, reward=torch.randn(n, length, device=device),
                 terminal=(torch.rand(n, length, device=device) < 0.01).float(), task=task, legal=legal[task],
                 extras=extras, task_counts=counts)


class TaskReplay:
    """Ring buffer of one task: obs (N, S, S, 3) uint8, action, reward, terminal; on `device`.

    Row t holds (o_t, a_t, r_t, d_t): the action taken at o_t and what followed. Sequences are drawn
    uniformly and may cross episode boundaries, as in STORM (its world model sees the reset frame).
    """

    def __init__(self, capacity: int, info: TaskInfo, device: torch.device,
                 fields: dict[str, StepField] | None = None) -> None:
        self.capacity, self.device = capacity, device
        s, a = info.image_size, info.action
        # empty, not zeros: untouched rows cost no resident memory, so 26 Atari games x 100k frames
        # (32 GB if touched up front) only use what has been stored; rows past `size` are never read
        self.obs = torch.empty((capacity, s, s, 3), dtype=torch.uint8, device=device)
        self.action = (torch.zeros(capacity, dtype=torch.long, device=device) if a.discrete
                       else torch.zeros((capacity, a.n), dtype=torch.float32, device=device))
        self.reward = torch.zeros(capacity, dtype=torch.float32, device=device)
        self.terminal = torch.zeros(capacity, dtype=torch.float32, device=device)
        self.extras = {name: torch.zeros((capacity, *f.shape), dtype=f.dtype, device=device)
                       for name, f in (fields or {}).items()}
        self.size = 0
        self.head = 0  # next row to write

    def add(self, obs: np.ndarray, action: Any, reward: float, terminal: bool, extras: dict[str, Any]) -> None:
        i = self.head
        self.obs[i] = torch.as_tensor(obs, device=self.device)
        self.action[i] = torch.as_tensor(action, device=self.device)
        self.reward[i] = reward
        self.terminal[i] = float(terminal)
        for name, column in self.extras.items():  # a declared field without a value this step holds zeros
            column[i] = torch.as_tensor(extras[name], device=self.device) if name in extras else 0
        self.head = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample_index(self, n: int, length: int, rng: np.random.Generator) -> np.ndarray:
        """(n, length) row indices of sequences in chronological order, uniform over valid starts."""
        if self.size < length:
            raise ValueError(f"replay holds {self.size} steps, fewer than a sequence of {length}")
        starts = rng.integers(0, self.size - length + 1, size=n)
        oldest = self.head if self.size == self.capacity else 0
        return (oldest + starts[:, None] + np.arange(length)[None]) % self.capacity

    def state_dict(self) -> dict[str, Any]:
        n = self.size
        return {"obs": self.obs[:n].cpu(), "action": self.action[:n].cpu(), "reward": self.reward[:n].cpu(),
                "terminal": self.terminal[:n].cpu(), "size": n, "head": self.head,
                "extras": {name: column[:n].cpu() for name, column in self.extras.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        n = state["size"]
        for key in ("obs", "action", "reward", "terminal"):
            getattr(self, key)[:n] = state[key].to(self.device)
        for name, column in self.extras.items():
            column[:n] = state["extras"][name].to(self.device)
        self.size, self.head = n, state["head"]


def stratified_counts(n: int, n_tasks: int, rng: np.random.Generator) -> np.ndarray:
    """Sequences per task (n_tasks,) in a batch of n: n // N for every task, and the remainder n % N to
    that many distinct tasks drawn uniformly at random. With n >= N every task is in every batch; with
    fewer, each task's expected share is still exactly n / N (a fixed remainder would give the first
    tasks every extra row, and with n < N leave the last tasks out of every batch). No random draw
    when N divides n, so those batches consume the same random numbers as unstratified ones."""
    counts = np.full(n_tasks, n // n_tasks)
    extra = n % n_tasks
    if extra:
        counts[rng.choice(n_tasks, size=extra, replace=False)] += 1
    return counts


def replay_bytes(capacity: int, tasks: list[TaskInfo], fields: dict[str, StepField] | None = None) -> int:
    """Memory of a full Replay: per stored step an S x S x 3 uint8 frame, the action, reward, terminal and fields."""
    total = 0
    for t in tasks:
        action = 8 if t.action.discrete else 4 * t.action.n
        extra = sum(int(np.prod(f.shape)) * torch.empty((), dtype=f.dtype).element_size()
                    for f in (fields or {}).values())
        total += capacity * (t.image_size ** 2 * 3 + action + 8 + extra)
    return total


def replay_device(setting: bool | None, device: torch.device, nbytes: int, free_bytes: int | None,
                  share: float = 0.5) -> torch.device:
    """Where the replay lives: on the training device (True), in CPU memory (False), or (None) on a GPU when the
    full replay takes at most `share` of its free memory (free_bytes), else in CPU memory. On a CPU run: CPU."""
    if device.type != "cuda":
        return torch.device("cpu")
    if setting is None:
        setting = free_bytes is not None and nbytes <= share * free_bytes
    elif setting and free_bytes is not None and nbytes > free_bytes:  # reserved at once: CUDA's out-of-memory error
        raise ValueError(f"train.replay_on_device=true: the replay takes {nbytes / 2**30:.1f} GiB and the GPU has "
                         f"{free_bytes / 2**30:.1f} GiB free; allowed: false (host memory) or null (by size)")
    return device if setting else torch.device("cpu")




def check_host_memory(capacity: int, stored: int, step_bytes: int, n_tasks: int,
                      available: tuple[int, str] | None) -> None:
    """ValueError, before any step is taken, where a replay held in host memory would not fit once it holds `stored`
    steps per task (step_bytes: one step of every task, replay_bytes(1, ...)). torch reserves the buffers lazily,
    so without this the run would be killed for memory hours later, as the replay fills, and again after every
    resubmission."""
    nbytes = stored * step_bytes
    if available is None or nbytes <= available[0]:
        return

    def size(n: int) -> str:
        return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"

    raise ValueError(f"train.replay_capacity={capacity}: the replay of {n_tasks} task(s) takes {size(nbytes)} of host "
                     f"memory when it holds {stored} steps per task, and {size(available[0])} is available here "
                     f"({available[1]}); allowed: at most {available[0] // step_bytes} steps per task, or more memory "
                     f"for the job (e.g. SLURM's --mem)")


class Replay:
    """One TaskReplay per task; a batch is stratified by task (stratified_counts), rows grouped by task, and
    handed out on `train_device` (default: where it is stored; Batch.to). `fields`: the optional per-step fields
    the agent declared (Agent.replay_fields), returned in Batch.extras."""

    def __init__(self, capacity: int, tasks: list[TaskInfo], device: torch.device, seed: int,
                 fields: dict[str, StepField] | None = None, train_device: torch.device | None = None) -> None:
        self.train_device = train_device or device
        self.tasks = tasks
        self.fields = dict(fields or {})
        self.buffers = [TaskReplay(capacity, t, device, self.fields) for t in tasks]
        self.legal = torch.as_tensor(np.stack([t.action.legal_mask() for t in tasks]), device=device)
        self.rng = np.random.default_rng(seed)
        self.device = device

    def __len__(self) -> int:
        return min(b.size for b in self.buffers)

    def add(self, task: int, obs: np.ndarray, action: Any, reward: float, terminal: bool, **extras: Any) -> None:
        """Store one transition of task `task`: (o_t, a_t, r_t, d_t), d_t the training terminal, and values of
        the declared optional fields (a declared field left out holds zeros at this step)."""
        unknown = sorted(set(extras) - set(self.fields))
        if unknown:
            raise ValueError(f"replay fields {unknown} were not declared; declared: {sorted(self.fields) or 'none'}")
        self.buffers[task].add(obs, action, reward, terminal, extras)

    def sample(self, n: int, length: int) -> Batch:
        counts = stratified_counts(n, len(self.buffers), self.rng)
        parts = []
        for k, (buf, c) in enumerate(zip(self.buffers, counts, strict=True)):
            if c:
                idx = torch.as_tensor(buf.sample_index(int(c), length, self.rng), device=buf.device)
                parts.append((k, idx, buf))
        cat = torch.cat
        task = cat([torch.full((len(idx),), k, dtype=torch.long, device=self.device) for k, idx, _ in parts])
        return Batch(obs=cat([b.obs[i] for _, i, b in parts]), action=cat([b.action[i] for _, i, b in parts]),
                     reward=cat([b.reward[i] for _, i, b in parts]), terminal=cat([b.terminal[i] for _, i, b in parts]),
                     task=task, legal=self.legal[task],
                     extras={name: cat([b.extras[name][i] for _, i, b in parts]) for name in self.fields},
                     task_counts=tuple(int(c) for c in counts)).to(self.train_device)

    def state_dict(self) -> dict[str, Any]:
        return {"buffers": [b.state_dict() for b in self.buffers], "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for b, s in zip(self.buffers, state["buffers"], strict=True):
            b.load_state_dict(s)
        self.rng.bit_generator.state = state["rng"]
