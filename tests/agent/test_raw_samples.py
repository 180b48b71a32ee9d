"""Raw samples as `sample` events: what a PLC hands over becomes a storable event."""

from __future__ import annotations

from datetime import UTC, datetime

from agent.raw_samples import RawSamplePublisher
from connectors.sample import Sample
from oee.events import SampleEvent, dump_events, load_events

T0 = datetime(2026, 1, 5, 6, 0, tzinfo=UTC)


def test_plc_strings_are_cleaned_and_numbers_out_of_bounds_kept_as_text() -> None:
    publisher = RawSamplePublisher(agent_id="a", site_id="s")
    values: list[bool | int | float | str | None] = [
        "jam\x00\x07" + "x" * 400,
        2**64 - 1,
        float("nan"),
        7,
    ]
    events = [
        publisher.feed(Sample("press-1", signal, value, T0))
        for signal, value in zip(
            ("reason", "total_count", "state", "scrap_count"), values, strict=True
        )
    ]
    assert all(isinstance(e, SampleEvent) for e in events)
    shipped = [e for e in events if e is not None]
    assert load_events(dump_events(shipped)) == shipped  # every one is storable
    assert [e.value for e in shipped] == ["jam" + "x" * 197, str(2**64 - 1), "nan", 7]
