"""What a node reports about itself: a frozen record, rendered by the CLI and HTTP endpoint."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from p2pfl.core.reputation import ReputationBook


@dataclass(frozen=True, slots=True)
class PeerReputation:
    """One peer as this node sees it."""

    peer: str
    score: float
    weight: float  # aggregation weight: score above threshold, else 0
    banned: bool
    last_reason: str  # the reason of the last reputation change, "" if none


@dataclass(frozen=True, slots=True)
class RoundRecord:
    """One finished round."""

    round: int
    accuracy: float
    loss: float
    used: int  # neighbours' updates aggregated this round
    duration: float  # seconds from round start to checkpoint
    bytes_in: int  # cumulative, at the end of the round: payloads + announcements
    bytes_out: int
    finished_at: float = 0.0  # unix time, for timelines across nodes
    epsilon_spent: float | None = None  # privacy spent so far (DP-SGD); None: not private
    payload_in: int = 0  # cumulative, the data plane alone (the rest is control)
    payload_out: int = 0
    cpu_seconds: float = 0.0  # cumulative CPU of the process (all threads)
    learning_cpu_seconds: float = 0.0  # this round's training + evaluation CPU
    # This round's other CPU off the event loop: decoding, defence probes, aggregation,
    # encoding, checkpoint. The rest of cpu_seconds' increase is the event loop (network).
    compute_cpu_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class NodeStatistics:
    """A snapshot of a node; `to_json()` is the `/status` document."""

    peer_id: str
    network_id: str
    # "starting" | "waiting" (for neighbours) | "training" | "collecting" | "aggregating" |
    # "catching-up" | "observing" (role observer) | "done" | "stopped"
    state: str
    round: int  # the round in progress (or the next one when done)
    rounds_target: int | None
    accuracy: float | None  # test accuracy after the last finished round
    loss: float | None
    neighbours: tuple[str, ...]
    bytes_in: int
    bytes_out: int
    accepted: int
    rejected: Mapping[str, int]  # reason -> count
    reputation: tuple[PeerReputation, ...]
    history: tuple[RoundRecord, ...] = field(default=())
    byzantine: str | None = None  # attack name when this node is an attacker (test networks)
    peak_rss_bytes: int = 0  # of the whole process (a daemon runs one node per process)
    # Differential privacy (docs/PRIVACY.md): budget spent so far and the target; None: off.
    epsilon_spent: float | None = None
    epsilon_target: float | None = None
    payload_in: int = 0  # of bytes_in/bytes_out, the data plane; the rest is control
    payload_out: int = 0
    addrs: tuple[str, ...] = ()  # full multiaddrs peers can dial (bootstrap entries for others)
    # Behind NAT (docs/DEPLOY.md): "public" | "private" | "unknown" (no dial-back answer yet),
    # the relays this node holds a slot on, the neighbours it reaches only through a relay,
    # payload bytes that crossed relays, and bytes it forwarded as a relay for others.
    reachability: str = "unknown"
    relays: tuple[str, ...] = ()
    relayed_peers: tuple[str, ...] = ()
    payload_relayed: int = 0
    relay_forwarded: int = 0
    relay_scores: tuple[tuple[str, float], ...] = ()  # relays used -> weight (0: not used)
    gossip_reconnects: int = 0  # neighbours reconnected because gossip had lost them
    peer_paths: tuple[tuple[str, str], ...] = ()  # neighbour -> its path here (diagnosis)

    def to_json(self) -> dict[str, Any]:
        """Return plain JSON-able data."""
        data = asdict(self)
        data["rejected"] = dict(self.rejected)
        return data


def finite_json(value: Any) -> Any:
    """Replace NaN/inf by None, recursively: strict JSON parsers reject them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(item) for item in value]
    return value


def reputation_rows(book: ReputationBook, now: int) -> tuple[PeerReputation, ...]:
    """Return one row per peer in ``book``; bans as of round ``now``."""
    rows = []
    for peer in book.peers():
        history = book.history(peer)
        rows.append(
            PeerReputation(
                peer=peer,
                score=round(book.score(peer), 4),
                weight=round(book.weight(peer), 4),
                banned=book.banned(peer, round=now),
                last_reason=history[-1].reason if history else "",
            )
        )
    return tuple(rows)
