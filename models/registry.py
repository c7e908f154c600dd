"""Maps mixer names to classes: the single factory behind `mixer:` and hybrid `pattern:` configs."""

from torch import nn

from models.config import ModelConfig
from models.mixers.attention import AttentionMixer

MIXERS: dict[str, type[nn.Module]] = {
    "attention": AttentionMixer,
}


def build_mixer(name: str, cfg: ModelConfig, layer_idx: int) -> nn.Module:
    return MIXERS[name](cfg, layer_idx)
