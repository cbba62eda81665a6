"""Packing must not let examples attend to each other (trl#1163)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_packed_examples_do_not_attend_to_each_other(tiny_model_dir, tmp_path, chat_file, cli):
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    a = {"input_ids": [5, 17, 33, 41, 60, 7], "labels": [5, 17, 33, 41, 60, 7]}
    b = {"input_ids": [9, 12, 80, 3], "labels": [9, 12, 80, 3]}
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)([a, b])
    batch = {k: packed[k] for k in ("input_ids", "position_ids")}
    with torch.no_grad():
        # as in training: TRL's SFTTrainer calls the model with use_cache=False, which is what
        # lets transformers derive a block-diagonal mask from the packed position_ids
        together = model(**batch, use_cache=False).logits[0]
        alone_a = model(input_ids=torch.tensor([a["input_ids"]])).logits[0]
        alone_b = model(input_ids=torch.tensor([b["input_ids"]])).logits[0]
    assert torch.allclose(together[:6], alone_a, atol=1e-5)
    assert torch.allclose(together[6:], alone_b, atol=1e-5), "b saw a's tokens"

    # and a packed run trains end to end
    from conftest import tiny_recipe

    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file, extra='name = "packed"')
    code, _, err = cli(
        "run", recipe, "train.packing=true", "train.max_steps=2", 'eval.metrics=["eval_loss"]'
    )
    assert code == 0, err
