"""Named experiments, read without composing configurations or importing torch: the ablation files (config diffs,
ablations/ablation/<name>.yaml) and the grid files (mowbench/conf/grid/<name>.yaml) with their cells, the results
method name of each cell, and which cell is the default. mowbench.grid dispatches grids; mowbench.analysis names
their rows with them."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from mowbench.results import flat_items

CONF = Path(__file__).parent / "conf"
CONFIG = CONF / "config.yaml"
GRID_DIR = CONF / "grid"
GRID_KEYS = {"reproduces", "seeds", "overrides", "axes", "variants", "agent_overrides", "default"}


def ablation_dir() -> Path:
    """ablations/ablation/ (installed as mowbench.ablations): the config diffs `ablation=<name>` selects."""
    import mowbench.ablations

    return Path(mowbench.ablations.__file__).parent / "ablation"


def ablation_names() -> list[str]:
    return sorted(p.stem for p in ablation_dir().glob("*.yaml"))


def ablation_overrides(name: str) -> list[str]:
    """The ablation file `name` as command-line overrides (e.g. agent.clustering=none agent.n_clusters=1): a
    grid cell defined by it then wins over the command line's overrides, as every cell definition does, and
    combines with an `ablation=` the whole grid selects."""
    values = OmegaConf.to_container(OmegaConf.load(ablation_dir() / f"{name}.yaml"), resolve=False) or {}

    return [f"{key}={_fmt(value)}" for key, value in flat_items(values).items()]


def grid_names() -> list[str]:
    return sorted(p.stem for p in GRID_DIR.glob("*.yaml"))


def load_grid(name: str) -> dict[str, Any]:
    if name not in grid_names():
        raise ValueError(f"unknown grid {name!r}; allowed: {', '.join(grid_names())}")
    spec = OmegaConf.to_container(OmegaConf.load(GRID_DIR / f"{name}.yaml"), resolve=True)
    unknown = sorted(set(spec) - GRID_KEYS)
    if unknown:
        raise ValueError(f"grid {name}: unknown field(s) {unknown}; allowed: {', '.join(sorted(GRID_KEYS))}")
    for variant, value in (spec.get("variants") or {}).items():
        if isinstance(value, str) and value not in ablation_names():
            raise ValueError(f"grid {name}: variant {variant} names ablation {value!r}, which is not a file in "
                             f"ablations/ablation/; allowed: {', '.join(ablation_names())}")
        if not isinstance(value, str | list):
            raise ValueError(f"grid {name}: variant {variant}={value!r}; allowed: an ablation file's name or a "
                             "list of overrides")
    return spec


def method_name(agent: str, point: dict[str, Any], variant: str | None) -> str:
    """Results method of a cell: the agent, then each swept value except the agent itself, e.g.
    mow-n_clusters=3, mow-no_task_loss; a variant named after the cell's agent adds nothing (newt, newt-onehot)."""
    parts = [agent] + [f"{k.split('.')[-1]}={v}" for k, v in point.items() if k != "agent"]
    return "-".join(parts + ([variant] if variant and variant != agent else []))


def cells(spec: dict[str, Any]) -> list[tuple[dict[str, Any], str | None, list[str]]]:
    """The grid's cells without seeds: (swept point, variant or None, the overrides defining the cell). A variant
    is the name of an ablation file (ablations/ablation/<name>.yaml, its values applied as overrides) or, for a
    one-off, a list of overrides."""
    axes = spec.get("axes") or {}
    variants = spec.get("variants") or {None: []}
    keys = list(axes)
    out = []
    for values in itertools.product(*(axes[k] for k in keys)):
        point = dict(zip(keys, values, strict=True))
        for variant, variant_overrides in variants.items():
            if isinstance(variant_overrides, str):  # the name of an ablation file
                variant_overrides = ablation_overrides(variant_overrides)
            out.append((point, variant, [*[f"{k}={_fmt(v)}" for k, v in point.items()], *variant_overrides]))
    return out


def is_default(spec: dict[str, Any], point: dict[str, Any], variant: str | None) -> bool:
    """Whether a cell is the grid's `default` (the reference configuration of its ablation)."""
    default = spec.get("default") or {}
    return bool(default) and all((variant if k == "variant" else point.get(k)) == v for k, v in default.items())


def default_agent() -> str:
    """The agent config.yaml's defaults list chooses when no override names one."""
    spec = OmegaConf.to_container(OmegaConf.load(CONFIG), resolve=False)
    return next(entry["agent"] for entry in spec["defaults"] if isinstance(entry, dict) and "agent" in entry)


def cell_method(spec: dict[str, Any], overrides: list[str], point: dict[str, Any], variant: str | None,
                defining: list[str]) -> tuple[str, str]:
    """(agent, results method name) of a cell, read from its overrides (the last `agent=` wins, as in
    Hydra) without composing a configuration."""
    agents = [o.partition("=")[2] for o in [*spec.get("overrides", []), *overrides, *defining]
              if o.partition("=")[0] == "agent"]
    agent = agents[-1] if agents else default_agent()
    return agent, method_name(agent, point, variant)


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(_fmt(v) for v in value) + "]"
    return str(value)
