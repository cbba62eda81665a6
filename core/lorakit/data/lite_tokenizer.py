"""A tokenizer for ``lorakit check`` that needs neither torch nor transformers.

Importing ``transformers`` imports torch (seconds), so ``check`` reads a model folder's
``tokenizer.json`` with the ``tokenizers`` library and renders its chat template with jinja2,
the way transformers does (sandboxed, ``trim_blocks``, ``lstrip_blocks``). The object offers the
small part of the transformers tokenizer API that formatters and
:func:`lorakit.data.tokenize.tokenize_batch` use, so ``check`` computes exactly the token counts
and labels that ``run`` will.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorakit.errors import DataError


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class LiteTokenizer:
    """``tokenizer.json`` + ``tokenizer_config.json`` (+ ``chat_template.jinja``) from a folder."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        path = self.folder / "tokenizer.json"
        if not path.is_file():
            raise DataError(
                f"{self.folder} holds no tokenizer.json",
                where=str(self.folder),
                fix="pass a model folder with a tokenizer.json (--tokenizer FOLDER), or leave "
                "--tokenizer out to use the recipe's model",
            )
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # the tokenizers library raises a bare Exception
            raise DataError(
                f"{path} cannot be read as a tokenizer: {exc}",
                where=str(path),
                fix="pass a folder whose tokenizer.json a transformers tokenizer saved",
            ) from None
        self._tok.no_truncation()  # counts must be the full lengths, like transformers' call
        self._tok.no_padding()
        cfg_path = self.folder / "tokenizer_config.json"
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
        except (ValueError, OSError) as exc:
            raise DataError(
                f"{cfg_path} cannot be read: {exc}",
                where=str(cfg_path),
                fix="pass a folder whose tokenizer_config.json a transformers tokenizer saved",
            ) from None
        if not isinstance(cfg, dict):
            cfg = {}
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        self.pad_token = _token_text(cfg.get("pad_token")) or self.eos_token
        self.unk_token = _token_text(cfg.get("unk_token"))
        template = cfg.get("chat_template")
        jinja_file = self.folder / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        self.chat_template: str | None = template if isinstance(template, str) else None
        self._compiled: Any = None
        self._added = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()}

    @property
    def backend_tokenizer(self) -> Any:
        return self._tok

    @property
    def all_special_tokens(self) -> list[str]:
        names = (self.bos_token, self.eos_token, self.pad_token, self.unk_token)
        return [t for t in dict.fromkeys(names) if t]

    @property
    def added_tokens_decoder(self) -> dict[int, Any]:
        return dict(self._tok.get_added_tokens_decoder())

    def get_added_vocab(self) -> dict[str, int]:
        return dict(self._added)

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def __call__(
        self,
        texts: str | Sequence[str],
        add_special_tokens: bool = True,
        return_offsets_mapping: bool = False,
    ) -> dict[str, Any]:
        single = isinstance(texts, str)
        batch = [texts] if single else list(texts)
        encs = self._tok.encode_batch(batch, add_special_tokens=add_special_tokens)
        out: dict[str, Any] = {"input_ids": [e.ids for e in encs]}
        if return_offsets_mapping:
            out["offset_mapping"] = [e.offsets for e in encs]
        if single:
            out = {k: v[0] for k, v in out.items()}
        return out

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        conversation: Sequence[dict[str, str]],
        tokenize: bool = False,
        add_generation_prompt: bool = False,
        **kwargs: Any,
    ) -> str:
        if tokenize:
            raise TypeError("LiteTokenizer.apply_chat_template renders text only (tokenize=False)")
        if not self.chat_template:
            raise DataError(f"{self.folder} has no chat template", where="[format]")
        if self._compiled is None:
            self._compiled = chat_environment().from_string(self.chat_template)
        return self._compiled.render(
            messages=list(conversation),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            pad_token=self.pad_token or "",
            unk_token=self.unk_token or "",
            **kwargs,
        )


# A chat template runs in a sandbox with a budget: nested ``range`` loops cannot run for hours and
# ``"x" * n`` cannot build gigabytes. Real templates loop over the messages and stay far below.
TEMPLATE_LOOP_BUDGET = 1_000_000  # range() items per render, all loops together
TEMPLATE_MAX_SIZE = 10_000_000  # characters (or items) one * or + may produce


def chat_environment() -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, **kw: Any) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, **kw)

    def size(x: Any) -> int:
        return len(x) if isinstance(x, (str, bytes, list, tuple)) else 0

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "+"})
        budget = TEMPLATE_LOOP_BUDGET

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "*":
                n = right if isinstance(right, int) else left if isinstance(left, int) else 1
                produced = max(size(left), size(right)) * n
            else:
                produced = size(left) + size(right)
            if produced > TEMPLATE_MAX_SIZE:
                raise SecurityError(
                    f"the chat template builds a value of {produced:,} items"
                    f" (lorakit's sandbox allows {TEMPLATE_MAX_SIZE:,})"
                )
            return super().call_binop(context, operator, left, right)

    def bounded_range(*args: int) -> Any:
        for item in safe_range(*args):
            env.budget -= 1
            if env.budget < 0:
                raise SecurityError(
                    f"the chat template loops over more than {TEMPLATE_LOOP_BUDGET:,} range()"
                    " items in one render (lorakit's sandbox limit)"
                )
            yield item

    class GenerationBlocks(jinja2.ext.Extension):
        """transformers' ``{% generation %}...{% endgeneration %}`` (it marks the assistant's
        text for ``return_assistant_tokens_mask``) renders as its body, as in transformers when
        no mask is asked for. Knowing the tag lets such a template render here, under the
        budget, before transformers' unbounded sandbox renders it."""

        tags = {"generation"}  # noqa: RUF012 (jinja2.ext.Extension declares a set)

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = self.call_method("_body")
            return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return str(caller())

    class BoundedTemplate(jinja2.Template):
        def render(self, *args: Any, **kwargs: Any) -> str:
            env.budget = TEMPLATE_LOOP_BUDGET
            return super().render(*args, **kwargs)

    env = BoundedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, GenerationBlocks],
    )
    env.globals["range"] = bounded_range
    env.template_class = BoundedTemplate
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


def find_tokenizer_folder(source: Any, name: str = "") -> tuple[Path | None, str]:
    """A local folder holding the tokenizer of the model ``source`` (``components.model_source``;
    ``name``: its plugin name, for the note), found without loading a model.

    Returns ``(folder or None, note)``. Asks the model plugin's optional
    ``tokenizer_folder()`` (see :class:`lorakit.contracts.ModelSource`), which must be cheap and
    must not download or convert anything.
    """
    from lorakit.contracts import FindsTokenizer

    if not isinstance(source, FindsTokenizer):
        label = name or type(source).__name__
        return None, f"model plugin {label!r} offers no local tokenizer folder"
    folder, note = source.tokenizer_folder()
    if folder is not None and (Path(folder) / "tokenizer.json").is_file():
        return Path(folder), ""
    return None, note or f"no tokenizer.json in {folder}"
