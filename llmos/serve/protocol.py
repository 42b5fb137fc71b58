"""The HTTP/1.1 protocol `llmos serve` runs under uvicorn: h11, answering malformed requests in the
OpenAI error envelope.

A request h11 cannot parse (`Content-Length: abc`, a header block over `MAX_HEADER_BYTES`, a broken
request line) never reaches the app: uvicorn answers it itself, in plain text. This subclass makes
that answer the same JSON envelope every other error has, so a client's error handling sees one shape.
"""

from __future__ import annotations

import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

MAX_HEADER_BYTES = 16 * 1024  # request line + headers; h11's own default, named here so the CLI sets it


def envelope_400(message: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": "malformed_request"}}).encode()


class EnvelopeH11Protocol(H11Protocol):
    def send_400_response(self, msg: str) -> None:
        body = envelope_400(f"{msg.rstrip('.')}: the HTTP request is malformed (a bad header value such as "
                            f"Content-Length, or headers over {MAX_HEADER_BYTES} bytes); fix the client's request")
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()
