"""An associative scan that lowers to Triton's ``tt.scan`` inside a Pallas Triton kernel.

``associative_scan(combine, elems, axis=, reverse=)`` has the semantics of
``jax.lax.associative_scan``: ``combine(earlier, later)`` on tuples of arrays, ``reverse``
scanning from the end of ``axis``. Pallas Triton lowers only ``cumsum`` to ``tt.scan`` (and
``lax.associative_scan`` itself is built from strided slices and pads it cannot lower), so
this primitive carries the combine function to a lowering rule of its own: the combine is
traced on scalars and becomes the scan region, which Triton runs as an in-thread
sequential scan followed by a warp-shuffle / shared-memory tree across the threads that
hold the axis. Outside a Triton kernel (interpret mode, the CPU) it is
``lax.associative_scan``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
from jax import lax
from jax.extend import core as jex_core
from jax.interpreters import mlir

associative_scan_p = jex_core.Primitive("seqmix_associative_scan")
associative_scan_p.multiple_results = True


def associative_scan(
    combine: Callable, elems: Sequence[jax.Array], *, axis: int, reverse: bool = False
) -> list[jax.Array]:
    """The inclusive scan of ``elems`` (a tuple of equal-shape arrays) along ``axis`` by the
    associative ``combine(earlier, later) -> tuple`` (``earlier`` holds the elements
    before ``later`` in scan order: later times, for ``reverse``)."""
    elems = tuple(elems)
    shapes = {x.shape for x in elems}
    if len(shapes) != 1:
        raise ValueError(f"associative_scan needs equal-shape elems, got shapes {shapes}")
    axis = axis % elems[0].ndim
    return associative_scan_p.bind(*elems, combine=combine, axis=axis, reverse=bool(reverse))


def _impl(*elems, combine, axis, reverse):
    n = len(elems)

    def fn(a, b):
        return tuple(combine(tuple(a), tuple(b)))[:n]

    return list(lax.associative_scan(fn, tuple(elems), axis=axis, reverse=reverse))


associative_scan_p.def_impl(_impl)
associative_scan_p.def_abstract_eval(lambda *avals, **_: list(avals))
mlir.register_lowering(associative_scan_p, mlir.lower_fun(_impl, multiple_results=True))


def _register_triton() -> None:
    """The ``tt.scan`` lowering (absent where jaxlib ships no Triton dialect)."""
    try:
        from jax._src.lib.mlir import ir
        from jax._src.pallas.triton import lowering as triton_lowering
        from jaxlib.triton import dialect as tt_dialect
    except ImportError:  # pragma: no cover - builds without Triton
        return

    def rule(ctx, *elems, combine, axis, reverse):
        n = len(elems)
        scalars = [jax.core.ShapedArray((), a.dtype) for a in ctx.avals_in]
        closed = jax.make_jaxpr(lambda *xs: tuple(combine(tuple(xs[:n]), tuple(xs[n:]))))(
            *scalars, *scalars
        )
        if closed.consts:
            raise NotImplementedError("associative_scan: the combine may not close over arrays")
        op = tt_dialect.ScanOp(list(elems), axis, reverse)
        types = [ir.RankedTensorType(x.type).element_type for x in elems]
        entry = op.regions[0].blocks.append(*types, *types)
        with ir.InsertionPoint.at_block_begin(entry):
            out = triton_lowering.lower_jaxpr_to_triton_ir(
                ctx.context, closed.jaxpr, None, *entry.arguments
            )
            tt_dialect.scan_return(out)
        op.verify()
        return list(op.result)

    triton_lowering.register_lowering(associative_scan_p)(rule)


_register_triton()


# --- the combines of the selective scan -------------------------------------------------------


def affine(first, second):
    """Composition of the maps ``x -> a x + b``: ``first`` then ``second``."""
    a1, b1 = first
    a2, b2 = second
    return a2 * a1, a2 * b1 + b2


def affine_exclusive(first, second):
    """Composition of ``(a, a', b, b')``: the map ``x -> a x + b`` of a run of steps and
    ``x -> a' x + b'``, the same run without its last step. A leaf is ``(a, 1, b, 0)``; the
    inclusive scan's ``(a', b')`` is then the exclusive scan of ``(a, b)`` (the value
    before each step), without a shift of the scanned axis."""
    a1, _, b1, _ = first
    a2, p2, b2, e2 = second
    return a2 * a1, p2 * a1, a2 * b1 + b2, p2 * b1 + e2
