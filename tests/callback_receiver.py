"""A webhook receiver on loopback for tests: answers 503 until it is healthy, then verifies each delivery's
Standard Webhooks signature and records it."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks.webhooks import Webhook

CALLBACK_SECRET = "whsec_" + "Y2hhb3MtdGVzdHMtc2lnbmluZy1zZWNyZXQtMzI="


class CallbackReceiver:
    """A webhook receiver on loopback that answers 503 for `healthy_after_s` from the first delivery it sees (so
    that a slow-starting worker cannot let the outage pass unseen), then verifies and records."""

    def __init__(self, *, healthy_after_s: float = 0.0) -> None:
        self.deliveries: list[dict[str, Any]] = []
        self.refused = 0
        self.bad_signatures = 0
        self._down_s = healthy_after_s
        self._healthy_at_s: float | None = None
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                if receiver._healthy_at_s is None:
                    receiver._healthy_at_s = time.monotonic() + receiver._down_s
                if time.monotonic() < receiver._healthy_at_s:
                    receiver.refused += 1
                    self.send_response(503)
                    self.end_headers()
                    return
                try:
                    payload = Webhook(CALLBACK_SECRET).verify(body, dict(self.headers.items()))
                    receiver.deliveries.append({"id": self.headers["webhook-id"], "payload": payload})
                    self.send_response(204)
                except Exception:
                    receiver.bad_signatures += 1
                    self.send_response(400)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
