"""Every setting of a run, with its default and meaning.

A run's config is a tree of frozen dataclasses, one per section (``[model]``, ``[data]``,
``[train]``, ``[optim]``, ``[schedule]``, ``[runtime]``). Defaults live here and nowhere else;
presets in ``configs/*.toml`` hold only their differences; ``section.key=value`` on the command
line overrides both. Each field's docstring is its documentation.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Literal

from gptforge.model.config import ModelConfig

# The choices of enum-like settings, defined once: the config checks them when it is built
# (with "did you mean" help), and the code that acts on them may take the lists from here.
TokenizerKind = Literal["char", "bpe", "sentencepiece"]
CheckpointFormat = Literal["full", "sharded"]
AnomalyPolicy = Literal["stop", "skip", "rollback"]
OptimizerName = Literal["adamw", "muon", "adafactor"]
FusedSetting = Literal["auto", "true", "false"]
ScheduleName = Literal["cosine", "wsd", "linear", "constant"]
WeightDecaySchedule = Literal["constant", "follow_lr", "linear"]
DtypeName = Literal["auto", "float32", "bfloat16", "float16"]
ParallelStrategy = Literal["ddp", "fsdp"]
ChatSetting = Literal["auto", "true", "false"]


def choices(kind) -> tuple[str, ...]:
    """The values a ``Literal`` setting allows, e.g. ``choices(ScheduleName)``."""
    return typing.get_args(kind)


def check_choices(section) -> None:
    """Raise ValueError if a ``Literal`` field of the dataclass ``section`` holds another value."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        allowed = choices(hints[f.name]) if typing.get_origin(hints[f.name]) is Literal else ()
        value = getattr(section, f.name)
        if allowed and value not in allowed:
            close = difflib.get_close_matches(str(value), allowed, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"{section.config_section}.{f.name} must be one of "
                             f"{', '.join(allowed)}, not {value!r}{hint}")


class _Section:
    """A config section whose ``Literal`` fields are checked when it is built."""

    config_section = ""

    def __post_init__(self) -> None:
        check_choices(self)


@dataclass(frozen=True)
class DataConfig(_Section):
    config_section = "data"

    dir: str = "data/shakespeare_char"
    """Prepared data directory (``gptforge prepare --out``): manifest.json, tokenizer/, train/,
    val/."""
    corpus: str = ""
    """Built-in corpus to prepare into ``data.dir`` when it does not exist yet (``shakespeare``)."""
    tokenizer: TokenizerKind = "char"
    """Tokenizer used when a built-in corpus is prepared: ``char``, ``bpe`` or ``sentencepiece``."""
    vocab_size: int = 0
    """Vocabulary size when a built-in corpus is prepared with bpe/sentencepiece (0 = default)."""
    mixture: str = ""
    """Train on several prepared datasets at once, e.g. ``"data/web:3,data/code:1"`` (DIR:WEIGHT;
    weights are normalised). Each row of a batch comes from one dataset, drawn with these weights.
    All must share one tokenizer; ``data.dir`` is then ignored. Recorded in RUN_DIR/mixture.json."""


@dataclass(frozen=True)
class TrainConfig(_Section):
    config_section = "train"

    batch_size: int | str = 16
    """Sequences per micro-batch (per process); ``"auto"`` (CUDA) finds the largest that fits in
    memory and derives grad_accum from ``train.global_batch_tokens``."""
    grad_accum: int = 1
    """Micro-batches accumulated into one optimizer step (derived when global_batch_tokens > 0)."""
    global_batch_tokens: int = 0
    """Tokens per optimizer step over all processes; if > 0, grad_accum is derived from it as
    global_batch_tokens / (batch_size * block_size * world_size), which must divide exactly."""
    max_steps: int = 2000
    """Optimizer steps to train for."""
    eval_interval: int = 250
    """Evaluate on the val split every this many steps (and at the first and last step)."""
    eval_steps: int = 20
    """Val batches averaged per evaluation."""
    log_interval: int = 10
    """Write a training line to metrics.jsonl every this many steps."""
    ckpt_interval: int = 500
    """Save a checkpoint every this many steps (and at the end)."""
    keep_last: int = 2
    """Keep the newest this-many checkpoints (the best ones are kept in addition)."""
    keep_best: int = 1
    """Keep the this-many checkpoints with the lowest val loss."""
    ckpt_format: CheckpointFormat = "full"
    """``full``: rank 0 gathers every tensor and writes ``model.safetensors`` and the optimizer
    alone; ``sharded``: every rank writes its own part with torch.distributed.checkpoint, nothing
    is gathered (for models too large for one process; needs a filesystem all nodes share).
    Either resumes on any number of processes. LoRA runs always save their adapters in full."""
    early_stop_patience: int = 0
    """Stop after this many evaluations without a new best val loss (0 = never stop early)."""
    seed: int = 1337
    """Seed for weights, data order and dropout: the same seed gives the same run."""
    on_anomaly: AnomalyPolicy = "stop"
    """What a non-finite loss/gradient or a loss spike does: ``stop`` (the last checkpoint stays
    intact), ``skip`` (drop that batch) or ``rollback`` (reload the last checkpoint, continue with
    the learning rate times ``train.rollback_lr_scale``)."""
    spike_threshold: float = 0.0
    """A loss above this many times its running average is an anomaly too (0 = don't check)."""
    rollback_lr_scale: float = 0.5
    """Learning-rate multiplier applied at each rollback."""
    max_anomalies: int = 10
    """Stop anyway after this many anomalies in one run."""
    out_dir: str = "runs/shakespeare_char"
    """Run directory: config.toml, metrics.jsonl, tb/, ckpt/, latest."""
    sample_prompt: str = "\n"
    """Prompt for the samples generated at each evaluation and at the end."""
    sample_tokens: int = 200
    """Tokens generated per sample (0 = no samples)."""
    num_samples: int = 1
    """Samples generated at the end of training (one per evaluation during training)."""
    freeze: str = ""
    """Parts of the model that keep their starting weights, comma-separated: ``embeddings``,
    ``blocks:A-B`` (0-based, inclusive), ``blocks:N``, ``blocks``, ``norm_f``, ``lm_head``
    (tied embeddings are the output layer: either freezes both). Empty = train everything.
    Every stage (train, sft, dpo); see docs/continue_training.md."""
    init_optimizer: bool = False
    """With ``init_from``: carry the starting checkpoint's optimizer moments over (its
    trainer_state.pt; the parameters trained must be the same) instead of starting them at zero.
    The learning rate, betas and weight decay are this run's."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.batch_size == "auto" or (isinstance(self.batch_size, int)
                                              and self.batch_size > 0)):
            raise ValueError(f"train.batch_size must be a positive integer or 'auto', "
                             f"not {self.batch_size!r}")


@dataclass(frozen=True)
class OptimConfig(_Section):
    config_section = "optim"

    name: OptimizerName = "adamw"
    """Optimizer: ``adamw``; ``muon`` (Muon for matrices inside the blocks, AdamW for the rest);
    ``adafactor`` (factored second moments: less memory)."""
    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.1
    """Decoupled weight decay for matrices (embeddings included); none for norms and biases."""
    beta1: float = 0.9
    """Adam first-moment decay."""
    beta2: float = 0.95
    """Adam second-moment decay."""
    eps: float = 1e-8
    """Adam epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping)."""
    muon_momentum: float = 0.95
    """Muon's Nesterov momentum."""
    fused: FusedSetting = "auto"
    """Fused AdamW kernel: ``auto`` (on where supported), ``true`` or ``false``."""


@dataclass(frozen=True)
class ScheduleConfig(_Section):
    config_section = "schedule"

    name: ScheduleName = "cosine"
    """Learning-rate schedule: ``cosine``, ``wsd`` (warmup-stable-decay), ``linear`` or
    ``constant``."""
    warmup_steps: int = 100
    """Steps of linear warm-up up to ``optim.lr`` (from lr/(warmup+1) at the first step)."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``optim.lr`` (cosine, wsd, linear)."""
    decay_fraction: float = 0.5
    """WSD only: share of the steps spent in the final linear decay."""
    weight_decay: WeightDecaySchedule = "constant"
    """Weight-decay schedule: ``constant``, ``follow_lr`` (scaled like the learning rate) or
    ``linear`` (linearly to 0 at the last step)."""
    batch_ramp_steps: int = 0
    """Batch-size warm-up: grow the micro-batches per step from ``batch_ramp_start`` x
    ``train.grad_accum`` to the full count over this many steps (0 = off)."""
    batch_ramp_start: float = 0.25
    """Share of ``train.grad_accum`` used at the first step of the batch-size ramp."""


@dataclass(frozen=True)
class RuntimeConfig(_Section):
    config_section = "runtime"

    device: str = "auto"
    """``auto`` (cuda, then mps, then cpu), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    dtype: DtypeName = "auto"
    """Compute dtype: ``auto``, ``float32``, ``bfloat16`` (autocast) or ``float16`` (autocast +
    loss scaling). ``auto`` picks bfloat16 on CUDA GPUs that support it (float16 on older ones);
    on CPU it times a few training steps of bfloat16 (with bf16 or float32 attention) and float32
    at start-up and keeps the fastest, cached per CPU, model and batch shape
    (``train/autotune.py``). Models under 200k parameters take bfloat16 where the CPU has native
    bf16 (AMX/AVX512-BF16), else float32."""
    parallel: ParallelStrategy = "ddp"
    """With several processes (torchrun): ``ddp`` (replicate the model) or ``fsdp`` (FSDP2: shard
    parameters, gradients and optimizer state per block)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations during backward instead of storing them: less memory
    (activations no longer grow with depth) for about one extra forward pass of time."""
    compile: bool | Literal["auto"] = False
    """Compile the model with ``torch.compile`` (pays off on GPUs; slow first step). ``auto``
    times a few steps with and without compiling at start-up and keeps the faster
    (``train/autotune.py``; the answer is cached per device and shape)."""
    threads: int = 0
    """CPU threads for PyTorch (0 = PyTorch's default)."""
    tensorboard: bool = True
    """Also write TensorBoard event files to RUN_DIR/tb."""
    wandb_project: str = ""
    """Also log to this Weights & Biases project (empty = off); the run id is kept across resumes.
    Set ``WANDB_MODE=offline`` to record locally."""
    progress: bool = True
    """Show a progress bar on the terminal."""


@dataclass(frozen=True)
class FinetuneConfig:
    init_from: str = ""
    """Checkpoint, run directory or Hugging Face model directory to start a new run from (every
    stage: ``gptforge train``, ``sft``, ``dpo``; given as ``init_from=PATH``): its weights,
    architecture and tokenizer are used and the ``[model]`` section is replaced; a ``model.*``
    override on the command line must agree with it (except dropout, MoE loss weights and, without
    learned positions, block_size). Unlike ``--resume``, a new run: new data, schedule and
    optimizer (docs/continue_training.md)."""
    data: str = ""
    """Conversation files (sft) or preference files (dpo): comma-separated paths or globs of
    .jsonl/.json."""
    val_fraction: float = 0.05
    """Share of the records held out for evaluation (seeded; 0 = none)."""
    packing: bool = False
    """SFT: pack several conversations into each row (attention kept within each) instead of
    padding one per row."""
    chat_template: Literal["", "gptforge", "chatml", "llama3", "jinja"] = ""
    """How conversations are rendered: gptforge's own (<|role|>content<|end|>), chatml, llama3,
    or jinja (the tokenizer's own chat_template); empty = the starting checkpoint's, else gptforge.
    Recorded in model.json, so chat, serve and generate use the same (docs/chat_format.md)."""


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 0
    """LoRA rank; 0 = full fine-tuning. With a rank, only the adapters are trained and saved."""
    alpha: float = 16.0
    """LoRA scaling numerator: the adapter output is multiplied by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter's input."""
    targets: str = "qkv,proj,up,down"
    """Comma-separated suffixes of the linear layers that get adapters (qkv, proj, up, down,
    lm_head)."""


@dataclass(frozen=True)
class DpoConfig:
    beta: float = 0.1
    """DPO temperature: how far the policy may move from the reference (higher = closer)."""
    sft_weight: float = 0.0
    """Weight of an added SFT (negative log-likelihood) term on the chosen responses."""


@dataclass(frozen=True)
class RlConfig(_Section):
    config_section = "rl"

    data: str = ""
    """Prompt files for ``gptforge rl``: comma-separated .jsonl/.json of ``{"prompt": str or
    messages, "answer": ...}`` (or ``{"messages": [...]}``, a last assistant turn being the
    answer). ``train.batch_size`` prompts are drawn per micro-batch."""
    group_size: int = 8
    """Answers sampled per prompt (G); advantages are normalised within each group (>= 2)."""
    reward: str = "exact"
    """``exact`` (the extracted answer equals the record's ``answer``), ``format`` (the
    completion matches ``rl.format_pattern``), or a function ``module.path:name`` or
    ``file.py:name`` called as ``f(prompt, completion, example) -> float``."""
    format_pattern: str = ""
    """Regular expression for ``rl.reward=format`` (``re.search``; anchor with ^ and $)."""
    max_new_tokens: int = 32
    """Longest sampled completion in tokens; the prompt keeps the rest of the context window."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (> 0: the group needs different answers)."""
    top_k: int = 0
    """Sample among the k likeliest tokens only (0 = all)."""
    clip_eps: float = 0.2
    """PPO clip range: the policy ratio counts only within [1 - eps, 1 + eps]."""
    kl_coef: float = 0.0
    """Weight of the KL penalty to a frozen copy of the starting model (0 = no reference)."""
    ppo_epochs: int = 1
    """Optimizer steps taken on each batch of rollouts before sampling new ones."""
    advantage_eps: float = 1e-4
    """Added to the group's reward standard deviation before dividing by it."""
    chat: ChatSetting = "auto"
    """Render prompts with the chat template: auto = when the records are message lists or the
    starting checkpoint was fine-tuned (sft/dpo/rl)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group_size < 2:
            raise ValueError(f"rl.group_size must be >= 2 (advantages compare the answers to "
                             f"one prompt), got {self.group_size}")
        if not self.temperature > 0:
            raise ValueError(f"rl.temperature must be > 0, got {self.temperature}")
        if self.ppo_epochs < 1 or self.max_new_tokens < 1 or self.top_k < 0:
            raise ValueError("rl.ppo_epochs and rl.max_new_tokens must be >= 1, rl.top_k >= 0")
        if not 0 < self.clip_eps < 1 or self.kl_coef < 0 or not self.advantage_eps > 0:
            raise ValueError("rl.clip_eps must be in (0, 1), rl.kl_coef >= 0, "
                             "rl.advantage_eps > 0")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    rl: RlConfig = field(default_factory=RlConfig)
