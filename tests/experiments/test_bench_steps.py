"""The decoding-step benchmark runs end to end on the CPU (quick shapes) and checks itself."""

import importlib

import pytest

from seqmix.kernels import dispatch


@pytest.mark.parametrize("op", ["linear_attention_step", "causal_conv1d_step"])
def test_step_bench_times_and_compares(op):
    with dispatch.interpret():  # the Pallas kernels run in interpret mode on the CPU
        module = importlib.import_module(f"seqmix.experiments.bench.{op}")
        rows, columns = module.run(quick=True, ceilings={"copy_tbps": 1.0})
    assert set(columns) >= {"impl", "us", "err"}
    by_impl = {r["impl"]: r for r in rows}
    assert by_impl["xla"]["us"] > 0 and by_impl["xla"]["gbs"] > 0
    other = by_impl["pallas_triton"]
    assert "error" not in other, other["error"]
    assert other["us"] > 0 and other["err"] < 1e-2, other
