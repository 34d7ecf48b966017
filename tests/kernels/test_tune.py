"""The one tuning mechanism: Configs through the public ops, their resolution (table, tuning
file, caller), the tuning file's format and the autotuner."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix import kernels
from seqmix.kernels import dispatch, interpret, tune
from seqmix.kernels.attention import tuning as attention_tuning
from seqmix.kernels.conv1d import tuning as conv_tuning
from seqmix.kernels.delta_rule import tuning as delta_tuning
from seqmix.kernels.linear_attention import tuning as la_tuning
from seqmix.kernels.selective_scan import tuning as scan_tuning

# Every Pallas backend of every op takes a Config: (op, implementation) -> Config class.
CONFIGS = {
    ("attention", "pallas_triton"): attention_tuning.TritonConfig,
    ("attention", "pallas_tpu"): attention_tuning.TpuConfig,
    ("decode_attention", "pallas_triton"): attention_tuning.TritonDecodeConfig,
    ("decode_attention", "pallas_tpu"): attention_tuning.TpuDecodeConfig,
    ("linear_attention", "pallas_triton"): la_tuning.TritonConfig,
    ("linear_attention", "pallas_mosaic_gpu"): la_tuning.MosaicGpuConfig,
    ("linear_attention", "pallas_tpu"): la_tuning.TpuConfig,
    ("linear_attention_step", "pallas_triton"): la_tuning.TritonStepConfig,
    ("linear_attention_step", "pallas_tpu"): la_tuning.TpuStepConfig,
    ("selective_scan", "pallas_triton"): scan_tuning.TritonConfig,
    ("selective_scan", "pallas_tpu"): scan_tuning.TpuConfig,
    ("causal_conv1d", "pallas_triton"): conv_tuning.TritonConfig,
    ("causal_conv1d", "pallas_tpu"): conv_tuning.TpuConfig,
    ("causal_conv1d_step", "pallas_triton"): conv_tuning.TritonConfig,
    ("causal_conv1d_step", "pallas_tpu"): conv_tuning.TpuConfig,
    ("gated_delta_rule", "pallas_triton"): delta_tuning.TritonConfig,
    ("gated_delta_rule", "pallas_tpu"): delta_tuning.TpuConfig,
    ("gated_delta_rule_step", "pallas_triton"): delta_tuning.TritonStepConfig,
    ("gated_delta_rule_step", "pallas_tpu"): delta_tuning.TpuStepConfig,
}


def test_every_pallas_backend_has_a_frozen_config():
    ops = dispatch.registered_ops()
    for op in {o for o, _ in CONFIGS}:
        pallas = {i for i in ops[op].impls if i.startswith("pallas_")}
        assert pallas == set(ops[op].configs), op
        for impl in pallas:
            cls = ops[op].configs[impl]
            assert cls is CONFIGS[(op, impl)]
            assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
            assert all(getattr(cls(), f.name) is None for f in dataclasses.fields(cls))
            hash(cls())  # usable as a static argument


def _conv_args(seed=0, T=9, C=16):
    ks = jax.random.split(jax.random.key(seed), 2)
    return jax.random.normal(ks[0], (1, T, C)), jax.random.normal(ks[1], (4, C))


def test_a_config_reaches_the_kernel_and_selects_its_backend():
    x, w = _conv_args()
    ref = kernels.causal_conv1d(x, w, implementation="naive")
    with interpret():
        for cfg in (conv_tuning.TritonConfig(block_t=8), conv_tuning.TpuConfig()):
            np.testing.assert_allclose(kernels.causal_conv1d(x, w, config=cfg), ref, atol=1e-5)
        # a bad Config value is checked where it is resolved: it did reach the kernel
        with pytest.raises(ValueError, match="block_t"):
            kernels.causal_conv1d(x, w, config=conv_tuning.TritonConfig(block_t=6))
        with pytest.raises(ValueError, match=r"TritonConfig.*pallas_tpu"):
            kernels.causal_conv1d(
                x, w, implementation="pallas_tpu", config=conv_tuning.TritonConfig()
            )
        with pytest.raises(ValueError, match="config must be the Config"):
            kernels.causal_conv1d(x, w, config=scan_tuning.TpuConfig())
        with pytest.raises(ValueError, match="config must be the Config"):
            kernels.causal_conv1d(x, w, implementation="xla", config={"block_t": 8})


def test_merge_to_dict_from_dict_round_trip():
    base = la_tuning.TRITON["hopper"]["scalar"]
    top = la_tuning.TritonConfig(block_v=128, num_warps=la_tuning.PerKernel(output=8))
    merged = tune.merge(base, top)
    assert merged.block_v == 128 and merged.block_k == base.block_k
    assert merged.num_warps.output == 8 and merged.num_warps.state == base.num_warps.state
    data = json.loads(json.dumps(tune.to_dict(top)))
    assert data == {"block_v": 128, "num_warps": {"output": 8}}
    assert tune.from_dict(la_tuning.TritonConfig, data) == top
    blocks = attention_tuning.TritonConfig(fwd=attention_tuning.Blocks(64, 32, 4, 2))
    assert tune.from_dict(attention_tuning.TritonConfig, tune.to_dict(blocks)) == blocks
    with pytest.raises(ValueError, match=r"unknown fields \['blok_v'\]"):
        tune.from_dict(la_tuning.TritonConfig, {"blok_v": 1})


def test_resolution_order_table_file_caller(tmp_path, monkeypatch):
    path = tmp_path / "t.json"
    entry = {"config": {"block_v": 32, "split_scores": False}}
    path.write_text(json.dumps({"linear_attention": {"pallas_triton": {"channel": entry}}}))
    monkeypatch.setenv(tune.ENV, str(path))
    table = la_tuning.TRITON["hopper"]["channel"]
    got = la_tuning.triton_config(None, "channel", interpret=False, device_kind="NVIDIA H100")
    assert (got.block_v, got.split_scores, got.block_k) == (32, False, table.block_k)
    mine = la_tuning.triton_config(la_tuning.TritonConfig(block_v=16), "channel", interpret=False)
    assert (mine.block_v, mine.split_scores) == (16, False)  # the caller wins field by field
    other = la_tuning.triton_config(None, "scalar", interpret=False)
    assert other == la_tuning.TRITON["hopper"]["scalar"]  # other keys keep the table's
    assert la_tuning.triton_config(None, "channel", interpret=True) == table  # no file there
    with tune.recording() as seen:
        la_tuning.triton_config(None, "none", interpret=True)
    assert seen == [("linear_attention", "pallas_triton", "none")]


def test_autotune_times_candidates_and_writes_the_tuning_file(tmp_path, monkeypatch):
    x, w = _conv_args(T=8)
    out = tmp_path / "tuning.json"
    lines = []
    with interpret():
        result = tune.autotune(
            kernels.causal_conv1d,
            (x, w),
            implementation="pallas_triton",
            kwargs=dict(activation="silu"),
            axes=[tune.Axis("block_c", [16, 32], backward=True), tune.Axis("block_t", [3, 2])],
            out=str(out),
            shape="1x8x16",
            reps=1,
            log=lines.append,
        )
    assert (result.op, result.implementation, result.key) == (
        "causal_conv1d",
        "pallas_triton",
        "default",
    )
    assert result.best.block_c in (16, 32) and result.best.block_t == 2  # 3 fails: skipped
    timed = [t for t in result.trials if t.seconds is not None]
    failed = [t for t in result.trials if t.error is not None]
    assert len(timed) == 3 and len(failed) == 1 and "block_t" in failed[0].error
    assert [t.backward for t in result.trials] == [True, True, False, False]
    data = json.loads(out.read_text())
    entry = data["causal_conv1d"]["pallas_triton"]["default"]
    assert entry["config"] == tune.to_dict(result.best) and entry["shape"] == "1x8x16"
    assert entry["ms"] > 0 and isinstance(entry["device"], str)
    # the file is read back as the same Config, for this op only
    monkeypatch.setenv(tune.ENV, str(out))
    assert conv_tuning.triton_config(None, "causal_conv1d", interpret=False) == tune.merge(
        conv_tuning.TRITON["hopper"], result.best
    )
    assert (
        conv_tuning.triton_config(None, "causal_conv1d_step", interpret=False)
        == (conv_tuning.TRITON["hopper"])
    )


def test_autotune_candidates_and_the_family_search():
    x, w = _conv_args(T=4)
    cands = [conv_tuning.TritonConfig(block_c=16), conv_tuning.TritonConfig(block_c=32)]
    with interpret():
        result = tune.autotune(
            kernels.causal_conv1d_step,
            (x[:, 0], jnp.zeros((1, 3, 16)), w),
            implementation="pallas_triton",
            candidates=cands,
            reps=1,
            log=lambda s: None,
        )
    assert result.best in cands and len(result.trials) == 2
    for (op, impl), axes in [
        *attention_tuning.SEARCH.items(),
        *la_tuning.SEARCH.items(),
        *scan_tuning.SEARCH.items(),
        *conv_tuning.SEARCH.items(),
    ]:
        cls = CONFIGS[(op, impl)]
        for axis in axes:  # every axis names a field of the Config it searches
            for value in axis.values:
                dataclasses.replace(cls(), **{axis.field: value})
    with pytest.raises(ValueError, match=r"public seqmix\.kernels op"):
        tune.autotune(lambda x: x, (x,), implementation="pallas_triton")
