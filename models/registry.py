"""Maps mixer names to classes: the single factory behind `mixer:` and hybrid `pattern:` configs."""

from torch import nn

from models.config import ModelConfig
from models.mixers.attention import AttentionMixer
from models.mixers.bst import BSTMixer
from models.mixers.gated_deltanet import GatedDeltaNetMixer
from models.mixers.hgrn2 import HGRN2Mixer
from models.mixers.mamba import MambaMixer
from models.mixers.mamba2 import Mamba2Mixer
from models.mixers.mlstm import MLSTMMixer
from models.mixers.mom import MoMMixer
from models.mixers.scout import SCOUTMixer
from models.mixers.sliding_window import SlidingWindowMixer

MIXERS: dict[str, type[nn.Module]] = {
    "attention": AttentionMixer,
    "mlstm": MLSTMMixer,
    "mamba": MambaMixer,
    "mamba2": Mamba2Mixer,
    "hgrn2": HGRN2Mixer,
    "mom": MoMMixer,
    "gated_deltanet": GatedDeltaNetMixer,
    "sliding_window": SlidingWindowMixer,
    "bst": BSTMixer,
    "scout": SCOUTMixer,
}


def build_mixer(name: str, cfg: ModelConfig, layer_idx: int) -> nn.Module:
    return MIXERS[name](cfg, layer_idx)
