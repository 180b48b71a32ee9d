"""Rate limits per token or API key: a token bucket per credential, sized by the caller's role;
and `FailureThrottle`, a token bucket of failed authentications per client address.

A bucket holds up to `burst` requests and refills at `per_hour / 3600` per second, so a
dashboard may fire its panel queries at once and then settles at the hourly rate. Buckets live
in process by default; with a Redis URL they live in Redis (one atomic script per request) so
API replicas share them. When Redis cannot be reached the limiter keeps limiting with its
in-process buckets and tries Redis again after a pause; the switch is logged once each way.

The clock is passed in (wall-clock seconds), so replicas agree on refill time within their
clock skew, and tests can advance time without sleeping.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import structlog
from cachetools import LRUCache

from cloud_api import metrics
from cloud_api.config import FailureLimit

log = structlog.get_logger("cloud_api.ratelimit")

Clock = Callable[[], float]
_MAX_LOCAL_BUCKETS = 100_000
_REDIS_RETRY_S = 5.0

# KEYS[1] bucket; ARGV: refill per second, burst, now (s), cost. Returns {allowed, tokens}.
# Tokens go back as a string: Redis truncates Lua numbers to integers in replies.
_SCRIPT = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
local state = redis.call('HMGET', KEYS[1], 't', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = burst
  ts = now
end
if now > ts then
  tokens = math.min(burst, tokens + (now - ts) * rate)
  ts = now
end
local allowed = 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
end
redis.call('HSET', KEYS[1], 't', tostring(tokens), 'ts', tostring(ts))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 60)
return {allowed, tostring(tokens)}
"""


class Tier(Protocol):
    """A bucket's size: `burst` requests at once, refilled by `per_hour`."""

    @property
    def per_hour(self) -> int: ...
    @property
    def burst(self) -> int: ...


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit: int  # requests per hour
    burst: int
    remaining: int
    retry_after: int  # seconds until the bucket holds one request again (0: it does now)
    reset: int  # seconds until the bucket is full again
    store: str

    def headers(self, policy: str) -> dict[str, str]:
        """RateLimit-Policy / RateLimit (IETF httpapi draft), plus Retry-After when refused."""
        out = {
            "RateLimit-Policy": f'"{policy}";q={self.limit};w=3600;burst={self.burst}',
            "RateLimit": f'"{policy}";r={self.remaining};t={self.reset}',
        }
        if not self.allowed:
            out["Retry-After"] = str(self.retry_after)
        return out


def _decide(allowed: bool, tokens: float, tier: Tier, store: str) -> Decision:
    rate = tier.per_hour / 3600.0
    return Decision(
        allowed=allowed,
        limit=tier.per_hour,
        burst=tier.burst,
        remaining=max(0, math.floor(tokens)),
        retry_after=0 if tokens >= 1.0 else max(1, math.ceil((1.0 - tokens) / rate)),
        reset=max(0, math.ceil((tier.burst - tokens) / rate)),
        store=store,
    )


class LocalBuckets:
    """Token buckets in this process (one event loop: no lock needed between awaits)."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str, tier: Tier, now: float) -> Decision:
        rate = tier.per_hour / 3600.0
        tokens, ts = self._buckets.get(key, (float(tier.burst), now))
        if now > ts:
            tokens = min(float(tier.burst), tokens + (now - ts) * rate)
            ts = now
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        if len(self._buckets) >= _MAX_LOCAL_BUCKETS and key not in self._buckets:
            self._evict(now)
        self._buckets[key] = (tokens, ts)
        return _decide(allowed, tokens, tier, "local")

    def _evict(self, now: float) -> None:
        # Drop the oldest half; a dropped bucket restarts full, which only errs towards allowing.
        by_age = sorted(self._buckets, key=lambda k: self._buckets[k][1])
        for key in by_age[: len(by_age) // 2]:
            del self._buckets[key]


class RateLimiter:
    """`await check(key, tier)`: one request against the bucket of `key`."""

    def __init__(
        self,
        *,
        redis_url: str | None = None,
        prefix: str = "fgw:ratelimit:",
        clock: Clock = time.time,
    ) -> None:
        self.clock = clock
        self.prefix = prefix
        self.local = LocalBuckets()
        self._redis = None
        self._script = None
        self._redis_down_until = 0.0
        self._redis_down = False
        if redis_url:
            import redis.asyncio as aioredis

            # Short timeouts: a slow Redis must not slow every request down.
            self._redis = aioredis.Redis.from_url(
                redis_url, socket_connect_timeout=0.25, socket_timeout=0.25
            )
            self._script = self._redis.register_script(_SCRIPT)

    @property
    def using_redis(self) -> bool:
        return self._redis is not None and not self._redis_down

    async def check(self, key: str, tier: Tier) -> Decision:
        now = self.clock()
        if self._script is not None and time.monotonic() >= self._redis_down_until:
            from redis.exceptions import RedisError

            try:
                allowed, tokens = await self._script(
                    keys=[self.prefix + key],
                    args=[tier.per_hour / 3600.0, tier.burst, now, 1],
                )
            except (RedisError, OSError) as exc:
                self._redis_down_until = time.monotonic() + _REDIS_RETRY_S
                if not self._redis_down:
                    self._redis_down = True
                    log.warning(
                        "redis unavailable, rate limits are per process until it returns",
                        error=type(exc).__name__,
                    )
            else:
                if self._redis_down:
                    self._redis_down = False
                    log.info("redis reachable again, rate limits are shared")
                return _decide(bool(int(allowed)), float(tokens), tier, "redis")
        return self.local.take(key, tier, now)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()


class RefusalLog:
    """Refused authentications, logged in a bounded way.

    Per client address and period: the first refusal at once (with its reason), and at the end
    of the period one line with the count when there were more. Beyond `max_addresses` in one
    period the rest are only counted, in one line. A flood thus costs at most about
    2 x `max_addresses` + 1 lines per period, however many requests it sends.
    """

    def __init__(
        self, every_s: float, max_addresses: int = 1000, clock: Clock = time.monotonic
    ) -> None:
        self.every_s = every_s
        self.max_addresses = max_addresses
        self.clock = clock
        self._counts: dict[str, tuple[int, str]] = {}
        self._others = 0
        self._since = clock()

    def note(self, address: str, reason: str) -> None:
        self.flush_due()
        count, _ = self._counts.get(address, (0, ""))
        if count == 0:
            if len(self._counts) >= self.max_addresses:
                self._others += 1
                return
            log.warning("authentication refused", client=address, reason=reason)
        self._counts[address] = (count + 1, reason)

    def flush_due(self) -> None:
        if self.clock() - self._since >= self.every_s:
            self.flush()

    def flush(self) -> None:
        period = round(self.clock() - self._since)
        for address, (count, reason) in self._counts.items():
            if count > 1:
                log.warning(
                    "authentication refusals",
                    client=address,
                    count=count,
                    last_reason=reason,
                    period_s=period,
                )
        if self._others:
            log.warning(
                "authentication refusals from further addresses",
                count=self._others,
                period_s=period,
            )
        self._counts.clear()
        self._others = 0
        self._since = self.clock()


class FailureThrottle:
    """Failed authentications per client address: counted, logged, and limited.

    Each failure takes one from the address's bucket (`FailureLimit`), which lives where the
    rate limiter keeps its buckets: in Redis when configured, so every worker charges the same
    bucket. Whether an address may try at all is answered from memory: an address whose
    bucket ran empty is remembered as blocked until it holds one failure again, so a blocked
    address costs no key lookup, no signature check and no Redis round trip. Another worker
    learns of the block on its own next failure from that address, so N workers let at most
    N - 1 attempts more through per refill than one process would.
    """

    PREFIX = "authfail:"

    def __init__(self, limiter: RateLimiter, limit: FailureLimit) -> None:
        self.limiter = limiter
        self.limit = limit
        self.log = RefusalLog(limit.log_every_seconds)
        self._blocked: LRUCache[str, float] = LRUCache(_MAX_LOCAL_BUCKETS)

    def blocked(self, address: str) -> int:
        """Seconds until `address` may try again (0: it may now); counts a refusal if not."""
        until = self._blocked.get(address)
        if until is None:
            return 0
        left = until - time.monotonic()
        if left <= 0:
            self._blocked.pop(address, None)
            return 0
        metrics.AUTH_THROTTLED.inc()
        self.log.note(address, "throttled after repeated failures")
        return max(1, math.ceil(left))

    async def failed(self, address: str, credential: str, reason: str) -> None:
        """Charge one failed authentication of `credential` kind to `address`."""
        metrics.AUTH_FAILURES.labels(credential).inc()
        self.log.note(address, reason)
        decision = await self.limiter.check(self.PREFIX + address, self.limit)
        if decision.retry_after:
            self._blocked[address] = time.monotonic() + decision.retry_after
