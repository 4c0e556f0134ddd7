"""`mllama chat` input, as ollama users expect it: line editing and history (readline), multi-line
messages between triple quotes, /help and /bye. The command itself is cli.cmd_chat."""

from __future__ import annotations

from collections.abc import Callable

CHAT_HELP = ('Commands: /image PATH (attach to your next message), /reset, /help, /bye (or /quit, Ctrl-D).\n'
             'Start a message with """ to write several lines, end it with """. Ctrl-C stops a reply.')


def enable_line_editing() -> None:
    """Arrow keys, history (this session) and Ctrl-R in input(), where the platform has readline."""
    try:
        import readline  # noqa: F401  (importing it is what turns line editing on for input())
    except ImportError:
        pass


def read_message(read: Callable[[str], str] | None = None) -> str:
    """One chat message: a line, or the lines between a leading \"\"\" and a closing \"\"\"."""
    read = read or input  # looked up per call, so a patched builtins.input is used
    line = read("you> ").strip()
    if not line.startswith('"""'):
        return line
    body = line[3:]
    if body.endswith('"""') and len(line) >= 6:
        return body[:-3].strip()
    lines = [body] if body else []
    while True:
        more = read("... ")
        if more.rstrip().endswith('"""'):
            lines.append(more.rstrip()[:-3])
            return "\n".join(lines).strip()
        lines.append(more)
