"""tessera-workflow: TESSERA embeddings for a region of interest and a year."""

__version__ = "0.1.0"
