"""Streaming checkpoint reader and writer, atomic output folders, the export path, manifest, card."""
