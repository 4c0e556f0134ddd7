"""The `mllama` console script and `python -m mllama`: the command line behind a Ctrl-C guard.

The script that pip generates imports its entry point before calling it, so the entry point must be
quick to import: this module imports nothing at module level, and `import mllama` is light (its
names load on first use). The command line itself (and torch behind it) is imported inside `run`,
where a Ctrl-C during that import ends the program with status 130 and no traceback.
"""

from __future__ import annotations


def run() -> int:
    try:
        from mllama.cli import main

        return main()
    except KeyboardInterrupt:
        return 130  # 128 + SIGINT, what a shell reports for a program stopped by Ctrl-C
