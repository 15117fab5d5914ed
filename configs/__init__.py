"""Experiment configs: one ``get_config(variant)`` per file; ``common`` holds what they share."""
