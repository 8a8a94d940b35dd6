"""The dialogue text format shared by data preparation, SFT, the reward model and PPO.

Every example is plain text in the Anthropic-HH convention:

    "\\n\\nHuman: <message>\\n\\nAssistant: <reply>\\n\\nHuman: <message>\\n\\nAssistant:"

- A *prompt* is the dialogue up to and including the last `"\\n\\nAssistant:"` marker (no
  trailing space). It is what PPO samples from and what the SFT loss never trains on.
- A *response* is everything after that marker. It starts with a single space (`" Sure, ..."`)
  and ends naturally, with no special token in the text: the tokenizer side appends EOS.
- A full example is `prompt + response`, with nothing in between, so
  `split_dialogue(prompt + response) == (prompt, response)` whenever the response itself holds
  no Assistant marker.

Keep every producer and consumer of text on these functions so that the boundary between prompt
and response is the same everywhere (a different boundary would silently move the loss mask).
"""

from __future__ import annotations

from collections.abc import Sequence

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"


class FormatError(ValueError):
    """A text that does not follow the dialogue format; the message says what is missing."""


def format_prompt(turns: str | Sequence[str]) -> str:
    """Human/Assistant turns -> prompt text ending with the Assistant marker.

    `turns` is one human message, or a sequence that alternates human, assistant, human, ...
    and ends with a human message (odd length).
    """
    if isinstance(turns, str):
        turns = [turns]
    if len(turns) % 2 != 1:
        raise FormatError(f"turns must alternate human/assistant and end with a human turn, got {len(turns)}")
    parts = []
    for i, turn in enumerate(turns):
        marker = HUMAN if i % 2 == 0 else ASSISTANT
        parts.append(f"{marker} {turn.strip()}")
    return "".join(parts) + ASSISTANT


def format_response(text: str) -> str:
    """A reply -> response text: one leading space, no trailing whitespace."""
    return " " + text.strip()


def split_dialogue(text: str) -> tuple[str, str]:
    """Full dialogue -> (prompt, response), split right after the LAST Assistant marker.

    Raises FormatError when the text has no Assistant turn or no Human turn before it.
    """
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise FormatError(f"no Assistant turn ({ASSISTANT!r})")
    if HUMAN not in text[:cut]:
        raise FormatError(f"no Human turn ({HUMAN!r}) before the last Assistant turn")
    end = cut + len(ASSISTANT)
    return text[:end], text[end:]


def last_human_message(prompt: str) -> str:
    """The text of the last human turn of a prompt (without markers or surrounding spaces)."""
    start = prompt.rfind(HUMAN)
    if start < 0:
        raise FormatError(f"no Human turn ({HUMAN!r})")
    body = prompt[start + len(HUMAN) :]
    end = body.find(ASSISTANT)
    return (body if end < 0 else body[:end]).strip()
