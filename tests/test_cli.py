"""The command line on the shipped demo model: answers stream to stdout, bad input gets one clear line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mllama.cli import default_model_dir, example_image, main
from mllama.demo.shapes import COLORS, SHAPES


def test_generate_answers_about_the_example_image(capsys):
    assert main(["generate", "--image", str(example_image()), "What shape is this?"]) == 0
    answer = capsys.readouterr().out.strip().lower()
    assert answer, "nothing was printed"
    assert any(shape in answer for shape in SHAPES)


def test_generate_runs_as_a_console_script():
    out = subprocess.run([sys.executable, "-m", "mllama.cli", "generate", "--image", str(example_image()),
                          "--max-new-tokens", "12", "What color is the shape?"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert any(color in out.stdout.lower() for color in COLORS)


@pytest.mark.parametrize("argv,message", [
    (["generate", "--image", "no/such/file.png", "hi"], "image not found"),
    (["generate", "--model", "/nonexistent/model", "hi"], "not a model directory"),
])
def test_bad_input_gets_one_clear_line(argv, message, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unreadable_image_and_wrong_model_dir(tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert main(["generate", "--image", str(bad), "hi"]) == 1
    assert "cannot read the image" in capsys.readouterr().err
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert main(["generate", "--model", str(tmp_path), "hi"]) == 1
    assert "cannot load the model" in capsys.readouterr().err


def test_chat_answers_attaches_images_and_resets(monkeypatch, capsys):
    lines = iter([f"/image {example_image()}", "What shape is this?", "/reset",
                  f"/image {example_image()}", "What color is the shape?", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--max-new-tokens", "12"]) == 0
    captured = capsys.readouterr()
    out = captured.out.lower()
    assert out.count("assistant>") == 2
    assert any(shape in out for shape in SHAPES) and any(color in out for color in COLORS)
    assert "conversation cleared" in captured.err


def test_chat_keeps_the_conversation(monkeypatch, capsys):
    seen = []

    def fake_answer(model, processor, messages, images, args, *, raw_prompt=None):
        seen.append(([m["role"] for m in messages], len(images)))
        return "reply"

    lines = iter([f"/image {example_image()}", "first", "second", "/image missing.png", "third", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    monkeypatch.setattr("mllama.cli._answer", fake_answer)
    assert main(["chat"]) == 0
    assert seen == [(["user"], 1), (["user", "assistant", "user"], 1),
                    (["user", "assistant", "user", "assistant", "user"], 1)]
    assert "image not found: missing.png" in capsys.readouterr().err


def test_default_model_is_shipped():
    assert (default_model_dir() / "config.json").is_file()
    assert (default_model_dir() / "tokenizer.json").is_file()


def test_chat_multiline_help_bye_and_ctrl_c(monkeypatch, capsys):
    """ollama habits: \"\"\" multi-line messages, /help, Ctrl-C stops the reply (not the session), /bye."""
    import mllama.cli as cli

    lines = iter(["/help", '"""What shape', 'is this?"""', "What color is the shape?", "/bye", "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    asked = []
    real_answer = cli._answer

    def answer(model, processor, messages, images, args, **kw):
        asked.append(messages[-1]["content"][-1]["text"])
        if len(asked) == 1:
            raise KeyboardInterrupt  # Ctrl-C while the first reply streams
        return real_answer(model, processor, messages, images, args, **kw)

    monkeypatch.setattr(cli, "_answer", answer)
    assert main(["chat", "--max-new-tokens", "4"]) == 0
    err = capsys.readouterr().err
    assert asked == ["What shape\nis this?", "What color is the shape?"]
    assert "(stopped)" in err and err.count("/bye") >= 2  # the banner and /help
    assert next(lines) == "never read"


def test_read_message_forms():
    from mllama.cli_chat import read_message

    def reader(*lines):
        it = iter(lines)
        return lambda prompt: next(it)

    assert read_message(reader("  hi  ")) == "hi"
    assert read_message(reader('"""one line"""')) == "one line"
    assert read_message(reader('"""', "a", "b", '"""')) == "a\nb"


def test_prompt_from_stdin_and_version(monkeypatch, capsys):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("What shape is this?\n"))
    assert main(["generate", "--image", str(example_image()), "--max-new-tokens", "8", "-"]) == 0
    out = capsys.readouterr().out.lower()
    assert any(shape in out for shape in SHAPES), out
    monkeypatch.setattr("sys.stdin", io.StringIO("  \n"))
    assert main(["generate", "-"]) == 1
    assert "empty" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("mllama ")
