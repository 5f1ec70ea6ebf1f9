"""lmforge: from raw text to a working Transformer language model on an ordinary machine."""

from lmforge.config import ModelConfig, TrainConfig
from lmforge.errors import LmforgeError

__version__ = "0.1.0"
__all__ = ["ModelConfig", "TrainConfig", "LmforgeError", "__version__"]
