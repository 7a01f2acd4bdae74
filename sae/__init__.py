"""sae: find the features a language model computes, with sparse autoencoders.

harvest (sae.data, sae.harvest, sae.stream, sae.cache) -> train (sae.train, sae.model, sae.checkpoint) ->
evaluate (sae.evaluate, sae.metrics) -> analyze (sae.analyze, sae.views, sae.site, sae.dashboard, sae.explore);
sae.rundir keeps run directories, sae.formats exports to SAELens and Neuronpedia, sae.pipeline runs the jobs.
"""

from sae.model import SAE, Code, ForwardOutput
from sae.train import train

__all__ = ["SAE", "Code", "ForwardOutput", "train"]
