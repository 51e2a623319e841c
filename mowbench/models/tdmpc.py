"""The TD-MPC2 world model (Hansen et al., ICLR 2024; docs/methods/tdmpc2.md) as pure modules with explicit sizes:
pixel encoder -> SimNorm latent z, latent dynamics, 101-bin reward, tanh-Gaussian policy prior and a Q ensemble,
with task embeddings (learned, or frozen vectors such as Newt's language vectors) and per-task action masks.
Shared by TD-MPC2, Newt and PWM (which keeps only encoder, dynamics and reward). No losses, no optimizers."""

from __future__ import annotations

import copy

import torch
from torch import nn

from mowbench.models.packed import Linear
from mowbench.ops import log_std_range, simnorm, squashed_gaussian, twohot_decode

# TD-MPC2's model sizes (nicklashansen/tdmpc2, config sizes; docs/methods/tdmpc2.md): encoder width (state inputs
# only; the pixel encoder is the conv trunk), MLP width, latent size; Newt's L adds 3 encoder layers.
SIZES = {"1M": (256, 384, 128), "5M": (256, 512, 512), "19M": (1024, 1024, 768), "L": (1024, 1024, 512)}


class NormedMLP(nn.Module):
    """TD-MPC2's MLP: [Linear -> LayerNorm -> Mish] per hidden layer, then a plain Linear. `simnorm_group` > 0:
    SimNorm on the output (latents); `out_norm`: a LayerNorm before it (`last_norm`; upstream's dynamics end in a
    NormedLinear whose activation is SimNorm). `zero_last`: the last layer starts at zero (the reward head starts at
    0). The Q ensemble, with its dropout, is a TaskMLP (one stacked module for all heads)."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...], out_dim: int, simnorm_group: int = 0,
                 zero_last: bool = False, out_norm: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_dim
        for width in hidden:
            layers += [Linear(prev, width), nn.LayerNorm(width), nn.Mish()]
            prev = width
        self.last = Linear(prev, out_dim)
        if zero_last:
            nn.init.zeros_(self.last.weight)
            nn.init.zeros_(self.last.bias)
        self.last_norm = nn.LayerNorm(out_dim) if out_norm else None
        self.hidden = nn.Sequential(*layers)
        self.simnorm_group = simnorm_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.last(self.hidden(x))
        if self.last_norm is not None:
            out = self.last_norm(out)
        return simnorm(out, self.simnorm_group) if self.simnorm_group else out


def conv_out(size: int, kernels: tuple[int, ...], strides: tuple[int, ...]) -> int:
    """Side of the conv trunk's output for a size x size input (no padding); refuses sizes it cannot take."""
    side = size
    for k, s in zip(kernels, strides, strict=True):
        side = (side - k) // s + 1
        if side < 1:
            raise ValueError(f"image_size={size} is too small for the pixel encoder (kernels {list(kernels)}, strides "
                             f"{list(strides)}); allowed: a size whose conv output is at least 1x1 (paper: 64)")
    return side


class PixelEncoder(nn.Module):
    """TD-MPC2's pixel trunk: x / 255 - 0.5, then convs (paper: 7/2, 5/2, 3/2, 3/1, 32 channels, ReLU between),
    flattened. (B, frames * 3, S, S) in [0, 255] -> (B, out_dim); 64x64 at the paper's sizes: 32 x 4 x 4 = 512."""

    def __init__(self, image_size: int, frames: int, channels: int, kernels: tuple[int, ...],
                 strides: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = 3 * frames
        for i, (k, s) in enumerate(zip(kernels, strides, strict=True)):
            layers.append(nn.Conv2d(prev, channels, k, stride=s))
            if i < len(kernels) - 1:
                layers.append(nn.ReLU())
            prev = channels
        self.net = nn.Sequential(*layers, nn.Flatten())
        self.out_dim = channels * conv_out(image_size, kernels, strides) ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float() / 255.0 - 0.5)


class TaskEmbedding(nn.Module):
    """Task vectors e_k (K, E): learned (nn.Embedding with max_norm 1, TD-MPC2's) or frozen given vectors (Newt's
    language vectors, unnormalised, a buffer: never trained, saved with the model)."""

    def __init__(self, n_tasks: int, dim: int, vectors: torch.Tensor | None = None) -> None:
        super().__init__()
        self.learned = vectors is None
        if vectors is None:
            self.table = nn.Embedding(n_tasks, dim, max_norm=1.0)
        else:
            assert vectors.shape == (n_tasks, dim), (vectors.shape, n_tasks, dim)
            self.register_buffer("vectors", vectors.float().clone())
        self.dim = dim

    def forward(self, task: torch.Tensor) -> torch.Tensor:
        """task (B,) -> (B, E)."""
        return self.table(task) if self.learned else self.vectors[task]


class TDMPCWorldModel(nn.Module):
    """TD-MPC2's components with its method names: encode, next, reward, pi, Q. z: (B, L) SimNorm latents;
    a: (B, A) actions padded to the largest action dim A (padded dims masked to 0); task: (B,) indices.

    Pixels with tasks: TD-MPC2 concatenates the task vector to the raw (state) observation, which cannot work
    for images (docs/methods/tdmpc2.md, departures); here e_k joins after the conv trunk, in a Linear projection to the
    latent (made also when the trunk's output is not the latent size). Single-task at 64x64 with latent 512:
    no embedding and no projection, as upstream. `n_q` = 0 and `policy` = False give PWM's world model.
    `dynamics_norm`: the dynamics' LayerNorm before SimNorm (upstream's; False: ablation no_dynamics_norm).
    `init`: "tdmpc2", upstream's initialisation (init_tdmpc2), or "torch", torch's defaults (ablation torch_init).
    `obs` = "state": TD-MPC2's state encoder instead of the conv trunk, an MLP on the state (B, state_dim) with the
    task vector concatenated to it as upstream (max(enc_layers - 1, 1) hidden layers of enc_dim, then Linear,
    LayerNorm and SimNorm to the latent); no projection. No suite here gives states: mowbench.verify replays
    upstream Newt's state-based recordings through it."""

    def __init__(self, image_size: int, frames: int, action_dim: int, n_tasks: int, latent_dim: int, mlp_dim: int,
                 task_dim: int = 0, task_vectors: torch.Tensor | None = None, n_q: int = 5, q_dropout: float = 0.01,
                 bins: int = 101, vmin: float = -10.0, vmax: float = 10.0, simnorm_group: int = 8,
                 channels: int = 32, kernels: tuple[int, ...] = (7, 5, 3, 3), strides: tuple[int, ...] = (2, 2, 2, 1),
                 policy: bool = True, action_mask: torch.Tensor | None = None, dynamics_norm: bool = True,
                 init: str = "tdmpc2", obs: str = "pixels", state_dim: int = 0, enc_dim: int = 256,
                 enc_layers: int = 2) -> None:
        super().__init__()
        if init not in ("tdmpc2", "torch"):
            raise ValueError(f"init={init!r}; allowed: tdmpc2, torch")
        if obs not in ("pixels", "state"):
            raise ValueError(f"obs={obs!r}; allowed: pixels, state")
        if latent_dim % simnorm_group:
            raise ValueError(f"latent_dim={latent_dim}; allowed: a multiple of simnorm_group={simnorm_group}")
        self.latent_dim, self.action_dim, self.n_q = latent_dim, action_dim, n_q
        self.task_embedding = TaskEmbedding(n_tasks, task_dim, task_vectors) if task_dim else None
        e = task_dim
        self.obs = obs
        self.trunk: nn.Module
        self.project: nn.Module | None = None
        if obs == "state":  # upstream's layers.enc: the last layer a NormedLinear whose activation is SimNorm
            self.trunk = NormedMLP(state_dim + e, (enc_dim,) * max(enc_layers - 1, 1), latent_dim,
                                   simnorm_group=simnorm_group, out_norm=True)
        else:
            pixels = PixelEncoder(image_size, frames, channels, kernels, strides)
            self.trunk = pixels
            if e or pixels.out_dim != latent_dim:
                self.project = Linear(pixels.out_dim + e, latent_dim)
        self.simnorm_group = simnorm_group
        hidden = (mlp_dim, mlp_dim)
        self.dynamics = NormedMLP(latent_dim + action_dim + e, hidden, latent_dim, simnorm_group=simnorm_group,
                                  out_norm=dynamics_norm)
        self.reward_head = NormedMLP(latent_dim + action_dim + e, hidden, bins, zero_last=True)
        self.policy = NormedMLP(latent_dim + e, hidden, 2 * action_dim) if policy else None
        # the n_q heads in one stacked module (one batched matmul per layer); PWM (n_q = 0) has none
        self.qs = TaskMLP(n_q, latent_dim + action_dim + e, hidden, bins, q_dropout, zero_last=True) if n_q else None
        if init == "tdmpc2":
            self.init_tdmpc2()
        self.target_qs = copy.deepcopy(self.qs).requires_grad_(False) if n_q else None  # Polyak copies
        self.register_buffer("bins", torch.linspace(vmin, vmax, bins))  # symlog space
        mask = torch.ones(n_tasks, action_dim, dtype=torch.bool) if action_mask is None else action_mask.bool()
        self.register_buffer("action_mask", mask)  # (K, A): a task's real action dims

    @torch.no_grad()
    def init_tdmpc2(self) -> None:
        """TD-MPC2's initialisation (nicklashansen/tdmpc2, common/init.py, applied to the whole model): every
        Linear weight, the Q heads' included, normal(0, 0.02) truncated at +-2 (torch's trunc_normal_ bounds),
        every Linear bias 0, learned task embeddings uniform(-0.02, 0.02); the reward head's and Q heads' output
        weights 0; convolutions and LayerNorms keep torch's defaults."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.uniform_(module.weight, -0.02, 0.02)
        if self.qs is not None:
            for weight, bias in zip(self.qs.weights, self.qs.biases, strict=True):
                nn.init.trunc_normal_(weight, std=0.02)
                nn.init.zeros_(bias)
            nn.init.zeros_(self.qs.weights[-1])
        nn.init.zeros_(self.reward_head.last.weight)

    def train(self, mode: bool = True) -> TDMPCWorldModel:
        """As upstream: the target Qs stay in eval mode (no Q dropout in TD targets) whatever the model's mode."""
        super().train(mode)
        if self.target_qs is not None:
            self.target_qs.train(False)
        return self

    def with_task(self, x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """x (..., D) with e_k appended -> (..., D + E); task (B,) for x (B, ...)."""
        if self.task_embedding is None:
            return x
        e = self.task_embedding(task)  # (B, E)
        e = e.view(e.shape[0], *([1] * (x.dim() - 2)), e.shape[1]).expand(*x.shape[:-1], e.shape[1])
        return torch.cat([x, e.to(x.dtype)], dim=-1)

    def encode(self, obs: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """obs (B, frames*3, S, S) in [0, 255], or states (B, state_dim) with obs="state" -> z (B, L)."""
        if self.obs == "state":
            return self.trunk(self.with_task(obs.float(), task))  # ends in SimNorm
        h = self.trunk(obs)  # (B, trunk.out_dim)
        if self.project is not None:
            h = self.project(self.with_task(h, task))
        return simnorm(h, self.simnorm_group)

    def next(self, z: torch.Tensor, a: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """z (B, ..., L), a (B, ..., A) -> z' (B, ..., L)."""
        return self.dynamics(self.with_task(torch.cat([z, a.to(z.dtype)], -1), task))

    def reward(self, z: torch.Tensor, a: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """-> reward logits (B, ..., bins) over symlog two-hot bins."""
        return self.reward_head(self.with_task(torch.cat([z, a.to(z.dtype)], -1), task))

    def pi(self, z: torch.Tensor, task: torch.Tensor, eps: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Policy prior: z (B, ..., L), eps (B, ..., A) standard normal noise -> (sampled action, its log-prob
        (B, ...), mean action tanh(mu), log-std), padded dims 0 (masked) in every output."""
        mu, raw = self.policy(self.with_task(z, task)).float().chunk(2, dim=-1)
        mask = self.action_mask[task].view(task.shape[0], *([1] * (z.dim() - 2)), -1).expand_as(mu)
        log_std = log_std_range(raw)
        action, log_prob = squashed_gaussian(mu, log_std, eps.float(), mask)
        return action, log_prob, torch.tanh(mu) * mask, log_std * mask

    def Q(self, z: torch.Tensor, a: torch.Tensor, task: torch.Tensor, target: bool = False,  # noqa: N802
          heads: torch.Tensor | None = None) -> torch.Tensor:
        """Every Q head's logits: z (B, ..., L), a (B, ..., A) -> (n_q, B, ..., bins). With heads (B, k), each
        row's k heads only -> (k, B, ..., bins): planning averages two heads of five, so it pays for two (a test
        checks the values equal those heads of the full ensemble's; with dropout active the masks would differ)."""
        x = self.with_task(torch.cat([z, a.to(z.dtype)], -1), task)  # (B, ..., D)
        mlp = self.target_qs if target else self.qs
        if heads is None:
            flat = x.reshape(1, -1, x.shape[-1]).expand(self.n_q, -1, -1)  # (n_q, M, D): one input for every head
            out = mlp(flat)  # (n_q, M, bins)
            return out.view(self.n_q, *x.shape[:-1], out.shape[-1])
        b, k = heads.shape
        rows = x.reshape(b, 1, -1, x.shape[-1]).expand(b, k, -1, -1).reshape(b * k, -1, x.shape[-1])  # (B*k, M/B, D)
        out = mlp(rows, heads.reshape(-1))  # (B*k, M/B, bins): row r's input through head heads[r // k, r % k]
        return out.view(b, k, *x.shape[1:-1], out.shape[-1]).transpose(0, 1)  # (k, B, ..., bins)

    def value(self, logits: torch.Tensor) -> torch.Tensor:
        """Two-hot logits (..., bins) -> real-valued scalars (...,) (symexp of the expected symlog bin)."""
        return twohot_decode(logits, self.bins)

    @torch.no_grad()
    def update_targets(self, tau: float) -> None:
        """Polyak: target_qs += tau * (qs - target_qs)."""
        for t, s in zip(self.target_qs.parameters(), self.qs.parameters(), strict=True):
            t.lerp_(s, tau)


def pair_values(values: torch.Tensor, pair: torch.Tensor, kind: str) -> torch.Tensor:
    """Min or mean over two chosen Q heads: values (n_q, B, ...), pair (2,) head indices -> (B, ...)."""
    two = values[pair]  # (2, B, ...)
    return two.min(0).values if kind == "min" else two.mean(0)


class TaskMLP(nn.Module):
    """K MLPs with their weights in one tensor per layer: [Linear -> (Dropout on the first layer) -> LayerNorm ->
    Mish] per hidden layer, then a plain Linear (zero at start with `zero_last`). One batched matmul per layer
    runs all K: PWM's per-task actors and critics (K tasks) and TD-MPC2's Q ensemble (K heads, as upstream's
    vmapped ensemble). forward(x (K, M, in)) runs MLP k on x[k] (rows grouped by task, or one input expanded to
    every head); forward(x (B, M, in), task (B,)) runs each row's task's MLP (acting on streams of any tasks).
    `norm_after_act`: [Linear -> Mish -> LayerNorm] per hidden layer instead (PWM's actor and critic MLPs)."""

    def __init__(self, n_tasks: int, in_dim: int, hidden: tuple[int, ...], out_dim: int, dropout: float = 0.0,
                 zero_last: bool = False, norm_after_act: bool = False) -> None:
        super().__init__()
        dims = [in_dim, *hidden, out_dim]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for a, b in zip(dims[:-1], dims[1:], strict=True):
            bound = a ** -0.5  # nn.Linear's default range
            self.weights.append(nn.Parameter(torch.empty(n_tasks, a, b).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(n_tasks, 1, b).uniform_(-bound, bound)))
        if zero_last:
            nn.init.zeros_(self.weights[-1])
            nn.init.zeros_(self.biases[-1])
        self.norms_w = nn.ParameterList(nn.Parameter(torch.ones(n_tasks, 1, h)) for h in hidden)
        self.norms_b = nn.ParameterList(nn.Parameter(torch.zeros(n_tasks, 1, h)) for h in hidden)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.norm_after_act = norm_after_act

    def forward(self, x: torch.Tensor, task: torch.Tensor | None = None) -> torch.Tensor:
        def pick(p: torch.Tensor) -> torch.Tensor:
            return p if task is None else p[task]

        n = len(self.norms_w)
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            x = torch.baddbmm(pick(b).to(x.dtype), x, pick(w).to(x.dtype))  # (K or B, M, out)
            if i == 0 and self.dropout is not None:
                x = self.dropout(x)
            if i < n and self.norm_after_act:
                x = nn.functional.mish(x)
                x = nn.functional.layer_norm(x, x.shape[-1:]) * pick(self.norms_w[i]) + pick(self.norms_b[i])
            elif i < n:
                x = nn.functional.layer_norm(x, x.shape[-1:]) * pick(self.norms_w[i]) + pick(self.norms_b[i])
                x = nn.functional.mish(x)
        return x
