import json

import pytest
import torch

from gptforge.checkpoints.checkpointer import prune_checkpoints
from gptforge.checkpoints.format import (
    SHARDED_MODEL,
    SHARDED_OPTIMIZER,
    is_sharded,
    latest_checkpoint,
    load_trainer_state,
    load_weights,
    model_config_of,
    read_meta,
    read_weights,
    resolve_checkpoint,
    save_checkpoint,
    staging_dir,
    weights_sha256,
)
from gptforge.checkpoints.state import weights_to_save
from gptforge.errors import GptforgeError
from gptforge.model import GPT, ModelConfig


@pytest.fixture
def setup(tmp_path):
    cfg = ModelConfig(vocab_size=40, n_layer=1, n_head=2, n_embd=16, block_size=8)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "chars.json").write_text("{}")
    return cfg, GPT(cfg), tok, tmp_path / "run"


def save(run, model, cfg, tok, step, val_loss=None, state=None):
    weights = weights_to_save(model, model.state_dict())
    return save_checkpoint(run, step=step, weights=weights, model_config=cfg,
                                      tokenizer_dir=tok, tokenizer_info={"sha256": "x"},
                                      trainer_state=state or {"step": step}, val_loss=val_loss)


def test_round_trip_is_exact_and_keys_are_unprefixed(setup):
    cfg, model, tok, run = setup
    path = save(run, model, cfg, tok, 5)
    assert resolve_checkpoint(run) == path
    meta = read_meta(path)
    clone = GPT(model_config_of(meta, path))
    load_weights(clone, path)
    for (name, a), (_, b) in zip(model.state_dict().items(), clone.state_dict().items()):
        assert torch.equal(a, b), name
    from safetensors import safe_open
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert all(not k.startswith(("_orig_mod.", "module.")) for k in f.keys())
    assert (path / "tokenizer" / "chars.json").is_file()
    assert load_trainer_state(path) == {"step": 5}
    # The tied output layer is stored once, and read back under both names.
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    state = read_weights(path, clone)
    assert torch.equal(state["lm_head.weight"], state["tok_emb.weight"])


def test_failed_write_leaves_latest_checkpoint_intact(setup, monkeypatch):
    cfg, model, tok, run = setup
    good = save(run, model, cfg, tok, 1)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(GptforgeError, match="disk full.*step-000001 is intact"):
        save(run, model, cfg, tok, 2)
    assert latest_checkpoint(run) == good
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == ["step-000001"]  # no debris


def test_pruning_keeps_newest_and_best(setup):
    cfg, model, tok, run = setup
    for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5), (5, None)]:
        save(run, model, cfg, tok, step, val_loss=loss)
    (staging_dir(run, 6) / "model").mkdir(parents=True)  # a crash mid-save left it
    removed = prune_checkpoints(run, keep_last=2, keep_best=1)
    assert sorted(p.name for p in removed) == [".tmp-step-000006-sharded", "step-000001",
                                               "step-000003"]
    assert not staging_dir(run, 6).exists()
    assert (run / "best").read_text().strip() == "ckpt/step-000002"


def test_incompatible_checkpoints_are_refused(setup):
    cfg, model, tok, run = setup
    path = save(run, model, cfg, tok, 1)
    meta = json.loads((path / "model.json").read_text())
    other = GPT(ModelConfig(vocab_size=40, n_layer=2, n_head=2, n_embd=16, block_size=8))
    with pytest.raises(GptforgeError, match="weights do not fit"):
        load_weights(other, path)
    meta["format_version"] = 99
    (path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(GptforgeError, match="format 99 is not supported"):
        read_meta(path)
    with pytest.raises(GptforgeError, match="no such checkpoint"):
        resolve_checkpoint(run / "nope")


def save_sharded(run, model, cfg, tok, step):
    """A sharded checkpoint as training writes it in one process: DCP shards, then the rest."""
    from gptforge.checkpoints import state as checkpoint_state

    staged = staging_dir(run, step)
    checkpoint_state.save_sharded_model(model, staged / SHARDED_MODEL)
    optimizer = torch.optim.AdamW(model.parameters())
    checkpoint_state.save_sharded_optimizer(model, optimizer, staged / SHARDED_OPTIMIZER)
    return save_checkpoint(run, step=step, weights=None, model_config=cfg,
                                      tokenizer_dir=tok, tokenizer_info={"kind": "char"},
                                      trainer_state={"step": step}, val_loss=None, staged=staged)


def test_sharded_checkpoint_round_trip_and_fit_checks(setup):
    cfg, _, tok, run = setup
    torch.manual_seed(0)
    model = GPT(cfg)
    ckpt = save_sharded(run, model, cfg, tok, 3)
    assert is_sharded(ckpt) and not (ckpt / "model.safetensors").exists()
    assert json.loads((ckpt / "model.json").read_text())["weights"] == "sharded"
    assert latest_checkpoint(run) == ckpt
    assert not list((run / "ckpt").glob(".tmp-*"))
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(str(ckpt / "model")).read_metadata().state_dict_metadata
    assert "tok_emb.weight" in saved and "lm_head.weight" not in saved  # tied: stored once

    other = GPT(cfg)
    load_weights(other, ckpt)
    for name, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[name], value), name

    wider = GPT(ModelConfig(**{**cfg.to_dict(), "n_embd": cfg.n_embd * 2}))
    with pytest.raises(GptforgeError, match="wrong shape"):
        load_weights(wider, ckpt)
    deeper = GPT(ModelConfig(**{**cfg.to_dict(), "n_layer": cfg.n_layer + 1}))
    with pytest.raises(GptforgeError, match="missing"):
        load_weights(deeper, ckpt)


def test_weights_fingerprint(setup):
    import hashlib

    cfg, _, tok, run = setup
    model = GPT(cfg)
    full = save(run, model, cfg, tok, 1)
    expected = hashlib.sha256((full / "model.safetensors").read_bytes()).hexdigest()
    assert weights_sha256(full) == expected  # what `sha256sum` prints
    sharded = save_sharded(run, model, cfg, tok, 2)
    first = weights_sha256(sharded)
    with torch.no_grad():
        model.tok_emb.weight[0, 0] += 1.0
    changed = save_sharded(run, model, cfg, tok, 3)
    assert first != weights_sha256(changed)
