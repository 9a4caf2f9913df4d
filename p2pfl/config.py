"""Frozen, keyword-only configuration records, validated on construction.

Only the CLI reads argv, environment and files; everything else receives these records.
A wrong value raises :class:`~p2pfl.errors.ConfigError` naming the field and what to
change.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

import multiaddr

from p2pfl.errors import ConfigError

MiB = 1 << 20
# The aggregation rule of a node that names none (NodeConfig, node files, scenarios, testnet).
DEFAULT_RULE = "clipped_gossip"
T = TypeVar("T")


def require(condition: bool, field: str, message: str) -> None:
    """Raise ConfigError for ``field`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{field}: {message}")


@dataclass(frozen=True, kw_only=True, slots=True)
class Limits:
    """Bounds on everything a peer can make us read, decode or hold.

    Enforced both in the stream framing (before reading) and at decode (before
    allocating).
    """

    # 256 MiB fits a ~64M-parameter float32 model; raise it for bigger models.
    max_payload_bytes: int = 256 * MiB
    # A ResNet-50 state dict has ~320 entries; 4096 leaves room without inviting abuse.
    max_tensors: int = 4096
    max_ndim: int = 8
    max_name_bytes: int = 256
    # CBOR manifest of 4096 entries x ~300 bytes stays well under 2 MiB.
    max_manifest_bytes: int = 2 * MiB
    # Gossip control messages are signed headers and holder notices: a few hundred bytes.
    max_message_bytes: int = 4096

    def __post_init__(self) -> None:
        for name in (
            "max_payload_bytes",
            "max_tensors",
            "max_ndim",
            "max_name_bytes",
            "max_manifest_bytes",
            "max_message_bytes",
        ):
            value = getattr(self, name)
            require(
                isinstance(value, int) and not isinstance(value, bool) and value > 0,
                f"limits.{name}",
                f"must be a positive integer, got {value!r}",
            )



def _check_mdns_interface(interface: str | None, listen_host: str) -> None:
    """Require an IPv4 address of a local interface, one mDNS peers can dial us on."""
    require(isinstance(interface, str), "net.mdns_interface",
            "is required with enable_mdns = true: the IPv4 address of the one interface "
            "to announce on (mDNS would otherwise multicast on every interface)")
    try:
        address = ipaddress.IPv4Address(str(interface))
    except (ipaddress.AddressValueError, ValueError):
        raise ConfigError(f"net.mdns_interface: must be an IPv4 address such as 192.168.1.10, "
                          f"got {interface!r}") from None
    require(not (address.is_unspecified or address.is_multicast), "net.mdns_interface",
            f"must be one interface's own address, not {interface}")
    # Whether this machine owns the address is checked where mDNS starts (net.mdns).
    require(listen_host in (str(address), "0.0.0.0"), "net.listen_host",
            f"must be net.mdns_interface ({interface}) or 0.0.0.0 with enable_mdns = true, "
            "so that the address mDNS announces can be dialled")


def check_peer_addr(address: object, field: str) -> None:
    """Require a dialable ``/ip4|ip6|dns…/tcp/N/p2p/<PeerId>`` multiaddr with a decodable PeerId."""
    example = "/ip4/192.0.2.7/tcp/7351/p2p/16Uiu2HAm…"
    require(isinstance(address, str), field, f"must be a multiaddr string such as {example}")
    try:
        parsed = multiaddr.Multiaddr(str(address))  # decodes the PeerId (base58 multihash)
    except Exception:  # any parse failure: a bad host, port or PeerId
        raise ConfigError(f"{field}: {address!r} is not a multiaddr with a decodable PeerId; "
                          f"expected {example}") from None
    names = [p.name for p in parsed.protocols()]
    require(len(names) == 3 and names[0] in _HOST_PROTOCOLS and names[1:] == ["tcp", "p2p"], field,
            f"{address!r} must be <host>/tcp/<port>/p2p/<PeerId>, such as {example}")


_HOST_PROTOCOLS = ("ip4", "ip6", "dns", "dns4", "dns6")


def _check_announce_addr(address: object) -> None:
    """Require ``/ip4|ip6|dns…/tcp/N`` (the PeerId is appended when announcing)."""
    example = "/ip4/203.0.113.5/tcp/7351"
    try:
        names = [p.name for p in multiaddr.Multiaddr(str(address)).protocols()]
    except Exception:
        raise ConfigError(f"net.announce_addrs: {address!r} is not a valid multiaddr; "
                          f"expected {example}") from None
    require(isinstance(address, str) and len(names) == 2 and names[0] in _HOST_PROTOCOLS
            and names[1] == "tcp", "net.announce_addrs",
            f"{address!r} must be <host>/tcp/<port> (no /p2p/ part), such as {example}")


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True, kw_only=True, slots=True)
class NetConfig:
    """How a node's libp2p transport listens, finds peers and keeps its neighbours."""

    listen_host: str = "127.0.0.1"
    # 0 = ephemeral; give a fixed port so a restarted node is found again at its address.
    port: int = 0
    # Full multiaddrs ``/ip4/…/tcp/N/p2p/<PeerId>``; none means this node is the first.
    bootstrap: tuple[str, ...] = ()
    # What peers should dial instead of the listen address (behind NAT, in a container):
    # ``/ip4/<public address>/tcp/<forwarded port>``, our PeerId appended. None: listen address.
    announce_addrs: tuple[str, ...] = ()
    # None = max(3, ceil(log2(known peers))): enough for gossip to reach everyone in a
    # few hops, few enough that each node serves only a handful of pullers.
    target_neighbours: int | None = None
    # Inbound connections are accepted up to this many; beyond it the oldest surplus
    # peers we did not choose are dropped.
    max_neighbours: int = 16
    # GossipSub's default is 120 s (trap 4); 1 s forms the mesh and repairs it quickly.
    heartbeat_interval: float = 1.0
    # GossipSub stops forwarding a peer's bursts above 10 msg/s per topic (trap 5).
    publish_rate: float = 8.0
    # Default deadline of one payload fetch; 60 s moves ~1 GB at the ~22 MB/s of one
    # busy holder.
    transfer_timeout: float = 60.0
    # Loopback dials take ~30 ms; LAN well under 1 s. A dead address fails fast anyway.
    dial_timeout: float = 5.0
    # Yamux buffers up to 8 MiB per unread stream: cap what one peer can pin.
    max_inbound_streams_per_peer: int = 32
    # Validated announcements waiting for the node; more are dropped (publishers repeat).
    announcement_buffer: int = 256
    # How often the neighbour task checks liveness and tops up neighbours.
    maintenance_interval: float = 2.0
    # Reconnect backoff doubles from 0.5 s up to this cap.
    max_backoff: float = 30.0
    # Bounded address book: a peer can tell us about at most this many peers in total.
    max_known_peers: int = 1024
    # mDNS multicasts on every interface unless pinned (trap 13): opt-in for LAN demos.
    enable_mdns: bool = False
    mdns_interface: str | None = None
    # How our updates are encoded (p2pfl.core.codec.CODECS): raw | fp16 | bf16 | int8 | topk.
    codec: str = "raw"
    # int8: one scale per output channel (dim 0) rather than one per tensor.
    codec_per_channel: bool = True
    # topk: the fraction of each tensor's changes sent per update.
    codec_k: float = 0.1
    # topk: the full model every this many rounds (and whenever a neighbour lacks the base).
    codec_full_every: int = 10
    # Circuit relay v2 (docs/DEPLOY.md): a node that finds itself publicly reachable relays
    # for nodes behind NAT unless this is false; a node behind NAT reserves on `relays` relays.
    relay_service: bool = True
    relays: int = 2
    # Two nodes that reach each other through a relay try a direct connection by hole
    # punching (DCUtR: both dial at once from their listen ports through their NATs).
    hole_punching: bool = True
    # What one relay grants: reservations in total, circuits per reserved peer, and per
    # circuit (a relayed connection) its bytes, both ways, and its lifetime; a circuit past
    # either is reset and redialled. 64 MiB carries a few updates of a mid-sized model.
    relay_max_reservations: int = 32
    relay_max_circuits: int = 8
    relay_circuit_bytes: int = 64 * MiB
    relay_circuit_seconds: int = 600
    # A reservation lasts this long; its holder renews it at half-time while connected.
    relay_reservation_seconds: int = 900
    # Holders a big payload (>= 1 MiB) is pulled from at once, in 1 MiB pieces: its author
    # and neighbours that announced a verified copy (HOLDS). 1 = whole from the author.
    # Pullers also swap the pieces they hold while they pull. It pays where an author's
    # uplink is the bottleneck and rounds wait for it (`[round] quorum = 1`): with a
    # 20 Mbit/s author among 100 Mbit/s links, 100 MB updates, 4 sources took 0.39-0.83x
    # author-only's round time (5-8 nodes); on even links 0.90-1.23x, and with quorum 0.6
    # the slow author is skipped anyway, so the swapping only costs (1.4-1.8x):
    # docs/benchmarks/bigmodel.txt, session 12. Only a node with more than 1 serves the
    # payloads it pulled (and says HOLDS): at 1 they were kept for nobody, up to 768 MiB
    # with a big model. A network opts in on every node.
    fetch_sources: int = 1

    def __post_init__(self) -> None:
        require(isinstance(self.codec, str) and bool(self.codec), "net.codec",
                "must be a codec name: raw, fp16, bf16, int8 or topk")
        require(isinstance(self.codec_k, int | float) and 0 < self.codec_k <= 1, "net.codec_k",
                f"must be a fraction in (0, 1], got {self.codec_k!r}")
        require(isinstance(self.codec_full_every, int) and self.codec_full_every >= 1,
                "net.codec_full_every", f"must be an integer >= 1, got {self.codec_full_every!r}")
        require(isinstance(self.listen_host, str) and bool(self.listen_host), "net.listen_host",
                "must be an IPv4 address such as 127.0.0.1")
        require(isinstance(self.port, int) and 0 <= self.port <= 65535, "net.port",
                f"must be 0 (ephemeral) or a TCP port 1-65535, got {self.port!r}")
        require(isinstance(self.bootstrap, tuple), "net.bootstrap",
                "must be a tuple of /ip4/…/tcp/N/p2p/<PeerId> strings")
        for index, address in enumerate(self.bootstrap):
            check_peer_addr(address, f"net.bootstrap[{index}]")
        require(isinstance(self.announce_addrs, tuple), "net.announce_addrs",
                "must be a tuple of /ip4/…/tcp/N strings")
        for address in self.announce_addrs:
            _check_announce_addr(address)
        require(self.target_neighbours is None
                or (isinstance(self.target_neighbours, int) and self.target_neighbours >= 1),
                "net.target_neighbours", "must be None (auto) or an integer >= 1")
        require(isinstance(self.max_neighbours, int) and self.max_neighbours >= 1,
                "net.max_neighbours", "must be an integer >= 1")
        require(self.target_neighbours is None or self.target_neighbours <= self.max_neighbours,
                "net.target_neighbours", "must not exceed net.max_neighbours")
        for name in ("heartbeat_interval", "publish_rate", "transfer_timeout", "dial_timeout",
                     "maintenance_interval", "max_backoff"):
            require(_positive(getattr(self, name)), f"net.{name}",
                    f"must be a positive number, got {getattr(self, name)!r}")
        require(self.publish_rate <= 10, "net.publish_rate",
                "must be at most 10 msg/s (GossipSub drops faster bursts silently)")
        for name in ("relay_service", "hole_punching"):
            require(isinstance(getattr(self, name), bool), f"net.{name}", "must be true or false")
        for name in ("max_inbound_streams_per_peer", "announcement_buffer", "max_known_peers",
                     "relays", "relay_max_reservations", "relay_max_circuits",
                     "relay_circuit_bytes", "relay_circuit_seconds", "relay_reservation_seconds",
                     "fetch_sources"):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                    f"net.{name}", f"must be a positive integer, got {value!r}")
        require(self.mdns_interface is None or self.enable_mdns, "net.mdns_interface",
                "is only used with enable_mdns = true")
        if self.enable_mdns:
            _check_mdns_interface(self.mdns_interface, self.listen_host)


@dataclass(frozen=True, kw_only=True, slots=True)
class PrivacyConfig:
    """Sample-level differential privacy of one node's training (DP-SGD, docs/PRIVACY.md).

    The Gaussian noise is calibrated so that ``rounds`` x local epochs of training spend
    at most ``(epsilon, delta)`` (Opacus' RDP accountant); then the node stops training.
    """

    epsilon: float = 8.0
    # Well below 1/n for a few hundred local samples: the chance the guarantee fails.
    delta: float = 1e-5
    # Each sample's gradient is clipped to this L2 norm: its most influence on a step.
    max_grad_norm: float = 1.0
    # Rounds the budget is planned for; None: the node's rounds ([node] rounds, --rounds).
    rounds: int | None = None
    # Seeds the noise and the batch sampling. None: from the OS, as privacy needs; set it
    # only for reproducible experiments (whoever knows it can subtract the noise).
    noise_seed: int | None = None

    def __post_init__(self) -> None:
        require(_positive(self.epsilon) and self.epsilon < 1e4, "privacy.epsilon",
                f"must be a positive number, got {self.epsilon!r}")
        require(_positive(self.delta) and self.delta < 1, "privacy.delta",
                f"must be in (0, 1), e.g. 1e-5, got {self.delta!r}")
        require(_positive(self.max_grad_norm), "privacy.max_grad_norm",
                f"must be a positive number, got {self.max_grad_norm!r}")
        require(self.rounds is None or (isinstance(self.rounds, int) and self.rounds >= 1),
                "privacy.rounds", "must be an integer >= 1 (omit: the node's rounds)")
        require(self.noise_seed is None or isinstance(self.noise_seed, int), "privacy.noise_seed",
                "must be an integer (omit: from the OS)")


# -- records from TOML tables -----------------------------------------------------------


def record_from_table(cls: type[T], table: Mapping[str, Any], where: str) -> T:
    """Build the config record ``cls`` from a TOML table, naming ``where`` in every error.

    The valid keys are the fields of ``cls``; every value is checked against its field's
    type (``"false"`` is no bool, ``1.5`` no int) before the record validates itself.
    """
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where} must be a table")
    check_keys(table, field_names(cls), where)
    hints = get_type_hints(cls)
    values = {key: typed(value, hints[key], f"{where} {key}") for key, value in table.items()}
    try:
        return cls(**values)
    except ConfigError as exc:  # "round.quorum: ..." -> "[round] quorum: ..."
        raise ConfigError(f"{where} {str(exc).removeprefix(where.strip('[]') + '.')}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def field_names(cls: type) -> tuple[str, ...]:
    """Return the field names of the dataclass ``cls``, in order."""
    return tuple(f.name for f in dataclasses.fields(cls))


def check_keys(table: Iterable[str], valid: Iterable[str], where: str) -> None:
    """Raise ConfigError for the first key of ``table`` not in ``valid``, with a hint."""
    valid = tuple(valid)
    for key in table:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"
            raise ConfigError(f"unknown key {key!r} in {where}{hint}")


def typed(value: Any, hint: Any, key: str) -> Any:
    """Return ``value`` as type ``hint`` (int -> float, list -> tuple, str -> Path), or raise.

    Raises:
        ConfigError: ``key``: expected <type>, got <value>.
    """
    if hint is Any:
        return value
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        for arm in args:
            if arm is not type(None):
                try:
                    return typed(value, arm, key)
                except ConfigError:
                    continue
    elif origin is tuple and isinstance(value, list | tuple):
        return tuple(typed(item, args[0], f"{key}[{i}]") for i, item in enumerate(value))
    elif _is_table(value, origin) or _is_record(value, hint):
        return value
    elif hint in _SCALARS and _SCALARS[hint](value):
        return hint(value)
    raise ConfigError(f"{key}: expected {_describe(hint)}, got {value!r}")


def _is_table(value: object, origin: Any) -> bool:
    return origin is not None and issubclass(origin, Mapping) and isinstance(value, Mapping)


def _is_record(value: object, hint: Any) -> bool:
    """A nested config record built already (NodeConfig.rounds...)."""
    return dataclasses.is_dataclass(hint) and isinstance(value, hint)  # type: ignore[arg-type]


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


_SCALARS: dict[Any, Any] = {
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: _is_number,
    str: lambda v: isinstance(v, str),
    Path: lambda v: isinstance(v, str) and bool(v),
}
_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
          Path: "a path string"}


def _describe(hint: Any) -> str:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(arm) for arm in args if arm is not type(None))
    if origin is tuple:
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is not None and issubclass(origin, Mapping):
        return "a table"
    return _NAMES.get(hint, getattr(hint, "__name__", str(hint)))


__all__ = [
    "DEFAULT_RULE",
    "Limits",
    "MiB",
    "NetConfig",
    "PrivacyConfig",
    "check_keys",
    "check_peer_addr",
    "field_names",
    "record_from_table",
    "require",
    "typed",
]
