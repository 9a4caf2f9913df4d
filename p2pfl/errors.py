"""The one exception tree of p2pfl.

Everything p2pfl raises on purpose derives from :class:`P2PFLError`. Errors from
libp2p, trio, cbor2, ecdsa and torch are translated where they enter.

::

    P2PFLError
    ├── ConfigError                 a setting is wrong; the message says what to change
    ├── KeyFileError                a key file is missing, unreadable, malformed or too open
    ├── DecodeError                 bytes from outside are not a valid payload/message
    │   ├── UnknownCodec            a header names a payload codec this node cannot decode
    │   └── MissingBase             a delta payload's base model is not held here
    ├── UpdateRejected              a signed update failed verification at ingress
    │   ├── UnsupportedVersion      header version we do not speak
    │   ├── WrongNetwork            header bound to another network id
    │   ├── InvalidSignature        signature does not verify
    │   ├── SignerMismatch          signed by a key other than the claimed sender
    │   └── DigestMismatch          payload sha256 or size differs from the header
    ├── AggregationError            states disagree in keys, shapes or dtypes; bad params
    ├── LearnerError                the local learner failed (bad data, bad model)
    └── NetworkError                anything on the wire that is not the payload itself
        ├── PeerUnreachable         cannot dial / open a stream to a peer
        ├── NoNeighbours            start_timeout passed before min_neighbours connected
        └── TransferError           one payload transfer failed; the node carries on
            ├── TransferTimeout     the deadline passed (stalled or frozen peer)
            ├── PayloadTooLarge     declared or actual size above the configured cap
            ├── PayloadNotFound     the peer does not hold that digest
            ├── ProtocolViolation   wrong status, wrong length, garbage, early EOF, reset
            │   └── TamperedPayload the bytes served do not hash to the requested digest
            └── PeerBusy            the peer is serving too many others; try another holder

A misbehaving peer never raises through the node: its input becomes reputation
evidence and is dropped.
"""

from __future__ import annotations


class P2PFLError(Exception):
    """Root of every error p2pfl raises on purpose."""


class ConfigError(P2PFLError, ValueError):
    """A configuration value is wrong; the message names the field and what to change."""


class KeyFileError(P2PFLError):
    """A key file is missing, malformed, or readable by group/others."""


class DecodeError(P2PFLError, ValueError):
    """Bytes from outside (a peer, a file) are not a valid encoding."""


class UnknownCodec(DecodeError):
    """A signed header names a payload codec that is not in the codec registry."""


class MissingBase(DecodeError):
    """A delta payload names a base model this node does not hold (not the sender's fault)."""


class UpdateRejected(P2PFLError):
    """A signed update failed verification at ingress."""


class UnsupportedVersion(UpdateRejected):
    """The update header declares a protocol version we do not speak."""


class WrongNetwork(UpdateRejected):
    """The update header is bound to another network id."""


class InvalidSignature(UpdateRejected):
    """The signature over the header does not verify."""


class SignerMismatch(UpdateRejected):
    """The header was signed by a key other than the claimed sender's."""


class DigestMismatch(UpdateRejected):
    """The payload's sha256 digest or size differs from what the header declares."""


class AggregationError(P2PFLError, ValueError):
    """States to aggregate disagree in keys, shapes or dtypes, or parameters are invalid."""


class LearnerError(P2PFLError):
    """The local learner failed."""


class NetworkError(P2PFLError):
    """A network operation failed."""


class NoNeighbours(NetworkError):
    """``[round] start_timeout`` passed before ``min_neighbours`` neighbours connected.

    The daemon exits with status 3 on it: training alone would look like success.
    """


class PeerUnreachable(NetworkError):
    """A peer could not be dialled or would not open a stream."""


class TransferError(NetworkError):
    """One payload transfer failed; the node carries on without it."""


class TransferTimeout(TransferError):
    """A transfer did not finish before its deadline (stalled or frozen peer)."""


class PayloadTooLarge(TransferError):
    """A payload's declared or actual size is above the configured cap."""


class PayloadNotFound(TransferError):
    """The peer does not hold the requested digest."""


class ProtocolViolation(TransferError):
    """The peer broke the transfer protocol (bad status, wrong length, garbage, EOF)."""


class TamperedPayload(ProtocolViolation):
    """The peer served bytes that do not hash to the requested digest: never an accident."""


class PeerBusy(TransferError):
    """The peer is serving too many others; another holder may answer."""


__all__ = [
    "AggregationError",
    "ConfigError",
    "DecodeError",
    "DigestMismatch",
    "InvalidSignature",
    "KeyFileError",
    "LearnerError",
    "NetworkError",
    "NoNeighbours",
    "P2PFLError",
    "PayloadNotFound",
    "PayloadTooLarge",
    "PeerUnreachable",
    "PeerBusy",
    "ProtocolViolation",
    "SignerMismatch",
    "TamperedPayload",
    "TransferError",
    "TransferTimeout",
    "UnknownCodec",
    "UnsupportedVersion",
    "UpdateRejected",
    "WrongNetwork",
]
