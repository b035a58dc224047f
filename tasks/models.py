"""Load a trained model from wherever it is: an exported folder, a registered MLflow model, or a run's store
named by its config. The Python API's one entry point (`load_model`), and what `dalle serve` and
`dalle generate --model` read. Where a training stage starts from when it fine-tunes: tasks/model_source.py
and tasks/fine_tuning.py."""

from __future__ import annotations

import dataclasses
import glob
import os
import tempfile

from dalle_core.config import ConfigError, load_config
from dalle_core.export import INDEX
from dalle_core.generate import DALLEPipeline

URI_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/", "s3://", "gs://", "file://", "http://", "https://")
TRACKED_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")  # resolved through a tracking server


def load_model(source: str | os.PathLike, *, device: str = "auto", precision: str = "auto",
               overrides: list[str] = (), tracking_uri: str | None = None) -> DALLEPipeline:
    """A `DALLEPipeline` from `source`:

    - an exported folder (`dalle export`): `DALLEPipeline.from_pretrained`, no store, Prefect or MLflow;
    - a registered or logged MLflow model, `models:/<name>/<version>` (or `runs:/<id>/model`), from
      `tracking_uri` (default $MLFLOW_TRACKING_URI): its folder is downloaded, then loaded as above;
    - a run config (`configs/shapes.yaml`, with `--set`-style `overrides`): the models in that run's store.

    `device`: auto | cpu | cuda | cuda:N; `precision`: auto | fp32 | bf16 (for a run config, its
    `runner.device` and `generate.precision` unless given here). One-line ConfigError / ModelFolderError /
    TrackingError for a source that is none of these or cannot be read."""
    text = os.fspath(source)
    if os.path.isdir(text):
        return DALLEPipeline.from_pretrained(text, device, precision)
    if text.startswith(URI_SCHEMES):
        with tempfile.TemporaryDirectory(prefix="dalle-model-") as tmp:  # loaded into memory, then removed
            return DALLEPipeline.from_pretrained(download_model(text, tracking_uri, tmp), device, precision)
    if text.endswith((".yaml", ".yml")) or os.path.isfile(text):
        cfg = load_config(text, [*overrides, *([f"runner.device={device}"] if device != "auto" else []),
                                 *([f"generate.precision={precision}"] if precision != "auto" else [])])
        return store_model(cfg)
    raise ConfigError(f"model {text!r} is not an exported folder, a models:/ or runs:/ URI, or a run config "
                      "(.yaml); make a folder with `dalle export -c CONFIG --out DIR`")


def store_model(cfg) -> DALLEPipeline:
    """The models of a run's store (tasks.generate.load_pipeline), with the run's sampling settings as defaults."""
    from tasks.export import sampling_defaults
    from tasks.generate import load_pipeline

    return dataclasses.replace(load_pipeline(cfg), sampling=sampling_defaults(cfg))


def download_model(uri: str, tracking_uri: str | None, dst: str) -> str:
    """The exported folder inside an MLflow model (tasks/pyfunc.py's `model_dir` artifact), downloaded under
    `dst` (the caller removes it). A models:/, runs:/ or mlflow-artifacts:/ URI is looked up in `tracking_uri`
    (default $MLFLOW_TRACKING_URI); with neither, ConfigError (one line) rather than MLflow's default of a new
    ./mlflow.db. TrackingError (one line) when MLflow cannot find the model."""
    import logging

    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri.startswith(TRACKED_SCHEMES) and not tracking_uri:
        raise ConfigError(f"{uri!r} is looked up in an MLflow tracking store and none is configured; pass "
                          "-c CONFIG (the run whose tracking.uri holds it) or set MLFLOW_TRACKING_URI")
    import mlflow

    for name in ("mlflow", "alembic"):  # their INFO lines (store migrations, downloads) are not this command's
        logging.getLogger(name).setLevel(logging.WARNING)

    from storage.tracking import TrackingError, one_line_error

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst)
    except Exception as err:
        raise TrackingError(f"cannot load MLflow model {uri!r} from {mlflow.get_tracking_uri()!r}: "
                            f"{one_line_error(err)}") from None
    found = sorted(glob.glob(os.path.join(local, "**", INDEX), recursive=True))
    if not found:
        raise TrackingError(f"MLflow model {uri!r} holds no exported model folder ({INDEX}); register one with "
                            "`dalle export -c CONFIG --register NAME`")
    return os.path.dirname(found[0])
