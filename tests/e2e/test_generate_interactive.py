"""``gptforge generate --interactive``: a story continued turn by turn through standard input.

Facts checked: each turn's continuation is what the Python API gives for the whole story so far
(prompt + continuations + typed text) from a fresh prefill, though the loop keeps its KV cache;
/reset empties the story; a changed setting takes effect on the next turn (temperature 0 twice
gives the same text; max_tokens bounds it); end of input exits with 0.
"""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

import gptforge
from gptforge.cli import main
from tests.tiny_checkpoints import make_base


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("story"), init_std=0.3)[0]  # varied greedy text


@pytest.fixture(scope="module")
def reference(base):
    return gptforge.load(base, device="cpu")


@pytest.mark.slow
def test_the_story_accumulates_and_resets(base, reference):
    lines = ["hello", " more", "", "/show", "/reset", "/show", "hello", "/exit", "never read"]
    result = subprocess.run(
        [sys.executable, "-m", "gptforge", "generate", str(base), "--device", "cpu",
         "--interactive", "--temperature", "0", "--max-new-tokens", "8"],
        input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr

    def go_on(story: str) -> str:
        return reference.generate(story, max_new_tokens=8, temperature=0)

    first = go_on("hello")
    second = go_on("hello" + first + " more")
    third = go_on("hello" + first + " more" + second)  # an empty line: continue as is
    story = "hello" + first + " more" + second + third
    assert len({first, second, third}) > 1  # varied text: a real comparison
    assert result.stdout == (f"{first}\n{second}\n{third}\n{story}\n(story cleared)\n"
                             f"(the story is empty)\n{first}\n")


def test_settings_change_between_turns(base, reference, monkeypatch, capsys):
    lines = ["/temperature 0", "hello", "/reset", "hello", "/reset", "/max_tokens 3", "hello",
             "/set frequency_penalty=2", "/reset", "hello", "/top_k 0.5", "/top_p 2",
             "/nonsense"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))  # then EOF
    assert main(["generate", str(base), "--device", "cpu", "--interactive",
                 "--temperature", "1.5", "--max-new-tokens", "12"]) == 0
    out, err = capsys.readouterr()
    greedy = reference.generate("hello", max_new_tokens=12, temperature=0)
    short = reference.generate("hello", max_new_tokens=3, temperature=0)
    penalised = reference.generate("hello", max_new_tokens=3, temperature=0, frequency_penalty=2)
    assert out.startswith(f"(temperature = 0.0)\n{greedy}\n(story cleared)\n{greedy}\n"
                          f"(story cleared)\n(max_new_tokens = 3)\n{short}\n"
                          f"(frequency_penalty = 2.0)\n(story cleared)\n{penalised}\n")
    assert len(short) <= 3 < len(greedy)
    assert "unknown command /nonsense" in out
    assert err.splitlines() == ["error: top_k must be an integer, got '0.5'",
                                "error: top_p must be >= 0 and <= 1, got 2.0"]


def test_a_prompt_option_starts_the_story(base, reference, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("/show\n"))
    assert main(["generate", str(base), "--device", "cpu", "--interactive", "--prompt", "hi",
                 "--temperature", "0", "--max-new-tokens", "6"]) == 0
    continuation = reference.generate("hi", max_new_tokens=6, temperature=0)
    assert capsys.readouterr().out == f"{continuation}\nhi{continuation}\n"
    assert main(["generate", str(base), "--interactive", "--num-samples", "2"]) == 1
    assert "--interactive continues one story" in capsys.readouterr().err
