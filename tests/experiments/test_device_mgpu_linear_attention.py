"""The GPU script of the Mosaic GPU engine reads pytest's report of the op's case table."""

from seqmix.experiments.device import mgpu_linear_attention as script

REPORT = """\
PASSED tests/kernels/linear_attention/test_linear_attention.py::test_matches_the_oracle[scalar-bf16-T1-pallas_mosaic_gpu]
FAILED tests/kernels/linear_attention/test_linear_attention.py::test_matches_the_oracle[none-bf16-normalize-T63-pallas_mosaic_gpu] - AssertionError: dq 7e-3
SKIPPED [12] tests/kernels/harness.py:82: not served: bf16/fp16 operands only
1 failed, 1 passed, 12 skipped in 31.5s"""


def test_one_row_per_case_and_the_totals():
    rows = script.pytest_rows(REPORT)
    assert [(r["case"], r.get("status")) for r in rows] == [
        ("scalar-bf16-T1-pallas_mosaic_gpu", "PASSED"),
        ("none-bf16-normalize-T63-pallas_mosaic_gpu", "FAILED"),
        ("tests/kernels/harness.py:82", "SKIPPED"),
        ("totals", None),
    ]
    assert rows[1]["reason"] == "AssertionError: dq 7e-3" and not rows[1]["ok"]
    assert rows[2]["reason"] == "not served: bf16/fp16 operands only"
    assert rows[3] == {
        "section": "check_small",
        "case": "totals",
        "failed": 1,
        "passed": 1,
        "skipped": 12,
    }
    assert "| check_small | totals | | 1 failed, 1 passed, 12 skipped |" in _table(rows)


def _table(rows):
    script.ROWS[:] = rows
    try:
        return script._table()
    finally:
        script.ROWS.clear()
