"""`python -m mllama ...` and `torchrun --nproc-per-node N -m mllama generate ...`: the command line."""

import sys

from mllama.entry import run

sys.exit(run())
