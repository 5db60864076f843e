"""The API process's open files: every client connection holds one, a waiting request's for as long as it waits.

A container or a service manager often starts a process with a soft limit of 1,024 open files under a much higher
hard one. Past the soft limit the API can accept no connection and open no Redis connection, so the clients that
may wait on one API process would be capped far below what the host allows. `inferq api` raises its soft limit to
the hard one at start, as Go's runtime does. Past the hard limit, a client is turned away: a request that runs out
of files answers `503 overloaded` (producers.api), and a connection the server has no file for is closed at once.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)


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
