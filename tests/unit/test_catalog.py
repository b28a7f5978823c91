"""The model catalog: its files (TOML, YAML, JSON), the errors that name file and field, lookup
by a request's model name, and the batch flow's parameters for an entry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.batch import batch_inference
from llmflow.catalog import Catalog, CatalogEntry, load_catalog
from llmflow.config import BatchConfig, SessionConfig
from llmflow.errors import ConfigError, UnknownModel

TOML = """
default = "tiny"
[models.tiny]
config = "configs/tiny.json"
[models.big]
model_server_block = "llama3-70b"
cluster_block = "gpu-partition"
"""


def _session_file(folder: Path, session: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.json"
    session = session or {"model": {"path": "../models/tiny.gguf", "served_name": "tiny-llama"}, "runs_dir": "runs"}
    path.write_text(json.dumps({"session": session, "batch": {"concurrency": 2}}))
    return path


def _catalog(tmp_path: Path, text: str = TOML, name: str = "catalog.toml") -> Path:
    _session_file(tmp_path / "configs")
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_toml_catalog_takes_relative_paths_from_its_folders(tmp_path: Path):
    catalog = load_catalog(_catalog(tmp_path))
    assert catalog.names == ["big", "tiny"] and catalog.default == "tiny"
    tiny = catalog.models["tiny"]
    assert tiny.config == tmp_path / "configs" / "tiny.json"  # from the catalog's folder
    session = tiny.session()
    # the config file's own paths: from the config file's folder, as `--config` takes them
    assert session.model.path == tmp_path / "configs" / ".." / "models" / "tiny.gguf"
    assert session.runs_dir == tmp_path / "configs" / "runs" and session.model.served_name == "tiny-llama"


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_yaml_and_json_catalogs_mean_the_same(tmp_path: Path, suffix: str):
    data = {
        "default": "tiny",
        "models": {"tiny": {"config": "configs/tiny.json"}, "big": {"model_server_block": "llama3-70b"}},
    }
    text = json.dumps(data)  # JSON is YAML too
    catalog = load_catalog(_catalog(tmp_path, text, "catalog" + suffix))
    assert catalog.models["tiny"].config == tmp_path / "configs" / "tiny.json"


def test_lookup_names_default_and_unknown_names(tmp_path: Path):
    catalog = load_catalog(_catalog(tmp_path))
    assert catalog.lookup("big")[0] == "big"
    assert catalog.lookup(None)[0] == "tiny"  # a request without a model: the default
    with pytest.raises(
        UnknownModel, match=r"^model 'bgi' is not in the catalog \(one of big, tiny\); did you mean 'big'\?$"
    ):
        catalog.lookup("bgi")  # a typo is an error, default or not: it must not run another model
    with pytest.raises(UnknownModel, match="'gpt-4o-mini' is not in the catalog"):
        catalog.lookup("gpt-4o-mini")

    no_default = Catalog.model_validate(
        {"models": {"a": {"model_server_block": "x"}, "b": {"model_server_block": "y"}}}
    )
    with pytest.raises(UnknownModel, match=r"^model 'gpt-4o-mini' is not in the catalog \(one of a, b\)$"):
        no_default.lookup("gpt-4o-mini")
    with pytest.raises(UnknownModel, match=r"^no model named and the catalog has no default \(one of a, b\)$"):
        no_default.lookup(None)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[models.tiny]\nconfg = "configs/tiny.json"\n', "models.tiny.confg: unknown key; did you mean 'config'?"),
        ('[models.tiny]\ncluster_block = "c"\n', "models.tiny: give exactly one of config or model_server_block"),
        (
            '[models.tiny]\nconfig = "configs/tiny.json"\nmodel_server_block = "b"\n',
            "models.tiny: give exactly one of config or model_server_block",
        ),
        ('default = "tinny"\n[models.tiny]\nconfig = "configs/tiny.json"\n', "did you mean 'tiny'?"),
        (
            'defualt = "tiny"\n[models.tiny]\nconfig = "configs/tiny.json"\n',
            "defualt: unknown key; did you mean 'default'?",
        ),
        ("models = {}\n", "models: Dictionary should have at least 1 item"),
        ('[models.tiny]\nconfig = "configs/nope.json"\n', "models.tiny.config"),
        ("[models.tiny\n", "not valid TOML"),
    ],
)
def test_catalog_errors_name_the_file_and_the_field(tmp_path: Path, text: str, message: str):
    path = _catalog(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_catalog(path)
    assert str(exc.value).startswith(f"catalog {path}: ") and message in str(exc.value)


def test_an_entrys_session_file_is_checked_when_the_catalog_loads(tmp_path: Path):
    _catalog(tmp_path)
    _session_file(tmp_path / "configs", {"engine": {"n_ctxx": 4}})
    with pytest.raises(ConfigError) as exc:
        load_catalog(tmp_path / "catalog.toml")
    assert str(exc.value) == (
        f"catalog {tmp_path / 'catalog.toml'}: models.tiny.config {tmp_path / 'configs' / 'tiny.json'}: "
        "session.engine.n_ctxx: unknown key; did you mean 'n_ctx'?"
    )


def test_flow_parameters_fit_the_batch_flow_and_send_under_the_served_name(tmp_path: Path):
    catalog = load_catalog(_catalog(tmp_path))
    params = catalog.models["tiny"].flow_parameters({"input_path": "in.jsonl", "output_path": "out.jsonl"})
    assert json.loads(json.dumps(params)) == params  # JSON-able, as deployment parameters must be
    assert set(params) <= set(batch_inference.parameters.properties)
    assert params["batch"]["rewrite_model_to_served_name"] is True
    assert BatchConfig.model_validate(params["batch"]).rewrite_model_to_served_name
    assert SessionConfig.model_validate(params["session"]).model.served_name == "tiny-llama"
    assert (params["cluster_block"], params["model_server_block"]) == (None, None)

    big = catalog.models["big"].flow_parameters()
    assert big == {"session": {}, "cluster_block": "gpu-partition", "model_server_block": "llama3-70b"}


def test_a_secret_in_the_session_file_reaches_the_parameters_unmasked(tmp_path: Path):
    """A pydantic dump would write ``**********`` for a SecretStr; the table is passed as written."""
    path = _catalog(tmp_path, '[models.e]\nconfig = "configs/tiny.json"\n')
    session = {"placement": {"kind": "endpoint", "base_url": "http://h:1", "api_key": "k-123"}}
    _session_file(tmp_path / "configs", session)
    assert load_catalog(path).models["e"].flow_parameters()["session"]["placement"]["api_key"] == "k-123"
    entry = CatalogEntry(config=tmp_path / "configs" / "tiny.json")  # made in code: read on first use
    assert entry.session_table() == session and entry.session().placement.kind == "endpoint"
