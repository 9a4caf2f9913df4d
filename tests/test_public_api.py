"""The public API is a promise: changing it must be a decision, not an accident."""

import p2pfl
import p2pfl.aggregation


def test_top_level_names_are_pinned() -> None:
    assert sorted(p2pfl.__all__) == sorted(
        [
            "RULES",
            "Aggregate",
            "Identity",
            "Learner",
            "Limits",
            "Metrics",
            "NetConfig",
            "Node",
            "NodeConfig",
            "NodeStatistics",
            "P2PFLError",
            "PrivacyConfig",
            "ReputationConfig",
            "RoundConfig",
            "TorchLearner",
            "aggregate",
            "decode_state",
            "encode_state",
            "errors",
            "run_node",  # issue 11: a blocking entry point for programs that are not async
        ]
    )
    assert all(hasattr(p2pfl, name) for name in p2pfl.__all__)


def test_aggregation_rules_are_registered_by_name() -> None:
    assert sorted(p2pfl.aggregation.RULES) == [
        "balance",
        "centered_clip",
        "clipped_gossip",
        "geomed",
        "ios",
        "krum",
        "mean",
        "median",
        "multi_krum",
        "trimmed_mean",
    ]
    assert p2pfl.aggregation.DEFAULT_RULE == "clipped_gossip"


def test_every_error_derives_from_the_root() -> None:
    errors = [getattr(p2pfl.errors, name) for name in p2pfl.errors.__all__]
    assert all(issubclass(error, p2pfl.P2PFLError) for error in errors)


def test_importing_p2pfl_does_not_import_libp2p() -> None:
    import subprocess
    import sys

    code = "import sys, p2pfl; print('libp2p' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # embedding over a memory transport stays light
