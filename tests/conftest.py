"""Shared fixtures: tiny corpora and configs built inside each test (nothing is downloaded)."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _empty_working_directory(tmp_path_factory):
    """Run the tests in an empty directory of their own, not wherever pytest was started: a test
    must neither depend on what the user's working directory holds (a `runs/` of an earlier
    `gptforge train`) nor write into it (see ``_nothing_written_to_cwd``)."""
    cwd = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        yield cwd


@pytest.fixture(autouse=True)
def _nothing_written_to_cwd(_empty_working_directory):
    yield
    left = sorted(p.name for p in _empty_working_directory.iterdir())
    for path in _empty_working_directory.iterdir():  # so that only this test fails
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert not left, (f"the test left {left} in the working directory; write under tmp_path "
                      "(commands that fail must not leave files behind)")


@pytest.fixture(scope="session", autouse=True)
def _private_cache_directory(tmp_path_factory):
    """The autotune cache (train/autotune.py) goes to a directory of the session's own, never
    the user's ~/.cache (subprocesses inherit it)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg_cache")))
        yield


@pytest.fixture(autouse=True)
def _few_threads():
    # Tests are tiny; more threads only add contention on the 2-core CI machine.
    torch.set_num_threads(1)


def make_corpus_text(n_lines: int = 400, seed: int = 0) -> str:
    """A small text with learnable structure: names, repeated phrases, simple grammar."""
    rng = random.Random(seed)
    names = ["ROMEO", "JULIET", "NURSE", "FRIAR", "TYBALT"]
    verbs = ["loves", "sees", "calls", "follows", "greets"]
    objects = ["the moon", "the night", "her friend", "the garden", "the stars"]
    lines = []
    for _ in range(n_lines):
        lines.append(f"{rng.choice(names)}:\n{rng.choice(names).title()} {rng.choice(verbs)} "
                     f"{rng.choice(objects)}.\n")
    return "\n".join(lines)


def prepare_corpus(root: Path, n_lines: int = 400, *options: str,
                   tokenizer: str = "char") -> Path:
    """``make_corpus_text(n_lines)`` in ``root/corpus.txt``, prepared through the CLI (one
    worker, plus ``options``) into ``root/prepared``, which is returned."""
    from gptforge.cli import main

    corpus, out = Path(root) / "corpus.txt", Path(root) / "prepared"
    corpus.write_text(make_corpus_text(n_lines))
    assert main(["prepare", "--input", str(corpus), "--tokenizer", tokenizer, "--out", str(out),
                 "--workers", "1", *options]) == 0
    return out


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(make_corpus_text())
    return path
