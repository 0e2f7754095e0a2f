"""What of a turn's answer the next turn sends again: reasoning models' chat templates drop it.

A client sends each turn as the whole chat rendered by the model's chat template. Templates of
reasoning models (Qwen3, DeepSeek-R1 and others) render earlier answers without their
thinking, so the KV of a stored answer from its first dropped token on is never reused (vLLM's
own offload stores no answer KV for that reason, which costs the re-prefill of every answer
that is sent back whole). kvswap renders what the next turn will hold of the answer (the
template applied to a one-question chat, the answer, and the next question) and stores the
answer only as far as it agrees; the rest is counted as not stored.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from kvswap.session_cache.base import common_prefix

log = logging.getLogger("vllm.kvswap")

#: An answer whose thinking a reasoning model's template drops (any template that changes it
#: when sent back turns the trimming on; one that sends it back as it is costs nothing).
PROBE = "<think>\nLet me see.\n</think>\n\nThe answer."
QUESTION, NEXT_QUESTION = "Hello.", "And then?"


class NextTurn:
    """The model's chat template, asked what of an answer the next turn sends again."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._prefix = self._render(None)

    @classmethod
    def of(cls, vllm_config: Any) -> NextTurn | None:
        """The model's template when it rewrites answers sent back (None: it does not, there is
        no tokenizer or template, or they could not be loaded: every answer is stored)."""
        model = vllm_config.model_config
        if getattr(model, "skip_tokenizer_init", False):
            return None
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model.tokenizer, revision=model.tokenizer_revision,
                                                      trust_remote_code=bool(model.trust_remote_code))
            if not getattr(tokenizer, "chat_template", None):
                return None
            turn = cls(tokenizer)
            probe = tokenizer.encode(PROBE, add_special_tokens=False)
            if turn.kept(probe) >= len(probe):
                return None
        except Exception as exc:  # noqa: BLE001 - a template that cannot be rendered: store answers whole
            log.info("kvswap: the chat template could not be asked what it sends back (answers stored whole): %s",
                     exc)
            return None
        log.info("kvswap: the chat template rewrites earlier answers; each answer is stored as far as the next "
                 "turn sends it again")
        return turn

    def kept(self, answer: Sequence[int]) -> int:
        """How many leading tokens of ``answer`` the next turn's prompt holds again."""
        text = self.tokenizer.decode(list(answer), skip_special_tokens=True)
        rendered = self._render(text)
        if rendered[:len(self._prefix)] != self._prefix:
            return len(answer)  # the template renders the question differently after an answer: cannot tell
        return common_prefix(answer, rendered[len(self._prefix):])

    def _render(self, answer: str | None) -> list[int]:
        messages = [{"role": "user", "content": QUESTION}]
        if answer is not None:
            messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": NEXT_QUESTION}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=answer is None)
        return list(self.tokenizer.encode(text, add_special_tokens=False))
