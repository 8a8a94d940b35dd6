"""`aligner convert`: Hugging Face Llama/Mistral directories <-> our checkpoints.

    aligner convert import-hf SRC_HF_DIR DST_CHECKPOINT   # config.json + safetensors -> ours
    aligner convert export-hf SRC_CHECKPOINT DST_HF_DIR   # ours -> LlamaForCausalLM + tokenizer

Both run in one process at tensor-parallel size 1 (a checkpoint saved at any TP size is
resharded on load). The import keeps the HF tokenizer when the directory has a tokenizer.json.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from common.errors import InvalidArgument, NotFound
from common.logging import configure_logging

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aligner convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True, metavar="{import-hf,export-hf}")
    imp = sub.add_parser("import-hf", help="Hugging Face Llama/Mistral directory -> our checkpoint")
    imp.add_argument("src", help="Hugging Face model directory (config.json + safetensors)")
    imp.add_argument("dst", help="checkpoint directory to write")
    imp.add_argument(
        "--precision", choices=["fp32", "bf16"], default="fp32", help="weights dtype (default fp32)"
    )
    exp = sub.add_parser("export-hf", help="our checkpoint -> Hugging Face LlamaForCausalLM directory")
    exp.add_argument("src", help="our checkpoint directory (or a run directory: its latest checkpoint)")
    exp.add_argument("dst", help="Hugging Face directory to write")
    exp.add_argument(
        "--dtype", choices=sorted(_DTYPES), default=None, help="safetensors dtype (default: the weights')"
    )
    exp.add_argument(
        "--max-shard-gb", type=float, default=5.0, help="split the weights into shards of this size"
    )
    for p in (imp, exp):
        p.add_argument("--force", action="store_true", help="replace DST if it exists")
        p.add_argument("--torch-threads", type=int, default=2)
    return parser


def _check_dst(dst: Path, force: bool) -> None:
    if dst.exists() and not force:
        raise InvalidArgument("dst", f"{dst} already exists (use --force to replace it)")


def import_hf_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, precision: str = "fp32") -> Path:
    """HF directory -> our checkpoint (step 0, no optimizer)."""
    import dataclasses

    from trainer import checkpoint, hf

    src = Path(src)
    if not src.is_dir():
        raise NotFound(f"{src}: no such directory")
    arch, state = hf.import_hf(src)

    from trainer.model import build_model  # megatron: imported once the input looks right
    from trainer.parallel import init_parallel

    arch = dataclasses.replace(arch, precision=precision)
    init_parallel(1, 1)
    model = build_model(arch, value_head=False)
    hf.load_full_state_dict(model, state)
    tokenizer = checkpoint.load_tokenizer(src)
    config = {"source": {"format": "huggingface", "path": str(src.resolve())}}
    return checkpoint.save_checkpoint(dst, model, step=0, config=config, arch=arch, tokenizer=tokenizer)


def export_hf_checkpoint(
    src: str | os.PathLike, dst: str | os.PathLike, dtype: str | None = None, max_shard_gb: float = 5.0
) -> Path:
    """Our checkpoint -> HF LlamaForCausalLM directory (the value head, if any, is not exported)."""
    from trainer import checkpoint, hf

    model, arch, tokenizer = checkpoint.load_model_for_inference(src, value_head=False)
    if tokenizer is None:
        print(f"aligner convert: warning: {src} has no tokenizer; the export will have none", file=sys.stderr)
    return hf.export_hf(
        model, arch, tokenizer, dst,
        dtype=_DTYPES[dtype] if dtype else None, max_shard_bytes=int(max_shard_gb * 1024**3),
    )  # fmt: skip


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    configure_logging("convert", "console")  # progress on stderr; stdout says what was written
    torch.set_num_threads(max(1, args.torch_threads))
    src, dst = Path(args.src), Path(args.dst)
    if not src.exists():
        raise NotFound(f"{src}: no such file or directory")
    _check_dst(dst, args.force)
    if args.action == "import-hf":
        out = import_hf_checkpoint(src, dst, precision=args.precision)
    else:
        out = export_hf_checkpoint(src, dst, dtype=args.dtype, max_shard_gb=args.max_shard_gb)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
