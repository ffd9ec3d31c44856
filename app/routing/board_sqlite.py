"""The board in one SQLite file: shared by the workers of one instance (the default).

The file lives in the runtime directory gunicorn's master made for this
instance (or wherever ``sqlite:///path`` says). WAL lets the background
syncs read while another worker writes; ``synchronous=OFF`` because the
board is runtime state that dies with the instance, so nothing is worth
an fsync. Every change is one ``BEGIN IMMEDIATE`` transaction: read the
slate, apply the transition, write it back. A busy or unwritable file
raises ``BoardUnavailable`` after at most ``timeout`` seconds.
"""

import dataclasses
import sqlite3
import threading
import time

from app.routing.board import BoardUnavailable, Slate

FIELDS = [f.name for f in dataclasses.fields(Slate)]
SCHEMA = ("CREATE TABLE IF NOT EXISTS slates (provider TEXT PRIMARY KEY, failures INTEGER, "
          "failures_until REAL, tripped INTEGER, tripped_until REAL, cooldown_until REAL, "
          "trial_until REAL, trial_owner TEXT, last_error TEXT, probe_spent INTEGER)")
HEARTBEAT = ("CREATE TABLE IF NOT EXISTS heartbeat (id INTEGER PRIMARY KEY CHECK (id = 1), "
             "beats INTEGER)")
COUNTERS = ("CREATE TABLE IF NOT EXISTS counters (key TEXT PRIMARY KEY, value INTEGER, "
            "expires REAL)")
SLOTS = ("CREATE TABLE IF NOT EXISTS slots (token TEXT PRIMARY KEY, provider TEXT, "
         "owner TEXT, expires REAL)")
SELECT = f"SELECT provider, {', '.join(FIELDS)} FROM slates"
UPSERT = (f"INSERT OR REPLACE INTO slates (provider, {', '.join(FIELDS)}) "
          f"VALUES ({', '.join('?' * (len(FIELDS) + 1))})")


class SqliteBoard:
    """A board in a SQLite file; one connection per process, used under a lock."""

    name = "sqlite"

    def __init__(self, path, *, timeout=0.1, wall=time.time):
        self.path = path
        self._wall = wall
        self._timeout = timeout
        self._lock = threading.Lock()
        self._connection = None

    def read(self, providers):
        wanted = set(providers)
        with self._lock:
            rows = self._run(lambda db: db.execute(SELECT).fetchall())
        return {row[0]: _slate(row[1:]) for row in rows if row[0] in wanted}

    def update(self, provider, change):
        def transaction(db):
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute(SELECT + " WHERE provider = ?", (provider,)).fetchone()
                old = _slate(row[1:]) if row else Slate()
                new = change(old)
                if new == Slate():
                    db.execute("DELETE FROM slates WHERE provider = ?", (provider,))
                elif new != old:
                    db.execute(UPSERT, (provider, *dataclasses.astuple(new)))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return new

        with self._lock:
            return self._run(transaction)

    def add(self, counts):
        """Add to each counter in one transaction; return ``{key: new value}``."""
        def transaction(db):
            db.execute("BEGIN IMMEDIATE")
            try:
                out = {}
                for key, (amount, until) in counts.items():
                    out[key] = db.execute(
                        "INSERT INTO counters (key, value, expires) VALUES (?, ?, ?) "
                        "ON CONFLICT (key) DO UPDATE SET value = value + excluded.value "
                        "RETURNING value", (key, amount, until)).fetchone()[0]
                if any(amount for amount, _ in counts.values()):
                    db.execute("DELETE FROM counters WHERE expires <= ?", (self._wall(),))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return out

        with self._lock:
            return self._run(transaction)

    # --- capacity slots (app.routing.capacity): one row per lease ---------------------------

    def acquire_slot(self, provider, cap, token, owner, *, now, ttl):
        """Take a slot if fewer than ``cap`` live leases are out: one IMMEDIATE transaction."""
        def transaction(db):
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("DELETE FROM slots WHERE provider = ? AND expires <= ?",
                           (provider, now))
                live, = db.execute("SELECT COUNT(*) FROM slots WHERE provider = ?",
                                   (provider,)).fetchone()
                taken = live < cap
                if taken:
                    db.execute("INSERT INTO slots VALUES (?, ?, ?, ?)",
                               (token, provider, owner, now + ttl))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return taken

        with self._lock:
            return self._run(transaction)

    def release_slot(self, provider, token):
        with self._lock:
            self._run(lambda db: db.execute("DELETE FROM slots WHERE token = ?", (token,)))

    def refresh_slots(self, tokens, *, now, ttl):
        held = [(now + ttl, token, now) for group in tokens.values() for token in group]
        with self._lock:
            self._run(lambda db: db.executemany(
                "UPDATE slots SET expires = ? WHERE token = ? AND expires > ?", held))

    def count_slots(self, providers, *, now):
        with self._lock:
            rows = self._run(lambda db: db.execute(
                "SELECT provider, COUNT(*) FROM slots WHERE expires > ? GROUP BY provider",
                (now,)).fetchall())
        found = dict(rows)
        return {name: found.get(name, 0) for name in providers}

    def check(self):
        """Raise BoardUnavailable unless the file can be written now."""
        with self._lock:
            self._run(lambda db: db.execute(
                "INSERT INTO heartbeat (id, beats) VALUES (1, 1) "
                "ON CONFLICT (id) DO UPDATE SET beats = beats + 1"))

    def close(self):
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    def _run(self, work):
        """Run ``work(connection)``, translating SQLite's errors into ours."""
        try:
            return work(self._connect())
        except sqlite3.Error as exc:
            # A broken connection is opened afresh on the next try.
            self._drop()
            raise BoardUnavailable(f"sqlite {self.path}: {exc}") from None

    def _connect(self):
        # Opened on first use, so it always belongs to the process using it (after fork).
        if self._connection is None:
            db = sqlite3.connect(self.path, timeout=self._timeout, isolation_level=None,
                                 check_same_thread=False)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=OFF")
                db.execute(SCHEMA)
                db.execute(HEARTBEAT)
                db.execute(COUNTERS)
                db.execute(SLOTS)
            except sqlite3.Error:
                db.close()
                raise
            self._connection = db
        return self._connection

    def _drop(self):
        if self._connection is not None:
            try:
                self._connection.close()
            except sqlite3.Error:
                pass
            self._connection = None


def _slate(values):
    slate = Slate(*values)
    return dataclasses.replace(slate, tripped=bool(slate.tripped),
                               probe_spent=bool(slate.probe_spent),
                               trial_owner=slate.trial_owner or "",
                               last_error=slate.last_error or "")
