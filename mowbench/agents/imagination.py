"""The shared base of world-model agents that learn in imagination (STORM, the monolithic STORM, MoW): each
update trains the world model on replayed sequences, imagines rollouts from replayed contexts, and trains
the actor-critic on them. A method of this kind is a world model (the `WorldModel` protocol) plus its loss
and a config; a method that does not imagine (planning with MPPI or MCTS) implements `Agent` directly."""

from __future__ import annotations

import functools
import warnings
from abc import abstractmethod
from collections.abc import Callable, Hashable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from mowbench.agents.actor_critic import ActorCritic, ActorCriticLearner, Imagined
from mowbench.agents.base import Agent, AgentConfig, Autocast, Metrics, adam, count_parameters
from mowbench.agents.graphs import GraphedCall, graphs_wanted, optimizer_tensors
from mowbench.envs.base import TaskInfo
from mowbench.ops import one_hot, sample_onehot_st, twohot_decode, uniform_bins
from mowbench.replay import Batch


@runtime_checkable
class WorldModel(Protocol):
    """What ImaginationAgent asks of a world model. Every method takes the rows' task indices (B,), which a
    single-task model ignores. z: (B, T, V*C) one-hot latents; h: (B, T, D) sequence features."""

    feature_dim: int  # size of the actor/critic input `features` builds
    latent_vars: int  # V, the categorical variables of z (acting draws V uniforms for each sample of z)
    n_critics: int  # critics the agent keeps (MoW: one per VAE cluster)
    max_len: int  # the longest sequence `sequence` takes (learned positions, cache slots)

    def encode(self, obs: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """obs (B, T, S, S, 3) uint8 -> posterior logits (B, T, V, C)."""

    def empty_cache(self, task: torch.Tensor, dtype: torch.dtype, offset: torch.Tensor | None = None) -> Any:
        """An empty inference cache for len(task) sequences, which `sequence` appends to; offset (B,): each
        sequence's left padding (sequences of different lengths in one cache; see models.transformer.KVCache)."""

    def sequence(self, z: torch.Tensor, action: torch.Tensor, task: torch.Tensor, cache: Any = None,
                 last: bool = False) -> torch.Tensor:
        """z (B, T, V*C), action (B, T, A) -> h (B, T, D); with a cache, continues after the cached steps (whose
        keys and values it adds to the cache). last: only h (B, 1, D) of the last step, the same values up to
        float rounding (what acting and imagination's context pass read), which may cost less."""

    def prior(self, h: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """h (B, T, D) -> logits (B, T, V, C) of the next step's latent."""

    def reward(self, h: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """h (B, T, D) -> symlog two-hot logits (B, T, bins)."""

    def termination(self, h: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """h (B, T, D) -> termination logits (B, T)."""

    def features(self, z: torch.Tensor, h: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """Actor/critic input (B, T, feature_dim) of a state."""

    def critic_index(self, task: torch.Tensor) -> torch.Tensor | None:
        """Which critic judges rows of these tasks (B,), or None when there is one critic."""

    def host_layout(self, task: torch.Tensor, task_counts: tuple[int, ...] | None = None
                    ) -> AbstractContextManager[Hashable]:
        """A context, around one rollout, world-model update or act over rows of these tasks, in which the model's
        computation needs nothing more from the device than the host facts it yields (MoW: rows per VAE cluster,
        for all of its groupings, from `task_counts`, the rows of each task where the host knows them, else read
        from the device once); it yields None when there are none (STORM). A CUDA graph is captured per yielded
        value. With several critics it yields the rows of each critic (critic_index's counts), which the
        actor-critic update's grouping then takes instead of reading them."""

    # True when imagination and acting (encode, sequence, prior, reward, termination, features on fixed shapes,
    # inside host_layout) never wait for the device, so CUDA graphs can hold them (cuda_graphs);
    # tests/test_graphs.py checks the claim on CPU
    capturable: bool


@dataclass
class ImaginationConfig(AgentConfig):
    """Batches, imagination, acting and actor-critic settings shared by every imagination agent; defaults are
    STORM's (arXiv 2310.09615, docs/methods/storm.md). A method's config subclasses it with its world model's sizes."""

    bins: int = 255  # symlog two-hot bins in [-20, 20] for reward and value
    wm_lr: float = 1e-4  # world-model Adam learning rate
    wm_grad_clip: float = 1000.0  # world-model global grad-norm clip
    # Per-task sizes: every task of a multi-task agent is in every batch (stratified sampling), so a batch
    # holds batch_per_task x N sequences and imag_per_task x N start states. STORM (one task): 16 and 1024.
    batch_per_task: int = 16  # world-model batch: sequences of each task per update
    batch_length: int = 64  # world-model batch: steps per sequence
    imag_per_task: int = 1024  # imagination start states of each task per update
    imag_context: int = 8  # real steps fed before imagining
    imag_horizon: int = 16  # imagined steps
    act_context: int = 16  # frames/actions the world model sees when acting
    # steps between full passes over the acting context. 1: every step, exact (STORM's reference recomputes its
    # window each step: the learned absolute positions of a sliding window change every step, so a KV cache
    # cannot be exact). R > 1: a pass over the last act_context-R+1 steps, then one cached token per step, so
    # each step sees its last act_context-R+1..act_context steps (exactly, at positions from 0), and cached
    # keys/values keep the weights of the step that computed them (<= R-1 updates old). See ActingSession.
    act_refresh: int = 1
    # True: every act re-encodes the stream's context frames with the current weights and fresh posterior draws,
    # as STORM's reference does (it keeps the last 16 frames and calls encode_obs on all of them each step), so
    # the latents an act reads are never older than the weights. False: each frame is encoded once, when it is
    # current, and its latent (weights up to act_context-1 updates old, one draw for act_context acts) is kept;
    # one frame's encoding an act instead of act_context (ablation kept_acting_latents)
    act_reencode: bool = True
    reset_context_on_episode: bool = False  # STORM keeps the acting context across episodes
    ac_width: int = 512  # actor/critic MLP width
    ac_depth: int = 2  # actor/critic hidden layers
    gamma: float = 0.985  # discount
    lam: float = 0.95  # lambda of lambda-returns
    lambda_value: str = "current"  # 'current' = STORM reference's V(s_t) (published numbers) | 'next' = V(s_{t+1})
    slow_decay: float = 0.98  # slow critic EMA decay
    norm_decay: float = 0.99  # EMA decay of the return scale S
    # the 5th/95th percentiles of the lambda-returns whose range S tracks: 'kth' = STORM reference's, the int(q N)-th
    # smallest return (torch.kthvalue; published numbers) | 'linear' = torch.quantile's interpolation (ablation
    # interpolated_percentiles)
    return_percentiles: str = "kth"
    # multi-task only (one task: all the same): one S per task | per critic (MoW: cluster) | one for all.
    # The papers are silent; per task keeps a game with large returns from shrinking the others' advantages
    return_norm: str = "task"
    entropy_coef: float = 3e-4  # entropy bonus
    ac_lr: float = 3e-5  # actor-critic Adam learning rate
    ac_eps: float = 1e-5  # actor-critic Adam epsilon
    ac_grad_clip: float = 100.0  # actor-critic grad-norm clip
    # torch.compile every network (opt-in; compile_networks): equal results up to float rounding, a graph the
    # compiler cannot handle runs eagerly
    compile: bool = False
    # replay imagination, acting on full contexts, and the updates where `capturable_updates`, from CUDA graphs
    # (mowbench.agents.graphs.GraphedCall): the same numbers (a replay is checked bitwise against eager when
    # captured), one launch instead of ~170 kernels a horizon step (the speed-ups: docs/performance.md). auto: on a
    # CUDA device, what is capturable; true: the same, warning about what is not (token routing, the expert loop);
    # false: never. What is not capturable, a CPU run, or a failed check runs eagerly
    cuda_graphs: bool | str = "auto"

    def check(self) -> None:
        """The validation table of these fields (each refused value named, with what is allowed)."""
        if self.lambda_value not in ("next", "current"):
            raise ValueError(f"lambda_value={self.lambda_value!r}; allowed: next, current")
        if self.return_percentiles not in ("kth", "linear"):
            raise ValueError(f"return_percentiles={self.return_percentiles!r}; allowed: kth, linear")
        if self.return_norm not in ("task", "critic", "global"):
            raise ValueError(f"return_norm={self.return_norm!r}; allowed: task, critic, global")
        self.check_positive(("batch_per_task", "batch_length", "imag_per_task", "imag_context", "imag_horizon",
                              "act_context", "act_refresh", "ac_width", "wm_lr", "wm_grad_clip", "ac_lr", "ac_eps",
                              "ac_grad_clip"))
        self.check_non_negative(("ac_depth", "entropy_coef"))
        if self.act_refresh > self.act_context:
            raise ValueError(f"act_refresh={self.act_refresh}; allowed: 1..act_context={self.act_context}")
        if self.cuda_graphs not in (True, False, "auto"):
            raise ValueError(f"cuda_graphs={self.cuda_graphs!r}; allowed: auto, true, false")
        if self.bins < 2:
            raise ValueError(f"bins={self.bins}; allowed: an integer >= 2 (two-hot needs two bins)")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"gamma={self.gamma}; allowed: 0 < gamma <= 1")
        for name in ("lam", "slow_decay", "norm_decay"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)}; allowed: 0 <= {name} <= 1")


def sample_z(logits: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
    """Posterior/prior logits (..., V, C) -> straight-through one-hot sample flattened to (..., V*C); u (..., V, 1)
    uniforms to use (None: torch's)."""
    return sample_onehot_st(logits, u).flatten(-2)


@dataclass
class ActingContext:
    """One env stream's acting state: its last `act_context` steps, as frames obs (T, S, S, 3) uint8 (act_reencode:
    re-encoded at every act) or as latents z (T, V*C) (each drawn once, when its frame was current), and actions
    (T,) or (T, A); its own generator, from which every random number of its acting is drawn; and (act_refresh > 1)
    the session it acts in."""

    task: int
    rng: np.random.Generator | None = None  # None (contexts pickled before it): made on first use
    z: torch.Tensor | None = None
    action: torch.Tensor | None = None
    session: ActingSession | None = None
    obs: torch.Tensor | None = None

    def history(self, reencode: bool) -> torch.Tensor | None:
        """The per-step tensor of this stream's context (frames when re-encoding, else latents); None: no context
        (a context kept in the other mode counts as none, so switching modes restarts it)."""
        return self.obs if reencode else self.z


@dataclass
class ActingSession:
    """Cached acting (act_refresh > 1) of one batch of streams: the world model's cache over their last steps,
    rows left-padded to one length (`pad` slots each), `slots` filled, and each stream's history (its frames or
    latents, ActingContext.history) as the last call left it. It lives in the streams' contexts, so a checkpoint
    carries it and a resumed run goes on exactly; a batch of other streams, or a stream whose history changed
    since (a reset), starts a new one."""

    contexts: list[ActingContext]
    history: list[torch.Tensor | None]
    cache: Any
    pad: list[int]
    slots: int
    reencode: bool = False

    def serves(self, contexts: list[ActingContext]) -> bool:
        return len(contexts) == len(self.contexts) and all(
            a is b and a.history(self.reencode) is h for a, b, h in zip(contexts, self.contexts, self.history,
                                                                        strict=True))


def context_seed() -> int:
    """A stream seed drawn from torch's global generator (reproducible for the run's seed)."""
    return int(torch.randint(0, 2**62, (1,)).item())


def random_legal(legal: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A uniformly random legal action per row: legal (B, A) bool, u (B,) in [0, 1) -> (B,) long (the
    floor(u * n_legal)-th legal action)."""
    k = (u * legal.sum(-1)).long().clamp(max=legal.shape[-1] - 1)  # (B,)
    return ((legal.cumsum(-1) == (k + 1)[:, None]) & legal).float().argmax(-1)


def compile_networks(*roots: nn.Module) -> list[str]:
    """torch.compile, in place (state_dict keys unchanged, so checkpoints are interchangeable), the outermost
    modules under `roots` that have a forward of their own (containers are opened); returns their class names.
    Random ops inside compiled graphs draw from torch's generator (inductor's fallback_random), so a seeded run
    draws the numbers it draws eagerly, and a graph the compiler cannot handle (a backend missing on this
    machine, a construct it does not support) runs eagerly instead of failing (dynamo's suppress_errors)."""
    import torch._dynamo
    import torch._inductor.config

    torch._dynamo.config.suppress_errors = True
    torch._inductor.config.fallback_random = True
    compiled: list[str] = []

    def visit(module: nn.Module) -> None:
        if type(module).forward is not nn.Module.forward and not isinstance(module, nn.ModuleList | nn.ModuleDict):
            module.compile()
            compiled.append(type(module).__name__)
        else:
            for child in module.children():
                visit(child)

    for root in roots:
        for child in root.children():
            visit(child)
    return compiled


class ImaginationAgent(Autocast, Agent):
    """World-model update -> imagination with a KV cache -> actor-critic in imagination, and acting from the
    world model's context. A subclass gives `build_world_model` and `world_model_loss`; everything that
    depends on the method (task conditioning, features, which critic judges a task) is the world model's."""

    cfg: ImaginationConfig
    wm: nn.Module  # and a WorldModel
    # True when both updates never wait for the device and keep no state outside tensors changed in place
    # (parameters, buffers, optimizer moments, return scales), so CUDA graphs can hold them (cuda_graphs);
    # tests/test_graphs.py checks the first half on CPU
    capturable_updates = False

    def __init__(self, cfg: ImaginationConfig, tasks: list[TaskInfo], device: torch.device, precision: str) -> None:
        if len(tasks) != 1 and not self.multi_task:
            raise ValueError(f"{type(self).__name__} is single-task; got {len(tasks)} tasks (the runner makes one "
                             "run per task)")
        spaces = {(t.action.discrete, t.action.n) for t in tasks}
        if len(spaces) != 1:
            raise ValueError(f"tasks have different action spaces {sorted(spaces)}; a shared agent needs one "
                             "action set (Atari: env.action_set=full)")
        self.cfg, self.tasks, self.device = cfg, tasks, device
        self.autocast_bf16 = precision == "bf16"
        space = tasks[0].action
        self.discrete, self.action_dim = space.discrete, space.n
        self.legal = torch.as_tensor(np.stack([t.action.legal_mask() for t in tasks]), device=device)  # (N, A)
        self.wm = self.build_world_model(tasks).to(device)
        if not isinstance(self.wm, WorldModel):
            raise TypeError(f"{type(self.wm).__name__} lacks methods of mowbench.agents.imagination.WorldModel")
        n_critics = self.wm.n_critics
        self.ac = ActorCritic(self.wm.feature_dim, self.action_dim, self.discrete, cfg.ac_width, cfg.ac_depth,
                              cfg.bins, n_critics=n_critics).to(device)
        self.graphs = graphs_wanted(cfg.cuda_graphs, device)
        graph_updates = self.graphs and self.capturable_updates
        # optimizers a CUDA graph can hold (MoW makes its world model's anew after the clustering)
        self.capturable_optimizers = capturable = graph_updates and device.type == "cuda"
        self.wm_opt = adam(self.world_model_parameters(), lr=cfg.wm_lr, capturable=capturable)
        self.learner = ActorCriticLearner(
            self.ac, device, cfg.ac_lr, cfg.ac_eps, cfg.ac_grad_clip, cfg.gamma, cfg.lam, cfg.lambda_value,
            cfg.slow_decay, cfg.norm_decay, entropy_coef=cfg.entropy_coef, bins=cfg.bins,
            autocast=self.autocast_bf16,
            norm_groups={"task": len(tasks), "critic": n_critics, "global": 1}[cfg.return_norm], capturable=capturable,
            percentiles=cfg.return_percentiles)
        self.bins = uniform_bins(cfg.bins).to(device)
        if cfg.compile:
            compile_networks(self.wm, self.ac)
        if cfg.cuda_graphs is True and not (self.wm.capturable and self.capturable_updates):  # auto: silently
            warnings.warn(f"cuda_graphs=true: {type(self).__name__}'s "
                          f"{'updates wait' if self.wm.capturable else 'imagination and updates wait'} for the "
                          "device (not capturable), so they run eagerly", stacklevel=2)
        # CUDA graphs (`self.graphs`; agents.graphs): imagination, acting, and the two updates with the tensors they
        # change in place, so that a graph's warm-up and check can be undone
        self.rollout = GraphedCall(self.imagine_tensors, "imagination", self.graphs and self.wm.capturable)
        # acting when every stream's context is full (act_refresh=1: training's acting after its first act_context
        # steps; evaluation's streams, which start at different times, mostly act eagerly); sampled and greedy
        # acting are two functions, so two calls
        self.act_steps = {greedy: GraphedCall(functools.partial(self.act_tensors, greedy=greedy), "acting",
                                              self.graphs and self.wm.capturable) for greedy in (False, True)}
        self.wm_step = GraphedCall(
            lambda *t: self.world_model_step(Batch(*t[:6], extras=dict(zip(self.replay_fields(), t[6:], strict=True)))),
            "world-model update", graph_updates,
            state=lambda: [*self.world_model_parameters(), *self.wm.buffers(), *optimizer_tensors(self.wm_opt)])
        self.ac_step = GraphedCall(
            lambda *t: self.learner.update(Imagined(*t)), "actor-critic update", graph_updates,
            state=lambda: [*self.ac.parameters(), *self.ac.buffers(), *optimizer_tensors(self.learner.opt),
                           self.learner.return_scale])

    # ---- what a method supplies ----
    @abstractmethod
    def build_world_model(self, tasks: list[TaskInfo]) -> nn.Module:
        """The method's world model (a WorldModel) for these tasks, on the CPU."""

    @abstractmethod
    def world_model_loss(self, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        """The scalar world-model loss of a replayed batch and its logged terms."""

    def world_model_parameters(self) -> list[torch.Tensor]:
        """What the world-model optimizer trains: the world model's parameters and any of the loss's own."""
        return list(self.wm.parameters())

    # ---- helpers ----
    def autocast_cache(self) -> bool:
        """With CUDA graphs the cast weights are not cached across a context (torch's advice for capture); the same
        values."""
        return not self.graphs

    def action_input(self, action: torch.Tensor) -> torch.Tensor:
        """Env actions (B, T) long or (B, T, A) float -> world-model input (B, T, A) float."""
        return one_hot(action.long(), self.action_dim) if self.discrete else action.float()

    def norm_index(self, task: torch.Tensor) -> torch.Tensor | None:
        """Which return scale S normalises rows of these tasks (config return_norm; None: one S)."""
        if self.cfg.return_norm == "global":
            return None
        return task if self.cfg.return_norm == "task" else self.wm.critic_index(task)

    # ---- the three phases of an update ----
    def update_world_model(self, batch: Batch) -> Metrics:
        self.wm.train()
        with self.wm.host_layout(batch.task, batch.task_counts) as layout:
            return self.wm_step(batch.obs, batch.action, batch.reward, batch.terminal, batch.task, batch.legal,
                                *(batch.extras[name] for name in self.replay_fields()), key=layout)

    def world_model_step(self, batch: Batch) -> Metrics:
        """One optimizer step of the world model on a replayed batch (`wm_step`: replayed from a CUDA graph
        when CUDA graphs are in use and the updates are capturable)."""
        loss, metrics = self.world_model_loss(batch)
        self.wm_opt.zero_grad(set_to_none=True)
        loss.backward()
        metrics["wm/grad_norm"] = nn.utils.clip_grad_norm_(self.wm.parameters(), self.cfg.wm_grad_clip).detach()
        self.wm_opt.step()
        return metrics

    @torch.no_grad()
    def imagine(self, batch: Batch) -> Imagined:
        """Encode `imag_context` real steps into a cache, then roll out `imag_horizon` steps (`rollout`: replayed
        from a CUDA graph when CUDA graphs are in use)."""
        self.wm.eval()
        with self.wm.host_layout(batch.task, batch.task_counts) as layout:
            feat, action, reward, cont = self.rollout(batch.obs, batch.action, batch.task, batch.legal, key=layout)
        return Imagined(feat, action, reward, cont, batch.legal, self.wm.critic_index(batch.task),
                        self.norm_index(batch.task), layout if self.wm.n_critics > 1 else None)

    def imagine_tensors(self, obs: torch.Tensor, action: torch.Tensor, task: torch.Tensor, legal: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Replayed context obs (B, C, S, S, 3), action (B, C) or (B, C, A), task (B,), legal (B, A) -> imagined
        features (B, H+1, F), actions (B, H) or (B, H, A), rewards and continuation flags (B, H). Tensors in,
        tensors out, the same kernels for the same shapes and no host sync in a capturable world model: what a
        CUDA graph can hold."""
        cfg, wm = self.cfg, self.wm
        cache = wm.empty_cache(task, torch.bfloat16 if self.autocast_bf16 else torch.float32)
        feats, actions, hs = [], [], []
        with self.autocast():
            z_ctx = sample_z(wm.encode(obs, task))  # (B, C, V*C)
            h = wm.sequence(z_ctx, self.action_input(action), task, cache, last=True)  # (B, 1, D)
            z = sample_z(wm.prior(h, task))  # (B, 1, V*C): prediction of the next latent
            for _ in range(cfg.imag_horizon):
                feat = wm.features(z, h, task)  # (B, 1, F)
                act = self.ac.actor(feat, legal[:, None]).sample()  # (B, 1) or (B, 1, A)
                h = wm.sequence(z, self.action_input(act), task, cache)
                feats.append(feat)
                actions.append(act)
                hs.append(h)
                z = sample_z(wm.prior(h, task))
            feats.append(wm.features(z, h, task))
            # reward and termination depend on h only and feed nothing back into the rollout: one pass over
            # the whole horizon instead of one per step (fewer, larger matmuls; the same values)
            h_all = torch.cat(hs, 1)  # (B, H, D)
            rewards = twohot_decode(wm.reward(h_all, task), self.bins)  # (B, H)
            conts = (wm.termination(h_all, task) <= 0).float()  # (B, H): 1 - predicted termination
        return torch.cat(feats, 1).float(), torch.cat(actions, 1), rewards.float(), conts

    def open_loop_window(self) -> tuple[int, int]:
        """Agent.open_loop_window: imagination's context, and the world model's longest sequence."""
        return self.cfg.imag_context, self.wm.max_len

    @torch.no_grad()
    def open_loop(self, obs: np.ndarray, action: np.ndarray, task: int, context: int
                  ) -> tuple[np.ndarray, np.ndarray] | None:
        """Agent.open_loop: posterior latents of the `context` real frames, then latents drawn from the prior step
        by step, fed the real actions; every latent decoded. T <= the Transformer's max_len."""
        wm = self.wm
        wm.eval()
        o = torch.as_tensor(obs, device=self.device)[None]  # (1, T, S, S, 3)
        a = torch.as_tensor(action, device=self.device)[None]  # (1, T) or (1, T, A)
        t = torch.tensor([task], device=self.device)
        with wm.host_layout(t), self.autocast():
            cache = wm.empty_cache(t, torch.bfloat16 if self.autocast_bf16 else torch.float32)
            z = sample_z(wm.encode(o[:, :context], t))  # (1, C, V*C)
            h = wm.sequence(z, self.action_input(a[:, :context]), t, cache)  # (1, C, D)
            zs, hs = [z], [h]
            for i in range(context, o.shape[1]):
                z = sample_z(wm.prior(h[:, -1:], t))  # (1, 1, V*C): the next latent, predicted
                h = wm.sequence(z, self.action_input(a[:, i:i + 1]), t, cache)  # (1, 1, D)
                zs.append(z)
                hs.append(h)
            frames = wm.decode(torch.cat(zs, 1), t).float()  # (1, T, 3, S, S) in ~[0, 1]
            rewards = twohot_decode(wm.reward(torch.cat(hs, 1), t), self.bins).float()  # (1, T)
        pixels = (frames[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)  # (T, S, S, 3)
        return pixels.cpu().numpy(), rewards[0].cpu().numpy()

    def update_actor_critic(self, traj: Imagined) -> Metrics:
        self.ac.train()
        with self.ac.critic_layout(traj.critic_sizes):
            return self.ac_step(traj.feat, traj.action, traj.reward, traj.cont, traj.legal, traj.critic, traj.norm,
                                key=traj.critic_sizes)

    # ---- Agent interface ----
    def per_task_batch(self) -> dict[str, int]:
        """What each task contributes to one update: world-model sequences (of batch_length steps) and
        imagination start states. The replay's stratified sampling gives every task exactly these."""
        return {"world_model_sequences": self.cfg.batch_per_task, "sequence_length": self.cfg.batch_length,
                "imagination_starts": self.cfg.imag_per_task}

    def update(self, sample: Callable[[int, int], Batch]) -> Metrics:
        cfg, n = self.cfg, len(self.tasks)
        metrics = self.update_world_model(sample(cfg.batch_per_task * n, cfg.batch_length))
        traj = self.imagine(sample(cfg.imag_per_task * n, cfg.imag_context))
        return metrics | self.update_actor_critic(traj)

    def bench_phases(self, sample: Callable[[int, int], Batch]) -> dict[str, Callable[[], Any]]:
        cfg, n = self.cfg, len(self.tasks)
        wm_batch = sample(cfg.batch_per_task * n, cfg.batch_length)
        context = sample(cfg.imag_per_task * n, cfg.imag_context)
        traj = self.imagine(context)
        return {"world_model_update": lambda: self.update_world_model(wm_batch),
                "imagination": lambda: self.imagine(context),
                "agent_update": lambda: self.update_actor_critic(traj)}

    def bench_status(self) -> dict[str, Any]:
        """With CUDA graphs in use (cuda_graphs true, or auto on CUDA): per phase, how many input shapes replay
        from graphs and how many run eagerly (read after the bench's acting, so acting's graphs count)."""
        if not self.graphs:
            return {}
        return {"cuda_graphs": {name: {k: sum(call.status()[k] for call in calls) for k in ("graphed", "eager")}
                                for name, calls in self.graph_calls().items()}}

    def graph_calls(self) -> dict[str, list[GraphedCall]]:
        """The calls CUDA graphs may hold, by phase (the bench's names)."""
        return {"world_model_update": [self.wm_step], "imagination": [self.rollout], "agent_update": [self.ac_step],
                "acting": list(self.act_steps.values())}

    def new_context(self, task: int, seed: int | None = None) -> ActingContext:
        return ActingContext(task, np.random.default_rng(context_seed() if seed is None else seed))

    def episode_start(self, context: ActingContext) -> None:
        if self.cfg.reset_context_on_episode:
            context.z = context.obs = context.action = None

    def act(self, context: ActingContext, obs: np.ndarray, greedy: bool = False) -> np.ndarray | int:
        return self.act_batch([context], [obs], greedy)[0]

    @torch.inference_mode()  # no autograd bookkeeping at all (no_grad still counts versions): ~4% of a batch-1 act
    def act_batch(self, contexts: list[ActingContext], obs: list[np.ndarray], greedy: bool = False
                  ) -> list[np.ndarray | int]:
        """Act from [prior sample of z_t, h_{t-1}] computed over each stream's previous frames and actions
        (STORM); the current frame is appended to the context after the action is chosen. With act_reencode (the
        default, as STORM's reference) the context's frames are encoded anew at every act, with the current
        weights and fresh posterior draws; without, each frame's latent is drawn once, when the frame is current,
        and kept.

        All streams are encoded, and all that have a context act, in one pass each. Each stream draws its
        random numbers from its own generator, in a fixed order (prior sample, encodings, action), so its
        actions do not depend on the streams beside it. When every stream has a context of the same length
        (act_refresh 1), one pure call does it all (`act_tensors`; with full contexts replayed from a CUDA graph
        when CUDA graphs are in use); otherwise h comes from `context_h` (act_refresh 1: exact) or `cached_h`
        (act_refresh > 1) and streams without a context act uniformly at random."""
        if self.wm.training:  # a full eval() walks every module: only after an update
            self.wm.eval()
        if self.ac.training:
            self.ac.eval()
        cfg, reencode, n = self.cfg, self.cfg.act_reencode, len(contexts)
        task = torch.tensor([c.task for c in contexts], device=self.device)  # (n,)
        obs_t = torch.as_tensor(np.stack(obs), device=self.device)[:, None]  # (n, 1, S, S, 3)
        v, width = self.wm.latent_vars, 1 if self.discrete else self.action_dim
        for c in contexts:
            if c.rng is None:
                c.rng = np.random.default_rng(context_seed())
        lengths = [0 if (h := c.history(reencode)) is None else len(h) for c in contexts]
        # per stream: V uniforms for the prior sample, V for each frame it encodes (re-encoding: its context's
        # L frames, oldest first; else the current frame), `width` for the action; one copy to the device
        draws = [c.rng.random(v * (1 + (length if reencode else 1)) + width, dtype=np.float32)
                 for c, length in zip(contexts, lengths, strict=True)]
        u = list(torch.as_tensor(np.concatenate(draws), device=self.device).split([len(d) for d in draws]))
        if cfg.act_refresh == 1 and lengths[0] and lengths.count(lengths[0]) == n:
            a = torch.stack([c.action for c in contexts])  # (n, L) or (n, L, A)
            if reencode:  # the window's frames (n, L, S, S, 3), encoded in the call
                frames, z = torch.stack([c.obs for c in contexts]), None
            else:  # the current frame and the kept latents (n, L, V*C)
                frames, z = obs_t, torch.stack([c.z for c in contexts])
            rows = torch.stack(u)  # (n, V + E V + width)
            if lengths[0] == cfg.act_context:  # training's steady state: one graph (shorter contexts are eager)
                counts = tuple(np.bincount([c.task for c in contexts], minlength=len(self.tasks)).tolist())
                with self.wm.host_layout(task, counts) as layout:
                    actions, z_enc = self.act_steps[greedy](frames, z, a, task, rows, key=layout)
            else:
                actions, z_enc = self.act_tensors(frames, z, a, task, rows, greedy)
        else:
            actions, z_enc = self.act_streams(contexts, lengths, obs_t, task, u, greedy)
        steps = obs_t[:, 0] if reencode else z_enc[:, -1]  # (n, S, S, 3) frames or (n, V*C) latents
        keep = cfg.act_context - 1
        for i, c in enumerate(contexts):
            history = c.history(reencode)
            if history is None:
                history, c.action = steps[i:i + 1], actions[i:i + 1]
            else:
                history = torch.cat([history[-keep:] if keep else history[:0], steps[i:i + 1]])
                c.action = torch.cat([c.action[-keep:] if keep else c.action[:0], actions[i:i + 1]])
            if reencode:
                c.obs = history
            else:
                c.z = history
        if cfg.act_refresh > 1 and any(lengths):  # the session (cached_h) now holds the histories as they are
            contexts[0].session.history = [c.history(reencode) for c in contexts]
        out = actions.cpu().numpy()
        return [int(a) for a in out] if self.discrete else [a.astype(np.float32) for a in out]

    def act_tensors(self, frames: torch.Tensor, z: torch.Tensor | None, action: torch.Tensor, task: torch.Tensor,
                    u: torch.Tensor, greedy: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Streams that all have a context of one length L. act_reencode: frames (n, L, S, S, 3) uint8 are the
        contexts' frames, encoded here, and z is None; else frames (n, 1, S, S, 3) is the current frame and z
        (n, L, V*C) the contexts' kept latents. action (n, L) or (n, L, A), task (n,), uniforms u
        (n, V + E V + width) for the E = frames.shape[1] encoded frames -> actions (n,) long or (n, A), and the
        encoded frames' latent samples (n, E, V*C). Tensors in, tensors out, no host read in a capturable world
        model: what a CUDA graph can hold. The same values as act_streams (one pass over the whole window)."""
        v, e = self.wm.latent_vars, frames.shape[1]
        with self.autocast():
            z_enc = self.frame_latents(frames, task, u[:, v:v + e * v].unflatten(1, (e, v)))  # (n, E, V*C)
            h = self.wm.sequence(z_enc if z is None else z, self.action_input(action), task, last=True)  # (n, 1, D)
            chosen = self.policy(h, task, u, greedy)
        return chosen.to(torch.long if self.discrete else torch.float32), z_enc

    def frame_latents(self, frames: torch.Tensor, task: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Posterior samples of frames (n, E, S, S, 3) uint8 drawn with uniforms u (n, E, V) -> (n, E, V*C)."""
        return sample_z(self.wm.encode(frames, task), u[..., None]).float()

    def policy(self, h: torch.Tensor, task: torch.Tensor, u: torch.Tensor, greedy: bool) -> torch.Tensor:
        """The action of each row from h (r, 1, D) after its context: the actor on [prior sample of z, h], with
        the row's uniforms u (r, V + ... + width): the first V for the prior sample, the last `width` for the
        action -> (r,) or (r, A)."""
        v, width = self.wm.latent_vars, 1 if self.discrete else self.action_dim
        z_next = sample_z(self.wm.prior(h, task), u[:, None, :v, None])  # (r, 1, V*C)
        dist = self.ac.actor(self.wm.features(z_next, h, task), self.legal[task][:, None])
        u_act = u[:, None, u.shape[1] - width:]  # (r, 1, width)
        chosen = dist.mode() if greedy else dist.sample(u_act)
        return chosen[:, 0]  # (r,) or (r, A)

    def act_streams(self, contexts: list[ActingContext], lengths: list[int], obs: torch.Tensor, task: torch.Tensor,
                    u: list[torch.Tensor], greedy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """act_tensors' outputs for streams with contexts of several lengths, some without (they act uniformly at
        random among legal actions, as STORM's first steps), or with act_refresh > 1; u: each stream's uniforms
        (V + E V + width,). The latents are the current frames' (n, 1, V*C), or None when re-encoding (the
        context keeps frames)."""
        n, v, width = len(contexts), self.wm.latent_vars, 1 if self.discrete else self.action_dim
        u_act = torch.stack([x[len(x) - width:] for x in u])  # (n, width)
        if self.discrete:
            actions = random_legal(self.legal[task], u_act[:, 0])  # (n,)
        else:
            actions = u_act * 2 - 1  # (n, A) uniform in [-1, 1]
        rows = [i for i in range(n) if lengths[i]]  # streams with a context
        z_enc = None
        with self.autocast():
            if not self.cfg.act_reencode:
                z_enc = self.frame_latents(obs, task, torch.stack([x[v:2 * v] for x in u])[:, None])  # (n, 1, V*C)
            if rows:
                h = (self.context_h if self.cfg.act_refresh == 1 else self.cached_h)(contexts, lengths, task, u)
                idx = torch.tensor(rows, device=self.device)
                u_rows = torch.stack([torch.cat([u[i][:v], u[i][len(u[i]) - width:]]) for i in rows])  # (r, V+width)
                actions[idx] = self.policy(h[idx], task[idx], u_rows, greedy).to(actions.dtype)
        return actions, z_enc

    def context_latents(self, contexts: list[ActingContext], rows: list[int], take: list[int], task: torch.Tensor,
                        u: list[torch.Tensor]) -> list[torch.Tensor]:
        """The latents (k, V*C) of the last k = take[j] steps of each stream contexts[rows[j]]: kept, or (act_reencode)
        its frames encoded now, with the uniforms u of those frames, in one encoder pass per k."""
        if not self.cfg.act_reencode:
            return [contexts[i].z[len(contexts[i].z) - k:] for i, k in zip(rows, take, strict=True)]
        v, out = self.wm.latent_vars, [None] * len(rows)
        for k in sorted(set(take)):
            js = [j for j in range(len(rows)) if take[j] == k]
            frames = torch.stack([contexts[rows[j]].obs[len(contexts[rows[j]].obs) - k:] for j in js])  # (g, k, ...)
            # stream i's uniforms: [prior V | its L frames' V each, oldest first | action]
            u_enc = torch.stack([u[rows[j]][v * (1 + len(contexts[rows[j]].obs) - k):
                                            v * (1 + len(contexts[rows[j]].obs))] for j in js])  # (g, k V)
            idx = torch.tensor([rows[j] for j in js], device=self.device)
            z = self.frame_latents(frames, task[idx], u_enc.unflatten(1, (k, v)))  # (g, k, V*C)
            for g, j in enumerate(js):
                out[j] = z[g]
        return out

    def context_h(self, contexts: list[ActingContext], lengths: list[int], task: torch.Tensor,
                  u: list[torch.Tensor]) -> torch.Tensor:
        """h (n, 1, D) after each stream's whole context, recomputed (exact): streams with the same context length
        share one pass (after the first steps of an episode, all of them); rows without a context are zeros."""
        out: torch.Tensor | None = None
        for length in sorted(set(lengths) - {0}):
            rows = [i for i in range(len(contexts)) if lengths[i] == length]
            idx = torch.tensor(rows, device=self.device)
            z = torch.stack(self.context_latents(contexts, rows, [length] * len(rows), task, u))  # (g, L, V*C)
            a = torch.stack([contexts[i].action for i in rows])  # (g, L) or (g, L, A)
            h = self.wm.sequence(z, self.action_input(a), task[idx], last=True)[:, 0]  # (g, D)
            out = h.new_zeros(len(contexts), h.shape[-1]) if out is None else out
            out[idx] = h
        assert out is not None, "called without a stream that has a context"
        return out[:, None]

    def cached_h(self, contexts: list[ActingContext], lengths: list[int], task: torch.Tensor,
                 u: list[torch.Tensor]) -> torch.Tensor:
        """h (n, 1, D) from the streams' session (ActingSession): the newest (z, a) of every stream appended to its
        cache, or, every act_refresh steps and whenever the session does not serve these streams, a new session
        from one pass over each stream's last act_context - act_refresh + 1 steps (left-padded to one length).
        With act_reencode, the frames a call passes are encoded in it (the cached steps keep their latents)."""
        cfg, n = self.cfg, len(contexts)
        session = contexts[0].session
        if session is not None and session.serves(contexts) and session.slots < cfg.act_context:
            z = torch.stack(self.context_latents(contexts, list(range(n)), [1] * n, task, u))  # (n, 1, V*C)
            a = torch.stack([c.action[-1:] for c in contexts])  # (n, 1) or (n, 1, A)
            session.slots += 1
            return self.wm.sequence(z, self.action_input(a), task, session.cache)  # (n, 1, D)
        fill = [min(length, cfg.act_context - cfg.act_refresh + 1) for length in lengths]
        m = max(fill)
        offset = torch.tensor([m - f for f in fill], device=self.device)  # (n,)
        cache = self.wm.empty_cache(task, torch.bfloat16 if self.autocast_bf16 else torch.float32, offset)
        rows = [i for i in range(n) if fill[i]]
        latents = self.context_latents(contexts, rows, [fill[i] for i in rows], task, u)
        z = latents[0].new_zeros(n, m, latents[0].shape[-1])  # (n, m, V*C): padding never attended to
        first = contexts[rows[0]].action
        a = first.new_zeros(n, m, *first.shape[1:])  # (n, m) or (n, m, A)
        for i, zi in zip(rows, latents, strict=True):
            z[i, m - fill[i]:], a[i, m - fill[i]:] = zi, contexts[i].action[-fill[i]:]
        reencode = cfg.act_reencode
        session = ActingSession(list(contexts), [c.history(reencode) for c in contexts], cache, [m - f for f in fill],
                                m, reencode)
        for c in contexts:
            c.session = session
        return self.wm.sequence(z, self.action_input(a), task, cache, last=True)  # (n, 1, D)

    def state_dict(self) -> dict[str, Any]:
        return {"wm": self.wm.state_dict(), "ac": self.ac.state_dict(), "wm_opt": self.wm_opt.state_dict(),
                "learner": self.learner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.wm.load_state_dict(state["wm"])
        self.ac.load_state_dict(state["ac"])
        self.wm_opt.load_state_dict(state["wm_opt"])
        self.learner.load_state_dict(state["learner"])
        self.forget_graphs()  # the optimizers' moments are new tensors

    def forget_graphs(self) -> None:
        """Drop every CUDA graph: after tensors a graph reads were replaced rather than updated in place (an
        optimizer made anew or loaded)."""
        for calls in self.graph_calls().values():
            for call in calls:
                call.reset()

    def parameter_counts(self) -> dict[str, int]:
        return {"world_model": count_parameters(self.wm.parameters()),
                "actor_critic": count_parameters(self.ac.actor.parameters()) + count_parameters(
                    self.ac.critics.parameters()),
                "slow_critic": count_parameters(self.ac.slow_critics.parameters())}
