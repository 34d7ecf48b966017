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

    with harness.mode():
        o = harness.skip_unserved(run, q, k_bad, v_bad, implementation)
        dq = jax.grad(lambda q: jnp.sum(run(q, k_bad, v_bad, implementation).astype(jnp.float32)))(
            q
        )
    # the oracle on the same values in float32
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    ref = run(q32, k32, v32, "naive")
    dq_ref = jax.grad(lambda q: jnp.sum(run(q, k32, v32, "naive")))(q32)
    testing.assert_close(o, ref, testing.tolerance(case.dtype), f"o (seed {seed})")
    testing.assert_close(dq, dq_ref, testing.tolerance(case.dtype), f"dq (seed {seed})")
    assert np.all(np.asarray(o[0], np.float32) == 0)
