"""Untrusted input the library takes (issue 14): text typed by users, chat templates shipped with
checkpoints, image URLs, and Ctrl-C at any moment of the command line's start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

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


# ---- Ctrl-C while the command line starts ----------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]


def _console_script() -> str:
    """What pip writes for the `mllama` entry point of pyproject.toml, started under a finder that
    stalls the import of the command line (torch behind it takes seconds in real life)."""
    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["mllama"]
    module, function = target.split(":")
    return (
        "import sys, time\n"
        "class Stall:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'mllama.cli':\n"
        "            print('importing', flush=True)\n"
        "            time.sleep(60)\n"
        "sys.meta_path.insert(0, Stall())\n"
        f"from {module} import {function}\n"
        f"sys.exit({function}())\n")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}


def test_ctrl_c_while_the_command_line_imports_exits_130_without_a_traceback():
    proc = subprocess.Popen([sys.executable, "-c", _console_script(), "--help"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())
    try:
        assert proc.stdout.readline() == "importing\n"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err and "KeyboardInterrupt" not in err, err


def test_the_entry_point_imports_nothing_heavy():
    """The generated script imports the entry point before any guard can run."""
    code = "import sys, mllama.entry; print(sorted(m for m in ('torch', 'numpy', 'mllama.cli') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


def test_the_lazy_package_still_exports_every_name():
    import mllama
    from mllama.config import MllamaConfig
    from mllama.model import MllamaForConditionalGeneration

    assert all(isinstance(getattr(mllama, name), type) for name in mllama.__all__)
    assert mllama.AutoConfig is MllamaConfig and mllama.AutoModelForImageTextToText is MllamaForConditionalGeneration
    assert set(mllama.__all__) <= set(dir(mllama))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        mllama.Nope  # noqa: B018
