"""The MLflow Model Registry side of an export: log a model folder as a pyfunc model in its own run and register
it under a name, linked both ways to the stage runs that made it."""

from __future__ import annotations

import os
from dataclasses import dataclass

from storage.store import ArtifactStore
from storage.tracking import StageRun, TrackingError, _client, one_line_error, valid_name


@dataclass
class RegisteredModel:
    """A registered model version: `models:/<name>/<version>`, logged by run `run_id`."""

    name: str
    version: str
    run_id: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def check_model_name(name: str) -> str:
    """A registered model's name, or TrackingError (one line) for one MLflow refuses."""
    if not name or not name.strip() or "/" in name or ":" in name or name != name.strip():
        raise TrackingError(f"--register {name!r}: a registered model name needs some text and no '/' or ':' "
                            "(e.g. shapes-dalle)")
    return name


def register_pyfunc(uri: str, experiment: str, store: ArtifactStore, name: str, key: str, *, python_model,
                    artifacts: dict[str, str], signature, pip_requirements: list[str],
                    source_runs: dict[str, str | None], params: dict, metrics: dict[str, float],
                    description: str, input_example=None) -> RegisteredModel:
    """Log `artifacts` (the model folder) with `python_model` as an MLflow pyfunc model in a new run `export-<key>`
    (params, headline metrics, tags `source_run.<stage>`), register it as a new version of `name`, and link it to
    the stage runs that made it: the version carries their ids as tags and each of them gets a `registered_model`
    tag naming the version. TrackingError (one line) when MLflow refuses."""
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one line per file otherwise
    check_model_name(name)
    client = _client(uri)
    links = {f"source_run.{stage}": run_id for stage, run_id in source_runs.items() if run_id}
    run = StageRun(uri, experiment, store, f"export-{key}", stage="export", key=key,
                   tags={"registered_model_name": name, **links, "mlflow.note.content": description})
    previous = mlflow.get_tracking_uri()
    try:
        run.log_params(params)
        run.log_metrics(metrics)
        mlflow.set_tracking_uri(uri)  # log_model works on the global URI and active run
        with mlflow.start_run(run_id=run.run_id):
            info = mlflow.pyfunc.log_model(name="model", python_model=python_model, artifacts=artifacts,
                                           signature=signature, input_example=input_example,
                                           pip_requirements=pip_requirements, registered_model_name=name,
                                           await_registration_for=60)
        version = str(info.registered_model_version)
        client.update_model_version(name, version, description)
        for tag, run_id in links.items():
            client.set_model_version_tag(name, version, tag, run_id)
            client.set_tag(run_id, valid_name(f"registered_model.{name}"), version)
        client.set_model_version_tag(name, version, "export_key", key)
        run.set_tags({"registered_model_version": version})
    except Exception as err:
        run.end(error=err)
        if isinstance(err, TrackingError):
            raise
        raise TrackingError(f"registering model {name!r} in {uri!r} failed: {one_line_error(err)}") from None
    finally:
        mlflow.set_tracking_uri(previous)
    run.end()
    return RegisteredModel(name, version, run.run_id)
