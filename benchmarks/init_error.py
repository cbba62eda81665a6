"""How far each init's 4-bit start is from the full-precision weights, before any training.

    .venv/bin/python benchmarks/init_error.py [--r 16] [--inits default,pissa,olora,loftq,loftq4]

For the embedded SmolLM2-135M-Instruct and every linear layer LoRA adapts (all-linear, r=16,
alpha 32, NF4 + double quant, as ``bench_quality.py``), the relative Frobenius error
``||W - start|| / ||W||`` summed over the layers, where ``start`` is what the model computes
with before the first step: ``deq(Q(W))`` for a plain QLoRA start (B = 0), ``deq(Q(W))`` plus
the fitted ``s*B@A`` for LoftQ (one pass), and ``deq(Q(W_res)) + s*B0@A0`` for QPiSSA, QOLoRA
and multi-pass LoftQ (``lorakit.qpissa``). A smaller error is a start closer to the fp32 model;
this is what the inits can win back of the quantization gap. Prints one line per init.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

RECIPE = """
[model]
plugin = "smollm2-135m-instruct"
[[data.sources]]
plugin = "chat_jsonl"
path = "{data}"
[quant]
plugin = "bnb-4bit"
quant_type = "nf4"
double_quant = true
compute_dtype = "fp32"
[peft]
plugin = "lora"
r = {r}
alpha = {alpha}
target_modules = "all-linear"
"""
REPO = Path(__file__).resolve().parents[1]
INITS = {
    "default": [],
    "pissa": ['peft.init="pissa"'],
    "olora": ['peft.init="olora"'],
    "loftq": ['peft.init="loftq"'],
    "loftq4": ['peft.init="loftq"', "peft.loftq_iter=4"],
}


def main() -> None:
    import bitsandbytes as bnb
    from lorakit.modeling import attach_new_adapter, load_base_model, resolve_model
    from lorakit.qpissa import compute_residual
    from lorakit.session import open_session

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--inits", default=",".join(INITS))
    args = p.parse_args()
    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp(prefix="init_error-"))
    recipe = folder / "r.toml"
    data = REPO / "examples" / "data" / "chat.jsonl"
    recipe.write_text(RECIPE.format(data=data, r=args.r, alpha=2 * args.r))
    session = open_session(str(recipe))
    ref = resolve_model(session.components.model_source)
    fp32 = load_base_model(
        ref, session.components.quant, "cpu", quantized=False, dtype=torch.float32
    )
    originals = {n: m.weight.detach() for n, m in fp32.named_modules() if hasattr(m, "weight")}

    def deq(weight: torch.Tensor) -> torch.Tensor:
        q = bnb.nn.Params4bit(weight.contiguous(), requires_grad=False, quant_type="nf4").to("cpu")
        return bnb.functional.dequantize_4bit(q.data, q.quant_state)

    for init in args.inits.split(","):
        started = time.process_time()
        s = open_session(str(recipe), overrides=tuple(INITS[init]))
        residual = None
        if init == "default":  # the base is Q(W), B = 0
            model = attach_new_adapter(
                load_base_model(
                    ref, s.components.quant, "cpu", quantized=False, dtype=torch.float32
                ),
                s.components.peft,
                42,
            )
            names = [
                n.removeprefix("base_model.model.")
                for n, m in model.named_modules()
                if hasattr(m, "lora_A") and "default" in m.lora_A
            ]
        else:  # one-pass LoftQ keeps W as its "residual": deq(Q(W)) + s*B@A
            residual = compute_residual(ref, s.components, 42, None)
            names = list(residual.weights)
        err = total = 0.0
        for name in names:
            w = originals[name]
            if residual is None:
                start = deq(w)
            else:
                a0 = residual.initial[f"base_model.model.{name}.lora_A.weight"]
                b0 = residual.initial[f"base_model.model.{name}.lora_B.weight"]
                start = deq(residual.weights[name]) + residual.scaling[name] * (b0 @ a0)
            err += float(torch.linalg.norm(w - start) ** 2)
            total += float(torch.linalg.norm(w) ** 2)
        print(
            f"{init:8s} relative start error {100 * (err / total) ** 0.5:.3f}% "
            f"({len(names)} layers, {time.process_time() - started:.0f} CPU s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
