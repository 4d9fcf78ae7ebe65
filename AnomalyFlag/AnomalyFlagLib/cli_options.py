"""Command-line options generated from a backend's architecture and training-option dataclasses.

Each field becomes `--field-name` (or the flag named in its metadata); booleans that default to True
become a `--no-...` switch. `anomalyflag train --help` lists every backend's options this way, and only
the chosen backend's options are accepted.
"""

import argparse
import dataclasses
from typing import List, Tuple

from .detectors import BACKENDS


def _fields(cls):
    return [f for f in dataclasses.fields(cls) if f.init]


def _flag(f) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _default(f):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def add_dataclass_options(parser: argparse.ArgumentParser, cls) -> None:
    for f in _fields(cls):
        default = _default(f)
        help_text = f.metadata.get("help", "")
        if isinstance(default, bool):
            action = "store_false" if default else "store_true"
            parser.add_argument(_flag(f), dest=f.name, action=action, default=default, help=help_text)
        else:
            kind = type(default) if default is not None else str
            parser.add_argument(_flag(f), dest=f.name, type=kind, default=default,
                                help=f"{help_text} (default {default})")  # fmt: skip


def backend_parser(name: str) -> argparse.ArgumentParser:
    cls = BACKENDS[name]
    parser = argparse.ArgumentParser(prog=f"anomalyflag train --backend {name}", add_help=False)
    add_dataclass_options(parser, cls.Architecture)
    add_dataclass_options(parser, cls.Options)
    return parser


def parse_backend_options(name: str, args: List[str]) -> Tuple[object, object]:
    """(architecture, options) of backend `name` from the leftover command-line arguments."""
    cls = BACKENDS[name]
    parser = backend_parser(name)
    values, unknown = parser.parse_known_args(args)
    if unknown:
        known = " ".join(_flag(f) for f in _fields(cls.Architecture) + _fields(cls.Options))
        parser.error(f"{' '.join(unknown)}: not an option of backend '{name}' (its options: {known})")
    arch = cls.Architecture(**{f.name: getattr(values, f.name) for f in _fields(cls.Architecture)})
    opts = cls.Options(**{f.name: getattr(values, f.name) for f in _fields(cls.Options)})
    return arch, opts


def backends_help() -> str:
    """The per-backend option lists shown at the end of `anomalyflag train --help`."""
    sections = []
    for name, cls in BACKENDS.items():
        lines = backend_parser(name).format_help().splitlines()
        heads = [i for i, line in enumerate(lines) if line in ("options:", "optional arguments:")]
        options = lines[heads[0] + 1 :] if heads else lines
        sections.append(f"backend '{name}': {cls.summary}\n" + "\n".join(options))
    return "\n\n".join(sections)
