"""linear_attention's ``pallas_mosaic_gpu`` backend beyond the case table
(``test_linear_attention.py`` runs the table's cases on it): the interpreter's race
detector over every kernel, the arguments it does not serve, its plans and tuning, and the
lowering of forward and backward for an H200 at the benchmark shapes, which checks layouts,
tilings and shared-memory budgets that the interpreter does not."""

import json
from unittest import mock

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from seqmix import testing
from seqmix.kernels import dispatch, interpret, linear_attention, tune
from seqmix.kernels.linear_attention import tuning
from seqmix.kernels.linear_attention.mosaic_gpu.plan import make_plan
from seqmix.kernels.linear_attention.tuning import MosaicGpuConfig, TritonConfig

from .cases import BF16, CASES, MOSAIC, Case, check


class _RecordingRaceState:
    """Collects the interpreter's race-detection state of every kernel run."""

    def __init__(self):
        from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

        self.module = gpu_callbacks
        self.base = gpu_callbacks.GPURaceDetectionState
        self.states = []

    def __call__(self, *args, **kwargs):
        state = self.base(*args, **kwargs)
        self.states.append(state)
        return state


def _smem_byte_offsets(dst) -> tuple[int, list[int]]:
    """``(static offset, strides of dynamic indices)`` in bytes of an untiled SMEM view
    (row-major over each indexer's shape); None for a tiled view (its layout is whole
    tiles)."""
    from jax._src.state.indexing import NDIndexer, Slice

    transforms = getattr(dst, "transforms", ())
    if any(not isinstance(t, NDIndexer) for t in transforms):
        return None
    itemsize = jnp.dtype(dst.dtype).itemsize
    static, dynamic = 0, []
    for t in transforms:
        strides = [itemsize] * len(t.shape)
        for i in range(len(t.shape) - 2, -1, -1):
            strides[i] = strides[i + 1] * t.shape[i + 1]
        for index, stride in zip(t.indices, strides):
            start = index.start if isinstance(index, Slice) else index
            if isinstance(start, int):
                static += start * stride
            else:
                dynamic.append(stride)
    return static, dynamic


@pytest.mark.parametrize("decay", ["scalar", "channel"])
def test_no_races_and_aligned_copies_in_every_kernel(decay):
    """Forward and backward (two-level state passes, runs) under the interpreter's race
    detector: no kernel reads or writes shared memory unordered with a TMA copy or
    another thread; and every TMA copy writes shared memory at a 128-byte aligned offset
    (the hardware faults on others, which the interpreter does not check)."""
    config = MosaicGpuConfig(state_segments=2, detect_races=True, chunks_per_program=2)
    case = Case(
        f"{decay}-races", 1, 200, 1, 1, 64, 64, decay, 64, BF16, "sorted", configs={MOSAIC: config}
    )
    recorder = _RecordingRaceState()
    destinations = []
    copy = plgpu.copy_gmem_to_smem

    def recording_copy(src, dst, *args, **kwargs):
        destinations.append(dst)
        return copy(src, dst, *args, **kwargs)

    with (
        mock.patch.object(recorder.module, "GPURaceDetectionState", recorder),
        mock.patch.object(plgpu, "copy_gmem_to_smem", recording_copy),
    ):
        check(case, MOSAIC)
    assert len(recorder.states) >= 7  # state passes, output, reverse passes, dv, dq/dk
    assert not any(s.races_found for s in recorder.states), "data race in a kernel"
    offsets = [o for o in map(_smem_byte_offsets, destinations) if o is not None]
    assert len(offsets) >= 5  # vectors of decays and runs, padded chunk operands
    for static, dynamic in offsets:
        assert static % 128 == 0 and all(s % 128 == 0 for s in dynamic), (static, dynamic)


@pytest.mark.parametrize(
    "what,kwargs",
    [
        ("float32", dict(dtype=jnp.float32)),
        ("chunk_size", dict(chunk_size=32)),
        ("key_dim", dict(K=256)),
    ],
)
def test_unsupported_arguments_raise_not_implemented(what, kwargs):
    dtype, K = kwargs.get("dtype", jnp.bfloat16), kwargs.get("K", 64)
    q = jnp.zeros((1, 8, 1, K), dtype)
    with interpret(), pytest.raises(NotImplementedError, match=what.split("_")[0]):
        linear_attention(
            q, q, q, chunk_size=kwargs.get("chunk_size", 64), implementation="pallas_mosaic_gpu"
        )


def test_other_gpu_generations_are_not_served():
    with pytest.raises(NotImplementedError, match="Hopper"):
        tuning.mosaic_gpu_config(None, "scalar", interpret=False, device_kind="NVIDIA A100")
    hopper = tuning.mosaic_gpu_config(None, "scalar", interpret=False, device_kind="NVIDIA H200")
    assert hopper == tuning.MOSAIC_GPU["hopper"]["scalar"]


def _backends(fn, *args) -> set:
    """The backends whose Config a call resolves (on a GPU, nothing runs)."""
    with dispatch.target_platform("gpu"), interpret(False), tune.recording() as seen:
        jax.eval_shape(fn, *args)
    return {impl for _, impl, _ in seen}


def test_auto_keeps_triton_and_a_config_selects_mosaic_gpu(monkeypatch):
    """Where ``MOSAIC_GPU_AUTO`` does not prefer it, auto dispatch on a GPU passes the Mosaic
    GPU engine over; its Config selects it, and a Config of another backend is refused."""
    monkeypatch.setitem(tuning.MOSAIC_GPU_AUTO, "hopper", {})
    x = jax.ShapeDtypeStruct((1, 64, 1, 64), jnp.bfloat16)
    assert _backends(lambda q: linear_attention(q, q, q), x) == {"pallas_triton"}
    config = MosaicGpuConfig(depth=1)
    assert _backends(lambda q: linear_attention(q, q, q, config=config), x) == {"pallas_mosaic_gpu"}
    with pytest.raises(ValueError, match=r"TritonConfig.*pallas_mosaic_gpu"):
        linear_attention(
            jnp.zeros(x.shape, x.dtype),
            jnp.zeros(x.shape, x.dtype),
            jnp.zeros(x.shape, x.dtype),
            implementation="pallas_mosaic_gpu",
            config=TritonConfig(),
        )


def test_auto_tries_mosaic_gpu_where_the_table_prefers_it(monkeypatch):
    """Auto dispatch on Hopper runs the Mosaic GPU engine for the decay kinds, dims and
    lengths of ``MOSAIC_GPU_AUTO`` and pallas_triton elsewhere (another JAX release or
    generation, another decay, dims or a longer sequence); a named call ignores the table."""
    monkeypatch.setitem(tuning.MOSAIC_GPU_AUTO, "hopper", {"scalar": {(64, 64): 64}})
    monkeypatch.setattr(tuning, "MOSAIC_GPU_AUTO_JAX", (jax.__version__,))
    monkeypatch.setattr(tuning, "current_device_kind", lambda: "NVIDIA H100 80GB HBM3")
    x64, x128 = (jax.ShapeDtypeStruct((1, 64, 1, d), jnp.bfloat16) for d in (64, 128))
    g = jax.ShapeDtypeStruct((1, 64, 1), jnp.float32)
    gc = jax.ShapeDtypeStruct((1, 64, 1, 64), jnp.float32)

    def la(q, g):
        return linear_attention(q, q, q, g)

    assert _backends(la, x64, g) == {"pallas_mosaic_gpu"}
    assert _backends(la, x128, g) == {"pallas_triton"}
    longer = jax.ShapeDtypeStruct((1, 128, 1, 64), jnp.bfloat16)
    g_longer = jax.ShapeDtypeStruct((1, 128, 1), jnp.float32)
    assert _backends(la, longer, g_longer) == {"pallas_triton"}  # past the measured length
    assert _backends(la, x64, gc) == {"pallas_triton"}
    assert _backends(lambda q: linear_attention(q, q, q), x64) == {"pallas_triton"}
    named = lambda q, g: linear_attention(q, q, q, g, implementation="pallas_mosaic_gpu")
    assert _backends(named, x128, g) == {"pallas_mosaic_gpu"}
    monkeypatch.setattr(tuning, "MOSAIC_GPU_AUTO_JAX", ("0.0.",))  # another jax release
    assert _backends(lambda q, g: linear_attention(q, q, q, g), x64, g) == {"pallas_triton"}
    monkeypatch.setattr(tuning, "MOSAIC_GPU_AUTO_JAX", (jax.__version__,))
    monkeypatch.setattr(tuning, "current_device_kind", lambda: "NVIDIA A100-SXM4-80GB")
    assert _backends(lambda q, g: linear_attention(q, q, q, g), x64, g) == {"pallas_triton"}


def test_tuning_file_and_caller_override_the_table(tmp_path, monkeypatch):
    path = tmp_path / "t.json"
    entry = {"config": {"block_v": 64, "state_segments": 1}}
    path.write_text(json.dumps({"linear_attention": {"pallas_mosaic_gpu": {"channel": entry}}}))
    monkeypatch.setenv(tune.ENV, str(path))
    table = tuning.MOSAIC_GPU["hopper"]["channel"]
    got = tuning.mosaic_gpu_config(None, "channel", interpret=False, device_kind="NVIDIA H100")
    assert (got.block_v, got.state_segments, got.depth) == (64, 1, table.depth)
    mine = tuning.mosaic_gpu_config(MosaicGpuConfig(depth=1), "channel", interpret=False)
    assert (mine.block_v, mine.depth) == (64, 1)
    assert tuning.mosaic_gpu_config(None, "scalar", interpret=False) == table
    with pytest.raises(ValueError, match="block_v must be 64 or 128"):
        MosaicGpuConfig(block_v=32)


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.configs.get(MOSAIC, MosaicGpuConfig()).state_segments]
)
def test_two_level_cases_run_the_segments_they_ask_for(case):
    """The case table's two-level cases are the plans they name (nothing runs)."""
    config = case.configs[MOSAIC]
    q = jax.ShapeDtypeStruct((case.B, case.T, case.Hqk, case.K), jnp.bfloat16)
    v = jax.ShapeDtypeStruct((case.B, case.T, case.Hv, case.V), jnp.bfloat16)
    g = jax.ShapeDtypeStruct((case.B, case.T, case.Hv), jnp.float32)
    plan = make_plan(q, v, g, None, None, scale=1.0, chunk_size=64, config=config)
    assert plan.segments == config.state_segments


@pytest.mark.parametrize("B,T,want", [(8, 4096, 1), (2, 16384, 9), (1, 65536, 17)])
def test_auto_segments_at_benchmark_shapes(B, T, want):
    """ "auto" keeps one state pass where (batch * heads) programs fill the GPU and splits
    the chunks into segments where they do not (H = 16, D = 128: one value block)."""
    x = jax.ShapeDtypeStruct((B, T, 16, 128), jnp.bfloat16)
    g = jax.ShapeDtypeStruct((B, T, 16), jnp.float32)
    plan = make_plan(x, x, g, None, None, scale=1.0, chunk_size=64)
    assert plan.segments == want
    assert plan.segments * plan.segment_chunks * plan.chunk == plan.time >= T


# --- lowering for the H200 (nothing runs) ----------------------------------------------------


@pytest.mark.parametrize(
    "B,T,D,decay",
    [
        (8, 4096, 128, "scalar"),
        (2, 16384, 128, "scalar"),
        (1, 65536, 128, "scalar"),
        (8, 4096, 64, "scalar"),
        (8, 4096, 128, "none"),
        (8, 4096, 128, "channel"),
        (1, 65536, 128, "channel"),
        (8, 4096, 64, "channel"),
    ],
)
def test_lowers_for_gpu(B, T, D, decay):
    """Forward and backward of the public op at [B, T, 16, D] bf16 (packed sequences and an
    initial state) lower to Mosaic GPU for an H200: every kernel's layouts, wgmma tiles and
    shared-memory budget are valid there."""
    H = 16
    x = jnp.zeros((B, T, H, D), jnp.bfloat16)
    g = {"none": None, "scalar": jnp.zeros((B, T, H)), "channel": jnp.zeros((B, T, H, D))}[decay]
    s0 = jnp.zeros((B, H, D, D))
    seg = jnp.zeros((B, T), jnp.int32)

    def fwd_bwd(q, k, v, g, s0):
        def f(q, k, v, g, s0):
            return linear_attention(
                q,
                k,
                v,
                g,
                initial_state=s0,
                segment_ids=seg,
                return_final_state=True,
                implementation="pallas_mosaic_gpu",
            )

        out, vjp = jax.vjp(f, q, k, v, g, s0)
        return out, vjp(out)

    text = testing.lower_for(fwd_bwd, x, x, x, g, s0, platform="cuda")
    for kernel in ("states", "output", "state_grads", "dv", "dqk"):
        assert f"linear_attention_{kernel}" in text
