"""Messages between the pool client and ``megagrpo rollout-server``: length-prefixed JSON.

Each message is an 8-byte big-endian length followed by that many bytes of UTF-8 JSON (a dict).
JSON, not pickle: a server only ever parses data, whoever connects. Floats survive the round trip
exactly (Python writes the shortest repr that reads back to the same double).

Requests carry ``{"cmd": ..., ...}``; replies carry ``{"ok": true, ...}`` or
``{"ok": false, "error": "..."}``.
"""

from __future__ import annotations

import json
import socket
import struct

from megagrpo.rollout.protocol import RolloutRequest, Sample, SamplingParams

_HEADER = struct.Struct(">Q")
MAX_MESSAGE_BYTES = 4 * 2**30


class ServerError(RuntimeError):
    """The rollout server answered with an error (its message is kept)."""


def send_msg(sock: socket.socket, obj: dict) -> None:
    data = json.dumps(obj, separators=(",", ":")).encode()
    sock.sendall(_HEADER.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the other side closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def recv_msg(sock: socket.socket) -> dict:
    (n,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    if n > MAX_MESSAGE_BYTES:
        raise ConnectionError(f"message of {n} bytes announced; the limit is {MAX_MESSAGE_BYTES}")
    obj = json.loads(_recv_exact(sock, n))
    if not isinstance(obj, dict):
        raise ConnectionError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def call(sock: socket.socket, obj: dict) -> dict:
    """Send one request and wait for its reply; a server-side error raises ``ServerError``."""
    send_msg(sock, obj)
    return check_reply(recv_msg(sock))


def check_reply(reply: dict) -> dict:
    if not reply.get("ok", False):
        raise ServerError(reply.get("error", f"malformed reply {reply!r}"))
    return reply


def encode_requests(requests: list[RolloutRequest]) -> list[dict]:
    return [
        {"prompt_ids": list(r.prompt_ids), "seed": r.seed, "request_id": r.request_id}
        for r in requests
    ]


def decode_requests(items: list[dict]) -> list[RolloutRequest]:
    return [
        RolloutRequest(tuple(d["prompt_ids"]), seed=d.get("seed"), request_id=d.get("request_id"))
        for d in items
    ]


def generate_message(requests: list[RolloutRequest], sampling: SamplingParams) -> dict:
    return {
        "cmd": "generate",
        "requests": encode_requests(requests),
        "sampling": sampling.to_dict(),
    }


def encode_groups(groups: list[list[Sample]]) -> list[list[dict]]:
    return [[s.to_dict() for s in g] for g in groups]


def decode_groups(items: list[list[dict]]) -> list[list[Sample]]:
    return [[Sample.from_dict(d) for d in g] for g in items]
