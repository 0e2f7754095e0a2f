"""What of an answer the next turn sends again (``integrations/vllm/answers.py``), on SmolLM2's real
tokenizer and chat template and on variants of it that drop an answer's thinking or cut it to
its first words, without vLLM: what the template keeps is counted, what it drops is not."""

from __future__ import annotations

import random

import pytest

from kvswap.integrations.vllm.answers import NextTurn

DROP_THINKING = ("(message['content'].split('</think>')[-1].lstrip() if message['role'] == 'assistant' "
                 "else message['content'])")
FIRST_WORDS = ("(message['content'].split(' ')[:3] | join(' ') if message['role'] == 'assistant' "
               "else message['content'])")
WORDS = ("the KV cache of a chat session stays alive beyond GPU memory so a follow-up turn skips "
         "recomputing its history while tokens 12, 345 and 6789 arrive").split()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from kvswap.engine.pretrained import prepare

    return AutoTokenizer.from_pretrained(str(prepare("smollm2", progress=False)))


def next_turn(tokenizer, content: str | None) -> NextTurn:
    import copy

    variant = copy.copy(tokenizer)
    if content is not None:
        assert "message['content']" in tokenizer.chat_template
        variant.chat_template = tokenizer.chat_template.replace("message['content']", content)
    return NextTurn(variant)


def answers(tokenizer, rng: random.Random) -> list[list[int]]:
    """Answers as a model writes them (text that encodes back to itself, with and without
    thinking, short and past the first prefix), and arbitrary token ids."""
    found = []
    for words in (3, 40, 400, 3000):
        text = " ".join(rng.choice(WORDS) for _ in range(words))
        found.append(tokenizer.encode(text, add_special_tokens=False))
        found.append(tokenizer.encode(f"<think>\n{text}\n</think>\n\nSo: {text[:200]}", add_special_tokens=False))
    found += [[rng.randrange(100, tokenizer.vocab_size) for _ in range(n)] for n in (1, 64, 700, 5000)]
    return found


@pytest.mark.parametrize("template", ["own", "drop thinking", "first words"])
def test_what_the_next_turn_sends_again(tokenizer, template: str) -> None:
    turn = next_turn(tokenizer, {"own": None, "drop thinking": DROP_THINKING, "first words": FIRST_WORDS}[template])
    written = answers(tokenizer, random.Random(7))

    def first_words(answer: list[int]) -> int:
        return len(tokenizer.encode(" ".join(tokenizer.decode(answer).split(" ")[:3]), add_special_tokens=False))

    for answer in written[:8:2]:  # plain answers: sent again whole, or (first words) their first three words
        assert turn.kept(answer) == {"first words": first_words(answer)}.get(template, len(answer)), template
    for answer in written[1:8:2]:  # with thinking: kept whole, cut at three words, or dropped from the start
        expected = {"own": len(answer), "first words": first_words(answer)}.get(template)
        assert turn.kept(answer) == expected if expected is not None else turn.kept(answer) == 0, template
    for answer in written[8:]:  # arbitrary ids: never more than the answer, whatever the template
        assert 0 <= turn.kept(answer) <= len(answer)


def test_a_template_that_keeps_answers_is_not_asked(tokenizer) -> None:
    """The probe answer is kept whole by SmolLM2's own template: no trimming (NextTurn.of
    would answer None); a template that drops thinking trims the probe."""
    from kvswap.integrations.vllm.answers import PROBE

    probe = tokenizer.encode(PROBE, add_special_tokens=False)
    assert next_turn(tokenizer, None).kept(probe) == len(probe)
    assert next_turn(tokenizer, DROP_THINKING).kept(probe) < len(probe)
