"""lorakit: plugin-based LoRA/QLoRA fine-tuning driven by TOML recipes."""

__version__ = "0.1.0"

from lorakit.hookspecs import hookimpl

__all__ = ["__version__", "hookimpl"]
