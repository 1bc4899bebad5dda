"""python -m dmem_mlx.train: train a δ-mem adapter on a frozen mlx-lm backbone (mlx_lm.lora-style).

Only the δ parameters train (a few thousand per layer); the backbone — quantized or not — stays
frozen. The output directory is a complete model: the backbone's files plus the adapter, so
`dmem_mlx.load(DIR)` and `dmem-chat --model DIR` open it directly.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from .errors import DmemError, TrainError

MODES_HELP = (
    "history: the paper's recipe — earlier conversations/turns are written into the δ state, "
    "then only the latest turn is read in a fresh context with writes off; loss on its "
    "assistant tokens. token: plain next-token training with token writes, loss on every "
    "assistant message.")
DATA_HELP = (
    'directory with train.jsonl and valid.jsonl: one {"messages": [...]} per line, optionally '
    'with "history": [[...], ...] (earlier conversations, each written in its own forward call)')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dmem_mlx.train", description=__doc__.split("\n\n")[0],
        epilog="Example: python -m dmem_mlx.train --model mlx-community/Qwen3-0.6B-4bit "
               "--data data/ --adapter-path out/ --iters 1000")
    p.add_argument("--model", required=True, help="mlx-lm backbone: a local directory or hub repo")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--adapter-path", required=True,
                   help="output directory (backbone files + adapter + checkpoints)")
    p.add_argument("--mode", choices=["history", "token"], default="history", help=MODES_HELP)
    p.add_argument("--iters", type=int, default=1000, help="training steps (1000)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step (8)")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="peak learning rate (1e-3)")
    p.add_argument("--warmup", type=int, default=50, help="linear warmup steps (50)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--write-grad", choices=["full", "state"], default="full",
                   help="full: exact gradients; state: the gradient reaches the written history "
                        "only through the δ state (no backward pass over the written tokens' "
                        "backbone activations; 2-3x faster on long histories)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip (0 = off)")
    p.add_argument("--max-seq-length", type=int, default=2048,
                   help="tokens kept per forward call (the most recent ones)")
    p.add_argument("--steps-per-report", type=int, default=10)
    p.add_argument("--steps-per-eval", type=int, default=200)
    p.add_argument("--val-batches", type=int, default=25, help="-1 = the whole validation set")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-from", help="start from the δ weights and config of this adapter")
    p.add_argument("--add-state-heads", type=int, default=0, metavar="N",
                   help="with --init-from: widen the adapter by N state heads that start silent "
                        "(zero read-out), so training begins from the same model with more room")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --adapter-path (weights, optimizer, step)")
    p.add_argument("--resume-adapter-file",
                   help="start from these δ weights (a delta_mem.safetensors)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (tokenizing, training)")
    g = p.add_argument_group("δ config (ignored with --init-from / --resume)")
    g.add_argument("--delta-config", help="JSON object or file with δ config fields")
    g.add_argument("--rank", type=int, help="state size r (8)")
    g.add_argument("--alpha", type=float, help="α in the α/r scale (16)")
    g.add_argument("--delta-heads", help="corrected projections, subset of q,k,v,o (q,k,v,o)")
    g.add_argument("--num-state-heads", type=int, help="state heads H (1)")
    g.add_argument("--granularity", choices=["token", "message_mean"],
                   help="memory_write_granularity (token)")
    g.add_argument("--update-mode", choices=["standard", "lambda_outside", "no_lambda"])
    g.add_argument("--beta-bias-init", type=float, help="initial write-gate bias (-1.5)")
    g.add_argument("--output-init", choices=["zero", "random", "base_slice", "base_slice_fixed"])
    g.add_argument("--online-gain", type=float, help="scale of the initial Δ projections")
    return p


def delta_config_from_args(args: argparse.Namespace):
    from .config import DeltaMemConfig

    fields: dict = {"delta_heads": "q,k,v,o", "output_init": "base_slice_fixed"}
    if args.delta_config:
        text = args.delta_config
        if not text.lstrip().startswith("{"):
            try:
                text = Path(text).read_text()
            except OSError as exc:
                raise TrainError(f"--delta-config: {exc.strerror}: {text}") from None
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TrainError(f"--delta-config is not valid JSON: {exc.msg}") from None
        if not isinstance(loaded, dict):
            raise TrainError("--delta-config must be a JSON object")
        fields.update(loaded)
    for flag, key in [("rank", "rank"), ("alpha", "alpha"), ("delta_heads", "delta_heads"),
                      ("num_state_heads", "num_state_heads"),
                      ("granularity", "memory_write_granularity"),
                      ("update_mode", "state_update_mode"), ("beta_bias_init", "beta_bias_init"),
                      ("output_init", "output_init"), ("online_gain", "online_gain")]:
        if getattr(args, flag) is not None:
            fields[key] = getattr(args, flag)
    config = DeltaMemConfig.from_dict(fields)
    if config.memory_write_granularity == "sentence_mean":
        raise TrainError("training with sentence_mean writes is not supported")
    return config


def base_projection_weights(attention) -> dict:
    """Dense fp32 q/k/v/o weights of one attention block (dequantized if quantized)."""
    import mlx.core as mx
    import mlx.nn as nn

    out = {}
    for head in ("q", "k", "v", "o"):
        proj = getattr(attention, f"{head}_proj")
        proj = getattr(proj, "base", proj)
        if isinstance(proj, nn.QuantizedLinear):
            w = mx.dequantize(proj.weight, proj.scales, proj.get("biases"), proj.group_size,
                              proj.bits, **({"mode": proj.mode} if hasattr(proj, "mode") else {}))
        else:
            w = proj.weight
        out[head] = w.astype(mx.float32)
    return out


def prepare_model(args: argparse.Namespace):
    """(model with δ attached and initialised, tokenizer, backbone path)."""
    import mlx.core as mx
    from mlx_lm.utils import load as mlx_load

    from .adapter import attach_adapter, is_adapter_dir, read_adapter, widen_state_heads
    from .hub import resolve_model_path
    from .model import attach_delta_mem, load_delta_parameters
    from .utils import cast_floats, on_cpu

    path = resolve_model_path(args.model)
    model, tokenizer = mlx_load(str(path))
    if on_cpu():  # bf16/fp16 matmuls are slow on the CPU backend; the δ math is fp32 anyway
        cast_floats(model, mx.float32)
    init_dir = args.init_from
    if init_dir is None and args.resume and is_adapter_dir(args.adapter_path):
        init_dir = args.adapter_path
    if init_dir is not None:
        if not is_adapter_dir(init_dir):
            raise TrainError(f"{init_dir} holds no δ-mem adapter")
        config, weights = read_adapter(init_dir)
        if args.add_state_heads:
            config, weights = widen_state_heads(config, weights, args.add_state_heads,
                                                seed=args.seed)
        attach_adapter(model, config, weights)
    else:
        config = delta_config_from_args(args)
        bases = {i: base_projection_weights(layer.self_attn) for i, layer in
                 enumerate(model.layers)}
        dm = attach_delta_mem(model, config)
        for n, (i, layer) in enumerate(dm.layers.items()):
            layer.memory.initialize(bases[i], seed=args.seed * 1000 + n)
    if args.resume_adapter_file:
        try:
            weights = mx.load(args.resume_adapter_file)
        except Exception as exc:  # mlx raises plain errors on unreadable files
            raise TrainError(f"--resume-adapter-file: cannot read {args.resume_adapter_file}: "
                             f"{exc}") from None
        load_delta_parameters(model, weights)
    mx.eval(model.parameters())
    return model, tokenizer, path


def copy_backbone(src: Path, dst: Path) -> None:
    """Backbone files next to the adapter (hard links when possible, else copies)."""
    from .adapter import WEIGHTS_NAME
    from .config import CONFIG_NAME

    dst.mkdir(parents=True, exist_ok=True)
    for f in Path(src).iterdir():
        if not f.is_file() or f.name in (CONFIG_NAME, WEIGHTS_NAME) or f.name.startswith("."):
            continue
        target = dst / f.name
        if target.exists():
            continue
        try:
            os.link(f.resolve(), target)
        except OSError:
            shutil.copy2(f.resolve(), target)


def run(args: argparse.Namespace) -> dict:
    import mlx.core as mx

    from .training.data import ChatEncoder, load_split
    from .training.trainer import (TrainOptions, freeze_backbone, load_checkpoint,
                                   make_optimizer, train)

    data = Path(args.data)
    train_file, valid_file = data / "train.jsonl", data / "valid.jsonl"
    if not train_file.is_file():
        raise TrainError(f"{train_file} not found")
    for name in ("iters", "batch_size", "steps_per_report", "steps_per_eval", "save_every"):
        if getattr(args, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be >= 1")
    if args.learning_rate <= 0:
        raise TrainError("--learning-rate must be > 0")
    if args.add_state_heads < 0:
        raise TrainError("--add-state-heads must be >= 0")
    if args.add_state_heads and (not args.init_from or args.resume):
        raise TrainError("--add-state-heads widens the adapter given by --init-from "
                         "(and not with --resume)")
    out = Path(args.adapter_path)
    if args.resume and not (out / "trainer_state.json").is_file():
        raise TrainError(f"--resume: {out} holds no checkpoint to resume from")
    mx.random.seed(args.seed)
    model, tokenizer, backbone = prepare_model(args)
    encoder = ChatEncoder(tokenizer)
    print(f"Loading data from {data}", flush=True)
    progress = not args.no_progress
    train_set = load_split(train_file, encoder, args.mode, args.max_seq_length,
                           progress=progress)
    val_set = (load_split(valid_file, encoder, args.mode, args.max_seq_length,
                          progress=progress) if valid_file.is_file() else [])
    n_delta = sum(v.size for layer in model.delta_mem.layers.values()
                  for v in _leaves(layer.memory.parameters()))
    print(f"δ parameters: {n_delta:,} in {len(model.delta_mem.layers)} layers; "
          f"{len(train_set)} training / {len(val_set)} validation examples; mode {args.mode}",
          flush=True)
    opts = TrainOptions(
        iters=args.iters, batch_size=args.batch_size, learning_rate=args.learning_rate,
        warmup=args.warmup, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        steps_per_report=args.steps_per_report, steps_per_eval=args.steps_per_eval,
        val_batches=args.val_batches, save_every=args.save_every, seed=args.seed,
        write_grad=args.write_grad, progress=progress)
    copy_backbone(backbone, out)
    freeze_backbone(model)
    opt = make_optimizer(opts)
    start = load_checkpoint(model, opt, out) if args.resume else 0
    if start >= args.iters:
        raise TrainError(f"--resume: the run is already at step {start} (--iters {args.iters})")
    stats = train(model, train_set, val_set, opts, out, start_step=start, optimizer=opt)
    stats["history_file"] = str(out / "training_log.json")
    (out / "training_log.json").write_text(json.dumps(stats, indent=1) + "\n")
    print(f"Saved the model to {out} ({stats['tokens_per_sec']} tokens/s, peak memory "
          f"{stats['peak_memory_gb']:.2f} GB, {stats['seconds']:.0f} s)")
    return stats


def _leaves(tree):
    from mlx.utils import tree_flatten

    return [v for _, v in tree_flatten(tree)]


def main(argv: list[str] | None = None) -> int:
    try:
        from . import blas

        blas.reexec_with_openblas()
    except ImportError:
        pass
    args = build_parser().parse_args(argv)
    from .errors import user_message

    try:
        run(args)
    except (DmemError, OSError) as exc:
        print(f"error: {user_message(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is in --adapter-path; continue with --resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
