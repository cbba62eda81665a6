"""The pure helpers of benchmarks/bench_train.py: model shapes, the real-shape ceiling's
arithmetic and the 'computes in' labels. Nothing here times anything or loads a model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_train
import ceiling
import model_sizes
import train_workers

EMBEDDED_135M = {  # the shape keys of the converted SmolLM2-135M-Instruct config.json
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "_model_name_or_path": "Smollm2 135M",
}


def linear_weights(config: dict) -> int:
    return sum(i * o * n for i, o, n in ceiling.linear_shapes(config))


def test_linear_shapes_cover_every_linear_weight_and_the_head():
    h, kv, inter, layers, vocab = 576, 3 * 64, 1536, 30, 49152
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter
    assert linear_weights(EMBEDDED_135M) == layers * per_layer + h * vocab
    assert (h, vocab, 1) in ceiling.linear_shapes(EMBEDDED_135M)


@pytest.mark.parametrize(("size", "params"), [("360m", 361_758_720), ("1.7b", 1_711_276_032)])
def test_sized_configs_have_smollm2_shapes(size, params):
    config = model_sizes.sized_config(EMBEDDED_135M, size)
    # SmolLM2-360M / -1.7B: these linear weights plus the RMSNorm weights are 361.8M / 1.71B
    assert linear_weights(config) == params
    assert config["head_dim"] == 64
    assert config["tie_word_embeddings"] is True
    assert config["rope_parameters"]["rope_theta"] == model_sizes.SHAPES[size]["rope_theta"]
    assert config["bos_token_id"] == 1  # the rest comes from the embedded model's config
    assert "_model_name_or_path" not in config


@pytest.mark.parametrize("size", ["135m", "1.7b"])
def test_a_narrow_config_keeps_its_models_structure_with_heads_of_8(size):
    wide = EMBEDDED_135M if size == "135m" else model_sizes.sized_config(EMBEDDED_135M, size)
    config = model_sizes.sized_config(EMBEDDED_135M, f"{size}-narrow")
    for key in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        assert config[key] == wide[key], key
    assert config["head_dim"] == 8 and config["intermediate_size"] <= 96


def test_training_matmuls_add_backward_shapes_and_merge_equal_ones():
    forward = ceiling.linear_shapes(EMBEDDED_135M)
    both = ceiling.training_matmuls(forward)
    assert len({(i, o) for i, o, _ in both}) == len(both)
    assert sum(i * o * n for i, o, n in both) == 2 * linear_weights(EMBEDDED_135M)
    # up/gate's backward (1536 -> 576) is down's forward shape: one entry, 3 x 30 calls
    assert (1536, 576, 90) in both


def test_combined_rate_is_total_flops_over_total_time():
    assert ceiling.combined_rate([(10, 10, 1), (20, 20, 3)], [5.0, 5.0]) == pytest.approx(5.0)
    # 200 FLOPs at 100/s (2 s) and 2400 FLOPs at 1200/s (2 s): 2600 FLOPs in 4 s
    assert ceiling.combined_rate([(10, 10, 1), (20, 20, 3)], [100.0, 1200.0]) == pytest.approx(
        650.0
    )


@pytest.mark.parametrize(
    ("args", "label"),
    [
        (("fp32",), "fp32"),
        (("bf16",), "bf16 base"),
        (("fp32", "bf16"), "fp32 + bf16 autocast"),
        (("bf16", "bf16"), "bf16 base + bf16 autocast"),
        (("bf16", "", "nf4"), "nf4/bf16"),
    ],
)
def test_dtype_label(args, label):
    assert train_workers.dtype_label(*args) == label


def test_lorakit_compute_reads_the_start_line():
    line = (
        "[lorakit] loading smollm2-135m-instruct on cpu (quant none, compute torch.bfloat16, "
        "1 threads)\n"
    )
    assert bench_train.lorakit_compute("[lorakit] train 175 examples\n" + line) == "bf16"
    assert bench_train.lorakit_compute(line.replace("bfloat16", "float32")) == "fp32"
    assert bench_train.lorakit_compute("no start line") == "unknown"
