"""Progress bars: tqdm on a terminal, nothing in logs and CI.

Every phase that can take more than a few seconds (reading data, formatting, converting the
embedded model, loading weights, training, evaluation, generation, merge, GGUF export) shows a
bar when stderr is a terminal. When it is not (a log file, CI, a captured subprocess), no bar
is drawn at all, so captured output holds no carriage-return floods; the ``[lorakit]`` lines
say what happens. ``LORAKIT_PROGRESS=1`` forces bars on, ``LORAKIT_PROGRESS=0`` off. Under
torchrun only rank 0 draws bars.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any


def enabled() -> bool:
    """Whether progress bars are drawn in this process (never on ranks other than 0)."""
    from lorakit.distributed import is_main

    if not is_main():
        return False
    forced = os.environ.get("LORAKIT_PROGRESS", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def bar(
    iterable: Iterable[Any] | None = None,
    *,
    desc: str,
    total: int | None = None,
    unit: str = "it",
) -> Any:
    """A tqdm bar on stderr, or a silent pass-through when bars are off."""
    from tqdm import tqdm

    return tqdm(
        iterable,
        desc=desc,
        total=total,
        unit=unit,
        disable=not enabled(),
        leave=False,
        file=sys.stderr,
        mininterval=0.5,
        dynamic_ncols=True,
    )


def quiet_libraries() -> None:
    """Make the libraries' own bars (transformers' weight loading and shard writing, the
    Hugging Face Hub, datasets) follow the same rule. Call before heavy work starts: the
    environment variables cover libraries imported later, the calls those already imported."""
    if enabled():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
