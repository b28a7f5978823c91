"""The model catalog: which served model a request's ``model`` name means.

A catalog file (TOML, YAML or JSON, by suffix) names models and says how each is served, by a
session config file (the format of ``llmflow batch --config``; its ``session`` table is used) or
by Prefect blocks, as the batch flow's parameters take them::

    default = "tiny"                      # optional: see ``Catalog.lookup``
    [models.tiny]
    config = "configs/tiny.json"          # relative: from the catalog file's folder
    [models.big]
    model_server_block = "llama3-70b"
    cluster_block = "gpu-partition"       # optional, with either

Catalog names are what callers write (``gpt-4o-mini``); the server answers to its
``session.model.served_name``, so a batch run from a catalog entry sends every line under that
name (``BatchConfig.rewrite_model_to_served_name``, set by ``CatalogEntry.flow_parameters``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from llmflow import paths
from llmflow.config import SessionConfig
from llmflow.config_files import load_config_file, read_table
from llmflow.errors import ConfigError, UnknownModel
from llmflow.validation import config_problems, did_you_mean, short_message

REWRITE_FIELD = "rewrite_model_to_served_name"


class CatalogEntry(BaseModel):
    """How one catalog model is served: a session config file, or a Model Server block."""

    model_config = ConfigDict(extra="forbid")

    config: Path | None = Field(
        default=None,
        description=(
            "A session config file, as `llmflow batch --config` takes (its session table is used, a batch table "
            "is ignored); relative: from the catalog file's folder."
        ),
    )
    model_server_block: str | None = Field(
        default=None, min_length=1, description="A saved Model Server block: the engine and the model."
    )
    cluster_block: str | None = Field(
        default=None, min_length=1, description="A saved Slurm Cluster block: the placement (optional)."
    )
    _session: dict[str, Any] | None = PrivateAttr(default=None)  # read once, by ``load_catalog`` or on first use

    @model_validator(mode="after")
    def _one_source(self) -> CatalogEntry:
        if (self.config is None) == (self.model_server_block is None):
            raise ValueError("give exactly one of config or model_server_block")
        return self

    def session_table(self) -> dict[str, Any]:
        """The session as flow parameters take it: the config file's session table with its paths
        absolute, or ``{}`` for a block entry (the flow applies the blocks). Not a pydantic dump:
        that would write defaults of this machine and mask secrets (an endpoint's ``api_key``)."""
        if self._session is None:
            self._session = _load_session(self.config, "config") if self.config is not None else {}
        return copy.deepcopy(self._session)

    def session(self) -> SessionConfig:
        """The session, blocks not applied (they are read from Prefect by the flow)."""
        return SessionConfig.model_validate(self.session_table())

    def flow_parameters(self, batch: dict[str, Any] | None = None) -> dict[str, Any]:
        """Parameters of the ``batch-inference`` flow for this entry: ``session``,
        ``cluster_block`` and ``model_server_block``, all JSON-able; with ``batch`` (a
        ``BatchConfig`` table) also ``batch``, set to send every line under the served name."""
        params: dict[str, Any] = {
            "session": self.session_table(),
            "cluster_block": self.cluster_block,
            "model_server_block": self.model_server_block,
        }
        if batch is not None:
            params["batch"] = {**batch, REWRITE_FIELD: True}
        return params


class Catalog(BaseModel):
    """Model names and how each is served, plus an optional default for names it does not have."""

    model_config = ConfigDict(extra="forbid")

    default: str | None = Field(
        default=None,
        min_length=1,
        description="The model that serves requests naming no model, or a model the catalog has not.",
    )
    models: dict[str, CatalogEntry] = Field(min_length=1, description="Catalog name -> how it is served.")

    @model_validator(mode="after")
    def _default_is_a_model(self) -> Catalog:
        if self.default is not None and self.default not in self.models:
            raise ValueError(
                f"default: {self.default!r} is not one of the models ({', '.join(sorted(self.models))})"
                + did_you_mean(self.default, list(self.models))
            )
        return self

    @property
    def names(self) -> list[str]:
        return sorted(self.models)

    def lookup(self, name: str | None) -> tuple[str, CatalogEntry]:
        """The catalog name and entry that serve ``name``: a name in the catalog, its entry; no
        name (a request without ``model``), the default. A name the catalog has not is an error
        even when there is a default, so a typo never runs another model (to serve requests
        written for OpenAI, give ``gpt-4o-mini`` an entry of its own). Raises ``UnknownModel``,
        listing the names, with a did-you-mean."""
        if name is not None and name in self.models:
            return name, self.models[name]
        if name is None and self.default is not None:
            return self.default, self.models[self.default]
        names = ", ".join(self.names)
        if name is None:
            raise UnknownModel(f"no model named and the catalog has no default (one of {names})")
        raise UnknownModel(f"model {name!r} is not in the catalog (one of {names}){did_you_mean(name, self.names)}")


def _load_session(config: Path, label: str) -> dict[str, Any]:
    """An entry's session table from its config file, checked as ``--config`` checks it."""
    session = load_config_file(config, label).get("session", {})
    try:
        SessionConfig.model_validate(session)
    except ValidationError as exc:
        raise ConfigError(
            f"{label} {config}: {short_message(config_problems(exc, SessionConfig, 'session.'))}"
        ) from None
    return session


def load_catalog(path: str | Path) -> Catalog:
    """A catalog file, every entry's session config file read and checked: ``ConfigError``
    naming the file and the field (``models.tiny.confg: unknown key; did you mean 'config'?``)."""
    path = Path(path)
    data = read_table(path, "catalog")
    base = path.resolve().parent
    models = data.get("models")
    if isinstance(models, dict):  # relative config paths: from the catalog's folder
        data["models"] = {
            name: {**entry, "config": paths.absolute(entry["config"], base)}
            if isinstance(entry, dict) and isinstance(entry.get("config"), str)
            else entry
            for name, entry in models.items()
        }
    try:
        catalog = Catalog.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"catalog {path}: {short_message(config_problems(exc, Catalog))}") from None
    for name, entry in catalog.models.items():
        if entry.config is not None:
            entry._session = _load_session(entry.config, f"catalog {path}: models.{name}.config")
    return catalog
