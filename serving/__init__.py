"""Process-level serving code that gunicorn's master loads (worker class, metrics archive).

Kept outside ``app`` on purpose: the master imports what is here, and
importing ``app`` in the master would freeze its modules (and
prometheus_client's value class) into every worker it forks.
"""
