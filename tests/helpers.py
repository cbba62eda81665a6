"""The test toolkit: tiny real models and tokenizers, chat data, recipe writers.

Everything here is a plain function; ``conftest.py`` turns the expensive ones into fixtures
(``tiny_model_dir``, ``data_tokenizer``, ``chat_file``, ``cli``...). Tests import from here
(``from helpers import chat_records``), never from ``conftest``.

- The tiny model is a real ``LlamaForCausalLM`` built from a config with random weights, saved
  with a real byte-level BPE tokenizer trained on the test corpus and a ChatML template (pad ==
  eos, like SmolLM2). Training on it goes through real PEFT, TRL and bitsandbytes, just fast.
- The data tokenizer is a byte-level BPE with ``<s>``/``</s>`` whose post-processor adds BOS to
  plain text (so formatters must write it exactly once), plus ``<|im_start|>``/``<|im_end|>``
  and a ChatML template: what the data tests need, no model.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

COLORS = ["red", "blue", "green", "black", "white", "yellow"]
ITEMS = ["car", "cup", "shirt", "lamp", "chair", "book"]

# text for the data tokenizer: every layout the formatters write
DATA_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world, this is a test.",
    "### Instruction:\nTranslate to French\n\n### Response:\nBonjour\n\n",
    "[INST] What is the capital of Japan? [/INST] Tokyo",
    "# Heading\n\nA paragraph of markdown text. Another sentence!\n\n## Sub heading\n- item one\n",
    "system user assistant answer question reply numbers 0123456789 abc xyz",
]

# --------------------------------------------------------------------------- data


def chat_records(n: int, seed: int = 0) -> list[dict]:
    """``n`` chat_jsonl records: extract item, color and quantity from a sentence as JSON."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        c, it, q = rng.choice(COLORS), rng.choice(ITEMS), rng.randint(1, 9)
        out.append(
            {
                "id": f"ex{i}",
                "messages": [
                    {"role": "user", "content": f"Extract: I bought {q} {c} {it}s."},
                    {
                        "role": "assistant",
                        "content": json.dumps({"item": it, "color": c, "qty": q}),
                    },
                ],
            }
        )
    return out


def preference_records(n: int, seed: int = 0) -> list[dict]:
    """``n`` preference_jsonl pairs on the chat task: the correct JSON is chosen, a near miss
    (another quantity or color) rejected."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        c, it, q = rng.choice(COLORS), rng.choice(ITEMS), rng.randint(1, 9)
        good = {"item": it, "color": c, "qty": q}
        bad = dict(good)
        if rng.random() < 0.5:
            bad["qty"] = q % 9 + 1
        else:
            bad["color"] = COLORS[(COLORS.index(c) + 1) % len(COLORS)]
        out.append(
            {
                "id": f"p{i}",
                "prompt": [{"role": "user", "content": f"Extract: I bought {q} {c} {it}s."}],
                "chosen": json.dumps(good),
                "rejected": json.dumps(bad),
            }
        )
    return out


def unpaired_records(n: int, seed: int = 0) -> list[dict]:
    """``n`` unpaired preference_jsonl answers (KTO) on the chat task: from the pairs of
    :func:`preference_records`, alternately the correct JSON labelled desirable and the near
    miss labelled undesirable."""
    out = []
    for i, pair in enumerate(preference_records(n, seed)):
        good = i % 2 == 0
        out.append(
            {
                "id": f"a{i}",
                "prompt": pair["prompt"],
                "completion": pair["chosen" if good else "rejected"],
                "label": good,
            }
        )
    return out


def with_preference_source(monkeypatch: Any) -> Any:
    """Make the default catalog hold the ``preference_jsonl`` source: through its entry point
    when the installed metadata has it, else by registering its module (a checkout whose venv
    was installed before the plugin existed). Returns the catalog."""
    from lorakit import catalog

    built = catalog.build_catalog(catalog.make_manager())
    if "preference_jsonl" not in built.entries["source"]:
        import lorakit_plugins.sources.preference_jsonl as module

        built = catalog.build_catalog(catalog.make_manager([module]))
    monkeypatch.setattr(catalog, "_DEFAULT", built)
    return built


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8"
    )
    return path


def write_big_chat(path: Path, n_bytes: int, seed: int = 0) -> int:
    """About ``n_bytes`` of distinct chat_jsonl records (random words); returns how many."""
    rng = random.Random(seed)
    words = [f"{a}{b}" for a in "bcdfghklmnprst" for b in ("a", "e", "i", "o", "u", "ou")]
    written = n = 0
    with path.open("w", encoding="utf-8") as f:
        while written < n_bytes:
            q = " ".join(rng.choices(words, k=rng.randint(5, 60)))
            a = " ".join(rng.choices(words, k=rng.randint(5, 120)))
            rec = {
                "id": f"b{n}",
                "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
            }
            line = json.dumps(rec) + "\n"
            f.write(line)
            written += len(line)
            n += 1
    return n


def read_context(recipe_dir: Path, on_error: str = "fail") -> Any:
    """A data source's read context, with a fresh data report."""
    from lorakit.data.pipeline import DataReport, ReadContext

    return ReadContext(recipe_dir=recipe_dir, on_error=on_error, report=DataReport())


# --------------------------------------------------------------------------- tokenizers, models


def _train_bpe(corpus: list[str], specials: list[str], vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>" if "<unk>" in specials else None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


def build_data_tokenizer() -> Any:
    """The data tests' tokenizer (see the module docstring); no model."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = _train_bpe(DATA_CORPUS * 20, ["<s>", "</s>", "<|im_start|>", "<|im_end|>"], 600)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHATML
    return fast


def build_tiny_model(folder: Path, *, biases: bool = False, hidden: int = 64) -> Path:
    """Save a tiny random Llama + trained BPE tokenizer with a ChatML template to ``folder``;
    ``biases``: its attention and MLP projections have biases (random, like Qwen2's q/k/v);
    ``hidden``: its width (the MLP's is twice that; 512 makes bf16 matmuls round differently
    with the batch shape on CPUs with AMX/AVX512-BF16, as real models' do)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = [m["content"] for r in chat_records(300) for m in r["messages"]]
    corpus += [
        "user assistant system Extract: I bought",
        "The quick brown fox jumps over the lazy dog.",
    ]
    tok = _train_bpe(corpus, ["<unk>", "<|im_start|>", "<|im_end|>"], 400)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",  # pad == eos on purpose, like SmolLM2
    )
    fast.chat_template = CHATML
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
        attention_bias=biases,
        mlp_bias=biases,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):  # transformers starts them at 0
                p.normal_(std=0.1)
    model.save_pretrained(str(folder), safe_serialization=True)
    fast.save_pretrained(str(folder))
    return folder


def load_tiny_model(folder: Path) -> Any:
    """The tiny model saved by :func:`build_tiny_model`, in fp32, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


# --------------------------------------------------------------------------- recipes


# The recipe key that sets each quant backend's compute dtype.
DTYPE_KEY = {"none": "dtype", "bnb-4bit": "compute_dtype", "bnb-8bit": "compute_dtype"}


def tiny_recipe(
    folder: Path,
    model_dir: Path,
    data: Path,
    *,
    quant: str = "none",
    extra: str = "",
    dtype: str = "fp32",
    source: str = "chat_jsonl",
) -> Path:
    """Write a recipe that trains the tiny model on ``data`` (read by the ``source`` plugin:
    ``preference_jsonl`` for pairs and labelled answers); runs go to ``folder/runs``.

    ``dtype`` is the compute dtype, pinned (fp32 by default) so that a test means the same on
    every CPU: ``auto`` is bf16 on CPUs with fast bf16 and fp32 elsewhere. Tests of guarantees
    that must hold in both take the ``compute_dtype`` fixture, which runs them under each.
    """
    text = f"""
[model]
plugin = "local"
path = "{model_dir}"

[quant]
plugin = "{quant}"
{DTYPE_KEY[quant]} = "{dtype}"

[peft]
r = 4
alpha = 8
dropout = 0.1

[train]
max_steps = 4
per_device_train_batch_size = 4
learning_rate = 5e-3
save_steps = 2
max_length = 64
seed = 7

[[data.sources]]
plugin = "{source}"
path = "{data}"

[output]
dir = "{folder / "runs"}"
{extra}
"""
    path = folder / "recipe.toml"
    path.write_text(text, encoding="utf-8")
    return path


def write_recipe(folder: Path, sources: list[dict[str, Any]], **sections: dict[str, Any]) -> Path:
    """A recipe in ``folder`` with ``sources`` and extra sections (written as TOML)."""

    def value(v: Any) -> str:
        return json.dumps(v) if not isinstance(v, bool) else ("true" if v else "false")

    lines = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {value(v)}" for k, v in table.items()]
    if "data" not in sections:
        lines.append("[data]")
    for src in sources:
        lines.append("[[data.sources]]")
        lines += [f"{k} = {value(v)}" for k, v in src.items()]
    lines.append("[output]")
    lines.append(f"dir = {value(str(folder / 'runs'))}")
    path = folder / "recipe.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------- export parity


def assert_reproduces_bf16_training(rows: dict) -> None:
    """A run trained in bf16 compute: the merge equals the trained weights evaluated in fp32
    arithmetic to fp32 noise, and differs from the bf16 model as trained by no more than the
    trained weights themselves do between bf16 and fp32 arithmetic (bf16's own rounding)."""
    import math

    exact = rows["as_trained_fp32"]
    bf16_noise = exact["max_abs_logit_diff"]  # same weights, fp32 vs bf16 arithmetic
    assert rows["unmerged"]["max_abs_logit_diff"] <= bf16_noise + 5e-4, rows
    assert rows["merged"]["max_abs_logit_diff"] <= bf16_noise + 5e-4, rows
    assert math.isclose(rows["merged"]["ppl"], exact["ppl"], rel_tol=1e-4), rows


# Runs the CLI, then reports which heavy libraries it imported, also when argparse exits
# (--help, --version).
PROBE = """
import sys
from lorakit.cli.main import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
finally:
    heavy = [m for m in ("torch", "transformers", "peft", "trl", "datasets") if m in sys.modules]
    print("HEAVY:" + ",".join(heavy), file=sys.stderr)
sys.exit(code)
"""


def run_probe(*args, cwd):
    return subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


# --------------------------------------------------------------------------- plugins of this tree


def uninstalled_entry_points(site: Path) -> Path | None:
    """A dist-info in ``site`` declaring the ``[project.entry-points.lorakit]`` entries of this
    tree's pyproject.toml that the installed lorakit does not have yet (built-in plugins added
    since the last ``pip install -e``), so the catalog finds them as it will after a reinstall;
    None when nothing is missing. Entries already installed are left out, so nothing is
    registered twice."""
    import importlib.metadata

    import tomllib

    table = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]
    installed = {ep.name for ep in importlib.metadata.entry_points(group="lorakit")}
    missing = {k: v for k, v in table["lorakit"].items() if k not in installed}
    if not missing:
        return None
    info = site / "lorakit_branch_plugins-0.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: lorakit-branch-plugins\nVersion: 0.0\n"
    )
    lines = "".join(f"{k} = {v}\n" for k, v in missing.items())
    (info / "entry_points.txt").write_text("[lorakit]\n" + lines)
    return site


# --------------------------------------------------------------------------- preference runs


def run_adapter(run: Path) -> dict:
    """The adapter weights a run saved."""
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def logged_steps(run: Path) -> list[dict]:
    """The training-step rows of a run's metrics.jsonl."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def held_out_results(run: Path) -> dict:
    """The held-out results by model (the forgetting canary's ``general`` rows aside)."""
    report = json.loads((run / "eval_report.json").read_text())
    return {
        (r.get("role") or ("tuned" if r["adapter"] else "base")): r
        for r in report["results"]
        if r["split"] != "general"
    }


def resume_split_run(cli: Any, recipe: Path, runs: Path, common: list[str]) -> dict:
    """``runs/split``: a 4-step run stopped at step 2 (checkpoint-2) and resumed with
    ``--resume-from-checkpoint auto``; its adapter weights."""
    code, _, err = cli("run", recipe, "output.name=split", "train.max_steps=2", *common)
    assert code == 0, err
    code, _, err = cli(
        "run",
        recipe,
        "output.name=split",
        "train.max_steps=4",
        *common,
        "--resume-from-checkpoint",
        "auto",
    )
    assert code == 0, err
    assert "resuming" in err and "checkpoint-2" in err
    return run_adapter(runs / "split")


def assert_seeded_and_resumes(cli: Any, recipe: Path, runs: Path, common: list[str]) -> tuple:
    """Two 4-step runs (a, b) with the same seed give the same adapter, and a run stopped at
    step 2 and resumed gives it too; returns the resumed and the uninterrupted run's step 4
    rows for the caller's metrics."""
    for name in ("a", "b"):
        code, _, err = cli("run", recipe, f"output.name={name}", "train.max_steps=4", *common)
        assert code == 0, err
    a, b = run_adapter(runs / "a"), run_adapter(runs / "b")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    split = resume_split_run(cli, recipe, runs, common)
    assert all(a[k].equal(split[k]) for k in a), "resumed adapter differs from uninterrupted run"
    steps = {s["step"]: s for s in logged_steps(runs / "split")}
    full = {s["step"]: s for s in logged_steps(runs / "a")}
    assert steps[4]["loss"] == full[4]["loss"]
    return steps[4], full[4]
