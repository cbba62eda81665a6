"""The round trip through llama.cpp: each exported GGUF run by ``libllama`` against transformers.

When a llama.cpp library is found (``lorakit.export.llama_cpp.find_library``), every GGUF file
of an export is loaded by llama.cpp itself and compared with the model it was written from
(the merged fp32 model in memory, or the base for ``--base-only``) in transformers:

- token ids: llama.cpp's tokenizer (the file's own vocabulary, special tokens parsed) on every
  probe text and generation prompt, against the run's tokenizer;
- logits: every position of every probe (the run's token ids fed to both), max abs difference,
  argmax agreement and perplexity on the supervised tokens, held to the GGUF type's tolerance;
- next-token logits after each generation prompt (max abs difference, top-1 agreement);
- greedy generations of ``N_GENERATE`` tokens after each prompt (stopping at the end of turn).

The result goes into ``parity.json`` (``llama_cpp``). It is reported, not a refusal: a warning
line says when a file is beyond its tolerance or tokenizes differently. Without a library the
round trip is skipped and ``parity.json`` says why.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

N_GENERATE = 16


def prompts_for(formatter: Any, tokenizer: Any) -> list[list[int]]:
    """Generation prompts: the built-in probe conversations without their answers, rendered by
    the run's formatter and tokenized by the run's tokenizer."""
    from lorakit.contracts import Message
    from lorakit.export.parity import BUILTIN_PROBES

    out = []
    for conv in BUILTIN_PROBES:
        messages = [Message(r, c) for r, c in conv[:-1]]
        text = formatter.render_prompt(messages, tokenizer)
        out.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return out


def _greedy(model: Any, prompt: list[int], stops: set[int], n: int) -> tuple[list[int], Any]:
    """transformers' greedy tokens after ``prompt`` (fp32, KV cache) and its next-token logits."""
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([prompt], device=device), use_cache=True)
        first = logits = out.logits[0, -1].float().cpu()
        tokens: list[int] = []
        while len(tokens) < n:
            token = int(logits.argmax())
            tokens.append(token)
            if token in stops:
                break
            out = model(
                input_ids=torch.tensor([[token]], device=device),
                cache=out.cache,
                use_cache=True,
            )
            logits = out.logits[0, -1].float().cpu()
    return tokens, first


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def compare_file(
    library: Path,
    path: Path,
    gguf_type: str,
    model: Any,
    report: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    stop_ids: list[int],
) -> dict[str, Any]:
    """Run ``path`` through llama.cpp and compare it with ``model`` (the reference of
    ``report``, in memory); the record for ``parity.json``'s ``llama_cpp.files``."""
    import torch

    from lorakit.export.gguf_parity import TOLERANCES, argmax_agreement
    from lorakit.export.llama_cpp import Request, run
    from lorakit.export.parity import max_abs_diff, perplexity

    probes = report.probes
    texts = [tokenizer.decode(ids) for ids in probes.input_ids]
    texts += [tokenizer.decode(ids) for ids in prompts]
    request = Request(texts, probes.input_ids, prompts, N_GENERATE)
    result = run(library, path, request)
    want = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    differ = [i for i, (a, b) in enumerate(zip(result.token_ids, want, strict=True)) if a != b]
    vocab = report.reference[0].shape[-1]
    logits = [torch.from_numpy(a[:, :vocab]) for a in result.logits]
    ppl, ref_ppl = perplexity(logits, probes), report.reference_ppl
    scale = max(float(a.abs().max()) for a in report.reference)
    diff = max_abs_diff(report.reference, logits)
    tol = TOLERANCES[gguf_type]
    rel = diff / scale if scale else float("inf")
    ppl_rel = abs(ppl - ref_ppl) / ref_ppl if ref_ppl else float("inf")
    # f32's own bound (1e-3) is for two fp32 transformers runs; llama.cpp's kernels sum in
    # another order, so f32 is held to f16's relative bound here.
    bound = tol if tol.max_rel is not None else TOLERANCES["f16"]
    within = rel <= (bound.max_rel or 0) and (bound.ppl_rel is None or ppl_rel <= bound.ppl_rel)
    stops = set(stop_ids)
    generations, next_diff, top1 = [], 0.0, 0
    for prompt, got, got_next in zip(
        prompts, result.generations, result.prompt_logits, strict=True
    ):
        hf_tokens, hf_next = _greedy(model, prompt, stops, N_GENERATE)
        got_next = torch.from_numpy(got_next[:vocab])
        next_diff = max(next_diff, float((got_next - hf_next).abs().max()))
        top1 += int(got_next.argmax() == hf_next.argmax())
        generations.append(
            {
                "prompt_tokens": len(prompt),
                "identical": got == hf_tokens,
                "common_prefix": _common_prefix(got, hf_tokens),
                "llama_cpp": tokenizer.decode(got),
                "transformers": tokenizer.decode(hf_tokens),
            }
        )
    return {
        "file": path.name,
        "token_ids": {
            "texts": len(texts),
            "identical": len(texts) - len(differ),
            "differ": [texts[i][:80] for i in differ],
        },
        "logits": {
            "max_abs_logit_diff": diff,
            "max_rel_logit_diff": rel,
            "argmax_agreement": argmax_agreement(report.reference, logits),
            "ppl": ppl,
            "ppl_rel_diff": ppl_rel,
            "tolerance": bound.to_json(),
            "within_tolerance": within,
        },
        "next_token": {
            "prompts": len(prompts),
            "max_abs_logit_diff": next_diff,
            "top1_agreement": top1 / len(prompts) if prompts else float("nan"),
        },
        "greedy": {
            "max_new_tokens": N_GENERATE,
            "identical": sum(g["identical"] for g in generations),
            "prompts": len(generations),
            "generations": generations,
        },
    }


def summary(row: dict[str, Any], gguf_type: str) -> str:
    """One line for the export's output."""
    lg, tok, gen, nxt = row["logits"], row["token_ids"], row["greedy"], row["next_token"]
    return (
        f"llama.cpp {gguf_type}: token ids {tok['identical']}/{tok['texts']} identical, "
        f"max |logit diff| {lg['max_abs_logit_diff']:.3g} ({lg['max_rel_logit_diff']:.2%}), "
        f"argmax {lg['argmax_agreement']:.1%}, ppl {lg['ppl_rel_diff']:+.2%}; "
        f"next token top-1 {nxt['top1_agreement']:.0%}; greedy {gen['identical']}/{gen['prompts']} "
        f"identical ({gen['max_new_tokens']} tokens)"
    )


def warnings(row: dict[str, Any], gguf_type: str) -> list[str]:
    out = []
    if row["token_ids"]["differ"]:
        out.append(
            f"warning: llama.cpp tokenizes {len(row['token_ids']['differ'])} probe text(s) of "
            f"the {gguf_type} GGUF differently from the run's tokenizer (parity.json llama_cpp)"
        )
    if not row["logits"]["within_tolerance"]:
        out.append(
            f"warning: llama.cpp's logits on the {gguf_type} GGUF are beyond the type's "
            "tolerance (parity.json llama_cpp)"
        )
    return out


def round_trip(
    library: Path,
    path: Path,
    gguf_type: str,
    model: Any,
    report: Any,
    loaded: Any,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """``compare_file`` with the run's tokenizer, prompts and stop ids; a failure of llama.cpp
    is recorded, not raised (the file was already checked by transformers)."""
    prompts = prompts_for(loaded.formatter, loaded.tokenizer)
    try:
        row = compare_file(
            library, path, gguf_type, model, report, loaded.tokenizer, prompts, loaded.stop_ids
        )
    except (RuntimeError, OSError) as exc:
        say(f"warning: llama.cpp could not run {path.name}: {exc}")
        return {"file": path.name, "error": str(exc)}
    say(summary(row, gguf_type))
    for line in warnings(row, gguf_type):
        say(line)
    return row
