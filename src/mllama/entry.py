"""The `mllama` console script and `python -m mllama`: the command line behind a Ctrl-C guard.

The script that pip generates imports its entry point before calling it, so the entry point must be
quick to import: this module imports nothing at module level, and `import mllama` is light (its
names load on first use). The command line itself (and torch behind it) is imported inside `run`,
where a Ctrl-C during that import ends the program with status 130 and no traceback.
"""

from __future__ import annotations


def run() -> int:
    try:
        from mllama.cli import main, tp_world_size

        code = main()
    except KeyboardInterrupt:
        return 130  # 128 + SIGINT, what a shell reports for a program stopped by Ctrl-C
    try:
        distributed = tp_world_size() > 1
    except Exception:  # noqa: BLE001 - a malformed WORLD_SIZE: main() has already said so
        distributed = False
    if distributed:
        # Under torchrun the work is done and the process group destroyed, but the interpreter's
        # teardown can still abort in a collective backend's threads ("terminate called without an
        # active exception", status -6 under load): flush and leave without it.
        import os
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
