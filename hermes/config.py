"""Settings: packaged defaults < a --config YAML file < CLI flags."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from hermes.errors import HermesError


@dataclass(frozen=True)
class Config:
    text_field: str
    id_field: str
    source_field: str
    read_batch_size: int
    model: str
    dtype: str
    device: str
    max_length: int
    batch_size: int
    tokenizer: str | None
    quality: str
    quality_field: str | None
    transform: str
    codebook_size: int
    min_points_per_code: int
    kmeans_iters: int
    fit_sample: int
    seed: int
    keep_embeddings: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **overrides: Any) -> "Config":
        return load_config(overrides=overrides, base=self)


_CHOICES = {
    "dtype": ("auto", "bf16", "fp32"),
    "transform": ("identity",),
    "quality": ("none", "heuristic", "field"),
}
_POSITIVE = ("read_batch_size", "max_length", "batch_size", "codebook_size",
             "min_points_per_code", "kmeans_iters", "fit_sample")


def default_config_path() -> Path:
    """configs/default.yaml: beside the package in a source checkout, inside it when installed."""
    here = Path(__file__).resolve().parent
    checkout = here.parent / "configs" / "default.yaml"
    if checkout.is_file():
        return checkout
    try:
        return Path(str(resources.files("hermes.configs").joinpath("default.yaml")))
    except ModuleNotFoundError:
        raise HermesError("configs/default.yaml is missing from this installation", hint="reinstall hermes") from None


def default_yaml_text() -> str:
    return default_config_path().read_text(encoding="utf-8")


def _read_yaml(text: str, origin: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{origin}:{mark.line + 1}" if mark else origin
        raise HermesError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})",
                          hint="fix the YAML syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise HermesError(f"{origin}: a config file must be a mapping of key: value",
                          hint="see configs/default.yaml for the keys")
    return data


def _validate(values: dict[str, Any], origin: str) -> None:
    known = {f.name for f in fields(Config)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise HermesError(f"{origin}: unknown config key(s): {', '.join(unknown)}",
                          hint=f"valid keys: {', '.join(sorted(known))}")
    for key, choices in _CHOICES.items():
        if key in values and values[key] not in choices:
            raise HermesError(f"{origin}: {key} = {values[key]!r} is not one of {', '.join(choices)}")
    if "keep_embeddings" in values and not isinstance(values["keep_embeddings"], bool):
        raise HermesError(f"{origin}: keep_embeddings must be true or false, got {values['keep_embeddings']!r}")
    for key in _POSITIVE:
        if key in values:
            v = values[key]
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise HermesError(f"{origin}: {key} must be a positive integer, got {v!r}")


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                base: Config | None = None) -> Config:
    """Defaults, then the file at `path`, then `overrides` (None values are ignored)."""
    if base is None:
        values = _read_yaml(default_yaml_text(), "configs/default.yaml")
        _validate(values, "configs/default.yaml")
    else:
        values = base.to_dict()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise HermesError(f"{p}: config file not found", hint="pass an existing YAML file to --config")
        file_values = _read_yaml(p.read_text(encoding="utf-8"), str(p))
        _validate(file_values, str(p))
        values.update(file_values)
    if overrides:
        given = {k: v for k, v in overrides.items() if v is not None}
        _validate(given, "command line")
        values.update(given)
    if values.get("quality") == "field" and not values.get("quality_field"):
        raise HermesError("quality = field needs quality_field, the record field that holds the score",
                          hint="pass --quality-field NAME")
    missing = sorted({f.name for f in fields(Config)} - set(values))
    if missing:
        raise HermesError(f"configuration lacks key(s): {', '.join(missing)}")
    return Config(**values)
