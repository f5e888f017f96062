"""Flower's SuperLink (``flower-superlink``, same arguments) with a longer SQLite busy timeout.

``nnunet_fed server`` keeps the SuperLink's state in a SQLite file (``<fold>/flower/superlink.db``) so that a
restarted server still knows its sites. flwr 1.41 opens that database with ``PRAGMA busy_timeout = 5000``
(``flwr.supercore.constant.SQLITE_PRAGMAS``; no option or environment variable changes it): a request that waits
more than 5 s for the write lock fails with ``sqlite3.OperationalError: database is locked`` and an HTTP 500,
which Flower's runtime clients do not retry (``flwr.supercore.retry.http_retry`` retries 502, 503 and 504 only).
On a machine where the sites' trainings share the CPU with the server, a writer holding the lock is easily
descheduled for that long; the ServerApp or the SuperLink's SuperExec then dies with the run unfinished. Here the
busy timeout is :data:`BUSY_TIMEOUT_MS` instead: a stalled writer delays the others, it does not end the run.

Run as ``python -m nnunet_fed.deployment.superlink [flower-superlink arguments]``.
"""
from __future__ import annotations

import sys

#: how long (ms) a SuperLink request waits for SQLite's write lock before it fails
BUSY_TIMEOUT_MS = 120_000


def patched_pragmas(pragmas) -> tuple:
    """Flower's SQLite pragmas (``(name, value)`` pairs) with ``busy_timeout`` set to :data:`BUSY_TIMEOUT_MS`.
    Raises RuntimeError if Flower no longer sets ``busy_timeout`` there (the timeout would then be unknown)."""
    pragmas = tuple(pragmas)
    if sum(name == "busy_timeout" for name, _ in pragmas) != 1:
        raise RuntimeError(f"Flower's SQLite pragmas changed ({pragmas!r}); nnunet_fed cannot set the SuperLink's "
                           "busy timeout")
    return tuple((name, str(BUSY_TIMEOUT_MS) if name == "busy_timeout" else value) for name, value in pragmas)


def main() -> None:
    from flwr.supercore import sql_mixin

    sql_mixin.SQLITE_PRAGMAS = patched_pragmas(sql_mixin.SQLITE_PRAGMAS)  # read at each new connection
    from flwr.superlink.cli import flower_superlink

    sys.argv[0] = "flower-superlink"
    flower_superlink()


if __name__ == "__main__":
    main()
