"""CUDA-graph readiness, checked on CPU: which world models' imagination never waits for the device (what a CUDA
graph can hold; `capturable`), found by recording every op that reads a device value back to the host, and
`agent.cuda_graphs=true` giving the eager numbers where there is no CUDA (CPU runs, CI)."""

from __future__ import annotations

import contextlib
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mowbench.agents.base import make_agent
from mowbench.agents.graphs import GraphedCall
from mowbench.config import compose_config
from mowbench.envs.base import ActionSpace, TaskInfo
from mowbench.ops import one_hot
from mowbench.replay import random_batch
from tests.conftest import MICRO

TASKS = [TaskInfo("minatar", f"t{k}", k, 16, ActionSpace(True, 6)) for k in range(3)]

# ops that make the host wait for the device on CUDA (a scalar read, an output sized by the data, a bincount's
# max): on CPU they run without waiting, so they are recorded by name
SYNCING_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten._unique2", "aten.unique_dim",
               "aten.unique_consecutive", "aten.bincount", "aten.equal", "aten.is_nonzero", "aten.item")


class HostSyncs(TorchDispatchMode):
    """Records (op, innermost mowbench frame) of every op that would wait for a CUDA device."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, str]] = []

    def record(self, what: str) -> None:
        frames = [f for f in traceback.extract_stack() if "/mowbench/" in f.filename or "/baselines/" in f.filename]
        self.found.append((what, f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else "?"))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        # repeats given as a tensor: the output's length is their sum, read on the host unless output_size says it
        repeats = func is torch.ops.aten.repeat_interleave.Tensor and (kwargs or {}).get("output_size") is None
        bool_index = name in ("aten.index", "aten.index_put", "aten.index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []))
        if name in SYNCING_OPS or bool_index or repeats:
            self.record(name + (" (boolean index)" if bool_index else ""))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def host_syncs():
    """Every host read inside: dispatched ops (HostSyncs) and the Tensor methods that copy to the host."""
    mode = HostSyncs()
    saved = {name: getattr(torch.Tensor, name) for name in ("tolist", "cpu", "numpy")}

    def reader(name):
        def read(self, *args, **kwargs):
            mode.record(f"Tensor.{name}")
            return saved[name](self, *args, **kwargs)
        return read

    try:
        for name in saved:
            setattr(torch.Tensor, name, reader(name))
        with mode:
            yield mode.found
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def test_the_recorder_finds_each_kind_of_host_read():
    x = torch.tensor([0.5, -1.0, 2.0])
    with host_syncs() as found:
        float(x[0]), x.tolist(), x[x > 0], torch.unique(x), torch.bincount(torch.tensor([1, 2])), x.nonzero()
        torch.arange(2).repeat_interleave(torch.tensor([1, 2]))
        torch.arange(2).repeat_interleave(torch.tensor([1, 2]), output_size=3)  # sized on the host: no read
        torch.arange(2).repeat_interleave(3)
    kinds = [what for what, _ in found]
    assert kinds == ["aten._local_scalar_dense", "Tensor.tolist", "aten.index (boolean index)", "aten._unique2",
                     "aten.bincount", "aten.nonzero", "aten.repeat_interleave"], kinds


def test_one_hot_equals_torch_one_hot_without_reading_the_index():
    index = torch.tensor([[0, 3], [2, 1]])
    with host_syncs() as found:
        out = one_hot(index, 4)
    assert found == [] and out.dtype == torch.float32
    assert torch.equal(out, torch.nn.functional.one_hot(index, 4).float())


def agent_of(name: str, *overrides: str):
    torch.manual_seed(0)
    cfg = compose_config([f"agent={name}", *MICRO, *overrides])["agent"]
    tasks = TASKS if name in ("monolithic", "mow") else TASKS[:1]
    return make_agent(name, cfg, tasks, torch.device("cpu"), "fp32")


@pytest.mark.parametrize("name", ["storm", "monolithic", "mow"])
def test_capturable_says_whether_imagination_waits_for_the_device(name):
    """STORM's and the monolithic STORM's imagination read nothing back from the device, so a CUDA graph can hold
    it; MoW's per-cluster groupings read their sizes (`capturable` False). Run after the warm-up update (MoW: its
    clustering), on a batch of every task, as an update imagines."""
    agent = agent_of(name)

    def sample(n, length):
        return random_batch(agent.tasks, n, length, torch.device("cpu"))

    agent.update(sample)
    batch = sample(agent.cfg.imag_per_task * len(agent.tasks), agent.cfg.imag_context)
    with host_syncs() as found:
        agent.imagine(batch)
    assert agent.wm.capturable == (found == []), found
    if name == "mow":
        assert any("ops.py" in where for _, where in found)  # ops.Grouping's sizes


@pytest.mark.parametrize("name", ["storm", "monolithic"])
def test_a_storm_update_never_waits_for_the_device(name):
    """A whole update (world model, imagination, actor-critic with per-task return scales) reads nothing back, so
    the host queues the next kernels while the GPU runs (issue 14's hot path); MoW's groupings still read sizes."""
    agent = agent_of(name)

    def sample(n, length):
        return random_batch(agent.tasks, n, length, torch.device("cpu"))

    agent.update(sample)
    with host_syncs() as found:
        agent.update(sample)
    assert found == []


@pytest.mark.parametrize("name", ["storm", "mow"])
def test_cuda_graphs_option_on_cpu_gives_the_eager_numbers(name):
    """No CUDA here: `cuda_graphs=true` runs imagination eagerly (MoW: not capturable, with a warning), and two
    updates and an act equal the default agent's exactly."""
    results = []
    for graphs in (False, True):
        with pytest.warns(UserWarning, match="not capturable") if graphs and name == "mow" else \
                contextlib.nullcontext():
            agent = agent_of(name, f"agent.cuda_graphs={graphs}")
        assert agent.rollout.enabled == (graphs and name == "storm")

        def sample(n, length, agent=agent):
            return random_batch(agent.tasks, n, length, torch.device("cpu"))

        metrics = [agent.update(sample) for _ in range(2)]
        context = agent.new_context(0, seed=3)
        obs = torch.randint(0, 256, (16, 16, 3), dtype=torch.uint8).numpy()
        actions = [agent.act(context, obs) for _ in range(3)]
        results.append((metrics, actions, agent.state_dict()["wm"]))
        assert agent.rollout.status() == {"graphed": 0, "eager": 0}  # nothing captured off CUDA
    (m_e, a_e, w_e), (m_g, a_g, w_g) = results
    assert a_e == a_g
    assert all(torch.equal(e[k], g[k]) for e, g in zip(m_e, m_g, strict=True) for k in e)
    assert all(torch.equal(w_e[k], w_g[k]) for k in w_e)


def test_graphed_call_runs_eagerly_off_cuda_and_when_disabled():
    calls = []

    def fn(x):
        calls.append(x)
        return (x * 2,)

    for enabled in (True, False):
        out = GraphedCall(fn, "double", enabled)(torch.ones(2))
        assert torch.equal(out[0], torch.full((2,), 2.0))
    assert len(calls) == 2
