"""``chat_jsonl``: one conversation per line.

Contract: ``{"id": str, "messages": [{"role": "system"|"user"|"assistant", "content": str}],
"meta": {"source": str, "tags": [str], "split": "train"|"val"|"test"}}``; ``meta`` and its
keys are optional. Every line is checked strictly; problems name the file and line.
"""

from __future__ import annotations

from collections.abc import Iterator

import attrs
from lorakit import hookimpl
from lorakit.contracts import Example, SourceContext
from lorakit.data.jsonl import iter_json_lines, parse_conversation
from lorakit.data.paths import expand_files
from lorakit.options import option


@attrs.frozen
class ChatJsonlOptions:
    path: str = option(doc="a .jsonl file, or a folder of them (relative to the recipe file)")
    glob: str = option("**/*.jsonl", doc="which files to read when path is a folder")


class ChatJsonlSource:
    Options = ChatJsonlOptions

    def __init__(self, options: ChatJsonlOptions):
        self.options = options

    def read(self, ctx: SourceContext) -> Iterator[Example]:
        for file in expand_files(ctx.recipe_dir, self.options.path, self.options.glob, "path"):
            for where, record in iter_json_lines(file, ctx):
                example = parse_conversation(record, where, ctx)
                if example is not None:
                    yield example


@hookimpl
def lorakit_register_sources(register):
    register("chat_jsonl", ChatJsonlSource)
