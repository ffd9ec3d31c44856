"""Capacity caps: at most ``<PROVIDER>_MAX_CONCURRENCY`` calls in flight to a provider.

A call to a capped provider holds a slot from before it goes upstream
until it returns, or, for a stream, until the stream ends. Slots live on
the shared board, so a cap bounds every worker on it (all workers of an
instance with the SQLite board, every instance on one Redis). Each slot
is a lease: an owner (this worker's pid and a random token) and an
expiry that a background thread extends while the slot is held, so the
slots of a worker killed with ``-9`` come back within ``LEASE_TTL``.

When there is no board (``SHARED_STATE_URL=memory``, or a lone process)
or it does not answer, each worker counts its own slots against an equal
share of the cap (``cap // WEB_CONCURRENCY``, at least 1). A slot keeps
the place it was taken: one taken locally is given back locally, even if
the board came back meanwhile. An uncapped provider never touches the
board: its calls are only counted, for the in-flight gauge.
"""

import itertools
import logging
import os
import threading
import time
import uuid

log = logging.getLogger(__name__)

# A dead worker's slots come back within this; the holder renews every RENEW_EVERY.
LEASE_TTL = 15.0
RENEW_EVERY = 3.0
# A waiter asks again after this, doubling up to the most (a release here wakes it at once).
POLL_FIRST, POLL_MAX = 0.02, 0.1

UNCAPPED, LOCAL, BOARD = "uncapped", "local", "board"


class Slot:
    """One call's place at a provider; ``where`` it was taken is where it goes back."""

    __slots__ = ("provider", "token", "where", "released")

    def __init__(self, provider, token, where):
        self.provider = provider
        self.token = token
        self.where = where
        self.released = False


class Capacity:
    """The slots of one worker: on the board while it answers, a per-worker share otherwise."""

    def __init__(self, caps, *, board=None, workers=1, queue_timeout=30.0, ttl=LEASE_TTL,
                 clock=time.monotonic, wall=time.time):
        self.caps = dict(caps)
        self.queue_timeout = queue_timeout
        self._shares = {name: max(1, cap // max(1, workers)) for name, cap in self.caps.items()}
        self._board = board
        self._ttl = ttl
        self._clock = clock
        self._wall = wall
        self._owner = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._serial = itertools.count(1)
        # Guards the counts below; released slots wake the waiters of this worker.
        self._freed = threading.Condition()
        self._local = {name: 0 for name in self.caps}   # slots taken without the board
        self._held = {}                                  # token -> Slot taken on the board
        # Tokens of acquires the board did not answer: Redis may still run a
        # command that timed out here, leaving a lease nobody holds.
        self._unsure = []                                # (provider, token)
        self._listeners = []
        self._stop = threading.Event()
        self._thread = None

    def subscribe(self, listener):
        """Call ``listener(provider, delta)`` whenever a call takes (+1) or leaves (-1) a slot."""
        self._listeners.append(listener)

    def capped(self, provider):
        return provider in self.caps

    # --- taking and giving back ---------------------------------------------------------------

    def claim(self, provider, wait=0.0, gone=None):
        """Return a Slot for a call to ``provider``; None if it stays full for ``wait`` s.

        ``gone()`` tells whether the caller has left; a waiter whose caller
        left gives up, so a slot never goes to an answer nobody will read.
        """
        if provider not in self.caps:
            return self._counted(Slot(provider, None, UNCAPPED))
        slot = self._take(provider)
        if slot is None and wait > 0:
            slot = self._wait(provider, wait, gone)
        return self._counted(slot) if slot is not None else None

    def release(self, slot):
        """Give a slot back (once; a second release is ignored)."""
        if slot is None or slot.released:
            return
        slot.released = True
        if slot.where == BOARD:
            with self._freed:
                self._held.pop(slot.token, None)
            # Unreachable board: the lease runs out by itself.
            self._board.release_slot(slot.provider, slot.token)
        with self._freed:
            if slot.where == LOCAL:
                self._local[slot.provider] -= 1
            self._freed.notify_all()
        self._tell(slot.provider, -1)

    def _take(self, provider):
        """Take a slot now, on the board if it answers, else from this worker's share."""
        if self._board is not None and self._board.up:
            token = f"{self._owner}-{next(self._serial)}"
            taken = self._board.acquire_slot(provider, self.caps[provider], token, self._owner,
                                             now=self._wall(), ttl=self._ttl)
            if taken is not None:
                if not taken:
                    return None
                slot = Slot(provider, token, BOARD)
                with self._freed:
                    self._held[token] = slot
                return slot
            with self._freed:
                self._unsure.append((provider, token))
        with self._freed:
            if self._local[provider] >= self._shares[provider]:
                return None
            self._local[provider] += 1
        return Slot(provider, None, LOCAL)

    def _wait(self, provider, wait, gone=None):
        """Ask again until a slot is free or ``wait`` seconds passed; a release here wakes us."""
        deadline = self._clock() + wait
        pause = POLL_FIRST
        while True:
            left = deadline - self._clock()
            if left <= 0 or (gone is not None and gone()):
                return None
            with self._freed:
                self._freed.wait(min(pause, left))
            slot = self._take(provider)
            if slot is not None:
                return slot
            pause = min(pause * 2, POLL_MAX)

    def _counted(self, slot):
        self._tell(slot.provider, 1)
        return slot

    def _tell(self, provider, delta):
        for listener in self._listeners:
            try:
                listener(provider, delta)
            except Exception:
                log.exception("capacity listener failed for %s", provider)

    # --- leases -------------------------------------------------------------------------------

    def renew(self):
        """Extend the leases of every slot this worker holds on the board.

        First give back any lease an unanswered acquire may have left there
        (a board that hung ran it later): otherwise it would hold a slot of
        the cap, unused, until its lease ran out.
        """
        self._give_back_unsure()
        with self._freed:
            tokens = {}
            for token, slot in self._held.items():
                tokens.setdefault(slot.provider, []).append(token)
        if tokens and self._board is not None:
            self._board.refresh_slots(tokens, now=self._wall(), ttl=self._ttl)

    def _give_back_unsure(self):
        if self._board is None or not self._board.up:
            return
        with self._freed:
            unsure, self._unsure = self._unsure, []
        for index, (provider, token) in enumerate(unsure):
            if not self._board.up:   # gone again: keep the rest for the next renewal
                with self._freed:
                    self._unsure.extend(unsure[index:])
                return
            self._board.release_slot(provider, token)

    def start(self, interval=RENEW_EVERY):
        """Renew this worker's leases in the background (after fork); only with caps and a board."""
        if self._board is None or not self.caps or self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._renew_loop, args=(interval,),
                                        name="mana-llm-slot-leases", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()

    def _renew_loop(self, interval):
        while not self._stop.wait(interval):
            try:
                self.renew()
            except Exception:  # a bug here must not end the renewals for good
                log.exception("renewing capacity leases failed")

    # --- reading ------------------------------------------------------------------------------

    def status(self):
        """Return ``{provider: {inflight, cap, scope}}`` of every capped provider.

        ``scope`` says whose calls are counted: ``board`` (every worker on the
        board; ``cap`` is the whole cap) or ``worker`` (this worker alone, no
        board to ask; ``cap`` is its share).
        """
        if not self.caps:
            return {}
        counts = None
        if self._board is not None and self._board.up:
            counts = self._board.count_slots(list(self.caps), now=self._wall())
        if counts is not None:
            return {name: {"inflight": counts.get(name, 0), "cap": cap, "scope": "board"}
                    for name, cap in self.caps.items()}
        with self._freed:
            return {name: {"inflight": self._local[name], "cap": self._shares[name],
                           "scope": "worker"} for name in self.caps}
