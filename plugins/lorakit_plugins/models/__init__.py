"""Model sources: where base weights come from."""
