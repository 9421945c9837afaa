"""Loading and validating the workflow configuration (schema: ``config.schema.yaml``)."""

from __future__ import annotations

import copy
import datetime as dt
import os
from collections.abc import Hashable
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from tessera.errors import UserError
from tessera.period import period_of_config

SCHEMA_PATH = resources.files("tessera") / "config.schema.yaml"


def schema() -> dict:
    """The config schema, with the model families the registry knows (named there only)."""
    from tessera.models import family_names

    the_schema = yaml.safe_load(SCHEMA_PATH.read_text())
    the_schema["properties"]["model"]["properties"]["family"]["enum"] = family_names()
    return the_schema


def merge(base: dict, override: dict) -> dict:
    """Deep-merge two config mappings the way Snakemake merges --configfile files."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader that refuses a key given twice in one mapping (PyYAML keeps the last one
    silently, so an edited config could run with the value the user meant to replace)."""


def _mapping_without_repeated_keys(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, Hashable):
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_repeated_keys)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        return f"{exc.problem} (line {exc.problem_mark.line + 1})"
    return str(exc).splitlines()[0]


def read_config_files(paths: list[str | Path]) -> dict:
    config: dict = {}
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise UserError(f"config file {str(path)!r} does not exist: pass an existing YAML file (e.g. config/demo.yaml)")
        try:
            loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"config file {str(path)!r} is not valid YAML: {_yaml_problem(exc)}: fix it (see config/config.yaml)") from None
        except UnicodeDecodeError:
            raise UserError(f"config file {str(path)!r} is not UTF-8 text: pass a YAML file (e.g. config/demo.yaml)") from None
        except ValueError as exc:  # YAML reads an unquoted 2024-02-30 as a date, which does not exist
            raise UserError(f"config file {str(path)!r} holds an impossible date ({exc}): fix it, or quote it to have "
                            "it checked against the key's rules") from None
        except OSError as exc:
            raise UserError(f"config file {str(path)!r} cannot be read ({exc.strerror}): pass a readable YAML file") from None
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
    config.pop("years", None)  # derived from "year" below (a validated config validates again)
    _family_of_published_checkpoint(config)
    _dates_as_text(config)
    validator = jsonschema.Draft202012Validator(the_schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(config))
    if error is not None:
        raise UserError(_describe(error))
    _fill_defaults(the_schema, config)
    config["years"] = years_of(config["year"])
    period = period_of_config(config["period"], config["years"])
    config["period"] = None if period.whole_year else {"start": str(period.start), "end": str(period.end)}
    if config["source"] == "stac" and "stac" not in config:
        raise UserError("config: source stac needs a 'stac' mapping (url, s2_collection, s1_collection): see config/config.yaml")
    return config


FIRST_YEAR, LAST_YEAR = 2017, 2025


def years_of(year: int | list[int] | str) -> list[int]:
    """The years of the config's ``year`` (one, a list or a range "A-B"), ascending."""
    if isinstance(year, int):
        return [year]
    if isinstance(year, list):
        return sorted(year)
    first, last = (int(part) for part in year.split("-"))
    if not FIRST_YEAR <= first <= last <= LAST_YEAR:
        raise UserError(f"config key 'year': range {year!r} must run forwards within {FIRST_YEAR}-{LAST_YEAR}, "
                        f"e.g. {FIRST_YEAR}-{LAST_YEAR}")
    return list(range(first, last + 1))


def _dates_as_text(config: dict) -> None:
    """YAML reads an unquoted 2024-04-01 as a date: the period's bounds are validated as text."""
    period = config.get("period")
    if isinstance(period, dict):
        for key, value in period.items():
            if isinstance(value, dt.date):
                period[key] = value.isoformat()


def _family_of_published_checkpoint(config: dict) -> None:
    """A published checkpoint name without a family sets the family (v2-teacher: family v2-teacher)."""
    from tessera.models import published_checkpoint

    model = config.get("model")
    if isinstance(model, dict) and "family" not in model and isinstance(model.get("checkpoint"), str):
        published = published_checkpoint(model["checkpoint"])
        if published is not None:
            model["family"] = published.family


WORKFLOW_DIR_VARIABLE = "TESSERA_WORKFLOW_DIR"


def export_workflow_dir(path: str | Path) -> None:
    """Name the workflow's checkout in the environment of everything Snakemake starts: envs/tessera.yaml
    installs it by ``${TESSERA_WORKFLOW_DIR}``, because Snakemake creates conda environments from a
    copy of the file under .snakemake/conda/, where a relative path would not lead to the checkout."""
    os.environ[WORKFLOW_DIR_VARIABLE] = str(Path(path).resolve())


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
    if where == "year" and error.validator in ("type", "pattern", "oneOf"):
        return (f"config key 'year': {error.instance!r} is not a year, a list of years or a range: give e.g. 2024, "
                '[2018, 2024] or "2017-2025"')
    if where.startswith("period.") and error.validator in ("type", "pattern"):
        return f"config key '{where}': {error.instance!r} is not a date: give MM-DD (every year) or YYYY-MM-DD"
    if where == "period" and error.validator in ("type", "required"):
        return ("config key 'period': give a mapping of start and end dates, e.g. {start: 04-01, end: 09-30}, "
                "or null for the whole year")
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
