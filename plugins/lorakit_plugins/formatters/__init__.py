"""Prompt formatters: render examples as text with supervised segments marked."""
