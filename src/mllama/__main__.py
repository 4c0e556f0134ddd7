"""`python -m mllama ...` and `torchrun --nproc-per-node N -m mllama generate ...`: the command line."""

import sys

from mllama.cli import main

sys.exit(main())
