"""Settings: packaged defaults < a --config YAML file < CLI flags."""

from __future__ import annotations

import re
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
    shard_bytes: int
    shard_rows: int
    encoder: str
    encoder_docs: int
    model: str
    dtype: str
    device: str
    max_length: int
    batch_size: int
    tokenizer: str | None
    quality: str
    quality_field: str | None
    quality_model: str | None
    quality_label: str
    transform: str
    stages: list
    codebook_size: int | None
    codebook_sizes: list | None
    min_points_per_code: int
    kmeans_iters: int
    lst_epochs: int
    lst_batch_size: int
    lst_lr: float
    lst_max_steps: int
    lst_weights: dict
    fit_sample: int
    seed: int
    keep_embeddings: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **overrides: Any) -> "Config":
        return load_config(overrides=overrides, base=self)


_CHOICES = {
    "dtype": ("auto", "bf16", "fp32"),
    "encoder": ("transformer", "static"),
    "transform": ("lst", "identity"),
    "quality": ("none", "heuristic", "field", "fasttext"),
}
_POSITIVE = ("encoder_docs", "read_batch_size", "shard_bytes", "shard_rows", "max_length", "batch_size",
             "min_points_per_code", "kmeans_iters", "fit_sample", "lst_epochs", "lst_batch_size", "lst_max_steps")
LST_WEIGHTS = ("structure", "reconstruction", "orthogonality", "commitment")
# settings a substrate is fitted with: `hermes label` takes them from its substrate, never from a config
FIT_KEYS = ("encoder", "encoder_docs", "model", "dtype", "max_length", "stages", "transform", "codebook_size",
            "codebook_sizes", "min_points_per_code", "kmeans_iters", "lst_epochs", "lst_max_steps", "lst_batch_size",
            "lst_lr", "lst_weights", "fit_sample", "seed")


def refuse_fit_keys(path: str | Path) -> None:
    """A config file for `hermes label` must not set what the substrate fixes (it would be ignored)."""
    p = resolve_config_path(path)
    given = [k for k in _read_yaml(p.read_text(encoding="utf-8"), str(p)) if k in FIT_KEYS]
    if given:
        raise HermesError(f"{p}: {', '.join(given)} {'is a setting' if len(given) == 1 else 'are settings'} of "
                          f"`hermes fit`; a label run uses its substrate's (field '{given[0]}')",
                          hint="remove them from this config, or fit a new substrate with them")


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


def packaged_configs() -> dict[str, Path]:
    """The example configs shipped beside default.yaml, by name (file name without .yaml)."""
    return {p.stem: p for p in sorted(default_config_path().parent.glob("*.yaml"))}


def resolve_config_path(path: str | Path) -> Path:
    """A config file, or the name of a packaged one (`--config source-first`)."""
    p = Path(path)
    if p.is_file():
        return p
    named = packaged_configs()
    if str(path) in named:
        return named[str(path)]
    raise HermesError(f"{p}: config file not found",
                      hint=f"pass a YAML file, or a packaged config: {', '.join(named)}")


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
    if "device" in values and not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", str(values["device"])):
        raise HermesError(f"{origin}: device = {values['device']!r} is not one of auto, cpu, cuda, cuda:N, mps")
    if "stages" in values:
        from hermes.stack import parse_stages

        values["stages"] = parse_stages(values["stages"], origin)
    if "lst_weights" in values:
        w = values["lst_weights"]
        if not isinstance(w, dict) or set(w) - set(LST_WEIGHTS) or \
                any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in w.values()):
            raise HermesError(f"{origin}: lst_weights must map {', '.join(LST_WEIGHTS)} to numbers >= 0, got {w!r}")
    if "lst_lr" in values and (isinstance(values["lst_lr"], bool) or not isinstance(values["lst_lr"], (int, float))
                               or values["lst_lr"] <= 0):
        raise HermesError(f"{origin}: lst_lr must be a positive number, got {values['lst_lr']!r}")
    if "keep_embeddings" in values and not isinstance(values["keep_embeddings"], bool):
        raise HermesError(f"{origin}: keep_embeddings must be true or false, got {values['keep_embeddings']!r}")
    if values.get("codebook_size") is not None:
        v = values["codebook_size"]
        if isinstance(v, bool) or not isinstance(v, int) or v < 2:
            raise HermesError(f"{origin}: codebook_size must be an integer >= 2 or null (the size rule), got {v!r}")
    if values.get("codebook_sizes") is not None:
        v = values["codebook_sizes"]
        if not isinstance(v, list) or len(v) != 3 or \
                any(x is not None and (isinstance(x, bool) or not isinstance(x, int) or x < 2) for x in v):
            raise HermesError(f"{origin}: codebook_sizes must be a list of 3 integers >= 2 (null for a fixed stage) "
                              f"or null, got {v!r}")
    for key in _POSITIVE:
        if key in values:
            v = values[key]
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise HermesError(f"{origin}: {key} must be a positive integer, got {v!r}")


def _implied_quality(layer: dict[str, Any]) -> None:
    """Naming a quality field or a quality model in a layer picks that quality source, unless the
    same layer names another."""
    if "quality" not in layer:
        if layer.get("quality_field") is not None:
            layer["quality"] = "field"
        elif layer.get("quality_model") is not None:
            layer["quality"] = "fasttext"


def _one_size_setting(layer: dict[str, Any], below: dict[str, Any], origin: str) -> None:
    """codebook_size and codebook_sizes are two ways to set one thing: a layer may set one of them,
    which then replaces whichever a lower layer (defaults, a config file) set."""
    size, sizes = layer.get("codebook_size"), layer.get("codebook_sizes")
    if size is not None and sizes is not None:
        raise HermesError(f"{origin}: codebook_size = {size} and codebook_sizes = {sizes} are both set",
                          hint="set one: a size for every learned stage, or one per stage")
    if size is not None:
        below["codebook_sizes"] = None
    if sizes is not None:
        below["codebook_size"] = None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                base: Config | None = None) -> Config:
    """Defaults, then the file at `path`, then `overrides` (None values are ignored)."""
    if base is None:
        values = _read_yaml(default_yaml_text(), "configs/default.yaml")
        _validate(values, "configs/default.yaml")
    else:
        values = base.to_dict()
    if path is not None:
        p = resolve_config_path(path)
        file_values = _read_yaml(p.read_text(encoding="utf-8"), str(p))
        _validate(file_values, str(p))
        if isinstance(file_values.get("lst_weights"), dict):    # a partial mapping overrides only its keys
            file_values["lst_weights"] = {**values.get("lst_weights", {}), **file_values["lst_weights"]}
        _one_size_setting(file_values, values, str(p))
        _implied_quality(file_values)
        values.update(file_values)
    if overrides:
        given = {k: v for k, v in overrides.items() if v is not None}
        _validate(given, "settings")
        _one_size_setting(given, values, "settings")
        _implied_quality(given)
        values.update(given)
    if values.get("quality") == "field" and not values.get("quality_field"):
        raise HermesError("quality = field needs quality_field, the record field that holds the score",
                          hint="pass --quality-field NAME")
    if values.get("quality") == "fasttext" and not values.get("quality_model"):
        raise HermesError("quality = fasttext needs quality_model, a fastText .bin file",
                          hint="pass --quality-model FILE (and --quality-label, default __label__hq)")
    sizes, stack = values.get("codebook_sizes"), values.get("stages")
    if sizes is not None and stack is not None:
        for i, (k, st) in enumerate(zip(sizes, stack)):
            kind = st["kind"] if isinstance(st, dict) else st
            if (kind == "learned") != (k is not None):
                raise HermesError(f"codebook_sizes[{i}] = {'null' if k is None else k}: stage {i + 1} is {kind}; "
                                  f"give a size for each learned stage and null ('-' on the command line) for a "
                                  f"fixed one (its size is its number of classes)")
    missing = sorted({f.name for f in fields(Config)} - set(values))
    if missing:
        raise HermesError(f"configuration lacks key(s): {', '.join(missing)}")
    return Config(**values)
