"""Parameter-efficient fine-tuning methods."""
