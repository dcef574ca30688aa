"""Model export (build-time only: needs the ``build`` extra with torch)."""
