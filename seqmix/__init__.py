"""seqmix: efficient sequence mixers in JAX."""

__version__ = "0.1.0"
