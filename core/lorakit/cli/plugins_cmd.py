"""``lorakit plugins``: every installed plugin with its kind, its name (as a recipe writes it),
the entry point that registers it and its package (the three names LORAKIT_PLUGINS and
LORAKIT_DISABLE_PLUGINS take), then the entry points or names that were not loaded (failed to
import or to register, or switched off) with the reason."""

from __future__ import annotations

from lorakit.catalog import KINDS, default_catalog
from lorakit.options import describe_options


def add_parser(sub) -> None:
    p = sub.add_parser("plugins", help="list installed plugins (all kinds)")
    p.add_argument("-v", "--verbose", action="store_true", help="also list each plugin's options")
    p.add_argument("--kind", choices=list(KINDS), help="only this kind")
    p.set_defaults(func=run)


def run(args) -> int:
    catalog = default_catalog()
    rows = [e for e in catalog.all() if not args.kind or e.kind == args.kind]
    width = max((len(e.name) for e in rows), default=4)
    points = max((len(e.plugin) for e in rows), default=11)
    print(f"{'KIND':<10} {'NAME':<{width}}  {'ENTRY POINT':<{points}}  PACKAGE")
    for e in rows:
        package = f"{e.distribution} {e.version}" if e.distribution else "-"
        print(f"{e.kind:<10} {e.name:<{width}}  {e.plugin:<{points}}  {package}")
        if args.verbose and e.options_class is not None:
            for name, typ, default, doc in describe_options(e.options_class):
                print(f"{'':<10}   {name} = {default}  ({typ}) {doc}")
    if catalog.skipped:
        print("\nnot loaded (LORAKIT_PLUGINS / LORAKIT_DISABLE_PLUGINS choose what loads):")
        for skipped in catalog.skipped:
            print(f"  {skipped.line()}")
    return 0
