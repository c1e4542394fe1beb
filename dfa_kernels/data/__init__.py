"""Offline datasets for the zoo, read from installed data-only packages or from the user's own files."""
