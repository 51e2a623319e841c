"""Batched MuZero Monte-Carlo tree search in tensors (ScaleZero-lite's planner; docs/methods/scalezero.md): the trees of
all B env streams held as (B, nodes, actions) arrays, one batched model call per simulation, no per-node Python
objects. pUCT with MuZero's constants, root Dirichlet noise, min-max value normalisation, visit-count policies.

The model is a callable `expand(parent, action, node)`: for every tree, expand the leaf reached from node
`parent` (B,) by `action` (B,) into the new node index `node` (the same for all trees: simulation s creates
node s + 1) and return its reward (B,), value (B,) and prior logits (B, A). The caller keeps whatever per-node
state its model needs (latents, token windows) indexed by (tree, node).

The tree follows LightZero's C++ tree (ctree_muzero, the search ScaleZero is built on; `python -m mowbench.verify
agent=scalezero-lite` replays one of its searches). The flags named below switch back to this module's earlier
conventions (ScaleZero's search ablations):
- Edge statistics: N(s, a), W(s, a) (the sum of the returns backed up from the child) and R(s, a); the child's
  value is W / N and Q(s, a) = R(s, a) + gamma W(s, a) / N(s, a).
- The root's value is the sum of the returns backed up to it / (simulations + 1): LightZero's `prepare` gives the
  root one visit without a value (visit_weighted_value: sum_a N Q / sum_a N).
- pUCT's parent count N(s) is the sum of the node's edge visits (LightZero's visit_count - 1), so a fresh node's
  scores are its unvisited edges' value alone and its first choice is a tie broken at random (self_visit: 1 + the
  sum, mctx's, which lets the prior decide that choice).
- Ties, in LightZero's sequential form: the first best action and the later ones within 1e-6 of the best (earlier
  near-best ones are dropped when the running best rises past them) are tied; one non-negative integer draw per
  selection step of a tree, consumed in the order of the steps, picks the tied action draw % (number tied)
  (LightZero's rand(); the verify replays its draws). No draws: the first best (LightZero's deterministic mode, for
  hand-built tests). Acting draws: with the lowest index a fresh model's equal scores sent 8-simulation searches to
  breakout's lowest actions (no-op, left) first, and sampling at temperature 0.25 made the agent worse than random.
- An unvisited edge's value is its node's mean Q (mean_q, LightZero's). MuZero's pseudocode gives it 0, the worst
  normalised value, which keeps a search of few simulations on the prior's favourite action: tiny ScaleZero's
  policy collapsed onto one action of breakout (return 0.00 against a random policy's 0.35 after 2000 steps at 8
  simulations).
- Min-max statistics per tree over the Q values of the edges backed up so far and, after every backup, the root's
  own R + gamma V (R = 0: gamma times its value above) (root_in_min_max False: the edges only). With max <= min, Q
  is used unnormalised; spans below min_span (LightZero's value_delta_max, 0.01) count as min_span; the normalised
  value is clamped to [0, 1] (LightZero's; no switch: the statistics hold every visited Q and the unvisited edges'
  means lie between them, so only a span of 0, where every value is the same, leaves [0, 1], and no choice changes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Expand = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass
class SearchResult:
    """visits (B, A) root visit counts; q (B, A) root edge values (0 where unvisited); value (B,) the root's
    search value (see the module docstring); prior (B, A) the root prior the search used (noise included);
    draws_used (B,) the tie draws each tree consumed (its selection steps)."""

    visits: torch.Tensor
    q: torch.Tensor
    value: torch.Tensor
    prior: torch.Tensor
    draws_used: torch.Tensor


def draws_needed(simulations: int) -> int:
    """The most selection steps (one tie draw each) a tree can take: simulation s (from 0) descends at most s + 1
    edges."""
    return simulations * (simulations + 1) // 2


def puct_scores(prior: torch.Tensor, visits: torch.Tensor, q_norm: torch.Tensor, c1: float = 1.25,
                c2: float = 19652.0, self_visit: bool = False) -> torch.Tensor:
    """MuZero's pUCT: Q_norm(s, a) + P(s, a) sqrt(N(s)) / (1 + N(s, a)) (c1 + log((N(s) + c2 + 1) / c2)), with
    N(s) = sum_b N(s, b) (LightZero's) or, self_visit, 1 + that sum. prior, visits, q_norm (B, A) -> (B, A)."""
    parent = visits.sum(-1, keepdim=True) + (1.0 if self_visit else 0.0)  # (B, 1)
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


def min_max_normalise(q: torch.Tensor, low: torch.Tensor, high: torch.Tensor, min_span: float = 0.01
                      ) -> torch.Tensor:
    """(q - low) / max(high - low, min_span) per tree where high > low, else q; then clamped to [0, 1]
    (LightZero's cucb_score: an unvisited edge's mean Q or an unnormalised Q can lie outside). q (B, A), low and
    high (B,) -> (B, A). min_span (LightZero's value_delta_max, 0.01): without it a span of 1e-3 between the
    near-zero values of a fresh model stretches to [0, 1] and outweighs the priors; the tiny agent's first searches
    then sent 6 of 8 simulations to one action on noise, and its policy collapsed onto it. At 0.01 the same happens
    a few updates later at the tiny preset's lr (1e-3), which is why that preset divides by at least 0.1."""
    span = (high - low)[:, None]
    out = torch.where(span > 0, (q - low[:, None]) / span.clamp(min=min_span), q)
    return out.clamp(0.0, 1.0)


def select(score: torch.Tensor, draw: torch.Tensor | None) -> torch.Tensor:
    """LightZero's cselect_child on scores (B, A) (-inf: illegal): tied are the first best action (where its running
    maximum stops rising) and every later one within 1e-6 of the best; the draw (B,) of non-negative integers picks
    the (draw % number tied)-th of them; None: the first best. -> (B,) long."""
    first = score.argmax(-1)  # (B,): the first of equal maxima
    if draw is None:
        return first
    index = torch.arange(score.shape[-1], device=score.device)
    tied = (score >= score.amax(-1, keepdim=True) - 1e-6) & (index >= first[:, None])  # (B, A)
    k = draw % tied.sum(-1)  # (B,)
    return ((tied.long().cumsum(-1) == (k + 1)[:, None]) & tied).long().argmax(-1)


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
           c2: float = 19652.0, ties: torch.Tensor | None = None, min_span: float = 0.01, self_visit: bool = False,
           root_in_min_max: bool = True, visit_weighted_value: bool = False) -> SearchResult:
    """Run `simulations` MuZero simulations in every tree at once from the roots' prior logits (B, A).

    legal (B, A) bool: the actions allowed at every node of a tree (Atari's full set with a per-game mask).
    noise (B, A) or None: Dirichlet draws mixed into the root prior, (1 - noise_weight) P + noise_weight noise
    (training; None at evaluation).
    ties (B, K) non-negative integers or None: each tree's tie draws, one per selection step in order (K >=
    draws_needed(simulations)); None: the first best (see `select`).
    min_span, self_visit, root_in_min_max, visit_weighted_value: see the module docstring."""
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
    root_sum = torch.zeros(b, device=device)  # the returns backed up to the root
    used = torch.zeros(b, dtype=torch.long, device=device)  # tie draws consumed per tree
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
            q_norm = min_max_normalise(q, low, high, min_span)
            score = puct_scores(prior[rows, node], visits, q_norm, c1, c2, self_visit)
            score = score.masked_fill(~legal, float("-inf"))
            draw = None if ties is None else ties[rows, used.clamp(max=ties.shape[1] - 1)]
            action = select(score, draw)  # (B,)
            used += live.long()
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
        root_sum += g
        if root_in_min_max:
            # LightZero's backup also updates the statistics with the root's reward (0) + gamma V(root), V(root) =
            # its return sum / its visits (the prepare visit and one per simulation so far)
            root_q = gamma * (root_sum / (s + 2.0))
            low, high = torch.minimum(low, root_q), torch.maximum(high, root_q)
    visits = edge_n[:, 0]
    q = torch.where(visits > 0, edge_r[:, 0] + gamma * edge_w[:, 0] / visits.clamp(min=1.0), torch.zeros_like(visits))
    if visit_weighted_value:
        value = (visits * q).sum(-1) / visits.sum(-1).clamp(min=1.0)
    else:
        value = root_sum / (simulations + 1.0)
    return SearchResult(visits=visits, q=q, value=value, prior=prior[:, 0], draws_used=used)
