"""decode_attention: every implementation against the float32 oracle on the one case table,
and cache entries past a row's length are never read."""

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
        "nan-past-length", 3, 290, 8, 4, 128, "bfloat16", None, (0, 131, 290), cpu=(TRITON, TPU)
    )
]


@pytest.mark.parametrize("case, implementation", harness.params(PAST_LENGTH, (TRITON, "cudnn")))
def test_ignores_the_cache_past_each_length(case, implementation):
    """Entries past a row's length (NaN here) are never used; a row of length 0 gives 0."""
    seed = testing.fresh_seed()
    q, k, v, lengths = decode_inputs(case, seed)
    past = jnp.arange(case.S)[None, :, None, None] >= lengths[:, None, None, None]
    k_nan, v_nan = jnp.where(past, jnp.nan, k), jnp.where(past, jnp.nan, v)
    with harness.mode():
        o = harness.skip_unserved(
            decode_attention, q, k_nan, v_nan, lengths, implementation=implementation
        )
    ref = decode_attention(q, k, v, lengths, implementation="naive")
    testing.assert_close(o, ref, testing.tolerance(case.dtype), f"o (seed {seed})")
    assert np.all(np.asarray(o[0], np.float32) == 0)
