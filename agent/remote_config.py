"""Configuration pushed by the cloud: accept or refuse it, apply it, keep it or go back.

With `config.source: cloud` the agent listens on its config topic (the uplink's connection).
A message is taken only when it is signed by a cloud ack key the agent trusts, names this
agent, and is newer than what runs: its publication serial above every one taken before, and
its version above the running one unless it is a signed rollback naming that version. The
YAML is validated exactly as `edge-agent validate` does (and as a SIGHUP reload checks it);
identity (agent id, site, state folder) and `config.source` must stay. The service then
swaps the pipeline as on SIGHUP and watches health for `config.settle` (every connection up,
the uplink connected, every pipeline stage alive); a version that fails is replaced by the
last good one. Each outcome (`applied`, `rejected` with the YAML path and line of each
problem, `rolled_back` with why, `refused` with why) becomes an `agent` event with code
`config_result`, sealed and signed through the outbox like every other event.

State folder `remote-config/` (files 0600, written to a temporary file, fsynced, renamed):

    applied.json   the signed message of the version that runs (the last good one); the agent
                   starts from it after a restart, with or without a broker
    attempt.json   the last publication taken: serial, version, digest and its result
                   ("trying" while it is applied: found at start, the apply was interrupted
                   and the last good version runs)

With `config.source: local` (the default) pushes are ignored, logged once; the file rules.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import structlog

from agent.config import AgentConfig, ConfigError, Problem
from agent.configcheck import parse_config_apart
from common.keydir import write_atomic
from oee.events import AgentEvent, Event
from sync.config_message import ConfigBody, ConfigMessageError, verify_config
from sync.keys import AgentKeys

log = structlog.get_logger("agent.remote_config")

RESULT_CODE = "config_result"
FOLDER = "remote-config"
# How often the settle check looks at the pipeline.
SETTLE_POLL_S = 0.2


@runtime_checkable
class ReportingRuntime(Protocol):
    """What this module needs from a running `AgentRuntime`."""

    pending: list[Event]


class _Uplink(Protocol):
    on_config: Callable[[bytes], None] | None


class _Hub(Protocol):
    @property
    def connected(self) -> bool: ...


@dataclass(frozen=True)
class Candidate:
    """A verified, validated pushed configuration, ready to be applied."""

    body: ConfigBody
    raw: bytes
    config: AgentConfig
    keys: AgentKeys


def write_private(path: Path, data: bytes) -> None:
    """Atomically replace `path` (mode 0600): temporary file, fsync, rename, fsync folder."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomic(path, data, mode=0o600, overwrite=True)


def _problem_dicts(problems: list[Problem]) -> list[dict[str, Any]]:
    return [{"path": p.path, "line": p.line, "reason": p.reason} for p in problems]


def identity_problems(candidate: AgentConfig, local: AgentConfig) -> list[Problem]:
    """What a pushed file may not change: who the agent is, where its state lives, and that
    the cloud stays its configuration source (else the next push could not reach it)."""
    problems = []
    for path, new, old in (
        ("agent.id", candidate.agent.id, local.agent.id),
        ("agent.site", candidate.agent.site, local.agent.site),
        ("agent.state_dir", str(candidate.agent.state_dir), str(local.agent.state_dir)),
        ("config.source", candidate.config.source, "cloud"),
    ):
        if new != old:
            problems.append(
                Problem(path, None, f"must stay {old!r} in a pushed configuration, not {new!r}")
            )
    return problems


class RemoteConfig:
    """Decisions and state of pushed configurations for one agent (see the module doc)."""

    def __init__(
        self,
        local: AgentConfig,
        keys: AgentKeys,
        *,
        check: Callable[[AgentConfig, str], AgentKeys],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.local = local
        self.keys = keys
        self.check = check
        self.clock = clock
        self.folder = local.agent.state_dir / FOLDER
        self.enabled = local.config.source == "cloud"
        self.wake = asyncio.Event()
        self.running_version = 0  # 0: the local file
        self._candidate: Candidate | None = None
        self._reports: list[Event] = []
        self._runtime: ReportingRuntime | None = None
        # The last payload handled: the broker delivers the retained message again on every
        # reconnect and to every new pipeline; an older one sent again is still reported.
        self._last_payload = ""
        self._ignored_logged = False
        self.log = log.bind(agent=local.agent.id, site=local.agent.site)

    # -- files ----------------------------------------------------------------------------

    @property
    def applied_path(self) -> Path:
        return self.folder / "applied.json"

    @property
    def attempt_path(self) -> Path:
        return self.folder / "attempt.json"

    def _read_attempt(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.attempt_path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            self.log.error("remote configuration attempt file unreadable", problem=str(exc))
            return None
        return data if isinstance(data, dict) else None

    def _write_attempt(self, body: ConfigBody, result: str) -> None:
        record = {
            "serial": body.serial,
            "version": body.version,
            "digest": body.digest,
            "result": result,
        }
        write_private(self.attempt_path, json.dumps(record, sort_keys=True).encode())

    def _load_applied(self) -> Candidate | None:
        """The stored last good version, verified again (the file could have been altered)."""
        try:
            raw = self.applied_path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return self._candidate_from(raw, verify_config(raw, **self._verify_args()))
        except (OSError, ConfigMessageError, ConfigError) as exc:
            self.log.error(
                "stored remote configuration not usable; running the local file",
                path=str(self.applied_path),
                problem=str(exc).splitlines()[0],
            )
            return None

    def _verify_args(self) -> dict[str, Any]:
        return {"verify_keys": self.keys.ack_verify_keys, "agent_id": self.local.agent.id}

    def _candidate_from(self, raw: bytes, body: ConfigBody) -> Candidate:
        """Raises ConfigError with each problem (YAML path and line) when the text is unusable."""
        source = f"cloud configuration version {body.version}"
        config = parse_config_apart(body.yaml, source)
        problems = identity_problems(config, self.local)
        if problems:
            from agent.config import format_problems

            raise ConfigError(format_problems(source, problems), problems)
        keys = self.check(config, source)
        return Candidate(body, raw, config, keys)

    def _last_serial(self) -> int:
        serials = [0]
        attempt = self._read_attempt()
        if attempt is not None and isinstance(attempt.get("serial"), int):
            serials.append(attempt["serial"])
        return max(serials)

    # -- start ----------------------------------------------------------------------------

    def startup(self) -> tuple[AgentConfig, AgentKeys] | None:
        """The stored version to start from (None: the local file), after settling an apply
        that a stop or a crash interrupted."""
        if not self.enabled:
            return None
        applied = self._load_applied()
        if applied is not None:
            self.running_version = applied.body.version
        attempt = self._read_attempt()
        if attempt is not None and attempt.get("result") == "trying":
            version = attempt.get("version")
            if applied is not None and applied.body.serial == attempt.get("serial"):
                # It had passed its settle check and was stored; only the record lagged.
                self._finish_attempt(applied.body, "applied", "")
            else:
                why = (
                    f"the agent stopped while applying version {version}; it started again "
                    f"with the last good configuration"
                )
                self.log.error("remote configuration apply interrupted", version=version)
                self._write_attempt_record(attempt, "rolled_back")
                self._report(
                    "rolled_back",
                    version=version if isinstance(version, int) else None,
                    serial=attempt.get("serial"),
                    digest=attempt.get("digest"),
                    reason=why,
                )
        if applied is None:
            return None
        self.log.info(
            "starting from the configuration the cloud pushed", version=self.running_version
        )
        return applied.config, applied.keys

    def _write_attempt_record(self, attempt: dict[str, Any], result: str) -> None:
        write_private(
            self.attempt_path, json.dumps({**attempt, "result": result}, sort_keys=True).encode()
        )

    def effective(self, config: AgentConfig, keys: AgentKeys) -> tuple[AgentConfig, AgentKeys]:
        """On SIGHUP: with source cloud, the version the cloud pushed keeps running."""
        self.enabled = config.config.source == "cloud"
        if not self.enabled:
            self.running_version = 0
            return config, keys
        applied = self._load_applied()
        if applied is None:
            return config, keys
        return applied.config, applied.keys

    # -- events ---------------------------------------------------------------------------

    def attach(self, runtime: object) -> None:
        """A new pipeline runs: listen on its uplink and hand it the reports not sent yet."""
        self._runtime = runtime if isinstance(runtime, ReportingRuntime) else None
        uplink: _Uplink | None = getattr(runtime, "uplink", None)
        if uplink is not None:
            uplink.on_config = self.receive
        self._deliver()

    def _deliver(self) -> None:
        if self._runtime is not None and self._reports:
            self._runtime.pending.extend(self._reports)
            self._reports = []

    def _report(self, result: str, *, reason: str = "", later: bool = False, **data: Any) -> None:
        """Queue an outcome for the running pipeline (`later`: for the next one to start)."""
        self.log.info("remote configuration " + result.replace("_", " "), reason=reason, **data)
        self._reports.append(
            AgentEvent(
                agent_id=self.local.agent.id,
                site_id=self.local.agent.site,
                ts=self.clock(),
                code=RESULT_CODE,
                message=f"configuration {result.replace('_', ' ')}"
                + (f": {reason}" if reason else ""),
                data={
                    "result": result,
                    "running_version": self.running_version,
                    "reason": reason,
                    **data,
                },
            )
        )
        if not later:
            self._deliver()

    # -- receiving ------------------------------------------------------------------------

    def receive(self, payload: bytes) -> None:
        """A message on the config topic (event loop). Refusals are reported; a usable
        configuration becomes the candidate and wakes the service."""
        if not payload:
            return  # the retained message was cleared
        if not self.enabled:
            if not self._ignored_logged:
                self.log.warning(
                    "configuration pushed by the cloud ignored: config.source is local"
                )
                self._ignored_logged = True
            return
        fingerprint = hashlib.sha256(payload).hexdigest()
        if fingerprint == self._last_payload:
            return
        self._last_payload = fingerprint
        try:
            body = verify_config(payload, **self._verify_args())
        except ConfigMessageError as exc:
            self._report("refused", reason=f"{exc.reason}: {exc.detail}".rstrip(": "))
            return
        ids: dict[str, Any] = {
            "version": body.version,
            "serial": body.serial,
            "digest": body.digest,
        }
        attempt = self._read_attempt()
        if attempt is not None and (attempt.get("serial"), attempt.get("digest")) == (
            body.serial,
            body.digest,
        ):
            return  # handled before this start already
        if body.serial <= self._last_serial():
            self._report(
                "refused",
                reason=f"replayed: publication {body.serial} is not newer than "
                f"{self._last_serial()}",
                **ids,
            )
            return
        if body.rollback is None and body.version <= self.running_version:
            self._report(
                "refused",
                reason=f"version {body.version} is not newer than the running version "
                f"{self.running_version} and is not a rollback",
                **ids,
            )
            return
        try:
            candidate = self._candidate_from(payload, body)
        except ConfigError as exc:
            self._write_attempt(body, "rejected")
            problems = exc.problems or [Problem("(file)", None, str(exc))]
            self._report(
                "rejected",
                reason=f"{len(problems)} problem(s) in version {body.version}",
                problems=_problem_dicts(problems),
                **ids,
            )
            return
        self._candidate = candidate
        self.wake.set()

    def take(self) -> Candidate | None:
        candidate, self._candidate = self._candidate, None
        self.wake.clear()
        return candidate

    def refuse_candidate(self, candidate: Candidate, reason: str) -> None:
        """The service could not apply a validated candidate (e.g. its health port)."""
        self._write_attempt(candidate.body, "rejected")
        self._report(
            "rejected",
            reason=reason,
            problems=[{"path": "health.port", "line": None, "reason": reason}],
            version=candidate.body.version,
            serial=candidate.body.serial,
            digest=candidate.body.digest,
        )

    # -- applying -------------------------------------------------------------------------

    def begin(self, candidate: Candidate) -> None:
        """Recorded before the pipeline is touched: a crash from here on is found at start."""
        self._write_attempt(candidate.body, "trying")

    async def settle(
        self,
        candidate: Candidate,
        runtime: object,
        task: asyncio.Task[None],
        pipeline_problem: Callable[[], str | None],
        stop: asyncio.Event,
    ) -> str | None:
        """Watch the new pipeline for the candidate's `config.settle`; why it is not healthy,
        or None.

        Healthy: every stage alive, and at the end every connection to a PLC up and the
        uplink connected to the broker. Returns None early only on a stop request."""
        loop = asyncio.get_running_loop()
        settle_s = candidate.config.config.settle
        deadline = loop.time() + settle_s
        while loop.time() < deadline:
            if stop.is_set():
                return None
            if task.done():
                exc = task.exception() if not task.cancelled() else None
                return f"the pipeline stopped: {exc!r}"
            await asyncio.sleep(SETTLE_POLL_S)
        problem = pipeline_problem()
        if problem is not None:
            return problem
        hubs: list[Any] = list(getattr(runtime, "hubs", []))
        down = [hub.config.id for hub in hubs if not hub.connected]
        if down:
            return f"connection(s) {', '.join(down)} not up after {settle_s:g} s"
        uplink = getattr(runtime, "uplink", None)
        if uplink is not None and not uplink.stats.connected:
            return f"not connected to the MQTT broker after {settle_s:g} s"
        return None

    def _finish_attempt(
        self, body: ConfigBody, result: str, reason: str, *, later: bool = False
    ) -> None:
        self._write_attempt(body, result)
        ids: dict[str, Any] = {
            "version": body.version,
            "serial": body.serial,
            "digest": body.digest,
        }
        if body.rollback is not None:
            ids["rollback"] = body.rollback
        self._report(result, reason=reason, later=later, **ids)

    def applied(self, candidate: Candidate) -> None:
        # applied.json first: a crash before attempt.json is updated is recognised at start.
        write_private(self.applied_path, candidate.raw)
        self.running_version = candidate.body.version
        self._finish_attempt(candidate.body, "applied", "")

    def rolled_back(self, candidate: Candidate, why: str) -> None:
        """The previous configuration is started again; its pipeline commits the report (the
        failed one may have ended already)."""
        self._finish_attempt(candidate.body, "rolled_back", why, later=True)
