"""The embedded demo data source: synthetic S2 L2A / S1 RTC scenes and a local STAC API serving them."""

from tessera.demo.scenes import generate_catalog
from tessera.demo.server import serve_catalog

__all__ = ["generate_catalog", "serve_catalog"]
