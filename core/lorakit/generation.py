"""What ``lorakit generate`` decodes: prompts (``--prompt``, ``--file``) and the target.

A target is a run folder (the base loaded as in training, quantized by its recipe, with the
adapter on top; prompts rendered by the run's formatter) or a merged export (a plain
transformers model loaded with ``AutoModelForCausalLM``, prompts rendered by its tokenizer's
chat template, stopping at the ``eos_token_id`` list of its ``generation_config.json``).
:func:`generate_replies` decodes every prompt with the tuned model, and with ``compare`` with
the base model too.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from lorakit.contracts import Message
from lorakit.errors import DataError, RunError, cause

# --------------------------------------------------------------------------- prompts


@attrs.frozen
class Prompt:
    """One conversation to reply to, and the tools its assistant may call (rendered into the
    prompt as training renders them)."""

    messages: list[Message]
    tools: tuple[Mapping[str, Any], ...] | None = None


def _conversation(record: Any, where: str) -> Prompt:
    from lorakit.data.tools import message_from_json, tools_from_json

    if isinstance(record, dict) and isinstance(record.get("prompt"), str):
        return Prompt([Message("user", record["prompt"])])
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
    assert isinstance(msgs, list) and isinstance(record, dict)
    try:  # tool calls and tools as the chat contract has them (lorakit.data.tools)
        out = [message_from_json(m) for m in msgs]
        tools = tools_from_json(record["tools"]) if record.get("tools") else None
    except ValueError as exc:
        raise DataError(
            str(exc), where=where, fix="write tools and tool_calls as in a chat_jsonl data file"
        ) from None
    while out and out[-1].role == "assistant":
        out.pop()  # a reference answer: generate it instead
    if not out:
        raise DataError("the conversation has no prompt before the assistant turn", where=where)
    return Prompt(out, tools)


MAX_PROMPT_FILE = 64 * 2**20  # prompts, not a data set: `lorakit eval` scores files that size


def _prompt_lines(file: Path) -> list[str]:
    """The lines of ``--file``; a FIFO or device (``/dev/zero``) is refused without being read.

    A UTF-8 byte-order mark (Windows editors write one) is dropped, not read into the first
    prompt or refused by the JSON parser. Lines end at a line feed (read in text mode, CR LF and
    CR are one) and nowhere else: JSON allows U+2028, U+2029 and the other characters
    ``str.splitlines`` also splits at inside a string."""
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
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        with file.open("rb") as f:  # the decoder counts from after the mark
            at = exc.start + (len(codecs.BOM_UTF8) if f.read(3) == codecs.BOM_UTF8 else 0)
        raise DataError(
            f"prompt file {file} is not UTF-8 (byte {at})", fix="save it as UTF-8"
        ) from None
    return text.split("\n")


def read_prompts(prompts: list[str], file: Path | None) -> list[Prompt]:
    out = [Prompt([Message("user", p)]) for p in prompts]
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
                out.append(Prompt([Message("user", line)]))
    if not out:
        raise DataError("no prompt given", fix="pass --prompt TEXT (repeatable) or --file FILE")
    return out


# --------------------------------------------------------------------------- targets


class Target:
    """What to generate with: a renderer, a tokenizer, stop ids, the tuned and base models,
    and the system prompt the model was trained with (None: none, or several)."""

    render: Callable[[list[Message], Any], str]  # (messages, tools or None) -> prompt
    tokenizer: Any
    stop_ids: list[int]
    model: Any
    label: str
    system: str | None = None

    def base_outputs(self, run_generate: Callable[[Any], list[Any]]) -> list[Any]:
        raise NotImplementedError


class RunTarget(Target):
    def __init__(self, run_dir: Path):
        from lorakit.export.adapter_io import read_meta
        from lorakit.fidelity import served_prompt
        from lorakit.load_run import load_model, prepare_inference
        from lorakit.modeling import check_adapter_dir
        from lorakit.rundir import RunDir
        from lorakit.session import open_session

        session = open_session(run_dir, runs=True)
        recipe = session.recipe
        adapter = RunDir(run_dir).adapter
        check_adapter_dir(adapter)  # before the (slow) base load
        loaded = prepare_inference(recipe, session.components, adapter)
        self.system = read_meta(adapter).get("system_prompt")
        self.tokenizer, self.stop_ids = loaded.tokenizer, loaded.stop_ids
        self.model = load_model(loaded, adapter)

        def render(msgs: list[Message], tools: Any = None) -> str:
            return served_prompt(loaded.formatter, msgs, loaded.tokenizer, tools)

        self.render = render
        self.label = f"{run_dir} (base + adapter, quant {recipe.quant.name})"

    def base_outputs(self, run_generate):
        from lorakit.qpissa import adapter_off

        with adapter_off(self.model):
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
        from lorakit.rundir import read_json

        # read_json: a damaged lorakit.json is a RunError naming the file
        self.meta = (
            read_json(folder / "lorakit.json") if (folder / "lorakit.json").is_file() else {}
        )
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError) as exc:  # a file of it missing or damaged
            raise RunError(
                f"the tokenizer in {folder} cannot be loaded ({cause(exc)})",
                fix="a tokenizer file is missing or damaged: export the run again "
                "(lorakit export RUN --merge)",
            ) from exc
        if not getattr(self.tokenizer, "chat_template", None):
            raise RunError(
                f"{folder} has a tokenizer without a chat template (the run's format plugin "
                "renders its prompts, e.g. chatml on a base without a template)",
                fix="generate with the run folder instead (lorakit generate RUN_DIR): its "
                "recipe's format renders the prompts",
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
        self.system = self.meta.get("system_prompt")

        def render(msgs: list[Message], tools: Any = None) -> str:
            extra = {"tools": [dict(t) for t in tools]} if tools else {}
            return self.tokenizer.apply_chat_template(
                [m.to_json() for m in msgs], tokenize=False, add_generation_prompt=True, **extra
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
    from lorakit.lora_init import checkpoint_refusal

    if (target / "run.json").is_file():
        return RunTarget(target)
    checkpoint_refusal(target, "pass the run folder")
    if (target / "config.json").is_file():
        return ModelDirTarget(target)
    if (target / "merged" / "config.json").is_file():
        return ModelDirTarget(target / "merged")
    fix = "pass a run folder (runs/NAME), or a merged export (lorakit export RUN_DIR --merge)"
    if (target / "adapter" / "adapter_config.json").is_file():
        fix = "this export has no merged model: pass its run folder, or re-export with --merge"
    raise RunError(f"{target} is neither a run folder nor a model folder", fix=fix)


def generate_replies(
    target: Target,
    conversations: list[Prompt],
    *,
    compare: bool,
    max_new_tokens: int,
    batch_size: int,
    temperature: float,
    top_p: float,
    seed: int,
    system: str | None = None,
) -> tuple[list[Any], list[Any] | None]:
    """The tuned model's replies to ``conversations`` (``Generation``s, in order), and with
    ``compare`` the base model's. ``temperature`` 0 decodes greedily. A conversation without a
    system message gets ``system``, else the one the model was trained with (``""``: none)."""
    from lorakit.decoding import generate
    from lorakit.fidelity import system_messages

    prompt = target.system if system is None else (system or None)
    rendered = [target.render(system_messages(prompt, c.messages), c.tools) for c in conversations]

    def run_generate(model: Any) -> list[Any]:
        return generate(
            model,
            target.tokenizer,
            rendered,
            stop_ids=target.stop_ids,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            do_sample=temperature > 0,
            temperature=temperature or 1.0,
            top_p=top_p,
            seed=seed,
        )

    tuned = run_generate(target.model)
    return tuned, target.base_outputs(run_generate) if compare else None
