"""The API process's open files: every client connection holds one, a waiting request's for as long as it waits.

A container or a service manager often starts a process with a soft limit of 1,024 open files under a much higher
hard one. Past the soft limit the API could accept no connection and open no Redis connection: requests would fail
or their connections be reset. So `inferq api` raises its soft limit to the hard one at start (as Go's runtime
does), and has uvicorn answer `503` (and close the connection) to a request that arrives while as many
connections are open as the limit leaves room for, instead of running out.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)

# Kept for everything but client connections: Redis and broker connections (the thread pool's, at most 40), log
# files, the listening socket, connections accepted but not yet counted.
_RESERVE_MIN = 128
_RESERVE_FRACTION = 4


def raise_open_files_limit() -> int | None:
    """Raise this process's soft open-file limit to its hard limit; the soft limit now (None: unlimited)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as e:  # some platforms refuse an unlimited soft limit: keep what there is
            log.warning("could not raise the open-file limit from %d to %d (%s)", soft, hard, e)
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def connection_limit(open_files: int | None) -> int | None:
    """Most client connections to serve at once: what the open-file limit leaves after a reserve of a quarter of
    it (at least 128); None where open files are unlimited."""
    if open_files is None:
        return None
    return max(1, open_files - max(_RESERVE_MIN, open_files // _RESERVE_FRACTION))
