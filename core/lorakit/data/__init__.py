"""The data path: read sources, split, render and tokenize with completion-only labels."""
