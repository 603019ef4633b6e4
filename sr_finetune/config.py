"""Typed config trees read from YAML and ``key=value`` overrides (OmegaConf structured configs).

Every mistake is one line that names the key: ``config error: unknown key 'generate.stepz'``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError

T = TypeVar("T")


def _one_line(exc: OmegaConfBaseException, origin: str) -> str:
    key = getattr(exc, "full_key", None) or "?"
    first = str(getattr(exc, "msg", None) or exc).splitlines()[0]
    if "not in" in first:
        hint = first.split("Did you mean:", 1)
        suggestion = f" (did you mean {hint[1].strip().rstrip('?')}?)" if len(hint) == 2 else ""
        return f"config error in {origin}: unknown key '{key}'{suggestion}"
    return f"config error in {origin}: bad value for '{key}': {first}"


def _qualify(override: str, section: str | None, top_level: set[str]) -> str:
    key, sep, value = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"config error: override '{override}' is not of the form key=value")
    key = key.strip().lstrip("+")
    if section and key.split(".")[0] not in top_level:
        key = f"{section}.{key}"
    return f"{key}={value}"


def load_config(schema: type[T], path: str | Path | None = None, overrides: Sequence[str] = (), section: str | None = None) -> T:
    """Merge schema defaults, a YAML file and overrides into a validated ``schema`` instance.

    ``section`` lets overrides omit the stage prefix (``steps=10`` means ``generate.steps=10``).
    """
    top_level = {f.name for f in dataclasses.fields(schema)}
    merged = OmegaConf.structured(schema)
    try:
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config error: config file not found: {path}")
            file_cfg = OmegaConf.load(path)
            if file_cfg is None or not hasattr(file_cfg, "keys"):
                raise ConfigError(f"config error: {path} is not a YAML mapping")
            reset_replaced_alternatives(merged, file_cfg)
            merged = OmegaConf.merge(merged, file_cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(_one_line(exc, str(path))) from None
    except Exception as exc:  # YAML syntax errors
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"config error: cannot parse {path}: {str(exc).splitlines()[0]}") from None
    try:
        qualified = [_qualify(o, section, top_level) for o in overrides]
        layer = OmegaConf.from_dotlist(qualified)
        reset_replaced_alternatives(merged, layer)
        merged = OmegaConf.merge(merged, layer)
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(_one_line(exc, "overrides" if overrides else str(path))) from None
    # key names and types are checked everywhere above; values only in the stage that runs, since
    # another stage's defaults may be incomplete on their own (e.g. score.weights.social_reward)
    if section:
        _validate(getattr(config, section), prefix=f"{section}.")
    else:
        _validate(config, prefix="")
    return config


def reset_replaced_alternatives(merged: DictConfig, layer: DictConfig) -> None:
    """Where ``layer`` sets one key of a dataclass's ``EXCLUSIVE`` groups, reset the group's other
    keys in ``merged`` to their defaults before the merge.

    So a layer replaces an alternative instead of adding to it: a file's ``images:`` drops the
    default ``path`` of ``evaluate.baseline``, and a command-line ``path=`` a file's ``images:``.
    A layer that sets both keeps both, for ``validate()`` to refuse.
    """
    _reset_alternatives(merged, OmegaConf.to_container(layer, resolve=False))


def _reset_alternatives(node: DictConfig, values: dict[str, Any]) -> None:
    schema = OmegaConf.get_type(node)
    for group in getattr(schema, "EXCLUSIVE", ()):
        named = {key for key in group if values.get(key) is not None}
        if named:
            for key in set(group) - named:
                node[key] = _field_default(schema, key)
    for key, value in values.items():
        if isinstance(value, dict) and key in node and not OmegaConf.is_interpolation(node, key):
            child = node.get(key)
            if isinstance(child, DictConfig):
                _reset_alternatives(child, value)


def _field_default(schema: type, name: str) -> Any:
    (f,) = [f for f in dataclasses.fields(schema) if f.name == name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _validate(node: object, prefix: str) -> None:
    """Call ``validate()`` on every dataclass in the tree that has one; prefix key names in errors."""
    if not dataclasses.is_dataclass(node):
        return
    for f in dataclasses.fields(node):
        _validate(getattr(node, f.name), f"{prefix}{f.name}.")
    check = getattr(node, "validate", None)
    if callable(check):
        try:
            check()
        except ValueError as exc:
            raise ConfigError(f"config error: {prefix}{exc}") from None


def to_yaml(config: object) -> str:
    """The resolved config as YAML, as written into every run folder."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def prepare_output_dir(output_dir: str | Path, config: object) -> Path:
    """Create ``output_dir`` and write the resolved ``config.yaml`` into it."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(config))
    return out


def require(condition: bool, key: str, message: str) -> None:
    """Raise the one-line ``ValueError`` that ``validate()`` methods use: ``"<key>: <message>"``."""
    if not condition:
        raise ValueError(f"{key}: {message}")
