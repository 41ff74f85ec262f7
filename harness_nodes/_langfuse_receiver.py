"""A loopback Langfuse for tests: records the OTLP spans and score posts the real SDK sends.

The Langfuse SDK exports spans as OTLP/HTTP protobuf (gzip) to
``{base_url}/api/public/otel/v1/traces`` and scores as JSON to ``{base_url}/api/public/scores``.
This receiver listens on 127.0.0.1, decodes both (``ExportTraceServiceRequest`` from
opentelemetry-proto), and keeps them for assertions — what a Langfuse server would ingest,
with no server.
"""

from __future__ import annotations

import gzip
import json
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["LangfuseReceiver", "ReceivedSpan"]


@dataclass
class ReceivedSpan:
    """One span as Langfuse received it, attributes decoded (JSON strings parsed)."""

    trace_id: str
    """32 hex characters."""
    span_id: str
    """16 hex characters."""
    parent_span_id: str | None
    """The parent's span id, or None for a root span."""
    name: str
    """The observation's name."""
    start_ns: int
    """Start time (epoch nanoseconds)."""
    end_ns: int
    """End time (epoch nanoseconds)."""
    attributes: dict[str, Any] = field(default_factory=dict)
    """Span attributes; ``langfuse.*`` values that hold JSON are decoded."""

    @property
    def type(self) -> str:
        """The Langfuse observation type (``span``, ``generation``, ``guardrail``, ``event``...)."""
        return str(self.attributes.get("langfuse.observation.type", "span"))

    def attr(self, name: str, default: Any = None) -> Any:
        """``langfuse.observation.<name>`` (e.g. ``model.name``, ``cost_details``, ``output``)."""
        return self.attributes.get(f"langfuse.observation.{name}", default)


def _any_value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_any_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _any_value(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return bytes(v.bytes_value)
    return getattr(v, kind)


def _decode_attr(key: str, value: Any) -> Any:
    if (
        key.startswith("langfuse.")
        and isinstance(value, str)
        and value[:1] in '{["' + "tfn0123456789-"
    ):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def decode_spans(body: bytes) -> list[ReceivedSpan]:
    """Decode an OTLP ``ExportTraceServiceRequest`` body into spans."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    request = ExportTraceServiceRequest.FromString(body)
    spans: list[ReceivedSpan] = []
    for resource_spans in request.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            for s in scope_spans.spans:
                attrs = {kv.key: _decode_attr(kv.key, _any_value(kv.value)) for kv in s.attributes}
                spans.append(
                    ReceivedSpan(
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex() or None,
                        name=s.name,
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                        attributes=attrs,
                    )
                )
    return spans


class LangfuseReceiver:
    """A loopback Langfuse endpoint on 127.0.0.1 that records what the SDK sends.

    Point the SDK at `base_url` (``Langfuse(base_url=...)``, ``LANGFUSE_BASE_URL`` in a child
    process, or `langfuse_callbacks(..., base_url=...)`); the spans and scores it sends
    appear in `spans` and `scores`. Safe to read from any thread.

    Example:
        ```python
        from harness_nodes.testing import LangfuseReceiver

        with LangfuseReceiver() as receiver:
            assert receiver.base_url.startswith("http://127.0.0.1:")
            assert receiver.spans == [] and receiver.scores == []
        ```
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[ReceivedSpan] = []
        self._scores: list[dict[str, Any]] = []
        self._bodies: list[bytes] = []
        self._inflight = 0
        self._idle = threading.Condition(self._lock)
        receiver = self

        class _Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                encoding = (self.headers.get("Content-Encoding") or "").lower()
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                # Acknowledge first, then decode — as a server queues ingestion — so the
                # client's flush does not wait on the receiver's own decoding.
                # (Counted as in flight before the reply, so readers wait for the decoding.)
                if self.path.endswith("/otel/v1/traces"):
                    receiver._begin()
                    self._reply(200, b"", "application/x-protobuf")
                    receiver._ingest(body, spans=True)
                elif self.path.endswith("/api/public/scores"):
                    receiver._begin()
                    self._reply(202, b'{"message": "Accepted"}', "application/json")
                    receiver._ingest(body, spans=False)
                else:
                    self._reply(404, b"{}", "application/json")

            def do_GET(self) -> None:
                if self.path == "/_received":  # counts, for a receiver in another process
                    counts = {"spans": len(receiver.spans), "scores": len(receiver.scores)}
                    self._reply(200, json.dumps(counts).encode(), "application/json")
                else:
                    self._reply(404, b"{}", "application/json")

            def _reply(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    def _begin(self) -> None:
        with self._lock:
            self._inflight += 1

    def _ingest(self, body: bytes, *, spans: bool) -> None:
        decoded: list[ReceivedSpan] = []
        scores: list[dict[str, Any]] = []
        try:
            if spans:
                decoded = decode_spans(body)
            else:
                payload = json.loads(body)
                scores = payload if isinstance(payload, list) else payload.get("scores", [payload])
        finally:  # a body that does not decode still ends its request
            self._add(body, decoded, scores)

    def _add(self, body: bytes, spans: list[ReceivedSpan], scores: list[dict[str, Any]]) -> None:
        with self._lock:
            self._bodies.append(body)
            self._spans.extend(spans)
            self._scores.extend(scores)
            self._inflight -= 1
            self._idle.notify_all()

    def _settled(self) -> None:
        # Called with the lock held: wait (briefly) for requests already acknowledged.
        self._idle.wait_for(lambda: self._inflight == 0, timeout=10)

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>``: where to point the Langfuse SDK."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def spans(self) -> list[ReceivedSpan]:
        """Spans received so far, in arrival order."""
        with self._lock:
            self._settled()
            return list(self._spans)

    @property
    def scores(self) -> list[dict[str, Any]]:
        """Score payloads received so far (Langfuse's JSON field names: ``traceId``...)."""
        with self._lock:
            self._settled()
            return list(self._scores)

    @property
    def raw_bodies(self) -> list[bytes]:
        """Every decompressed request body, in arrival order (to grep for leaked secrets)."""
        with self._lock:
            self._settled()
            return list(self._bodies)

    def wait_for(
        self, predicate: Callable[[LangfuseReceiver], bool], timeout: float = 10.0
    ) -> bool:
        """Poll until *predicate(self)* holds or *timeout* seconds pass; return whether it held."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            time.sleep(0.02)
        return predicate(self)

    def start(self) -> LangfuseReceiver:
        """Start serving in a background thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and release the port."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> LangfuseReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":  # a receiver in its own process: prints its URL, serves until killed
    import sys

    with LangfuseReceiver() as _receiver:
        sys.stdout.write(_receiver.base_url + "\n")
        sys.stdout.flush()
        threading.Event().wait()
