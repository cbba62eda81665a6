"""The ``README.md`` model card written into each export folder.

It says what a reader needs to trust the weights: the base model, the recipe, the data
fingerprint, the metrics (``eval_report.json`` of the run when there is one), the lorakit
version, which base a merge used, and the parity numbers.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

from lorakit import __version__


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"  # NaN, which the report writes as null (as report.md and compare show it)
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return "`" + json.dumps(value, default=str) + "`"
    return str(value)


def _metrics_section(
    eval_report: Mapping[str, Any] | None, last_eval: Mapping[str, Any] | None
) -> list[str]:
    out = ["## Metrics", ""]
    results = eval_report.get("results") if eval_report else None
    if isinstance(results, list) and results:
        # eval_report.json: one result per (model, split); the base model has no adapter
        names = sorted({k for r in results for k in (r.get("metrics") or {})})
        out.append("From the run's `eval_report.json`:")
        out.append("")
        out += [f"| split | model | {' | '.join(names)} |", "|---|---|" + "---|" * len(names)]
        for r in results:
            if r.get("role") == "start":  # a preference run's starting adapter (from_adapter)
                model = "starting adapter (from_adapter)"
            else:
                model = "fine-tuned" if r.get("adapter") else "base"
            got = r.get("metrics") or {}
            values = [_fmt(got[k]) if k in got else "-" for k in names]
            out.append(f"| {r.get('split', '?')} | {model} | {' | '.join(values)} |")
    elif eval_report:
        out.append("The run's `eval_report.json` holds no results (run `lorakit eval` on it).")
    elif last_eval:
        out.append("No `eval_report.json` in the run (run `lorakit eval` for task metrics); last")
        out.append(f"validation loss logged during training: {_fmt(last_eval.get('eval_loss'))}")
        out.append(f"(step {last_eval.get('step', '?')}).")
    else:
        out.append("No evaluation was recorded for this run (run `lorakit eval` on it).")
    return [*out, ""]


def _parity_section(parity: Mapping[str, Any] | None) -> list[str]:
    out = ["## Parity", ""]
    if not parity:
        return [*out, "Not measured (export with `--merge` to measure it).", ""]
    out.append(f"Reference: {parity['reference']}. Probes: {parity['probes']}")
    out.append(f"({parity['n_tokens']} tokens, {parity['n_supervised_tokens']} supervised).")
    out += ["", "| model | max abs logit diff | perplexity | vs reference |", "|---|---|---|---|"]
    out.append(f"| reference | 0 | {parity['reference_ppl']:.4f} | |")
    for row in parity["comparisons"].values():
        out.append(
            f"| {row['model']} | {row['max_abs_logit_diff']:.3g} | {row['ppl']:.4f} | "
            f"{row['ppl_diff_vs_reference']:+.4f} |"
        )
    for row in parity["comparisons"].values():
        if "argmax_agreement" in row:
            out.append(
                f"\n{row['model']}: next-token argmax agrees with the reference at "
                f"{row['argmax_agreement']:.1%} of positions; tolerance {_fmt(row.get('tolerance'))}."
            )
    if "quantized_vs_merged_ppl_diff" in parity:
        out += [
            "",
            f"Perplexity of the quantized base + adapter minus the merged model: "
            f"{parity['quantized_vs_merged_ppl_diff']:+.4f}.",
        ]
    return [*out, ""]


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def hub_id(meta: Mapping[str, Any]) -> str | None:
    """The base model's Hub id for the card's ``base_model``: the model source's own, or a
    path that is an ``org/name`` id (runs exported before sources named one); never a local
    folder or cache path, which would mean nothing on the Hub."""
    named = meta.get("base_model_id")
    if named:
        return str(named)
    path = str(meta.get("base_model_path") or "")
    if _HUB_ID.fullmatch(path) and not os.path.exists(path):
        return path
    return None


_TITLES = {"adapter": "LoRA adapter", "merged": "Merged model", "gguf": "GGUF model"}


def _gguf_use(parity: Mapping[str, Any]) -> list[str]:
    files = [row["file"] for row in parity.get("comparisons", {}).values() if "file" in row]
    first = files[0] if files else "<file>.gguf"
    template = (parity.get("chat_template") or {}).get("ollama_template")
    out = [
        f"Files: {', '.join(f'`{f}`' for f in files) or 'none'}. Each carries the tokenizer, the",
        "run's chat template, BOS/EOS and the end-of-turn token "
        f"(stop tokens: {', '.join(f'`{t}`' for t in parity.get('stop_tokens', []))}).",
        "",
        "```sh",
        f"llama-cli -m {first} -cnv",
        "ollama create my-model -f Modelfile && ollama run my-model",
        "```",
        "",
        f"Ollama TEMPLATE: translated from the chat template ({template})."
        if template
        else "Ollama TEMPLATE: **not translated** (see the comment in `Modelfile`).",
    ]
    adapter = parity.get("adapter_gguf") or {}
    if parity.get("base_only"):
        out += [
            "",
            f"**Base model only** ({parity.get('merge_base')}): these files hold the base the run "
            "was trained on, not the fine-tuned model. Apply the adapter: "
            f"`llama-cli -m {first} --lora {adapter.get('file', '<adapter>.gguf')}` (the "
            "Modelfile's `ADAPTER` line does this for Ollama).",
        ]
    if adapter.get("written"):
        out.append(
            f"Adapter alone: `{adapter['file']}` for `llama-cli -m BASE.gguf --lora {adapter['file']}`"
            " (BASE: a GGUF of the same base model)."
        )
    elif adapter:
        out.append(f"No adapter-only GGUF: {adapter.get('reason')}.")
    return out


def render_card(
    *,
    kind: str,
    meta: Mapping[str, Any],
    recipe_text: str,
    data_report: Mapping[str, Any] | None,
    eval_report: Mapping[str, Any] | None,
    last_eval: Mapping[str, Any] | None,
    parity: Mapping[str, Any] | None,
    merge_info: Mapping[str, Any] | None,
) -> str:
    """Markdown for ``kind`` = "adapter", "merged" or "gguf" (the GGUF folder)."""
    base = meta.get("base_model", "unknown")
    library = {"adapter": "peft", "gguf": "gguf"}.get(kind, "transformers")
    quant = meta.get("quant") or {}
    hub = hub_id(meta)
    lines = [
        "---",
        f"library_name: {library}",
        *([f"base_model: {json.dumps(hub)}"] if hub else []),
        "tags: [lorakit, lora" + (", qlora" if meta.get("quantized") else "") + "]",
        "---",
        "",
        f"# {_TITLES.get(kind, 'Merged model')} trained with lorakit",
        "",
        f"- base model: {base}",
        f"- training quantization: {_fmt(quant) if quant else 'none'}",
        f"- prompt format: {meta.get('format', '?')} (end of turn `{meta.get('end_of_turn', '?')}`;"
        " the chat template ships with the tokenizer)",
        f"- data fingerprint: {meta.get('data_fingerprint') or (data_report or {}).get('fingerprint', '?')}",
        f"- config hash: {meta.get('config_hash', '?')}, steps trained: {meta.get('global_step', '?')}",
        f"- trained with lorakit {meta.get('lorakit_version', '?')}, exported with lorakit {__version__}",
    ]
    if data_report and data_report.get("counts"):
        counts = data_report["counts"]
        lines.append("- examples: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if merge_info:
        lines.append(
            f"- merge: adapter merged into the **{merge_info['merge_base']}** base "
            f"(safe_merge), then cast to {merge_info['dtype']}"
        )
    if kind == "gguf" and parity and parity.get("base_only"):
        lines.append(
            f"- GGUF files: the **{parity.get('merge_base', '?')}** base as trained, without "
            "the adapter (apply the adapter GGUF with --lora)"
        )
    elif kind == "gguf" and parity:
        lines.append(
            f"- GGUF merge: adapter merged into the **{parity.get('merge_base', '?')}** base"
        )
    lines.append("")
    lines += _metrics_section(eval_report, last_eval)
    lines += _parity_section(parity)
    lines += ["## Use", ""]
    if kind == "gguf":
        lines += _gguf_use(parity or {})
    elif kind == "adapter":
        lines += [
            "```python",
            "from peft import AutoPeftModelForCausalLM",
            'model = AutoPeftModelForCausalLM.from_pretrained("<this folder>")',
            "```",
        ]
    else:
        lines += [
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            'model = AutoModelForCausalLM.from_pretrained("<this folder>")',
            'tokenizer = AutoTokenizer.from_pretrained("<this folder>")',
            "```",
        ]
    if kind == "merged":
        lines += ["", 'or `lorakit generate <this folder> --prompt "..."`.', ""]
    elif kind == "adapter":  # generate takes the run folder (base + adapter) or a merged model
        lines += ["", 'or `lorakit generate <run folder> --prompt "..."`.', ""]
    lines += ["## Recipe", "", "```toml", recipe_text.rstrip(), "```", ""]
    return "\n".join(lines)
