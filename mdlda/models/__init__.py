"""Models: every one is the spectrogram front end + a network, audio in, 7 mid-level features out.

``create_model("rfresnet", width=16)``, ``create_model("vggish")``; ``list_models()``. Importing this package
registers the variants and does nothing else.
"""

from mdlda.models.base import AudioModel, ModelConfig
from mdlda.models.registry import create_model, list_models, register_model
from mdlda.models.rfresnet import RFResNet, RFResNetConfig, receptive_field
from mdlda.models.vggish import VGGish, VGGishConfig

__all__ = [
    "AudioModel",
    "ModelConfig",
    "RFResNet",
    "RFResNetConfig",
    "VGGish",
    "VGGishConfig",
    "create_model",
    "list_models",
    "receptive_field",
    "register_model",
]
