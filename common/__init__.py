"""Pieces shared by every model package: the one attention function and checkpoint reading."""
