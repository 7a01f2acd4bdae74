"""sae: find the features a language model computes, with sparse autoencoders.

harvest (sae.harvest, sae.data) -> train (sae.train, sae.model) -> analyze (sae.analyze, sae.dashboard).
"""

from sae.model import SAE, Code, ForwardOutput
from sae.train import train

__all__ = ["SAE", "Code", "ForwardOutput", "train"]
