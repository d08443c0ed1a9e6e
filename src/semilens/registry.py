"""MLflow registration: one run and one model version per trained artifact set.

The default store is sqlite under ``paths.mlflow`` (``mlflow.db`` beside an ``artifacts``
folder); ``MLFLOW_TRACKING_URI`` points it elsewhere (a server, another database).
Registration is idempotent: a version whose identity tag (the hash of its lineage and
params) is already registered is reused rather than duplicated, so re-running the stage
after the store was restored, or pointed somewhere new, gives one version per model.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from semilens.io import hash_json
from semilens.lineage import file_md5

IDENTITY_TAG = "semilens.identity"


def tracking_uri(mlflow_dir: Path) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the project's sqlite store."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{(Path(mlflow_dir) / 'mlflow.db').resolve()}"


def describe_uri(uri: str) -> str:
    """The URI without credentials, for logs (``https://user:token@host`` is common)."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    return f"{scheme}://{netloc}{slash}{path}"


@dataclass
class Registration:
    """Everything MLflow gets for one model."""

    name: str  # registered model name
    params: Mapping[str, Any]
    metrics: Mapping[str, float]
    tags: Mapping[str, str]  # run and model-version tags (lineage, git, params hash)
    artifacts: Mapping[str, Path]  # artifact path in the run -> local folder or file
    model_artifact: str  # which of ``artifacts`` the model version points at
    datasets: list[tuple[Any, str, dict[str, str]]] = field(default_factory=list)  # (dataset, context, tags)
    description: str = ""


def params_hash(cfg: Any, sections: Iterable[str] | None = None) -> str:
    """Hash of the config sections that shape a model (default: all but paths and registration).

    A family passes its own sections so that tuning another family's params neither
    changes its hash nor leaves it stale (DVC re-runs a register stage only for the
    params it declares).
    """
    data = cfg.model_dump(mode="json", exclude={"paths", "register_models"})
    if sections is not None:
        data = {name: data[name] for name in sections}
    return hash_json(data)[:16]


def lineage_tags(lineage: Mapping[str, Mapping[str, str]], git: Mapping[str, Any]) -> dict[str, str]:
    """Model-version tags from ``verified_hashes`` and ``git_state``: each artifact's dvc.lock
    md5, path and producing stage, and the commit the pipeline ran on."""
    return {
        **{f"dvc.{role}.md5": entry["md5"] for role, entry in lineage.items()},
        **{f"dvc.{role}.path": entry["path"] for role, entry in lineage.items()},
        **{f"dvc.{role}.stage": entry["stage"] for role, entry in lineage.items()},
        "git.commit": git["commit"],
        "git.dirty": str(git["dirty"]).lower(),
    }


def parquet_dataset(path: Path, name: str, columns: list[str], targets: str) -> Any:
    """An MLflow dataset of some columns of a parquet split; digest = the file's md5, so the
    dataset MLflow shows is the file DVC tracks."""
    import mlflow
    import pandas as pd

    df = pd.read_parquet(path, columns=columns)
    with warnings.catch_warnings():
        # "source can be interpreted in multiple ways" (it is a local file either way) and a
        # hint about integer columns in a schema nobody enforces here
        warnings.simplefilter("ignore", UserWarning)
        return mlflow.data.from_pandas(df, source=str(path), name=name, targets=targets, digest=file_md5(path))


def identity(tags: Mapping[str, str]) -> str:
    return hash_json(dict(tags))[:32]


def register(reg: Registration, uri: str, experiment: str, artifact_root: Path) -> dict[str, Any]:
    """Log the run and create (or reuse) the model version; returns their ids."""
    import mlflow
    from mlflow import MlflowClient

    ident_tags = {k: v for k, v in reg.tags.items() if not k.startswith("git.")}
    ident = identity(ident_tags)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    found = client.search_model_versions(f"name = '{reg.name}' and tags.`{IDENTITY_TAG}` = '{ident}'")
    if found:
        mv = found[0]
        return {"name": reg.name, "version": int(mv.version), "run_id": mv.run_id, "reused": True}

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        location = None
        if uri.startswith("sqlite:"):
            # keep artifacts beside the default database instead of ./mlruns of the cwd
            location = Path(artifact_root).resolve().as_uri()
        exp_id = client.create_experiment(experiment, artifact_location=location)
    else:
        exp_id = exp.experiment_id
    tags = {**reg.tags, IDENTITY_TAG: ident}
    with mlflow.start_run(experiment_id=exp_id, run_name=reg.name, tags=tags) as run:
        mlflow.log_params({k: _param(v) for k, v in reg.params.items()})
        mlflow.log_metrics({k: float(v) for k, v in reg.metrics.items()})
        for dataset, context, dtags in reg.datasets:
            with warnings.catch_warnings():
                # a hint about integer columns in an inferred schema nobody enforces here
                warnings.simplefilter("ignore", UserWarning)
                mlflow.log_input(dataset, context=context, tags=dtags)
        for name, local in reg.artifacts.items():
            local = Path(local)
            if local.is_dir():
                mlflow.log_artifacts(str(local), artifact_path=name)
            else:
                mlflow.log_artifact(str(local), artifact_path=name)
        run_id = run.info.run_id
        source = f"{run.info.artifact_uri}/{reg.model_artifact}"
    if not client.search_registered_models(f"name = '{reg.name}'"):
        client.create_registered_model(reg.name, description=f"semilens model {reg.name}")
    mv = client.create_model_version(reg.name, source=source, run_id=run_id, tags=tags, description=reg.description)
    return {"name": reg.name, "version": int(mv.version), "run_id": run_id, "reused": False}


def _param(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5990] + "..."  # MLflow's param limit


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """Nested dicts to dotted keys (``lora.r``), for params and metrics."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: value}
