"""Callbacks: a finished job's final state POSTed to its `callback_url`, signed by the Standard Webhooks scheme.

Delivery is at least once: the job store owes a callback from the moment the job ends (`inferq:callbacks`, scored by
when the next attempt is due), a Celery task on its own queue (`inferq-callbacks`) makes each attempt, and the
reconciler hands out attempts whose message was lost. A receiver may see the same `webhook-id` twice and must treat
it as one event.

Targets are checked on the address the name resolves to at send time, and the request goes to that very address
(DNS rebinding cannot swap it afterwards): loopback, link-local, private and other non-global addresses are refused
unless the operator's allow-list (`callback_allow`: host, host:port or CIDR) names them.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import random
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
from celery import Celery
from standardwebhooks.webhooks import Webhook

from inferq.config import Settings
from inferq.protocol.connections import Stores, open_stores
from inferq.protocol.jobs import render_view
from inferq.protocol.keys import CALLBACK_TASK, job_key

log = logging.getLogger(__name__)

_BACKOFF_MAX_S = 600.0
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class TargetRefused(Exception):
    """The callback URL resolves to an address callbacks may not reach."""


@dataclass(frozen=True)
class AllowList:
    """The operator's exceptions to the public-addresses-only rule."""

    hosts: frozenset[str]
    host_ports: frozenset[tuple[str, int]]
    networks: tuple[IpNetwork, ...]

    @classmethod
    def parse(cls, text: str) -> AllowList:
        hosts: set[str] = set()
        host_ports: set[tuple[str, int]] = set()
        networks: list[IpNetwork] = []
        for entry in (e.strip().lower() for e in text.split(",") if e.strip()):
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                pass
            host, _, port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
            if port.isdigit():
                host_ports.add((host, int(port)))
            else:
                hosts.add(entry)
        return cls(frozenset(hosts), frozenset(host_ports), tuple(networks))

    def allows(self, host: str, port: int, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        host = host.lower()
        if host in self.hosts or (host, port) in self.host_ports:
            return True
        if str(address) in self.hosts or (str(address), port) in self.host_ports:
            return True
        return any(address in network for network in self.networks)


def resolve_target(url: str, allow: AllowList) -> tuple[str, int, str]:
    """(host, port, address to connect to) for `url`, or `TargetRefused` saying why."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TargetRefused("not an http(s) URL")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise TargetRefused(f"the host does not resolve ({type(e).__name__})") from e
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if address.is_global or allow.allows(parts.hostname, port, address):
            return parts.hostname, port, str(address)
    raise TargetRefused("the host resolves only to addresses that callbacks may not reach (see callback_allow)")


def webhook_payload(job_id: str, fields: dict[str, str]) -> dict[str, Any]:
    view = render_view(job_id, fields)
    view.pop("callback", None)
    return {"type": f"job.{view['status']}", "timestamp": view["finished_at"], "data": view}


def send_signed(url: str, body: str, *, msg_id: str, secret: str, allow: AllowList, timeout_s: float) -> int:
    """POST `body` to the checked address of `url`; the HTTP status (any exception means no answer)."""
    host, port, address = resolve_target(url, allow)
    parts = urlsplit(url)
    ip_host = f"[{address}]" if ":" in address else address
    pinned = parts._replace(netloc=f"{ip_host}:{port}").geturl()
    now = datetime.now(UTC)
    headers = {
        "content-type": "application/json",
        "host": host if parts.port is None else f"{host}:{port}",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, now, body),
        "user-agent": "inferq-callbacks",
    }
    # The request goes to the address that was checked; TLS still verifies the certificate against the host name.
    extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
    with httpx.Client(timeout=timeout_s, follow_redirects=False) as client:
        response = client.post(pinned, content=body.encode(), headers=headers, extensions=extensions)
    return response.status_code


class CallbackDeliverer:
    """One delivery attempt per call, with its bookkeeping in the job record."""

    def __init__(self, settings: Settings, stores: Stores) -> None:
        self._settings = settings
        self._stores = stores
        self._allow = AllowList.parse(settings.callback_allow)

    def deliver(self, job_id: str) -> str:
        jobs = self._stores.jobs
        if not jobs.take_callback(job_id, in_flight_s=2 * self._settings.callback_timeout_s + 5):
            return "not_due"
        fields: dict[str, str] = jobs.redis.hgetall(job_key(job_id))  # type: ignore[assignment]
        if not fields or not fields.get("callback_url"):
            return jobs.callback_done(job_id, "failed", "job_gone")
        secret = self._settings.callback_secret
        if secret is None:
            return jobs.callback_done(job_id, "failed", "no_callback_secret")
        body = json.dumps(webhook_payload(job_id, fields), separators=(",", ":"))
        try:
            status = send_signed(
                fields["callback_url"],
                body,
                msg_id=f"msg_{job_id}",
                secret=secret.get_secret_value(),
                allow=self._allow,
                timeout_s=self._settings.callback_timeout_s,
            )
        except TargetRefused as e:
            log.warning("job %s: callback target refused: %s", job_id, e, extra={"job_id": job_id})
            return jobs.callback_done(job_id, "failed", "target_refused")
        except httpx.HTTPError as e:
            return self._retry_or_give_up(job_id, fields, type(e).__name__)
        if 200 <= status < 300:
            log.info("job %s: callback delivered (HTTP %d)", job_id, status, extra={"job_id": job_id})
            return jobs.callback_done(job_id, "delivered", f"HTTP {status}")
        if status == 410:  # the receiver says it will never want this: stop
            return jobs.callback_done(job_id, "failed", "HTTP 410")
        return self._retry_or_give_up(job_id, fields, f"HTTP {status}")

    def _retry_or_give_up(self, job_id: str, fields: dict[str, str], detail: str) -> str:
        jobs = self._stores.jobs
        attempts = int(fields.get("callback_attempts") or "1")
        finished_s = float(fields.get("finished_at") or "0")
        if jobs.server_time_s() - finished_s > self._settings.callback_retry_period_s:
            log.warning(
                "job %s: callback given up after %d attempts (%s)", job_id, attempts, detail, extra={"job_id": job_id}
            )
            return jobs.callback_done(job_id, "failed", detail)
        base_s = self._settings.callback_backoff_s
        delay_s = min(_BACKOFF_MAX_S, base_s * 2 ** (attempts - 1)) * (0.5 + random.random())  # noqa: S311
        log.info(
            "job %s: callback attempt %d failed (%s); next in %.0f s",
            *(job_id, attempts, detail, delay_s),
            extra={"job_id": job_id, "model": fields.get("model")},
        )
        return jobs.callback_done(job_id, "retry", detail, retry_in_s=delay_s)


def register_callback_task(app: Celery, settings: Settings) -> None:
    """The delivery task, on its own queue; torch-free, so the API's host can run it (`inferq callbacks`)."""
    state: dict[str, CallbackDeliverer] = {}

    def deliverer() -> CallbackDeliverer:
        if "it" not in state:
            s = settings
            stores = open_stores(s.redis_url_or_default, queued_ttl_s=s.queued_ttl_s, result_ttl_s=s.result_ttl_s)
            state["it"] = CallbackDeliverer(settings, stores)
        return state["it"]

    @app.task(name=CALLBACK_TASK, ignore_result=True)
    def deliver_callback(job_id: str) -> str:
        return deliverer().deliver(job_id)
