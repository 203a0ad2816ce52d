"""A fault-injecting HTTP proxy in front of the loopback S3 server (tests only).

Each request passes, or fails one of three ways an object store fails:

* `slowdown`: answered 503 SlowDown (S3's XML error body), not performed;
* `reset`: the connection is reset (TCP RST) without an answer, not performed;
* `performed_500`: performed upstream, then answered 500 InternalError: the write happened, the client thinks not.

The fate of a request is a hash of (seed, method, key and query within the bucket, how many times that request was
seen before), so a run's faults do not depend on how its concurrent requests interleave or on the bucket's name, and
a retried request draws again. Faults
apply to every request that names a bucket (object GET/PUT/DELETE/HEAD, listings, multipart steps), conditional
writes included. `first_conditional` forces the fate of the first request that carries `If-None-Match`/`If-Match`
(a lease's create); `decide(request)`, when it returns a fate, overrides the draw.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import struct
import threading
from collections import Counter
from collections.abc import Callable

from aiohttp import ClientSession, ClientTimeout, web

FATES = ("slowdown", "reset", "performed_500")
_QUIET = logging.getLogger("faulty_s3.proxy")  # aiohttp logs every reset it was told to make: not news here
_QUIET.setLevel(logging.CRITICAL)
_QUIET.propagate = False
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "expect", "upgrade", "te"}


def _s3_error(status: int, code: str, message: str) -> web.Response:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message><RequestId>faulty-proxy</RequestId></Error>"
    )
    return web.Response(status=status, body=body.encode(), content_type="application/xml")


class FaultyS3Proxy:
    """`with FaultyS3Proxy(upstream, rate=0.3, seed=1) as proxy:` then point s3fs at `proxy.endpoint`. `counts`
    holds each fate's count (and "pass"), `methods` each HTTP method's, `conditional_faults` the faults dealt to
    conditional requests."""

    def __init__(
        self,
        upstream: str,
        rate: float,
        seed: int = 0,
        first_conditional: str | None = None,
        decide: Callable[[web.Request], str | None] | None = None,
    ):
        self.upstream = upstream.rstrip("/")
        self.decide = decide
        self.rate = rate
        self.seed = seed
        self.first_conditional = first_conditional
        self.counts: Counter = Counter()
        self.conditional_faults: Counter = Counter()
        self.methods: Counter = Counter()
        self._seen: Counter = Counter()
        self._conditional_seen = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="faulty-s3-proxy", daemon=True)
        self.endpoint = ""

    # -- the fate of a request ------------------------------------------------------------------------------------
    def fate(self, request: web.Request) -> str:
        chosen = self.decide(request) if self.decide is not None else None
        if chosen is not None:
            return chosen
        conditional = "If-None-Match" in request.headers or "If-Match" in request.headers
        if conditional and self.first_conditional and not self._conditional_seen:
            self._conditional_seen += 1
            return self.first_conditional
        self._conditional_seen += conditional
        if request.path.strip("/") == "":  # ListBuckets and the like: not an object request
            return "pass"
        _, _, in_bucket = request.path.lstrip("/").partition("/")  # tests' bucket names are random: left out
        key = f"{request.method} {in_bucket}?{request.query_string}"
        self._seen[key] += 1
        digest = hashlib.sha256(f"{self.seed}|{key}|{self._seen[key]}".encode()).digest()
        draw = int.from_bytes(digest[:8], "big") / 2**64
        if draw >= self.rate:
            return "pass"
        return FATES[digest[8] % len(FATES)]

    # -- serving --------------------------------------------------------------------------------------------------
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        fate = self.fate(request)
        self.counts[fate] += 1
        self.methods[request.method] += 1
        if fate != "pass" and ("If-None-Match" in request.headers or "If-Match" in request.headers):
            self.conditional_faults[fate] += 1
        if fate == "slowdown":
            return _s3_error(503, "SlowDown", "Please reduce your request rate.")
        if fate == "reset":
            sock = request.transport.get_extra_info("socket") if request.transport else None
            if sock is not None:  # SO_LINGER 0: close() sends RST, as a dropped connection does
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            request.transport.close()
            raise ConnectionResetError("faulty proxy: connection reset")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        async with self._session.request(
            request.method, self.upstream + request.path_qs, headers=headers, data=body, allow_redirects=False
        ) as upstream:
            payload = await upstream.read()
            out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP}
            status = upstream.status
            length = upstream.headers.get("Content-Length")
        if fate == "performed_500":
            return _s3_error(500, "InternalError", "We encountered an internal error. Please try again.")
        response = web.StreamResponse(status=status, headers=out_headers)
        if request.method == "HEAD":
            response.content_length = int(length) if length is not None else 0
            await response.prepare(request)
            return response
        response.content_length = len(payload)
        await response.prepare(request)
        await response.write(payload)
        await response.write_eof()
        return response

    async def _start(self) -> str:
        self._session = ClientSession(
            timeout=ClientTimeout(total=120), auto_decompress=False, skip_auto_headers=("User-Agent", "Content-Type")
        )
        app = web.Application(client_max_size=2**31)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, logger=_QUIET)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def _stop(self) -> None:
        await self._runner.cleanup()
        await self._session.close()

    def start(self) -> FaultyS3Proxy:
        self._thread.start()
        self.endpoint = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)

    def storage_options(self, options: dict) -> dict:
        """s3fs options of the loopback server, pointed at this proxy instead."""
        return {**options, "client_kwargs": {**options.get("client_kwargs", {}), "endpoint_url": self.endpoint}}

    def __enter__(self) -> FaultyS3Proxy:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
