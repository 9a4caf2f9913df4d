"""Opt-in mDNS discovery for LAN demos, pinned to one interface (LIBP2P_NOTES trap 13).

py-libp2p's own mDNS multicasts on every interface; this one runs zeroconf with
``interfaces=[mdns_interface]`` only. Each node registers one DNS-SD service of type
``_p2pfl._udp.local.`` named by its PeerId, whose TXT record carries:

- ``v=1``: the record format;
- ``net=<hex>``: the first 32 hex digits of sha256(network id), a bounded tag that lets
  nodes of other networks on the same LAN ignore each other;
- ``addr1`` … ``addr4``: full ``/ip4/…/tcp/N/p2p/<PeerId>`` multiaddrs of the node.

A record of our network becomes addresses in the neighbourhood's address book and
nothing more: it is dialled, and the peer becomes a neighbour only once it answers our
peer exchange (Noise authenticates the PeerId). Everything a record says is untrusted:
malformed records are ignored, lookups and newly accepted peers are capped per minute,
and no exception from a record reaches zeroconf's threads or trio.

Threads: zeroconf runs its own; its browser callbacks (blocking lookups included) run
there and hand results to trio with ``TrioToken.run_sync_soon`` into a bounded channel
read by a trio task. Registration and shutdown run in worker threads.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping

import trio
from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, ServiceListener, Zeroconf

from p2pfl.core.crypto import short_id
from p2pfl.errors import ConfigError
from p2pfl.net.discovery import MAX_ADDRS_PER_PEER, parse_p2p_addr

logger = logging.getLogger(__name__)

SERVICE_TYPE = "_p2pfl._udp.local."
RECORD_VERSION = b"1"
# Distinct peers a minute that mDNS may add to the address book: a LAN demo has a few
# dozen nodes; a host spraying records cannot fill the book (max_known_peers) quickly.
MAX_PEERS_PER_MINUTE = 32
# Blocking record lookups a minute in zeroconf's browser thread (re-announcements too).
MAX_LOOKUPS_PER_MINUTE = 4 * MAX_PEERS_PER_MINUTE
LOOKUP_TIMEOUT_MS = 1000
HANDOFF_BUFFER = 64
# zeroconf's close sends goodbyes; do not let a stuck socket hold the node's exit.
CLOSE_TIMEOUT = 3.0
WINDOW = 60.0

Found = tuple[str, list[str]]  # (PeerId, its multiaddrs)


def network_tag(network_id: str) -> str:
    """Return the bounded tag announced for ``network_id`` (32 hex digits of sha256)."""
    return hashlib.sha256(network_id.encode()).hexdigest()[:32]


def build_properties(network_id: str, addrs: list[str]) -> dict[bytes, bytes]:
    """Return the TXT record announcing ``addrs`` (at most 4) for ``network_id``."""
    properties = {b"v": RECORD_VERSION, b"net": network_tag(network_id).encode()}
    for index, address in enumerate(addrs[:MAX_ADDRS_PER_PEER], start=1):
        properties[f"addr{index}".encode()] = address.encode()
    return properties


def parse_record(properties: Mapping[bytes, bytes | None], tag: str) -> Found | None:
    """Return (PeerId, addrs) from a TXT record of network ``tag``, or None.

    None for another network, another version, or anything malformed: values that are
    not UTF-8 bytes, no address, or addresses naming different (or no) peers.
    """
    try:
        if properties.get(b"v") != RECORD_VERSION or properties.get(b"net") != tag.encode():
            return None
        addrs = []
        for index in range(1, MAX_ADDRS_PER_PEER + 1):
            value = properties.get(f"addr{index}".encode())
            if isinstance(value, bytes):
                addrs.append(value.decode("utf-8"))
        peers = {parse_p2p_addr(a) for a in addrs}
    except Exception:  # hostile record: any failure means "not one of ours"
        return None
    if len(peers) != 1 or None in peers:
        return None
    peer = peers.pop()
    return (peer, addrs) if peer is not None else None


def advertised_addrs(addrs: list[str], interface: str) -> list[str]:
    """Return the listen addrs dialable on ``interface`` (0.0.0.0 rewritten to it)."""
    out = []
    for address in addrs:
        address = address.replace("/ip4/0.0.0.0/", f"/ip4/{interface}/", 1)
        if address.startswith(f"/ip4/{interface}/tcp/"):
            out.append(address)
    return out


class RateWindow:
    """Allow at most ``limit`` events per ``window`` seconds; time comes in as an argument."""

    def __init__(self, limit: int, window: float = WINDOW) -> None:
        self.limit = limit
        self.window = window
        self._times: collections.deque[float] = collections.deque()

    def allow(self, now: float) -> bool:
        """Count an event at ``now`` and return True, or return False if over the limit."""
        while self._times and self._times[0] <= now - self.window:
            self._times.popleft()
        if len(self._times) >= self.limit:
            return False
        self._times.append(now)
        return True


class Admission:
    """Admit at most ``limit`` distinct new peers per window; repeats within it are free."""

    def __init__(self, limit: int = MAX_PEERS_PER_MINUTE, window: float = WINDOW) -> None:
        self.window = window
        self._rate = RateWindow(limit, window)
        self._admitted: dict[str, float] = {}

    def admit(self, peer: str, now: float) -> bool:
        """Return whether a record for ``peer`` seen at ``now`` may be acted on."""
        self._admitted = {p: t for p, t in self._admitted.items() if t > now - self.window}
        if peer in self._admitted:
            return True
        if not self._rate.allow(now):
            return False
        self._admitted[peer] = now
        return True


class MdnsListener(ServiceListener):
    """zeroconf browser callbacks: look records up, parse, hand ours to trio.

    Runs in zeroconf's threads. Never raises: a hostile record or a lookup failure is
    logged and dropped.
    """

    def __init__(
        self, network_id: str, deliver: Callable[[Found], None],
        *, lookups_per_minute: int = MAX_LOOKUPS_PER_MINUTE,
    ) -> None:
        self.tag = network_tag(network_id)
        self.deliver = deliver
        self._lookups = RateWindow(lookups_per_minute)
        self._lock = threading.Lock()

    def add_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        """Handle a newly seen service."""
        self._lookup(zc, type_, name)

    def update_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        """Handle a changed service (new addresses, say)."""
        self._lookup(zc, type_, name)

    def remove_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        """Ignore a goodbye: liveness is the peer exchange's job."""

    def _lookup(self, zc: Zeroconf, type_: str, name: str) -> None:
        try:
            with self._lock:
                allowed = self._lookups.allow(time.monotonic())
            if not allowed:
                logger.debug("mDNS: lookup budget spent; ignoring %.80r", name)
                return
            info = zc.get_service_info(type_, name, timeout=LOOKUP_TIMEOUT_MS)
            if info is not None:
                self.handle_info(info)
        except Exception as error:  # zeroconf or a hostile record: drop, never raise
            logger.debug("mDNS: record %.80r ignored: %r", name, error)

    def handle_info(self, info: ServiceInfo) -> None:
        """Parse a resolved record; deliver it if it is one of our network's."""
        try:
            found = parse_record(info.properties, self.tag)
        except Exception as error:  # a property accessor that blows up
            logger.debug("mDNS: malformed record ignored: %r", error)
            return
        if found is not None:
            self.deliver(found)


class ChannelHandoff:
    """Carry records from zeroconf's threads into a bounded trio channel (lossy)."""

    def __init__(self, token: trio.lowlevel.TrioToken, send: trio.MemorySendChannel[Found]) -> None:
        self._token = token
        self._send = send

    def __call__(self, found: Found) -> None:
        """Queue ``found`` for trio; called from any thread, never blocks or raises."""
        with contextlib.suppress(trio.RunFinishedError):  # the node is stopping
            self._token.run_sync_soon(self._put, found)

    def _put(self, found: Found) -> None:
        # Runs as a trio run-loop callback, where an exception would crash the run.
        try:
            self._send.send_nowait(found)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            logger.debug("mDNS: hand-off full or closed; record dropped")


def service_info(peer_id: str, network_id: str, addrs: list[str], interface: str) -> ServiceInfo:
    """Return the DNS-SD service announcing this node on ``interface``."""
    port = int(addrs[0].split("/tcp/")[1].split("/")[0]) if addrs else 0
    return ServiceInfo(
        SERVICE_TYPE,
        f"{peer_id}.{SERVICE_TYPE}",
        port=port,
        addresses=[socket.inet_aton(interface)],
        properties=build_properties(network_id, addrs),
        server=f"p2pfl-{peer_id[-16:].lower()}.local.",
    )


def require_local_interface(interface: str) -> None:
    """Raise a one-line ConfigError unless ``interface`` is an IPv4 address of this machine."""
    # Binding succeeds only for an address this machine owns (EADDRNOTAVAIL otherwise).
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind((interface, 0))
    except OSError as error:
        raise ConfigError(f"net.mdns_interface: {interface} is not an address of a local "
                          f"interface ({error.strerror})") from None


def pinned_zeroconf(interface: str) -> Zeroconf:
    """Return zeroconf sending and listening on ``interface`` only, IPv4 only (trap 13)."""
    return Zeroconf(interfaces=[interface], ip_version=IPVersion.V4Only)


async def run_mdns(
    *,
    peer_id: str,
    network_id: str,
    interface: str,
    addrs: list[str],
    on_peer: Callable[[list[str]], object],
    max_peers_per_minute: int = MAX_PEERS_PER_MINUTE,
) -> None:
    """Announce this node and browse for its network's peers on ``interface`` only.

    Start in the owner's nursery; runs until cancelled, then unregisters and closes
    zeroconf. ``on_peer`` gets each admitted peer's addrs (e.g.
    :meth:`~p2pfl.net.discovery.Neighbourhood.learn_local`).
    """
    zc = await trio.to_thread.run_sync(pinned_zeroconf, interface)
    send, receive = trio.open_memory_channel[Found](HANDOFF_BUFFER)
    listener = MdnsListener(network_id, ChannelHandoff(trio.lowlevel.current_trio_token(), send))
    admission = Admission(max_peers_per_minute)
    browser: ServiceBrowser | None = None
    try:
        browser = ServiceBrowser(zc, SERVICE_TYPE, listener=listener)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_register, zc, service_info(peer_id, network_id, addrs, interface))
            async with receive:
                async for found in receive:
                    _accept(found, admission, on_peer)
    finally:
        send.close()
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
            await trio.to_thread.run_sync(  # type: ignore[call-arg]  # stubs predate it
                _close, zc, browser, abandon_on_cancel=True)


def _accept(found: Found, admission: Admission, on_peer: Callable[[list[str]], object]) -> None:
    peer, addrs = found
    if not admission.admit(peer, trio.current_time()):
        logger.debug("mDNS: new-peer budget spent; ignoring %s", short_id(peer))
        return
    try:
        on_peer(addrs)
    except Exception:  # a book bug must not end discovery
        logger.exception("mDNS: could not record %s", short_id(peer))


async def _register(zc: Zeroconf, info: ServiceInfo) -> None:
    # Probing and announcing block ~1.7 s; the node runs meanwhile.
    try:
        await trio.to_thread.run_sync(zc.register_service, info)
        logger.info("mDNS: announcing %s", info.name)
    except Exception as error:  # name conflict, socket error: discovery still browses
        logger.warning("mDNS: could not announce this node: %r", error)


def _close(zc: Zeroconf, browser: ServiceBrowser | None) -> None:
    try:
        if browser is not None:
            browser.cancel()
        zc.close()  # unregisters our service (goodbye packets) and joins its threads
    except Exception as error:
        logger.debug("mDNS: close: %r", error)


__all__ = [
    "SERVICE_TYPE",
    "Admission",
    "ChannelHandoff",
    "MdnsListener",
    "RateWindow",
    "advertised_addrs",
    "build_properties",
    "network_tag",
    "parse_record",
    "pinned_zeroconf",
    "require_local_interface",
    "run_mdns",
    "service_info",
]
