"""CUDA-graph readiness, checked on CPU: which world models' imagination never waits for the device (what a CUDA
graph can hold; `capturable`), found by recording every op that reads a device value back to the host, and
`agent.cuda_graphs=true` giving the eager numbers where there is no CUDA (CPU runs, CI)."""

from __future__ import annotations

import contextlib
import dataclasses
import traceback
import warnings

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mowbench.agents.base import adam, make_agent
from mowbench.agents.graphs import CudaGraphs, GraphedCall, flat, graphs_wanted, optimizer_tensors
from mowbench.agents.imagination import ImaginationConfig
from mowbench.config import compose_config
from mowbench.envs.base import ActionSpace, TaskInfo
from mowbench.ops import one_hot
from mowbench.replay import Replay, random_batch
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
def test_a_capturable_rollout_never_waits_for_the_device(name):
    """Inside the world model's host_layout, imagination reads nothing back from the device, so a CUDA graph can
    hold it, with the grouped expert kernel padding MoW's token mixer's misfit input width as on CUDA; MoW's
    layout (rows per VAE cluster) comes from the batch's rows per task, or, where the host does not know them,
    from one read. Run after the warm-up update (MoW: its clustering), on a batch of every task, as an update
    imagines."""
    agent = agent_of(name)
    if name == "mow":
        agent.wm.experts.pad_inputs = True  # CUDA's default (models/experts.py)

    def sample(n, length):
        return random_batch(agent.tasks, n, length, torch.device("cpu"))

    agent.update(sample)
    batch = sample(agent.cfg.imag_per_task * len(agent.tasks), agent.cfg.imag_context)
    assert agent.wm.capturable
    with host_syncs() as found:
        agent.imagine(batch)  # the layout from the batch's rows per task, known on the host
    assert found == []
    with host_syncs() as found:
        agent.imagine(dataclasses.replace(batch, task_counts=None))
    assert [where.split(":")[0] for _, where in found] == (["mow.py"] if name == "mow" else [])  # the layout's read
    with agent.wm.host_layout(batch.task) as layout:
        assert layout is None if name != "mow" else sum(layout) == len(batch.task)  # rows per cluster
        with host_syncs() as found:
            agent.rollout(batch.obs, batch.action, batch.task, batch.legal, key=layout)
    assert found == []


@pytest.mark.parametrize("reencode", [True, False])
@pytest.mark.parametrize("name", ["storm", "monolithic", "mow"])
def test_capturable_acting_never_waits_for_the_device(name, reencode):
    """Acting on streams with full contexts (act_tensors, what a CUDA graph holds) reads nothing back inside
    host_layout, re-encoding the window's frames (the default) or reading kept latents; the actions' read for
    the envs comes after it."""
    agent = agent_of(name, f"agent.act_reencode={reencode}")
    if name == "mow":
        agent.wm.experts.pad_inputs = True  # CUDA's default (models/experts.py)
    contexts = [agent.new_context(i, seed=i) for i in range(len(agent.tasks))]
    obs = [torch.randint(0, 256, (16, 16, 3), dtype=torch.uint8).numpy() for _ in contexts]
    for _ in range(agent.cfg.act_context):
        agent.act_batch(contexts, obs)
    task, n, v, w = torch.arange(len(contexts)), len(contexts), agent.wm.latent_vars, agent.cfg.act_context
    a = torch.stack([c.action for c in contexts])  # (n, W)
    if reencode:  # the window's frames (n, W, S, S, 3), encoded in the call
        frames, z, encoded = torch.stack([c.obs for c in contexts]), None, w
    else:  # the current frame and the kept latents (n, W, V*C)
        frames, z, encoded = torch.as_tensor(np.stack(obs))[:, None], torch.stack([c.z for c in contexts]), 1
    u = torch.rand(n, v + encoded * v + 1)
    with agent.wm.host_layout(task) as layout, host_syncs() as found:
        actions, z_enc = agent.act_steps[False](frames, z, a, task, u, key=layout)
    assert found == [] and actions.shape == (n,) and z_enc.shape[:2] == (n, encoded)


def test_mow_layout_from_the_hosts_rows_per_task_equals_the_devices():
    """MoW's layout (rows per VAE cluster) computed on the host from a batch's rows per task equals the one read from
    the device: for replay batches whose stratified counts vary (7 rows over 3 tasks), random batches, before and
    after the clustering changes the assignment; a subset of rows (Batch.rows) has no host counts."""
    agent = agent_of("mow")
    replay = Replay(40, agent.tasks, torch.device("cpu"), seed=0)
    for k in range(len(agent.tasks)):
        for _ in range(12):
            replay.add(k, np.zeros((16, 16, 3), np.uint8), 1, 0.0, False)

    def layouts(batch):
        with agent.wm.host_layout(batch.task, batch.task_counts) as host, agent.wm.host_layout(batch.task) as read:
            return host, read

    for clustered in (False, True):
        if clustered:
            agent.update(lambda n, length: random_batch(agent.tasks, n, length, torch.device("cpu")))
        batches = [replay.sample(7, 4) for _ in range(5)] + [random_batch(agent.tasks, 7, 4, torch.device("cpu"))]
        assert len({b.task_counts for b in batches}) > 1  # the remainder row goes to different tasks
        for batch in batches:
            host, read = layouts(batch)
            assert host == read and sum(host) == 7, (host, read)
        assert len(set(agent.wm.host_assignment())) == (2 if clustered else 1)
    assert batches[0].rows(torch.tensor([0, 1])).task_counts is None


def test_mow_is_capturable_only_with_task_routing_and_the_grouped_kernel():
    assert agent_of("mow", "agent.expert_kernel=grouped").wm.capturable
    assert not agent_of("mow", "agent.expert_kernel=loop").wm.capturable
    assert not agent_of("mow", "agent.routing=token").wm.capturable


@pytest.mark.parametrize("name", ["storm", "monolithic", "mow", "mow_token"])
def test_capturable_updates_never_wait_for_the_device(name):
    """A whole update (world model, imagination, actor-critic with per-task return scales) reads nothing back
    inside the world model's host_layout, so the host queues the next kernels while the GPU runs (issue 14's hot
    path) and CUDA graphs can hold the updates (`capturable_updates`). MoW's layout (rows per VAE cluster, which
    are also its critics' rows) comes from the batches' rows per task (a replay knows them), or is read once per
    phase outside what a graph holds; token-routed MoW is not capturable and reads inside."""
    agent = agent_of(name.split("_")[0], *(["agent.routing=token"] if name == "mow_token" else []))
    if name.startswith("mow"):
        agent.wm.experts.pad_inputs = True  # CUDA's default (models/experts.py)

    def sample(n, length):
        return random_batch(agent.tasks, n, length, torch.device("cpu"))

    agent.update(sample)
    inside, real = [], agent.wm.host_layout

    @contextlib.contextmanager
    def spy(task, task_counts=None):  # the reads made inside each host_layout, after its own read
        with real(task, task_counts) as layout:
            start = len(found)
            yield layout
            inside.extend(found[start:])

    agent.wm.host_layout = spy
    with host_syncs() as found:
        agent.update(sample)
    assert agent.capturable_updates == (name != "mow_token")
    if name == "mow_token":
        assert inside, "token routing was expected to read inside host_layout"
        return
    assert inside == found == [], found

    def sample_unknown(n, length):  # a batch whose rows per task the host does not know
        return dataclasses.replace(sample(n, length), task_counts=None)

    with host_syncs() as found:
        agent.update(sample_unknown)
    assert inside == [], inside  # MoW: its two layouts, each read once outside what a graph holds
    assert [where.split(":")[0] for _, where in found] == (["mow.py"] * 2 if name == "mow" else []), found


@pytest.mark.parametrize("name", ["storm", "mow", "mow_token"])
def test_cuda_graphs_option_on_cpu_gives_the_eager_numbers(name):
    """No CUDA here: `cuda_graphs=true` runs imagination and the updates eagerly (token-routed MoW's: not
    capturable, with a warning), and two updates and an act equal the default agent's exactly."""
    results = []
    token = ["agent.routing=token"] if name == "mow_token" else []
    for graphs in (False, True):
        with pytest.warns(UserWarning, match="not capturable") if graphs and token else contextlib.nullcontext():
            agent = agent_of(name.split("_")[0], f"agent.cuda_graphs={graphs}", *token)
        calls = (agent.rollout, agent.wm_step, agent.ac_step, *agent.act_steps.values())
        assert all(call.enabled == (graphs and not token) for call in calls)

        def sample(n, length, agent=agent):
            return random_batch(agent.tasks, n, length, torch.device("cpu"))

        metrics = [agent.update(sample) for _ in range(2)]
        context = agent.new_context(0, seed=3)
        obs = torch.randint(0, 256, (16, 16, 3), dtype=torch.uint8).numpy()
        actions = [agent.act(context, obs) for _ in range(3)]
        results.append((metrics, actions, agent.state_dict()["wm"]))
        extras = agent.bench_status()
        if graphs:  # the bench's report: nothing captured off CUDA
            assert extras["cuda_graphs"] == dict.fromkeys(
                ("world_model_update", "imagination", "agent_update", "acting"), {"graphed": 0, "eager": 0})
        else:
            assert "cuda_graphs" not in extras
    (m_e, a_e, w_e), (m_g, a_g, w_g) = results
    assert a_e == a_g
    assert all(torch.equal(e[k], g[k]) for e, g in zip(m_e, m_g, strict=True) for k in e)
    assert all(torch.equal(w_e[k], w_g[k]) for k in w_e)


def test_cuda_graphs_default_auto_is_on_cuda_only_and_silent():
    """cuda_graphs=auto (the default) tries graphs on a CUDA device only (true everywhere, false nowhere); on CPU
    an auto agent's calls are plain eager calls, and token-routed MoW (not capturable) does not warn under auto as
    it does under true. A value outside auto/true/false is a one-line error."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device name: no GPU needed
    assert [graphs_wanted(s, d) for s in ("auto", True, False) for d in (cpu, cuda)] == [
        False, True, True, True, False, False]
    assert ImaginationConfig().cuda_graphs == "auto"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "not capturable" warning
        agent = agent_of("mow", "agent.routing=token")
    assert not agent.graphs and agent.bench_status() == {}
    assert not any(call.enabled for call in (agent.rollout, agent.wm_step, agent.ac_step, *agent.act_steps.values()))
    with pytest.raises(ValueError, match=r"^agent\.cuda_graphs='yes'; allowed: auto, true, false$"):
        agent_of("storm", "agent.cuda_graphs=yes")


def test_graphed_call_runs_eagerly_off_cuda_and_when_disabled():
    calls = []

    def fn(x):
        calls.append(x)
        return (x * 2,)

    for enabled in (True, False):
        out = GraphedCall(fn, "double", enabled)(torch.ones(2))
        assert torch.equal(out[0], torch.full((2,), 2.0))
    assert len(calls) == 2


class EagerGraphs(CudaGraphs):
    """CUDA's part of GraphedCall, stood in for on CPU (no graph can be captured here): a 'capture' runs fn, a
    'replay' runs it again on the static inputs' values and writes its outputs into the captured ones (`perturb`: off by
    one, as a graph that computes something else; `fail`: a capture that raises, as one hitting a host sync)."""

    def __init__(self, perturb: bool = False, fail: bool = False) -> None:
        self.perturb, self.fail = perturb, fail

    def available(self, device):
        return True

    def get_rng_state(self, device):
        return torch.get_rng_state()

    def set_rng_state(self, state, device):
        torch.set_rng_state(state)

    def warm_up(self, fn, device, times=2):
        for _ in range(times):
            fn()

    def capture(self, fn, inputs):
        if self.fail:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        outputs, backend = fn(*inputs), self

        class Graph:
            def replay(self):  # on copies of the static inputs: a replay finds no memo fn made in Python
                fresh = [None if x is None else x.clone() for x in inputs]
                for old, new in zip(flat(outputs)[0], flat(fn(*fresh))[0], strict=True):
                    old.copy_(new + 1 if backend.perturb else new)

        return Graph(), outputs

    def synchronize(self, device):
        pass


def training_step():
    """A step with randomness (dropout), an optimizer and in-place state: what GraphedCall captures for updates."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = adam(model.parameters(), lr=1e-2)

    def step(x, y):
        loss = (torch.nn.functional.dropout(model(x), 0.5) - y).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.detach(), "draw": torch.rand(2)}

    return model, opt, step


@pytest.mark.parametrize("backend", ["eager", "graphs", "perturbed", "failing"])
def test_graphed_call_takes_the_steps_eager_takes(backend):
    """Five training steps through GraphedCall (captured at the second call, warm-ups and check undone) give the
    outputs, parameters, optimizer state and RNG state of five eager steps, bitwise; a replay that differs or a
    capture that fails leaves that signature eager, with a warning."""
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 4, generator=g), torch.randn(8, 3, generator=g)) for _ in range(5)]
    model, opt, step = training_step()
    expected = [step(x, y) for x, y in data]
    expected_state = [*model.parameters(), *optimizer_tensors(opt), torch.get_rng_state()]
    model, opt, step = training_step()
    if backend == "eager":
        call = GraphedCall(step, "step", enabled=False)
    else:
        call = GraphedCall(step, "step", state=lambda: [*model.parameters(), *optimizer_tensors(opt)],
                           backend=EagerGraphs(perturb=backend == "perturbed", fail=backend == "failing"))
    with pytest.warns(UserWarning, match="step runs eagerly") if backend in ("perturbed", "failing") else \
            contextlib.nullcontext():
        got = [call(x, y) for x, y in data]
    assert call.status() == {"eager": {"eager": 0, "graphs": 0}.get(backend, 1),
                             "graphed": int(backend == "graphs")}
    for a, b in zip(expected, got, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for a, b in zip(expected_state, [*model.parameters(), *optimizer_tensors(opt), torch.get_rng_state()],
                    strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["storm", "mow"])
def test_graphed_agent_takes_the_updates_eager_takes(name):
    """A whole agent with cuda_graphs=true, its calls on the CPU stand-in for CUDA's graphs: six updates (MoW: its
    warm-up, the clustering that makes a new world-model optimizer and forgets the graphs, then layouts of two
    clusters) and acting (streams whose contexts fill up, sampled and greedy) give the eager agent's metrics,
    actions, weights, optimizer moments, return scales and RNG bitwise, so each update's `state` names every
    tensor it changes in place; every call ends up graphed."""
    results = []
    for graphs in (False, True):
        agent = agent_of(name, f"agent.cuda_graphs={graphs}")
        if name == "mow":
            agent.wm.experts.pad_inputs = True  # CUDA's default (models/experts.py)
        calls = (agent.rollout, agent.wm_step, agent.ac_step, *agent.act_steps.values())
        for call in calls:
            call.backend = EagerGraphs()
        g = torch.Generator().manual_seed(5)

        def sample(n, length, agent=agent, g=g):
            with torch.random.fork_rng():
                torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
                return random_batch(agent.tasks, n, length, torch.device("cpu"))

        metrics = [agent.update(sample) for _ in range(6)]
        actions = acting(agent)
        state = agent.state_dict()
        results.append((metrics, actions, state, torch.get_rng_state()))
        if graphs:
            assert [call.status() for call in calls] == [{"graphed": 1, "eager": 0}] * 5
    (m_e, a_e, s_e, r_e), (m_g, a_g, s_g, r_g) = results
    assert all(e.keys() == g.keys() and all(torch.equal(e[k], g[k]) for k in e) for e, g in zip(m_e, m_g, strict=True))
    assert len(set(map(str, a_e))) > 1  # the streams' actions vary
    assert a_e == a_g and torch.equal(r_e, r_g)
    for part in ("wm", "ac", "wm_opt", "learner"):  # the optimizers' moments and steps, the return scales
        t_e, t_g = tensors_in(s_e[part]), tensors_in(s_g[part])
        assert len(t_e) == len(t_g) > 0 and all(torch.equal(e, g) for e, g in zip(t_e, t_g, strict=True)), part


def acting(agent) -> list:
    """Actions of a stream per task over act_context + 4 rounds, every third round greedy: the contexts are of one
    length from the second round on (act_tensors), full from round act_context on."""
    contexts = [agent.new_context(i, seed=3 + i) for i in range(len(agent.tasks))]
    g = torch.Generator().manual_seed(2)
    out = []
    for step in range(agent.cfg.act_context + 4):
        obs = [torch.randint(0, 256, (16, 16, 3), dtype=torch.uint8, generator=g).numpy() for _ in contexts]
        out += agent.act_batch(contexts, obs, greedy=step % 3 == 2)
    return out


def tensors_in(obj) -> list[torch.Tensor]:
    """Every tensor in nested dicts, lists and tuples, in order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in tensors_in(v)]
    if isinstance(obj, list | tuple):
        return [t for v in obj for t in tensors_in(v)]
    return []


def test_graphed_call_gives_every_run_of_fn_input_tensors_of_its_own():
    """Warm-ups, the capture and the check each get new input tensors: a memo keyed on an input's identity (MoW's
    grouping and task embedding within a rollout) filled by a warm-up would be found by the capture, which would
    then record no kernels for it, and every replay would read the warm-up's values."""
    seen = []

    def fn(x):
        seen.append(x)
        return (x * 2,)

    call, x = GraphedCall(fn, "double", backend=EagerGraphs()), torch.ones(2)
    for _ in range(3):
        assert torch.equal(call(x)[0], x * 2)
    assert call.status() == {"graphed": 1, "eager": 0} and len(seen) >= 4  # 2 warm-ups, capture, check (+ replays)
    assert len({id(t) for t in seen}) == len(seen) and all(t is not x for t in seen)


def test_graphed_call_captures_one_graph_per_signature_and_key_and_keeps_the_newest():
    calls = GraphedCall(lambda x: (x * 2, x.sum()), "double", backend=EagerGraphs(), max_graphs=2)
    for x, key in ((torch.ones(2), None), (torch.ones(3), None), (torch.full((2,), 3.0), None), (torch.ones(2), 7)):
        out = calls(x, key=key)
        assert torch.equal(out[0], x * 2) and torch.equal(out[1], x.sum())
    # shapes (2,) and (3,), then (2,) with key 7, which evicts the oldest graph
    assert calls.status() == {"graphed": 2, "eager": 0}
    assert [sig[0][0][0] for sig in calls.captured] == [(3,), (2,)] and list(calls.captured)[-1][1] == 7
    calls.reset()
    assert calls.status() == {"graphed": 0, "eager": 0}
