"""``gptforge chat`` driven through standard input, as a user (or a script piping text) runs it."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from gptforge.cli import main
from tests.tiny_checkpoints import make_base, make_lora_checkpoint

pytestmark = pytest.mark.slow


def chat(ckpt, text: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gptforge", "chat", str(ckpt), "--device", "cpu",
         "--temperature", "0", "--max-new-tokens", "8", *flags],
        input=text, capture_output=True, text=True, timeout=120)


def test_repl_answers_keeps_history_and_resets(tmp_path):
    base, model, tokenizer = make_base(tmp_path)
    ckpt = make_lora_checkpoint(tmp_path, base, model, tokenizer)  # a fine-tuned model's form
    result = chat(ckpt, "hello\n/history\n/reset\n/history\n/system Be brief.\nhow are you?\n"
                        "/history\n/exit\nnever read\n", "--system", "You are kind.")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    replies = [line for line in lines if line.startswith("assistant> ")]
    assert len(replies) == 2  # one per message; nothing after /exit
    first = replies[0].removeprefix("assistant> ")
    assert "[system] You are kind." in lines and "[user] hello" in lines
    assert f"[assistant] {first}" in lines
    cleared = lines.index("(conversation cleared)")
    assert lines[cleared + 1:cleared + 3] == ["[system] You are kind.", "(no turns yet)"]
    # After /system the new message is used; the history holds only the turn after /reset.
    tail = lines[lines.index("(system message set)"):]
    assert "[system] Be brief." in tail and "[user] how are you?" in tail
    assert "[user] hello" not in tail and "never read" not in result.stdout


def test_end_of_input_quits_and_bad_input_is_reported(tmp_path, monkeypatch, capsys):
    base, _, _ = make_base(tmp_path)
    # In-process this time (a subprocess costs seconds of imports); the char tokenizer lacks é.
    monkeypatch.setattr(sys, "stdin", io.StringIO("caf\u00e9\n/nonsense\nhello\n"))
    assert main(["chat", str(base), "--device", "cpu", "--temperature", "0",
                 "--max-new-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    assert "error:" in err and "'\u00e9'" in err and "unknown command /nonsense" in out
    assert out.count("assistant> ") == 1  # only hello got a reply


def test_replies_are_those_of_a_fresh_prefill_every_turn(tmp_path, monkeypatch, capsys):
    """The REPL keeps its KV cache between turns; /reset and /system change the prompt's start."""
    import gptforge
    from gptforge.inference.chat import fit_conversation, stream_reply
    from gptforge.inference.sampling import SamplingSettings

    base, _, _ = make_base(tmp_path, init_std=0.3)  # a wide init: varied replies
    lines = ["hello", "how are you?", "/reset", "fine.", "/system Be brief.", "ok", "and?"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    assert main(["chat", str(base), "--device", "cpu", "--temperature", "0",
                 "--max-new-tokens", "8", "--system", "You are kind."]) == 0
    out = capsys.readouterr().out

    generator = gptforge.load(base, device="cpu")  # every prompt prefilled from an empty cache
    settings = SamplingSettings(max_new_tokens=8, temperature=0)
    system, history, expected = "You are kind.", [], ""
    for line in lines:
        if line == "/reset":
            history, expected = [], expected + "(conversation cleared)\n"
        elif line.startswith("/system "):
            system, expected = line.removeprefix("/system "), expected + "(system message set)\n"
        else:
            head = [{"role": "system", "content": system}]
            fitted, prompt = fit_conversation(generator.tokenizer, head + history + [
                {"role": "user", "content": line}], 64 - 8)
            reply = "".join(stream_reply(generator, prompt, settings))
            history = fitted[1:] + [{"role": "assistant", "content": reply}]
            expected += f"assistant> {reply}\n"
    assert out == expected


def test_compile_flag_gives_the_same_replies(tmp_path, monkeypatch, capsys):
    """``--compile`` takes the static-shape decode step (run uncompiled here: a real compile
    takes half a minute and is tested in test_engine.py); the replies do not change."""
    from gptforge.inference import decode

    base, _, _ = make_base(tmp_path)
    talk = "hello\nhow are you?\n"
    outputs, calls = [], []
    for flags in ([], ["--compile"]):
        monkeypatch.setattr(sys, "stdin", io.StringIO(talk))
        if flags:
            monkeypatch.setattr(decode, "compiled_step",
                                lambda: calls.append(1) or decode.decode_step)
        assert main(["chat", str(base), "--device", "cpu", "--temperature", "0",
                     "--max-new-tokens", "6", *flags]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0].count("assistant> ") == 2
    assert outputs[1] == outputs[0] and calls
