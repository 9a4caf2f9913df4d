"""Suite-wide settings."""

import logging
from collections.abc import Iterator

import pytest
import torch

# The models under test are tiny: extra intra-op threads only fight each other (and
# the other test processes) for the 2 cores CI has. 4-node runs went from ~35 s to ~2 s.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _restore_logger_levels() -> Iterator[None]:
    """Give each test back the log levels it started with: `p2pfl sim` run in-process sets
    p2pfl's loggers to ERROR (``quiet_nodes``), which hid the warnings later tests read."""
    loggers = [logging.root, *(x for x in logging.root.manager.loggerDict.values() if isinstance(x, logging.Logger))]
    levels = [(logger, logger.level) for logger in loggers]
    yield
    for logger, level in levels:
        logger.setLevel(level)
