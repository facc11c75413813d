"""A config's `plugins`: the user's modules that register trust rules and aggregators (p2pfed.strategies).

Every process that looks scheme names up imports them first, from the config it was handed: the caller at load
(strategies.check_schemes), each job worker, Ray task and job-worker process, and each `p2pfed peer` process.
An entry is a module name (importable on sys.path) or the path of a .py file; load resolves a relative path
against the config file's folder, so the absolute path travels and another working directory finds the file.

Importing is idempotent: sys.modules is the record of what is imported (a file under a name derived from its
absolute path), so a module's registrations run once per process however often its config is loaded.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
from collections.abc import Iterable
from pathlib import Path

from p2pfed.config import ConfigError


def is_plugin_path(entry: str) -> bool:
    """Whether an entry names a file (`rules.py`, `./rules.py`, `lib/rules.py`) rather than a module."""
    return entry.endswith(".py") or "/" in entry or "\\" in entry or entry.startswith((".", "~"))


def plugin_module_name(path: Path) -> str:
    """The stable name a plugin file is imported under: one per absolute path, the same in every process."""
    digest = hashlib.sha1(str(path).encode("utf-8")).hexdigest()[:12]
    return f"p2pfed_plugin_{re.sub(r'[^A-Za-z0-9_]', '_', path.stem)}_{digest}"


def import_plugins(entries: Iterable[str], base_dir: Path | None = None) -> None:
    """Import every entry (a module name or a .py file, relative to `base_dir`, else the working directory);
    one that is already imported is left alone. A ConfigError names the first one that fails."""
    for i, entry in enumerate(entries):
        try:
            _import(entry, base_dir)
        except Exception as error:  # noqa: BLE001 - whatever a plugin raises, the config named it
            detail = (str(error).strip().splitlines() or [""])[0]
            raise ConfigError(f"plugins[{i}]: cannot import {entry!r} ({type(error).__name__}: {detail})") from error


def _import(entry: str, base_dir: Path | None) -> None:
    if not is_plugin_path(entry):
        importlib.import_module(entry)  # sys.modules makes a second import a no-op
        return
    path = ((base_dir or Path.cwd()) / Path(entry).expanduser()).resolve()
    name = plugin_module_name(path)
    if name in sys.modules:
        return
    if not path.is_file():
        raise FileNotFoundError(f"no such file {path}")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it, as import does: dataclasses and pickle look it up there
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]  # a failed import leaves nothing behind: the next try runs it afresh
        raise
