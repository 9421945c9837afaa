"""Exports: geotessera's layout and manifests, COGs, STAC, quicklooks."""
