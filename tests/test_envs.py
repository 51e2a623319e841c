"""Protocol settings on the real ALE, MinAtar and the real MuJoCo renderer."""

import numpy as np
import pytest

from mowbench.envs import atari as atari_mod
from mowbench.envs import make_envs, resolve_tasks, suite_module


def atari(game="Pong", **cfg):
    return make_envs("atari100k", [game], {"protocol": "storm", **cfg}, seed=0)[0]


def test_atari_suite_has_the_26_games():
    assert len(resolve_tasks("atari100k", None)) == 26
    with pytest.raises(ValueError, match="unknown task 'Pongg' for suite 'atari100k'; allowed: Alien"):
        resolve_tasks("atari100k", "Pongg")
    with pytest.raises(ValueError, match="unknown suite 'atari57'; allowed: atari100k, metaworld, minatar"):
        suite_module("atari57")


@pytest.mark.parametrize("name,sticky,noops,episodes", [("storm", 0.25, 0, 20), ("standard", 0.0, 30, 100)])
def test_atari_protocol_settings_on_the_ale(name, sticky, noops, episodes):
    env = atari(protocol=name)
    ale = env.ale
    assert ale.getFloat("repeat_action_probability") == 0.0  # the wrapper makes actions sticky (see below)
    assert env.p["sticky_action_prob"] == sticky
    assert ale.getInt("frame_skip") == 1  # frame skipping is done by the wrapper, with max-pooling
    assert ale.getInt("max_num_frames_per_episode") == 108_000  # 27k agent steps
    p = env.info.protocol
    assert (p["frame_skip"], p["max_pool_frames"], p["max_episode_steps"]) == (4, 2, 27_000)
    assert p["noop_max"] == noops and p["eval_episodes"] == episodes and p["eval_greedy"] is False
    assert env.life_loss_terminal
    frames = []
    for _ in range(8):
        env.reset()
        frames.append(ale.getEpisodeFrameNumber())
    if noops:
        assert all(1 <= f <= 30 for f in frames) and len(set(frames)) > 1
    else:
        assert frames == [0] * 8
    assert atari_mod.eval_protocol({"protocol": name}) == {"eval_episodes": episodes, "eval_greedy": False,
                                                           "eval_mode": "reference" if name == "storm" else "full"}


def test_atari_observation_and_minimal_action_sets():
    pong, breakout = atari("Pong"), atari("Breakout")
    obs = pong.reset()
    assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8
    assert pong.info.action.n == 6 and breakout.info.action.n == 4
    full = atari("Breakout", action_set="full")
    assert full.info.action.n == 18 and full.info.action.legal_mask().sum() == 4


def test_atari_frame_skip_max_pools_the_last_two_frames():
    import cv2

    env = atari("Breakout", protocol="standard")  # no sticky actions: the replay below is exact
    env.reset()
    for _ in range(10):
        env.step(1)
    state = env.get_state()
    step = env.step(2)
    env.set_state(state)
    screens, reward = [], 0
    for _ in range(4):
        reward += env.ale.act(env._ale_actions[2])
        screens.append(env.ale.getScreenRGB())
    expected = cv2.resize(np.maximum(screens[2], screens[3]), (64, 64), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(step.obs, expected)
    assert step.reward == reward


def test_atari_life_loss_is_a_training_terminal_but_the_episode_goes_on():
    env = atari("Breakout")
    env.reset()
    rng = np.random.default_rng(0)
    lives = env.ale.lives()
    for _ in range(5000):
        step = env.step(int(rng.integers(4)))
        if step.life_loss:
            assert not step.terminated and env.train_terminal(step)
            assert env.ale.lives() == lives - 1
            break
    else:
        pytest.fail("no life lost in 5000 random Breakout steps")


def test_atari_episode_cap_truncates():
    env = atari("Pong")
    env.p["max_episode_steps"] = 5  # the protocol value is asserted above; a small cap to reach it
    env.reset()
    steps = [env.step(0) for _ in range(5)]
    assert [s.truncated for s in steps] == [False] * 4 + [True] and not steps[-1].terminated


def assert_restore_is_exact(env, n_actions, steps):
    state = env.get_state()
    first = [env.step(i % n_actions).obs for i in range(steps)]
    env.set_state(state)
    second = [env.step(i % n_actions).obs for i in range(steps)]
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


class RecordingALE:
    """The real ALE, recording the action executed at every emulator frame."""

    def __init__(self, ale):
        self.ale, self.executed = ale, []

    def act(self, action):
        self.executed.append(action.value)
        return self.ale.act(action)

    def __getattr__(self, name):
        return getattr(self.ale, name)


def test_atari_sticky_actions_repeat_the_previous_frames_action_with_probability_p():
    """Per frame, with probability p the previous frame's action runs again (Machado et al. 2018). A step
    that asks for a new action then runs it on frame k of 4 with probability 1 - p^k, so the share of frames
    running the requested action is 1 - (p + p^2 + p^3 + p^4) / 4 = 0.91699 for p = 0.25."""
    env = atari("Pong")  # storm protocol: p = 0.25, no no-op starts
    env.reset()
    env.ale = recorder = RecordingALE(env.ale)
    up, down = env.actions.index(3), env.actions.index(4)  # RIGHT, LEFT (Pong's paddle moves up, down)
    requested = []
    for i in range(600):  # a Pong game lasts longer
        env.step(up if i % 2 else down)
        requested += [env.actions[up if i % 2 else down]] * 4
    assert len(recorder.executed) == 2400  # no game over cut a step short
    share = np.mean(np.array(recorder.executed) == np.array(requested))
    assert share == pytest.approx(1 - (0.25 + 0.25**2 + 0.25**3 + 0.25**4) / 4, abs=0.02)
    assert set(recorder.executed) == {3, 4}
    never = atari("Pong")
    never.p["sticky_action_prob"] = 1.0  # every frame repeats the previous one: NOOP from the reset on
    never.reset()
    never.ale = recorder = RecordingALE(never.ale)
    for _ in range(10):
        never.step(up)
    assert recorder.executed == [0] * 40


def test_atari_state_restore_is_exact_in_a_new_process_for_the_26_games():
    """A checkpointed mid-episode state (pickled, as in checkpoint.pt) restored into a newly made env goes on
    exactly as the original, sticky actions included, for every game. Failed on ale-py's own sticky actions
    (its state lacks the previous action) and for Qbert on any emulator restored right after its reset."""
    import pickle

    for game in resolve_tasks("atari100k", None):
        env = make_envs("atari100k", [game], {"protocol": "storm"}, seed=1)[0]
        env.reset()
        actions = np.random.default_rng(0).integers(0, env.info.action.n, 80)
        for a in actions[:40]:
            if env.step(a).terminated:
                env.reset()
        state = pickle.loads(pickle.dumps(env.get_state()))
        fresh = make_envs("atari100k", [game], {"protocol": "storm"}, seed=99)[0]
        fresh.set_state(state)
        for i, a in enumerate(actions[40:]):
            one, two = env.step(a), fresh.step(a)
            assert np.array_equal(one.obs, two.obs) and one.reward == two.reward, (game, i)
            if one.terminated:
                env.reset(), fresh.reset()
    qbert = atari("Qbert", protocol="standard")  # no sticky actions: only the emulator restore
    qbert.reset()
    for _ in range(30):
        qbert.step(1)
    fresh = atari("Qbert", protocol="standard")
    fresh.set_state(qbert.get_state())
    assert all(np.array_equal(qbert.step(a).obs, fresh.step(a).obs) for a in (2, 3, 4, 5, 1))


def test_minatar_suite_rgb_masks_and_restore():
    envs = make_envs("minatar", resolve_tasks("minatar", None), {"image_size": 20}, seed=0)
    assert [e.info.name for e in envs] == ["asterix", "breakout", "freeway", "seaquest", "space_invaders"]
    assert [int(e.info.action.legal_mask().sum()) for e in envs] == [5, 3, 3, 6, 4]
    assert all(e.info.action.n == 6 for e in envs)
    env = envs[1]
    obs = env.reset()
    assert obs.shape == (20, 20, 3) and obs.dtype == np.uint8 and obs.max() > 0
    assert_restore_is_exact(env, 6, 30)


def test_minatar_render_colours_by_channel():
    from mowbench.envs.minatar import PALETTE, render_rgb

    state = np.zeros((10, 10, 3), dtype=bool)
    state[0, 0, 0] = state[9, 9, 2] = state[9, 9, 1] = True
    image = render_rgb(state, 10)
    assert tuple(image[0, 0]) == tuple(PALETTE[1]) and tuple(image[9, 9]) == tuple(PALETTE[3])
    assert tuple(image[5, 5]) == (0, 0, 0)


# ---- Meta-World on the real MuJoCo renderer (osmesa on CPU) ----

def metaworld_env(task="reach-v3", **cfg):
    base = {"camera_pos": [0.75, 0.075, 0.7], "action_repeat": 2, "episode_length": 100}
    return make_envs("metaworld", [task], {**base, **cfg}, seed=0)[0]


def test_metaworld_task_lists():
    assert len(resolve_tasks("metaworld", "MT50")) == 50 and len(resolve_tasks("metaworld", "MT10")) == 10
    assert all(t.endswith("-v3") for t in resolve_tasks("metaworld", None))


def test_metaworld_pixels_shape_orientation_and_time_limit():
    env = metaworld_env(episode_length=3)
    obs = env.reset()
    assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8
    assert env.info.action.discrete is False and env.info.action.n == 4
    assert env.info.protocol["camera_pos"] == [0.75, 0.075, 0.7]
    # the wooden table top (brown: R > G > B) must be in the lower half of an upright image
    img = obs.astype(int)
    brown = (img[..., 0] - img[..., 2] > 40) & (img[..., 0] > img[..., 1]) & (img[..., 1] > img[..., 2])
    assert brown.sum() > 100
    assert np.nonzero(brown)[0].mean() > 32, "image is upside down"
    flipped = metaworld_env(flip_vertical=False).reset()
    np.testing.assert_array_equal(flipped[::-1], metaworld_env().reset())
    steps = [env.step(np.zeros(4)) for _ in range(3)]
    assert [s.truncated for s in steps] == [False, False, True] and not any(s.terminated for s in steps)


def test_metaworld_env_makes_its_renderer_at_its_first_frame():
    """The random policy's evaluation envs never observe: they make no GL context (0.5-1 s and ~120 MiB each, 500
    of them for MT50's random baseline). An env's frames do not depend on when its renderer was made."""
    blind, seeing = metaworld_env(fast_render=True), metaworld_env(fast_render=True)
    blind.observe = False
    assert not blind.reset().any() and not blind.step(np.zeros(4)).obs.any()
    assert blind.renderer is None
    blind.close()  # closes without a renderer
    late = metaworld_env(fast_render=True)
    late.observe = False
    late.reset()
    seeing.reset()
    late.observe = True
    step = np.array([0.3, -0.2, 0.1, 0.0])
    frame = late.step(step).obs
    np.testing.assert_array_equal(frame, seeing.step(step).obs)
    assert late.renderer is not None and frame.std() > 10


def test_metaworld_success_flag_from_info():
    env = metaworld_env(fast_render=True)  # chooses the GL backend before mujoco is imported (by the policies too)
    from metaworld.policies import SawyerReachV3Policy

    env.reset()
    policy = SawyerReachV3Policy()
    successes = []
    for _ in range(60):
        step = env.step(policy.get_action(env.env._get_obs()))
        successes.append(step.success)
    assert set(successes) <= {0.0, 1.0}
    assert successes[0] == 0.0 and max(successes) == 1.0


def test_metaworld_fast_render_changes_only_the_look():
    slow, fast = metaworld_env().reset(), metaworld_env(fast_render=True).reset()
    assert slow.shape == fast.shape and not np.array_equal(slow, fast)
    assert np.abs(slow.astype(int) - fast.astype(int)).mean() < 40


def test_metaworld_without_multisampling_changes_only_the_edges():
    full_env, aliased_env = metaworld_env(fast_render=True), metaworld_env(fast_render=True, multisample=False)
    full, aliased = full_env.reset(), aliased_env.reset()
    assert not np.array_equal(full, aliased) and aliased_env.info.protocol["multisample"] is False
    # frames of one state are the same every time (no stale or garbage buffer content), and after a few steps
    # they still match the anti-aliased render's
    action = np.array([0.5, 0.2, -0.3, 0.0])
    for _ in range(3):
        full, aliased = full_env.step(action).obs, aliased_env.step(action).obs
    np.testing.assert_array_equal(aliased, aliased_env.render())
    assert np.abs(full.astype(int) - aliased.astype(int)).mean() < 10


@pytest.mark.parametrize("fast_render", [False, True])
def test_metaworld_renderer_buffers_fit_the_frames_and_change_no_pixel(fast_render):
    """The renderer's context is made with an offscreen buffer of the image's size (not Meta-World's 640 x 480)
    and, when shadows are off, no shadow map: the frames are the bits a renderer with Meta-World's own buffers
    draws, at reset and after steps, and the model keeps Meta-World's sizes."""
    env = metaworld_env(fast_render=fast_render)  # chooses the GL backend before mujoco is imported
    import mujoco

    vis = env.env.model.vis
    frames = [env.reset()]
    rng = np.random.default_rng(0)
    for _ in range(3):
        frames.append(env.step(rng.uniform(-1, 1, 4)).obs)
        with mujoco.Renderer(env.env.model, 64, 64) as full:  # Meta-World's buffers, the same scene flags
            assert (full._mjr_context.offWidth, full._mjr_context.shadowSize) == (640, 4096)
            full.scene.flags[:] = env.renderer.scene.flags
            full.update_scene(env.env.data, camera=env.cam)
            np.testing.assert_array_equal(frames[-1], full.render()[::-1])
    context = env.renderer._mjr_context
    assert (context.offWidth, context.offHeight) == (64, 64)
    assert context.shadowSize == (0 if fast_render else 4096)  # shadows drawn: their map stays as it is
    assert (vis.global_.offwidth, vis.global_.offheight, vis.quality.shadowsize) == (640, 480, 4096)
    assert not np.array_equal(frames[0], frames[-1])  # the arm moved


def test_metaworld_shadow_size_draws_a_smaller_shadow_map_and_moves_only_shadow_edges():
    """shadow_size=1024 renders the shadows from a 1024^2 map instead of 4096^2: the context has that map, the
    protocol records it (and only when set), the model keeps Meta-World's size, and the frames differ from the
    full ones in a few pixels along the shadows' edges (20-70 of 4096 at 512-2048 when measured), the rest the same
    bits."""
    full_env, small_env = metaworld_env(), metaworld_env(shadow_size=1024)
    rng = np.random.default_rng(0)
    pairs = [(full_env.reset(), small_env.reset())]
    for _ in range(3):
        action = rng.uniform(-1, 1, 4)
        pairs.append((full_env.step(action).obs, small_env.step(action).obs))
    assert small_env.renderer._mjr_context.shadowSize == 1024 and full_env.renderer._mjr_context.shadowSize == 4096
    assert small_env.env.model.vis.quality.shadowsize == 4096
    assert small_env.info.protocol["shadow_size"] == 1024 and "shadow_size" not in full_env.info.protocol
    for full, small in pairs:
        differing = (full != small).any(-1).sum()
        assert 0 < differing < 0.03 * 64 * 64, differing
    for bad, allowed in [(32, "an integer of at least 64"), (True, "an integer of at least 64"),
                         ("big", "an integer of at least 64")]:
        with pytest.raises(ValueError, match=f"shadow_size={bad!r}; allowed: {allowed}"):
            make_envs("metaworld", ["reach-v3"], {"shadow_size": bad}, seed=0)
    with pytest.raises(ValueError, match="shadow_size=1024 with fast_render=true, which draws no shadows"):
        make_envs("metaworld", ["reach-v3"], {"shadow_size": 1024, "fast_render": True}, seed=0)


def test_missing_optional_dependency_breaks_only_its_suite(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "minatar", None)  # as if minatar were not installed
    with pytest.raises(ImportError, match="suite 'minatar' needs the package 'minatar'"):
        make_envs("minatar", ["breakout"], {}, seed=0)
    assert atari().reset().shape == (64, 64, 3)  # other suites are unaffected


def test_metaworld_without_observing_renders_nothing_and_changes_nothing_else():
    """A random policy's evaluation sets observe=False: blank frames, the same rewards and successes."""
    seen, blind = metaworld_env(fast_render=True), metaworld_env(fast_render=True)
    blind.observe = False
    assert seen.reset().any() and not blind.reset().any()
    rng = np.random.default_rng(0)
    for _ in range(3):
        action = rng.uniform(-1, 1, 4)
        a, b = seen.step(action), blind.step(action)
        assert not b.obs.any() and b.obs.shape == a.obs.shape and b.obs.dtype == np.uint8
        assert (a.reward, a.success, a.truncated) == (b.reward, b.success, b.truncated)


def test_metaworld_env_built_from_the_parsed_model_equals_metaworlds_own():
    """Our env class copies a model parsed once per process instead of parsing the XML in every constructor:
    the second env of a task is a model of its own, and it steps and renders exactly as Meta-World's class."""
    from mowbench.envs.metaworld import choose_gl, env_class, goal_variations

    choose_gl()  # before mujoco is imported: osmesa on a machine without a screen or GPU
    import mujoco
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    first, ours, theirs = env_class("window-close-v3")(), env_class("window-close-v3")(), \
        ALL_V3_ENVIRONMENTS["window-close-v3"]()
    assert isinstance(ours, ALL_V3_ENVIRONMENTS["window-close-v3"]) and ours.task_name == theirs.task_name
    assert ours.model is not first.model
    ours.model.cam_pos[0] += 1.0  # an env's edits stay its own (MetaWorldEnv moves its camera)
    assert not np.array_equal(first.model.cam_pos, ours.model.cam_pos)
    ours.model.cam_pos[0] -= 1.0
    for attr in ("nq", "nbody", "ngeom", "nmesh"):
        assert getattr(ours.model, attr) == getattr(theirs.model, attr)
    for attr in ("body_pos", "geom_size", "mesh_vert", "cam_pos", "actuator_ctrlrange"):
        np.testing.assert_array_equal(getattr(ours.model, attr), getattr(theirs.model, attr))
    assert (ours.model.vis.global_.offwidth, ours.model.vis.global_.offheight) == \
        (theirs.model.vis.global_.offwidth, theirs.model.vis.global_.offheight)
    task = goal_variations("window-close-v3", 0)[3]
    traces, frames = [], []
    for env in (ours, theirs):
        env.set_task(task)
        obs, _ = env.reset(seed=5)
        rng, trace = np.random.default_rng(0), [obs]
        for _ in range(5):
            obs, reward, _, _, info = env.step(rng.uniform(-1, 1, 4).astype(np.float32))
            trace += [obs, reward, info["success"]]
        traces.append(trace)
        with mujoco.Renderer(env.model, 16, 16) as renderer:
            renderer.update_scene(env.data, camera="corner2")
            frames.append(renderer.render())
    for a, b in zip(*traces, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(traces[0][0], traces[0][-3])  # the arm moved
    np.testing.assert_array_equal(frames[0], frames[1])
    assert frames[0].any()


def test_metaworld_envs_of_a_run_share_each_tasks_goal_set():
    """Training and evaluation envs of one run draw goals from the same 50 variations (MT1 at the run's seed,
    as Meta-World's MT benchmarks), each env in its own order; another run seed gives another set."""
    import pickle

    from mowbench.envs.metaworld import goal_variations

    def goals(env):
        return [pickle.loads(t.data)["rand_vec"].tobytes() for t in env.tasks]

    train = make_envs("metaworld", ["reach-v3"], {"image_size": 16, "run_seed": 3}, seed=3)[0]
    evaluation = make_envs("metaworld", ["reach-v3"], {"image_size": 16, "run_seed": 3}, seed=3 + 7919,
                           evaluation=True)[0]
    other_run = make_envs("metaworld", ["reach-v3"], {"image_size": 16, "run_seed": 4}, seed=4)[0]
    assert len(set(goals(train))) == 50 and goals(train) == goals(evaluation)
    assert not set(goals(train)) & set(goals(other_run))
    assert train.info.protocol["goal_seed"] == 3 and other_run.info.protocol["goal_seed"] == 4
    assert goal_variations("reach-v3", 3) is goal_variations("reach-v3", 3)  # drawn once per process
    pinned = make_envs("metaworld", ["reach-v3"], {"image_size": 16, "run_seed": 4, "goal_seed": 3}, seed=4)[0]
    assert goals(pinned) == goals(train)
    # each env draws its own sequence of variations from the shared set
    train.reset(), evaluation.reset()
    first = [train.rng.integers(50, size=8).tolist(), evaluation.rng.integers(50, size=8).tolist()]
    assert first[0] != first[1]
    with pytest.raises(ValueError, match="goal_seed='x'; allowed: an integer, or null for the run's seed"):
        make_envs("metaworld", ["reach-v3"], {"goal_seed": "x"}, seed=0)


def test_atari_env_runs_the_emulator_gymnasiums_atarienv_ran_for_the_26_games():
    """The env drives the ALE directly (one ROM load; gymnasium's AtariEnv loads it when made and again when
    seeded). For every game and two seeds, its emulator has the settings and random seed that gym.make("ALE/..-v5")
    plus reset(seed=...) gave, and runs the same frames (screen and RAM) under the same actions, game overs and
    resets included."""
    import ale_py
    import gymnasium as gym

    gym.register_envs(ale_py)
    for game in atari_mod.TASKS:
        for seed in (0, 12345):
            ours = atari_mod.AtariEnv(game, 0, {"protocol": "storm"}, seed)
            ref = gym.make(f"ALE/{game}-v5", frameskip=1, full_action_space=False, repeat_action_probability=0.0,
                           max_num_frames_per_episode=108_000)
            ref.reset(seed=seed)
            a, b = ours.ale, ref.unwrapped.ale
            for key in ("random_seed", "max_num_frames_per_episode", "frame_skip"):
                assert a.getInt(key) == b.getInt(key), (game, key)
            assert a.getFloat("repeat_action_probability") == b.getFloat("repeat_action_probability") == 0.0
            assert a.getMinimalActionSet() == b.getMinimalActionSet()
            actions = a.getMinimalActionSet()
            rng = np.random.default_rng(seed)
            for frame in range(400):
                action = actions[int(rng.integers(len(actions)))]
                assert a.act(action) == b.act(action)
                if frame % 50 == 0 or a.game_over():
                    assert np.array_equal(a.getScreenRGB(), b.getScreenRGB()), (game, seed, frame)
                    assert np.array_equal(a.getRAM(), b.getRAM()), (game, seed, frame)
                if a.game_over() or frame == 200:  # a reset mid-episode too
                    assert b.game_over() == a.game_over()
                    a.reset_game()
                    b.reset_game()
