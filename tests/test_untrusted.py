"""Untrusted input the library takes (issue 14): text typed by users, chat templates shipped with
checkpoints, image URLs, and Ctrl-C at any moment of the command line's start."""

from __future__ import annotations

import time

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mllama import chat_template
from mllama.chat_template import render_template

# ---- chat templates: the time budget holds in loops that call nothing ------------------------------------------
_HUGE = "{% set xs = range(100000) | list %}"


@pytest.mark.parametrize("template", [
    _HUGE + "{% for i in xs %}{% for j in xs %}{% endfor %}{% endfor %}",
    "{% set s = 'a' * 5000 %}{% for i in s %}{% for j in s %}{% for k in s %}{% endfor %}{% endfor %}{% endfor %}",
    _HUGE + "{% for i in xs if i >= 0 %}{% for j in xs if j >= 0 %}{% endfor %}{% endfor %}",
    _HUGE + "{% for i in xs %}{% for j in xs %}{% endfor %}{% else %}{% endfor %}",
])
def test_the_deadline_stops_loops_with_empty_bodies(monkeypatch, template):
    monkeypatch.setattr(chat_template, "TEMPLATE_SECONDS", 0.5)
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"chat template: rendering took longer than 0.5 s"):
        render_template(template)
    assert time.monotonic() - start < 3


@pytest.mark.parametrize("template", [
    "{% for m in messages if m.r %}{{ loop.index }}/{{ loop.length }}{{ m.r }}{% if loop.last %}!{% endif %}"
    "{% else %}none{% endfor %}",
    "{% for m in [] %}x{% else %}none{% endfor %}{% for k, v in d | dictsort %}{{ k }}={{ v }};{% endfor %}",
    "{% for n in tree recursive %}{{ n.v }}{% if n.c %}({{ loop(n.c) }}){% endif %}{% endfor %}",
    "{% for c in 'abc' %}{% if c == 'b' %}{% continue %}{% endif %}{{ loop.previtem }}{{ c }}{% endfor %}",
])
def test_timed_loops_render_as_jinja_does(template):
    variables = {"messages": [{"r": "a"}, {"r": ""}, {"r": "b"}], "d": {"b": 1, "a": 2},
                 "tree": [{"v": 1, "c": [{"v": 2, "c": [{"v": 3}]}]}, {"v": 4}]}
    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    assert render_template(template, **variables) == plain.from_string(template).render(**variables)
