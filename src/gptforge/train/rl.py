"""Reinforcement learning with verifiable rewards: the GRPO stage (``gptforge rl``).

After SFT a model can answer; reinforcement learning makes its answers *right* more often by
trying: for every prompt it samples a group of answers, a program scores them (``rewards.py``),
and GRPO (Shao et al. 2024, https://arxiv.org/abs/2402.03300; ``objectives.GroupRelativePolicy``)
raises the likelihood of the answers that scored above their group's mean and lowers the others.

It is one more stage on the shared training loop: the model, tokenizer, LoRA and checkpoints come
from ``finetune.init_from`` as for SFT and DPO (``finetune._FromCheckpoint``); the batches are
rollouts sampled from the weights being trained (``rollouts.RolloutLoader``); with
``rl.kl_coef > 0`` a frozen copy of the starting model is the reference of the KL penalty.

Prompts come from ``rl.data``: records ``{"prompt": str or messages, "answer": ...}`` or
``{"messages": [...]}`` (a closing assistant turn is taken as the answer). They are rendered with
the chat template when they are message lists or the starting model was fine-tuned
(``rl.chat=auto``), else encoded as plain text that the model continues until end of text.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path

from gptforge.checkpoints.format import is_fine_tuned, read_meta
from gptforge.config.schema import Config
from gptforge.data.conversations import read_records
from gptforge.errors import GptforgeError
from gptforge.inference.chat import fit_conversation, prompt_budget
from gptforge.model.config import ModelConfig
from gptforge.model.gpt import GPT
from gptforge.runtime.device import resolve_precision
from gptforge.tokenizer import load_tokenizer
from gptforge.tokenizer.chat_template import ChatFormatError, check_messages
from gptforge.tokenizer.chat_template import stop_ids as chat_stop_ids
from gptforge.train.finetune import _FromCheckpoint
from gptforge.train.objectives import GroupRelativePolicy, Objective
from gptforge.train.rewards import build_reward, exact_answer
from gptforge.train.rollouts import Prompt, RolloutLoader, RolloutSettings

log = logging.getLogger(__name__)


class ReinforcementLearning(_FromCheckpoint):
    """GRPO on prompts with a verifiable reward, from a (usually SFT) checkpoint."""

    name = "rl"

    def setup(self, cfg: Config, dist_info) -> tuple[Config, Path, dict]:
        if not cfg.rl.data:
            raise GptforgeError("gptforge rl needs prompts: rl.data=FILE.jsonl (records "
                                '{"prompt": ..., "answer": ...})')
        if cfg.train.batch_size == "auto":
            raise GptforgeError("gptforge rl: train.batch_size is the number of prompts per "
                                "batch; set a number, e.g. train.batch_size=8")
        if dist_info.world_size > 1 and cfg.runtime.parallel == "fsdp":
            raise GptforgeError("gptforge rl samples on each process alone, which a sharded "
                                "model cannot do; use runtime.parallel=ddp")
        self.reward = build_reward(cfg.rl)  # a bad rl.reward fails before any model is built
        return super().setup(cfg, dist_info)

    def model_config(self, saved: ModelConfig) -> ModelConfig:
        # Without dropout the policy that samples is the one that is scored (ratio 1 at first).
        return dataclasses.replace(saved, dropout=0.0)

    def build_objective(self, cfg: Config, model: GPT) -> Objective:
        reference = None
        if cfg.rl.kl_coef > 0:  # a frozen copy of the starting policy, before any adapters
            reference = copy.deepcopy(model).eval().requires_grad_(False)
        self.add_adapters(cfg, model)
        self.policy = model  # the bare model: rollouts are sampled from its current weights
        return GroupRelativePolicy(reference, clip_eps=cfg.rl.clip_eps, kl_coef=cfg.rl.kl_coef)

    def loaders(self, cfg: Config, dist_info, run_dir: Path):
        tokenizer = load_tokenizer(self.base / "tokenizer")
        paths = [p.strip() for p in cfg.rl.data.split(",") if p.strip()]
        records = read_prompt_records(paths, needs_answer=self.reward is exact_answer)
        chat = use_chat(cfg.rl.chat, records, read_meta(self.base))
        prompts = encode_prompts(tokenizer, records, chat, cfg.model.block_size,
                                 cfg.rl.max_new_tokens)
        stops = chat_stop_ids(tokenizer) if chat else [tokenizer.eos_id]
        banned = sorted(set(tokenizer.special_tokens.values()) - set(stops)) if chat else []
        rl = cfg.rl
        settings = RolloutSettings(group_size=rl.group_size, max_new_tokens=rl.max_new_tokens,
                                   temperature=rl.temperature, top_k=rl.top_k,
                                   ppo_epochs=rl.ppo_epochs, advantage_eps=rl.advantage_eps,
                                   stop_ids=tuple(stops), banned_ids=tuple(banned))
        device = next(self.policy.parameters()).device
        precision = resolve_precision(device, cfg.runtime.dtype)
        log.info("rl: %d prompts from %s (%s), %d answers each, reward %s", len(prompts),
                 ", ".join(paths), "chat template" if chat else "plain text", rl.group_size,
                 rl.reward)
        loader = RolloutLoader(self.policy, tokenizer, prompts, self.reward, settings,
                               batch_size=cfg.train.batch_size, grad_accum=cfg.train.grad_accum,
                               seed=cfg.train.seed, rank=dist_info.rank,
                               world_size=dist_info.world_size, autocast=precision.autocast)
        return loader, None


def read_prompt_records(paths: list[str], needs_answer: bool) -> list[dict]:
    """Records as ``{"prompt": str or messages, "answer": ..., "example": record, "where"}``."""
    records = []
    for where, record in read_records(paths):
        try:
            records.append({**prompt_of(record, needs_answer), "example": record,
                            "where": where})
        except (ValueError, ChatFormatError) as err:
            raise GptforgeError(f"{where}: {err}") from None
    if not records:
        raise GptforgeError(f"rl.data: {', '.join(paths)} holds no prompts")
    return records


def prompt_of(record, needs_answer: bool) -> dict:
    """The prompt of one record (raises ValueError saying what is wrong)."""
    if not isinstance(record, dict) or not ({"prompt", "messages"} & record.keys()):
        raise ValueError('expected {"prompt": str or messages, "answer": ...} or '
                         '{"messages": [...]}')
    answer = record.get("answer")
    if "prompt" in record:
        prompt = record["prompt"]
        if not isinstance(prompt, str):
            check_messages(prompt)
    else:
        prompt = list(record["messages"])
        check_messages(prompt)
        if prompt and prompt[-1]["role"] == "assistant":
            answer = prompt.pop()["content"] if answer is None else answer
    if not prompt:
        raise ValueError("empty prompt")
    if needs_answer and answer is None:
        raise ValueError('no "answer" to compare with (rl.reward=exact needs one)')
    if needs_answer:
        record["answer"] = answer  # what exact_answer reads, also for a {"messages"} record
    return {"prompt": prompt, "answer": answer}


def use_chat(setting: str, records: list[dict], meta: dict) -> bool:
    if setting != "auto":
        return setting == "true"
    as_messages = any(not isinstance(r["prompt"], str) for r in records)
    return as_messages or is_fine_tuned(meta)


def encode_prompts(tokenizer, records: list[dict], chat: bool, block_size: int,
                   max_new_tokens: int) -> list[Prompt]:
    """Token ids of each prompt, cut to leave ``max_new_tokens`` of the context window."""
    try:
        budget = prompt_budget(block_size, max_new_tokens)
    except GptforgeError as err:
        raise GptforgeError(f"rl.max_new_tokens: {err}") from None
    prompts = []
    for record in records:
        prompt = record["prompt"]
        try:
            if chat:
                messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) \
                    else prompt
                ids = fit_conversation(tokenizer, messages, budget)[1]
            else:
                text = prompt if isinstance(prompt, str) else "\n".join(
                    m["content"] for m in prompt)
                ids = tokenizer.encode(text)[-budget:]
        except (GptforgeError, ValueError, KeyError) as err:
            raise GptforgeError(f"{record['where']}: {err}") from None
        prompts.append(Prompt(ids=ids, source=prompt, example=record["example"]))
    return prompts
