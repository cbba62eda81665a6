"""``lorakit plugins``: every installed plugin with its kind, name and distribution, then the
entry points that were not loaded (failed to import, or switched off) with the reason."""

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
    print(f"{'KIND':<10} {'NAME':<{width}}  FROM")
    for e in rows:
        dist = f"{e.distribution} {e.version}" if e.distribution else e.plugin
        print(f"{e.kind:<10} {e.name:<{width}}  {dist}")
        if args.verbose and e.options_class is not None:
            for name, typ, default, doc in describe_options(e.options_class):
                print(f"{'':<10}   {name} = {default}  ({typ}) {doc}")
    if catalog.skipped:
        print("\nnot loaded (LORAKIT_PLUGINS / LORAKIT_DISABLE_PLUGINS choose what loads):")
        for skipped in catalog.skipped:
            print(f"  {skipped.line()}")
    return 0
