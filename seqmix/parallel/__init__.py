"""Sequence (context) parallelism: one long sequence split over the devices of a mesh axis.

Each op here has the signature of its ``seqmix.kernels`` namesake plus ``mesh=`` and
``axis=`` (default ``"seq"``). When the mesh (``mesh=``, or else the active mesh set with
``jax.set_mesh``) has that axis with more than one device, the op runs its context-parallel
form: ``jax.shard_map`` over the axis, the public kernel op on every device's block of
tokens, and JAX collectives between them (``ppermute``, ``all_gather``); otherwise it is the
kernel op itself. Outputs and gradients equal the single-device op's (autodiff through
``shard_map``). The layers call these, so a model runs sequence-parallel when the trainer
activates a mesh with ``mesh.seq > 1``, and unchanged otherwise.

- ``linear_attention``: linear attention, RetNet, GLA, Mamba-2 SSD (LASP-2: one all-gather
  of per-device final states and decays, then a correction ``q S_in``);
- ``selective_scan``: Mamba-1 (the same state exchange, each block's final state by a
  reduction over its tokens, then the op run once from ``h_in``);
- ``causal_conv1d``: a halo of ``width - 1`` tokens from the previous device;
- ``attention``: sliding windows by a halo of ``window`` keys; full attention by an
  all-gather of K/V with zig-zag load balancing of causal queries.

- ``gated_delta_rule``: the delta rule, whose block map ``S -> M S + S^0`` has a ``[K, K]``
  transition ``M`` (the op run from the identity on zero values) in place of a decay.

Another recurrent op family joins by the same pattern: the block's zero-state result, its
map of an incoming state, ``exchange.carried_states`` and a correction; add
``seqmix/parallel/<family>.py`` following ``linear_attention.py``.
"""

from seqmix.parallel.attention import attention
from seqmix.parallel.conv1d import causal_conv1d
from seqmix.parallel.delta_rule import gated_delta_rule
from seqmix.parallel.linear_attention import linear_attention
from seqmix.parallel.mesh import SEQ_AXIS, sequence_mesh, sequence_parallel_size
from seqmix.parallel.selective_scan import selective_scan

__all__ = [
    "SEQ_AXIS",
    "attention",
    "causal_conv1d",
    "gated_delta_rule",
    "linear_attention",
    "selective_scan",
    "sequence_mesh",
    "sequence_parallel_size",
]
