"""The bytes a training forward keeps for backward, per token and decoder layer, fitted for
``lorakit plan`` (``memory_plan._ACT``).

    .venv/bin/python benchmarks/fit_activations.py [--tokens 200,200,200,200]

Builds random-weight Llama models of several shapes (hidden, intermediate and key/value widths
varied one at a time) and loads each as `lorakit run` does (the quant backend and compute dtype,
k-bit preparation, LoRA r=16 on every linear layer with dropout, fast dropout, fused LoRA
layers, fused RMSNorm, packed attention). One forward of a packed row of examples
(``--tokens``: their lengths) runs under ``saved_tensors_hooks``, each storage counted once and
parameters left out, with 2 and with 4 decoder layers: the difference, divided by 2 layers and
the row's tokens, is one layer's bytes per token, free of the embeddings and the head. For each
setting (fp32 and bf16, LoRA on a plain base and QLoRA NF4) it prints the bytes per shape and the
least-squares fit ``a_h * hidden + a_i * intermediate + a_kv * kv_width + c`` next to the plan's
current coefficients and what they predict. Memory only; no timing. Needs no network.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from profile_step import DEFAULT_DATA, DTYPE_KEY  # noqa: E402

RECIPE = """
[model]
plugin = "local"
path = "{model}"
[[data.sources]]
plugin = "chat_jsonl"
path = "{data}"
[quant]
plugin = "{quant}"
{dtype_key} = "{dtype}"
[peft]
plugin = "lora"
r = 16
alpha = 32
dropout = 0.05
target_modules = "all-linear"
"""

# (hidden, intermediate, heads, kv heads): the first is the reference, each other varies one width
SHAPES = [
    (256, 768, 4, 2),
    (384, 768, 6, 2),
    (256, 1152, 4, 2),
    (256, 768, 4, 4),
    (512, 1536, 8, 4),
]
HEAD_DIM = 64
SETTINGS = [("none", "fp32"), ("none", "bf16"), ("bnb-4bit", "fp32"), ("bnb-4bit", "bf16")]


def model_folder(root: Path, hidden: int, inter: int, heads: int, kv: int, layers: int) -> Path:
    """A random-weight Llama of this shape saved in ``root`` (once; loading it for a forward
    needs no tokenizer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = root / f"h{hidden}-i{inter}-kv{kv}-l{layers}"
    if folder.exists():
        return folder
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=HEAD_DIM,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def saved_bytes(
    folder: Path, quant: str, dtype: str, lengths: list[int], data: Path = DEFAULT_DATA
) -> int:
    """Bytes one training forward of a packed row (examples of ``lengths``) keeps for
    backward, parameters left out, each storage once; loaded as `lorakit run` loads it."""
    import torch
    from lorakit.attention import packed_attention
    from lorakit.catalog import default_catalog
    from lorakit.components import build_components
    from lorakit.fast_dropout import use_fast_dropout
    from lorakit.fused_lora import use_fused_lora
    from lorakit.fused_norm import use_fused_norm
    from lorakit.loss import supervised_nll
    from lorakit.modeling import attach_new_adapter, load_base_model, resolve_model
    from lorakit.packing import pack
    from lorakit.recipe import load_recipe

    recipe = Path(tempfile.mkdtemp()) / "fit.toml"
    recipe.write_text(
        RECIPE.format(
            model=folder,
            data=data,
            quant=quant,
            dtype_key=DTYPE_KEY[quant],
            dtype=dtype,
        )
    )
    catalog = default_catalog()
    parts = build_components(load_recipe(recipe, catalog=catalog), catalog)
    ref = resolve_model(parts.model_source)
    model = parts.quant.prepare_for_training(load_base_model(ref, parts.quant, "cpu"), False)
    model = attach_new_adapter(model, parts.peft, 42)
    use_fast_dropout(model)
    use_fused_lora(model)
    use_fused_norm(model)
    model.train()
    g = torch.Generator().manual_seed(1)
    rows = []
    for n in lengths:
        ids = torch.randint(10, 49000, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100, *ids[1:]]})
    batch = pack(rows)
    params_at = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    total = 0

    def keep(x: Any) -> Any:
        nonlocal total
        if isinstance(x, torch.Tensor):
            ptr = x.untyped_storage().data_ptr()
            if ptr not in seen and ptr not in params_at:
                seen.add(ptr)
                total += x.untyped_storage().nbytes()
        return x

    with (
        packed_attention(model, "cpu"),
        torch.autograd.graph.saved_tensors_hooks(keep, lambda x: x),
    ):
        nll, _ = supervised_nll(model, batch)
    del nll
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", default="200,200,200,200", help="the packed examples' lengths")
    args = p.parse_args()
    import numpy as np
    from lorakit.cli.main import _quiet_libraries
    from lorakit.memory_plan import _ACT

    _quiet_libraries("run")
    lengths = [int(x) for x in args.tokens.split(",")]
    tokens = sum(lengths)
    root = Path(tempfile.mkdtemp(prefix="fit_activations-"))
    design = np.array([[h, i, kv * HEAD_DIM, 1.0] for h, i, _, kv in SHAPES])
    print(f"a packed row of {tokens} tokens ({args.tokens}); bytes per token and layer")
    for quant, dtype in SETTINGS:
        per = []
        for hidden, inter, heads, kv in SHAPES:
            two, four = (
                saved_bytes(
                    model_folder(root, hidden, inter, heads, kv, n),
                    quant,
                    dtype,
                    lengths,
                )
                for n in (2, 4)
            )
            per.append((four - two) / (2 * tokens))
        fit, *_ = np.linalg.lstsq(design, np.array(per), rcond=None)
        plan = np.array(_ACT[(4 if dtype == "fp32" else 2, quant != "none")])
        print(
            f"\n{quant} {dtype}: fit a_h {fit[0]:.2f}, a_i {fit[1]:.2f}, a_kv {fit[2]:.2f}, c {fit[3]:.1f}"
        )
        print(f"  plan's coefficients now: {tuple(float(x) for x in plan)}")
        for shape, measured, row in zip(SHAPES, per, design, strict=True):
            print(
                f"  hidden {shape[0]}, intermediate {shape[1]}, kv width {shape[3] * HEAD_DIM}: "
                f"measured {measured:.0f}, fit {row @ fit:.0f}, plan {row @ plan:.0f}"
            )


if __name__ == "__main__":
    main()
