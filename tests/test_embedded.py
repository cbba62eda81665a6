"""End to end on the embedded SmolLM2-135M-Instruct: a real QLoRA run (bnb 4-bit NF4 on CPU),
then stock PEFT loads the adapter in a separate process and generates."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from helpers import chat_records, write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.embedded]


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory):
    from lorakit.cli.main import main

    folder = tmp_path_factory.mktemp("embedded")
    write_jsonl(folder / "chat.jsonl", chat_records(24))
    recipe = folder / "smol.toml"
    recipe.write_text(
        textwrap.dedent(
            f"""
            # embedded model, QLoRA, a few steps
            [quant]
            plugin = "bnb-4bit"
            [peft]
            r = 8
            alpha = 16
            [train]
            max_steps = 4
            per_device_train_batch_size = 4
            learning_rate = 1e-3
            save_steps = 4
            max_length = 128
            [eval]
            metrics = ["eval_loss"]
            baseline = false
            [[data.sources]]
            plugin = "chat_jsonl"
            path = "chat.jsonl"
            [output]
            dir = "{folder / "runs"}"
            """
        )
    )
    assert main(["run", str(recipe)]) == 0
    return folder / "runs" / "smol"


def test_embedded_qlora_run_learns(embedded_run):
    rows = [json.loads(x) for x in (embedded_run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0], losses
    from safetensors.torch import load_file

    tensors = load_file(str(embedded_run / "adapter" / "adapter_model.safetensors"))
    assert any("lora_B" in k and t.abs().sum() > 0 for k, t in tensors.items())
    gen = json.loads((embedded_run / "adapter" / "generation_config.json").read_text())
    assert gen["eos_token_id"] in (2, [2]), "stop at <|im_end|>"


def test_stock_peft_loads_adapter_in_fresh_process(embedded_run):
    base = json.loads((embedded_run / "adapter" / "lorakit.json").read_text())["base_model_path"]
    code = textwrap.dedent(
        f"""
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer
        base = AutoModelForCausalLM.from_pretrained({base!r}, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, {str(embedded_run / "adapter")!r})
        tok = AutoTokenizer.from_pretrained({str(embedded_run / "adapter")!r})
        msgs = [{{"role": "user", "content": "Extract: I bought 3 red cups."}}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=24, do_sample=False)
        print("GEN:" + tok.decode(out[0, ids["input_ids"].shape[1]:]))
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    text = res.stdout.split("GEN:", 1)[1]
    assert text.strip(), "the adapted model generated nothing"
