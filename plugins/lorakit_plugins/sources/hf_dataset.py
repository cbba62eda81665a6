"""``hf_dataset``: a Hugging Face dataset, through the ``datasets`` library.

Where from (exactly one): ``name``, a Hub id (with ``config``, ``split``, ``revision``; needs
the Hub, or its cache with ``HF_HUB_OFFLINE=1``); ``path``, a ``save_to_disk`` folder, a data
file or a folder of them; ``data_files``, globs of data files. Data files are parquet, arrow,
CSV/TSV or JSON/JSONL, read by datasets' own builders (``builder`` names one when the
extension does not).

Which columns make the conversation: ``text_column`` (raw text), or ``prompt_column`` and
``response_column`` (one exchange, ``system_column`` optional), or ``messages_column`` (a list
of turns, role/content or ShareGPT's from/value, mapped like the ``sharegpt`` source). Ids come
from ``id_column``, else a content hash. ``streaming`` reads rows as they come instead of
downloading or converting the whole set first. Problems name the dataset, split and row index;
the data report holds the dataset's fingerprint (datasets' own for a loaded set, and a SHA-256
of the rows as read), rows read and, for the Hub, the revision asked for.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs
from attrs import validators as v
from lorakit.api import (
    SPLITS,
    DataError,
    Example,
    Message,
    RegisterSource,
    SourceContext,
    hookimpl,
    hub_token,
    option,
    resolve_path,
)

from lorakit_plugins.sources._hf_files import (
    BUILDERS,
    KEY,
    NOT_JSON,
    files_in,
    glob_files,
    hub_unreachable,
    jsonable,
    read_failed,
    saved_to_disk,
    suffix_of,
)
from lorakit_plugins.sources._messages import checked_example, record_tools, tools_file
from lorakit_plugins.sources.sharegpt import ShareGptOptions, ShareGptSource

OFFLINE_FIX = (
    'to work offline: on a machine with the Hub run python -c "import datasets; '
    "datasets.load_dataset('{name}'{config}, split='{split}').save_to_disk('{folder}')\", copy "
    'the folder here and set path = "{folder}" instead of name; or set HF_HUB_OFFLINE=1 to '
    "read a copy already in the Hugging Face cache"
)
META_FIX = (
    "meta_columns copy columns into meta, where split must be train, val or test and tags a list "
    "of strings: leave the column out of meta_columns (assign_split pins a dataset's split)"
)
TOOLS_COLUMN = "tools"  # read when a row has it; another name must be a column


@attrs.frozen
class HfDatasetOptions:
    name: str = option("", doc="a Hub dataset id (org/name); needs the Hub or its cache")
    path: str = option(
        "", doc="a save_to_disk folder, a data file or a folder of them (relative to the recipe)"
    )
    data_files: list[str] = option(
        attrs.Factory(list), doc="globs of data files (relative to the recipe file)"
    )
    builder: Literal["auto", "parquet", "arrow", "csv", "json"] = option(
        "auto", doc="how to read data files (auto: by extension)"
    )
    config: str = option("", doc="the Hub dataset's configuration (subset)")
    split: str = option("train", doc="which split of the dataset to read (its own name)")
    revision: str = option("", doc="a Hub branch, tag or commit (empty: main)")
    streaming: bool = option(False, doc="read rows as they arrive (no full download or cache)")
    messages_column: str = option("messages", doc="column holding a list of turns")
    prompt_column: str = option("", doc="column holding the user turn (with response_column)")
    response_column: str = option("", doc="column holding the assistant turn")
    system_column: str = option("", doc="column holding a system prompt (optional)")
    text_column: str = option("", doc="column holding raw text (a text example per row)")
    id_column: str = option("", doc="column holding the id (empty: a content hash)")
    tools_column: str = option(
        TOOLS_COLUMN, doc="column holding the row's tools (the default: when present)"
    )
    meta_columns: list[str] = option(attrs.Factory(list), doc="columns copied into meta")
    roles: dict[str, str] = option(
        attrs.Factory(dict), doc="speaker -> role for messages_column, as in the sharegpt source"
    )
    assign_split: str = option(
        "",
        doc='pin every row to "train", "val" or "test" (empty: lorakit\'s hashed split)',
        validator=v.in_(("", *SPLITS)),
    )
    tools: str = option("", doc="a JSON file listing the tools of rows without their own")

    def __attrs_post_init__(self) -> None:
        if sum(map(bool, (self.name, self.path, self.data_files))) != 1:
            raise ValueError("set exactly one of name (a Hub id), path or data_files")
        if bool(self.prompt_column) != bool(self.response_column):
            raise ValueError("prompt_column and response_column go together")


class HfDatasetSource:
    Options = HfDatasetOptions

    def __init__(self, options: HfDatasetOptions):
        self.options = options
        # sharegpt's turn parser for messages_column; its path is never read here
        # (Hub datasets annotate turns: WildChat's language, toxic, redacted... are ignored)
        self.turns = ShareGptSource(
            ShareGptOptions(path=".", roles=dict(options.roles), strict=False)
        )
        self.builder = ""  # the builder that read the data files ("" for the Hub or a folder)

    @property
    def label(self) -> str:
        o = self.options
        what = o.name or o.path or ",".join(o.data_files)
        return f"{what}{f' ({o.config})' if o.config else ''}[{o.split}]"

    def read(self, ctx: SourceContext) -> Iterator[Example]:
        tools = tools_file(ctx.recipe_dir, self.options.tools)
        dataset = self._load(ctx.recipe_dir)
        digest = hashlib.sha256()
        rows = 0
        for i, row in enumerate(self._rows(dataset)):
            digest.update(json.dumps(row, sort_keys=True, default=str).encode())
            rows += 1
            example = self._parse(row, f"{self.label} row {i}", ctx, tools)
            if example is not None:
                yield example
        if not rows:
            ctx.reject("the dataset split has no rows", self.label, "pick another split")
        note = getattr(ctx, "note", None)
        if note is not None:
            note("dataset", self.label)
            if self.options.revision:
                note("revision", self.options.revision)
            own = getattr(dataset, "_fingerprint", None)
            if own:
                note("fingerprint", own)
            note("rows_sha256", digest.hexdigest()[:16])
            note("rows", rows)

    def _rows(self, dataset: Any) -> Iterator[Mapping[str, Any]]:
        try:
            yield from dataset
        except DataError:
            raise
        except Exception as exc:  # pyarrow / builder errors while streaming a bad file
            raise read_failed(self.label, exc) from None

    def _load(self, recipe_dir: Path) -> Any:
        import datasets

        o = self.options
        try:
            if o.name:
                return self._from_hub(datasets)
            if o.path:
                root = resolve_path(recipe_dir, o.path)
                if not root.exists():
                    raise DataError(
                        f"{root} does not exist",
                        where=f"{KEY}.path",
                        fix="paths are relative to the recipe file's folder; check the spelling",
                    )
                if root.is_dir() and saved_to_disk(root):
                    return self._from_disk(datasets, root)
                files = [root] if root.is_file() else files_in(root)
            else:
                files = sorted(p for g in o.data_files for p in glob_files(recipe_dir, g))
            if not files:
                raise DataError(
                    f"no data files (parquet, arrow, csv, tsv, json, jsonl) in {self.label}",
                    where=f"{KEY}.{'path' if o.path else 'data_files'}",
                    fix="point at the files, or at a folder written by save_to_disk",
                )
            return self._from_files(datasets, files)
        except DataError:
            raise
        except Exception as exc:
            raise read_failed(self.label, exc) from None

    def _from_hub(self, datasets: Any) -> Any:
        o = self.options
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get(
            "HF_DATASETS_OFFLINE", ""
        ) not in ("", "0")
        fix = OFFLINE_FIX.format(
            name=o.name,
            config=f", '{o.config}'" if o.config else "",
            split=o.split,
            folder=o.name.rsplit("/", 1)[-1],
        )
        if not offline:
            reason = hub_unreachable()
            if reason:
                raise DataError(
                    f"cannot reach the Hugging Face Hub for dataset {o.name!r} ({reason})",
                    where=f"{KEY}.name",
                    fix=fix,
                )
        try:
            return datasets.load_dataset(
                o.name,
                o.config or None,
                split=o.split,
                revision=o.revision or None,
                streaming=o.streaming,
                token=hub_token() or None,
            )
        except ConnectionError as exc:
            raise DataError(
                f"dataset {o.name!r} is not available offline ({exc})", where=f"{KEY}.name", fix=fix
            ) from None

    def _from_disk(self, datasets: Any, root: Path) -> Any:
        loaded = datasets.load_from_disk(str(root))
        if isinstance(loaded, datasets.DatasetDict):
            if self.options.split not in loaded:
                raise DataError(
                    f"{root} has no split {self.options.split!r} (it has {', '.join(loaded)})",
                    where=f"{KEY}.split",
                    fix="set split to one of them",
                )
            loaded = loaded[self.options.split]
        return loaded.to_iterable_dataset() if self.options.streaming else loaded

    def _from_files(self, datasets: Any, files: list[Path]) -> Any:
        builder: str = self.options.builder
        if builder == "auto":
            kinds = {BUILDERS.get(suffix_of(f)) for f in files}
            if len(kinds) != 1 or None in kinds:
                raise DataError(
                    f"cannot tell how to read {self.label}: extensions "
                    f"{sorted({suffix_of(f) for f in files})}",
                    where=f"{KEY}.builder",
                    fix='set builder = "parquet", "arrow", "csv" or "json", or keep one kind '
                    "of file per source",
                )
            builder = kinds.pop() or "json"
        self.builder = builder
        kwargs: dict[str, Any] = {}
        if builder == "csv":
            if all(suffix_of(f) == ".tsv" for f in files):
                kwargs["sep"] = "\t"
            # the text columns as written: pandas would read 4 as an int and 0.10 as 0.1
            o = self.options
            text = (o.prompt_column, o.response_column, o.system_column, o.text_column)
            kwargs["converters"] = {c: str for c in text if c}
        return datasets.load_dataset(
            builder,
            data_files={"train": [str(f) for f in files]},
            split="train",
            streaming=self.options.streaming,
            **kwargs,
        )

    def _parse(
        self, row: Mapping[str, Any], where: str, ctx: SourceContext, tools: Any
    ) -> Example | None:
        o = self.options
        named = (o.text_column, o.prompt_column, o.response_column, o.system_column, o.id_column)
        missing = [c for c in named if c and c not in row]
        if o.tools_column not in ("", TOOLS_COLUMN) and o.tools_column not in row:
            missing.append(o.tools_column)  # the default is read only where the column exists
        if not (o.text_column or o.prompt_column) and o.messages_column not in row:
            missing.append(o.messages_column)
        if missing:
            raise DataError(
                f"{self.label} has no column {missing[0]!r} (columns: {', '.join(row)})",
                where=f"{KEY}",
                fix="map the columns: messages_column, or prompt_column and response_column, "
                "or text_column (system_column, id_column and tools_column name columns too)",
            )
        rid = row.get(o.id_column) if o.id_column else None
        if rid is None or rid == "":
            blob = json.dumps(row, sort_keys=True, default=str)
            rid = "sha-" + hashlib.sha256(blob.encode()).hexdigest()[:16]
        where = f"{where} (id {rid})"
        meta = self._meta(row, where, ctx)
        if meta is None:
            return None
        if o.text_column:
            value = row[o.text_column]
            problem = self._not_text(o.text_column, value)
            if problem:
                ctx.reject(problem[0], where, problem[1])
                return None
            return checked_example(
                Example(id=str(rid), text=value, meta=meta), where, ctx, META_FIX
            )
        messages = self._messages(row, where, ctx)
        if messages is None:
            return None
        own, ok = record_tools(row.get(o.tools_column), where, ctx)
        if not ok:
            return None
        example = Example(id=str(rid), messages=tuple(messages), meta=meta, tools=own or tools)
        return checked_example(example, where, ctx, META_FIX)

    def _messages(
        self, row: Mapping[str, Any], where: str, ctx: SourceContext
    ) -> list[Message] | None:
        o = self.options
        if not o.prompt_column:
            turns = row[o.messages_column]
            if not isinstance(turns, list) or not turns:
                ctx.reject(
                    f"{o.messages_column} must be a non-empty list of turns", where, "drop the row"
                )
                return None
            return self.turns._messages({}, turns, where, ctx)
        parts = {"system": o.system_column, "user": o.prompt_column, "assistant": o.response_column}
        out = []
        for role, column in parts.items():
            value = row.get(column) if column else None
            if role == "system" and (value is None or value == ""):
                continue
            problem = self._not_text(column, value)
            if isinstance(value, str) and (problem is None or role == "system"):
                out.append(Message(role, value))  # a blank system prompt is kept, as written
                continue
            reason, fix = problem or ("", "")
            ctx.reject(reason, where, fix)
            return None
        return out

    def _not_text(self, column: str, value: Any) -> tuple[str, str] | None:
        """What is wrong with a text column's value (reason, fix), or None for text."""
        if isinstance(value, str):
            return None if value.strip() else (f"{column} is empty", "fill it in or drop the row")
        if value is None:
            missing = ""
            if self.builder == "csv":
                missing = " (CSV reads an empty cell, and NA, N/A, null, None or NaN, as missing)"
            return f"{column} is empty", "fill it in or drop the row" + missing
        kind = type(value).__name__
        fix = (
            f'write it as a JSON string ("{column}": "...")'
            if self.builder == "json"
            else "store the column as text (strings) in the dataset"
        )
        article = "an" if kind[0] in "aeiou" else "a"
        return f"{column} is {article} {kind}, not text", fix

    def _meta(self, row: Mapping[str, Any], where: str, ctx: SourceContext) -> dict | None:
        meta: dict[str, Any] = {"source": where}
        if self.options.assign_split:
            meta["split"] = self.options.assign_split
        for column in self.options.meta_columns:
            if column not in row:
                raise DataError(
                    f"{self.label} has no column {column!r} (columns: {', '.join(row)})",
                    where=f"{KEY}.meta_columns",
                    fix="name existing columns",
                )
            value = jsonable(row[column])
            if value is NOT_JSON:
                ctx.reject(
                    f"column {column!r} holds a {type(row[column]).__name__}, not JSON data",
                    where,
                    "leave it out of meta_columns",
                )
                return None
            meta[column] = value
        return meta


@hookimpl
def lorakit_register_sources(register: RegisterSource) -> None:
    register("hf_dataset", HfDatasetSource)
