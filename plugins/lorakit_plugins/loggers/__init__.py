"""Experiment loggers: TensorBoard, MLflow (the core writes metrics.jsonl itself)."""
