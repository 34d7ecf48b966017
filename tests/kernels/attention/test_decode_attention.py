"""decode_attention: every implementation against the float32 oracle on the one case table,
and cache entries past a row's length are never read."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix import testing
from seqmix.kernels import decode_attention

from .. import harness
from .cases import DECODE_CASES, TPU, TRITON, DecodeCase, check_decode, decode_inputs


@pytest.mark.parametrize("case, implementation", harness.params(DECODE_CASES, (TRITON, "cudnn")))
def test_matches_the_oracle(case, implementation, capsys):
    check_decode(case, implementation)
    assert "RACE DETECTED" not in capsys.readouterr().out  # the TPU interpreter's detector


# TPU: two programs of 2 KV heads each
PAST_LENGTH = [
    DecodeCase(
        "nan-past-length",
        3,
        290,
        8,
        4,
        128,
        "bfloat16",
        None,
        (0, 131, 290),
        cpu=(TRITON, TPU, "naive", "xla"),
    )
]


@pytest.mark.parametrize(
    "case, implementation", harness.params(PAST_LENGTH, (TRITON, "cudnn", "xla"))
)
@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_ignores_the_cache_past_each_length(case, implementation, bad):
    """Entries past a row's length (NaN or Inf here, as stale slots may hold) reach neither
    the output nor dq; a row of length 0 gives 0."""
    seed = testing.fresh_seed()
    q, k, v, lengths = decode_inputs(case, seed)
    past = jnp.arange(case.S)[None, :, None, None] >= lengths[:, None, None, None]
    k_bad, v_bad = jnp.where(past, bad, k), jnp.where(past, -bad, v)

    def run(q, k, v, impl):
        return decode_attention(q, k, v, lengths, implementation=impl)

    def loss(q, k, v, impl):
        return jnp.sum(run(q, k, v, impl).astype(jnp.float32))

    # the oracle on the same values in float32
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    tol = testing.tolerance(case.dtype)
    with harness.mode():
        o = harness.skip_unserved(run, q, k_bad, v_bad, implementation)
    testing.assert_close(o, run(q32, k32, v32, "naive"), tol, f"o (seed {seed})")
    assert np.all(np.asarray(o[0], np.float32) == 0)
    with harness.mode():  # cuDNN serves some lengths for inference only
        dq = harness.skip_unserved(jax.grad(loss), q, k_bad, v_bad, implementation)
    testing.assert_close(dq, jax.grad(loss)(q32, k32, v32, "naive"), tol, f"dq (seed {seed})")
