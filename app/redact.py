"""Keep API keys out of error bodies, log lines and metrics."""

import re

# Keys as providers format them, and the masked fragments upstreams echo
# back in 401 bodies ("sk-proj-****abcd"): any token with a run of mask
# characters is treated as a key fragment. A fragment match may only start
# where a token starts: tried from inside a long token, it would rescan
# the token's rest at every position (quadratic in its length).
_KEY_SHAPES = re.compile(
    r"(?<![A-Za-z0-9])(?:sk|gsk|pk|rk)[-_][A-Za-z0-9_\-*.]{6,}"
    r"|AIza[0-9A-Za-z_\-]{10,}"
    r"|(?<![A-Za-z0-9_\-])[A-Za-z0-9_\-]*[*\u2022]{3,}[A-Za-z0-9_\-*\u2022.]*"
    r"|(?i:bearer)\s+[A-Za-z0-9_\-.~+/=]{6,}"
)
REDACTED = "[redacted]"
# Any run of this many characters of a configured secret is removed: a
# piece of a key (cut off by a truncation, or split across two log
# fields) still narrows a guess, and eight random characters do not
# occur in ordinary text by chance.
RUN = 8


class Redactor:
    """Replace the configured secrets, any 8-character run of them, and key-shaped tokens."""

    def __init__(self, secrets=()):
        secrets = {s for s in secrets if s and len(s) >= 4}
        # Longest first so a key that contains another is removed whole.
        self._secrets = sorted(secrets, key=len, reverse=True)
        self._runs = frozenset(s[i:i + RUN] for s in secrets
                               for i in range(len(s) - RUN + 1))
        # With a limit, only this much past it can matter (a key straddling
        # the cut), so the work stays bounded however long ``text`` is.
        self._margin = max([256] + [len(s) for s in secrets])

    def redact(self, text, limit=None):
        """Return ``text`` with secrets replaced, then cut to ``limit`` characters.

        Redacting first means a key straddling the cut cannot leave a
        piece of itself behind.
        """
        if not text:
            return text
        if limit is not None:
            text = text[:limit + self._margin]
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        text = _KEY_SHAPES.sub(REDACTED, self._without_runs(text))
        return text if limit is None else text[:limit]

    def _without_runs(self, text):
        """Return ``text`` with every stretch made of secrets' 8-character runs replaced."""
        if not self._runs:
            return text
        spans = []
        for start in range(len(text) - RUN + 1):
            if text[start:start + RUN] in self._runs:
                if spans and start <= spans[-1][1]:
                    spans[-1][1] = start + RUN
                else:
                    spans.append([start, start + RUN])
        if not spans:
            return text
        pieces, done = [], 0
        for start, end in spans:
            pieces += [text[done:start], REDACTED]
            done = end
        pieces.append(text[done:])
        return "".join(pieces)
