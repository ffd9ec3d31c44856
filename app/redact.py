"""Keep API keys out of error bodies, log lines and metrics."""

import re

# Keys as providers format them, and the masked fragments upstreams echo
# back in 401 bodies ("sk-proj-****abcd"): any token with a run of mask
# characters is treated as a key fragment.
_KEY_SHAPES = re.compile(
    r"(?<![A-Za-z0-9])(?:sk|gsk|pk|rk)[-_][A-Za-z0-9_\-*.]{6,}"
    r"|AIza[0-9A-Za-z_\-]{10,}"
    r"|[A-Za-z0-9_\-]*[*\u2022]{3,}[A-Za-z0-9_\-*\u2022.]*"
    r"|(?i:bearer)\s+[A-Za-z0-9_\-.~+/=]{6,}"
)
REDACTED = "[redacted]"


class Redactor:
    """Replace the configured secrets and anything shaped like a key."""

    def __init__(self, secrets=()):
        # Longest first so a key that contains another is removed whole.
        self._secrets = sorted({s for s in secrets if s and len(s) >= 4},
                               key=len, reverse=True)

    def redact(self, text):
        """Return ``text`` with secrets and key-shaped tokens replaced."""
        if not text:
            return text
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return _KEY_SHAPES.sub(REDACTED, text)
