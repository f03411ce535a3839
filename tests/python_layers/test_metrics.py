"""Metrics on hand-computed accuracy matrices (python_layers.metrics)."""
import math

import numpy as np
import pytest

from python_layers import metrics

NAN = math.nan


def test_hand_computed_matrix():
    R = [[0.9, 0.1, None],
         [0.8, 0.95, 0.2],
         [0.7, 0.9, 0.85]]
    b = [0.1, 0.15, 0.25]
    assert metrics.average_accuracy(R) == pytest.approx((0.7 + 0.9 + 0.85) / 3)
    assert metrics.backward_transfer(R) == pytest.approx(((0.7 - 0.9) + (0.9 - 0.95)) / 2)  # -0.125
    assert metrics.forward_transfer(R, b) == pytest.approx(((0.1 - 0.15) + (0.2 - 0.25)) / 2)  # -0.05
    assert metrics.forgetting_per_task(R) == pytest.approx([0.9 - 0.7, 0.95 - 0.9])
    assert metrics.forgetting(R) == pytest.approx(0.125)
    s = metrics.summarize(R, b)
    assert s == pytest.approx({"acc": 0.8166666666666667, "bwt": -0.125, "fwt": -0.05, "forgetting": 0.125})


def test_forgetting_uses_the_best_earlier_accuracy_bwt_the_diagonal():
    # task 0 improved after task 1 (0.8 -> 0.9), then dropped to 0.85: BWT sees +0.05, forgetting sees 0.05
    R = [[0.8, NAN, NAN],
         [0.9, 0.7, NAN],
         [0.85, 0.7, 0.6]]
    assert metrics.backward_transfer(R) == pytest.approx((0.05 + 0.0) / 2)
    assert metrics.forgetting_per_task(R) == pytest.approx([0.05, 0.0])
    assert metrics.forgetting(R) == pytest.approx(0.025)


def test_no_forgetting_is_exactly_zero():
    R = np.array([[0.97, 0.5, NAN], [0.97, 0.91, 0.4], [0.97, 0.91, 0.99]])
    assert metrics.backward_transfer(R) == 0.0
    assert metrics.forgetting(R) == 0.0


def test_nan_where_needed_propagates_and_single_task_is_undefined():
    R = [[0.9, NAN], [0.8, 0.7]]
    assert math.isnan(metrics.forward_transfer(R, [0.5, 0.5]))  # R[0][1] was not measured
    assert metrics.backward_transfer(R) == pytest.approx(-0.1)
    one = [[0.9]]
    assert metrics.average_accuracy(one) == pytest.approx(0.9)
    assert math.isnan(metrics.backward_transfer(one))
    assert math.isnan(metrics.forgetting(one))
    assert math.isnan(metrics.forward_transfer(one, [0.1]))


def test_bad_shapes_are_errors():
    with pytest.raises(ValueError, match="square"):
        metrics.as_matrix([[0.1, 0.2]])
    with pytest.raises(ValueError, match=r"square T x T, got rows of lengths \[1, 2\] \(pad .* with None\)"):
        metrics.as_matrix([[0.9], [0.8, 0.7]])  # lower-triangular without padding
    assert metrics.forgetting([[0.5, 0.4], [0.9, 0.8]]) == pytest.approx(-0.4)  # a task that improved: negative
    with pytest.raises(ValueError, match="one accuracy per task"):
        metrics.forward_transfer([[0.1, 0.2], [0.3, 0.4]], [0.5])


def test_to_jsonable_turns_nan_into_null():
    out = metrics.to_jsonable({"R": np.array([[0.5, NAN]]), "x": np.float32(0.25), "n": np.int64(3), "t": (1, NAN)})
    assert out == {"R": [[0.5, None]], "x": 0.25, "n": 3, "t": [1, None]}
