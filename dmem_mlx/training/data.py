"""Chat data for δ-mem training: JSONL conversations → token segments → padded batches.

A line is `{"messages": [...]}` as mlx-lm uses, optionally with `"history": [[...], ...]`, the
earlier conversations of the same user (each written in its own forward call, as the runtime
writes a new conversation in a fresh KV context).

An example becomes a list of segments, one forward call each, run in order on one δ state:
- "history" mode (DESIGN §3, the paper's recipe): every earlier conversation, then the earlier
  turns of the last conversation, are *write* segments (no loss); the latest turn (the last user
  message and the assistant reply) is the *read* segment: a fresh context, writes off, loss on
  the assistant tokens.
- "token" mode: every conversation is a segment with writes on and loss on assistant tokens.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from ..errors import DataError


@dataclass
class Segment:
    tokens: list[int]
    loss: list[int]  # 1 where the token is a target (predicted from the previous position)
    message_ids: list[int]  # -1 = never written (system prompt, generation prompt)
    writes: bool


@dataclass
class Example:
    segments: list[Segment]

    @property
    def num_tokens(self) -> int:
        return sum(len(s.tokens) for s in self.segments)


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            _check_row(row, f"{path}:{n}")
            rows.append(row)
    if not rows:
        raise DataError(f"{path} holds no examples")
    return rows


def _check_row(row: Any, where: str) -> None:
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
        raise DataError(f"{where}: expected an object with a \"messages\" list")
    conversations = [row["messages"], *row.get("history", [])]
    for conv in conversations:
        if not isinstance(conv, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in conv):
            raise DataError(f"{where}: every message needs string \"role\" and \"content\"")
    if not any(m["role"] == "assistant" for m in row["messages"]):
        raise DataError(f"{where}: \"messages\" has no assistant message to learn")


class ChatEncoder:
    """Renders conversations with the tokenizer's chat template and finds message boundaries."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataError("the tokenizer has no chat template")

    def _ids(self, messages: list[dict], generation_prompt: bool = False) -> list[int]:
        if not messages and not generation_prompt:
            return []
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def encode(self, messages: list[dict], first_id: int = 0) -> tuple[Segment, int]:
        """One conversation → (segment with assistant loss mask and message ids, next id)."""
        ids = self._ids(messages)
        loss = [0] * len(ids)
        message_ids = [-1] * len(ids)
        start, next_id = 0, first_id
        for j, message in enumerate(messages):
            end = _common_prefix(self._ids(messages[:j + 1]), ids)
            if message["role"] != "system":
                message_ids[start:end] = [next_id] * (end - start)
                next_id += 1
            if message["role"] == "assistant":
                body = _common_prefix(self._ids(messages[:j], generation_prompt=True), ids)
                loss[body:end] = [1] * (end - body)
            start = end
        return Segment(ids, loss, message_ids, writes=True), next_id


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def make_example(encoder: ChatEncoder, row: dict, mode: str, max_tokens: int) -> Example:
    """Split a row into write / read segments (module docstring)."""
    messages = row["messages"]
    system = [m for m in messages[:1] if m["role"] == "system"]
    history = [[*system, *conv] if system and (not conv or conv[0]["role"] != "system") else conv
               for conv in row.get("history", [])]
    segments: list[Segment] = []
    next_id = 0
    if mode == "token":
        for conv in [*history, messages]:
            seg, next_id = encoder.encode(conv, next_id)
            segments.append(seg)
    else:
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=0)
        earlier, latest = messages[:last_user], messages[last_user:]
        if latest[0]["role"] == "system":
            earlier, latest = [], messages
        for conv in history:
            seg, next_id = encoder.encode(conv, next_id)
            seg.loss = [0] * len(seg.tokens)
            segments.append(seg)
        if len(earlier) > len(system):
            seg, next_id = encoder.encode(earlier, next_id)
            seg.loss = [0] * len(seg.tokens)
            segments.append(seg)
        read, _ = encoder.encode([*system, *latest] if latest[0]["role"] != "system" else latest,
                                 next_id)
        read.writes = False
        segments.append(read)
    for seg in segments:  # keep the most recent tokens of over-long segments
        if len(seg.tokens) > max_tokens:
            cut = len(seg.tokens) - max_tokens
            seg.tokens, seg.loss, seg.message_ids = (seg.tokens[cut:], seg.loss[cut:],
                                                     seg.message_ids[cut:])
    segments = [s for s in segments if s.tokens]
    if not any(any(s.loss[1:]) for s in segments):
        raise DataError("an example has no assistant tokens left to learn "
                        "(raise --max-seq-length?)")
    return Example(segments)


@dataclass
class Batch:
    """Right-aligned segments: index j of every example runs in the same forward call.

    Per call: tokens [B, T] int32, valid [B, T] (0 = padding or no segment), targets [B, T],
    loss mask [B, T] float32, message ids [B, T] (-1 for padding), writes (bool).
    """

    calls: list[dict]

    @property
    def num_tokens(self) -> int:
        return int(sum(c["valid"].sum() for c in self.calls))


def collate(examples: list[Example]) -> Batch:
    depth = max(len(e.segments) for e in examples)
    calls = []
    for j in range(depth):
        rows = [e.segments[j - depth + len(e.segments)] if j >= depth - len(e.segments) else None
                for e in examples]
        writes = {s.writes for s in rows if s is not None}
        if len(writes) > 1:
            raise DataError("examples in a batch disagree on which call is the read pass")
        width = max(len(s.tokens) for s in rows if s is not None)
        B = len(rows)
        tokens = np.zeros((B, width), np.int32)
        valid = np.zeros((B, width), np.float32)
        targets = np.zeros((B, width), np.int32)
        mask = np.zeros((B, width), np.float32)
        ids = np.full((B, width), -1, np.int64)
        for b, s in enumerate(rows):
            if s is None:
                continue
            n = len(s.tokens)
            tokens[b, :n] = s.tokens
            valid[b, :n] = 1
            targets[b, :n - 1] = s.tokens[1:]
            mask[b, :n - 1] = s.loss[1:]
            ids[b, :n] = s.message_ids
        calls.append({"tokens": tokens, "valid": valid, "targets": targets, "mask": mask,
                      "message_ids": ids, "writes": writes.pop()})
    return Batch(calls)


def iterate_batches(examples: list[Example], batch_size: int, seed: int,
                    loop: bool = True) -> Iterator[Batch]:
    """Shuffled batches; examples of similar size are batched together to limit padding."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        chunk = batch_size * 32
        batches = []
        for i in range(0, len(order), chunk):
            part = sorted(order[i:i + chunk], key=lambda k: examples[k].num_tokens)
            batches += [part[j:j + batch_size] for j in range(0, len(part), batch_size)]
        rng.shuffle(batches)
        for idx in batches:
            yield collate([examples[k] for k in idx])
        if not loop:
            return


def load_split(path: Path, encoder: ChatEncoder, mode: str, max_tokens: int,
               limit: Optional[int] = None, progress: bool = True) -> list[Example]:
    from tqdm import tqdm

    rows = read_jsonl(path)[:limit]
    out = []
    bar = tqdm(rows, desc=f"tokenizing {path.name}", disable=not progress or len(rows) < 2000,
               leave=False)
    for n, row in enumerate(bar, 1):
        try:
            out.append(make_example(encoder, row, mode, max_tokens))
        except DataError as exc:
            raise DataError(f"{path}: example {n}: {exc}") from None
    return out
