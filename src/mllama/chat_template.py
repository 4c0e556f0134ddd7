"""Chat templates rendered in jinja's immutable sandbox under a time and size budget.

A chat template comes with a checkpoint, so it is untrusted code: the sandbox keeps it from
reaching Python internals, and the budget keeps it from looping for minutes or building gigabytes.
The render stops with a ValueError after TEMPLATE_SECONDS or TEMPLATE_MAX_CHARS of output; the
deadline is checked at every call the template makes and every 1024 iterations of every loop
(`{% for %}` is jinja's only loop, so nested loops with empty bodies stop too); `*` and `**` that
would build a string/list or an integer past the size budget are refused before they run; every other error a template raises (OverflowError, TypeError, ...) is wrapped in a ValueError
that says it came from the chat template. Raise the module constants for unusual templates.
"""

from __future__ import annotations

import json
import re
import threading
import time
from datetime import datetime
from functools import lru_cache
from typing import Any, Iterable, Iterator

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.ext import loopcontrols
from jinja2.runtime import LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["TEMPLATE_MAX_CHARS", "TEMPLATE_SECONDS", "compile_template", "render_template"]

TEMPLATE_SECONDS = 5.0
TEMPLATE_MAX_CHARS = 10_000_000
_state = threading.local()


class _OverBudget(jinja2.TemplateError):
    pass


def _check_time() -> None:
    deadline = getattr(_state, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise _OverBudget(f"rendering took longer than {TEMPLATE_SECONDS:g} s (mllama.chat_template.TEMPLATE_SECONDS)")


def _timed(iterable: Iterable[Any]) -> Iterator[Any]:
    for count, item in enumerate(iterable):
        if not count & 1023:  # every iteration would cost a clock read per loop step of every template
            _check_time()
        yield item


class _TimedLoops(CodeGenerator):
    """Compiles every `{% for x in xs %}` as `for x in environment.timed_iter(xs)`: a loop whose body calls
    nothing (`{% for i in xs %}{% for j in xs %}{% endfor %}{% endfor %}`) would never reach `call`."""

    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        wrapped = isinstance(node.iter, nodes.Call) and isinstance(node.iter.node, nodes.EnvironmentAttribute)
        if not wrapped:  # the names inside stay the same, so jinja's symbol analysis still holds
            node.iter = nodes.Call(nodes.EnvironmentAttribute("timed_iter"), [node.iter], [], None, None,
                                   lineno=node.lineno)
        super().visit_For(node, frame)


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d*)(?:\.(\*|\d*))?[a-zA-Z%]")
_BRACE_SPEC = re.compile(r"\{[^{}]*?:([^{}]*)\}")


def _check_widths(fmt: Any, args: Any = ()) -> None:
    """Refuse field widths and precisions past the size budget before formatting: '%0999999999d' % 1
    or '{:>999999999}'.format(x) would allocate gigabytes before the output's size is checked."""
    if not isinstance(fmt, str):
        return
    numbers = [n for spec in _PERCENT_SPEC.finditer(fmt) for n in spec.groups() if n and n != "*"]
    if "*" in fmt:  # '%*d' takes its width from the arguments
        values = args if isinstance(args, tuple) else (args,)
        numbers += [str(abs(v)) for v in values if isinstance(v, int) and not isinstance(v, bool)]
    numbers += re.findall(r"\d+", " ".join(_BRACE_SPEC.findall(fmt)))
    if any(len(n) > 8 or int(n) > TEMPLATE_MAX_CHARS for n in numbers):
        raise _OverBudget(f"a format width or precision in {fmt!r:.60} is past the size budget of {TEMPLATE_MAX_CHARS}")


class _BudgetedSandbox(ImmutableSandboxedEnvironment):
    """Checks the deadline at every call the template makes and along every loop, and bounds `*` and
    `**` before they run."""

    intercepted_binops = frozenset(["*", "**", "%"])
    code_generator_class = _TimedLoops

    @staticmethod
    def timed_iter(iterable: Any) -> Iterator[Any]:
        return _timed(iterable)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _check_time()
        if isinstance(__obj, LoopContext) and args:  # `loop(children)` of a recursive loop: its own iterable
            args = (_timed(args[0]), *args[1:])
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Any:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None

        def checked(*args: Any, **kwargs: Any) -> str:
            _check_widths(value.__self__)
            return wrapped(*args, **kwargs)

        return checked

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check_time()
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(count, int) and len(seq) * count > TEMPLATE_MAX_CHARS:
                    raise _OverBudget(f"{len(seq)} * {count} items is past the size budget of {TEMPLATE_MAX_CHARS}")
        if operator == "%":
            _check_widths(left, right)
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
            if right * abs(left).bit_length() > 8 * TEMPLATE_MAX_CHARS:
                raise _OverBudget(f"{left} ** {right} is past the size budget")
        return super().call_binop(context, operator, left, right)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        # jinja's own tojson HTML-escapes, which would change the prompt text
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = _BudgetedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    plain_format = env.filters["format"]

    def checked_format(value: Any, *args: Any, **kwargs: Any) -> str:
        _check_widths(value, args)
        return plain_format(value, *args, **kwargs)

    env.filters["format"] = checked_format
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as err:
        raise ValueError(f"chat template: {err}") from err


def render_template(source: str, **variables: Any) -> str:
    """The template rendered with `variables`; a ValueError for any failure, including the budget."""
    template = compile_template(source)
    _state.deadline = time.monotonic() + TEMPLATE_SECONDS
    pieces, size = [], 0
    try:
        for piece in template.generate(**variables):
            size += len(piece)
            if size > TEMPLATE_MAX_CHARS:
                raise _OverBudget(f"the output passed the size budget of {TEMPLATE_MAX_CHARS} characters "
                                  "(mllama.chat_template.TEMPLATE_MAX_CHARS)")
            _check_time()
            pieces.append(piece)
    except jinja2.TemplateError as err:  # includes the template's own raise_exception(...)
        raise ValueError(f"chat template: {err}") from err
    except (ArithmeticError, TypeError, ValueError, LookupError, AttributeError, RecursionError, MemoryError) as err:
        raise ValueError(f"chat template failed: {type(err).__name__}: {err}") from err
    finally:
        _state.deadline = None
    return "".join(pieces)
