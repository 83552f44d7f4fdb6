"""Damaged, hostile or unwritable checkpoints: one `error:` line, exit 1, nothing lost.

Each case is what a user meets when a copy was cut short, a file was replaced, a run diverged or a
disk filled up. None may end in a traceback, and none may run code from the checkpoint.
"""

from __future__ import annotations

import errno
import json
import pickle

import pytest
import torch

from gptforge.cli import main
from tests.conftest import prepare_corpus
from tests.tiny_checkpoints import make_base

TINY = ["-c", "tiny", "runtime.progress=false", "runtime.device=cpu", "train.batch_size=4",
        "train.eval_steps=1", "train.sample_tokens=0"]


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0]
    return err[0]


def generate(ckpt) -> int:
    return main(["generate", str(ckpt), "--device", "cpu", "--max-new-tokens", "3"])


@pytest.fixture
def ckpt(tmp_path):
    return make_base(tmp_path)[0]


@pytest.mark.parametrize("damage, expected", [
    (lambda b: b[: len(b) // 2], "model.safetensors is damaged"),
    (lambda b: b"\x00\x01garbage" * 50, "model.safetensors is damaged"),
    (lambda b: b"", "model.safetensors is damaged"),
])
def test_damaged_weights(ckpt, capsys, damage, expected):
    path = ckpt / "model.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    assert generate(ckpt) == 1
    assert expected in one_error_line(capsys)


@pytest.mark.parametrize("content", [b"[1, 2, 3]", b"\x89PNG\r\n\x1a\n\x00\xff\xfe", b'"text"',
                                     b'{"format_version": 1, "model": [1]}'])
def test_model_json_that_is_not_an_object(ckpt, capsys, content):
    (ckpt / "model.json").write_bytes(content)
    assert generate(ckpt) == 1
    assert "model.json" in one_error_line(capsys)


def test_non_finite_weights_are_refused(ckpt, capsys):
    from safetensors.torch import load_file, save_file

    weights = load_file(str(ckpt / "model.safetensors"))
    name = sorted(weights)[0]
    weights[name][0] = float("nan")
    save_file(weights, str(ckpt / "model.safetensors"))
    assert generate(ckpt) == 1
    line = one_error_line(capsys)
    assert "NaN" in line and name in line


@pytest.fixture
def run(tmp_path, capsys):
    data = prepare_corpus(tmp_path, 200)
    out = tmp_path / "run"
    assert main(["train", *TINY, f"data.dir={data}", f"train.out_dir={out}",
                 "train.max_steps=2"]) == 0
    capsys.readouterr()
    return out


def latest(run):
    return run / (run / "latest").read_text().strip()


def test_truncated_trainer_state(run, capsys):
    state = latest(run) / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    assert main(["train", "--resume", str(run), "train.max_steps=3"]) == 1
    assert "trainer_state.pt is damaged" in one_error_line(capsys)


class _Exploit:
    def __reduce__(self):  # what a hostile pickle does: call a function on load
        return (print, ("this must never run",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_trainer_state_is_refused_without_running_it(run, capsys):
    state = latest(run) / "trainer_state.pt"
    with open(state, "wb") as f:
        pickle.dump({"loop": _Exploit()}, f)
    assert main(["train", "--resume", str(run), "train.max_steps=3"]) == 1
    captured = capsys.readouterr()
    assert "this must never run" not in captured.out
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert len(err) == 1 and "trainer_state.pt" in err[0] and "refused" in err[0], err


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed "
                 "writing file data/0: file write failed"),
])
def test_disk_full_during_a_save_keeps_the_last_checkpoint(run, capsys, monkeypatch, failure):
    before = latest(run)

    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(torch, "save", fail)
    assert main(["train", "--resume", str(run), "train.max_steps=4"]) == 1
    line = one_error_line(capsys)
    assert "could not write checkpoint" in line and before.name in line
    assert latest(run) == before
    assert json.loads((before / "model.json").read_text())["step"] == 2
    assert not any(p.name.startswith(".tmp") for p in (run / "ckpt").iterdir())


def test_disk_full_inside_safetensors(run, capsys, monkeypatch):
    import safetensors.torch

    def fail(*args, **kwargs):
        raise safetensors.SafetensorError("Error while serializing: IoError(Os { code: 28, "
                                          "kind: StorageFull, message: \"No space left\" })")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    assert main(["train", "--resume", str(run), "train.max_steps=4"]) == 1
    line = one_error_line(capsys)
    assert "could not write checkpoint" in line and "step-000002" in line
