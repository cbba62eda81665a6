"""Deprecated alias of :mod:`lorakit.catalog`, renamed so it is not confused with the
``plugins/`` folder of built-in plugins. Import from ``lorakit.catalog`` instead."""

import warnings

from lorakit.catalog import (
    KINDS,
    Catalog,
    Entry,
    build_catalog,
    default_catalog,
    installed_version,
    make_manager,
    reset_default_catalog,
)

__all__ = [
    "KINDS",
    "Catalog",
    "Entry",
    "build_catalog",
    "default_catalog",
    "installed_version",
    "make_manager",
    "reset_default_catalog",
]

warnings.warn(
    "lorakit.plugins is renamed lorakit.catalog; import from lorakit.catalog",
    DeprecationWarning,
    stacklevel=2,
)
