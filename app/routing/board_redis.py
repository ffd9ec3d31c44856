"""The board in Redis: shared by every instance pointed at one server.

One hash per provider under ``SHARED_STATE_PREFIX`` (``mana-llm:provider:ollama``),
each with a TTL an hour past its last deadline, so nothing outlives its
use. A change is an optimistic transaction (WATCH, read, apply the
transition, MULTI/EXEC), retried a few times if another worker wrote the
same key meanwhile. Short socket timeouts and no client retries: a slow
or dead Redis costs one call at most ``timeout`` seconds, after which the
board's own breaker (``GuardedBoard``) skips it.
"""

import dataclasses
import time

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from app.routing.board import BoardBusy, BoardUnavailable, Slate

# Each lost race means another writer won, so N racing writers all land within N.
ATTEMPTS = 16
# Take a slot: drop expired leases, count the live ones, add ours below the cap. The key
# lives as long as its longest lease could (twice the TTL: hosts' clocks differ a little).
ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""
_FLOATS = {f.name for f in dataclasses.fields(Slate) if f.type in (float, "float")}


class RedisBoard:
    """A board in Redis hashes, one per provider."""

    name = "redis"

    def __init__(self, url, prefix, *, timeout=0.1, wall=time.time):
        self.prefix = prefix
        self._wall = wall
        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0), decode_responses=True)
        self._acquire = self._client.register_script(ACQUIRE)

    def key(self, provider):
        return f"{self.prefix}provider:{provider}"

    def read(self, providers):
        names = list(providers)
        with self._guard():
            pipe = self._client.pipeline(transaction=False)
            for name in names:
                pipe.hgetall(self.key(name))
            found = pipe.execute()
        return {name: _decode(fields) for name, fields in zip(names, found) if fields}

    def update(self, provider, change):
        key = self.key(provider)
        with self._guard(), self._client.pipeline() as pipe:
            for _ in range(ATTEMPTS):
                try:
                    return self._change(pipe, key, change)
                except redis.WatchError:
                    continue
        raise BoardBusy(f"redis: {key} kept changing under {ATTEMPTS} attempts")

    def _change(self, pipe, key, change):
        pipe.watch(key)
        fields = pipe.hgetall(key)
        old = _decode(fields) if fields else Slate()
        new = change(old)
        if new == old:
            pipe.unwatch()
            return new
        ttl_ms = int((new.keep_until() - self._wall()) * 1000)
        pipe.multi()
        pipe.delete(key)
        if new != Slate() and ttl_ms > 0:
            pipe.hset(key, mapping=_encode(new))
            pipe.pexpire(key, ttl_ms)
        pipe.execute()
        return new

    def add(self, counts):
        """Add to each counter in one round trip; return ``{key: new value}``."""
        keys = list(counts)
        with self._guard():
            pipe = self._client.pipeline(transaction=True)
            for key in keys:
                amount, until = counts[key]
                pipe.incrby(f"{self.prefix}count:{key}", amount)
                # Every key dies with its window (and a little after).
                pipe.expireat(f"{self.prefix}count:{key}", int(until) + 1)
            found = pipe.execute()
        return {key: int(found[2 * i]) for i, key in enumerate(keys)}
    # --- capacity slots (app.routing.capacity): a sorted set per provider, scored by expiry ---

    def slots_key(self, provider):
        return f"{self.prefix}slots:{provider}"

    def acquire_slot(self, provider, cap, token, owner, *, now, ttl):
        """Take a slot if fewer than ``cap`` live leases are out: one Lua script, one trip."""
        with self._guard():
            return bool(self._acquire(keys=[self.slots_key(provider)],
                                      args=[repr(now), cap, repr(now + ttl), token,
                                            int(ttl * 2000)]))

    def release_slot(self, provider, token):
        with self._guard():
            self._client.zrem(self.slots_key(provider), token)

    def refresh_slots(self, tokens, *, now, ttl):
        """Extend the leases still held; XX never brings back one that expired."""
        with self._guard():
            pipe = self._client.pipeline(transaction=False)
            for provider, held in tokens.items():
                if held:
                    key = self.slots_key(provider)
                    pipe.zadd(key, {token: now + ttl for token in held}, xx=True)
                    pipe.pexpire(key, int(ttl * 2000))
            pipe.execute()

    def count_slots(self, providers, *, now):
        names = list(providers)
        with self._guard():
            pipe = self._client.pipeline(transaction=False)
            for name in names:
                pipe.zcount(self.slots_key(name), f"({now!r}", "+inf")
            counts = pipe.execute()
        return dict(zip(names, counts))

    def check(self):
        """Raise BoardUnavailable unless Redis answers now."""
        with self._guard():
            self._client.ping()

    def close(self):
        self._client.close()

    def _guard(self):
        return _Translate()


class _Translate:
    """Turn redis-py's errors (and socket errors) into BoardUnavailable."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if kind is not None and issubclass(kind, (redis.RedisError, OSError)):
            raise BoardUnavailable(f"redis: {exc}") from None
        return False


def _encode(slate):
    values = dataclasses.asdict(slate)
    values["tripped"] = int(slate.tripped)
    values["probe_spent"] = int(slate.probe_spent)
    return {k: v if isinstance(v, str) else repr(v) for k, v in values.items()}


def _decode(fields):
    values = {}
    for field in dataclasses.fields(Slate):
        raw = fields.get(field.name)
        if raw is None:
            continue
        if field.name in ("tripped", "probe_spent"):
            values[field.name] = raw not in ("0", "", "False")
        elif field.name == "failures":
            values[field.name] = int(float(raw))
        elif field.name in _FLOATS:
            values[field.name] = float(raw)
        else:
            values[field.name] = raw
    return Slate(**values)
