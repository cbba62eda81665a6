"""``lorakit export RUN_DIR [--merge] [--merge-base original|dequantized] [--dtype ...]
[--gguf [--gguf-type f32|f16|q8_0 ...] [--base-only]] [--out DIR] [--overwrite]``."""

from __future__ import annotations

from pathlib import Path

from lorakit.device import DTYPES
from lorakit.errors import RunError
from lorakit.export.merge import MERGE_BASES

# lorakit.export.gguf_writer.GGUF_TYPES + llama_quantize.K_QUANTS, without importing gguf
GGUF_TYPES = ("f32", "f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a run's adapter (and with --merge a merged model) with tokenizer and model card",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by `lorakit run`")
    p.add_argument(
        "--merge",
        action="store_true",
        help="also write a merged model (merged in fp32, see --merge-base) and check parity",
    )
    p.add_argument(
        "--merge-base",
        choices=MERGE_BASES,
        help="what --merge merges into: the original base in fp32 (default), or, for a QLoRA "
        "run, the base quantized as in training and dequantized to fp32 (reproduces the "
        "trained model)",
    )
    p.add_argument(
        "--dtype", choices=DTYPES, default="fp32", help="dtype of the merged weights (default fp32)"
    )
    p.add_argument(
        "--gguf",
        action="store_true",
        help="also write the merged model as GGUF (llama.cpp, Ollama, LM Studio) with a Modelfile, "
        "read it back and check parity",
    )
    p.add_argument(
        "--gguf-type",
        action="append",
        choices=GGUF_TYPES,
        help="GGUF weight type (default f16); repeat for several files from one merge. The "
        "K-quants q6_k, q5_k_m, q4_k_m need llama.cpp's quantizer (LORAKIT_LLAMA_QUANTIZE or "
        "llama-quantize on PATH, see docs/export.md)",
    )
    p.add_argument(
        "--base-only",
        action="store_true",
        help="with --gguf: write the base model as trained (dequantized for a QLoRA run) instead "
        "of the merged model, to run with the adapter GGUF (llama.cpp --lora, Ollama ADAPTER)",
    )
    p.add_argument("--out", type=Path, help="export folder (default RUN_DIR/export)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a previous lorakit export in the target folder (swapped in once complete)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from lorakit.cli.run import terminate_like_ctrl_c
    from lorakit.export.folder import export_run

    if args.gguf_type and not args.gguf:
        raise RunError(
            "--gguf-type chooses the GGUF weight type, but --gguf was not given",
            fix=f"add --gguf: lorakit export {args.run_dir} --gguf --gguf-type {args.gguf_type[0]}",
        )
    if args.base_only and not args.gguf:
        raise RunError(
            "--base-only chooses what the GGUF files hold, but --gguf was not given",
            fix=f"add --gguf: lorakit export {args.run_dir} --gguf --base-only",
        )
    if args.base_only and args.merge_base is not None and not args.merge:
        raise RunError(
            "--merge-base chooses what is merged, but --gguf --base-only merges nothing (its "
            "base is the one the run trained on: dequantized for a quantized run)",
            fix=f"drop --merge-base: lorakit export {args.run_dir} --gguf --base-only",
        )
    if args.dtype != "fp32" and not args.merge:
        raise RunError(
            f"--dtype {args.dtype} chooses the merged model's weights, but --merge was not "
            "given (the adapter is exported as trained, GGUF files by --gguf-type)",
            fix=f"add --merge: lorakit export {args.run_dir} --merge --dtype {args.dtype}",
        )
    if args.merge_base is not None and not (args.merge or args.gguf):
        raise RunError(
            "--merge-base chooses what --merge or --gguf merges into, but neither --merge nor "
            "--gguf was given",
            fix=f"add --merge: lorakit export {args.run_dir} --merge --merge-base {args.merge_base}",
        )

    # SIGTERM (kill, a scheduler's stop) as Ctrl-C: the unfinished export folder is removed
    with terminate_like_ctrl_c():
        result = export_run(
            Path(args.run_dir),
            merge=args.merge,
            dtype=args.dtype,
            merge_base=args.merge_base or "original",
            out=args.out,
            overwrite=args.overwrite,
            gguf_types=tuple(dict.fromkeys(args.gguf_type or ["f16"])) if args.gguf else (),
            gguf_base_only=args.base_only,
        )
    print(f"adapter: {result.adapter}")
    if result.merged is not None:
        print(f"merged:  {result.merged}")
    if result.parity is not None:
        for row in result.parity["comparisons"].values():
            print(
                f"parity:  {row['model']}: max |logit diff| {row['max_abs_logit_diff']:.3g}, "
                f"ppl diff {row['ppl_diff_vs_reference']:+.4f}"
            )
        print(f"parity.json: {result.out / 'parity.json'}")
    if result.gguf is not None and result.gguf_parity is not None:
        for key, row in result.gguf_parity["comparisons"].items():
            if key.startswith("gguf_"):
                print(
                    f"gguf:    {result.gguf / row['file']}: max |logit diff| "
                    f"{row['max_abs_logit_diff']:.3g}, argmax agreement {row['argmax_agreement']:.1%}, "
                    f"ppl diff {row['ppl_diff_vs_reference']:+.4f}"
                )
        _print_llama_cpp(result.gguf_parity["llama_cpp"])
        print(f"gguf:    {result.gguf / 'Modelfile'} (ollama create NAME -f Modelfile)")
        print(f"parity.json: {result.gguf / 'parity.json'}")
    return 0


def _print_llama_cpp(record: dict) -> None:
    """The round trip through llama.cpp, one line per file (or why it was skipped)."""
    from lorakit.export.gguf_llama_cpp import summary

    if "skipped" in record:
        print(f"llama.cpp: round trip skipped: {record['skipped']}")
        return
    for gguf_type, row in record["files"].items():
        if "error" in row:
            print(f"llama.cpp: {row['file']}: could not run: {row['error']}")
        else:
            print(summary(row, gguf_type).replace("llama.cpp ", "llama.cpp: ", 1))
