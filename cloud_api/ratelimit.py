"""Rate limits per token or API key: a token bucket per credential, sized by the caller's role.

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

import structlog

from cloud_api.config import RateTier

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


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit: int  # requests per hour
    burst: int
    remaining: int
    retry_after: int  # seconds until one request is allowed again (0 when allowed)
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


def _decide(allowed: bool, tokens: float, tier: RateTier, store: str) -> Decision:
    rate = tier.per_hour / 3600.0
    return Decision(
        allowed=allowed,
        limit=tier.per_hour,
        burst=tier.burst,
        remaining=max(0, math.floor(tokens)),
        retry_after=0 if allowed else max(1, math.ceil((1.0 - tokens) / rate)),
        reset=max(0, math.ceil((tier.burst - tokens) / rate)),
        store=store,
    )


class LocalBuckets:
    """Token buckets in this process (one event loop: no lock needed between awaits)."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str, tier: RateTier, now: float) -> Decision:
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

    async def check(self, key: str, tier: RateTier) -> Decision:
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
