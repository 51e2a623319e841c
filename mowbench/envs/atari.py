"""Atari 100k on the real ALE (ale-py): the 26 games and the 'storm' and 'standard' protocols."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from mowbench.envs.base import ActionSpace, Step, TaskEnv, TaskInfo

TASKS = ["Alien", "Amidar", "Assault", "Asterix", "BankHeist", "BattleZone", "Boxing", "Breakout",
         "ChopperCommand", "CrazyClimber", "DemonAttack", "Freeway", "Frostbite", "Gopher", "Hero",
         "Jamesbond", "Kangaroo", "Krull", "KungFuMaster", "MsPacman", "Pong", "PrivateEye", "Qbert",
         "RoadRunner", "Seaquest", "UpNDown"]
DEFAULT_TASKS = TASKS
EVAL_ENVS = 64  # evaluation envs alive at once by default (train.eval_envs): an env takes about 3 MiB
DISCRETE_ACTIONS = True  # agents for one kind of action space refuse the other (AgentConfig.check_suite)

# The two Atari 100k protocols (docs/protocols.md). 'storm' is what STORM's and MoW's published
# numbers used: ALE v5 defaults, sticky actions 0.25, no no-op starts, 20 sampled-action eval episodes.
# 'standard' is the Dopamine/DER definition: no sticky actions, up to 30 no-op starts, 100 episodes.
# eval_mode: 'storm' evaluates as STORM's reference code did for the published numbers (5 envs in parallel,
# the first 20 episodes to finish, each without its last step's reward; evaluation.evaluate_reference);
# 'standard' counts every started episode with its full return. train.eval_mode overrides either.
PROTOCOLS: dict[str, dict[str, Any]] = {
    "storm": dict(sticky_action_prob=0.25, noop_max=0, frame_skip=4, max_pool_frames=2,
                  max_episode_steps=27_000, life_loss_terminal=True, eval_episodes=20, eval_greedy=False,
                  eval_mode="reference"),
    "standard": dict(sticky_action_prob=0.0, noop_max=30, frame_skip=4, max_pool_frames=2,
                     max_episode_steps=27_000, life_loss_terminal=True, eval_episodes=100, eval_greedy=False,
                     eval_mode="full"),
}
FULL_ACTIONS = 18


def protocol(cfg: dict[str, Any]) -> dict[str, Any]:
    name = cfg.get("protocol", "storm")
    if name not in PROTOCOLS:
        raise ValueError(f"unknown atari100k protocol {name!r}; allowed: {', '.join(PROTOCOLS)}")
    return {"name": name, **PROTOCOLS[name]}


def eval_protocol(cfg: dict[str, Any]) -> dict[str, Any]:
    p = protocol(cfg)
    return {"eval_episodes": p["eval_episodes"], "eval_greedy": p["eval_greedy"], "eval_mode": p["eval_mode"]}


def rom_name(game: str) -> str:
    """The ALE's name of a game's ROM, as gymnasium's ALE/<game>-v5 registers it ('MsPacman' -> 'ms_pacman')."""
    import ale_py  # lazy: only this suite needs the ALE
    import gymnasium as gym

    gym.register_envs(ale_py)
    return gym.spec(f"ALE/{game}-v5").kwargs["game"]


def ale_seed(seed: int) -> int:
    """The ALE's random_seed for an env seeded `seed`: the one gymnasium's AtariEnv.reset(seed=seed) sets (the
    second word of SeedSequence(seed), as int32), so the emulators run as they did when envs were made through
    gymnasium (tests/test_envs.py compares them)."""
    return int(np.random.SeedSequence(seed).generate_state(2)[1:].astype(np.int32)[0])


def check(cfg: dict[str, Any]) -> None:
    protocol(cfg)
    if cfg.get("action_set", "minimal") not in ("minimal", "full"):
        raise ValueError(f"action_set={cfg['action_set']!r}; allowed: auto, minimal, full")


class AtariEnv(TaskEnv):
    """The ALE (ale_py.ALEInterface, as ALE v5 configures it) at frameskip 1; this wrapper repeats each action
    `frame_skip` times, returns the max of the last `max_pool_frames` RGB screens resized to S x S (INTER_AREA),
    sums rewards, reports life loss (episode continues) and truncates at `max_episode_steps` agent steps.

    The ALE is driven directly rather than through gymnasium's AtariEnv, which loads the ROM when made and again
    when seeded (a cost every evaluation env would pay twice); the settings and seed are AtariEnv's."""

    def __init__(self, game: str, index: int, cfg: dict[str, Any], seed: int) -> None:
        import ale_py  # lazy: only this suite needs the ALE

        self.p = protocol(cfg)
        self.size = int(cfg.get("image_size", 64))
        self.ale = ale_py.ALEInterface()
        self.ale.setLoggerMode(ale_py.LoggerMode.Error)
        self.ale.setFloat("repeat_action_probability", 0.0)  # sticky actions are ours: see step()
        self.ale.setInt("max_num_frames_per_episode", self.p["max_episode_steps"] * self.p["frame_skip"])
        self.ale.setInt("random_seed", ale_seed(seed))
        self.ale.loadROM(str(ale_py.roms.get_rom_path(rom_name(game))))
        self.ale.reset_game()
        self.rng = np.random.default_rng(seed)
        minimal = [int(a.value) for a in self.ale.getMinimalActionSet()]
        if cfg.get("action_set", "minimal") == "full":
            # Shared 18-action space for multi-task agents; the mask marks this game's legal subset.
            self.actions = list(range(FULL_ACTIONS))
            space = ActionSpace(True, FULL_ACTIONS, tuple(a in minimal for a in range(FULL_ACTIONS)))
        else:
            self.actions = minimal
            space = ActionSpace(True, len(minimal))
        self._ale_actions = [ale_py.Action(a) for a in self.actions]
        self._noop = ale_py.Action.NOOP
        self.last_action = self._noop  # the action the emulator executed last (sticky actions repeat it)
        self.life_loss_terminal = bool(self.p["life_loss_terminal"])
        self.info = TaskInfo("atari100k", game, index, self.size, space,
                             protocol={**self.p, "action_set": "full" if len(self.actions) == FULL_ACTIONS and
                                       space.legal is not None else "minimal"})
        self.t = 0
        self.lives = 0
        self._started = False

    def _screen(self) -> np.ndarray:
        return self.ale.getScreenRGB()  # (210, 160, 3) uint8

    def _observe(self, frames: list[np.ndarray]) -> np.ndarray:
        frame = np.maximum.reduce(frames) if len(frames) > 1 else frames[0]
        return cv2.resize(frame, (self.size, self.size), interpolation=cv2.INTER_AREA)

    def reset(self) -> np.ndarray:
        if self._started:
            self.ale.reset_game()
        self._started = True
        for _ in range(int(self.rng.integers(1, self.p["noop_max"] + 1)) if self.p["noop_max"] else 0):
            self.ale.act(0)  # no-op starts at the frame level, as gymnasium's AtariPreprocessing does
            if self.ale.game_over():
                self.ale.reset_game()
        self.t = 0
        self.lives = self.ale.lives()
        self.last_action = self._noop  # as the ALE's own sticky actions start every episode
        return self._observe([self._screen()])

    def step(self, action: np.ndarray | int) -> Step:
        ale_action = self._ale_actions[int(action)]
        reward, frames = 0.0, []
        skip, pool, sticky = self.p["frame_skip"], self.p["max_pool_frames"], self.p["sticky_action_prob"]
        for i in range(skip):
            # Sticky actions (Machado et al. 2018), per emulator frame: with probability p the previous frame's
            # action is executed again. Done here rather than by the ALE, whose saved state lacks the previous
            # action, so that a run resumed from a checkpoint continues exactly.
            if sticky == 0 or self.rng.random() >= sticky:
                self.last_action = ale_action
            reward += self.ale.act(self.last_action)
            if i >= skip - pool:
                frames.append(self._screen())
            if self.ale.game_over():
                frames = frames or [self._screen()]
                break
        self.t += 1
        lives = self.ale.lives()
        life_loss = lives < self.lives
        self.lives = lives
        terminated = self.ale.game_over(with_truncation=False)
        truncated = not terminated and (self.t >= self.p["max_episode_steps"] or self.ale.game_truncated())
        return Step(self._observe(frames), float(reward), terminated, truncated, life_loss=life_loss)

    def get_state(self) -> Any:
        return {"ale": self.ale.cloneState(include_rng=True), "t": self.t, "lives": self.lives,
                "rng": self.rng.bit_generator.state, "started": self._started, "last_action": self.last_action.value}

    def set_state(self, state: Any) -> None:
        # An emulator restored right after a reset_game (as every newly made one is) goes on differently in some
        # games although its restored RAM is equal (Qbert: from the first step; ale-py 0.12). One emulated frame
        # before restoring avoids it (tested on the 26 games: tests/test_envs.py).
        self.ale.act(self._noop)
        self.ale.restoreState(state["ale"])
        self.t, self.lives, self._started = state["t"], state["lives"], state["started"]
        self.rng.bit_generator.state = state["rng"]
        self.last_action = type(self._noop)(state.get("last_action", 0))  # checkpoints before it held none: NOOP


def make(task: str, index: int, cfg: dict[str, Any], seed: int, evaluation: bool = False,
         n_tasks: int = 1) -> AtariEnv:
    return AtariEnv(task, index, cfg, seed)
