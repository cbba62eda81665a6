"""The Hugging Face Hub token: from the environment or a ``.env`` file, never from a recipe.

The token is handed straight to ``from_pretrained`` and never logged, printed or saved.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_NAMES = ("HF_TOKEN", "HUGGINGFACE_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def read_dotenv(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return values
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        values[key.strip()] = value.strip().strip("'\"")
    return values


def hub_token(search_dirs: tuple[Path, ...] = (Path.cwd(),)) -> str | None:
    """The Hub token, or None. Environment first, then ``.env`` in ``search_dirs``."""
    for name in ENV_NAMES:
        if os.environ.get(name):
            return os.environ[name]
    for folder in search_dirs:
        env = read_dotenv(folder / ".env")
        for name in ENV_NAMES:
            if env.get(name):
                return env[name]
    return None


def redact(text: str, token: str | None) -> str:
    """Remove ``token`` from text that is about to be shown or written."""
    return text.replace(token, "<HF_TOKEN>") if token else text
