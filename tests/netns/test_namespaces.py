"""Six daemons off loopback, each in its own network namespace, with real faults (issue 14).

Root only (skipped with the reason otherwise). Every namespace, bridge, veth and qdisc
is made by the test and removed after it; daemons listen on 0.0.0.0 inside their own
namespace and bootstrap via 10.77.0.x. Faults: a partition of half the nodes for 30 s
(both halves keep training; rounds to reconverge are measured), one node's link down
for 20 s, a SIGKILL and restart (checkpoint kept, nobody stuck). ~2-3 min; `make netns`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pfl.core.crypto import Identity
from tests.netns.lab import Daemon, Lab, six_node_file, wait_until, why_not

N = 6
REASON = why_not()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"namespace test skipped: {REASON}")




@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    built = Lab(N, tmp_path)
    try:
        yield built
    finally:
        built.close()


def spread(daemons: list[Daemon]) -> tuple[int, float]:
    """Rounds between the slowest and fastest node; accuracy range of their latest rounds."""
    rounds = [d.round for d in daemons]
    accuracies = [d.rounds[-1][2] for d in daemons if d.rounds]
    return max(rounds) - min(rounds), max(accuracies) - min(accuracies) if accuracies else 1.0


def test_six_namespaced_daemons_survive_partition_link_loss_and_sigkill(lab: Lab, tmp_path: Path) -> None:
    identities = [Identity.generate() for _ in range(N)]
    for i, identity in enumerate(identities):
        identity.save(tmp_path / f"node{i}.pem")
    configs = [six_node_file(tmp_path, i, [x.peer_id for x in identities]) for i in range(N)]
    daemons = [lab.start(i, configs[i]) for i in range(N)]
    def state() -> str:
        return "rounds " + str([d.round for d in daemons]) + ", accuracies " + str(
            [d.rounds[-1][2] if d.rounds else None for d in daemons])

    wait_until(lambda: all(d.round >= 2 for d in daemons), 240, "every node to finish 2 rounds", state)

    # Partition: nodes 3-5 onto another bridge for 30 s; each half keeps training.
    before = [d.round for d in daemons]
    for i in (3, 4, 5):
        lab.bridge(i, "br1")
    time.sleep(30)
    during = [d.round - b for d, b in zip(daemons, before, strict=True)]
    for i in (3, 4, 5):
        lab.bridge(i, "br0")
    healed = time.monotonic()
    assert min(during) >= 1, f"a half stopped training while partitioned: rounds {during}"

    # Right after the heal: node 1's link down 20 s; node 4 SIGKILLed mid-round and restarted.
    lab.link(1, up=False)
    time.sleep(5)
    last_before_kill = daemons[4].round
    lab.kill(4)
    lab.start(4, configs[4])
    time.sleep(15)
    lab.link(1, up=True)
    back = [d.round for d in daemons]

    # Reconverged: every node has trained 3 more rounds and their models agree. Rounds
    # themselves need not line up: there is no barrier, and a starved machine runs some
    # nodes several times slower than others (their spread is reported, not asserted).
    wait_until(lambda: all(d.round >= b + 3 for d, b in zip(daemons, back, strict=True))
               and spread(daemons)[1] <= 0.05,
               240, "the network to reconverge (3 more rounds each, accuracy within 0.05)", state)
    reconverged = [sum(1 for t, *_ in d.rounds if t > healed) for d in daemons]

    resumed = [line for line in daemons[4].log.read_text().splitlines() if "resumed from checkpoint" in line]
    assert resumed, "node 4 did not resume from its checkpoint"
    assert int(resumed[-1].rsplit(" ", 1)[1]) >= last_before_kill  # no finished round lost

    durations = [r[4] for d in daemons for r in d.rounds]
    report = (f"netns: rounds during the 30 s partition {during}; rounds after heal until "
              f"reconverged {reconverged} (round spread {spread(daemons)[0]}); "
              f"median round {statistics.median(durations):.2f} s; "
              f"final accuracy {[d.rounds[-1][2] for d in daemons]}")
    print(report)
    (tmp_path.parent / "netns-report.txt").write_text(report + "\n")
