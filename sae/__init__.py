"""sae: find the features a language model computes, with sparse autoencoders.

harvest (sae.harvest, sae.data, sae.cache) -> train (sae.train, sae.model) -> analyze (sae.analyze, sae.site,
sae.dashboard, sae.explore); sae.formats exports to SAELens and Neuronpedia.
"""

from sae.model import SAE, Code, ForwardOutput
from sae.train import train

__all__ = ["SAE", "Code", "ForwardOutput", "train"]
