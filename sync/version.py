"""The installed distribution's version, as both sides report it (`--version`, agent status).

Read from the distribution's METADATA the way `importlib.metadata.version` finds it (the
first `.dist-info` folder of the name on the import path), without importing
importlib.metadata: with the zipfile, csv and email parsing it brings, that is about 1 MB of
the edge agent's resident memory for one string.
"""

from __future__ import annotations

import os
import sys

DISTRIBUTION = "factory-edge-gateway"
UNKNOWN = "0+unknown"  # running from a source tree


def installed_version(distribution: str = DISTRIBUTION, path: list[str] | None = None) -> str:
    """The `Version:` of the first `<name>-<version>.dist-info/METADATA` on `path` (default
    sys.path), the name compared as the packaging specifications normalize it."""
    wanted = _normalized(distribution)
    for entry in sys.path if path is None else path:
        try:
            names = sorted(os.listdir(entry or "."))
        except OSError:
            continue
        for name in names:
            stem, dot, suffix = name.rpartition(".")
            if suffix != "dist-info" or not dot:
                continue
            if _normalized(stem.partition("-")[0]) != wanted:
                continue
            version = _metadata_version(os.path.join(entry or ".", name, "METADATA"))
            if version:
                return version
    return UNKNOWN


def _normalized(name: str) -> str:
    return "".join("-" if c in "-_." else c for c in name.lower())


def _metadata_version(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    return None  # the headers end at the first empty line
                key, _, value = line.partition(":")
                if key.strip().lower() == "version":
                    return value.strip()
    except OSError:
        return None
    return None


VERSION = installed_version()
