"""The response cache's store on the shared board: a SQLite file or Redis, bounded in bytes.

Each store keeps encoded entries with their expiry and a running total of
their bytes; a put that takes the total past the bound evicts the entries
that expire soonest (with one TTL for all, the oldest) until it fits, and
drops the expired ones on the way. A store has a connection of its own (a
put never holds up the board's health writes) and raises
``BoardUnavailable`` when it cannot answer, so a ``GuardedBoard`` in front
skips it while it is down.

- SQLite: a file of its own beside the board's (``<board file>.cache``), in
  the instance's runtime directory by default.
- Redis: one key per entry with its TTL (``<prefix>cache:<sha256>``) and a
  sorted set, a hash of sizes and a byte total, updated by one Lua script
  so a put is atomic and one round trip; the bookkeeping keys live as long
  as their last entry.
"""

import os
import time

from app.routing.board import (RUNTIME_DIR_VARIABLE, SQLITE_FILE, BoardUnavailable,
                               GuardedBoard, sqlite_path)
from app.routing.board_sqlite import SqliteFile

SUFFIX = ".cache"
EVICT_BATCH = 64

SCHEMA = ("CREATE TABLE IF NOT EXISTS cache (key TEXT PRIMARY KEY, value BLOB NOT NULL, "
          "size INTEGER NOT NULL, expires REAL NOT NULL)",
          "CREATE INDEX IF NOT EXISTS cache_expires ON cache (expires)",
          "CREATE TABLE IF NOT EXISTS cache_total (id INTEGER PRIMARY KEY CHECK (id = 1), "
          "bytes INTEGER NOT NULL)",
          # Recounted on every connect, so the total can never drift for long.
          "INSERT OR REPLACE INTO cache_total (id, bytes) "
          "VALUES (1, (SELECT COALESCE(SUM(size), 0) FROM cache))")


class SqliteCacheStore:
    """Cache entries in a SQLite file; one connection per process, used under a lock."""

    name = "sqlite"

    def __init__(self, path, *, timeout=0.1, wall=time.time):
        self.path = path
        self._wall = wall
        self._file = SqliteFile(path, SCHEMA, timeout=timeout)

    def get(self, key):
        """Return the entry kept under ``key`` (bytes), or None."""
        row = self._file.run(lambda db: db.execute(
            "SELECT value FROM cache WHERE key = ? AND expires > ?",
            (key, self._wall())).fetchone())
        return bytes(row[0]) if row else None

    def put(self, key, raw, expires, max_bytes):
        """Keep ``raw`` under ``key`` until ``expires``; evict to fit; return the total bytes."""
        def transaction(db):
            total = db.execute("SELECT bytes FROM cache_total WHERE id = 1").fetchone()[0]
            total -= _delete(db, "SELECT key, size FROM cache WHERE key = ?", (key,))
            total -= _delete(db, "SELECT key, size FROM cache WHERE expires <= ?",
                             (self._wall(),))
            db.execute("INSERT INTO cache (key, value, size, expires) VALUES (?, ?, ?, ?)",
                       (key, raw, len(raw), expires))
            total += len(raw)
            while total > max_bytes:
                freed = _delete(db, "SELECT key, size FROM cache ORDER BY expires LIMIT ?",
                                (EVICT_BATCH,))
                if not freed:
                    break
                total -= freed
            db.execute("UPDATE cache_total SET bytes = ? WHERE id = 1", (total,))
            return total

        return self._file.transaction(transaction)

    def check(self):
        """Raise BoardUnavailable unless the file can be read now."""
        self._file.run(lambda db: db.execute("SELECT bytes FROM cache_total").fetchone())

    def close(self):
        self._file.close()


def _delete(db, select, args):
    """Delete the rows ``select`` names; return their bytes."""
    rows = db.execute(select, args).fetchall()
    if rows:
        db.executemany("DELETE FROM cache WHERE key = ?", [(row[0],) for row in rows])
    return sum(row[1] for row in rows)


# Keys: 1 index (zset member -> expiry ms), 2 sizes (hash), 3 total bytes.
# Args: 1 entry key prefix, 2 member, 3 value, 4 expiry ms, 5 now ms, 6 max bytes.
PUT_SCRIPT = """
local index, sizes, total = KEYS[1], KEYS[2], KEYS[3]
local prefix, member, value = ARGV[1], ARGV[2], ARGV[3]
local expires, now, limit = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local function drop(m)
  local size = tonumber(redis.call('HGET', sizes, m) or 0) or 0
  redis.call('HDEL', sizes, m)
  redis.call('ZREM', index, m)
  redis.call('DEL', prefix .. m)
  redis.call('DECRBY', total, size)
end
drop(member)
for _, m in ipairs(redis.call('ZRANGEBYSCORE', index, '-inf', now, 'LIMIT', 0, 1000)) do
  drop(m)
end
if expires <= now then return tonumber(redis.call('GET', total) or 0) or 0 end
redis.call('SET', prefix .. member, value, 'PX', expires - now)
redis.call('ZADD', index, expires, member)
redis.call('HSET', sizes, member, #value)
local bytes = redis.call('INCRBY', total, #value)
while bytes > limit do
  local first = redis.call('ZRANGE', index, 0, 0)
  if #first == 0 then break end
  drop(first[1])
  bytes = tonumber(redis.call('GET', total) or 0) or 0
end
local last = redis.call('ZRANGE', index, -1, -1, 'WITHSCORES')
if last[2] then
  local keep = math.max(1, tonumber(last[2]) - now) + 60000
  for _, k in ipairs({index, sizes, total}) do redis.call('PEXPIRE', k, keep) end
end
return bytes
"""


class RedisCacheStore:
    """Cache entries in Redis, every key with a TTL, bounded by a byte total."""

    name = "redis"

    def __init__(self, url, prefix, *, timeout=0.1, wall=time.time):
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._errors = (redis.RedisError, OSError)
        self._wall = wall
        self.prefix = f"{prefix}cache:"
        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0))
        self._put = self._client.register_script(PUT_SCRIPT)

    def get(self, key):
        with self._translate():
            return self._client.get(self.prefix + "entry:" + key)

    def put(self, key, raw, expires, max_bytes):
        keys = [self.prefix + name for name in ("index", "sizes", "bytes")]
        args = [self.prefix + "entry:", key, raw, int(expires * 1000),
                int(self._wall() * 1000), max_bytes]
        with self._translate():
            return int(self._put(keys=keys, args=args))

    def check(self):
        with self._translate():
            self._client.ping()

    def close(self):
        self._client.close()

    def _translate(self):
        return _Translate(self._errors)


class _Translate:
    """Turn the client's errors into BoardUnavailable."""

    def __init__(self, kinds):
        self._kinds = kinds

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if kind is not None and issubclass(kind, self._kinds):
            raise BoardUnavailable(f"redis: {exc}") from None
        return False


def open_cache_store(config, environ=None):
    """Return the GuardedBoard over the cache store SHARED_STATE_URL names, or None."""
    environ = os.environ if environ is None else environ
    url = config.get("SHARED_STATE_URL", "")
    if url == "memory" or not config.get("CACHE_MAX_BYTES"):
        return None
    if url.startswith(("redis://", "rediss://")):
        return GuardedBoard(RedisCacheStore(url, config.get("SHARED_STATE_PREFIX", "mana-llm:")))
    if url.startswith("sqlite:"):
        return GuardedBoard(SqliteCacheStore(sqlite_path(url) + SUFFIX))
    directory = environ.get(RUNTIME_DIR_VARIABLE)
    if not directory:
        return None  # not under our gunicorn master: the worker's own LRU only
    return GuardedBoard(SqliteCacheStore(os.path.join(directory, SQLITE_FILE + SUFFIX)))
