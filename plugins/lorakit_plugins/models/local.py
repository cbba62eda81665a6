"""``local``: a model folder on disk written by ``save_pretrained`` (safetensors weights)."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
from lorakit.api import ModelError, ModelRef, RegisterModelSource, hookimpl, option


@attrs.frozen
class LocalOptions:
    path: str = option(
        doc="folder with config.json, tokenizer and *.safetensors weights (relative to the "
        "recipe file, like data paths)"
    )
    trust_remote_code: bool = option(
        False, doc="run Python code shipped in the folder (only for folders you trust)"
    )


class LocalSource:
    Options = LocalOptions

    def __init__(self, options: LocalOptions):
        self.options = options
        self._recipe_folder: Path | None = None

    def use_recipe_folder(self, folder: Path) -> None:
        self._recipe_folder = folder

    def folder(self) -> Path:
        """``path``, a relative one read from the recipe's folder (the working directory is
        only used when the recipe's folder has no such folder and it has: a recipe written
        for lorakit's earlier, working-directory reading keeps working; never one of two)."""
        path = Path(self.options.path).expanduser()
        if path.is_absolute() or self._recipe_folder is None:
            return path
        beside = self._recipe_folder / path
        return path if not beside.is_dir() and path.is_dir() else beside

    def tokenizer_folder(self) -> tuple[Path | None, str]:
        folder = self.folder()
        return (
            (folder, "")
            if (folder / "tokenizer.json").is_file()
            else (None, f"no tokenizer.json in {folder}")
        )

    def model_config(self) -> dict:
        """The folder's config.json (config only: ``lorakit plan`` loads no weights)."""
        file = self.folder() / "config.json"
        try:
            return json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelError(
                f"cannot read {file}: {exc}",
                where="[model].path",
                fix="point path at a folder written by save_pretrained",
            ) from None

    def resolve(self) -> ModelRef:
        path = self.folder()
        if not path.is_dir():
            raise ModelError(
                f"model folder {path} does not exist",
                where="[model].path",
                fix="point path at a folder written by save_pretrained",
            )
        if not (path / "config.json").is_file():
            raise ModelError(
                f"{path} has no config.json", where="[model].path", fix="is this a model folder?"
            )
        if not any(path.glob("*.safetensors")):
            raise ModelError(
                f"{path} has no .safetensors weights (pickle .bin weights can run code on load)",
                where="[model].path",
                fix="convert the weights: load once and save_pretrained(..., safe_serialization=True)",
            )
        return ModelRef(
            path=str(path.resolve()),
            trust_remote_code=self.options.trust_remote_code,
            label=f"local:{path}",
        )


@hookimpl
def lorakit_register_model_sources(register: RegisterModelSource) -> None:
    register("local", LocalSource)
