"""A conversation rendered with the tokenizer's chat template, with per-token message and
sentence ids (DESIGN §2) for message_mean / sentence_mean adapters.

A message's *block* is everything the template renders for it: role header, content, end of
turn. Blocks are found by rendering growing prefixes of the conversation (the text added by
message k is its block); the generation prompt is what `add_generation_prompt` adds. Each token
belongs to the block holding its first character (offsets from the fast tokenizer).
"""

from __future__ import annotations

import re
from bisect import bisect_right
from dataclasses import dataclass
from typing import Any, Optional, Sequence

# A sentence ends at two or more newlines, or at whitespace after .!?;: (closing quotes or
# brackets may sit between the mark and the whitespace).
SENTENCE_BREAK = re.compile(r"(?<=[.!?;:])([\"'”’»)\]]*)\s+|\n{2,}")


@dataclass
class Rendered:
    """Token ids of a rendered conversation with, per token, the block it belongs to (index into
    the messages; len(messages) for the generation prompt), its message id and sentence id
    (-1 = never written), and per message the token index where its block ends."""

    text: str
    ids: list[int]
    blocks: list[int]
    message_ids: list[int]
    sentence_ids: list[int]
    block_ends: list[int]


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the sentences of `text` (DESIGN §2 split), covering all of it: the
    whitespace of a break starts the next sentence (as byte-level BPE tokens carry a leading
    space), whitespace-only pieces join a neighbour."""
    cuts = [0]
    for match in SENTENCE_BREAK.finditer(text):
        cut = match.start() + len(match.group(1) or "")
        if text[cuts[-1]:cut].strip():
            cuts.append(cut)
    if len(cuts) > 1 and not text[cuts[-1]:].strip():
        cuts.pop()
    if not text.strip():
        return []
    return list(zip(cuts, [*cuts[1:], len(text)]))


def count_sentences(text: str) -> int:
    return len(sentence_spans(text))


def render_text(tokenizer: Any, messages: Sequence[dict], add_generation_prompt: bool) -> str:
    if not messages:
        return ""
    if getattr(tokenizer, "chat_template", None) is None and not getattr(
            tokenizer, "has_chat_template", False):
        raise ValueError("the tokenizer has no chat template: a chat session needs one")
    return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def encode(tokenizer: Any, text: str, cuts: Sequence[int] = ()) -> tuple[list[int], list[int]]:
    """(token ids, start character of each token), tokenized as `apply_chat_template` does
    (no special tokens added). Slow tokenizers, which give no offsets, encode the pieces
    between `cuts` separately."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    if getattr(hf, "is_fast", False):
        enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [start for start, _ in enc["offset_mapping"]]
    ids, starts, edges = [], [], sorted({0, *cuts, len(text)})
    for a, b in zip(edges, edges[1:]):
        piece = hf.encode(text[a:b], add_special_tokens=False)
        ids += piece
        starts += [a] * len(piece)
    return ids, starts


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if a[:mid] == b[:mid] else (lo, mid)
    return lo


def render(tokenizer: Any, messages: Sequence[dict], add_generation_prompt: bool,
           message_numbers: Optional[Sequence[int]] = None,
           sentence_starts: Optional[Sequence[int]] = None,
           prefixes: Optional[dict] = None) -> Rendered:
    """Render `messages` and label every token.

    message_numbers: the id of each message (default: system -1, others 0, 1, 2, … in order);
    sentence_starts: the id of each message's first sentence (default: counted from 0).
    Ids are global: a context that starts mid-conversation passes its messages' ids.
    prefixes: a dict the caller keeps between calls (a chat session's): the renders of this
    call's leading messages are left in it, so that the next call, a turn later, renders only
    what is new instead of every prefix again. The result is the same.
    """
    messages = list(messages)
    if message_numbers is None:
        message_numbers, n = [], 0
        for m in messages:
            message_numbers.append(-1 if m["role"] == "system" else n)
            n += m["role"] != "system"
    if sentence_starts is None:
        sentence_starts, n = [], 0
        for m, number in zip(messages, message_numbers):
            sentence_starts.append(n)
            n += count_sentences(m["content"]) if number >= 0 else 0
    text = render_text(tokenizer, messages, add_generation_prompt)
    # Character end of each message's block (prefix renders), clipped to where they agree.
    # With `prefixes`, a prefix rendered by an earlier call is reused where `text` starts with
    # it (a template that renders earlier messages differently once more follow, e.g. history
    # without think blocks, gives prefixes `text` does not start with: those are rendered).
    keys = _prefix_keys(tokenizer, messages) if prefixes is not None else None
    ends, previous, found = [], 0, {}
    for k in range(len(messages)):
        prefix = prefixes.get(keys[k]) if keys else None
        if k == len(messages) - 1 and not add_generation_prompt:
            prefix = text
        elif prefix is None or not text.startswith(prefix):
            prefix = render_text(tokenizer, messages[:k + 1], False)
        if keys:
            found[keys[k]] = prefix
        previous = max(previous, _common_prefix(prefix, text))
        ends.append(previous)
    if prefixes is not None:  # this conversation's prefixes only: bounded by its length
        prefixes.clear()
        prefixes.update(found)
    # Content span and sentence spans of each written message, searched inside its block.
    sentences: list[tuple[int, int, int]] = []  # (start char, end char, sentence id)
    for k, m in enumerate(messages):
        if message_numbers[k] < 0 or not m["content"]:
            continue
        block_start = ends[k - 1] if k else 0
        content = m["content"]
        at = text.find(content, block_start, ends[k])
        if at < 0:  # templates may trim the content
            content = content.strip()
            at = text.find(content, block_start, ends[k]) if content else -1
        if at < 0:
            continue
        for j, (a, b) in enumerate(sentence_spans(content)):
            sentences.append((at + a, at + b, sentence_starts[k] + j))
    cuts = [*ends, *(c for s in sentences for c in s[:2])]
    ids, starts = encode(tokenizer, text, cuts)
    sentence_begins = [s[0] for s in sentences]
    blocks, message_ids, sentence_ids, block_ends = [], [], [], [0] * len(messages)
    for t, start in enumerate(starts):
        block = bisect_right(ends, start)
        blocks.append(block)
        message_ids.append(message_numbers[block] if block < len(messages) else -1)
        sid = -1
        j = bisect_right(sentence_begins, start) - 1
        if message_ids[-1] >= 0 and j >= 0 and start < sentences[j][1]:
            sid = sentences[j][2]
        sentence_ids.append(sid)
        if block < len(messages):
            block_ends[block] = t + 1
    for k in range(1, len(messages)):  # an empty block ends where the previous one did
        block_ends[k] = max(block_ends[k], block_ends[k - 1])
    return Rendered(text, ids, blocks, message_ids, sentence_ids, block_ends)


def _prefix_keys(tokenizer: Any, messages: Sequence[dict]) -> Optional[list[tuple]]:
    """For each k, a key naming the render of messages[:k + 1] (template and message fields);
    None when they cannot be keys (e.g. a message field holding a list)."""
    try:
        template = getattr(tokenizer, "chat_template", None)
        items = [tuple(m.items()) for m in messages]
        hash((template, tuple(items)))
    except TypeError:
        return None
    return [(template, tuple(items[:k + 1])) for k in range(len(items))]


def closing_tokens(tokenizer: Any, probe: str = "Probe reply.") -> list[int]:
    """The tokens the template puts after an assistant reply's text (ChatML: `<|im_end|>\\n`):
    the conversation rendered with a reply, minus the same rendered with the generation prompt
    plus the reply's text."""
    user = [{"role": "user", "content": "Hi."}]
    head = render_text(tokenizer, user, True) + probe
    full = render_text(tokenizer, [*user, {"role": "assistant", "content": probe}], False)
    if not full.startswith(head):
        at = full.rfind(probe)
        if at < 0:
            return []
        head = full[:at + len(probe)]
    full_ids, _ = encode(tokenizer, full, [len(head)])
    head_ids, _ = encode(tokenizer, head)
    if full_ids[:len(head_ids)] != head_ids:
        return encode(tokenizer, full[len(head):])[0]
    return full_ids[len(head_ids):]
