import re

import pytest

from gptforge.config import load_config, to_toml
from gptforge.config.loader import preset_names
from gptforge.errors import GptforgeError


def test_defaults_then_file_then_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[model]\nn_layer = 3\n[train]\nmax_steps = 7\n")
    cfg = load_config(str(path), ["train.max_steps=9", "optim.lr=3e-4", "runtime.compile=true"])
    assert cfg.model.n_layer == 3 and cfg.train.max_steps == 9
    assert cfg.optim.lr == 3e-4 and cfg.runtime.compile is True
    assert cfg.model.n_embd == 384  # untouched default


def test_string_fields_keep_what_was_typed():
    cfg = load_config(None, ["train.out_dir=runs/123", "train.sample_prompt=ROMEO:",
                             "data.dir=42"])
    assert cfg.train.out_dir == "runs/123" and cfg.data.dir == "42"
    assert cfg.train.sample_prompt == "ROMEO:"


def test_unknown_key_names_the_closest_valid_one():
    with pytest.raises(GptforgeError, match="unknown config key 'train.max_step'.*train.max_steps"):
        load_config(None, ["train.max_step=3"])
    with pytest.raises(GptforgeError, match="unknown config section 'modle'.*'model'"):
        load_config(None, ["modle.n_layer=3"])


def test_wrong_type_and_invalid_values_are_errors(tmp_path):
    with pytest.raises(GptforgeError, match="train.max_steps must be int, got 'abc'"):
        load_config(None, ["train.max_steps=abc"])
    with pytest.raises(GptforgeError, match="must be int, got 2.5"):
        load_config(None, ["model.n_layer=2.5"])
    with pytest.raises(GptforgeError, match="multiple of model.n_head"):
        load_config(None, ["model.n_embd=100", "model.n_head=3"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n")
    with pytest.raises(GptforgeError, match="bad.toml: invalid TOML"):
        load_config(str(bad))


def test_saved_toml_reloads_to_the_same_config(tmp_path):
    cfg = load_config("shakespeare_char", ["train.sample_prompt=a \"quoted\"\\nline"])
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    assert load_config(str(path)) == cfg


@pytest.mark.parametrize("name", preset_names())
def test_every_shipped_preset_is_valid(name):
    load_config(name)


def test_required_user_facing_keys_exist():
    keys = ["model.n_layer", "model.n_head", "model.n_embd", "model.block_size",
            "train.batch_size", "train.grad_accum", "train.max_steps", "train.eval_interval",
            "train.eval_steps", "train.log_interval", "train.ckpt_interval", "train.seed",
            "train.out_dir", "optim.lr", "optim.weight_decay", "optim.grad_clip",
            "schedule.name", "schedule.warmup_steps", "data.dir", "runtime.device",
            "runtime.dtype", "runtime.compile"]
    text = to_toml(load_config(None))
    for key in keys:
        section, name = key.split(".")
        assert f"[{section}]" in text and f"\n{name} = " in text, key


@pytest.mark.parametrize("override, message", [
    ("schedule.name=cosin", "schedule.name must be one of cosine, wsd, linear, constant, not "
                            "'cosin'; did you mean 'cosine'?"),
    ("train.on_anomaly=rolback", "did you mean 'rollback'?"),
    ("runtime.parallel=fsdp2", "did you mean 'fsdp'?"),
    ("train.ckpt_format=shard", "did you mean 'sharded'?"),
    ("runtime.dtype=bf16", "runtime.dtype must be one of auto, float32, bfloat16, float16"),
])
def test_enum_like_settings_are_checked_when_the_config_loads(override, message):
    """A wrong choice fails at load, before any data is prepared or model built."""
    with pytest.raises(GptforgeError, match=re.escape(message)):
        load_config(None, [override])


def test_enum_like_settings_accept_every_choice_and_check_direct_construction():
    from gptforge.config.schema import OptimConfig, ScheduleName, choices

    for name in choices(ScheduleName):
        assert load_config(None, [f"schedule.name={name}"]).schedule.name == name
    assert load_config(None, ["optim.fused=true"]).optim.fused == "true"  # not a boolean
    with pytest.raises(ValueError, match="optim.name must be one of"):
        OptimConfig(name="sgd")
