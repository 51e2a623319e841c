"""The actor-critic learner alone learns a bandit hidden in imagined trajectories."""

import torch

from mowbench.agents.actor_critic import ActorCritic, ActorCriticLearner, Imagined


def test_learner_finds_the_rewarded_action_and_respects_the_mask():
    torch.manual_seed(0)
    model = ActorCritic(feat_dim=8, n_actions=4, discrete=True, width=32, depth=1, bins=63)
    learner = ActorCriticLearner(model, torch.device("cpu"), lr=3e-3, bins=63, entropy_coef=3e-4)
    legal = torch.tensor([True, True, True, False]).expand(64, 4)
    for _ in range(150):
        feat = torch.randn(64, 6, 8)
        with torch.no_grad():
            action = model.actor(feat[:, :-1], legal[:, None]).sample()  # (64, 5)
        reward = (action == 2).float()
        learner.update(Imagined(feat, action, reward, torch.ones(64, 5), legal))
    probs = model.actor(torch.randn(64, 8), legal).logits.exp().mean(0)
    assert probs[2] > 0.9, probs
    assert probs[3] == 0  # the illegal action is never chosen
    assert learner.return_scale > 0  # the return scale S tracks the percentile range


def test_return_scale_is_tracked_per_group():
    """S per group (multi-task: per task): each group's EMA moves with its own percentile range only."""
    model = ActorCritic(feat_dim=4, n_actions=2, discrete=True, width=8, depth=1, bins=15)
    learner = ActorCriticLearner(model, torch.device("cpu"), bins=15, norm_decay=0.5, norm_percentiles=(0.0, 100.0),
                                 norm_groups=3)
    ret = torch.tensor([[0.0, 2.0], [1.0, 1.0], [0.0, 10.0]])  # groups 0, 0, 2: ranges 2 and 10
    rows = learner.update_return_scale(ret, torch.tensor([0, 0, 2]))
    assert learner.return_scale.tolist() == [1.0, 0.0, 5.0]  # 0.5 * 0 + 0.5 * range; group 1 absent: kept
    assert rows.flatten().tolist() == [1.0, 1.0, 5.0]
    learner.update_return_scale(torch.tensor([[0.0, 4.0]]), torch.tensor([1]))
    assert learner.return_scale.tolist() == [1.0, 2.0, 5.0]
    single = ActorCriticLearner(model, torch.device("cpu"), bins=15, norm_decay=0.5, norm_percentiles=(0.0, 100.0))
    single.update_return_scale(ret, None)  # one S over all rows: range 10
    assert single.return_scale.tolist() == [5.0]
