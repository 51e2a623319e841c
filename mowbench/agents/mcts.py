"""Batched MuZero Monte-Carlo tree search in tensors (ScaleZero-lite's planner; spec baselines.md): the trees of
all B env streams held as (B, nodes, actions) arrays, one batched model call per simulation, no per-node Python
objects. pUCT with MuZero's constants, root Dirichlet noise, min-max value normalisation, visit-count policies.

The model is a callable `expand(parent, action, node)`: for every tree, expand the leaf reached from node
`parent` (B,) by `action` (B,) into the new node index `node` (the same for all trees: simulation s creates
node s + 1) and return its reward (B,), value (B,) and prior logits (B, A). The caller keeps whatever per-node
state its model needs (latents, token windows) indexed by (tree, node).

Conventions (each a choice where MuZero's pseudocode leaves room; Schrittwieser et al. 2020, appendix B):
- Edge statistics: N(s, a), W(s, a) (the sum of the returns backed up from the child) and R(s, a); the child's
  value is W / N and Q(s, a) = R(s, a) + gamma W(s, a) / N(s, a).
- A node's visit count in the pUCT exploration term is 1 + the sum of its edges' visits: its own expansion
  counts (mctx's convention), so a fresh root's first simulation follows the prior. MuZero's pseudocode has 0
  there, which makes every score 0 and leaves the choice to tie-breaking.
- Ties: LightZero breaks them at random (`ties`); with the lowest index instead, a fresh model's equal scores sent
  8-simulation searches to breakout's lowest actions (no-op, left) first, and sampling at temperature 0.25 made
  the agent worse than random. Hand-built tests pass no ties: the lowest index.
- An unvisited edge's value is its node's mean Q (mean_q; LightZero's, the code ScaleZero is built on), normalised
  like the others. MuZero's pseudocode gives it 0, the worst normalised value, which keeps a search of few
  simulations on the prior's favourite action: tiny ScaleZero's policy collapsed onto one action of breakout
  (return 0.00 against a random policy's 0.35 after 2000 steps at 8 simulations).
- Min-max statistics per tree over the Q values of the edges backed up so far; with max <= min, Q is used
  unnormalised (MuZero's MinMaxStats); spans below 0.01 count as 0.01 (LightZero's).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Expand = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass
class SearchResult:
    """visits (B, A) root visit counts; q (B, A) root edge values (0 where unvisited); value (B,) the root's
    search value sum_a N(a) Q(a) / sum_a N(a); prior (B, A) the root prior the search used (noise included)."""

    visits: torch.Tensor
    q: torch.Tensor
    value: torch.Tensor
    prior: torch.Tensor


def puct_scores(prior: torch.Tensor, visits: torch.Tensor, q_norm: torch.Tensor, c1: float = 1.25,
                c2: float = 19652.0) -> torch.Tensor:
    """MuZero's pUCT: Q_norm(s, a) + P(s, a) sqrt(N(s)) / (1 + N(s, a)) (c1 + log((N(s) + c2 + 1) / c2)), with
    N(s) = 1 + sum_b N(s, b) (see the module docstring). prior, visits, q_norm (B, A) -> (B, A)."""
    parent = 1.0 + visits.sum(-1, keepdim=True)  # (B, 1)
    explore = prior * parent.sqrt() / (1.0 + visits) * (c1 + torch.log((parent + c2 + 1.0) / c2))
    return q_norm + explore


def mean_q(q: torch.Tensor, visited: torch.Tensor, parent_q: torch.Tensor | None) -> torch.Tensor:
    """The value an unvisited edge of a node takes in pUCT (LightZero's, ScaleZero's upstream): the mean Q of the
    node's visited edges; below the root the parent's mean counts as one more edge, (parent_q + sum Q) /
    (visited + 1), so a fresh node's unvisited edges take their parent's mean. q (B, A), visited (B, A) bool,
    parent_q (B,) or None at the root (no visited edge: 0) -> (B,)."""
    total = (q * visited).sum(-1)
    count = visited.sum(-1).float()
    if parent_q is None:
        return total / count.clamp(min=1.0)
    return (parent_q + total) / (count + 1.0)


def min_max_normalise(q: torch.Tensor, low: torch.Tensor, high: torch.Tensor, min_span: float = 0.01) -> torch.Tensor:
    """(q - low) / max(high - low, min_span) per tree where high > low, else q. q (B, A), low and high (B,) ->
    (B, A). min_span (LightZero's value_delta_max, 0.01): without it a span of 1e-3 between the near-zero values
    of a fresh model stretches to [0, 1] and outweighs the priors; the tiny agent's first searches then sent 6 of
    8 simulations to one action on noise, and its policy collapsed onto it. At 0.01 the same happens a few
    updates later at the tiny preset's lr (1e-3), which is why that preset divides by at least 0.1."""
    span = (high - low)[:, None]
    return torch.where(span > 0, (q - low[:, None]) / span.clamp(min=min_span), q)


def visit_policy(visits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Visit counts (B, A) -> the policy N^(1/T) / sum N^(1/T) (T = 0: one-hot on the most visited; ties to the
    lowest index). Computed from N / max N so that 1/T = 4 cannot overflow."""
    if temperature <= 0:
        return torch.nn.functional.one_hot(visits.argmax(-1), visits.shape[-1]).float()
    scaled = (visits / visits.amax(-1, keepdim=True).clamp(min=1e-12)).pow(1.0 / temperature)
    return scaled / scaled.sum(-1, keepdim=True).clamp(min=1e-12)


def masked_softmax(logits: torch.Tensor, legal: torch.Tensor) -> torch.Tensor:
    """Softmax over the legal actions (B, A) bool; illegal ones get probability 0."""
    return torch.softmax(logits.float().masked_fill(~legal, float("-inf")), dim=-1)


@torch.no_grad()
def search(root_logits: torch.Tensor, legal: torch.Tensor, expand: Expand, simulations: int, gamma: float,
           noise: torch.Tensor | None = None, noise_weight: float = 0.25, c1: float = 1.25,
           c2: float = 19652.0, ties: torch.Tensor | None = None, min_span: float = 0.01) -> SearchResult:
    """Run `simulations` MuZero simulations in every tree at once from the roots' prior logits (B, A).

    legal (B, A) bool: the actions allowed at every node of a tree (Atari's full set with a per-game mask).
    noise (B, A) or None: Dirichlet draws mixed into the root prior, (1 - noise_weight) P + noise_weight noise
    (training; None at evaluation). The root's own value does not enter its statistics (MuZero).
    ties (B, simulations + 1, A) uniforms or None: scores within 1e-6 of a node's best are a tie, broken by the
    node's uniforms (a random order per node, as LightZero breaks ties at random); None: the lowest index.
    min_span: the smallest value span min-max normalisation divides by (see min_max_normalise)."""
    b, a = root_logits.shape
    n = simulations + 1
    device = root_logits.device
    rows = torch.arange(b, device=device)
    prior = torch.zeros(b, n, a, device=device)
    prior[:, 0] = masked_softmax(root_logits, legal)
    if noise is not None:
        prior[:, 0] = ((1.0 - noise_weight) * prior[:, 0] + noise_weight * noise.float()) * legal
    child = torch.full((b, n, a), -1, dtype=torch.long, device=device)
    edge_n = torch.zeros(b, n, a, device=device)
    edge_w = torch.zeros(b, n, a, device=device)
    edge_r = torch.zeros(b, n, a, device=device)
    low = torch.full((b,), float("inf"), device=device)
    high = torch.full((b,), float("-inf"), device=device)
    for s in range(simulations):
        # selection: descend while the chosen edge has a child; each tree stops at its own leaf edge
        node = torch.zeros(b, dtype=torch.long, device=device)
        path_nodes, path_actions, path_live = [], [], []
        live = torch.ones(b, dtype=torch.bool, device=device)
        parent_q: torch.Tensor | None = None  # the mean Q of the node above (None at the root)
        while True:
            visits = edge_n[rows, node]  # (B, A)
            q = edge_r[rows, node] + gamma * edge_w[rows, node] / visits.clamp(min=1.0)
            mean = mean_q(q, visits > 0, parent_q)  # (B,): the value of this node's unvisited edges
            q = torch.where(visits > 0, q, mean[:, None])
            score = puct_scores(prior[rows, node], visits, min_max_normalise(q, low, high, min_span), c1, c2)
            score = score.masked_fill(~legal, float("-inf"))
            if ties is None:
                action = score.argmax(-1)  # (B,)
            else:
                tied = score >= score.amax(-1, keepdim=True) - 1e-6
                action = torch.where(tied, ties[rows, node], -1.0).argmax(-1)
            path_nodes.append(node)
            path_actions.append(action)
            path_live.append(live)
            nxt = child[rows, node, action]
            live = live & (nxt >= 0)
            if not bool(live.any()):
                break
            node, parent_q = torch.where(live, nxt, node), mean
        # the leaf edge of each tree: the last step at which it was live
        depth = torch.stack(path_live, 1).sum(1) - 1  # (B,)
        parent = torch.stack(path_nodes, 1)[rows, depth]
        leaf_action = torch.stack(path_actions, 1)[rows, depth]
        new = s + 1
        reward, value, logits = expand(parent, leaf_action, new)
        child[rows, parent, leaf_action] = new
        edge_r[rows, parent, leaf_action] = reward.float()
        prior[:, new] = masked_softmax(logits, legal)
        # backup: the return G from the new node up the path, G <- R(s, a) + gamma G at each edge
        g = value.float()
        for d in range(len(path_nodes) - 1, -1, -1):
            on = path_live[d]  # (B,): this tree's path has an edge at depth d
            p, act = path_nodes[d], path_actions[d]
            edge_n[rows, p, act] += on.float()
            edge_w[rows, p, act] += torch.where(on, g, torch.zeros_like(g))
            r = edge_r[rows, p, act]
            q_edge = r + gamma * edge_w[rows, p, act] / edge_n[rows, p, act].clamp(min=1.0)
            low = torch.where(on, torch.minimum(low, q_edge), low)
            high = torch.where(on, torch.maximum(high, q_edge), high)
            g = torch.where(on, r + gamma * g, g)
    visits = edge_n[:, 0]
    q = torch.where(visits > 0, edge_r[:, 0] + gamma * edge_w[:, 0] / visits.clamp(min=1.0), torch.zeros_like(visits))
    value = (visits * q).sum(-1) / visits.sum(-1).clamp(min=1.0)
    return SearchResult(visits=visits, q=q, value=value, prior=prior[:, 0])
