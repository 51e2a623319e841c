"""The TD-MPC2 family's shared base: agents around TD-MPC2's latent world model (TD-MPC2, Newt, PWM;
docs/methods/tdmpc2.md). The world model of mowbench.models.tdmpc is trained online from the per-task replays by
latent consistency and reward prediction over an H-step unroll, on frame-stacked pixel contexts; discrete-action
suites are refused. A method adds how it acts and what else it learns (TD-MPC2: Q ensemble, policy prior and MPPI;
PWM: per-task actors and critics by first-order gradients)."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mowbench.agents.base import Agent, AgentConfig, Autocast, Metrics, PicklesGenerator, count_parameters
from mowbench.envs.base import TaskInfo
from mowbench.models.tdmpc import SIZES, TDMPCWorldModel, conv_out
from mowbench.ops import random_shift, rho_weights, stack_frames, symlog_twohot_ce
from mowbench.replay import Batch, StepField


@dataclass
class TDMPCFamilyConfig(AgentConfig):
    """World-model settings shared by the TD-MPC2 family; defaults are TD-MPC2's (5M, docs/methods/tdmpc2.md)."""

    model_size: str = "5M"  # 1M | 5M | 19M | L (Newt) | custom (enc_dim, mlp_dim, latent_dim below)
    # pixels: frame stacks through the conv trunk | state: TD-MPC2's state MLP encoder on (state_dim,) vectors, the
    # task vector concatenated to the state as upstream (no suite here gives states: mowbench.verify uses it)
    obs: str = "pixels"
    state_dim: int = 0  # obs=state: the state vector's size
    enc_layers: int = 2  # obs=state: upstream's num_enc_layers (max(enc_layers - 1, 1) hidden layers of enc_dim)
    enc_dim: int = 256  # custom size: encoder width (state encoders only; unused with pixels, kept for the table)
    mlp_dim: int = 512  # custom size: MLP width of dynamics, reward, policy and Q
    latent_dim: int = 512  # custom size: latent z size (a multiple of simnorm_group)
    simnorm_group: int = 8  # SimNorm group size
    dynamics_norm: bool = True  # LayerNorm before the dynamics' SimNorm, as upstream (ablation no_dynamics_norm)
    init: str = "tdmpc2"  # tdmpc2: upstream's init (Linear weights N(0, 0.02), biases 0) | torch (ablation torch_init)
    frames: int = 3  # stacked RGB frames per observation
    channels: int = 32  # conv channels of the pixel encoder
    kernels: tuple[int, ...] = (7, 5, 3, 3)  # conv kernels (TD-MPC2's, for 64x64)
    strides: tuple[int, ...] = (2, 2, 2, 1)  # conv strides
    shift_pad: int = 3  # random-shift augmentation pad in pixels (0: none)
    task_dim: int = 64  # learned task embedding size of multi-task runs (TD-MPC2: 64-96; single task: none)
    bins: int = 101  # two-hot bins of reward and Q in symlog space
    vmin: float = -10.0  # lowest bin (symlog space)
    vmax: float = 10.0  # highest bin (symlog space)
    horizon: int = 3  # unroll length H of the world-model loss
    rho: float = 0.5  # temporal weight rho^t of the unrolled losses
    rho_normalise: bool = False  # weights rho^t / sum (Newt) instead of rho^t / H (TD-MPC2)
    consistency_coef: float = 20.0  # latent consistency (MSE to encode(o_{t+1})) weight
    reward_coef: float = 0.1  # reward cross-entropy weight
    lr: float = 3e-4  # world-model Adam learning rate
    enc_lr_scale: float = 0.3  # encoder learning rate = lr x this
    grad_clip: float = 20.0  # world-model grad-norm clip
    batch_size: int = 256  # sequences per update, single-task run (TD-MPC2: 256)
    batch_multi_task: int = 1024  # sequences per update of a multi-task run, spread evenly over the tasks
    # updates the first update() call makes: TD-MPC2 runs as many updates as seeding steps when seeding ends
    # (max(1000, 5 x episode length) = 1000 on Meta-World); our warm-up is the trainer's train.warmup
    seed_updates: int = 1000

    def check(self) -> None:
        if self.model_size not in (*SIZES, "custom"):
            raise ValueError(f"model_size={self.model_size!r}; allowed: {', '.join(SIZES)}, custom")
        self.check_positive(("enc_dim", "mlp_dim", "latent_dim", "simnorm_group", "frames", "channels", "bins",
                              "horizon", "lr", "grad_clip", "batch_size", "batch_multi_task", "enc_lr_scale"))
        self.check_non_negative(("shift_pad", "task_dim", "consistency_coef", "reward_coef", "seed_updates"))
        if self.sizes()[2] % self.simnorm_group:
            raise ValueError(f"latent_dim={self.sizes()[2]}; allowed: a multiple of simnorm_group={self.simnorm_group}")
        if len(self.kernels) != len(self.strides) or not self.kernels:
            raise ValueError(f"kernels={list(self.kernels)} and strides={list(self.strides)}; allowed: two non-empty "
                             "lists of one length")
        if not 0.0 < self.rho <= 1.0:
            raise ValueError(f"rho={self.rho}; allowed: 0 < rho <= 1")
        if self.init not in ("tdmpc2", "torch"):
            raise ValueError(f"init={self.init!r}; allowed: tdmpc2, torch")
        if self.vmin >= self.vmax:
            raise ValueError(f"vmin={self.vmin}, vmax={self.vmax}; allowed: vmin < vmax")
        if self.obs not in ("pixels", "state"):
            raise ValueError(f"obs={self.obs!r}; allowed: pixels, state")
        if self.obs == "state" and (self.state_dim < 1 or self.enc_layers < 1):
            raise ValueError(f"state_dim={self.state_dim}, enc_layers={self.enc_layers}; allowed with obs=state: "
                             "both >= 1")

    @property
    def batch_length(self) -> int:
        """Steps of a replayed sequence: frames - 1 of history, then the H + 1 steps of an unroll."""
        return self.frames + self.horizon

    def sizes(self) -> tuple[int, int, int]:
        """(enc_dim, mlp_dim, latent_dim) of the chosen model size."""
        return SIZES.get(self.model_size, (self.enc_dim, self.mlp_dim, self.latent_dim))

    def check_image_size(self, image_size: int) -> None:
        if self.obs == "pixels":
            conv_out(image_size, self.kernels, self.strides)

    def check_suite(self, suite: str, discrete: bool) -> None:
        """Continuous actions only, and pixels: refused before any env or network is built."""
        if self.obs == "state":
            raise ValueError(f"obs=state with env={suite}: every suite here gives pixels; allowed: obs=pixels "
                             "(the state encoder replays upstream's state-based recordings in mowbench.verify)")
        if discrete:
            raise ValueError(f"env={suite} has discrete actions; the TD-MPC2 family (tdmpc2, newt, pwm) plans or acts "
                             "in continuous action spaces only; allowed: env=metaworld")


def check_continuous(tasks: list[TaskInfo]) -> None:
    discrete = sorted({t.suite for t in tasks if t.action.discrete})
    if discrete:
        raise ValueError(f"{discrete[0]} has discrete actions; the TD-MPC2 family (tdmpc2, newt, pwm) needs continuous "
                         "actions; allowed: env=metaworld")


@dataclass
class FrameContext(PicklesGenerator):
    """One env stream's acting state: its task, its last `frames` observations, its own noise generator
    (evaluation streams; None: torch's global one) and the method's carried state (TD-MPC2: the previous
    plan's mean, shifted to warm-start the next)."""

    task: int
    frames: list[np.ndarray] = field(default_factory=list)
    rng: torch.Generator | None = None
    carry: Any = None

    def push(self, obs: np.ndarray, k: int) -> np.ndarray:
        """Record obs (S, S, 3) and return the stack (k*3, S, S), the episode's first frame repeated before it."""
        self.frames = (self.frames or [obs] * (k - 1))[-(k - 1):] + [obs] if k > 1 else [obs]
        return np.concatenate([f.transpose(2, 0, 1) for f in self.frames], axis=0)


@dataclass
class Unroll:
    """A replayed batch prepared for an H-step unroll. obs (B, H+1, 3k, S, S) frame stacks (augmented) or states
    (B, H+1, D), action (B, H, A), reward (B, H), valid (B, H) 1.0 where transition t stays inside the episode of
    step 0 (a sequence may cross an episode end; the last transition of an episode has no stored next observation),
    task (B,)."""

    obs: torch.Tensor
    action: torch.Tensor
    reward: torch.Tensor
    valid: torch.Tensor
    task: torch.Tensor


class TDMPCFamilyAgent(Autocast, Agent):
    """TD-MPC2-style agent base: the world model, its optimizer and loss, frame-stacked contexts, replay of the
    `first` flags. Subclasses build the world model's extra parts and implement acting and their own learning."""

    cfg: TDMPCFamilyConfig

    def __init__(self, cfg: TDMPCFamilyConfig, tasks: list[TaskInfo], device: torch.device, precision: str) -> None:
        check_continuous(tasks)
        if len(tasks) != 1 and not self.multi_task:
            raise ValueError(f"{type(self).__name__} is single-task; got {len(tasks)} tasks")
        self.cfg, self.tasks, self.device = cfg, tasks, device
        self.autocast_bf16 = precision == "bf16"
        self.action_dim = self.padded_action_dim(tasks)
        mask = torch.zeros(len(tasks), self.action_dim, dtype=torch.bool)
        for k, t in enumerate(tasks):  # actions padded to the largest action dim, the padding masked
            mask[k, :t.action.n] = True
        self.action_mask = mask.to(device)
        self.wm = self.build_world_model(tasks, mask).to(device)
        self.set_train(False)  # eval mode except inside an update (step), as upstream TD-MPC2
        self.rho = rho_weights(cfg.horizon, cfg.rho, cfg.rho_normalise).to(device)  # (H,)
        self.updates = 0

    # ---- what a method supplies ----
    @abstractmethod
    def build_world_model(self, tasks: list[TaskInfo], action_mask: torch.Tensor) -> TDMPCWorldModel: ...

    @abstractmethod
    def train_step(self, sample: Callable[[int, int], Batch]) -> Metrics:
        """One update of everything the method learns."""

    @abstractmethod
    def choose(self, z: torch.Tensor, task: torch.Tensor, contexts: list[FrameContext], greedy: bool) -> torch.Tensor:
        """Actions (B, A) for the streams' latents z (B, L) (TD-MPC2: MPPI; PWM: the task's actor)."""

    # ---- shared ----
    def padded_action_dim(self, tasks: list[TaskInfo]) -> int:
        """The action space every task's actions are padded to: the largest action dim (mowbench.verify pads
        further, as upstream Newt pads every task to a fixed size)."""
        return max(t.action.n for t in tasks)

    def task_vectors(self, tasks: list[TaskInfo]) -> torch.Tensor | None:
        """Frozen task vectors (K, E) (Newt: language), or None for a learned embedding."""
        return None

    def world_model_kwargs(self, tasks: list[TaskInfo], action_mask: torch.Tensor) -> dict[str, Any]:
        """The TDMPCWorldModel arguments of this config and these tasks (a subclass adds Q and policy settings)."""
        cfg = self.cfg
        vectors = self.task_vectors(tasks)
        task_dim = vectors.shape[1] if vectors is not None else (cfg.task_dim if len(tasks) > 1 else 0)
        return dict(image_size=tasks[0].image_size, frames=cfg.frames, action_dim=self.action_dim,
                    n_tasks=len(tasks), latent_dim=cfg.sizes()[2], mlp_dim=cfg.sizes()[1], task_dim=task_dim,
                    task_vectors=vectors, bins=cfg.bins, vmin=cfg.vmin, vmax=cfg.vmax,
                    simnorm_group=cfg.simnorm_group, channels=cfg.channels, kernels=tuple(cfg.kernels),
                    strides=tuple(cfg.strides), action_mask=action_mask, dynamics_norm=cfg.dynamics_norm,
                    init=cfg.init, obs=cfg.obs, state_dim=cfg.state_dim, enc_dim=cfg.sizes()[0],
                    enc_layers=cfg.enc_layers)

    def batch_size(self) -> int:
        """Sequences per update: batch_size for one task, batch_multi_task rounded down to a multiple of the task
        count (at least one per task), so every task has the same number of rows in every batch."""
        n = len(self.tasks)
        return self.cfg.batch_size if n == 1 else max(n, self.cfg.batch_multi_task // n * n)

    def replay_fields(self) -> dict[str, StepField]:
        return {"first": StepField()}  # episode starts: frame stacks and the episode mask of an unroll

    def new_context(self, task: int, seed: int | None = None) -> FrameContext:
        rng = None
        if seed is not None:
            rng = torch.Generator()
            rng.manual_seed(seed)
        return FrameContext(task, rng=rng)

    def episode_start(self, context: FrameContext) -> None:
        context.frames, context.carry = [], None

    def stacks(self, contexts: list[FrameContext], obs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each stream's frame stack after recording its obs -> (B, 3k, S, S) uint8 on the device, task (B,);
        with obs=state the states (B, D) as they are."""
        if self.cfg.obs == "state":
            x = np.stack(obs).astype(np.float32)
        else:
            x = np.stack([c.push(o, self.cfg.frames) for c, o in zip(contexts, obs, strict=True)])
        task = torch.tensor([c.task for c in contexts], device=self.device)
        return torch.as_tensor(x, device=self.device), task

    @torch.inference_mode()  # acting: no autograd bookkeeping (see ImaginationAgent.act_batch)
    def act_batch(self, contexts: list[FrameContext], obs: list[np.ndarray], greedy: bool = False
                  ) -> list[np.ndarray]:
        """Encode every stream's frame stack in one pass, let the method choose, and cut each action to its
        task's action dims."""
        x, task = self.stacks(contexts, obs)
        with self.autocast():
            z = self.wm.encode(x, task).float()  # (B, L)
        out = self.choose(z, task, contexts, greedy).float().cpu().numpy()
        return [out[i, :self.tasks[c.task].action.n] for i, c in enumerate(contexts)]

    def act(self, context: FrameContext, obs: np.ndarray, greedy: bool = False) -> np.ndarray:
        return self.act_batch([context], [obs], greedy)[0]

    def noise(self, contexts: list[FrameContext], shape: tuple[int, ...]) -> torch.Tensor:
        """Standard normal noise (B, *shape), each stream's from its own generator when it has one, so a stream's
        actions do not depend on the streams acting beside it."""
        rows = [torch.randn(shape, generator=c.rng) if c.rng is not None else torch.randn(shape) for c in contexts]
        return torch.stack(rows).to(self.device)

    def unroll(self, batch: Batch, augment: bool = True) -> Unroll:
        """Frame stacks, actions, rewards and the episode mask of a batch of k-1+H+1 replayed steps (obs=state:
        the last H+1 states (B, H+1, D), neither stacked nor shifted, as upstream's state path)."""
        k, h = self.cfg.frames, self.cfg.horizon
        first = batch.extras["first"]  # (B, T)
        if self.cfg.obs == "state":
            obs = batch.obs[:, k - 1:].float()  # (B, H+1, D)
        else:
            obs = stack_frames(batch.obs, first, k)  # (B, H+1, 3k, S, S)
        if augment and self.cfg.shift_pad and self.cfg.obs == "pixels":
            b, t = obs.shape[:2]
            pad = self.cfg.shift_pad
            offsets = torch.randint(0, 2 * pad + 1, (b * t, 2), device=obs.device)
            obs = random_shift(obs.flatten(0, 1), pad, offsets).unflatten(0, (b, t))
        # transition t (stack t -> t+1) is in the episode of stack 0 while no episode starts at stacks 1..t+1
        starts = first[:, k:k + h]  # (B, H): stacks 1..H
        valid = torch.cumprod(1.0 - starts, dim=1)
        action = batch.action[:, k - 1:k - 1 + h].float()  # (B, H, A)
        if action.shape[-1] < self.action_dim:
            action = F.pad(action, (0, self.action_dim - action.shape[-1]))
        return Unroll(obs, action, batch.reward[:, k - 1:k - 1 + h].float(), valid, batch.task)

    def encode_all(self, obs: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """obs (B, T, 3k, S, S) or states (B, T, D) -> z (B, T, L)."""
        b, t = obs.shape[:2]
        return self.wm.encode(obs.flatten(0, 1), task.repeat_interleave(t)).unflatten(0, (b, t))

    def weighted(self, loss: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """sum_t rho_t * mean over rows of loss (B, H), transitions outside the episode left out."""
        return (loss.float() * valid * self.rho).sum(1).mean()

    def world_model_terms(self, u: Unroll) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Consistency and reward losses of an H-step latent unroll from encode(o_0); targets encode(o_{1..H})
        without gradient (TD-MPC2 has no target encoder). Returns the weighted terms, the unrolled latents zs
        (B, H+1, L) (zs[:, 0] = encode(o_0)) and the targets next_z (B, H, L)."""
        with torch.no_grad(), self.autocast():
            next_z = self.encode_all(u.obs[:, 1:], u.task)  # (B, H, L)
        with self.autocast():
            z = self.wm.encode(u.obs[:, 0], u.task)  # (B, L)
            zs = [z]
            for t in range(self.cfg.horizon):
                z = self.wm.next(z, u.action[:, t], u.task)
                zs.append(z)
            zs_t = torch.stack(zs, dim=1)  # (B, H+1, L)
            reward_logits = self.wm.reward(zs_t[:, :-1], u.action, u.task)  # (B, H, bins)
        consistency = (zs_t[:, 1:].float() - next_z.float()).pow(2).mean(-1)  # (B, H)
        reward = symlog_twohot_ce(reward_logits, u.reward, self.wm.bins)  # (B, H)
        terms = {"consistency": self.weighted(consistency, u.valid), "reward": self.weighted(reward, u.valid)}
        return terms, zs_t, next_z

    def world_model_groups(self, params: list[torch.nn.Parameter]) -> list[dict[str, Any]]:
        """Adam parameter groups: the encoder at lr x enc_lr_scale, the rest at lr."""
        encoder = {id(p) for p in [*self.wm.trunk.parameters(),
                                   *(self.wm.project.parameters() if self.wm.project is not None else [])]}
        return [{"params": [p for p in params if id(p) in encoder], "lr": self.cfg.lr * self.cfg.enc_lr_scale},
                {"params": [p for p in params if id(p) not in encoder], "lr": self.cfg.lr}]

    def update(self, sample: Callable[[int, int], Batch]) -> Metrics:
        n = self.cfg.seed_updates if self.updates == 0 and self.cfg.seed_updates else 1
        for _ in range(n):  # TD-MPC2: as many updates as seeding steps when seeding ends, then one per call
            metrics = self.step(sample)
            self.updates += 1
        return metrics

    def step(self, sample: Callable[[int, int], Batch]) -> Metrics:
        """One train_step in train mode (TD-MPC2's Q dropout acts there only, as in upstream's `_update`), then
        eval mode again for acting and planning."""
        self.set_train(True)
        try:
            return self.train_step(sample)
        finally:
            self.set_train(False)

    def set_train(self, mode: bool) -> None:
        self.wm.train(mode)

    def per_task_batch(self) -> dict[str, int]:
        return {"world_model_sequences": self.batch_size() // len(self.tasks),
                "sequence_length": self.cfg.batch_length}

    def bench_phases(self, sample: Callable[[int, int], Batch]) -> dict[str, Callable[[], Any]]:
        return {"update": lambda: self.step(sample)}

    def parameter_counts(self) -> dict[str, int]:
        wm = self.wm
        counts = {"encoder": count_parameters(wm.trunk.parameters()) + (
            count_parameters(wm.project.parameters()) if wm.project is not None else 0),
            "dynamics": count_parameters(wm.dynamics.parameters()),
            "reward": count_parameters(wm.reward_head.parameters()),
            "task_embedding": count_parameters(wm.task_embedding.parameters()) if wm.task_embedding is not None else 0}
        return counts

