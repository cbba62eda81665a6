"""Experiment loggers: metrics.jsonl (always on), TensorBoard, MLflow."""
