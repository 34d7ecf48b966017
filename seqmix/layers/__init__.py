"""seqmix's Flax NNX layers: sequence mixers and the modules around them.

Mixers (each ``__init__(config, *, rngs)``, ``__call__(x, *, segment_ids=None, cache=None)``,
``init_cache(batch_size, max_length)``; registered by name in ``seqmix.models.MIXERS``):
``Attention``, ``LinearAttention``, ``RetNet``, ``GLA``, ``Mamba2``, ``Mamba``, ``Based``,
``GatedDeltaNet``, ``DeltaNet``, and ``Bidirectional`` (the encoder form of a recurrent
mixer). Around them: ``RMSNorm``, ``GatedRMSNorm``, ``MLP`` (SwiGLU, GELU), ``Block``
(pre-norm residual), ``Embedding``, ``Head``, ``ShortConv``.

A standalone mixer::

    from seqmix.layers import Mamba2, mixer_config
    mixer = Mamba2(mixer_config(Mamba2, d_model=64, headdim=16), rngs=nnx.Rngs(0))
    y = mixer(x)                                    # x [B, T, 64]
    cache = mixer.init_cache(batch_size, max_length)
    y_t, cache = mixer(x_t, cache=cache)            # decoding, one or more tokens

Logical axis names (``nnx.Param`` metadata ``out_sharding``; never sharded eagerly), for
logical-to-mesh rules such as ``[("embed", "fsdp"), ...]``:

- ``"vocab"``: vocabulary (embedding rows, untied head columns).
- ``"embed"``: the model width ``d_model`` (residual stream; every projection in or out of
  it; the block norms).
- ``"mlp"``: the MLP hidden width.
- ``"heads"``: a mixer's inner width: query heads x head_dim, linear-attention q/k/v/gate,
  Mamba's ``d_inner`` channels and its per-head or per-channel vectors (A_log, D, dt_bias,
  conv channels, gated-norm scale).
- ``"kv"``: key/value heads x head_dim of (GQA) attention.
- ``"state"``: the SSM state dimension (Mamba-1's ``A_log [d_inner, d_state]``).
- ``"conv"``: the convolution width.
- ``None``: small or low-rank dimensions that are never sharded (per-head-dim norm scales,
  GLA's gate rank, Mamba-1's ``x_proj`` output and ``dt_proj`` input, classifier classes).

Linen interop: ``seqmix.layers.as_linen(mixer_cls, config)`` (see ``seqmix.layers.interop``).

Long sequences: the mixers call ``seqmix.parallel``'s ops for a whole sequence, which are the
kernel ops unless the active mesh (``jax.set_mesh``) splits the sequence over a ``seq`` axis;
then they run context-parallel (docs/sequence_parallel.md).
"""

from seqmix.layers.attention import Attention
from seqmix.layers.base import COMMON, Mixer, copy_config, mixer_config
from seqmix.layers.based import Based
from seqmix.layers.bidirectional import Bidirectional, make_mixer
from seqmix.layers.block import Block
from seqmix.layers.conv import ShortConv
from seqmix.layers.embed import Embedding, Head
from seqmix.layers.gated_deltanet import DeltaNet, GatedDeltaNet
from seqmix.layers.interop import as_linen
from seqmix.layers.linear_attention import GLA, LinearAttention, RetNet
from seqmix.layers.mamba import Mamba
from seqmix.layers.mamba2 import Mamba2
from seqmix.layers.mlp import MLP
from seqmix.layers.norms import GatedRMSNorm, RMSNorm
from seqmix.layers.params import Dense

__all__ = [
    "COMMON",
    "GLA",
    "MLP",
    "Attention",
    "Based",
    "Bidirectional",
    "Block",
    "DeltaNet",
    "Dense",
    "Embedding",
    "GatedDeltaNet",
    "GatedRMSNorm",
    "Head",
    "LinearAttention",
    "Mamba",
    "Mamba2",
    "Mixer",
    "RMSNorm",
    "RetNet",
    "ShortConv",
    "as_linen",
    "copy_config",
    "make_mixer",
    "mixer_config",
]
