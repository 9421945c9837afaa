"""Data sources: where scenes come from and how to read them the reference's way.

``open_source`` turns the config's source into a ready ``Source`` for the duration of a fetch (for
``demo`` it starts the local STAC API first and stops it afterwards).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from tessera.errors import UserError
from tessera.sources.mpc import mpc_shaped_source
from tessera.sources.stac import (
    BANDS,
    S1_POLARISATIONS,
    S2_BANDS,
    S2_SCL,
    Source,
    cached_search,
)

SOURCE_NAMES = ("demo",)

__all__ = ["BANDS", "S1_POLARISATIONS", "S2_BANDS", "S2_SCL", "SOURCE_NAMES", "Source", "cached_search", "open_source"]


@contextlib.contextmanager
def open_source(source_config: dict | str, *, demo_catalog: Path | None = None) -> Iterator[Source]:
    """The configured source, usable inside the ``with`` block.

    ``source_config`` is the config's ``source`` value: a name, or a mapping with a ``name`` key.
    """
    name = source_config["name"] if isinstance(source_config, dict) else source_config
    if name == "demo":
        if demo_catalog is None:
            raise UserError("source demo needs its demo catalog: pass the catalog.json written by `tessera demo-catalog`")
        from tessera.demo import serve_catalog  # the demo generator is only needed by this source

        with serve_catalog(demo_catalog) as url:
            yield mpc_shaped_source("demo", url)
        return
    raise UserError(f"source {name!r} is unknown: use one of {', '.join(SOURCE_NAMES)}")
