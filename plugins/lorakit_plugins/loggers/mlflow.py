"""``mlflow``: an MLflow run per lorakit run, in a local store or on a tracking server.

Without ``tracking_uri`` the store is a SQLite database beside the run folders,
``<output.dir>/mlflow/mlflow.db``, with artifacts in ``<output.dir>/mlflow/artifacts`` (MLflow 3
refuses its old ``./mlruns`` file store unless told otherwise and recommends SQLite). Browse it
with ``mlflow ui --backend-store-uri sqlite:///runs/mlflow/mlflow.db`` (needs the full
``mlflow`` package; lorakit itself needs only ``mlflow-skinny``, ``sqlalchemy`` and
``alembic``: ``pip install 'lorakit[track]'``).

Logged: the resolved recipe as params (``train.learning_rate``...), ``data_fingerprint`` and
``version.<package>`` params, every train/eval metric by step, the final evaluation
(``final/<base|tuned>/<split>/<metric>``), and the adapter, reports and plot as artifacts. A
resumed run continues the MLflow run it started (found by its ``lorakit.run_dir`` tag).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import attrs
from attrs import validators as v
from lorakit.api import LogRun, RegisterLogger, flatten, hookimpl, option

MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
BATCH = 100  # MLflow's limit on params per log_batch call


@attrs.frozen
class MlflowOptions:
    tracking_uri: str = option(
        "",
        doc="tracking server or store (http://host:5000, sqlite:///path.db, databricks); "
        "empty: SQLite in <output.dir>/mlflow/. Credentials go in MLFLOW_TRACKING_USERNAME/"
        "_PASSWORD (user:password@ in the URI is masked in every file and passed on as those)",
    )
    experiment: str = option("lorakit", doc="MLflow experiment the runs are filed under")
    log_adapter: bool = option(
        True, doc="copy the adapter folder into the artifact store (MBs to hundreds of MBs)"
    )
    timeout_s: int = option(
        10,
        doc="seconds per request to a tracking server, one retry (MLFLOW_HTTP_REQUEST_TIMEOUT "
        "and _MAX_RETRIES, when set, win)",
        validator=v.ge(1),
    )


def _credentials_to_env(uri: str) -> str:
    """``http://user:password@host`` -> ``http://host``, the user and password handed to MLflow
    through MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (read at each request), so the
    URI MLflow keeps, logs or shows in an error holds no secret. lorakit masks the URI in
    every file it writes; the environment variables are where credentials belong anyway."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    if parts.password is not None:
        os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username or "")
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password)
    elif parts.username:  # https://TOKEN@host
        os.environ["MLFLOW_TRACKING_TOKEN"] = unquote(parts.username)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


class MlflowLogger:
    Options = MlflowOptions
    requires: ClassVar[dict[str, str]] = {"mlflow": "pip install 'lorakit[track]'"}

    def __init__(self, options: MlflowOptions):
        self.options = options
        self.client: Any = None
        self.run_id = ""

    def start(self, run: LogRun) -> None:
        # a tracker that is down costs seconds once, never minutes of retries
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(self.options.timeout_s))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        uri, artifacts = self.options.tracking_uri, None
        if not uri:
            import importlib.util

            if importlib.util.find_spec("sqlalchemy") is None:
                raise RuntimeError(
                    "the local MLflow store needs sqlalchemy and alembic: "
                    "pip install 'lorakit[track]', or set [log.options.mlflow] tracking_uri"
                )
            store = (run.output_dir / "mlflow").resolve()
            store.mkdir(parents=True, exist_ok=True)
            uri, artifacts = f"sqlite:///{store / 'mlflow.db'}", (store / "artifacts").as_uri()
        uri = _credentials_to_env(uri)
        self.client = client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(self.options.experiment)
        exp_id = (
            exp.experiment_id
            if exp is not None
            else client.create_experiment(self.options.experiment, artifact_location=artifacts)
        )
        run_dir = str(run.run_dir.resolve())
        # a resume finds its MLflow run by a hash of the folder: a folder's path may hold a quote,
        # which MLflow's filter strings cannot escape
        run_key = hashlib.sha256(run_dir.encode()).hexdigest()[:32]
        earlier: dict[str, str] = {}
        if run.resumed:
            filters = [f"tags.`lorakit.run_key` = '{run_key}'"]
            if "'" not in run_dir:  # a run tagged before run_key (lorakit before 2026-12-08)
                filters.append(f"tags.`lorakit.run_dir` = '{run_dir}'")
            found: list[Any] = []
            for where in filters:
                found = client.search_runs(
                    [exp_id],
                    filter_string=where,
                    max_results=1,
                    order_by=["attributes.start_time DESC"],
                )
                if found:
                    break
            if found:
                self.run_id = found[0].info.run_id
                earlier = dict(found[0].data.params)
                client.update_run(self.run_id, status="RUNNING")
        if not self.run_id:
            tags = {
                "lorakit.run_dir": run_dir,
                "lorakit.run_key": run_key,
                "lorakit.config_hash": run.config_hash,
            }
            self.run_id = client.create_run(exp_id, run_name=run.name, tags=tags).info.run_id
        params = flatten(run.params)
        params["data_fingerprint"] = run.data_fingerprint
        params.update({f"version.{k}": str(ver) for k, ver in run.versions.items()})
        params = {k: val[:MAX_PARAM_CHARS] for k, val in params.items()}
        new = [Param(k, val) for k, val in params.items() if k not in earlier]
        # params cannot change in MLflow: what a resume changed is kept as tags
        changed = [
            RunTag(f"resume.{k}", val) for k, val in params.items() if earlier.get(k, val) != val
        ]
        for i in range(0, max(len(new), len(changed)), BATCH):
            client.log_batch(self.run_id, params=new[i : i + BATCH], tags=changed[i : i + BATCH])

    def log_metrics(self, step: int, metrics: Mapping[str, Any], wall_time: float) -> None:
        self._metrics(step, metrics, int(wall_time * 1000))

    def log_final(self, step: int, metrics: Mapping[str, float]) -> None:
        self._metrics(step, metrics, int(time.time() * 1000))

    def _metrics(self, step: int, metrics: Mapping[str, Any], stamp: int) -> None:
        from mlflow.entities import Metric

        rows = [
            Metric(key, number, stamp, step)
            for key, value in metrics.items()
            if (number := _number(value)) is not None
        ]
        if rows:
            self.client.log_batch(self.run_id, metrics=rows)

    def log_artifacts(self, paths: Sequence[Path]) -> None:
        for p in paths:
            if p.is_dir():
                if p.name == "adapter" and not self.options.log_adapter:
                    continue
                self.client.log_artifacts(self.run_id, str(p), artifact_path=p.name)
            else:
                self.client.log_artifact(self.run_id, str(p))

    def finish(self, status: str) -> None:
        if self.client is not None and self.run_id:
            self.client.set_terminated(self.run_id, status)


@hookimpl
def lorakit_register_loggers(register: RegisterLogger) -> None:
    register("mlflow", MlflowLogger)
