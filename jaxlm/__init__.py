"""jaxlm: a JAX/Flax NNX trainer for causal and masked language models."""

__version__ = "0.1.0"
