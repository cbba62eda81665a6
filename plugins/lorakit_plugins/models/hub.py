"""``hub``: a Hugging Face Hub model id, downloaded (and cached) by transformers.

Needs network access. The token comes from HF_TOKEN / HUGGINGFACE_TOKEN or a ``.env`` file,
never from the recipe.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import attrs
from lorakit.api import ModelError, ModelRef, RegisterModelSource, hookimpl, hub_token, option

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

    def model_config(self) -> dict:
        """config.json only: from the local Hub cache, else fetched by transformers' AutoConfig
        (no weights). Without the Hub, a ModelError says how to plan offline."""
        import json

        from huggingface_hub import try_to_load_from_cache

        o = self.options
        cached = try_to_load_from_cache(o.id, "config.json", revision=o.revision)
        if isinstance(cached, str):
            return json.loads(Path(cached).read_text(encoding="utf-8"))
        offline = "no network access to the Hub"
        if os.environ.get("HF_HUB_OFFLINE") != "1":
            from transformers import AutoConfig

            try:
                config = AutoConfig.from_pretrained(
                    o.id,
                    revision=o.revision,
                    token=hub_token(),
                    trust_remote_code=o.trust_remote_code,
                )
                return config.to_dict()
            except (OSError, ValueError) as exc:
                offline = str(exc).strip().splitlines()[0] if str(exc).strip() else offline
        else:
            offline = "HF_HUB_OFFLINE=1"
        raise ModelError(
            f"no config for {o.id}: it is not in the local Hub cache and the Hub cannot be "
            f"reached ({offline})",
            where="[model].id",
            fix="on a machine with the Hub, `lorakit plan` fetches config.json only; offline, "
            'download the model folder once and use plugin = "local"',
        )

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
            hub_id=self.options.id,
        )


@hookimpl
def lorakit_register_model_sources(register: RegisterModelSource) -> None:
    register("hub", HubSource)
