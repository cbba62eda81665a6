"""Data sources: readers that turn files into normalized examples."""
