"""Regression: a received payload is hashed once (by the transfer), not again by the check.

The transfer hashes the body as it arrives and hands on a ``CheckedPayload``;
``check_payload`` then compares digests. Every sha256 pass is counted by wrapping
``hashlib.sha256``, which both modules call, and measured in bytes hashed.
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import Any

import pytest

from p2pfl.core.crypto import Identity
from p2pfl.core.envelope import CheckedPayload, VerifiedHeader, check_payload, sign_update
from p2pfl.errors import DigestMismatch, TamperedPayload
from p2pfl.net.transfer import fetch_checked_payload, fetch_payload

SERVER = Identity.from_secret(b"\x07" * 32)
REPLY_OK = struct.Struct(">BQ")
PAYLOAD = os.urandom(70_000)
TAMPERED = bytes([PAYLOAD[0] ^ 1]) + PAYLOAD[1:]


def signed(payload: bytes) -> VerifiedHeader:
    return sign_update(SERVER, network_id="n", round=1, payload=payload, samples=1, ts_ms=0)


# Signed before any test wraps sha256 (signing hashes on the sender's side).
UPDATE, UPDATE_OF_TAMPERED = signed(PAYLOAD), signed(TAMPERED)


class ScriptedStream:
    """Answers one request with ``reply``, at most ``step`` bytes per read (several chunks)."""

    def __init__(self, reply: bytes, step: int = 4096) -> None:
        self.reply, self.pos, self.step = reply, 0, step

    async def write(self, data: bytes) -> None:
        pass

    async def close_write(self) -> None:
        pass

    async def read(self, n: int | None = None) -> bytes:
        size = min(n or self.step, self.step)
        chunk = self.reply[self.pos : self.pos + size]
        self.pos += len(chunk)
        return chunk

    async def close(self) -> None:
        pass

    async def reset(self) -> None:
        pass


class ScriptedHost:
    def __init__(self, reply: bytes) -> None:
        self.reply = reply

    async def new_stream(self, peer: Any, protocols: Any) -> ScriptedStream:
        return ScriptedStream(self.reply)


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the number of bytes fed to every sha256 from now on."""
    sizes: list[int] = []
    real = hashlib.sha256

    class Counting:
        def __init__(self, data: bytes = b"") -> None:
            self.inner = real()
            self.update(data)

        def update(self, data: Any) -> None:
            sizes.append(memoryview(data).nbytes)
            self.inner.update(data)

        def digest(self) -> bytes:
            return self.inner.digest()

    monkeypatch.setattr(hashlib, "sha256", Counting)
    return sizes


def served(body: bytes) -> ScriptedHost:
    return ScriptedHost(REPLY_OK.pack(0, len(body)) + body)


async def fetch(host: Any, digest: bytes) -> CheckedPayload:
    return await fetch_checked_payload(
        host, SERVER.peer_id, digest, max_size=len(PAYLOAD), timeout=5
    )


async def test_a_received_payload_is_hashed_once(hashed: list[int]) -> None:
    got = await fetch(served(PAYLOAD), UPDATE.header.digest)
    check_payload(UPDATE, got)
    assert got.data == PAYLOAD
    assert sum(hashed) == len(PAYLOAD)  # one pass: the transfer's, not the check's too


async def test_the_one_hash_still_catches_tampering(hashed: list[int]) -> None:
    with pytest.raises(TamperedPayload):
        await fetch(served(TAMPERED), UPDATE.header.digest)
    # Bytes that hash to what was asked, checked against another header's digest.
    got = await fetch(served(TAMPERED), UPDATE_OF_TAMPERED.header.digest)
    with pytest.raises(DigestMismatch, match="sha256"):
        check_payload(UPDATE, got)
    assert sum(hashed) == 2 * len(PAYLOAD)  # two receipts, one pass each


async def test_the_bytes_only_fetch_returns_the_same_payload() -> None:
    host: Any = served(PAYLOAD)
    got = await fetch_payload(
        host, SERVER.peer_id, UPDATE.header.digest, max_size=len(PAYLOAD), timeout=5
    )
    assert got == PAYLOAD


def test_plain_bytes_are_hashed_by_the_check_once(hashed: list[int]) -> None:
    check_payload(UPDATE, PAYLOAD)
    assert sum(hashed) == len(PAYLOAD)
