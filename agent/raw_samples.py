"""Raw signal values as `sample` events, filtered by a deadband (optional, off by default).

Raw samples are the one sheddable kind of event: under `when_full: shed_samples` they are
dropped before any OEE, state or count data, and the loss is recorded.
"""

from __future__ import annotations

from dataclasses import dataclass

from connectors.sample import Sample
from oee.bounds import plc_value
from oee.events import SampleEvent


@dataclass
class _Last:
    value: object
    quality: str
    at: float  # POSIX seconds of the last published sample


class RawSamplePublisher:
    """Decides which samples become `sample` events: changes beyond the deadband, heartbeats."""

    def __init__(
        self,
        *,
        agent_id: str,
        site_id: str,
        deadband: float = 0.0,
        max_interval: float | None = None,
        signals: list[str] | None = None,
    ) -> None:
        self.agent_id = agent_id
        self.site_id = site_id
        self.deadband = deadband
        self.max_interval = max_interval
        self.signals = None if signals is None else set(signals)
        self._last: dict[tuple[str, str], _Last] = {}

    def _changed(self, last: _Last, sample: Sample) -> bool:
        if sample.quality != last.quality:
            return True
        new, old = sample.value, last.value
        numeric = (int, float)
        if (
            isinstance(new, numeric)
            and isinstance(old, numeric)
            and not isinstance(new, bool)
            and not isinstance(old, bool)
        ):
            return abs(float(new) - float(old)) > self.deadband
        return new != old

    def feed(self, sample: Sample) -> SampleEvent | None:
        if self.signals is not None and sample.signal not in self.signals:
            return None
        key = (sample.equipment_id, sample.signal)
        at = sample.ts.timestamp()
        last = self._last.get(key)
        due = (
            last is None
            or self._changed(last, sample)
            or (self.max_interval is not None and at - last.at >= self.max_interval)
        )
        if not due:
            return None
        self._last[key] = _Last(sample.value, sample.quality, at)
        return SampleEvent(
            agent_id=self.agent_id,
            site_id=self.site_id,
            equipment_id=sample.equipment_id,
            ts=sample.ts,
            signal=sample.signal,
            value=plc_value(sample.value),
            quality=sample.quality,
        )
