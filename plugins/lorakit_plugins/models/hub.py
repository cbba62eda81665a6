"""``hub``: a Hugging Face Hub model id, downloaded (and cached) by transformers.

Needs network access. The token comes from HF_TOKEN / HUGGINGFACE_TOKEN or a ``.env`` file,
never from the recipe.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import attrs
from lorakit.api import ModelError, ModelRef, RegisterModelSource, hookimpl, option

_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _valid_id(_inst, _attr, value):
    if not _ID.match(value):
        raise ValueError(f'"{value}" is not a Hub id; expected "organisation/name"')


@attrs.frozen
class HubOptions:
    id: str = option(doc='Hub model id, "organisation/name"', validator=_valid_id)
    revision: str | None = option(None, doc="branch, tag or commit to pin (recommended)")
    trust_remote_code: bool = option(
        False, doc="run Python code from the model repository (only for repositories you trust)"
    )


class HubSource:
    Options = HubOptions

    def __init__(self, options: HubOptions):
        self.options = options

    def tokenizer_folder(self) -> tuple[Path | None, str]:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None, "huggingface_hub is not installed (pip install -e '.[train]')"

        found = try_to_load_from_cache(
            self.options.id, "tokenizer.json", revision=self.options.revision
        )
        if isinstance(found, str):
            return Path(found).parent, ""
        return None, f"{self.options.id} is not in the local Hub cache yet"

    def resolve(self) -> ModelRef:
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(
                self.options.id, "config.json", revision=self.options.revision
            )
            if not isinstance(cached, str):
                raise ModelError(
                    f"{self.options.id} is not in the local Hub cache and HF_HUB_OFFLINE=1",
                    where="[model].id",
                    fix='unset HF_HUB_OFFLINE on a machine with network, or use plugin = "local"',
                )
        rev = f"@{self.options.revision}" if self.options.revision else ""
        return ModelRef(
            path=self.options.id,
            revision=self.options.revision,
            trust_remote_code=self.options.trust_remote_code,
            label=f"hub:{self.options.id}{rev}",
        )


@hookimpl
def lorakit_register_model_sources(register: RegisterModelSource) -> None:
    register("hub", HubSource)
