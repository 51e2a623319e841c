"""MinAtar (Young & Tian 2019): 5 miniature Atari games rendered to RGB, a cheap multi-task suite."""

from __future__ import annotations

import copy
from typing import Any

import cv2
import numpy as np

from mowbench.envs.base import ActionSpace, Step, TaskEnv, TaskInfo

TASKS = ["asterix", "breakout", "freeway", "seaquest", "space_invaders"]
DEFAULT_TASKS = TASKS

EVAL_ENVS = 64  # evaluation envs alive at once by default (train.eval_envs): an env takes well under 1 MiB
DISCRETE_ACTIONS = True  # agents for one kind of action space refuse the other (AgentConfig.check_suite)


def eval_protocol(cfg: dict[str, Any]) -> dict[str, Any]:
    """Evaluation of a MinAtar run: 10 episodes with sampled actions (our choice; no published protocol)."""
    return {"eval_episodes": 10, "eval_greedy": False, "eval_mode": "full"}
N_ACTIONS = 6  # every MinAtar game shares the action set (noop, left, up, right, down, fire)

# One colour per object channel (index 0 = background); fixed so images are identical across runs.
PALETTE = np.array([
    [0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 190]], dtype=np.uint8)


def check(cfg: dict[str, Any]) -> None:
    if not 0.0 <= float(cfg.get("sticky_action_prob", 0.1)) <= 1.0:
        raise ValueError(f"sticky_action_prob={cfg['sticky_action_prob']}; allowed: [0, 1]")
    if int(cfg.get("image_size", 16)) < 10:
        raise ValueError(f"image_size={cfg['image_size']}; allowed: >= 10 for MinAtar's 10x10 grid")


def render_rgb(state: np.ndarray, size: int) -> np.ndarray:
    """(10, 10, C) binary state -> (size, size, 3) uint8; a cell shows its highest active channel."""
    channels = state.shape[-1]
    index = np.max(state * np.arange(1, channels + 1), axis=-1).astype(np.int64)  # (10, 10)
    image = PALETTE[index]
    if size != image.shape[0]:
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_NEAREST)
    return image


class MinAtarEnv(TaskEnv):
    def __init__(self, game: str, index: int, cfg: dict[str, Any], seed: int) -> None:
        from minatar import Environment  # lazy: only this suite needs minatar

        self.size = int(cfg.get("image_size", 16))
        self.max_steps = int(cfg.get("max_episode_steps", 10_000))
        self.env = Environment(game, sticky_action_prob=float(cfg.get("sticky_action_prob", 0.1)),
                               difficulty_ramping=bool(cfg.get("difficulty_ramping", True)))
        self.env.seed(seed)
        legal = set(int(a) for a in self.env.minimal_action_set())
        self.info = TaskInfo("minatar", game, index, self.size,
                             ActionSpace(True, N_ACTIONS, tuple(a in legal for a in range(N_ACTIONS))),
                             protocol={"sticky_action_prob": self.env.sticky_action_prob,
                                       "max_episode_steps": self.max_steps})
        self.t = 0

    def reset(self) -> np.ndarray:
        self.env.reset()
        self.t = 0
        return render_rgb(self.env.state(), self.size)

    def step(self, action: np.ndarray | int) -> Step:
        reward, terminal = self.env.act(int(action))
        self.t += 1
        return Step(render_rgb(self.env.state(), self.size), float(reward), bool(terminal),
                    not terminal and self.t >= self.max_steps)

    def get_state(self) -> Any:
        return {"env": copy.deepcopy(self.env), "t": self.t}

    def set_state(self, state: Any) -> None:
        self.env, self.t = copy.deepcopy(state["env"]), state["t"]


def make(task: str, index: int, cfg: dict[str, Any], seed: int, evaluation: bool = False,
         n_tasks: int = 1) -> MinAtarEnv:
    return MinAtarEnv(task, index, cfg, seed)
