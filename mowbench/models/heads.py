"""MLP heads (reward, termination, actor, critic) and the action distributions the actor uses."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Normal

from mowbench.models.packed import Linear
from mowbench.ops import sample_categorical


class MLP(nn.Module):
    """[Linear(no bias) -> LayerNorm -> ReLU] x depth -> Linear(out_dim); STORM's head shape."""

    def __init__(self, in_dim: int, width: int, depth: int, out_dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_dim
        for _ in range(depth):
            layers += [Linear(prev, width, bias=False), nn.LayerNorm(width), nn.ReLU()]
            prev = width
        layers.append(Linear(prev, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DiscreteActionDist:
    """Categorical over actions with illegal ones masked out (per-task legal-action masks)."""

    def __init__(self, logits: torch.Tensor, legal: torch.Tensor | None = None) -> None:
        logits = logits.float()
        if legal is not None:
            logits = logits.masked_fill(~legal, -1e9)
        self.logits = torch.log_softmax(logits, dim=-1)  # (..., A)

    def sample(self, u: torch.Tensor | None = None) -> torch.Tensor:
        """Actions (...,); u (..., 1) uniforms in [0, 1) to use (None: torch's)."""
        return sample_categorical(self.logits.exp(), u)

    def mode(self) -> torch.Tensor:
        return self.logits.argmax(-1)

    def log_prob(self, action: torch.Tensor) -> torch.Tensor:
        return self.logits.gather(-1, action.long().unsqueeze(-1)).squeeze(-1)

    def entropy(self) -> torch.Tensor:
        p = self.logits.exp()
        return -(p * self.logits.masked_fill(p == 0, 0.0)).sum(-1)


class ContinuousActionDist:
    """Bounded normal: mean tanh(mu), std in [min_std, max_std] via sigmoid, independent dims.

    Chosen for continuous control (Meta-World) because STORM's REINFORCE update only needs log_prob
    and a closed-form entropy; a tanh-squashed normal has no closed-form entropy. Samples may leave
    [-1, 1]; the env clips them, the log-prob is of the unclipped sample (as DreamerV3 does).
    """

    def __init__(self, params: torch.Tensor, min_std: float = 0.1, max_std: float = 1.0) -> None:
        mu, s = params.float().chunk(2, dim=-1)
        std = (max_std - min_std) * torch.sigmoid(s + 2.0) + min_std
        self.dist = Normal(torch.tanh(mu), std)

    def sample(self, u: torch.Tensor | None = None) -> torch.Tensor:
        """Actions (..., A); u (..., A) uniforms in (0, 1) to use, turned into normal noise by the inverse CDF
        (None: torch's)."""
        if u is None:
            return self.dist.sample()
        return self.dist.mean + self.dist.stddev * torch.special.ndtri(u.clamp(1e-7, 1 - 1e-7))

    def mode(self) -> torch.Tensor:
        return self.dist.mean

    def log_prob(self, action: torch.Tensor) -> torch.Tensor:
        return self.dist.log_prob(action).sum(-1)

    def entropy(self) -> torch.Tensor:
        return self.dist.entropy().sum(-1)


class ActionHead(nn.Module):
    """Actor: features -> action distribution (discrete masked categorical or bounded normal)."""

    def __init__(self, in_dim: int, width: int, depth: int, n_actions: int, discrete: bool) -> None:
        super().__init__()
        self.discrete = discrete
        self.mlp = MLP(in_dim, width, depth, n_actions if discrete else 2 * n_actions)

    def forward(self, feat: torch.Tensor, legal: torch.Tensor | None = None
                ) -> DiscreteActionDist | ContinuousActionDist:
        out = self.mlp(feat)
        return DiscreteActionDist(out, legal) if self.discrete else ContinuousActionDist(out)
