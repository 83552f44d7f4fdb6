"""Bad input through the CLI: one `error:` line naming what is wrong, exit 1, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from gptforge.cli import main
from tests.conftest import prepare_corpus


def run_cli(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize("args, expected", [
    (["train", "train.max_step=3"], "did you mean 'train.max_steps'"),
    (["train", "-c", "no_such_preset"], "no config file or preset named 'no_such_preset'"),
    (["train", "model.n_layer=two"], "model.n_layer must be int"),
    (["train", "data.dir=/nonexistent/x", "data.corpus="], "holds no prepared data"),
    (["generate", "/nonexistent/run"], "no such checkpoint or run directory"),
    (["train", "--resume", "/nonexistent/run"], "config.toml not found"),
    (["tokenizer", "train", "--kind", "bpe", "--input", "hf:json", "--out", "/tmp/unused"],
     "for a Hugging Face dataset use `gptforge prepare"),
    pytest.param(["train", "runtime.device=cuda"], "no CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has a GPU")),
])
def test_bad_input_gives_one_line(args, expected, capsys):
    code, err = run_cli(args, capsys)
    assert code == 1
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err


def test_block_size_larger_than_the_data(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world, " * 40)
    assert main(["prepare", "--input", str(corpus), "--tokenizer", "char", "--out",
                 str(tmp_path / "d"), "--workers", "1"]) == 0
    capsys.readouterr()
    code, err = run_cli(["train", "-c", "tiny", f"data.dir={tmp_path / 'd'}",
                         f"train.out_dir={tmp_path / 'r'}", "model.block_size=256"], capsys)
    assert code == 1 and "val split has" in err[-1] and "model.block_size" in err[-1]


def test_unwritable_run_directory(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = run_cli(["train", f"train.out_dir={blocker / 'run'}"], capsys)
    assert code == 1 and "cannot create run directory" in err[-1]


def test_debug_shows_the_traceback_and_module_entry_point_works():
    proc = subprocess.run([sys.executable, "-m", "gptforge", "--debug", "train", "train.x=1"],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr
    help_out = subprocess.run([sys.executable, "-m", "gptforge", "--help"], capture_output=True,
                              text=True).stdout
    for command in ("prepare", "tokenizer", "train", "generate"):
        assert command in help_out


@pytest.mark.skipif(torch.cuda.is_available(), reason="has a GPU")
def test_auto_batch_size_needs_cuda(tmp_path, capsys):
    data = prepare_corpus(tmp_path, 200)
    capsys.readouterr()
    code, err = run_cli(["train", "-c", "tiny", f"data.dir={data}",
                         f"train.out_dir={tmp_path / 'r'}", "train.batch_size=auto"], capsys)
    assert code == 1 and "needs a CUDA GPU" in err[-1]
    code, err = run_cli(["train", "train.batch_size=1.5"], capsys)
    assert code == 1 and "positive integer or 'auto'" in err[-1]


def test_output_piped_into_a_reader_that_stops_is_not_an_error(tmp_path):
    """`gptforge generate ... | head -1`: the closed pipe ends the command quietly (exit 141, as
    a shell reports SIGPIPE), with no traceback on stderr."""
    from tests.tiny_checkpoints import make_base

    ckpt, _, _ = make_base(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptforge", "generate", str(ckpt), "--device", "cpu",
         "--num-samples", "400", "--max-new-tokens", "40", "--seed", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # the reader goes away
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipe" not in err
