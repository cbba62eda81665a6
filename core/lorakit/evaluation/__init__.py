"""Evaluation: score a base model and an adapter on held-out splits, and write the reports.

``config``   which metrics a recipe picks, validated against the installed metric plugins
``sets``     a split -> tokenized rows (for loss) and prompt/reference pairs (for generation)
``scoring``  token-weighted loss sums and batched greedy generation for one model
``harness``  lm-evaluation-harness tasks ([eval].lm_eval_tasks) on base and tuned
``evaluate`` the phase ``lorakit run``, ``eval`` and ``baseline`` call: load, score, write
``report``   eval_report.json, predictions.jsonl and report.md
``plot``     loss.png from metrics.jsonl
``collect``  every eval report under a folder, as rows for ``lorakit compare``

Only ``config`` and ``collect`` are imported without torch (by ``check`` and ``compare``).
"""
