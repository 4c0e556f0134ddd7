"""`python -m mllama ...` and `torchrun --nproc-per-node N -m mllama generate ...`: the command line."""

import sys

try:
    from mllama.cli import main
except KeyboardInterrupt:  # Ctrl-C while torch is still importing: no traceback
    sys.exit(130)

sys.exit(main())
