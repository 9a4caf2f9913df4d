"""Every override of py-libp2p internals, in one registry with one version policy.

Each entry of :data:`PATCHES` names the upstream bug or limit it works around and the
test that proves it. Policy: the patches are applied only on :data:`PINNED_VERSION`, the
libp2p release they were written and measured against. On any other version one warning
line is logged and libp2p runs stock (no patch at all, not a subset).

- :func:`apply` applies the process-wide patches (class and module attributes), once.
- :func:`patch_host` applies the per-host ones; ``p2pfl.net.host.build_host`` calls both.
- :func:`apply_process_tweaks` (``p2pfl.net.patches.process``) changes the process, not
  libp2p (glibc ``mallopt``, an environment variable): opt-in for embedders, switched on
  by the daemon and the test network's node processes.

Bodies live beside this file: ``dataplane`` (transfer speed, frames per stream), ``locks``
(scheduler turns per frame), ``streams`` (hostile
protocol ids and handlers), ``pubsub`` (hostile frames, flood publish, neighbour-only
forwarding, signed-record costs), ``swarm``
(connection slots, the auto-connector), ``peerstore`` (our own identity kept), ``relay``
(circuit relay v2 as a relay).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from p2pfl.net.patches import dataplane, locks, peerstore, pubsub, relay, streams, swarm
from p2pfl.net.patches.process import TWEAKS, apply_process_tweaks

logger = logging.getLogger(__name__)

PINNED_VERSION = "0.8.1"
"""The only libp2p version the patches are applied on."""


@dataclass(frozen=True)
class Patch:
    """One override of py-libp2p internals.

    Attributes:
        name: registry key.
        upstream: the upstream bug or limit it works around.
        test: the test that proves it (``path::name``).
        apply: process-wide patch (no argument) or, if ``per_host``, ``apply(host, **opts)``.
        per_host: applied to each host by :func:`patch_host`, not once per process.
    """

    name: str
    upstream: str
    test: str
    apply: Callable[..., Any]
    per_host: bool = False


_T = "tests/net/"
PATCHES: dict[str, Patch] = {
    p.name: p
    for p in (
        Patch("yamux_frame", "64 KiB Yamux frames split into 2 Noise messages each (CPU per MB)",
              _T + "test_transfer.py::test_tuned_and_stock_peers_interoperate", dataplane.yamux_frame),
        Patch("yamux_credit", "a stream's reader sends a WINDOW_UPDATE frame after nearly every "
              "read: half the frames of a small pull",
              _T + "test_patches.py::test_a_small_pull_sends_no_window_update", dataplane.yamux_credit),
        Patch("pipelined_select", "opening a stream waits for the listener's multistream header "
              "before proposing the protocol: one frame and one round trip more per stream",
              _T + "test_patches.py::test_a_small_pull_sends_no_window_update", dataplane.pipelined_select),
        Patch("yamux_open_flags", "a stream's SYN and its ACK each go as a bare frame before "
              "either end has a byte to send: two frames more per stream",
              _T + "test_patches.py::test_a_small_pull_sends_no_window_update", dataplane.yamux_open_flags),
        Patch("listener_one_write", "a listener sends its multistream header and its protocol "
              "answer in two writes even when the opener sent both lines at once: one frame more "
              "per stream",
              _T + "test_patches.py::test_a_small_pull_sends_no_window_update", dataplane.listener_one_write),
        Patch("eager_locks", "every stream read and write and every frame takes several trio "
              "locks, each a turn of the scheduler even when free: ~48 per small pull",
              _T + "test_patches.py::test_a_free_eager_lock_takes_no_turn_and_a_held_one_queues",
              locks.eager_locks),
        Patch("noise_reader", "Noise reads each message with two locked socket reads",
              _T + "test_transfer.py::test_tuned_and_stock_peers_interoperate", dataplane.noise_reader),
        Patch("noise_writer", "Noise sends each 64 KiB message with its own locked send_all",
              _T + "test_transfer.py::test_tuned_and_stock_peers_interoperate", dataplane.noise_writer),
        Patch("secure_read", "SecureSession.read copies every frame body twice",
              _T + "test_transfer.py::test_tuned_and_stock_peers_interoperate", dataplane.secure_read),
        Patch("multistream_utf8", "a non-UTF-8 protocol id raises UnicodeDecodeError: host stops",
              _T + "test_hardening.py::test_non_utf8_protocol_id_on_a_raw_tcp_connection",
              streams.multistream_utf8),
        Patch("pubsub_decode_error", "one invalid protobuf frame on /meshsub/* stops the host",
              _T + "test_hardening.py::test_invalid_protobuf_frame_on_meshsub", pubsub.decode_error),
        Patch("pubsub_live_subscriptions", "our stream to a peer failing forgets the peer's "
              "subscriptions though it is still connected: after a connection is replaced we "
              "send it nothing, for good",
              _T + "test_gossip.py::test_a_dead_stream_to_a_connected_peer_keeps_its_subscriptions",
              pubsub.live_subscriptions),
        Patch("flood_publish", "own messages go to mesh peers only (no GossipSub v1.1 floodPublish)",
              _T + "test_gossip.py::test_own_message_reaches_a_subscribed_peer_outside_the_mesh",
              pubsub.flood_publish),
        Patch("neighbour_only", "GossipSub forwards every announcement to D mesh peers: each "
              "node pays for every announcement of the network several times over",
              _T + "test_pubsub_costs.py::test_announcements_reach_neighbours_and_go_no_further",
              pubsub.neighbour_only),
        Patch("signed_records", "every pubsub RPC's signed peer record is parsed, verified and "
              "stored on receipt, and our own rebuilt on every send",
              _T + "test_pubsub_costs.py::test_an_unchanged_signed_record_is_consumed_once",
              pubsub.signed_records),
        Patch("inbound_slot_release", "an inbound connection keeps its limiter slot until the "
              "swarm stops: after 300 inbound connections every new one is reset",
              _T + "test_patches.py::test_1000_inbound_connections_then_a_fresh_peer_connects",
              swarm.inbound_slot_release),
        Patch("close_peer_keeps_newcomers", "closing a peer drops every connection it has "
              "from the swarm's table, also one it made while the others closed: left open "
              "but unlisted, the peer uses it while we count it disconnected",
              _T + "test_patches.py::test_a_connection_made_while_its_peer_is_closed_stays_listed",
              swarm.close_peer_keeps_newcomers),
        Patch("stream_events_inline", "every stream opened or closed spawns a nursery and one task "
              "per notifee (five, none of which uses stream events)",
              _T + "test_patches.py::test_stream_events_reach_every_notifee_in_the_callers_task",
              swarm.stream_events_inline),
        Patch("peerstore_keeps_own", "past 1000 stored peers the peerstore evicts entries without "
              "addresses first, our own key pair included: the next publish raises and the node stops",
              _T + "test_patches.py::test_a_full_peerstore_keeps_our_own_identity",
              peerstore.keep_own_identity),
        Patch("relay_reserve_self", "a RESERVE books the slot for any PeerId it names: one "
              "peer can fill every reservation of a relay with made-up ids",
              _T + "test_relay.py::test_a_reservation_is_booked_for_the_peer_that_asks",
              relay.reserve_self),
        Patch("relay_data", "a relay files circuits under their ends' PeerIds: two circuits to "
              "one peer close each other's streams; forwarded bytes are not counted",
              _T + "test_relay.py::test_two_circuits_to_one_peer_outlive_each_other",
              relay.relay_data),
        Patch("relay_stop_address", "a connection accepted through a relay is addressed through "
              "ourselves: which relay carries it is lost",
              _T + "test_relay.py::test_both_ends_of_a_circuit_name_its_relay", relay.stop_address),
        Patch("guard_dispatcher", "a raising stream handler stops the host; inbound streams "
              "per peer are unbounded (Yamux buffers up to 8 MiB each)",
              _T + "test_hardening.py::test_handler_that_raises", streams.guard_dispatcher, per_host=True),
        Patch("no_auto_connector", "the auto-connector dials the whole peerstore (banned peers "
              "too) at start and after every disconnect, whatever min_connections says",
              _T + "test_patches.py::test_a_disconnect_dials_nobody_from_the_peerstore",
              swarm.no_auto_connector, per_host=True),
    )
}
"""Every libp2p patch by name, in the order applied."""

_state: dict[str, Any] = {"checked": None, "done": False, "disabled": False, "applied": []}


def version_ok() -> bool:
    """Return whether the installed libp2p is :data:`PINNED_VERSION` (warn once if not)."""
    if _state["checked"] is None:
        try:
            installed = metadata.version("libp2p")
        except metadata.PackageNotFoundError:
            installed = "unknown"
        _state["checked"] = installed == PINNED_VERSION
        if not _state["checked"]:
            logger.warning(
                "libp2p %s is not the pinned %s: p2pfl's libp2p patches are OFF (hostile peers "
                "can stop this node, inbound slots leak); pin libp2p==%s",
                installed, PINNED_VERSION, PINNED_VERSION,
            )
    return bool(_state["checked"])


def apply(names: Iterable[str] | None = None) -> tuple[str, ...]:
    """Apply the named process-wide patches (default: all); only the first call acts.

    Later calls (every ``build_host``) return what the first one applied, so a benchmark
    that applies a subset before any host exists keeps that subset.
    """
    wanted = [n for n in PATCHES if not PATCHES[n].per_host] if names is None else list(names)
    unknown = set(wanted) - set(PATCHES)
    if unknown:
        raise ValueError(f"unknown libp2p patches {sorted(unknown)}; known: {sorted(PATCHES)}")
    if _state["done"] or _state["disabled"] or not version_ok():
        return applied()
    _state["done"] = True
    for name in wanted:
        patch = PATCHES[name]
        if name not in _state["applied"] and not patch.per_host:
            patch.apply()
            _state["applied"].append(name)
    return applied()


def patch_host(host: Any, *, max_streams_per_peer: int, auto_connect: bool) -> tuple[str, ...]:
    """Apply the per-host patches to ``host`` (idempotent); return the names applied."""
    if _state["disabled"] or not version_ok():
        return ()
    PATCHES["guard_dispatcher"].apply(host, max_streams_per_peer=max_streams_per_peer)
    if auto_connect:
        return ("guard_dispatcher",)
    PATCHES["no_auto_connector"].apply(host)
    return ("guard_dispatcher", "no_auto_connector")


def disable() -> None:
    """Run libp2p stock in this process from now on (benchmarks and interop tests)."""
    _state["disabled"] = True


def applied() -> tuple[str, ...]:
    """Return the names of the process-wide patches applied so far."""
    return tuple(_state["applied"])


def active(name: str) -> bool:
    """Return whether the process-wide patch ``name`` is in effect."""
    return name in _state["applied"]


__all__ = [
    "PATCHES",
    "PINNED_VERSION",
    "TWEAKS",
    "Patch",
    "active",
    "applied",
    "apply",
    "apply_process_tweaks",
    "disable",
    "patch_host",
    "version_ok",
]
