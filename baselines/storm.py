"""STORM (Zhang et al., NeurIPS 2023, arXiv 2310.09615): one categorical-VAE + stochastic-Transformer
world model and one actor-critic per task, trained in imagination. Hyperparameters follow the paper and
its reference implementation (the dataclass defaults are the `paper` preset). The world model and its loss
live here; the update, imagination and acting are the shared ImaginationAgent's."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mowbench.agents.base import Metrics, count_parameters, register_agent
from mowbench.agents.imagination import (
    ImaginationAgent,
    ImaginationConfig,
    sample_z,
)
from mowbench.envs.base import ActionSpace, TaskInfo
from mowbench.models.storm import STORMSizes, STORMWorldModel
from mowbench.models.vae import conv_stages
from mowbench.ops import categorical_kl, free_bits, symlog_twohot_ce
from mowbench.replay import Batch

# STORM's reference world model (weipu-zhang/STORM, WorldModel with config_files/STORM.yaml), instantiated
# and counted for 4, 6 and 18 actions: 16,503,939 + 512 per action (the token stem's first Linear). Ours
# matches it at the paper's sizes (PAPER_SIZE_FIELDS at their defaults, 64x64 images).
REFERENCE_WM_BASE, REFERENCE_WM_PER_ACTION = 16_503_939, 512
PAPER_SIZE_FIELDS = ("channels", "n_vars", "n_classes", "width", "depth", "heads", "ffn", "max_len", "head_width",
                     "head_depth", "bins", "decoder_stem_norm")


# known departures from the paper and the published code (one line each; docs/methods/storm.md has them
# as a table): recorded in every run's metadata.json and printed in the analysis's notes
DEPARTURES = (
    "Meta-World: a bounded-normal continuous policy (STORM acts in discrete action spaces only)",
    "budget 100,000 agent steps, the paper's (the reference code trains 102,000)",
)


@dataclass
class STORMConfig(ImaginationConfig):
    """STORM hyperparameters; defaults are the paper's (docs/methods/storm.md). Batches, imagination, acting and the
    actor-critic: the parent's fields (mowbench.agents.imagination.ImaginationConfig)."""

    channels: tuple[int, ...] = (32, 64, 128, 256)  # encoder conv channels; 64x64 -> 4x4
    n_vars: int = 32  # categorical variables in z
    n_classes: int = 32  # classes per variable
    unimix: float = 0.01  # uniform mix in posterior/prior probabilities
    width: int = 512  # Transformer width D (token stem, h)
    depth: int = 2  # Transformer blocks
    heads: int = 8  # attention heads
    ffn: int = 1024  # FFN hidden size
    dropout: float = 0.1  # Transformer dropout (residual branches)
    attn_dropout: float = 0.1  # dropout on attention probabilities in training (reference: 0.1; textbook: 0)
    block_ln_eps: float = 1e-6  # LayerNorm eps inside the Transformer blocks (reference: 1e-6; torch default 1e-5)
    decoder_stem_norm: str = "bn2d"  # bn2d: BatchNorm2d(256) after the reshape (reference) | bn1d: over 4096 features
    max_len: int = 64  # learned positional embedding length
    head_width: int = 512  # reward/termination MLP width
    head_depth: int = 2  # reward/termination MLP hidden layers
    free_nats: float = 1.0  # KL free bits, applied to the batch-mean KL
    dyn_scale: float = 0.5  # weight of KL(sg(post) || prior)
    rep_scale: float = 0.1  # weight of KL(post || sg(prior))

    def check(self) -> None:
        super().check()
        if not self.channels or any(c < 1 for c in self.channels):
            raise ValueError(f"channels={list(self.channels)}; allowed: a non-empty list of positive integers")
        self.check_positive(("n_vars", "n_classes", "width", "depth", "heads", "ffn", "max_len", "head_width"))
        self.check_non_negative(("head_depth", "free_nats", "dyn_scale", "rep_scale"))
        if not 0.0 <= self.unimix < 1.0:
            raise ValueError(f"unimix={self.unimix}; allowed: 0 <= unimix < 1")
        if self.decoder_stem_norm not in ("bn2d", "bn1d"):
            raise ValueError(f"decoder_stem_norm={self.decoder_stem_norm!r}; allowed: bn2d, bn1d")
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)}; allowed: 0 <= {name} < 1")
        if self.block_ln_eps <= 0:
            raise ValueError(f"block_ln_eps={self.block_ln_eps}; allowed: > 0")
        if self.width % self.heads:
            raise ValueError(f"width={self.width} must be divisible by heads={self.heads}")
        if self.batch_length > self.max_len or self.imag_context + self.imag_horizon > self.max_len:
            raise ValueError(f"batch_length={self.batch_length} and imag_context+imag_horizon="
                             f"{self.imag_context + self.imag_horizon} must be <= max_len={self.max_len}")
        if self.act_context > self.max_len:
            raise ValueError(f"act_context={self.act_context}; allowed: 1..max_len={self.max_len}")

    def check_image_size(self, image_size: int) -> None:
        """Refuse, before any env or network is built, an image size the encoder cannot take."""
        conv_stages(image_size, len(self.channels))


def storm_terms(wm: STORMWorldModel, batch: Batch, action: torch.Tensor, bins: torch.Tensor,
                autocast: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """STORM's per-sequence loss terms (B,) each: rec (L2 summed over pixels), reward (two-hot CE), termination
    (BCE), kl_dyn = KL(sg(post) || prior), kl_rep = KL(post || sg(prior)), each a mean over time; and the
    forward's z (B, T, V*C) and h (B, T, D). `wm` is any world model with STORM's methods and a decoder
    (MoW's too); `action` (B, T, A) is the world-model input. The forward runs under `autocast` (the agent's),
the losses in fp32."""
    task = batch.task
    with autocast:
        post = wm.encode(batch.obs, task)  # (B, T, V, C)
        z = sample_z(post)  # (B, T, V*C)
        recon = wm.decode(z, task)  # (B, T, 3, S, S)
        h = wm.sequence(z, action, task)  # (B, T, D)
        prior = wm.prior(h, task)
        reward_logits = wm.reward(h, task)
        term_logits = wm.termination(h, task)  # (B, T)
    target = rearrange(batch.obs, "b t h w c -> b t c h w").float() / 255.0
    # prior at t predicts the posterior at t+1
    terms = {
        "rec": (recon.float() - target).pow(2).sum(dim=(2, 3, 4)).mean(1),
        "reward": symlog_twohot_ce(reward_logits, batch.reward, bins).mean(1),
        "termination": F.binary_cross_entropy_with_logits(
            term_logits.float(), batch.terminal.float(), reduction="none").mean(1),
        "kl_dyn": categorical_kl(post[:, 1:].detach(), prior[:, :-1]).mean(1),
        "kl_rep": categorical_kl(post[:, 1:], prior[:, :-1].detach()).mean(1),
    }
    return terms, z, h


def storm_loss(cfg: STORMConfig, rec: torch.Tensor, reward: torch.Tensor, termination: torch.Tensor,
               kl_dyn: torch.Tensor, kl_rep: torch.Tensor) -> torch.Tensor:
    """STORM's loss from mean terms (scalars: batch means; or (N,) per-task means in MoW); free bits clip
    each mean KL (docs/methods/storm.md)."""
    return (rec + reward + termination + cfg.dyn_scale * free_bits(kl_dyn, cfg.free_nats)
            + cfg.rep_scale * free_bits(kl_rep, cfg.free_nats))


@register_agent("storm", STORMConfig)
class STORMAgent(ImaginationAgent):
    """STORM: its world model and loss on the shared imagination agent; the reference-cache comparison as its
    bench extra."""

    cfg: STORMConfig
    capturable_updates = True  # one critic, per-task return scales without a host read (tests/test_graphs.py)

    def build_world_model(self, tasks: list[TaskInfo]) -> nn.Module:
        return STORMWorldModel(STORMSizes.of(self.cfg), tasks[0].image_size, self.action_dim)

    def world_model_loss(self, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        terms, _, _ = storm_terms(self.wm, batch, self.action_input(batch.action), self.bins, self.autocast())
        means = {k: v.mean() for k, v in terms.items()}
        loss = storm_loss(self.cfg, **means)
        return loss, {"wm/loss": loss.detach(), **{f"wm/{k}": v.detach() for k, v in means.items()}}

    def bench_extras(self, sample: Callable[[int, int], Batch], time: Callable[[Callable[[], Any]], float],
                     figures: dict[str, Any]) -> dict[str, Any]:
        """Multi-task (the monolithic STORM): its size beside one STORM per task. One task: imagination timed
        the way the reference code caches (imagine_reference_cache) and the training step with it; at the
        paper's sizes, the reference's world-model parameter count."""
        from mowbench.bench_extras import imagine_reference_cache, separate_storm_figures

        if self.multi_task:
            return super().bench_extras(sample, time, figures) | separate_storm_figures(self, figures)
        cfg, out = self.cfg, super().bench_extras(sample, time, figures)
        context = sample(cfg.imag_per_task * len(self.tasks), cfg.imag_context)
        out["s_per_imagination_reference_cache"] = time(lambda: imagine_reference_cache(self, context))
        ref_step = figures["s_per_train_step"] - figures["s_per_imagination"] + out["s_per_imagination_reference_cache"]
        out["s_per_train_step_reference_cache"] = ref_step
        out["train_step_speedup_vs_reference_cache"] = ref_step / figures["s_per_train_step"]
        paper = STORMConfig()
        if self.tasks[0].image_size == 64 and all(getattr(cfg, f) == getattr(paper, f) for f in PAPER_SIZE_FIELDS):
            reference = REFERENCE_WM_BASE + REFERENCE_WM_PER_ACTION * self.action_dim
            out["reference_world_model_parameters"] = reference
            out["world_model_parameters_match_reference"] = figures["parameters"]["world_model"] == reference
        return out


# ---- the published code's weights and numbers (python -m mowbench.verify agent=storm; docs/verify.md) ----

# Upstream (weipu-zhang/STORM: sub_models/world_models.py's WorldModel, agents.py's ActorCriticAgent) parameter and
# buffer names -> ours, the first matching rule applies. Sequential indices are kept where the layers line up
# (encoder, token stem, heads, actor and critics); the decoder's Linear and BatchNorm2d are named apart here and its
# transposed convolutions start at 0 (upstream index - 4: after Linear, Rearrange, BatchNorm2d, ReLU). The attention
# projections w_qs, w_ks, w_vs of a layer are one qkv Linear here, their rows stacked in that order (QKV_PARTS).
# Upstream's reward and termination heads have 2 hidden layers (a literal), so their output Linear is net.6 here.
UPSTREAM_NAMES: tuple[tuple[str, str], ...] = (
    (r"encoder\.backbone\.(\d+)\.(.+)", r"encoder.net.\1.\2"),
    (r"dist_head\.post_head\.(.+)", r"posterior_head.linear.\1"),
    (r"dist_head\.prior_head\.(.+)", r"prior_head.linear.\1"),
    (r"image_decoder\.backbone\.0\.(.+)", r"decoder.linear.\1"),
    (r"image_decoder\.backbone\.2\.(.+)", r"decoder.norm.\1"),
    (r"image_decoder\.backbone\.(\d+)\.(.+)", r"decoder.net.{\1-4}.\2"),
    (r"storm_transformer\.stem\.(.+)", r"stem.net.\1"),
    (r"storm_transformer\.position_encoding\.pos_emb\.(.+)", r"transformer.position.\1"),
    (r"storm_transformer\.layer_norm\.(.+)", r"transformer.norm.\1"),
    (r"storm_transformer\.layer_stack\.(\d+)\.slf_attn\.w_[qkv]s\.weight", r"transformer.blocks.\1.qkv.weight"),
    (r"storm_transformer\.layer_stack\.(\d+)\.slf_attn\.fc\.(.+)", r"transformer.blocks.\1.out.\2"),
    (r"storm_transformer\.layer_stack\.(\d+)\.slf_attn\.layer_norm\.(.+)", r"transformer.blocks.\1.norm1.\2"),
    (r"storm_transformer\.layer_stack\.(\d+)\.pos_ffn\.w_1\.(.+)", r"transformer.blocks.\1.ffn.0.\2"),
    (r"storm_transformer\.layer_stack\.(\d+)\.pos_ffn\.w_2\.(.+)", r"transformer.blocks.\1.ffn.2.\2"),
    (r"storm_transformer\.layer_stack\.(\d+)\.pos_ffn\.layer_norm\.(.+)", r"transformer.blocks.\1.norm2.\2"),
    (r"reward_decoder\.backbone\.(\d+)\.(.+)", r"reward_head.net.\1.\2"),
    (r"reward_decoder\.head\.(.+)", r"reward_head.net.6.\1"),
    (r"termination_decoder\.backbone\.(\d+)\.(.+)", r"termination_head.net.\1.\2"),
    (r"termination_decoder\.head\.0\.(.+)", r"termination_head.net.6.\1"),
    (r"actor\.(\d+)\.(.+)", r"actor.mlp.net.\1.\2"),
    (r"critic\.(\d+)\.(.+)", r"critics.0.net.\1.\2"),
    (r"slow_critic\.(\d+)\.(.+)", r"slow_critics.0.net.\1.\2"),
)
QKV_PARTS = ("w_qs", "w_ks", "w_vs")


def upstream_name(name: str) -> str:
    """Our name of an upstream parameter or buffer (UPSTREAM_NAMES); KeyError for a name no rule maps."""
    for pattern, template in UPSTREAM_NAMES:
        match = re.fullmatch(pattern, name)
        if match:
            out = match.expand(template)
            return re.sub(r"\{(\d+)-(\d+)\}", lambda m: str(int(m[1]) - int(m[2])), out)
    raise KeyError(f"no rule of UPSTREAM_NAMES maps upstream's {name!r}")


def from_upstream(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An upstream state_dict (WorldModel's or ActorCriticAgent's) under our names (UPSTREAM_NAMES): the one place
    where the two layouts meet. The qkv weight of a layer is upstream's w_qs, w_ks, w_vs stacked (QKV_PARTS)."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in state.items():
        ours = upstream_name(name)
        if ours.endswith(".qkv.weight"):
            parts.setdefault(ours, {})[name.split(".")[-2]] = value
        else:
            out[ours] = value
    for ours, qkv in parts.items():
        out[ours] = torch.cat([qkv[p] for p in QKV_PARTS])
    return out


# upstream's modules, by which the reference sums its weights
UPSTREAM_GROUPS = ("encoder", "storm_transformer", "dist_head.post_head", "dist_head.prior_head", "image_decoder",
                   "reward_decoder", "termination_decoder", "actor", "critic", "slow_critic")


def upstream_group(name: str) -> str:
    """The upstream module (UPSTREAM_GROUPS) of an upstream parameter name."""
    return next(g for g in UPSTREAM_GROUPS if name.startswith(g + "."))


# sizes upstream passes as literals, which the reference keeps: an FFN of twice the width, reward/termination heads of
# the Transformer's width and 2 hidden layers, 255 two-hot bins, and an encoder that halves 64x64 frames down to 4x4
UPSTREAM_FIXED = {"head_depth": 2, "bins": 255, "final_size": 4}
# why each tolerance (mowbench.verify prints those a table uses)
TOLERANCES = {
    "fp32": "rtol 1e-5: fp32 rounding where our kernels add in another order (one qkv matmul, SDPA, channels-last "
            "convolutions, fused Adam, lerp for the EMA, log_softmax for normalised logits); measured <= 1.3e-6 "
            "(two-hot decoded rewards, whose 255 terms reach |20|); the 3 world-model and 2 actor-critic steps do not "
            "make it grow (update 3 agrees as closely as update 1), so no row is looser",
    "decoded": "rtol 1e-5 of the largest |lambda-return|: a percentile is one of the returns, decoded from 255 "
               "two-hot bins reaching |20|, whose rounding (~1e-6) is absolute, not relative to the value picked",
    "ema": "12 x 2^-24 x |critic weights| / |slow critic - critic| (~1e-3): the slow critic's EMA rounds each weight "
           "(upstream s x 0.98 + c x 0.02, ours s + 0.02 x (c - s): the same maths) to within 3 ulp of the weights, "
           "~1e4 times the gap's elements; measured <= 4.3e-5 (with upstream's formula in ours: 9e-8); a decay of "
           "0.99 instead of 0.98 moves this sum by 2%",
    "exact": "equal or not: sampled categories and actions, termination flags (the replayed uniforms sit mid-interval "
             "of the upstream draw's category, so rounding cannot move a draw), parameter counts",
}
RTOL = 1e-5


def reference_config(reference: dict[str, Any], agent_values: dict[str, Any]) -> STORMConfig:
    """Our config for the reference run: the composed values (behaviour: losses, optimizers, returns, ...) with the
    reference's sizes on top; no CUDA graphs or compilation (CPU, eager)."""
    s = reference["sizes"]
    stages = int(math.log2(s["image_size"] // UPSTREAM_FIXED["final_size"]))
    sizes = {"channels": tuple(s["stem_channels"] * 2 ** i for i in range(stages)), "n_vars": s["stoch_dim"],
             "n_classes": s["stoch_dim"], "width": s["width"], "depth": s["layers"], "heads": s["heads"],
             "ffn": 2 * s["width"], "max_len": s["max_length"], "head_width": s["width"],
             "head_depth": UPSTREAM_FIXED["head_depth"], "bins": UPSTREAM_FIXED["bins"], "ac_width": s["ac_width"],
             "ac_depth": s["ac_layers"], "batch_per_task": s["batch"], "batch_length": s["length"],
             "imag_per_task": s["imag_batch"], "imag_context": s["imag_context"], "imag_horizon": s["imag_horizon"]}
    values = {**agent_values, **sizes, "cuda_graphs": False, "compile": False}
    values["act_context"] = min(int(values.get("act_context", 1)), s["max_length"])
    values["act_refresh"] = min(int(values.get("act_refresh", 1)), values["act_context"])
    from mowbench.agents.base import build_config, get_agent

    return build_config(get_agent("storm"), values)


def verify_reference(reference: dict[str, Any], agent_values: dict[str, Any]) -> tuple[list[Any], dict[str, str]]:
    """mowbench.verify's hook: the reference's updates replayed through our STORM -> (rows, tolerance reasons)."""
    from mowbench.ops import uniforms_from
    from mowbench.verify import Row, exact_row, scalar_row, tensor_row

    s = reference["sizes"]
    cfg = reference_config(reference, agent_values)
    info = TaskInfo("reference", "upstream", 0, s["image_size"], ActionSpace(True, s["n_actions"]))
    agent = STORMAgent(cfg, [info], torch.device("cpu"), "fp32")
    init_wm, init_ac = reference["init"]["world_model"], reference["init"]["agent"]
    buffer = re.compile(r".*\.(running_mean|running_var|num_batches_tracked)$")
    rows: list[Row] = []
    for what, init, module in (("world model", init_wm, agent.wm), ("actor-critic", init_ac, agent.ac)):
        count = sum(v.numel() for k, v in init.items() if not buffer.match(k))
        rows.append(scalar_row(f"{what} parameters", count, count_parameters(module.parameters()), 0.0, "exact"))
    try:
        agent.wm.load_state_dict(from_upstream(init_wm))
        agent.ac.load_state_dict(from_upstream(init_ac))
    except (RuntimeError, KeyError) as err:
        rows.append(Row(f"upstream weights load into ours ({str(err).splitlines()[0][:80]})", float("nan"),
                        float("nan"), float("inf"), 0.0, "exact"))
        return rows, TOLERANCES
    group_of = {upstream_name(k): upstream_group(k) for k in [*init_wm, *init_ac]}  # our name -> upstream module
    ours_init = {**{("wm", k): v for k, v in from_upstream(init_wm).items()},
                 **{("ac", k): v for k, v in from_upstream(init_ac).items()}}

    def checksums(tree: str, module: nn.Module) -> dict[str, torch.Tensor]:
        named = dict(module.named_parameters())
        out = {}
        for group in sorted({group_of[n] for n in named}) + [""]:
            names = [n for n in named if group_of[n] == group or not group]
            key = group or "all_parameters"
            flat = torch.cat([named[n].detach().double().flatten() for n in names])
            change = torch.cat([(named[n].detach().double() - ours_init[tree, n].double()).flatten() for n in names])
            out[key] = torch.stack([flat.sum(), flat.pow(2).sum()])
            out[key + "/change"] = torch.stack([change.sum(), change.pow(2).sum()])
        buffers = [b.detach().double().flatten() for b in module.buffers() if b.is_floating_point()]
        if buffers:
            flat = torch.cat(buffers)
            out["all_float_buffers"] = torch.stack([flat.sum(), flat.pow(2).sum()])
        return out

    def upsample(obs: torch.Tensor) -> torch.Tensor:
        k = s["image_size"] // s["obs_base"]
        return obs.repeat_interleave(k, dim=2).repeat_interleave(k, dim=3)

    legal = torch.ones(1, s["n_actions"], dtype=torch.bool)

    def batch(obs: torch.Tensor, action: torch.Tensor, reward: torch.Tensor | None = None,
              terminal: torch.Tensor | None = None) -> Batch:
        b = obs.shape[0]
        zeros = torch.zeros(action.shape)
        return Batch(upsample(obs), action.long(), zeros if reward is None else reward.float(),
                     zeros if terminal is None else terminal.float(), torch.zeros(b, dtype=torch.long),
                     legal.expand(b, -1), task_counts=(b,))

    for k, upd in enumerate(reference["world_model_updates"]):
        tag = f"wm update {k + 1}"
        torch.set_rng_state(upd["rng_state_before_transformer"])  # dropout masks: upstream's (the only draws left)
        with uniforms_from([upd["posterior_u"]]) as draws:
            metrics = agent.update_world_model(batch(upd["obs"], upd["action"], upd["reward"], upd["termination"]))
        up = upd["losses"]
        rows += [
            exact_row(f"{tag}: posterior samples", upd["posterior_index"], draws.drawn[0], "exact"),
            scalar_row(f"{tag}: reconstruction loss", up["WorldModel/reconstruction_loss"], metrics["wm/rec"],
                       RTOL, "fp32"),
            scalar_row(f"{tag}: reward loss", up["WorldModel/reward_loss"], metrics["wm/reward"], RTOL, "fp32"),
            scalar_row(f"{tag}: termination loss", up["WorldModel/termination_loss"], metrics["wm/termination"],
                       RTOL, "fp32"),
            scalar_row(f"{tag}: dynamics KL", up["WorldModel/dynamics_real_kl_div"], metrics["wm/kl_dyn"],
                       RTOL, "fp32"),
            scalar_row(f"{tag}: representation KL", up["WorldModel/representation_real_kl_div"],
                       metrics["wm/kl_rep"], RTOL, "fp32"),
            scalar_row(f"{tag}: total loss", up["WorldModel/total_loss"], metrics["wm/loss"], RTOL, "fp32"),
            scalar_row(f"{tag}: grad norm before clipping", upd["grad_norm"], metrics["wm/grad_norm"], RTOL,
                       "fp32"),
        ]
        last = k == len(reference["world_model_updates"]) - 1
        rows += checksum_rows(tag, upd["checksums"], checksums("wm", agent.wm), groups=last)

    for r, rnd in enumerate(reference["actor_critic_rounds"]):
        tag = f"ac round {r + 1}"
        traj, context, priors, metrics, (ret, slow_ret, q) = replay_actor_critic_round(agent, rnd, batch)
        up = rnd["losses"]
        scale = rnd["lambda_return"].abs().max().item()  # percentiles: relative to the largest |return|
        rows += [
            exact_row(f"{tag}: context posterior samples", rnd["context_index"], context, "exact"),
            exact_row(f"{tag}: imagined prior samples", rnd["prior_index"], priors, "exact"),
            exact_row(f"{tag}: imagined actions", rnd["action_index"], traj.action, "exact"),
            exact_row(f"{tag}: imagined terminations", rnd["termination"], 1 - traj.cont, "exact"),
            tensor_row(f"{tag}: imagined features [z, h]", rnd["features"], traj.feat, RTOL, "fp32"),
            tensor_row(f"{tag}: imagined rewards", rnd["reward"], traj.reward, RTOL, "fp32"),
            tensor_row(f"{tag}: lambda-returns", rnd["lambda_return"], ret, RTOL, "fp32"),
            tensor_row(f"{tag}: slow-critic lambda-returns", rnd["slow_lambda_return"], slow_ret, RTOL, "fp32"),
            scalar_row(f"{tag}: return 5th percentile", rnd["percentile_05"], q[0, 0], RTOL, "decoded", scale),
            scalar_row(f"{tag}: return 95th percentile", rnd["percentile_95"], q[0, 1], RTOL, "decoded", scale),
            scalar_row(f"{tag}: return scale S (EMA)", rnd["return_scale"], metrics["ac/return_scale"], RTOL,
                       "fp32"),
            scalar_row(f"{tag}: policy loss", up["ActorCritic/policy_loss"], metrics["ac/policy_loss"], RTOL,
                       "fp32"),
            scalar_row(f"{tag}: value loss", up["ActorCritic/value_loss"], metrics["ac/value_loss"], RTOL,
                       "fp32"),
            scalar_row(f"{tag}: slow-critic regularisation", up["slow_value_regularization_loss"],
                       metrics["ac/slow_reg"], RTOL, "fp32"),
            scalar_row(f"{tag}: entropy", up["ActorCritic/entropy_loss"], metrics["ac/entropy"], RTOL, "fp32"),
            scalar_row(f"{tag}: grad norm before clipping", rnd["grad_norm"], metrics["ac/grad_norm"], RTOL,
                       "fp32"),
        ]
        gap = torch.cat([(slow - critic).detach().double().flatten() for slow, critic in zip(
            agent.ac.slow_critics.parameters(), agent.ac.critics.parameters(), strict=True)])
        rows += checksum_rows(tag, rnd["checksums"], checksums("ac", agent.ac), groups=True)
        # the slow critic's distance from the critic: a difference of nearly equal weights, which the EMA rounds
        # relative to the weights (TOLERANCES["ema"]): the bound 12 x 2^-24 x |critic| / |gap|
        bound = 12 * 2.0 ** -24 * math.sqrt(rnd["checksums"]["critic"][1] / rnd["slow_critic_gap"][1])
        rows.append(scalar_row(f"{tag}: slow critic - critic, sum of squares", rnd["slow_critic_gap"][1],
                               gap.pow(2).sum(), max(RTOL, bound), "ema"))
    return rows, TOLERANCES


def replay_actor_critic_round(agent: Any, rnd: dict[str, Any], batch: Callable[..., Batch]) -> tuple[Any, ...]:
    """One recorded imagination and actor-critic round through our agent, with upstream's categorical draws (the
    uniforms that pick its categories): (trajectory, context posterior samples, imagined prior samples (B, H+1, V),
    the update's metrics, (our critic's lambda-returns, the slow critic's, the return percentiles (1, 2))). Shared
    by STORM's hook and MoW's, whose model reduces to STORM."""
    import mowbench.agents.actor_critic as ac_module
    from mowbench.ops import uniforms_from
    from mowbench.verify import recording

    uniforms = [rnd["context_u"], rnd["prior_u"][:, :1]]
    for i in range(rnd["action_index"].shape[1]):  # ours draws, per imagined step, the action, then the next latent
        uniforms += [rnd["action_u"][:, i:i + 1], rnd["prior_u"][:, i + 1:i + 2]]
    with uniforms_from(uniforms) as draws:
        traj = agent.imagine(batch(rnd["obs"], rnd["action"]))
    priors = torch.cat([draws.drawn[1], *draws.drawn[3::2]], 1)  # (B, H+1, V)
    with recording(ac_module, "lambda_returns") as returns, recording(ac_module, "group_quantiles") as quantiles:
        metrics = agent.update_actor_critic(traj)
    ret, slow_ret = returns  # ours: the critic's, then the slow critic's
    (q, _), = quantiles
    return traj, draws.drawn[0], priors, metrics, (ret, slow_ret, q)


def checksum_rows(tag: str, upstream: dict[str, torch.Tensor], ours: dict[str, torch.Tensor], groups: bool
                  ) -> list[Any]:
    """Weights after an update: sum and sum of squares of all parameters, the sum of squares of their change since
    the initial weights (sensitive to the learning rate, epsilon and clipping), the BatchNorm statistics; with
    `groups`, the change per upstream module too."""
    from mowbench.verify import scalar_row

    rows = [scalar_row(f"{tag}: weights sum", upstream["all_parameters"][0], ours["all_parameters"][0],
                       RTOL, "fp32"),
            scalar_row(f"{tag}: weights sum of squares", upstream["all_parameters"][1], ours["all_parameters"][1],
                       RTOL, "fp32"),
            scalar_row(f"{tag}: weight change sum of squares", upstream["all_parameters/change"][1],
                       ours["all_parameters/change"][1], RTOL, "fp32")]
    if "all_float_buffers" in upstream:
        rows.append(scalar_row(f"{tag}: BatchNorm statistics sum of squares", upstream["all_float_buffers"][1],
                               ours.get("all_float_buffers", torch.zeros(2))[1], RTOL, "fp32"))
    if groups:
        # (not the slow critic's change: 2% of the critic's step, below the rounding of the weights themselves; the
        # slow critic's distance from the critic checks its EMA instead)
        for key in sorted(k for k in upstream if k.endswith("/change") and k.split("/")[0] not in (
                "all_parameters", "slow_critic")):
            group = key.removesuffix("/change")
            rows.append(scalar_row(f"{tag}: {group} change sum of squares", upstream[key][1],
                                   ours.get(key, torch.full((2,), float("nan")))[1], RTOL, "fp32"))
    return rows
