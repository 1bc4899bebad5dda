"""python -m convert: port an official δ-mem adapter and its base model to MLX (no torch)."""

from __future__ import annotations

import argparse
import sys

EXAMPLE = """example:
  python -m convert --hf-repo declare-lab/delta-mem_qwen3_4b-instruct --mlx-path qwen3-4b-dmem -q
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m convert",
        description="Convert a δ-mem adapter (delta_mem_config.json + delta_mem_adapter.pt) and "
                    "its Hugging Face base model into an MLX model directory that "
                    "dmem_mlx.load and dmem-chat open. The adapter is read without torch and "
                    "validated before anything is written.",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-repo", "--hf-path", required=True,
                        help="hub repo id or local directory of the δ-mem adapter")
    parser.add_argument("--base-model", default=None,
                        help="hub repo id or local directory of the base model "
                             "(default: base_model from the adapter's model card)")
    parser.add_argument("--mlx-path", default="mlx_model",
                        help="output directory; must not exist (default: mlx_model)")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                        help="cast the backbone and the adapter to this dtype "
                             "(default: keep the stored dtypes exactly)")
    parser.add_argument("-q", "--quantize", action="store_true",
                        help="quantize the backbone (δ weights are never quantized)")
    parser.add_argument("--q-bits", type=int, choices=[2, 3, 4, 5, 6, 8], default=None,
                        help="bits per weight when quantizing (default: 4)")
    parser.add_argument("--q-group-size", type=int, choices=[32, 64, 128], default=None,
                        help="quantization group size (default: 64)")
    parser.add_argument("--revision", default=None, help="hub revision of the adapter repo")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dmem_mlx.errors import DmemError, user_message

    from .convert import convert

    try:
        convert(args.hf_repo, args.mlx_path, base_model=args.base_model, dtype=args.dtype,
                quantize=args.quantize, q_bits=args.q_bits, q_group_size=args.q_group_size,
                revision=args.revision)
    except (DmemError, OSError) as exc:
        print(f"error: {user_message(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
