"""kombu's Redis transport, keeping one redis-py client per channel instead of making one per operation.

kombu builds a `redis.Redis` around its connection pool for every command it sends outside its poller: each
publish, each event, each message's unacked bookkeeping and ack — about six per job on a worker. redis-py 8 fills a
table of some 170 response callbacks in every client it makes (about 0.13 ms here), which made client creation a
large part of a small job's cost. A client over a pool is safe to share between threads, so the channel keeps one,
made again should kombu replace the pool. Everything else is kombu's own transport (`redis://` only: `rediss://`
TLS URLs keep kombu's stock classes).
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    _shared_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:  # the poller's own connections: kombu keeps those itself
            return super()._create_client(asynchronous=True)
        client = self._shared_client
        if client is None or client.connection_pool is not self.pool:
            client = self._shared_client = super()._create_client()
        return client


class Transport(kombu_redis.Transport):
    Channel = Channel


TRANSPORT = f"{__name__}:Transport"
