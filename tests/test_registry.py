"""Every registered agent (every file in baselines/, including one a user just added) has a preset file for
every global preset, composes and validates at `preset=micro` and `preset=paper`, runs one update on real
MinAtar tasks (Meta-World for continuous-only agents), and benches through the generic interface. A new
baseline is covered with no test edits."""

import copy
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.utils.deterministic

from mowbench.agents.base import make_agent, registered_agents
from mowbench.bench import bench
from mowbench.config import check_agent_preset, compose_config, plan, presets
from mowbench.envs import make_envs
from mowbench.models.packed import Conv2d, Linear
from mowbench.replay import random_batch
from tests.conftest import continuous_only

AGENT_NAMES = sorted(registered_agents())
TASKS = {"minatar": ["breakout", "asterix", "freeway"], "metaworld": ["reach-v3", "push-v3", "door-open-v3"]}


def suites_of(name):
    """(suite of the paper check, suite of the micro run): Atari and MinAtar, or Meta-World for an agent whose
    config refuses discrete actions (the TD-MPC2 family)."""
    return ("metaworld", "metaworld") if continuous_only(name) else ("atari100k", "minatar")


def packed_modules_of(obj, seen=None):
    """Every Linear and Conv2d with packed inference weights that an agent holds: in its modules and in the modules
    of the objects it holds (its learners)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or not hasattr(obj, "__dict__") or isinstance(obj, (torch.Tensor, type)):
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.nn.Module):
        return [m for m in obj.modules() if isinstance(m, (Linear, Conv2d))]
    return [m for value in vars(obj).values() for item in (value if isinstance(value, (list, dict)) else [value])
            for m in packed_modules_of(item.values() if isinstance(item, dict) else item, seen)]


def module_input(module):
    """A fixed input for a Linear (3, in) or a Conv2d (2, C, 16, 16), channels-last as frames are."""
    g = torch.Generator().manual_seed(0)
    if isinstance(module, Linear):
        return torch.randn(3, module.in_features, generator=g)
    return torch.randn(2, 16, 16, module.in_channels, generator=g).permute(0, 3, 1, 2)


def assert_packed_weights_are_fresh(modules):
    """Each module's packed inference weight is the one a copy with its current parameters packs (bitwise):
    whatever changed a weight bumped its version counter, so no stale copy serves acting or imagination."""
    with torch.no_grad():
        for module in modules:
            x = module_input(module)
            assert torch.equal(module(x), copy.deepcopy(module)(x)), module


def test_the_builtin_agents_are_registered_and_every_preset_is_listed():
    assert set(AGENT_NAMES) == {"storm", "monolithic", "mow", "tdmpc2", "newt", "newt-nodemo", "pwm", "pwm-online",
                                "scalezero-lite"}
    assert presets() == ["micro", "paper", "tiny"]


@pytest.mark.parametrize("name", AGENT_NAMES)
def test_every_agent_composes_at_every_preset_updates_once_and_benches(name, monkeypatch):
    entry = registered_agents()[name]
    for preset in presets():  # a missing agent/preset/<name>_<preset>.yaml is an error, not a full-size run
        check_agent_preset(name, preset)
    paper_suite, suite = suites_of(name)
    paper = plan(compose_config([f"agent={name}", "preset=paper", f"env={paper_suite}"]))  # all 26 games or MT50
    n = {"atari100k": 26, "metaworld": 50}[paper_suite]
    assert paper.cfg["env"]["image_size"] == 64 and len(paper.tasks) == n
    assert len(paper.runs) == (1 if entry.multi_task else n)
    tasks = TASKS[suite] if entry.multi_task else TASKS[suite][:1]
    fast = ["env.fast_render=true", "env.multisample=false"] if suite == "metaworld" else []  # looks not checked here
    cfg = compose_config([f"agent={name}", "preset=micro", f"env={suite}", f"task=[{','.join(tasks)}]", *fast])
    micro = plan(cfg)
    assert micro.cfg["env"]["image_size"] == 16
    envs = make_envs(suite, micro.tasks, dict(micro.cfg["env"]), seed=0)
    infos = [e.info for e in envs]
    torch.manual_seed(0)
    agent = make_agent(name, dict(cfg["agent"]), infos, torch.device("cpu"), "fp32")
    fields = agent.replay_fields()
    packed = packed_modules_of(agent)
    assert any(isinstance(m, Linear) for m in packed)
    monkeypatch.setattr("mowbench.models.packed.PACK_MIN_ELEMENTS", 0)  # micro's weights are below the threshold
    with torch.no_grad():
        for module in packed:  # pack every weight before the update changes it
            module(module_input(module))
            assert module.packed
    state = copy.deepcopy(agent.state_dict())
    metrics = agent.update(lambda n, length: random_batch(infos, n, length, torch.device("cpu"), fields))
    assert metrics and all(math.isfinite(v) for v in metrics.values()), metrics
    assert_packed_weights_are_fresh(packed)
    agent.load_state_dict(state)
    assert_packed_weights_are_fresh(packed)
    for e in envs:
        e.close()
    figures = bench({**cfg, "task": tasks, "bench": {"repeats": 1, "act_steps": 5, "flops": False}})
    assert figures["agent"] == name and figures["n_tasks"] == len(tasks)
    assert figures["parameters"] == agent.parameter_counts() and sum(figures["parameters"].values()) > 0
    phases = figures["sizes"]["phases"]
    assert phases and figures["s_per_train_step"] == pytest.approx(sum(figures[f"s_per_{p}"] for p in phases))
    assert figures["acting_env_steps_per_s"] > 0
    # evaluation speed net of making envs (a GPU bench once printed 1e12 here: the env-making time it subtracted
    # was larger than the evaluation's); no CPU evaluates a million env steps a second
    assert 0 < figures["eval_env_steps_per_s"] < 1e6 and figures["s_per_eval_env"] > 0
    assert 0 < figures["random_env_steps_per_s"] < 1e7 and figures["s_per_random_env"] > 0
    assert figures["projected_hours"]["random_baseline"] > 0


@pytest.mark.parametrize(("override", "message"), [
    ("agent.width=16.5", "agent.width=16.5: Value '16.5' of type 'float' could not be converted to Integer; "
                         "allowed: a value of the field's type in STORMConfig"),
    ("agent.batch_per_task=many", "agent.batch_per_task=many: Value 'many' of type 'str' could not be converted"),
    ("train.steps=1.5", "train.steps=1.5: Value '1.5' of type 'float' could not be converted to Integer; "
                        "allowed: a value of the field's type in TrainConfig"),
    ("train.progress=maybe", "train.progress=maybe: Value 'maybe' is not a valid bool"),
    ("train.nope=1", "Could not override 'train.nope'. Key 'nope' is not in struct (not a field of TrainConfig)"),
    ("agent.no_such_field=1",
     "Could not override 'agent.no_such_field'. Key 'no_such_field' is not in struct (not a field of STORMConfig)"),
])
def test_the_config_dataclass_types_every_field(override, message):
    """The dataclasses (each agent's config, TrainConfig) are the schema: a value of the wrong type or an unknown
    key is one line naming it, before any work."""
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        compose_config([override])


# The validation table: every value refused before any env or network is built, with the one line that says so
REFUSED = [
    ("agent.width=0", "agent.width=0; allowed: > 0"),
    ("agent.width=-16", "agent.width=-16; allowed: > 0"),
    ("agent.heads=0", "agent.heads=0; allowed: > 0"),
    ("agent.channels=[]", "agent.channels=[]; allowed: a non-empty list of positive integers"),
    ("agent.gamma=0", "agent.gamma=0.0; allowed: 0 < gamma <= 1"),
    ("agent.gamma=1.5", "agent.gamma=1.5; allowed: 0 < gamma <= 1"),
    ("agent.lam=-0.1", "agent.lam=-0.1; allowed: 0 <= lam <= 1"),
    ("agent.unimix=1", "agent.unimix=1.0; allowed: 0 <= unimix < 1"),
    ("agent.bins=1", "agent.bins=1; allowed: an integer >= 2"),
    ("agent.wm_lr=0", "agent.wm_lr=0.0; allowed: > 0"),
    ("agent.act_refresh=0", "agent.act_refresh=0; allowed: > 0"),
    ("agent.act_refresh=17", "agent.act_refresh=17; allowed: 1..act_context=8"),
    ("agent.entropy_coef=-1", "agent.entropy_coef=-1.0; allowed: >= 0"),
    ("agent.dropout=1", "agent.dropout=1.0; allowed: 0 <= dropout < 1"),
    ("train.steps=0", "train.steps=0; allowed: a positive integer"),
    ("train.steps=1.5", "train.steps=1.5: Value '1.5' of type 'float' could not be converted to Integer"),
    ("train.steps=abc", "train.steps=abc: Value 'abc' of type 'str' could not be converted to Integer"),
    ("train.eval_episodes=0", "train.eval_episodes=0; allowed: a positive integer"),
    ("train.eval_episodes=0.5", "train.eval_episodes=0.5: Value '0.5' of type 'float' could not be converted"),
    ("train.progress=maybe", "train.progress=maybe: Value 'maybe' is not a valid bool"),
    ("train.warmup=-1", "train.warmup=-1; allowed: a non-negative integer"),
    ("threads=-1", "threads=-1; allowed: a non-negative integer"),
    ("seed=-3", "seed=-3; allowed: a non-negative integer"),
    ("results_dir=", "results_dir=''; allowed: a non-empty path"),
]


@pytest.mark.parametrize(("override", "message"), REFUSED)
def test_bad_values_are_refused_before_any_work(override, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        plan(compose_config([override]))


@pytest.mark.parametrize("module", ["run", "bench", "grid"])
def test_help_lists_the_groups_and_the_most_used_keys(module):
    out = subprocess.run([sys.executable, "-m", f"mowbench.{module}", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr
    assert "agent     monolithic, mow, newt, newt-nodemo, pwm, pwm-online, scalezero-lite, storm, tdmpc2" in out.stdout
    assert "preset    micro, paper, tiny" in out.stdout
    assert "train.steps" in out.stdout and "seed=0" in out.stdout
    assert {"bench": "Bench options (bench.<key>=value): repeats=3", "grid": "Grids (grid=name): ablate_clusters",
            "run": "python -m mowbench.run grid=NAME"}[module] in out.stdout


@pytest.mark.parametrize("name", AGENT_NAMES)
def test_no_agent_reads_memory_it_never_wrote(name):
    """`deterministic=true` on CUDA turns torch's deterministic algorithms on, and with them every new uninitialized
    tensor (torch.empty and its kin) is filled with NaN (torch.utils.deterministic.fill_uninitialized_memory): an
    update or an act that read memory it never wrote would give NaN there (and garbage without the switch). On
    CPU the switch fills the same way, so two updates and a few acting rounds of every registered agent (a new
    baseline included) at the micro preset must give the same bits with it as without."""
    assert torch.utils.deterministic.fill_uninitialized_memory
    _, suite = suites_of(name)
    entry = registered_agents()[name]
    tasks = TASKS[suite][:2] if entry.multi_task else TASKS[suite][:1]
    fast = ["env.fast_render=true", "env.multisample=false"] if suite == "metaworld" else []
    cfg = compose_config([f"agent={name}", "preset=micro", f"env={suite}", f"task=[{','.join(tasks)}]", *fast])
    micro = plan(cfg)

    def run(fill):
        torch.use_deterministic_algorithms(fill, warn_only=True)
        envs = make_envs(suite, micro.tasks, dict(micro.cfg["env"]), seed=0)  # each run from the same start
        infos = [e.info for e in envs]
        try:
            torch.manual_seed(0)
            agent = make_agent(name, dict(cfg["agent"]), infos, torch.device("cpu"), "fp32")
            fields = agent.replay_fields()
            metrics = [agent.update(lambda n, length: random_batch(infos, n, length, torch.device("cpu"), fields))
                       for _ in range(2)]
            contexts, obs = [agent.new_context(i) for i in range(len(envs))], [e.reset() for e in envs]
            actions = []
            for _ in range(3):
                chosen = agent.act_batch(contexts, obs)
                actions.append([np.asarray(a).tolist() for a in chosen])
                obs = [e.step(a).obs for e, a in zip(envs, chosen, strict=True)]
            return copy.deepcopy(agent.state_dict()), [{k: float(v) for k, v in m.items()} for m in metrics], actions
        finally:
            torch.use_deterministic_algorithms(False)
            for e in envs:
                e.close()

    (state, metrics, actions), (state_filled, metrics_filled, actions_filled) = run(False), run(True)
    assert all(math.isfinite(v) for m in metrics_filled for v in m.values()), metrics_filled
    assert metrics_filled == metrics and actions_filled == actions

    def leaves(tree, path=""):
        if isinstance(tree, torch.Tensor):
            yield path, tree
        elif isinstance(tree, dict):
            for k, v in tree.items():
                yield from leaves(v, f"{path}/{k}")
        elif isinstance(tree, (list, tuple)):
            for i, v in enumerate(tree):
                yield from leaves(v, f"{path}/{i}")

    a, b = dict(leaves(state)), dict(leaves(state_filled))
    assert a.keys() == b.keys() and len(a) > 10
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, differ[:5]


def test_every_agent_lists_its_known_departures_and_runs_record_them(micro_cfg, tmp_path):
    """Each baseline file declares DEPARTURES (one line each, what the method is not); a run records them in its
    metadata.json and the analysis prints them in its notes beside the method's numbers."""
    from mowbench.agents.base import known_departures
    from mowbench.analysis.scores import read_results
    from mowbench.runner import execute

    for name in registered_agents():
        items = known_departures(name)
        assert items and all(isinstance(s, str) and s.strip() and "\n" not in s for s in items), name
    execute(micro_cfg())
    [folder] = list(tmp_path.glob("minatar/storm/breakout/seed_0"))
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["departures"] == known_departures("storm")
    _, notes = read_results(tmp_path, "minatar")
    [line] = [n for n in notes if n.startswith("storm: known departures")]
    assert all(item in line for item in known_departures("storm"))
