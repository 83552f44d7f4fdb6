"""The chat template: how a conversation becomes one sequence of token ids, and what to learn.

A chat model is still a next-token predictor; the template is the convention that tells it who is
speaking. Every turn is its role's special token, the content, and ``<|end|>``::

    <|system|>You are terse.<|end|><|user|>2+2?<|end|><|assistant|>4<|end|>

The role markers and ``<|end|>`` are single reserved ids (the same in every backend, see
:data:`~gptforge.tokenizer.base.SPECIAL_TOKENS`), never text, so a user cannot type them. For
that, message *content* is encoded by :func:`encode_contents`, which turns a special-token string
written in the content (``"<|assistant|>"``) into ordinary text tokens instead of the control id
the plain ``Tokenizer.encode`` would give (see docs/chat_format.md for each backend).

Fine-tuning learns only what the assistant says: :func:`render_conversation` returns a mask that
is True on each assistant message's content tokens and on the ``<|end|>`` closing it (so the model
learns to stop), and False on role markers, system and user turns. To generate, the conversation
so far is followed by ``<|assistant|>`` (:func:`render_prompt`) and sampling stops at
``<|end|>`` or ``<|endoftext|>`` (:func:`stop_ids`).
"""

from __future__ import annotations

from gptforge.errors import GptforgeError
from gptforge.tokenizer.base import Tokenizer

ROLES = ("system", "user", "assistant")
END_TOKEN = "<|end|>"
ROLE_TOKENS = {role: f"<|{role}|>" for role in ROLES}


class ChatFormatError(GptforgeError, ValueError):
    """A message list that does not follow the chat format (bad role, non-string content)."""


def check_messages(messages: list[dict]) -> None:
    """Raise :class:`ChatFormatError` unless ``messages`` is a list of {"role", "content"} dicts
    with a role from :data:`ROLES` and string content (extra keys are allowed and ignored)."""
    if not isinstance(messages, list):
        raise ChatFormatError(f"messages must be a list of {{'role', 'content'}} dicts, "
                              f"got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ChatFormatError(f"message {i} must be a dict with 'role' and 'content', "
                                  f"got {_preview(message)}")
        if message["role"] not in ROLES:
            raise ChatFormatError(f"message {i} has role {message['role']!r}; "
                                  f"allowed roles: {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise ChatFormatError(f"message {i} ({message['role']}) content must be a string, "
                                  f"got {type(message['content']).__name__}")


def encode_contents(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each message content, with special-token strings encoded as plain text.

    ``Tokenizer.encode`` maps a literal ``"<|user|>"`` to the control id, which would let anyone
    who writes chat content forge turns. Here each such string is cut after its first character
    and both parts are encoded separately: neither part is a special token, so every backend gives
    ordinary text ids that still decode to the same string. (The char backend can only do this if
    ``<``, ``|`` and the letters were in its training text; otherwise it raises its usual
    unknown-character error.) All pieces go to the backend in one ``encode_batch`` call.
    """
    pieces: list[str] = []
    owners: list[int] = []
    for i, text in enumerate(texts):
        for piece, special in tokenizer.split_special(text):
            parts = (piece[:1], piece[1:]) if special else (piece,)
            pieces += parts
            owners += [i] * len(parts)
    ids: list[list[int]] = [[] for _ in texts]
    for owner, piece_ids in zip(owners, tokenizer.encode_batch(pieces), strict=True):
        ids[owner] += piece_ids
    return ids


def encode_content(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of one message content; see :func:`encode_contents`."""
    return encode_contents(tokenizer, [text])[0]


def render_conversation(tokenizer: Tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Token ids of a whole conversation and a loss mask that is True exactly on the tokens the
    assistant produces: each assistant message's content tokens and the <|end|> that closes it."""
    check_messages(messages)
    return render_encoded(tokenizer, messages,
                          encode_contents(tokenizer, [m["content"] for m in messages]))


def render_encoded(tokenizer: Tokenizer, messages: list[dict],
                   contents: list[list[int]]) -> tuple[list[int], list[bool]]:
    """:func:`render_conversation` for messages whose contents are already encoded (``contents``,
    one id list per message), which lets a whole dataset be encoded in one batch."""
    specials = tokenizer.special_tokens
    ids: list[int] = []
    mask: list[bool] = []
    for message, content in zip(messages, contents, strict=True):
        learn = message["role"] == "assistant"
        ids += [specials[ROLE_TOKENS[message["role"]]], *content, specials[END_TOKEN]]
        mask += [False] + [learn] * (len(content) + 1)
    return ids, mask


def render_prompt(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
    """Ids of the conversation so far followed by the opening of an assistant turn (<|assistant|>),
    ready for generation; generation stops at <|end|> (or <|endoftext|>)."""
    ids, _ = render_conversation(tokenizer, messages)
    return ids + [tokenizer.special_tokens[ROLE_TOKENS["assistant"]]]


def stop_ids(tokenizer: Tokenizer) -> list[int]:
    """Ids that end an assistant turn: ``[<|end|>, <|endoftext|>]``."""
    return [tokenizer.special_tokens[END_TOKEN], tokenizer.eos_id]


def render_text(messages: list[dict]) -> str:
    """The same layout as a string, for docs and debugging (content is shown as written)."""
    check_messages(messages)
    return "".join(f"{ROLE_TOKENS[m['role']]}{m['content']}{END_TOKEN}" for m in messages)


def _preview(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
