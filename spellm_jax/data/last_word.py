"""A LAMBADA-style last-word completion task, built deterministically from held-out real text.

Each item is a sentence that ends in a word of at least `MIN_WORD_LETTERS` letters followed by
`.`, `!` or `?`; the context is the text before that word (the sentence and what precedes it in
its document, cut to the last `max_context_tokens` tokens) and the target is the word with its
leading space. Documents take turns, so every corpus contributes from its first items on.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

MIN_WORD_LETTERS = 3
CONTEXT_CHARS = 600  # text read before the target word (then cut to max_context_tokens)
_LAST_WORDS = re.compile(rf"(?<=[a-z,;:'\"]) ([A-Za-z]{{{MIN_WORD_LETTERS},}})[.!?](?=\s|$)")


@dataclasses.dataclass(frozen=True)
class LastWordItem:
    context_ids: tuple[int, ...]
    target_ids: tuple[int, ...]  # the tokens of " word"
    word: str
    document: str


def _candidates(doc_id: str, text: str, tokenizer: Any, max_context_tokens: int):
    for match in _LAST_WORDS.finditer(text):
        context = text[max(0, match.start() - CONTEXT_CHARS):match.start()]
        context = context[context.find(" ") + 1:] if match.start() > CONTEXT_CHARS else context
        context_ids = tokenizer(context, add_special_tokens=False)["input_ids"][-max_context_tokens:]
        target_ids = tokenizer(" " + match.group(1), add_special_tokens=False)["input_ids"]
        if context_ids:
            yield LastWordItem(tuple(context_ids), tuple(target_ids), match.group(1), doc_id)


def last_word_items(documents: Mapping[str, str], tokenizer: Any, num_items: int = 500,
                    max_context_tokens: int = 40) -> list[LastWordItem]:
    """The first `num_items` items, documents (in id order) taking turns; refuses too little text."""
    streams = [_candidates(doc_id, documents[doc_id], tokenizer, max_context_tokens)
               for doc_id in sorted(documents)]
    items: list[LastWordItem] = []
    while streams and len(items) < num_items:
        for stream in list(streams):
            item = next(stream, None)
            if item is None:
                streams.remove(stream)
            elif len(items) < num_items:
                items.append(item)
    if len(items) < num_items:
        raise ValueError(f"the held-out text yields only {len(items)} last-word items, fewer than "
                         f"the {num_items} asked for; add corpora or ask for fewer.")
    return items
