"""The MLflow Model Registry side of an export: log a model folder as a pyfunc model in its own run and register
it under a name, linked both ways to the stage runs that made it."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from storage.tracking import StageRun, TrackingError, _client, one_line_error, valid_name


@dataclass
class RegisteredModel:
    """A registered model version: `models:/<name>/<version>`, logged by run `run_id`."""

    name: str
    version: str
    run_id: str
    alias: str | None = None  # `models:/<name>@<alias>` points at this version

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def check_model_name(name: str) -> str:
    """A registered model's name, or TrackingError (one line) for one MLflow refuses."""
    if not name or not name.strip() or any(c in name for c in "/:@") or name != name.strip() or \
            name.startswith("..") or not name.strip("."):  # MLflow refuses these only after the model is logged
        raise TrackingError(f"--register {name!r}: a registered model name needs some text, no '/', ':' or '@', and "
                            "does not start with '..' (e.g. shapes-dalle)")
    return name


def check_alias(alias: str) -> str:
    """A registered model alias (`models:/NAME@ALIAS`), or TrackingError (one line) for one MLflow refuses."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,255}", alias) or alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise TrackingError(f"--alias {alias!r}: an alias is letters, digits, '_' and '-', and neither 'latest' nor "
                            "v<number> (MLflow's own names for versions), e.g. champion")
    return alias


def register_pyfunc(run: StageRun, name: str, pyfunc: dict, source_runs: dict[str, str | None],
                    description: str, alias: str | None = None) -> RegisteredModel:
    """Log a pyfunc model (`pyfunc`: `mlflow.pyfunc.log_model`'s python_model, artifacts, signature,
    pip_requirements and input_example) in the open `run` (tags `source_run.<stage>`), register it as a new
    version of `name`, and link it to the stage runs that made it: the version carries their ids as tags and each
    of them gets a `registered_model` tag naming the version; `alias` (e.g. champion) then points at it, so a
    deployment that loads `models:/<name>@<alias>` follows it. The caller ends `run` (a StageRun's `with`).
    TrackingError (one line) when MLflow refuses."""
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one line per file otherwise
    client = _client(run.uri)
    links = {f"source_run.{stage}": run_id for stage, run_id in source_runs.items() if run_id}
    previous = mlflow.get_tracking_uri()
    try:
        run.set_tags({"registered_model_name": name, **links, "mlflow.note.content": description})
        mlflow.set_tracking_uri(run.uri)  # log_model works on the global URI and active run
        with mlflow.start_run(run_id=run.run_id):
            info = mlflow.pyfunc.log_model(name="model", **pyfunc, registered_model_name=name,
                                           await_registration_for=60)
        version = str(info.registered_model_version)
        client.update_model_version(name, version, description)
        for tag, run_id in links.items():
            client.set_model_version_tag(name, version, tag, run_id)
            client.set_tag(run_id, valid_name(f"registered_model.{name}"), version)
        client.set_model_version_tag(name, version, "export_key", run.key)
        if alias:
            client.set_registered_model_alias(name, alias, version)
        run.set_tags({"registered_model_version": version, **({"registered_model_alias": alias} if alias else {})})
    except TrackingError:
        raise
    except Exception as err:
        raise TrackingError(f"registering model {name!r} in {run.uri!r} failed: {one_line_error(err)}") from None
    finally:
        mlflow.set_tracking_uri(previous)
    return RegisteredModel(name, version, run.run_id, alias)
