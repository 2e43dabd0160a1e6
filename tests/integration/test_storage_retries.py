"""Transient S3 errors (503 SlowDown) are retried by the storage layer every stage uses, not fatal."""

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import pytest

from raychat.core.common import storage

pytestmark = pytest.mark.integration

SLOW_DOWN = b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>'


class FlakyS3:
    """An S3 endpoint on 127.0.0.1 that answers the first ``failures`` requests 503 SlowDown and
    forwards every later one to the real (moto) endpoint."""

    def __init__(self, upstream: str, failures: int):
        self.failures, self.failed, self.forwarded = failures, 0, 0
        lock = threading.Lock()
        target = urlparse(upstream)
        flaky = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                """The request body, with HTTP chunked framing removed (it is forwarded with a
                Content-Length; the AWS SDK's aws-chunked payload inside stays as it is)."""
                if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                out = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass  # HTTP trailers
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()

            def _any(self):
                body = self._body()
                with lock:
                    fail = flaky.failed < flaky.failures
                    flaky.failed += int(fail)
                if fail:
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN)
                    return
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in ("connection", "transfer-encoding", "content-length")
                }
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                flaky.forwarded += 1
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # A HEAD answer carries the object's size, not that of its (empty) body.
                size = resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", size)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_transient_slow_down_errors_are_retried_until_the_write_and_read_succeed(s3_server, s3_bucket, monkeypatch):
    flaky = FlakyS3(s3_server, failures=3)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", flaky.url)
        storage.write_text(f"s3://{s3_bucket}/runs/manifest.json", '{"latest": "x"}')
        flaky.failed, flaky.failures = 0, 2
        assert storage.read_text(f"s3://{s3_bucket}/runs/manifest.json") == '{"latest": "x"}'
    finally:
        flaky.close()
    assert flaky.failed == 2 and flaky.forwarded >= 2
