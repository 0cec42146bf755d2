"""The bucket rule the optimizer and the simulator share."""
from __future__ import annotations

import pytest

from kfacperf.buckets import bucket_label, plan_buckets


def test_a_bucket_closes_with_the_item_that_makes_it_reach_the_cap() -> None:
    items = [("a", 4), ("b", 4), ("c", 4), ("d", 6), ("e", 25), ("f", 1), ("g", 9)]
    assert plan_buckets(items, 10) == [["a", "b", "c"], ["d", "e"], ["f", "g"]]
    assert plan_buckets(items[:1], 10) == [["a"]]  # the last may be short


def test_cap_zero_is_one_item_a_bucket_and_every_item_lands_once_in_order() -> None:
    items = [(k, n) for k, n in zip("abcde", (3, 0, 7, 1, 2))]
    assert plan_buckets(items, 0) == [[k] for k in "abcde"]
    for cap in (1, 5, 8, 100):
        flat = [k for b in plan_buckets(items, cap) for k in b]
        assert flat == list("abcde")
    assert plan_buckets([], 10) == []


def test_a_negative_cap_is_refused() -> None:
    with pytest.raises(ValueError, match="cap_bytes must be >= 0"):
        plan_buckets([("a", 1)], -1)


def test_a_label_names_each_layer_once_in_order() -> None:
    assert bucket_label(["fc", "conv1", "fc"]) == "fc+conv1"
