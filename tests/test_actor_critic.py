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
