"""Synthetic workloads, generated locally and deterministically (no downloads).

A workload is a list of sessions; a session is one or more turns sent one after another (a
multi-turn chat appends each answer to its history, as real clients do). Text is drawn from a
fixed vocabulary with a seed, so two runs send byte-identical prompts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

_SENTENCE = (
    "the model routes tokens across pods while caches keep prefixes warm and queues stay "
    "short gateway envoy request stream batch prefill decode latency throughput cluster "
    "replica adapter kernel tensor memory block hash window metric score weight user "
    "session history question answer summary system prompt context document paragraph "
    "sentence number value"
)
WORDS = tuple(_SENTENCE.split())


def text(rng: random.Random, chars: int) -> str:
    words: list[str] = []
    size = 0
    while size < chars:
        word = rng.choice(WORDS)
        words.append(word)
        size += len(word) + 1
    return " ".join(words)[:chars]


@dataclass
class Session:
    """Turns sent in order; ``history`` chats keep earlier turns and answers in the prompt."""

    id: str
    system: str
    questions: list[str]
    max_tokens: list[int]
    history: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    def body(self, turn: int, model: str, answers: list[str]) -> dict[str, Any]:
        messages = [{"role": "system", "content": self.system}] if self.system else []
        if self.history:
            for question, answer in zip(self.questions[:turn], answers, strict=False):
                messages.append({"role": "user", "content": question})
                messages.append({"role": "assistant", "content": answer})
        messages.append({"role": "user", "content": self.questions[turn]})
        return {
            "model": model,
            "messages": messages,
            "max_tokens": self.max_tokens[turn],
            "stream": True,
            "stream_options": {"include_usage": True},
        }


def shared_prefix(
    groups: int,
    prompts: int,
    system_chars: int,
    question_chars: int,
    output_tokens: int,
    seed: int = 0,
) -> list[Session]:
    """G groups x P prompts: each group shares a long system prompt; questions differ.

    Sessions are shuffled so groups interleave, as independent clients' traffic does.
    """
    rng = random.Random(seed)
    sessions = []
    for g in range(groups):
        system = f"[group {g}] " + text(rng, system_chars)
        for p in range(prompts):
            sessions.append(
                Session(
                    f"g{g}-p{p}",
                    system,
                    [text(rng, question_chars)],
                    [output_tokens],
                    meta={"group": g},
                )
            )
    rng.shuffle(sessions)
    return sessions


def multi_turn(
    users: int,
    rounds: int,
    system_chars: int,
    question_chars: int,
    output_tokens: int,
    seed: int = 0,
) -> list[Session]:
    """U users x R rounds, one common system prompt, each user's history growing per round."""
    rng = random.Random(seed)
    system = text(rng, system_chars)
    return [
        Session(
            f"u{u}",
            system,
            [f"[user {u} round {r}] " + text(rng, question_chars) for r in range(rounds)],
            [output_tokens] * rounds,
            history=True,
            meta={"user": u},
        )
        for u in range(users)
    ]


def unique(count: int, prompt_chars: int, output_tokens: int, seed: int = 0) -> list[Session]:
    """Prompts that share nothing: for overhead and plain load balancing."""
    rng = random.Random(seed)
    return [
        Session(f"q{i}", "", [f"[{i}] " + text(rng, prompt_chars)], [output_tokens])
        for i in range(count)
    ]


def mixed(
    count: int, seed: int = 0, max_prompt_chars: int = 8000, max_output_tokens: int = 400
) -> list[Session]:
    """Unique prompts with heavy-tailed prompt and output lengths (most short, a few long):
    the traffic where where a request lands matters most for tail latency."""
    rng = random.Random(seed)
    sessions = []
    for i in range(count):
        prompt = min(max_prompt_chars, int(rng.paretovariate(1.2) * 200))
        output = min(max_output_tokens, int(rng.paretovariate(1.3) * 20))
        sessions.append(Session(f"m{i}", "", [f"[{i}] " + text(rng, prompt)], [max(1, output)]))
    return sessions
