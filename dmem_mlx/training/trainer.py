"""Training the δ parameters of a frozen mlx-lm backbone with MLX autograd.

One step: reset the δ state, run the batch's calls in order on that state (write calls update
it through the differentiable scan, the read call reads it with writes off), cross-entropy on
the masked tokens, and the gradient flows back through the state into the write calls.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..adapter import WEIGHTS_NAME, save_adapter
from ..errors import TrainError
from ..model import delta_parameters, load_delta_parameters
from .data import Batch, Example, iterate_batches

STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"


def freeze_backbone(model: nn.Module) -> None:
    """Only the δ parameters train; the backbone (quantized or not) stays frozen."""
    model.freeze()
    for layer in model.delta_mem.layers.values():
        layer.memory.unfreeze()


def batch_loss(model: nn.Module, batch: Batch,
               write_grad: str = "full") -> tuple[mx.array, mx.array]:
    """(mean cross-entropy over target tokens, number of target tokens) of one batch.

    Runs every call of the batch in order on a fresh δ state; a call with `writes` False is a
    read pass: the state is read, never changed. write_grad "full" is the exact gradient;
    "state" detaches the backbone activations of write calls without a loss (see
    `DeltaMem.detached_inputs`).
    """
    dm = model.delta_mem
    dm.reset()
    total, count = mx.array(0.0), mx.array(0.0)
    for call in batch.calls:
        has_loss = bool(call["mask"].any())
        enabled = dm.writes_enabled
        dm.writes_enabled = call["writes"]
        try:
            with dm.inputs(valid=call["valid"], message_ids=call["message_ids"]), \
                    dm.detached_inputs(write_grad == "state" and not has_loss):
                tokens = mx.array(call["tokens"])
                # a call without loss needs no logits: skip the LM head when we can
                logits = model(tokens) if has_loss or not hasattr(model, "model") \
                    else model.model(tokens)
        finally:
            dm.writes_enabled = enabled
        mask = mx.array(call["mask"])
        if has_loss:
            ce = nn.losses.cross_entropy(logits.astype(mx.float32), mx.array(call["targets"]))
            total = total + (ce * mask).sum()
            count = count + mask.sum()
    return total / mx.maximum(count, 1.0), count


def token_accuracy(model: nn.Module, batch: Batch) -> tuple[float, float]:
    """(correct argmax predictions, target tokens) of the loss-masked positions."""
    dm = model.delta_mem
    dm.reset()
    correct = total = 0.0
    for call in batch.calls:
        dm.writes_enabled = call["writes"]
        with dm.inputs(valid=call["valid"], message_ids=call["message_ids"]):
            logits = model(mx.array(call["tokens"]))
        dm.writes_enabled = True
        hit = (mx.argmax(logits, axis=-1) == mx.array(call["targets"])) * mx.array(call["mask"])
        correct += hit.sum().item()
        total += float(call["mask"].sum())
    dm.reset()
    return correct, total


def evaluate(model: nn.Module, examples: list[Example], batch_size: int,
             num_batches: int) -> dict:
    """Validation loss and token accuracy on the assistant (target) tokens."""
    loss_sum = tokens = correct = 0.0
    for i, batch in enumerate(iterate_batches(examples, batch_size, seed=0, loop=False)):
        if 0 <= num_batches <= i:
            break
        loss, count = batch_loss(model, batch)
        mx.eval(loss, count)
        loss_sum += loss.item() * count.item()
        tokens += count.item()
        c, _ = token_accuracy(model, batch)
        correct += c
    model.delta_mem.reset()
    return {"val_loss": loss_sum / max(tokens, 1), "val_token_accuracy": correct / max(tokens, 1)}


@dataclass
class TrainOptions:
    iters: int = 1000
    batch_size: int = 8
    learning_rate: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    steps_per_report: int = 10
    steps_per_eval: int = 200
    val_batches: int = 25
    save_every: int = 100
    seed: int = 0
    write_grad: str = "full"
    progress: bool = True


def make_optimizer(opts: TrainOptions) -> optim.Optimizer:
    warmup = max(0, min(opts.warmup, opts.iters // 10))
    decay = optim.cosine_decay(opts.learning_rate, max(1, opts.iters - warmup),
                               opts.learning_rate * 0.05)
    schedule = (optim.join_schedules([optim.linear_schedule(0.0, opts.learning_rate, warmup),
                                      decay], [warmup]) if warmup else decay)
    return optim.AdamW(learning_rate=schedule, weight_decay=opts.weight_decay)


def train(model: nn.Module, train_set: list[Example], val_set: list[Example],
          opts: TrainOptions, adapter_path: Path, start_step: int = 0,
          optimizer: Optional[optim.Optimizer] = None,
          report: Callable[[str], None] = print) -> dict:
    """The training loop; checkpoints and the final adapter go to `adapter_path`."""
    from tqdm import tqdm

    freeze_backbone(model)
    opt = optimizer or make_optimizer(opts)
    step_fn = nn.value_and_grad(model, lambda m, b: batch_loss(m, b, opts.write_grad))
    batches: Iterator[Batch] = iterate_batches(train_set, opts.batch_size, opts.seed)
    for _ in range(start_step):  # the same data order when resuming
        next(batches)
    stats: dict = {"history": []}
    bar = tqdm(range(start_step + 1, opts.iters + 1), initial=start_step, total=opts.iters,
               desc="δ-mem", disable=not opts.progress, dynamic_ncols=True)
    window_loss, window_tokens, window_start = [], 0, time.perf_counter()
    train_start, train_tokens = time.perf_counter(), 0
    mx.reset_peak_memory()
    for step in bar:
        batch = next(batches)
        (loss, count), grads = step_fn(model, batch)
        if opts.grad_clip > 0:
            grads, _ = optim.clip_grad_norm(grads, opts.grad_clip)
        opt.update(model, grads)
        mx.eval(model.trainable_parameters(), opt.state, loss)
        model.delta_mem.reset()
        value = loss.item()
        if not math.isfinite(value):
            raise TrainError(f"the loss is {value} at step {step}; lower --learning-rate")
        window_loss.append(value)
        window_tokens += batch.num_tokens
        train_tokens += batch.num_tokens
        tps = train_tokens / (time.perf_counter() - train_start)
        bar.set_postfix(loss=f"{np.mean(window_loss[-20:]):.3f}", tok_s=f"{tps:.0f}")
        if step % opts.steps_per_report == 0 or step == opts.iters:
            elapsed = time.perf_counter() - window_start
            line = {"step": step, "train_loss": round(float(np.mean(window_loss)), 4),
                    "lr": float(opt.learning_rate),
                    "tokens_per_sec": round(window_tokens / elapsed),
                    "peak_memory_gb": round(mx.get_peak_memory() / 1e9, 3)}
            stats["history"].append(line)
            report(json.dumps(line))
            window_loss, window_tokens, window_start = [], 0, time.perf_counter()
        if val_set and (step % opts.steps_per_eval == 0 or step == opts.iters):
            val = evaluate(model, val_set, opts.batch_size, opts.val_batches)
            stats["history"].append({"step": step, **val})
            report(json.dumps({"step": step, **{k: round(v, 4) for k, v in val.items()}}))
        if step % opts.save_every == 0 or step == opts.iters:
            save_checkpoint(model, opt, adapter_path, step)
    elapsed = time.perf_counter() - train_start
    stats.update(steps=opts.iters - start_step, seconds=round(elapsed, 1), tokens=train_tokens,
                 tokens_per_sec=round(train_tokens / max(elapsed, 1e-9)),
                 peak_memory_gb=round(mx.get_peak_memory() / 1e9, 3))
    return stats


def save_checkpoint(model: nn.Module, opt: optim.Optimizer, adapter_path: Path,
                    step: int) -> None:
    """The adapter (loadable as is), a numbered copy, and what --resume needs."""
    adapter_path.mkdir(parents=True, exist_ok=True)
    save_adapter(model, adapter_path, metadata={"step": step})
    checkpoints = adapter_path / "checkpoints"
    checkpoints.mkdir(exist_ok=True)
    weights = delta_parameters(model)
    mx.save_safetensors(str(checkpoints / f"{step:07d}_{WEIGHTS_NAME}"), weights)
    state = dict(tree_flatten(opt.state))
    mx.save_safetensors(str(adapter_path / OPTIMIZER_NAME),
                        {k: v for k, v in state.items() if isinstance(v, mx.array)})
    (adapter_path / STATE_NAME).write_text(json.dumps({"step": step}) + "\n")


def load_checkpoint(model: nn.Module, opt: optim.Optimizer, adapter_path: Path) -> int:
    """Restore the adapter weights and optimizer state saved by `save_checkpoint`; the step."""
    step = json.loads((adapter_path / STATE_NAME).read_text())["step"]
    load_delta_parameters(model, mx.load(str(adapter_path / WEIGHTS_NAME)))
    opt.init(model.trainable_parameters())
    saved = mx.load(str(adapter_path / OPTIMIZER_NAME))
    state = dict(tree_flatten(opt.state))
    state.update(saved)
    opt.state = tree_unflatten(list(state.items()))
    return int(step)
