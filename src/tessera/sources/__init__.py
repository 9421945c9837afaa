"""Data sources: where scenes come from and how to read them the reference's way.

``open_source`` turns the config's source into a ready ``Source`` for the duration of a fetch (for
``demo`` it starts the local STAC API first and stops it afterwards). A source is given as a name
(``demo``, ``mpc``, ``aws``) or as a mapping with a ``name`` key; ``stac`` takes its options in the
same mapping (``STAC_OPTIONS`` lists them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path

from tessera.errors import UserError
from tessera.sources.mpc import MPC_ASSET_KEYS, PlanetaryComputerSigner, mpc_shaped_source, mpc_source
from tessera.sources.stac import (
    BANDS,
    HARMONISATION_RULES,
    S1_MASK,
    S1_POLARISATIONS,
    S2_BANDS,
    S2_SCL,
    NoSigning,
    Source,
    StacFeed,
    UnusableAsset,
    cached_search,
    redact,
    utc_date,
)

SOURCE_NAMES = ("demo", "mpc", "aws", "stac")
# Options of source "stac" -> (required, meaning).
STAC_OPTIONS = {
    "url": (True, "the STAC API root"),
    "s2_collection": (True, "collection of Sentinel-2 L2A items"),
    "s1_collection": (True, "collection of Sentinel-1 RTC items (linear gamma0, sat:orbit_state)"),
    "assets": (False, "our band name -> the collections' asset key, for bands whose key differs"),
    "harmonisation": (False, "S2 baseline rule: none (DN as stored) or mpc (the reference's MPC rule)"),
    "signing": (False, "none, or planetary-computer (SAS tokens for Azure Blob Storage hrefs)"),
}
SIGNERS = {"none": NoSigning, "planetary-computer": PlanetaryComputerSigner}

__all__ = [
    "BANDS", "S1_MASK", "S1_POLARISATIONS", "S2_BANDS", "S2_SCL", "SOURCE_NAMES", "STAC_OPTIONS", "Source",
    "UnusableAsset", "cached_search", "open_source", "redact", "stac_source", "utc_date",
]


@contextlib.contextmanager
def open_source(source_config: Mapping | str, *, demo_catalog: Path | None = None) -> Iterator[Source]:
    """The configured source, usable inside the ``with`` block."""
    spec = {"name": source_config} if isinstance(source_config, str) else dict(source_config)
    name = spec.pop("name", None)
    if name != "stac" and spec:
        raise UserError(f"source {name!r} takes no options ({', '.join(sorted(spec))}): remove them")
    if name == "demo":
        if demo_catalog is None:
            raise UserError("source demo needs its demo catalog: pass the catalog.json written by `tessera demo-catalog`")
        from tessera.demo import serve_catalog  # the demo generator is only needed by this source

        with serve_catalog(demo_catalog) as url:
            yield mpc_shaped_source("demo", url, ephemeral_url=True, pgstac_order=True)
        return
    if name == "mpc":
        yield mpc_source()
    elif name == "aws":
        # asf-search (with xarray and pandas, ~0.5 s of CPU to import) is only needed by this source.
        from tessera.sources.aws import aws_source

        yield aws_source()
    elif name == "stac":
        yield stac_source(spec)
    else:
        raise UserError(f"source {name!r} is unknown: use one of {', '.join(SOURCE_NAMES)}")


def stac_source(options: Mapping) -> Source:
    """Source ``stac``: any STAC API with S2 L2A and S1 RTC collections (see ``STAC_OPTIONS``)."""
    unknown = set(options) - set(STAC_OPTIONS)
    if unknown:
        raise UserError(f"source stac: unknown option(s) {', '.join(sorted(unknown))}: use {', '.join(STAC_OPTIONS)}")
    missing = [key for key, (required, _) in STAC_OPTIONS.items() if required and not options.get(key)]
    if missing:
        raise UserError(f"source stac: missing {', '.join(missing)}: give " + "; ".join(
            f"{key} ({STAC_OPTIONS[key][1]})" for key in missing))
    assets = dict(options.get("assets") or {})
    unknown_bands = set(assets) - set(BANDS) - {S1_MASK}
    if unknown_bands:
        raise UserError(f"source stac: assets names unknown bands {sorted(unknown_bands)}: map our band names "
                        f"({', '.join((*BANDS, S1_MASK))}) to the collections' asset keys")
    harmonisation = options.get("harmonisation", "none")
    if harmonisation not in HARMONISATION_RULES:
        raise UserError(f"source stac: harmonisation {harmonisation!r} is unknown: use one of {', '.join(HARMONISATION_RULES)}")
    signing = options.get("signing", "none")
    if signing not in SIGNERS:
        raise UserError(f"source stac: signing {signing!r} is unknown: use one of {', '.join(SIGNERS)}")
    signer = SIGNERS[signing]()
    keys = {**MPC_ASSET_KEYS, **assets}
    url = options["url"]
    return Source(
        name="stac",
        s2=StacFeed(url, options["s2_collection"], keys, signer),
        s1=StacFeed(url, options["s1_collection"], keys, signer),
        harmonisation=harmonisation,
    )
