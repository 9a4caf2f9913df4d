"""The libp2p host: TCP + Noise + Yamux only, identity from the node's secp256k1 secret.

``open_host`` starts a host listening, patches it (``p2pfl.net.patches``), yields it
and shuts it down. Deliberate choices against py-libp2p 0.8.1 defaults (see
LIBP2P_NOTES):

- Noise is the only security transport: the default also accepts *plaintext*, which
  does not authenticate the PeerId (trap 1). Yamux is the only muxer (Mplex is ~4x slower
  and a peer offering only Mplex is refused).
- ``max_connections_per_peer=1``: otherwise every ``connect`` waits a fixed 250 ms
  (trap 2). One connection per peer is also what neighbour bookkeeping assumes.
- The background auto-connector is off (trap 3) unless asked: neighbour selection is
  ours (``p2pfl.net.discovery``), not a full mesh of everything in the peerstore
  (patch ``no_auto_connector``: the settings alone do not stop it).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto import x25519
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.secp256k1 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from p2pfl.core.crypto import short_id
from p2pfl.errors import ConfigError, PeerUnreachable
from p2pfl.net import patches
from p2pfl.net.patches.streams import DEFAULT_MAX_INBOUND_STREAMS_PER_PEER
from p2pfl.net.relay import dial_circuit, is_circuit
from p2pfl.net.relaybook import RelayBook

logger = logging.getLogger(__name__)

# Auto-connector effectively off: it would dial every peer in the peerstore (trap 3).
_NEVER = 1e9


def key_pair_from_secret(secret: bytes) -> KeyPair:
    """Build the libp2p secp256k1 key pair whose PeerId embeds this node's public key."""
    if len(secret) != 32:
        raise ConfigError(f"secret: must be 32 bytes, got {len(secret)}")
    try:
        return create_new_key_pair(secret)
    except Exception as error:  # coincurve/ecdsa reject 0 or >= group order
        raise ConfigError(f"secret: not a valid secp256k1 private key ({error})") from error


def connection_config(*, dial_timeout: float, auto_connect: bool) -> ConnectionConfig:
    """Return the ConnectionConfig p2pfl runs with (see module docstring)."""
    return ConnectionConfig(
        max_connections_per_peer=1,
        min_connections=0 if not auto_connect else 3,
        auto_connect_interval=_NEVER if not auto_connect else 30.0,
        dial_timeout=dial_timeout,
        # Unfinished handshakes and silent negotiations are otherwise held ~10 s. Our own
        # deadline both ways: a reader starved of CPU behind a 100 MB transfer needs more.
        inbound_upgrade_timeout=dial_timeout,
        inbound_stream_protocol_negotiation_timeout=dial_timeout,
        outbound_stream_protocol_negotiation_timeout=max(10.0, dial_timeout),  # 10: the default
    )


def build_host(
    secret: bytes,
    *,
    dial_timeout: float = 5.0,
    auto_connect: bool = False,
    max_inbound_streams_per_peer: int = DEFAULT_MAX_INBOUND_STREAMS_PER_PEER,
) -> IHost:
    """Create (but do not start) a Noise-only, Yamux-only host for ``secret``."""
    patches.apply()
    key_pair = key_pair_from_secret(secret)
    noise = NoiseTransport(key_pair, noise_privkey=x25519.create_new_key_pair().private_key)
    host = new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: noise},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        connection_config=connection_config(dial_timeout=dial_timeout, auto_connect=auto_connect),
    )
    patches.patch_host(host, max_streams_per_peer=max_inbound_streams_per_peer, auto_connect=auto_connect)
    return host


@contextlib.asynccontextmanager
async def run_host(host: IHost, *, listen_host: str, port: int) -> AsyncIterator[IHost]:
    """Start ``host`` listening on ``listen_host:port``, yield it, then stop it.

    Raises:
        ConfigError: the address cannot be listened on (port in use, address not ours);
            py-libp2p only logs that and runs without a listener.
    """
    listen = multiaddr.Multiaddr(f"/ip4/{listen_host}/tcp/{port}")
    require_listenable(listen_host, port)
    body = _BodyOutcome()
    with _quiet_shutdown(body):
        async with host.run(listen_addrs=[listen]):
            if not host.get_addrs():  # lost a race for the port since the probe
                raise ConfigError(f"[net] port: cannot listen on {listen_host}:{port}; "
                                  "choose another [net] port")
            try:
                yield host
            except BaseException:
                body.failed = True
                raise
    logger.debug("host %s stopped", short_id(host.get_id().to_string()))


@contextlib.asynccontextmanager
async def open_host(
    secret: bytes,
    *,
    listen_host: str = "127.0.0.1",
    port: int = 0,
    dial_timeout: float = 5.0,
    auto_connect: bool = False,
    max_inbound_streams_per_peer: int = DEFAULT_MAX_INBOUND_STREAMS_PER_PEER,
) -> AsyncIterator[IHost]:
    """Start a hardened host for ``secret`` on ``listen_host:port`` (0 = ephemeral).

    Args:
        secret: the node's 32-byte secp256k1 private key (``Identity.secret_bytes()``).
        listen_host: IPv4 address to listen on.
        port: TCP port; a fixed port lets a restarted node be found again.
        dial_timeout: per-dial deadline libp2p applies inside ``connect``.
        auto_connect: let libp2p dial every known peer in the background (off: p2pfl
            chooses its neighbours).
        max_inbound_streams_per_peer: concurrent inbound streams one peer may hold open.
    """
    host = build_host(
        secret,
        dial_timeout=dial_timeout,
        auto_connect=auto_connect,
        max_inbound_streams_per_peer=max_inbound_streams_per_peer,
    )
    async with run_host(host, listen_host=listen_host, port=port):
        yield host


class _BodyOutcome:
    failed = False


@contextlib.contextmanager
def _quiet_shutdown(body: _BodyOutcome) -> Any:
    """Swallow trap 15's "Nursery is closed to new arrivals" raised while stopping.

    Only when the body of ``open_host`` exited normally (so the error came from the
    shutdown), and only those RuntimeErrors: anything else in the group propagates.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        if body.failed:
            raise
        rest = group.split(_is_nursery_closed)[1]
        if rest is not None:
            raise rest from None
        logger.debug("ignored pubsub shutdown noise: %r", group)
    except RuntimeError as error:
        if body.failed or not _is_nursery_closed(error):
            raise


def _is_nursery_closed(error: BaseException) -> bool:
    return isinstance(error, RuntimeError) and "Nursery is closed" in str(error)


def route_libp2p_logs() -> None:
    """Let libp2p's warnings reach the handlers the CLI configured, in their one format.

    Importing libp2p detaches its logger (no handler, no propagation), so its warnings
    reach stderr bare through logging's last resort. (Configures no handler itself.)
    """
    logging.getLogger("libp2p").propagate = True


def require_listenable(listen_host: str, port: int, field: str = "[net] port") -> None:
    """Raise a one-line ConfigError (naming ``field``) unless TCP can listen on ``listen_host:port``."""
    if port == 0:
        return
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as trio's listener
            probe.bind((listen_host, port))
    except OSError as error:
        hint = (f"another program (or p2pfl node) has it; choose another {field}"
                if error.errno == errno.EADDRINUSE else f"check {field} and the listen address")
        raise ConfigError(f"{field}: cannot listen on {listen_host}:{port}: "
                          f"{error.strerror}; {hint}") from None


def dialback_port(host: IHost, announce: tuple[str, ...] = ()) -> int:
    """The TCP port peers should dial back: the announced one if any, else the listen port."""
    for address in (*announce, *(str(a) for a in host.get_addrs())):
        parts = address.split("/")
        if "tcp" in parts and parts.index("tcp") + 1 < len(parts):
            return int(parts[parts.index("tcp") + 1])
    return 0


def listen_addrs(host: IHost, announce: tuple[str, ...] = ()) -> list[str]:
    """Return the full multiaddrs peers can dial us at (``/ip4/…/tcp/N/p2p/<id>``).

    ``announce`` (``[net] announce_addrs``) replaces the listen addresses; otherwise a
    listener on 0.0.0.0 is expanded into this machine's IPv4 addresses (0.0.0.0 itself
    is not dialable) other than loopback, which is only given when it is the only one:
    a peer elsewhere that dials our 127.0.0.1 reaches itself (found off loopback).
    """
    peer = host.get_id().to_string()
    bare = list(announce) or [a for addr in host.get_addrs() for a in _expanded(str(addr))]
    return [text if "/p2p/" in text else f"{text}/p2p/{peer}" for text in bare]


def _expanded(address: str) -> list[str]:
    if not address.startswith("/ip4/0.0.0.0/"):
        return [address]
    local = local_ipv4_addresses()
    local = [ip for ip in local if not ip.startswith("127.")] or local
    return [address.replace("/ip4/0.0.0.0/", f"/ip4/{ip}/", 1) for ip in local] or [address]


def local_ipv4_addresses() -> list[str]:
    """Return the IPv4 address of every up interface (Linux ioctl; [] elsewhere)."""
    out = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            try:
                request = struct.pack("256s", name.encode()[:15])
                reply = fcntl.ioctl(probe.fileno(), 0x8915, request)  # SIOCGIFADDR
            except OSError:  # no IPv4 address on this interface (or not Linux)
                continue
            out.append(socket.inet_ntoa(reply[20:24]))
    return out


def peer_id_of(address: str) -> str:
    """Return the PeerId string at the end of a ``/p2p/`` multiaddr (ConfigError if none)."""
    try:
        return info_from_p2p_addr(multiaddr.Multiaddr(address)).peer_id.to_string()
    except Exception as error:
        raise ConfigError(f"not a /p2p/ multiaddr: {address!r} ({error})") from error


async def connect(host: IHost, address: str, *, timeout: float, relays: RelayBook | None = None) -> str:
    """Dial ``address`` (a full /p2p/ multiaddr) within ``timeout``; return its PeerId.

    A relayed address (``…/p2p-circuit/p2p/<id>``) is dialled through its relay, and what
    the relay did goes into ``relays`` if given.

    Raises:
        PeerUnreachable: the dial failed or did not finish in time.
        ConfigError: ``address`` is not a /p2p/ multiaddr.
    """
    if is_circuit(address):
        return await dial_circuit(host, address, timeout=timeout, book=relays)
    try:
        info = info_from_p2p_addr(multiaddr.Multiaddr(address))
    except Exception as error:
        raise ConfigError(f"not a /p2p/ multiaddr: {address!r} ({error})") from error
    if info.peer_id == host.get_id():
        raise PeerUnreachable(f"{address} is this host")
    # A failed dial blocks the peer for 60 s even once it is back (trap 11).
    network: Any = host.get_network()  # Swarm; unblock_peer is not on the interface
    network.unblock_peer(info.peer_id)
    # Dial this address and no other: identify replaced the address we last reached the
    # peer at by the listen addresses it advertises (/ip4/0.0.0.0/... when it listens on
    # every interface), and the swarm dials one TCP address of the peerstore's, at random.
    if not network.get_connections(info.peer_id):
        host.get_peerstore().clear_addrs(info.peer_id)
    with trio.move_on_after(timeout) as scope:
        try:
            await host.connect(info)
        except Exception as error:
            raise PeerUnreachable(f"cannot dial {short_id(info.peer_id.to_string())}: "
                                  f"{dial_failure(error)}") from error
    if scope.cancelled_caught:
        raise PeerUnreachable(f"dialling {short_id(info.peer_id.to_string())} took over {timeout} s")
    return info.peer_id.to_string()


def dial_failure(error: BaseException) -> str:
    """Return the root cause of a failed dial in a few words ("connection refused")."""
    seen: set[int] = set()
    pending: list[BaseException] = [error]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            return current.strerror.lower()
        pending.extend(getattr(current, "exceptions", ()) or getattr(current, "errors", ()) or ())
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return str(error)


__all__ = [
    "dial_failure",
    "build_host",
    "connect",
    "connection_config",
    "dialback_port",
    "key_pair_from_secret",
    "listen_addrs",
    "open_host",
    "local_ipv4_addresses",
    "peer_id_of",
    "require_listenable",
    "route_libp2p_logs",
    "run_host",
]
