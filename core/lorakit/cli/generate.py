"""``lorakit generate RUN_DIR|MODEL_DIR --prompt TEXT [--file F] [--compare]``.

RUN_DIR is a run folder: the base is loaded as in training (quantized by its recipe) with the
adapter on top, and prompts are rendered by the run's formatter. MODEL_DIR is a merged export
(or an export folder holding ``merged/``): a plain transformers model loaded with
``AutoModelForCausalLM``, prompts rendered by its tokenizer's chat template, stopping at the
``eos_token_id`` list of its ``generation_config.json``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorakit.contracts import Message
from lorakit.errors import DataError, RunError


def _temperature(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a temperature: use 0 (greedy) or a finite number above 0 (sample)"
        )
    return value


def _top_p(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text!r} is not a top-p: use a number in (0, 1]")
    return value


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate", help="generate replies from a run (base + adapter) or a merged export"
    )
    p.add_argument(
        "target",
        metavar="RUN_DIR|MODEL_DIR",
        help="a run folder, an export folder or a merged model folder",
    )
    p.add_argument("--prompt", action="append", default=[], help="a user message (repeatable)")
    p.add_argument(
        "--file",
        type=Path,
        help='prompts: one per line, or .jsonl with {"messages": [...]} (a final assistant turn is dropped) or {"prompt": ...}',
    )
    p.add_argument(
        "--compare", action="store_true", help="also generate with the base model, side by side"
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=128, help="stop after this many tokens (default 128)"
    )
    p.add_argument(
        "--temperature", type=_temperature, default=0.0, help="0 (default): greedy; above 0: sample"
    )
    p.add_argument(
        "--top-p", type=_top_p, default=1.0, help="nucleus sampling threshold when sampling"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default 8)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.set_defaults(func=run)


# --------------------------------------------------------------------------- prompts


def _conversation(record: Any, where: str) -> list[Message]:
    if isinstance(record, dict) and isinstance(record.get("prompt"), str):
        return [Message("user", record["prompt"])]
    msgs = record.get("messages") if isinstance(record, dict) else None
    ok = isinstance(msgs, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in msgs
    )
    if not ok:
        raise DataError(
            "expected an object with a messages list of {role, content} or a prompt string",
            where=where,
            fix='write lines like {"messages": [{"role": "user", "content": "..."}]}',
        )
    assert isinstance(msgs, list)
    out = [Message(m["role"], m["content"]) for m in msgs]
    while out and out[-1].role == "assistant":
        out.pop()  # a reference answer: generate it instead
    if not out:
        raise DataError("the conversation has no prompt before the assistant turn", where=where)
    return out


MAX_PROMPT_FILE = 64 * 2**20  # prompts, not a data set: `lorakit eval` scores files that size


def _prompt_lines(file: Path) -> list[str]:
    """The lines of ``--file``; a FIFO or device (``/dev/zero``) is refused without being read."""
    fix = "pass a regular text or .jsonl file to --file"
    if not file.exists():
        raise DataError(f"prompt file {file} does not exist", fix=fix)
    if not file.is_file():
        kind = "a directory" if file.is_dir() else "not a regular file (a FIFO, socket or device)"
        raise DataError(f"prompt file {file} is {kind}", fix=fix)
    if file.stat().st_size > MAX_PROMPT_FILE:
        raise DataError(
            f"prompt file {file} is over {MAX_PROMPT_FILE // 2**20} MiB",
            fix="generate for fewer prompts at a time, or score a data set with lorakit eval",
        )
    try:
        return file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(
            f"prompt file {file} is not UTF-8 (byte {exc.start})", fix="save it as UTF-8"
        ) from None


def read_prompts(prompts: list[str], file: Path | None) -> list[list[Message]]:
    out = [[Message("user", p)] for p in prompts]
    if file is not None:
        lines = _prompt_lines(file)
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if file.suffix == ".jsonl":
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"not valid JSON ({exc.msg})", where=f"{file}:{n}") from exc
                out.append(_conversation(record, f"{file}:{n}"))
            else:
                out.append([Message("user", line)])
    if not out:
        raise DataError("no prompt given", fix="pass --prompt TEXT (repeatable) or --file FILE")
    return out


# --------------------------------------------------------------------------- targets


class Target:
    """What to generate with: a renderer, a tokenizer, stop ids, the tuned and base models."""

    render: Callable[[list[Message]], str]
    tokenizer: Any
    stop_ids: list[int]
    model: Any
    label: str

    def base_outputs(self, run_generate: Callable[[Any], list[Any]]) -> list[Any]:
        raise NotImplementedError


class RunTarget(Target):
    def __init__(self, run_dir: Path):
        from lorakit.catalog import default_catalog
        from lorakit.components import build_components
        from lorakit.load_run import load_model, open_run, prepare_inference
        from lorakit.modeling import check_adapter_dir
        from lorakit.rundir import RunDir

        catalog = default_catalog()
        recipe = open_run(run_dir, catalog)
        components = build_components(recipe, catalog)
        adapter = RunDir(run_dir).adapter
        check_adapter_dir(adapter)  # before the (slow) base load
        loaded = prepare_inference(recipe, components, adapter)
        self.tokenizer, self.stop_ids = loaded.tokenizer, loaded.stop_ids
        self.model = load_model(loaded, adapter)
        self.render = lambda msgs: loaded.formatter.render_prompt(msgs, loaded.tokenizer)
        self.label = f"{run_dir} (base + adapter, quant {recipe.quant.name})"

    def base_outputs(self, run_generate):
        with self.model.disable_adapter():
            return run_generate(self.model)


def _load_causal_lm(path: str, device: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    dtype: Any = torch.float32 if device == "cpu" else "auto"
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise RunError(
            f"cannot load a model from {path}: {exc}", fix="pass a merged export folder"
        ) from exc
    model.to(device)
    return model.eval()


class ModelDirTarget(Target):
    def __init__(self, folder: Path):
        from transformers import AutoTokenizer, GenerationConfig

        from lorakit.device import resolve_device

        self.device = resolve_device("auto")
        self.meta = (
            json.loads((folder / "lorakit.json").read_text())
            if (folder / "lorakit.json").is_file()
            else {}
        )
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        if not getattr(self.tokenizer, "chat_template", None):
            raise RunError(
                f"{folder} has a tokenizer without a chat template",
                fix="export the run with lorakit export",
            )
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        eos: Any = []
        if (folder / "generation_config.json").is_file():
            eos = GenerationConfig.from_pretrained(str(folder)).eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in eos:
            eos.append(self.tokenizer.eos_token_id)
        self.stop_ids = eos
        self.model = _load_causal_lm(str(folder), self.device)
        self.label = str(folder)
        system = self.meta.get("system_prompt")

        def render(msgs: list[Message]) -> str:
            rows = [{"role": m.role, "content": m.content} for m in msgs]
            if system is not None and rows[0]["role"] != "system":
                rows.insert(0, {"role": "system", "content": system})
            return self.tokenizer.apply_chat_template(
                rows, tokenize=False, add_generation_prompt=True
            )

        self.render = render

    def base_outputs(self, run_generate):
        base = self.meta.get("base_model_path")
        if not base or not Path(base).exists():
            raise RunError(
                f"--compare needs the base model, and {self.label}/lorakit.json does not name a local one",
                fix="run --compare on the run folder instead",
            )
        return run_generate(_load_causal_lm(base, self.device))


def open_generation_target(target: Path) -> Target:
    if (target / "run.json").is_file():
        return RunTarget(target)
    if (target / "config.json").is_file():
        return ModelDirTarget(target)
    if (target / "merged" / "config.json").is_file():
        return ModelDirTarget(target / "merged")
    fix = "pass a run folder (runs/NAME), or a merged export (lorakit export RUN_DIR --merge)"
    if (target / "adapter" / "adapter_config.json").is_file():
        fix = "this export has no merged model: pass its run folder, or re-export with --merge"
    raise RunError(f"{target} is neither a run folder nor a model folder", fix=fix)


# --------------------------------------------------------------------------- run


def run(args) -> int:
    import transformers

    from lorakit.decoding import generate

    transformers.logging.set_verbosity_error()
    if (
        args.max_new_tokens < 1
        or args.temperature < 0
        or not 0 < args.top_p <= 1
        or args.batch_size < 1
    ):
        raise DataError(
            "invalid decoding settings",
            fix="use --max-new-tokens >= 1, --temperature >= 0, 0 < --top-p <= 1, --batch-size >= 1",
        )
    conversations = read_prompts(args.prompt, args.file)
    target = open_generation_target(Path(args.target))
    rendered = [target.render(c) for c in conversations]

    def run_generate(model: Any) -> list[Any]:
        return generate(
            model,
            target.tokenizer,
            rendered,
            stop_ids=target.stop_ids,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            do_sample=args.temperature > 0,
            temperature=args.temperature or 1.0,
            top_p=args.top_p,
            seed=args.seed,
        )

    tuned = run_generate(target.model)
    base = target.base_outputs(run_generate) if args.compare else None
    for i, conv in enumerate(conversations):
        prompt = conv[-1].content
        if args.json:
            rec: dict[str, Any] = {
                "prompt": prompt,
                "output": tuned[i].text,
                "stopped": tuned[i].stopped,
            }
            if base is not None:
                rec.update(base_output=base[i].text, base_stopped=base[i].stopped)
            print(json.dumps(rec, ensure_ascii=False))
            continue
        print(f"[{i + 1}] {prompt}")
        rows = [("tuned", tuned[i])] + ([("base", base[i])] if base is not None else [])
        for name, gen in rows:
            note = "" if gen.stopped else f"  [no end-of-turn within {args.max_new_tokens} tokens]"
            body = gen.text.replace("\n", "\n" + " " * 9)
            print(f"  {name:<6} {body}{note}")
        print()
    return 0
