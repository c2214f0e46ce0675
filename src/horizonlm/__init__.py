"""HorizonLM: an attention-free language model for contexts of millions of tokens."""

from horizonlm.baseline import TransformerLM
from horizonlm.config import HorizonConfig, TransformerConfig
from horizonlm.model import HorizonLM
from horizonlm.state import HorizonState, KVState

__all__ = ["HorizonConfig", "HorizonLM", "HorizonState", "KVState", "TransformerConfig", "TransformerLM"]
__version__ = "0.1.0"
