"""Bad input through the CLI: one `error:` line naming what is wrong, exit 1, no traceback."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

from gptforge.cli import main
from gptforge.config.loader import load_config, save_config
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


def test_a_shard_with_ids_outside_the_vocabulary_is_named(tmp_path, capsys):
    """Ids beyond the tokenizer's vocabulary (data prepared with another tokenizer, or damaged)
    stop training with one line naming the shard and the id, not an IndexError (a device-side
    assert on CUDA) some steps in."""
    from gptforge.data.shards import read_shard, write_shard

    data = prepare_corpus(tmp_path, 200)
    vocab = json.loads((data / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    shard = data / "train" / "shard_000000.bin"
    tokens = np.array(read_shard(shard))
    tokens[::50] = vocab + 7  # in every window the first batch can draw
    write_shard(shard, tokens)
    capsys.readouterr()
    code, err = run_cli(["train", "-c", "tiny", f"data.dir={data}", "train.max_steps=3",
                         f"train.out_dir={tmp_path / 'r'}", "runtime.progress=false"], capsys)
    assert code == 1 and len(err) == 1, err
    assert str(shard) in err[0] and f"token id {vocab + 7}" in err[0], err
    assert f"vocabulary of {vocab} tokens" in err[0] and "gptforge prepare" in err[0]


def test_resuming_into_a_read_only_run_directory(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    save_config(load_config("tiny", [f"train.out_dir={run}", "data.dir=/nonexistent/x",
                                     "data.corpus="]), run / "config.toml")
    run.chmod(0o555)
    if os.geteuid() == 0:  # root writes anyway; refuse the way the kernel does for others
        def refuse(*args, **kwargs):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    try:
        code, err = run_cli(["train", "--resume", str(run)], capsys)
    finally:
        run.chmod(0o755)
    assert code == 1 and len(err) == 1, err
    assert f"run directory {run} is not writable" in err[0], err


def test_a_failed_start_leaves_no_empty_run_directory(tmp_path, capsys):
    out = tmp_path / "runs" / "mine"
    code, err = run_cli(["train", "-c", "tiny", f"train.out_dir={out}", "data.dir=/nonexistent/x",
                         "data.corpus="], capsys)
    assert code == 1 and "holds no prepared data" in err[-1]
    assert not (tmp_path / "runs").exists()
    (tmp_path / "kept").mkdir()  # a directory that was there before is left alone
    code, _ = run_cli(["train", "-c", "tiny", f"train.out_dir={tmp_path / 'kept'}",
                       "data.dir=/nonexistent/x", "data.corpus="], capsys)
    assert code == 1 and (tmp_path / "kept").is_dir()


def test_log_lines_go_above_the_progress_bar():
    """A line logged while a bar is on screen clears the bar, prints, and redraws the bar below;
    a plain handler would append the line to the half-drawn bar."""
    from tqdm import tqdm

    from gptforge.cli import ProgressAwareHandler

    stream = io.StringIO()
    logger = logging.getLogger("test_progress_bar")
    logger.propagate = False
    handler = ProgressAwareHandler(stream)
    logger.addHandler(handler)
    try:
        with tqdm(total=10, file=stream, mininterval=0) as bar:
            bar.update(3)
            logger.warning("a line of its own")
            bar.update(3)
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().split("\n")
    line = next(text for text in lines if "a line of its own" in text)
    assert line.rsplit("\r", 1)[-1] == "a line of its own"
    after = "\n".join(lines[lines.index(line) + 1:])
    assert "3/10" in after and "6/10" in after  # the bar is drawn again below the line
    # ... and the CLI logs through it (pytest's own handlers would keep it from setting up any).
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(logging.root, "handlers", [])
        patch.setattr(logging.root, "level", logging.root.level)
        main(["train", "train.x=1"])
        assert [type(h) for h in logging.root.handlers] == [ProgressAwareHandler]
