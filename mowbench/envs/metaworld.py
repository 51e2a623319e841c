"""Meta-World (metaworld 3.x, v3 task names) from pixels: MT50 / MT10, corner2 camera, 64x64 RGB.

Protocol choices (the papers leave them open; docs/protocols.md; all are config): action repeat 2, 100 agent steps
per episode (200 simulator steps), an episode counts as a success if info["success"] was 1 at any step,
and a new goal variation of the task is drawn at every reset, each env with its own generator, from the task's
50 variations that every env of the run shares (as Meta-World's MT10/MT50 train and evaluate on one set of 50
per task): metaworld.MT1(task, seed=goal_seed), goal_seed null meaning the run's seed. MUJOCO_GL is chosen
before mujoco is imported: 'egl' when a CUDA device is visible, else 'osmesa'; an existing MUJOCO_GL or `gl:`
wins. `fast_render` turns shadows and reflections off (about 12 -> 30 frames/s at 64x64 on 2 CPU cores with
osmesa) and `multisample=false` turns anti-aliasing off (offsamples=0: a frame of the Sawyer scene, 67k mesh
triangles that bound osmesa's llvmpipe at any image size, 45 -> 15 ms on one core with fast_render). Both
change the image and are opt-in; the protocol records them. An earlier check saw corrupted frames
with offsamples=0; with mujoco 3.3.0 a test checks that such frames are stable and close to the full ones.
"""

from __future__ import annotations

import copy
import functools
import os
import sys
import warnings
from typing import Any

import numpy as np

from mowbench.envs.base import ActionSpace, Step, TaskEnv, TaskInfo

MT10 = ["reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3", "drawer-close-v3",
        "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3", "window-close-v3"]
MT50 = MT10 + [
    "assembly-v3", "basketball-v3", "bin-picking-v3", "box-close-v3", "button-press-topdown-wall-v3",
    "button-press-v3", "button-press-wall-v3", "coffee-button-v3", "coffee-pull-v3", "coffee-push-v3",
    "dial-turn-v3", "disassemble-v3", "door-close-v3", "door-lock-v3", "door-unlock-v3",
    "hand-insert-v3", "drawer-open-v3", "faucet-open-v3", "faucet-close-v3", "hammer-v3",
    "handle-press-side-v3", "handle-press-v3", "handle-pull-side-v3", "handle-pull-v3", "lever-pull-v3",
    "pick-place-wall-v3", "pick-out-of-hole-v3", "plate-slide-v3", "plate-slide-side-v3",
    "plate-slide-back-v3", "plate-slide-back-side-v3", "peg-unplug-side-v3", "soccer-v3",
    "stick-push-v3", "stick-pull-v3", "push-wall-v3", "push-back-v3", "reach-wall-v3",
    "shelf-place-v3", "sweep-into-v3", "sweep-v3"]
MT50 = list(dict.fromkeys(MT50))  # keep order, drop the duplicate drawer-open written for readability
TASKS = MT50
TASK_SETS = {"MT10": MT10, "MT50": MT50}
DEFAULT_TASKS = MT50
GL_BACKENDS = ("auto", "egl", "osmesa", "glfw")

EVAL_ENVS = 8  # evaluation envs alive at once by default (train.eval_envs): one with its renderer takes ~160 MiB
DISCRETE_ACTIONS = False  # agents for one kind of action space refuse the other (AgentConfig.check_suite)
EXPERTS = True  # every task has a scripted expert (metaworld.policies): demonstrations (mowbench.offline)


def eval_protocol(cfg: dict[str, Any]) -> dict[str, Any]:
    """10 evaluation episodes per task with sampled actions; success = success at any step (our choice)."""
    return {"eval_episodes": 10, "eval_greedy": False, "eval_mode": "full"}


def check(cfg: dict[str, Any]) -> None:
    if cfg.get("gl", "auto") not in GL_BACKENDS:
        raise ValueError(f"gl={cfg['gl']!r}; allowed: {', '.join(GL_BACKENDS)}")
    for key in ("action_repeat", "episode_length", "image_size"):
        if int(cfg.get(key, 1)) < 1:
            raise ValueError(f"{key}={cfg[key]}; allowed: a positive integer")
    if cfg.get("paper_steps", "simulator") not in ("simulator", "agent"):  # the paper preset's step reading
        raise ValueError(f"paper_steps={cfg['paper_steps']!r}; allowed: simulator, agent")
    shadow = cfg.get("shadow_size")
    if shadow is not None and (isinstance(shadow, bool) or not isinstance(shadow, int) or shadow < 64):
        raise ValueError(f"shadow_size={shadow!r}; allowed: an integer of at least 64, or null for the model's 4096")
    if shadow is not None and cfg.get("fast_render"):
        raise ValueError(f"shadow_size={shadow} with fast_render=true, which draws no shadows; allowed: shadow_size "
                         f"null with fast_render")
    goal_seed = cfg.get("goal_seed")
    if goal_seed is not None and (isinstance(goal_seed, bool) or not isinstance(goal_seed, int)):
        raise ValueError(f"goal_seed={cfg['goal_seed']!r}; allowed: an integer, or null for the run's seed")


def choose_gl(requested: str = "auto") -> str:
    """Set MUJOCO_GL (and PYOPENGL_PLATFORM) before mujoco is imported; returns the backend in use."""
    if requested == "auto":
        if "MUJOCO_GL" in os.environ:
            return os.environ["MUJOCO_GL"]
        import torch

        requested = "egl" if torch.cuda.is_available() else "osmesa"
    if "mujoco" in sys.modules and os.environ.get("MUJOCO_GL") != requested:
        raise RuntimeError(f"mujoco was imported before mowbench chose MUJOCO_GL (now "
                           f"{os.environ.get('MUJOCO_GL')!r}); set MUJOCO_GL={requested} before importing it")
    os.environ["MUJOCO_GL"] = requested
    if requested in ("egl", "osmesa"):
        os.environ["PYOPENGL_PLATFORM"] = requested
    return requested


@functools.cache
def goal_variations(task: str, seed: int) -> tuple[Any, ...]:
    """The task's 50 goal variations (metaworld.MT1's train tasks) drawn with `seed`: a pure function of its
    arguments (MT1 seeds numpy's global generator and restores it), cached because drawing them resets a fresh
    simulator 50 times, once for every env of a run otherwise."""
    import metaworld

    return tuple(metaworld.MT1(task, seed=seed).train_tasks)


@functools.cache
def parsed_model(path: str) -> Any:
    """The MjModel of a Meta-World XML file, parsed once per process; envs take copies of it."""
    import mujoco

    return mujoco.MjModel.from_xml_path(path)


@functools.cache
def env_class(task: str) -> type:
    """Meta-World's class for the task, changed only in where its MjModel comes from: a copy of the model parsed
    once per process instead of a parse in every constructor (gymnasium's MujocoEnv parses its XML file each
    time, most of an env's construction; an MT50 evaluation builds 500 envs and its random baseline 1,000). The
    offscreen buffer is grown as gymnasium grows it; a test checks that a built env equals Meta-World's own."""
    import mujoco
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    base = ALL_V3_ENVIRONMENTS[task]

    def _initialize_simulation(self: Any) -> tuple[Any, Any]:
        model = copy.copy(parsed_model(self.fullpath))  # MjModel.__copy__: a full copy of its own
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, self.width)
        model.vis.global_.offheight = max(model.vis.global_.offheight, self.height)
        return model, mujoco.MjData(model)

    # the same name: Meta-World records the class name as the env's task_name (envs are never pickled here)
    return type(base.__name__, (base,), {"_initialize_simulation": _initialize_simulation})


class MetaWorldEnv(TaskEnv):
    def __init__(self, task: str, index: int, cfg: dict[str, Any], seed: int) -> None:
        self.gl = choose_gl(cfg.get("gl", "auto"))
        import mujoco  # lazy: only this suite needs metaworld/mujoco

        self.size = int(cfg.get("image_size", 64))
        self.repeat = int(cfg.get("action_repeat", 2))
        self.length = int(cfg.get("episode_length", 100))
        self.camera = str(cfg.get("camera", "corner2"))
        goal_seed = cfg.get("goal_seed")
        goal_seed = int(cfg.get("run_seed", seed) if goal_seed is None else goal_seed)
        self.tasks = goal_variations(task, goal_seed)
        self.env = env_class(task)()
        self.env.seed(seed)
        self.rng = np.random.default_rng(seed)
        model = self.env.model
        cam = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, self.camera)
        if cam < 0:
            raise ValueError(f"camera={self.camera!r} not in the {task} model")
        if cfg.get("camera_pos") is not None:
            model.cam_pos[cam] = np.asarray(cfg["camera_pos"], dtype=np.float64)
        if not cfg.get("multisample", True):
            model.vis.quality.offsamples = 0  # read when the renderer's context is made
        self.fast_render = bool(cfg.get("fast_render", False))
        self.shadow_size = cfg.get("shadow_size")  # null: the model's (4096)
        # made at the first frame: an env that never observes (the random policy's) needs no GL context
        self.renderer: mujoco.Renderer | None = None
        self.cam = cam
        # Meta-World's corner cameras are mounted upside down (table legs up in the raw frame, also in
        # gymnasium's renderer); flip rows so the table is at the bottom. A test checks it.
        self.flip = bool(cfg.get("flip_vertical", True))
        self.info = TaskInfo("metaworld", task, index, self.size, ActionSpace(False, 4),
                             protocol={"action_repeat": self.repeat, "episode_length": self.length,
                                       "camera": self.camera, "flip_vertical": self.flip,
                                       "fast_render": self.fast_render,
                                       "multisample": bool(cfg.get("multisample", True)),
                                       "camera_pos": [float(x) for x in model.cam_pos[cam]], "gl": self.gl,
                                       "goal_seed": goal_seed})
        if self.shadow_size is not None:  # recorded only when set: the protocol of default runs (and the key of
            self.info.protocol["shadow_size"] = int(self.shadow_size)  # their cached demonstrations) stays as it was
        self.t = 0
        self.task = task
        self.state: np.ndarray | None = None  # the simulator's 39-d observation, read by the scripted expert
        self.expert: Any = None  # made at the first expert_action

    def make_renderer(self) -> Any:
        """The offscreen renderer (its GL context reads the model's offsamples), shadows and reflections off with
        fast_render. Its context's buffers are made only as large as the frames need: an offscreen buffer of the
        image's size instead of Meta-World's 640 x 480, and no shadow map when shadows are off (a 4096^2 depth
        map). The frames are the same bits (a test checks it) and each env takes less memory (docs/performance.md):
        osmesa keeps the buffers in host memory, EGL in the GPU's. `shadow_size` sets the shadow map's side
        instead (opt-in: it changes the shadows' edges)."""
        import mujoco

        vis = self.env.model.vis
        sizes = vis.global_.offwidth, vis.global_.offheight, vis.quality.shadowsize
        vis.global_.offwidth = vis.global_.offheight = self.size
        if self.fast_render:
            vis.quality.shadowsize = 0
        elif self.shadow_size is not None:
            vis.quality.shadowsize = int(self.shadow_size)
        try:  # the context reads the sizes once, when it is made; the model keeps Meta-World's values
            renderer = mujoco.Renderer(self.env.model, self.size, self.size)
        finally:
            vis.global_.offwidth, vis.global_.offheight, vis.quality.shadowsize = sizes
        if self.fast_render:
            renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = False
            renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = False
        return renderer

    def render(self) -> np.ndarray:
        if not self.observe:
            return np.zeros((self.size, self.size, 3), np.uint8)
        if self.renderer is None:
            self.renderer = self.make_renderer()
        self.renderer.update_scene(self.env.data, camera=self.cam)
        frame = self.renderer.render()  # (S, S, 3) uint8
        return np.ascontiguousarray(frame[::-1] if self.flip else frame)

    def reset(self) -> np.ndarray:
        self.env.set_task(self.tasks[int(self.rng.integers(len(self.tasks)))])
        self.state = self.env.reset()[0]
        self.t = 0
        return self.render()

    def step(self, action: np.ndarray | int) -> Step:
        action = np.clip(np.asarray(action, dtype=np.float32), -1.0, 1.0)
        reward, success = 0.0, 0.0
        for _ in range(self.repeat):
            self.state, r, _, _, info = self.env.step(action)
            reward += float(r)
            success = max(success, float(info["success"]))
        self.t += 1
        # Meta-World never terminates; episodes end by the time limit only.
        return Step(self.render(), reward, False, self.t >= self.length, success=success)

    def expert_action(self) -> np.ndarray:
        """Meta-World's scripted policy for this task (metaworld.policies) on the simulator's current state: the
        action the trainer repeats action_repeat times, as it repeats the agent's. (4,) float32 in [-1, 1]."""
        if self.state is None:
            raise RuntimeError("expert_action before reset")
        if self.expert is None:
            from metaworld.policies import ENV_POLICY_MAP

            self.expert = ENV_POLICY_MAP[self.task]()
        with warnings.catch_warnings():  # "Constant(s) may be too high": the step clips them, as Meta-World's does
            warnings.simplefilter("ignore", UserWarning)
            return np.clip(self.expert.get_action(self.state), -1.0, 1.0).astype(np.float32)

    def close(self) -> None:
        if self.renderer is not None:
            self.renderer.close()
        self.env.close()


def make(task: str, index: int, cfg: dict[str, Any], seed: int, evaluation: bool = False,
         n_tasks: int = 1) -> MetaWorldEnv:
    return MetaWorldEnv(task, index, cfg, seed)


def prepare_workers(cfg: dict[str, Any]) -> None:
    """Before env worker processes start (mowbench.envs.workers): MUJOCO_GL chosen here, once, and inherited by
    them, so that each worker does not import torch to look for a GPU."""
    choose_gl(cfg.get("gl", "auto"))
