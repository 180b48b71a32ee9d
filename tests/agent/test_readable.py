"""The one place sizes, durations, ages, rates and machine order are put in human terms."""

from __future__ import annotations

from agent import readable


def test_sizes_in_binary_units() -> None:
    assert readable.size(None) == "-"
    assert readable.size(0) == "0 B"
    assert readable.size(1023) == "1023 B"
    assert readable.size(1536) == "1.5 KiB"
    assert readable.size(2 * 1024**3) == "2.0 GiB"
    assert readable.size(3 * 1024**4) == "3.0 TiB"


def test_durations_and_ages() -> None:
    assert readable.duration(None) == "-"
    assert readable.duration(0.42) == "0.4 s"
    assert readable.duration(45) == "45 s"
    assert readable.duration(12 * 60 + 5) == "12 min"
    assert readable.duration(3 * 3600 + 5 * 60) == "3 h 5 min"
    assert readable.duration(2 * 86400 + 4 * 3600) == "2 d 4 h"
    assert readable.age(90) == "90 s ago"
    assert readable.age(None, none="none (all acked)") == "none (all acked)"


def test_rates_counts_and_percentages() -> None:
    assert readable.rate(None) == "-"
    assert readable.rate(0.0) == "0/s"
    assert readable.rate(412.3) == "412/s"
    assert readable.rate(3.46) == "3.5/s"
    assert readable.rate(0.2) == "0.20/s"
    assert readable.rate(2.0, "batches") == "2.0 batches/s"
    assert readable.count(2147483648) == "2 147 483 648"
    assert readable.percent(0.8512) == "85.1 %"


def test_machines_in_natural_order() -> None:
    names = ["press-10", "press-2", "Press-1", "press-100", "welder-1", "press-2a"]
    assert readable.natural_sorted(names) == [
        "Press-1", "press-2", "press-2a", "press-10", "press-100", "welder-1"
    ]  # fmt: skip
