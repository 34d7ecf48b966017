"""The revision comparison's verdict: slower only beyond the noise of this tree's two runs."""

from seqmix.experiments.device import compare_revisions as cr


def rows(**times):
    row = {"label": "8x4096", "impl": "pallas", "params_m": 3.0, **times}
    return {cr.row_key(row): row}


def test_slower_only_beyond_the_repeat_noise():
    # the two runs of this tree differ by 10%: a 5% loss to the other tree is noise
    out = cr.compare(rows(fwd_ms=1.05), rows(fwd_ms=1.0), rows(fwd_ms=1.155), 0.03)
    assert [(r["column"], r["slower"]) for r in out] == [("fwd_ms", False)]
    assert abs(out[0]["noise"] - 0.1) < 1e-9 and out[0]["new"] == 1.05
    # both runs agree and both lose by 20%: slower; a non-time column is never compared
    out = cr.compare(rows(fwd_ms=1.2), rows(fwd_ms=1.0), rows(fwd_ms=1.2), 0.03)
    assert out[0]["slower"] and abs(out[0]["new_over_old"] - 1.2) < 1e-9 and len(out) == 1
    # faster, or a row missing from one run: not slower, not compared
    assert not cr.compare(rows(ms=0.5), rows(ms=1.0), rows(ms=0.5), 0.03)[0]["slower"]
    assert cr.compare(rows(ms=0.5), {}, rows(ms=0.5), 0.03) == []


def test_rows_without_a_label_are_named_by_their_shape():
    row = {
        "series": "shapes",
        "decay": "scalar",
        "impl": "pallas",
        "B": 2,
        "T": 4096,
        "blocks": "x",
    }
    other = dict(row, blocks="y", config="{}")  # what a tree adds or renames is not in the key
    assert cr.row_key(row) == cr.row_key(other)
    out = cr.compare(
        {cr.row_key(row): dict(row, fwd_ms=1.0)},
        {cr.row_key(other): dict(other, fwd_ms=1.0)},
        {cr.row_key(row): dict(row, fwd_ms=1.0)},
        0.03,
    )
    assert out[0]["label"] == "series=shapes decay=scalar B=2 T=4096" and out[0]["impl"] == "pallas"
