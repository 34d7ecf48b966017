"""The gated delta rule benchmark runs end to end on the CPU (its dry-run shape) and checks
the chunked form against the oracle on its own inputs."""

from seqmix.experiments.bench import common, gated_delta_rule


def test_delta_rule_bench_dry_run_on_cpu(monkeypatch):
    monkeypatch.setattr(common, "_LIVE", [])
    rows, columns = gated_delta_rule.run(
        quick=True, ceilings={"copy_tbps": 1.0, "bf16_matmul_tflops": 1.0}
    )
    assert set(columns) >= {"impl", "fwd_ms", "fwdbwd_ms", "rel_err_xla", "rel_err_fla"}
    by_impl = {r["impl"]: r for r in rows}
    assert set(by_impl) == {"seqmix_xla", "seqmix_naive", "fla_chunk_gated_delta_rule"}
    xla = by_impl["seqmix_xla"]
    assert "error" not in xla, xla["error"]
    assert xla["fwd_ms"] > 0 and xla["fwdbwd_ms"] > 0 and xla["fwd_TFLOPs"] > 0
    # bf16 outputs of the same float32 computation: only the final rounding differs
    assert by_impl["seqmix_naive"]["rel_err_xla"] < 1e-2
    # the peer needs a GPU (PyTorch, Triton): its row says why it has no figures
    peer = by_impl["fla_chunk_gated_delta_rule"]
    assert "error" in peer or peer["fwd_ms"] > 0
