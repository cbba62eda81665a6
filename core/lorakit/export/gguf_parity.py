"""Parity of a GGUF export: read the file back with an independent reader and compare.

The reader is transformers' ``gguf_file=`` loader: it rebuilds the config from the GGUF
metadata, undoes llama.cpp's q/k row order and dequantizes, and rebuilds the tokenizer from
``tokenizer.ggml.*``. So a wrong hyperparameter, tensor order, vocabulary or template shows up
here as different logits, tokens or text. llama-cpp-python is not used: PyPI has no prebuilt
wheel of it, only a source build (see docs/export.md).

Tolerances (vs the merged fp32 transformers model, over all probe positions): ``f32`` must
agree to fp32 noise; ``f16`` and ``q8_0`` round the weights, so their bounds are relative to the
largest reference logit, plus a bound on the relative perplexity change. Argmax agreement is
reported for every type.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs

from lorakit.errors import RunError
from lorakit.export.parity import FP32_TOLERANCE, Probes


@attrs.frozen
class Tolerance:
    max_abs: float | None = None  # absolute bound on max |logit diff|
    max_rel: float | None = None  # bound on max |logit diff| / max |reference logit|
    ppl_rel: float | None = None  # bound on |ppl - reference ppl| / reference ppl

    def to_json(self) -> dict[str, float]:
        return {k: v for k, v in attrs.asdict(self).items() if v is not None}


# Measured on SmolLM2-135M after a short LoRA run (docs/export.md): f16 0.12% of the logit scale
# and 0.02% perplexity, q8_0 3.5% and 0.3%. The bounds leave about three times that or more.
TOLERANCES = {
    "f32": Tolerance(max_abs=FP32_TOLERANCE),
    "f16": Tolerance(max_rel=0.01, ppl_rel=0.005),
    "q8_0": Tolerance(max_rel=0.1, ppl_rel=0.03),
    # llama.cpp's K-quants (llama_quantize); measured in docs/export.md
    "q6_k": Tolerance(max_rel=0.15, ppl_rel=0.05),
    "q5_k_m": Tolerance(max_rel=0.25, ppl_rel=0.08),
    "q4_k_m": Tolerance(max_rel=0.4, ppl_rel=0.15),
}


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers' GGUF loader draws tqdm bars on stderr (tqdm reads TQDM_DISABLE only at
    import); the export prints its own lines, so the loader's stderr is kept out of the way."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield


@contextlib.contextmanager
def parsed_once() -> Iterator[None]:
    """transformers' loader parses a GGUF's header twice for one model (the config, then the
    weights: every one of the vocabulary's strings, element by element) and builds gguf-py's
    tensor-name map again for each of the model's ~400 modules. Inside this block each file
    is parsed once and each map built once: the same reader, read-only, and the same map, so
    the same model (SmolLM2-135M's F32 file, imports warm: 11 s to 4 s). Both
    are gguf-py's own objects, looked up by transformers when it loads. A tokenizer loaded
    from the same file inside the block reuses the reader too (``lorakit.api.gguf_parsed_once``
    for plugins: the embedded model's conversion, 39 s to 10-12 s)."""
    import functools

    import gguf as gguf_module

    gguf: Any = gguf_module  # its attributes are swapped for the block
    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: Any, mode: str = "r") -> Any:
        key = (str(path), mode)
        if key not in readers:
            readers[key] = reader_class(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map


def read_model(path: Path, device: str = "cpu") -> Any:
    """The model in fp32, rebuilt from the GGUF alone (config from its metadata) by transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    with _no_progress_bars(), parsed_once():
        model: Any = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    return model.to(device).eval()


def read_tokenizer(path: Path) -> Any:
    """The tokenizer rebuilt by transformers from the GGUF's ``tokenizer.ggml.*`` metadata."""
    from transformers import AutoTokenizer

    with _no_progress_bars():
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def argmax_agreement(reference: list[Any], other: list[Any]) -> float:
    same = sum(
        int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(reference, other, strict=True)
    )
    return same / sum(len(a) for a in reference)


def check_tolerance(
    row: dict[str, Any], gguf_type: str, reference: list[Any], ref_ppl: float
) -> None:
    """Add the tolerance and the derived numbers to ``row``; raise ``RunError`` beyond it."""
    tol = TOLERANCES[gguf_type]
    scale = max(float(a.abs().max()) for a in reference)
    diff = row["max_abs_logit_diff"]
    row["max_rel_logit_diff"] = diff / scale if scale else float("inf")
    row["ppl_rel_diff"] = abs(row["ppl"] - ref_ppl) / ref_ppl if ref_ppl else float("inf")
    row["tolerance"] = tol.to_json()
    broken = []
    if tol.max_abs is not None and not diff <= tol.max_abs:
        broken.append(f"max |logit diff| {diff:.3g} > {tol.max_abs:g}")
    if tol.max_rel is not None and not row["max_rel_logit_diff"] <= tol.max_rel:
        broken.append(
            f"max |logit diff| {diff:.3g} is {row['max_rel_logit_diff']:.2%} of the logit scale "
            f"{scale:.3g} (> {tol.max_rel:.0%})"
        )
    if tol.ppl_rel is not None and not row["ppl_rel_diff"] <= tol.ppl_rel:
        broken.append(f"perplexity changes by {row['ppl_rel_diff']:.2%} (> {tol.ppl_rel:.1%})")
    row["within_tolerance"] = not broken
    if broken:
        raise RunError(
            f"the {gguf_type} GGUF read back differs from the merged model beyond its tolerance "
            f"({'; '.join(broken)}); nothing was exported",
            fix="export with a more precise --gguf-type (f32 is exact), or report this with the "
            "run folder if f32 fails",
        )


def check_tokenizer(tokenizer: Any, probes: Probes, original: Any) -> dict[str, Any]:
    """The GGUF's tokenizer must give the probe token ids the run's tokenizer gave."""
    texts = [original.decode(ids) for ids in probes.input_ids]
    for text in texts:
        want = original(text, add_special_tokens=False)["input_ids"]
        if tokenizer(text, add_special_tokens=False)["input_ids"] != want:
            raise RunError(
                f"the tokenizer rebuilt from the GGUF splits a probe differently from the run's "
                f"tokenizer ({text[:60]!r}...); nothing was exported",
                fix="report this with the run folder; export without --gguf meanwhile",
            )
    return {"probes": len(texts), "identical_token_ids": len(texts)}


def check_template(
    tokenizer: Any, examples: list[Any], formatter: Any, original: Any
) -> dict[str, Any]:
    """Every chat example of the train split must render through the GGUF's chat template
    exactly as the run's formatter rendered it for training (full text and generation prompt)."""
    if not getattr(tokenizer, "chat_template", None):
        raise RunError(
            "the run's tokenizer has no chat template, so the GGUF would carry none",
            fix='train with [format] plugin = "chat_template" on a model that has one',
        )
    checked = 0
    for ex in examples:
        if not ex.messages:
            continue
        msgs = [{"role": m.role, "content": m.content} for m in ex.messages]
        trained = formatter.render(ex, original).text
        rendered = tokenizer.apply_chat_template(msgs, tokenize=False)
        prompt_ok = True
        if ex.messages[-1].role == "assistant":
            prompt_ok = tokenizer.apply_chat_template(
                msgs[:-1], tokenize=False, add_generation_prompt=True
            ) == formatter.render_prompt(ex.messages[:-1], original)
        if rendered != trained or not prompt_ok:
            raise RunError(
                f"the chat template in the GGUF renders train example {ex.id} differently from "
                "how the run's formatter rendered it for training; nothing was exported",
                fix='GGUF runners use the chat template: train with [format] plugin = "chat_template" '
                "so the template is what the model learned",
            )
        checked += 1
    return {"train_examples_checked": checked, "identical": checked}
