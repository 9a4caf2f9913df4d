"""Suite-wide settings."""

import torch

# The models under test are tiny: extra intra-op threads only fight each other (and
# the other test processes) for the 2 cores CI has. 4-node runs went from ~35 s to ~2 s.
torch.set_num_threads(1)
