"""Configuration: compose the Hydra config once, validate it before any heavy work, and resolve it into a
`Plan` (what to train, where, on what). No training, no command line: mowbench.runner trains a Plan, and
mowbench.run is the command line."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf, open_dict

from mowbench import results
from mowbench.agents.base import build_config, get_agent, registered_agents
from mowbench.envs import TASK_SEED_STRIDE, resolve_tasks, suite_module
from mowbench.experiments import CONF, ablation_dir
from mowbench.trainer import SEED_LIMIT, TrainConfig, largest_derived_seed

GROUPS = ("env", "agent", "preset", "ablation")


def _group_dir(group: str) -> Path:
    return ablation_dir() if group == "ablation" else CONF / group


def usage() -> str:
    """The config groups with their options and the most used keys: the common part of every --help."""
    from mowbench.experiments import ablation_names

    groups = {"env": sorted(p.stem for p in (CONF / "env").glob("*.yaml")), "agent": sorted(registered_agents()),
              "preset": presets(), "ablation": ablation_names()}
    lines = ["Config groups (group=option):"] + [f"  {g:<9} {', '.join(options)}" for g, options in groups.items()]
    lines += ["Most used keys (key=value; every agent.<field> of the agent's config dataclass works):",
              "  seed=0 task=breakout|[Pong,Breakout]|MT10|null device=auto|cpu|cuda precision=auto|fp32|bf16",
              "  threads=0 results_dir=results method=<results folder name> deterministic=true|false",
              "  train.steps train.warmup train.updates_per_step train.eval_every train.eval_episodes",
              "  train.checkpoint_every train.replay_capacity train.progress train.tensorboard",
              "  agent.width agent.batch_per_task agent.imag_per_task agent.wm_lr agent.ac_lr (MoW: agent.n_clusters,",
              "  agent.n_experts, agent.top_k, agent.routing, ...)",
              "Fields, types and defaults: mowbench/conf/config.yaml, mowbench/trainer.py:TrainConfig and the "
              "agent's config dataclass in baselines/<agent>.py."]
    return "\n".join(lines)


def register_agent_configs() -> None:
    """Each registered agent's config dataclass is the `agent` group's option of its name (Hydra structured
    config): the single definition of its fields, types and defaults (the `paper` preset). YAML files hold
    only presets (agent/preset/<agent>_<preset>.yaml) and overrides; a value of the wrong type (a float for an
    int field) or an unknown key is refused when the config is composed."""
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)  # train.*: typed the same way
    for name, entry in registered_agents().items():
        node = OmegaConf.structured(entry.config)
        with open_dict(node):
            node["name"] = name
        store.store(group="agent", name=name, node=node)


def check_group_choices(argv: list[str]) -> None:
    """One-line errors for unknown config-group choices, before Hydra prints a traceback."""
    for arg in argv:
        key, _, value = arg.partition("=")
        if key in GROUPS and value:
            if key == "agent":
                get_agent(value)  # its own one-line error naming the registered agents
                continue
            options = sorted(p.stem for p in _group_dir(key).glob("*.yaml"))
            if value not in options:
                raise ValueError(f"unknown {key} {value!r}; allowed: {', '.join(options)}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device={name!r}; allowed: auto, cpu, cuda, cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but no CUDA device is available; allowed here: auto, cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device={name!r}; allowed: auto, cpu, cuda, cuda:N")
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if name not in ("fp32", "bf16"):
        raise ValueError(f"precision={name!r}; allowed: auto, fp32, bf16")
    return name


def deterministic_kernels(device: torch.device, on: bool) -> bool:
    """Whether a seed gives the same numbers on one CUDA device: on, torch's deterministic algorithms (warning,
    not failing, where an op has none), cuDNN's deterministic convolutions without autotuning, a fixed cuBLAS
    workspace (set before cuBLAS starts) and attention by the math backend; off, torch's fastest kernels (atomics
    in index and attention backward passes, cuDNN's choice), so reruns may differ in the last bits and then
    diverge. CPU kernels here are deterministic already: nothing is changed off CUDA. Returns whether
    deterministic kernels are on.

    Why attention by math: the fused backends' backward passes (cuDNN, flash, memory-efficient) accumulate with
    atomics unless torch's deterministic mode is strict (warn_only=False), and strict mode would also stop a run
    at any op without a deterministic kernel. On Hopper GPUs SDPA picks cuDNN, whose backward is not
    deterministic. The math backend (matmul, softmax, matmul) is
    deterministic, and at these sequence lengths (at most 64 tokens) its score matrices are small."""
    if device.type != "cuda":
        return False
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = False
    for enable_fused in (torch.backends.cuda.enable_flash_sdp, torch.backends.cuda.enable_mem_efficient_sdp,
                         torch.backends.cuda.enable_cudnn_sdp):
        enable_fused(not on)
    return on


@dataclasses.dataclass
class Plan:
    """A fully validated run request: what to train, where, on what. `cfg` is the composed configuration as
    recorded in each run folder; the fields are what it resolves to."""

    cfg: dict[str, Any]
    suite: str
    agent: str
    method: str
    tasks: list[str]
    runs: list[tuple[str, list[str]]]  # (results task name, tasks of that run)
    train: TrainConfig
    agent_config: Any  # the agent's built config dataclass (its registered config class), checked
    seed: int
    results_dir: Path
    device: torch.device
    precision: str
    deterministic: bool = True

    def run_dir(self, name: str) -> Path:
        """The folder of run `name` (one of `runs`' names) under results_dir."""
        return results.run_dir(self.results_dir, self.suite, self.method, name, self.seed)


def plan(cfg: dict[str, Any]) -> Plan:
    """Validate the whole configuration before any heavy work (envs, networks) starts."""
    env_cfg = dict(cfg["env"])
    suite = env_cfg.get("suite")
    mod = suite_module(suite)
    tasks = resolve_tasks(suite, cfg.get("task"))
    entry = get_agent(cfg["agent"]["name"])
    if env_cfg.get("action_set") == "auto":  # one shared action set when one agent plays several games
        env_cfg["action_set"] = "full" if entry.multi_task and len(tasks) > 1 else "minimal"
        cfg = {**cfg, "env": env_cfg}
    mod.check(env_cfg)
    agent_cfg = build_config(entry, dict(cfg["agent"]))
    agent_cfg.check_image_size(int(env_cfg.get("image_size", 64)))
    agent_cfg.check_suite(suite, bool(mod.DISCRETE_ACTIONS))
    agent_cfg.check_tasks(len(tasks))
    train_values = dict(cfg["train"])
    proto = mod.eval_protocol(env_cfg)
    for key in ("eval_episodes", "eval_greedy", "eval_mode"):
        if train_values.get(key) is None:
            train_values[key] = proto[key]
    if train_values.get("eval_envs") is None:
        train_values["eval_envs"] = mod.EVAL_ENVS
    if train_values.get("random_episodes") is None:
        train_values["random_episodes"] = train_values["eval_episodes"]
    unknown = sorted(set(train_values) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise ValueError(f"unknown train option(s) {unknown}; allowed: "
                         f"{', '.join(f.name for f in dataclasses.fields(TrainConfig))}")
    train = TrainConfig(**train_values)
    train.check()
    if train.replay_capacity < getattr(agent_cfg, "batch_length", 1):
        raise ValueError(f"train.replay_capacity={train.replay_capacity} is smaller than a sequence "
                         f"(batch_length={agent_cfg.batch_length})")
    if train.warmup < getattr(agent_cfg, "batch_length", 1) and train.steps > train.warmup:
        raise ValueError(f"train.warmup={train.warmup} must be >= batch_length={agent_cfg.batch_length} "
                         "so the first update finds whole sequences")
    seed = cfg.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed={seed!r}; allowed: a non-negative integer")
    offset = largest_derived_seed(0, train, len(tasks), TASK_SEED_STRIDE)
    if seed + offset > SEED_LIMIT:
        raise ValueError(f"seed={seed}; allowed: 0 to {SEED_LIMIT - offset} here (the run seeds envs up to seed + "
                         f"{offset}, and numpy takes seeds up to 2**32-1)")
    threads = cfg.get("threads", 0)
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 0:
        raise ValueError(f"threads={threads!r}; allowed: a non-negative integer (0: torch's default)")
    if not isinstance(cfg.get("results_dir"), str) or not str(cfg["results_dir"]).strip():
        raise ValueError(f"results_dir={cfg.get('results_dir')!r}; allowed: a non-empty path")
    device = resolve_device(str(cfg.get("device", "auto")))
    precision = resolve_precision(str(cfg.get("precision", "auto")), device)
    if precision == "bf16" and device.type == "cpu":
        raise ValueError("precision=bf16 on cpu is not supported (CPU runs in fp32); allowed: auto, fp32")
    deterministic = cfg.get("deterministic", True)
    if not isinstance(deterministic, bool):
        raise ValueError(f"deterministic={deterministic!r}; allowed: true, false")
    method = results.check_name("method", cfg.get("method") or entry.name)
    if entry.multi_task:
        runs = [(tasks[0] if len(tasks) == 1 else f"all{len(tasks)}", tasks)]
    else:
        runs = [(t, [t]) for t in tasks]
    return Plan(cfg, suite, entry.name, method, tasks, runs, train, agent_cfg, seed, Path(cfg["results_dir"]), device,
                precision, deterministic)


def config_values(cfg: DictConfig, choices: Any) -> dict[str, Any]:
    """Resolved run configuration as a plain dict, with the preset chosen (recorded in metadata)."""
    values = OmegaConf.to_container(cfg, resolve=True)
    values.pop("hydra", None)
    values["preset_name"] = choices.get("preset")
    return values


def quoted_override(arg: str) -> str:
    key, _, value = arg.partition("=")
    return f"{key}='{value.strip(chr(39))}'"


def quote_hint(arg: str, err: Exception) -> str:
    """The one-line error for a value Hydra cannot read unquoted (non-ASCII letters, brackets, commas)."""
    return (f"{arg}: Hydra reads this value only in quotes ({str(err).splitlines()[0][:80]}); quote it, e.g. in the "
            f"shell: \"{quoted_override(arg)}\"")


def compose_config(overrides: list[str]) -> dict[str, Any]:
    """The configuration the CLI would run for `overrides`, without starting Hydra's app (bench, tests)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    check_group_choices(overrides)
    register_agent_configs()
    try:
        with initialize_config_module("mowbench.conf", version_base="1.3"):
            cfg = compose("config", overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as err:  # e.g. an unknown key: one line, no traceback
        text = f"{err}\n{err.__cause__ or ''}"
        if "LexerNoViableAlt" in text or "token recognition error" in text:  # e.g. an unquoted non-ASCII path
            bad = next((o for o in overrides if o in text), None) or next(
                (o for o in overrides if not o.isascii()), overrides[-1] if overrides else "")
            raise ValueError(quote_hint(bad, err)) from None
        lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
        cause = str(err.__cause__ or "")
        if "full_key:" in cause and "object_type=" in cause and "not in" not in cause:
            # a value a typed field cannot take (a float or a word for an int, 'maybe' for a bool)
            schema = cause.rsplit("object_type=", 1)[1].split()[0]
            raise ValueError(f"{lines[0].removeprefix('Error merging override ')}: {cause.splitlines()[0].strip()}; "
                             f"allowed: a value of the field's type in {schema}") from None
        detail = next((line for line in lines[1:] if "not in struct" in line or "Key" in line), "")
        # a typed (dataclass) node says "Key 'x' not in 'STORMConfig'": the same words as for untyped nodes
        detail = re.sub(r"Key '(\w+)' not in '(\w+)'", r"Key '\1' is not in struct (not a field of \2)", detail)
        raise ValueError(f"{lines[0]} {detail}".strip() + "; allowed: the keys of mowbench/conf/config.yaml, "
                         "the chosen env file and the agent's config dataclass (e.g. seed, task, train.steps, "
                         "agent.width)") from None
    choices = dict(cfg.hydra.runtime.choices)
    check_agent_preset(str(choices.get("agent")), str(choices.get("preset")))
    with open_dict(cfg):
        del cfg["hydra"]
    return config_values(cfg, choices)


def presets(conf: Path = CONF) -> list[str]:
    """The global presets (conf/preset/*.yaml): micro (tests), tiny (CPU, quickstart), paper."""
    return sorted(p.stem for p in (conf / "preset").glob("*.yaml"))


def check_agent_preset(agent: str, preset: str, conf: Path = CONF) -> None:
    """Every agent has its own file for every preset, `paper` included (empty when its dataclass defaults are
    the paper's): a missing agent/preset/<agent>_<preset>.yaml would otherwise run the dataclass defaults
    (the paper's sizes) silently under `preset=tiny`."""
    if (conf / "agent" / "preset" / f"{agent}_{preset}.yaml").exists():
        return
    have = sorted(p.stem.removeprefix(f"{agent}_") for p in (conf / "agent" / "preset").glob(f"{agent}_*.yaml"))
    raise ValueError(f"agent {agent!r} has no {preset!r} preset (mowbench/conf/agent/preset/{agent}_{preset}.yaml "
                     f"is missing); allowed for {agent}: {', '.join(have) or 'none'}")


