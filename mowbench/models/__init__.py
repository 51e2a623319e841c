"""World-model and agent building blocks: pure nn.Modules with explicit sizes, no losses, no optimizers."""

from mowbench.models.heads import MLP, ActionHead, ContinuousActionDist, DiscreteActionDist
from mowbench.models.transformer import CausalTransformer, KVCache, TokenStem
from mowbench.models.vae import CategoricalHead, ConvDecoder, ConvEncoder, conv_stages, encode_frames

__all__ = [
    "MLP", "ActionHead", "ContinuousActionDist", "DiscreteActionDist",
    "CausalTransformer", "KVCache", "TokenStem",
    "CategoricalHead", "ConvDecoder", "ConvEncoder", "conv_stages", "encode_frames",
]
