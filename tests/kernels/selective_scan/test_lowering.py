"""selective_scan: lowering of forward and backward at [2, 2048, 1536, 16] bf16 with every
optional argument, through the public op: the chunked Triton kernels (their ``tt.scan``
included) and the lanes kernels of the training path (the table's on Hopper) for an H200, and the
Mosaic kernels for a TPU (nothing runs)."""

import jax
import jax.numpy as jnp
import pytest

from seqmix import testing
from seqmix.kernels import selective_scan
from seqmix.kernels.selective_scan.tuning import TritonConfig

# (implementation, config, the kernels of the training forward and the backward)
IMPLS = [
    pytest.param(
        "pallas_triton",
        TritonConfig(algorithm="chunked"),
        "selective_scan_chunked_",
        id="pallas_triton-chunked",
    ),
    # the table's (the lanes training path on Hopper)
    pytest.param("pallas_triton", None, "selective_scan_lanes_", id="pallas_triton"),
    pytest.param("pallas_tpu", None, None, id="pallas_tpu"),
]


_BF, _F32, _SD = jnp.bfloat16, jnp.float32, jax.ShapeDtypeStruct
# [2, 2048, 1536, 16]: u, delta, A, B, C, D, z, delta_bias, initial_state
_LOWERING_ARGS = [
    _SD((2, 2048, 1536), _BF),
    _SD((2, 2048, 1536), _BF),
    _SD((1536, 16), _F32),
    _SD((2, 2048, 1, 16), _BF),
    _SD((2, 2048, 1, 16), _BF),
    _SD((1536,), _F32),
    _SD((2, 2048, 1536), _BF),
    _SD((1536,), _F32),
    _SD((2, 1536, 16), _F32),
]


@pytest.mark.parametrize("implementation, config, prefix", IMPLS)
def test_lowers_forward_and_backward(implementation, config, prefix):
    """[2, 2048, 1536, 16] bf16 with every optional argument, through the public op: the
    chunked Triton kernels, and the lanes kernels on the training path (4 time segments at
    this shape: their local and adjoint passes too), lower for an H200 and the Mosaic
    kernels for a TPU (nothing runs)."""
    platform = "cuda" if implementation == "pallas_triton" else "tpu"
    f32 = jnp.float32

    def loss(u, delta, A, B, C, D, z, bias, h0):
        y, h = selective_scan(
            u,
            delta,
            A,
            B,
            C,
            D,
            z,
            delta_bias=bias,
            delta_softplus=True,
            initial_state=h0,
            return_final_state=True,
            implementation=implementation,
            config=config,
        )
        return jnp.sum(y.astype(f32) * y.astype(f32)) + jnp.sum(h)

    text = testing.lower_for(
        jax.value_and_grad(loss, argnums=tuple(range(9))), *_LOWERING_ARGS, platform=platform
    )
    marker = "__gpu$xla.gpu.triton" if platform == "cuda" else "tpu_custom_call"
    # The training forward and the backward.
    expected = 2
    assert text.count(marker) >= expected, (
        f"expected {expected} kernels, found {text.count(marker)}"
    )
    if platform == "cuda":
        for name in ("fwd", "bwd"):
            assert f"{prefix}{name}" in text, f"kernel {prefix}{name} missing from the module"
        if prefix == "selective_scan_lanes_":  # the lanes backward, not the chunked one
            assert "selective_scan_chunked_bwd" not in text
            for name in ("local", "adjoint"):
                assert f"{prefix}{name}" in text, f"kernel {prefix}{name} missing"


@pytest.mark.parametrize("groups", [None, 2], ids=["one-group", "two-groups"])
def test_final_state_backward_lowers_for_the_gpu(groups):
    """The context-parallel scan's reduction backward (``reduction="pallas_triton"``) at a
    block of the 125M Mamba-1 layer, [1, 4096, 1536, 16], with the GPU tiles, lowers for an
    H200 (nothing runs)."""
    from seqmix.parallel.selective_scan import block_final_state

    def loss(dt, u, B, A):
        return jnp.sum(block_final_state(dt, u, B, A, "pallas_triton"))

    Bshape = (1, 4096, 16) if groups is None else (1, 4096, groups, 16)
    args = [_SD((1, 4096, 1536), _F32), _SD((1, 4096, 1536), _BF), _SD(Bshape, _BF)]
    args.append(_SD((1536, 16), _F32))
    text = testing.lower_for(jax.grad(loss, argnums=(0, 1, 2, 3)), *args)
    assert text.count("__gpu$xla.gpu.triton") == 1
    assert "selective_scan_final_state_bwd" in text
