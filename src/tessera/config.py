"""Loading and validating the workflow configuration (schema: ``config.schema.yaml``)."""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from tessera.errors import UserError

SCHEMA_PATH = resources.files("tessera") / "config.schema.yaml"


def schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def merge(base: dict, override: dict) -> dict:
    """Deep-merge two config mappings the way Snakemake merges --configfile files."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_config_files(paths: list[str | Path]) -> dict:
    config: dict = {}
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise UserError(f"config file {str(path)!r} does not exist: pass an existing YAML file (e.g. config/demo.yaml)")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"config file {str(path)!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise UserError(f"config file {str(path)!r} must be a mapping of option: value")
        config = merge(config, loaded)
    return config


def validate(config: dict[str, Any]) -> dict[str, Any]:
    """Validate a config and return a copy with every default filled in.

    Raises UserError with one line naming the offending key and what it accepts.
    """
    the_schema = schema()
    config = copy.deepcopy(config)
    validator = jsonschema.Draft202012Validator(the_schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(config))
    if error is not None:
        raise UserError(_describe(error))
    _fill_defaults(the_schema, config)
    return config


def load(paths: list[str | Path], overrides: dict | None = None) -> dict[str, Any]:
    return validate(merge(read_config_files(paths), overrides or {}))


def _fill_defaults(node_schema: dict, data: dict) -> None:
    for key, sub in node_schema.get("properties", {}).items():
        if key not in data and "default" in sub:
            data[key] = copy.deepcopy(sub["default"])
        if sub.get("type") == "object" and isinstance(data.get(key), dict):
            _fill_defaults(sub, data[key])


def _describe(error: jsonschema.ValidationError) -> str:
    where = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties":
        known = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(known))
        place = f" in '{where}'" if where else ""
        return f"config: unknown key {', '.join(repr(k) for k in unknown)}{place}; known keys: {', '.join(known)}"
    if error.validator == "required":
        return f"config: {error.message.replace(' is a required property', '')} is required (see config/config.yaml)"
    if error.validator == "enum":
        return f"config key '{where}': {error.instance!r} is not one of {', '.join(map(str, error.validator_value))}"
    if error.validator == "type":
        return f"config key '{where}': {error.instance!r} is not of type {error.validator_value}"
    return f"config key '{where}': {error.message}"
