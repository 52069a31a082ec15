"""Bisecting a failed call over a batch (photoz.model.isolation), driven directly."""
import numpy as np
import pytest

from photoz.model.isolation import ROW_ERRORS, isolate


def call_failing_on(bad_rows, data, calls):
    def call(rows):
        calls.append((rows.start, rows.stop))
        if any(rows.start <= b < rows.stop for b in bad_rows):
            raise ValueError("index out of range")
        part = data[rows]
        return {"probs": np.stack([part, 1 - part], axis=1), "bits": part.astype(np.uint32) + 7}
    return call


def test_every_row_but_the_culprits_is_answered_with_its_own_outputs():
    data, calls = np.linspace(0, 1, 37), []
    out, isolation = isolate(call_failing_on({5, 30}, data, calls), 37)
    good = np.setdiff1d(np.arange(37), [5, 30])
    np.testing.assert_array_equal(out["probs"][good, 0], data[good])
    np.testing.assert_array_equal(out["bits"][good], data[good].astype(np.uint32) + 7)
    assert np.isnan(out["probs"][[5, 30]]).all() and (out["bits"][[5, 30]] == 0).all()
    assert [i for i, e in enumerate(out[ROW_ERRORS]) if e is not None] == [5, 30]
    assert "ValueError" in out[ROW_ERRORS][5] and "out of range" not in out[ROW_ERRORS][5]  # details: the log
    assert isolation.failed_rows == (5, 30) and isolation.calls == len(calls)
    assert isolation.describe() == "ValueError: index out of range"
    assert len(calls) <= 1 + 2 * 2 * int(np.ceil(np.log2(37)))  # two culprits: two paths down the halving tree


def test_a_call_that_succeeds_is_made_once_and_reports_nothing():
    calls = []
    out, isolation = isolate(call_failing_on(set(), np.zeros(4), calls), 4)
    assert isolation is None and calls == [(0, 4)] and ROW_ERRORS not in out


def test_all_rows_failing_is_the_engines_failure_unless_a_healthy_call_succeeds():
    data, calls = np.zeros(3), []
    with pytest.raises(ValueError):
        isolate(call_failing_on({0, 1, 2}, data, calls), 3)
    with pytest.raises(ValueError):
        isolate(call_failing_on({0, 1, 2}, data, []), 3, healthy=lambda: 1 / 0)
    template = call_failing_on(set(), np.zeros(1), [])(slice(0, 1))
    out, isolation = isolate(call_failing_on({0, 1, 2}, data, []), 3, healthy=lambda: template)
    assert isolation.failed_rows == (0, 1, 2) and np.isnan(out["probs"]).all()


def test_errors_of_an_earlier_stage_pass_through_a_later_bisection():
    """The flags' stage bisected after the model's: rows the model failed on keep the model's message."""
    earlier = np.array([None, "the model failed on this cutout alone", None, None], object)

    def finish(rows):
        if rows.start <= 3 < rows.stop:
            raise RuntimeError("flags")
        return {"probs": np.ones((rows.stop - rows.start, 2)), ROW_ERRORS: earlier[rows]}

    out, _ = isolate(finish, 4, stage="the quality flags")
    assert out[ROW_ERRORS][1] == "the model failed on this cutout alone"
    assert out[ROW_ERRORS][0] is None and "RuntimeError" in out[ROW_ERRORS][3]
    assert out[ROW_ERRORS][3].startswith("the quality flags failed on this cutout alone")


def test_outputs_joined_keep_each_rows_error_where_only_some_parts_had_failures():
    from photoz.model.isolation import concatenate_outputs

    clean = {"probs": np.ones((2, 3)), "flag_bits": np.array([1, 2], np.uint32)}
    bisected = {"probs": np.full((2, 3), np.nan), "flag_bits": np.zeros(2, np.uint32),
                ROW_ERRORS: np.array(["the model failed on this cutout alone", None], object)}
    joined = concatenate_outputs([clean, bisected])
    assert joined["probs"].shape == (4, 3) and joined["flag_bits"].tolist() == [1, 2, 0, 0]
    assert joined[ROW_ERRORS].tolist() == [None, None, "the model failed on this cutout alone", None]
    assert ROW_ERRORS not in concatenate_outputs([clean, clean])
    assert concatenate_outputs([clean]) is clean
