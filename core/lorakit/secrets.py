"""Secrets: the Hugging Face Hub token, and masking for everything lorakit writes or prints.

The Hub token comes from the environment or a ``.env`` file, never from a recipe; it is handed
straight to ``from_pretrained`` and never logged, printed or saved.

Credentials can still arrive inside values: a tracker URL with ``user:password@``, a
``?token=`` query, an override on the command line. :func:`mask` replaces them (and the value
of any secret-named environment variable) with ``***``; the run folder's writers
(``recipe.toml``, every JSON file, the resolved settings handed to loggers) and the console
(``say``, the CLI's error line) all go through it, so a secret never reaches a file or a log
whichever option carried it. The real value stays in memory for the plugin that needs it (the
MLflow logger hands URL credentials to MLflow through its environment variables).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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


MASK = "***"
# where a URL starts; its userinfo is found by _mask_userinfo
_SCHEME = re.compile(r"\b[A-Za-z][A-Za-z0-9+.\-]*://")
# a quote that closes a quoted value (what follows it in TOML, JSON, Python reprs)
_CLOSING_QUOTE = re.compile(r"['\"](?=[\s,;:}\])]|$)")
# ?token=..., &password=... in a query string
_QUERY = re.compile(
    r"(?P<key>[?&](?:token|access_token|api_key|apikey|key|password|passwd|secret|sig)=)[^&#\s'\"]+",
    re.IGNORECASE,
)
_SECRET_ENV = re.compile(
    r"TOKEN|PASSWORD|PASSWD|SECRET|API_KEY|ACCESS_KEY|CREDENTIAL", re.IGNORECASE
)


def _userinfo_end(candidate: str) -> tuple[int, str, bool] | None:
    """Where the userinfo at the start of ``candidate`` (a URL after ``scheme://``) ends, its
    user part and whether a password follows, or None when it has none. The last ``@`` whose
    userinfo holds no ``/ ? #`` wins (``u:p@ss@host``); else, for a ``user:password``, the last
    ``@`` at all (a password with ``/`` in it); a lone user (a token) never runs past ``/ ? #``
    (``TOKEN@github.com/o/r.git@main`` is the token's ``@``, not the ref's)."""
    ats = [i for i, c in enumerate(candidate) if c == "@"]
    if not ats:
        return None

    def parts(at: int) -> tuple[str, bool, bool]:
        user, colon, _ = candidate[:at].partition(":")
        clean = not any(c in candidate[:at] for c in "/?#")
        return user, bool(colon), clean

    for at in reversed(ats):
        user, colon, clean = parts(at)
        if clean:
            return at, user, colon
    for at in reversed(ats):
        user, colon, _ = parts(at)
        if colon and not any(c in user for c in "/?#'\""):
            return at, user, colon
    return None


def _mask_userinfo(text: str) -> str:
    """``scheme://user:password@`` as ``scheme://user:***@`` and ``scheme://token@`` as
    ``scheme://***@``. The password may hold any character but whitespace (a URL should
    percent-encode ``/ ? # @ ' "`` in it, and people do not), so the userinfo may run to a
    later ``@`` before whitespace or a closing quote, as urllib's ``urlsplit`` reads a netloc
    (:func:`_userinfo_end` picks which)."""
    out, pos = [], 0
    for m in _SCHEME.finditer(text):
        if m.start() < pos:
            continue
        run = re.match(r"\S*", text[m.end() :])
        candidate = run.group(0) if run else ""
        close = _CLOSING_QUOTE.search(candidate)
        if close:
            candidate = candidate[: close.start()]
        found = _userinfo_end(candidate)
        if found is None:
            continue
        at, user, colon = found
        out.append(text[pos : m.end()])
        out.append(f"{user}:{MASK}@" if colon else f"{MASK}@")  # a lone user is often a token
        pos = m.end() + at + 1
    return "".join(out) + text[pos:] if out else text


def mask(text: str) -> str:
    """``text`` with URL credentials, secret query values and the values of secret-named
    environment variables (HF_TOKEN, MLFLOW_TRACKING_PASSWORD, ...) replaced by ``***``."""
    if "://" in text:
        text = _mask_userinfo(text)
    if "=" in text:
        text = _QUERY.sub(lambda m: m.group("key") + MASK, text)
    for name, value in os.environ.items():
        if len(value) >= 8 and _SECRET_ENV.search(name) and value in text:
            text = text.replace(value, MASK)
    return text


def mask_tree(node: Any) -> Any:
    """:func:`mask` applied to every string in nested mappings and lists (keys too)."""
    if isinstance(node, str):
        return mask(node)
    if isinstance(node, Mapping):
        return {mask_tree(k): mask_tree(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [mask_tree(v) for v in node]
    return node


def masked_keys(node: Any, prefix: str = "") -> list[str]:
    """Key paths of the strings in ``node`` that :func:`mask` would change (for the warning
    that says where such a secret belongs instead)."""
    if isinstance(node, str):
        return [prefix[:-1]] if mask(node) != node else []
    if isinstance(node, Mapping):
        return [k for key, v in node.items() for k in masked_keys(v, f"{prefix}{key}.")]
    if isinstance(node, (list, tuple)):
        return [k for i, v in enumerate(node) for k in masked_keys(v, f"{prefix}{i}.")]
    return []


def credentials_warning(keys: list[str]) -> str:
    return (
        f"{', '.join(keys)}: credentials in a URL or option are masked ({MASK}) in every file "
        "and log lorakit writes; put them in the tool's own environment variables instead "
        "(MLflow: MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or "
        "MLFLOW_TRACKING_TOKEN; the Hub: HF_TOKEN)"
    )
