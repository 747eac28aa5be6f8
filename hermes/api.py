"""The Python API: one function per CLI command. The CLI only parses flags and prints."""

from __future__ import annotations

import json
import os
import shutil
import time
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa

from hermes.cellkeys import LEVELS, view_suffix
from hermes.config import FIT_KEYS, Config, load_config, refuse_fit_keys
from hermes.distilled import load_labeler
from hermes.engines import run_step
from hermes.errors import HermesError
from hermes.files import replacing
from hermes.fit import fit_substrate
from hermes.labelers import give_back_memory
from hermes.layout import Layout, read_marker
from hermes.models import Models, models_for, reading_fields
from hermes.progress import say
from hermes.read import Shard, check_fields, discover
from hermes.static import is_static_encoder
from hermes.store import append_store, build_store, fold_wal, store_counts, store_fingerprint, store_info, store_shards
from hermes.store import query as _query
from hermes.substrate import Substrate

SAMPLE = "sample.jsonl.gz"


def sample_corpus() -> Path:
    """Path of the sample corpus bundled with hermes (3,000 documents of 20 Newsgroups)."""
    path = Path(str(resources.files("hermes.data").joinpath(SAMPLE)))
    if not path.is_file():
        raise HermesError(f"{path}: the bundled sample corpus is missing", hint="reinstall hermes")
    return path


def _config(config: Config | str | Path | None, overrides: dict[str, Any] | None) -> Config:
    if isinstance(config, Config):
        return config.replace(**(overrides or {}))
    return load_config(config, overrides)


def _plan(inputs: Iterable[str | Path] | None, cfg: Config) -> tuple[list[str], list[Shard]]:
    """The inputs as absolute paths (recorded in the store, so export can read them again) and shards."""
    inputs = [str(i) for i in (inputs or [])] or [str(sample_corpus())]
    shards = discover(inputs, max_bytes=cfg.shard_bytes, max_rows=cfg.shard_rows)
    check_fields(shards, reading_fields(cfg))
    return [os.path.abspath(i) for i in inputs], shards


def codebook_rule(substrate: Substrate) -> str:
    """How the substrate's codebook sizes were chosen, in words (as its fit recorded it)."""
    return substrate.training.get("codebook_rule") or f"{'/'.join(map(str, substrate.sizes))} codewords"


def _no_documents(results) -> HermesError:
    rejected = sum(r.n_rejects for r in results)
    if rejected:
        return HermesError(f"no document could be read: all {rejected} records were rejected",
                           hint="see the reasons in rejects/*.parquet; check --text-field and the input format")
    return HermesError("the corpus is empty: no records were found in " +
                       ", ".join(r.shard.path for r in results[:3]), hint="check the input paths")


def static_encoder(shards: list[Shard], cfg: Config, layout: Layout, quiet: bool = True) -> Path:
    """The static encoder a run with `encoder: static` embeds with: `--model` itself when it is a
    saved static encoder; else the one this output folder already holds for the same teacher,
    sample size, seed and corpus (OUT/encoder, or the substrate's copy); else one built now from the
    teacher on a seeded sample of `encoder_docs` documents of the corpus (one reading pass)."""
    from hermes.read import read_shard
    from hermes.static import Reservoir

    found = existing_static_encoder(shards, cfg, layout, quiet)
    if found is not None:
        return found
    sample = Reservoir(cfg.encoder_docs, cfg.seed)
    for shard in shards:
        for docs, _ in read_shard(shard, reading_fields(cfg), cfg.read_batch_size):
            sample.add(docs.column("text"))
    return build_static_encoder(sample, shards, cfg, layout, quiet)


def existing_static_encoder(shards: list[Shard], cfg: Config, layout: Layout, quiet: bool = True) -> Path | None:
    """`--model` when it is a saved static encoder, or the one this output folder holds for the
    same teacher, sample size, seed and corpus; None if a new one must be built (the teacher is
    checked first, so a missing one fails before the corpus is read)."""
    from hermes.embed import resolve_model
    from hermes.static import read_manifest

    if is_static_encoder(cfg.model):
        return Path(cfg.model)
    resolve_model(cfg.model)
    recipe = _encoder_recipe(shards, cfg)
    for folder in (layout.encoder, layout.substrate / "encoder"):
        if is_static_encoder(folder) and {k: read_manifest(folder).get(k) for k in recipe} == recipe:
            if folder != layout.encoder:
                with replacing(layout.encoder) as (tmp,):
                    shutil.copytree(folder, tmp)
            say(f"encoder: reusing the static encoder in {folder} (same teacher, sample and corpus)", quiet)
            return layout.encoder
    return None


def build_static_encoder(sample, shards: list[Shard], cfg: Config, layout: Layout, quiet: bool = True) -> Path:
    """A static encoder built from the teacher on `sample` (hermes.static.Reservoir, fed the whole
    corpus) into OUT/encoder."""
    from hermes.embed import Embedder
    from hermes.static import build

    if sample.seen < cfg.encoder_docs:
        say(f"encoder: the corpus has {sample.seen:,} documents, fewer than encoder_docs ({cfg.encoder_docs:,}): "
            f"the static encoder is built on all of them", quiet)
    if not sample.texts:
        raise HermesError("no document could be read to build the static encoder from",
                          hint="check the input paths and --text-field")
    teacher = Embedder(model=cfg.model, dtype=cfg.dtype, device=cfg.device, max_length=cfg.max_length,
                       batch_size=cfg.batch_size)
    layout.root.mkdir(parents=True, exist_ok=True)
    return build(teacher, sample.texts, layout.encoder, {**_encoder_recipe(shards, cfg), "docs": len(sample.texts)},
                 say=lambda m: say(m, quiet))


def _encoder_recipe(shards: list[Shard], cfg: Config) -> dict[str, Any]:
    """What decides a static encoder built for this corpus (a folder with the same is reused)."""
    from hermes.embed import resolve_device, resolve_dtype

    return {"teacher": cfg.model, "teacher_max_length": cfg.max_length,
            "teacher_dtype": resolve_dtype(cfg.dtype, resolve_device(cfg.device)), "docs_requested": cfg.encoder_docs,
            "seed": cfg.seed, "text_field": cfg.text_field, "corpus": [[s.key, s.stat()] for s in shards]}


def _embed_and_fit(inputs, out, cfg: Config, quiet: bool, engine: str = "local", address: str | None = None):
    """Embed every shard (into the cache), then fit the substrate on a sample: the first half of
    `run` (and `fit`'s fallback when its static encoder refuses too many candidates). With
    `encoder: static`, the static encoder is built (or found) first."""
    t0 = time.perf_counter()
    inputs, shards = _plan(inputs, cfg)
    layout = Layout(Path(out))
    models = Models(cfg)
    models.quality_scorer          # a bad quality or taxonomy model fails here, before anything is written
    models.fixed.setup()
    timings = {}
    encoder_folder = None
    if cfg.encoder == "static" or is_static_encoder(cfg.model):
        _static_model_check(cfg)
        encoder_folder = static_encoder(shards, cfg, layout, quiet)
        models.use_static(encoder_folder)
        timings["encoder"] = time.perf_counter() - t0
    results = run_step(engine, "embed", shards, cfg, layout, "embed", models=models, address=address, quiet=quiet,
                       static_encoder=str(Path(encoder_folder).resolve()) if encoder_folder else None)
    timings["embed"] = time.perf_counter() - t0 - timings.get("encoder", 0.0)
    counts = [r.n_docs for r in results]
    if sum(counts) == 0:
        raise _no_documents(results)
    t = time.perf_counter()
    substrate = fit_substrate(shards, counts, models, layout, progress_note=None if quiet else say)
    timings["fit"] = time.perf_counter() - t
    return inputs, shards, layout, models, results, substrate, timings


def fit(inputs: Iterable[str | Path] | None, out: str | Path, *, config: Config | str | Path | None = None,
        quiet: bool = False, **settings: Any) -> dict[str, Any]:
    """Fit a substrate on a sample of the corpus; writes OUT/substrate. The corpus is read once,
    to draw the sample (and, for a static encoder, the encoder's own sample too), and only the
    sample is embedded.
    `settings`: any config key (configs/default.yaml), e.g. `fit_sample=100_000, stages=[...]`."""
    from hermes.fit import fit_sample_only

    t0 = time.perf_counter()
    cfg = _config(config, settings)
    if cfg.encoder == "static" or is_static_encoder(cfg.model):
        layout, substrate, documents, rejected = _fit_static(inputs, out, cfg, quiet)
    else:
        _, shards = _plan(inputs, cfg)
        layout = Layout(Path(out))
        models = Models(cfg)
        models.fixed.setup()           # a bad taxonomy model fails here, before the corpus is read
        substrate, counts, rejected = fit_sample_only(shards, models, layout, progress_note=None if quiet else say)
        documents = sum(counts)
    return {"command": "fit", "out": str(layout.root), "substrate": str(layout.substrate),
            "fingerprint": substrate.fingerprint, "fit_sample_size": substrate.fit_sample_size,
            "codebook_sizes": substrate.quantizer.sizes_, "codebook_rule": codebook_rule(substrate),
            "stages": _stack_text(substrate),
            "embedding": substrate.embedding, "documents": documents,
            "rejected": rejected, "seconds": round(time.perf_counter() - t0, 2)}


def _fit_static(inputs, out, cfg: Config, quiet: bool) -> tuple[Layout, Substrate, int, int]:
    """`fit` with a static encoder: one reading pass feeds both the encoder's sample (unless
    --model gives an encoder or OUT holds one) and the fit sample's candidates; the encoder is
    built; only the candidates are embedded, and those it refuses take no part, as in `run`. If
    it refuses more of them than the margin kept, every document is embedded to draw the sample,
    as `run` does. Returns (layout, substrate, documents, records rejected while reading)."""
    import numpy as np

    from hermes.fit import check_enough, fit_on, read_sample, refusal_margin
    from hermes.static import Reservoir

    _static_model_check(cfg)
    inputs, shards = _plan(inputs, cfg)
    layout = Layout(Path(out))
    models = Models(cfg)
    models.fixed.setup()           # a bad taxonomy model fails here, before the corpus is read
    had_encoder = layout.encoder.exists()
    folder = existing_static_encoder(shards, cfg, layout, quiet)
    built = folder is None
    encoder_sample = Reservoir(cfg.encoder_docs, cfg.seed) if built else None

    def refusals(texts):
        nonlocal folder
        if folder is None:
            folder = build_static_encoder(encoder_sample, shards, cfg, layout, quiet)
        models.use_static(folder)
        say(f"fit: embedding the sample's {len(texts):,} candidates only", quiet)
        vectors, _, ok = models.embedder.encode_counted(texts)
        return vectors.astype(np.float16).astype(np.float32), ok      # as the embedding cache holds them

    sample = read_sample(shards, models, margin=refusal_margin(cfg.fit_sample),
                         also=encoder_sample.add if built else None, refusals=refusals)
    if not sample.exact:
        say("fit: the static encoder refuses more of the sample's candidates than were kept in reserve: every "
            "document is embedded to draw the sample", quiet)
        _, shards, layout, _, _, substrate, _ = _embed_and_fit(inputs, out, cfg, quiet)
        markers = [read_marker(layout.emb_marker(s)) for s in shards]
        read = sum(m["n_read"] for m in markers)      # as the one pass counts: the refused ones are documents read
        return layout, substrate, read, sum(m["n_rejects"] - (m["n_read"] - m["n_docs"]) for m in markers)
    if len(sample.positions) < min(2, cfg.fit_sample):     # the sample is every document the encoder takes
        check_enough(len(sample.positions), "have a token the static encoder knows")
    total = int(sum(sample.counts))
    substrate = fit_on(sample.vectors, sample.codes, sample.classes, total, models, layout,
                       None if quiet else say)
    if not had_encoder:
        shutil.rmtree(layout.encoder, ignore_errors=True)     # the substrate holds its copy (and a run reuses it)
    return layout, substrate, total, sample.rejected


def _static_model_check(cfg: Config) -> None:
    if cfg.encoder != "static" and is_static_encoder(cfg.model):
        raise HermesError(f"{cfg.model}: --model is a static encoder, but encoder = transformer (field 'encoder')",
                          hint="pass --encoder static, or a transformer folder to --model")


def _finish(command: str, inputs: list[str], shards: list[Shard], substrate: Substrate, layout: Layout,
            cfg: Config, t0: float, timings: dict[str, float], append: list[str] | None = None) -> dict[str, Any]:
    """Build the store from the shards' label files (all labeled by now) and summarise the run.
    `append`: the label files (names) the store in OUT holds already; the shards' files are added
    to it instead, and no file of an earlier shard is removed."""
    t = time.perf_counter()
    rejects = [layout.reject_file(s) for s in shards] + \
        [layout.unknown_file(s) for s in shards if layout.unknown_file(s).is_file()]
    info = {"command": command, "inputs": inputs, **_store_settings(cfg), "stages": _stack_text(substrate)}
    if getattr(substrate, "static", False):
        substrate.embedder().release()            # its piece tables: labeling is over
    give_back_memory()                            # what labeling freed goes back before the store is built
    if append is not None:
        before = store_counts(layout.db)
        held_inputs = list(store_info(layout.db).get("inputs") or [])
        info["inputs"] = held_inputs + [i for i in inputs if i not in held_inputs]
        terms = [layout.root / "terms" / name for name in append] + [layout.terms_file(s) for s in shards]
        counts = append_store(layout.db, layout.labels, [layout.label_file(s) for s in shards], rejects,
                              substrate.manifest(), info, terms) if shards else store_counts(layout.db)
    else:
        counts = build_store(layout.db, [layout.label_file(s) for s in shards], rejects, substrate.manifest(),
                             info=info, term_files=[layout.terms_file(s) for s in shards])
        # files of shards no longer in the input, once the store no longer names them (a build
        # that fails keeps the previous store, and so the files an append to it reads)
        current = {layout.label_file(s).name for s in shards}
        for folder in (layout.labels, layout.root / "terms"):
            for stale in folder.glob("*.parquet"):
                if stale.name not in current:
                    stale.unlink()
    timings["store"] = time.perf_counter() - t
    if not cfg.keep_embeddings and layout.embeddings.is_dir() and not any(layout.embeddings.iterdir()):
        layout.embeddings.rmdir()
    if not cfg.keep_embeddings and (layout.substrate / "encoder").is_dir():
        shutil.rmtree(layout.encoder, ignore_errors=True)     # the substrate holds its copy
    seconds = time.perf_counter() - t0
    read = counts["labeled"] + counts["rejected"]
    appended = None
    if append is not None:      # this run's share of the store
        appended = {"shards": len(shards), "labeled": counts["labeled"] - before["labeled"],
                    "rejected": counts["rejected"] - before["rejected"]}
        read = appended["labeled"] + appended["rejected"]
    db = str(layout.db)
    return {**({"appended": appended} if appended else {}),
        "command": command, "out": str(layout.root), "shards": len(shards),
        "read": read, "labeled": counts["labeled"], "rejected": counts["rejected"],
        "reject_reasons": counts["reject_reasons"], "cells": counts["cells"],
        "codebook_sizes": substrate.sizes, "stages": _stack_text(substrate),
        "codebook_rule": codebook_rule(substrate) if substrate.kind == "embedding" else
        f"distilled {substrate.student} labeler of substrate {substrate.recorded['teacher']} "
        f"({'/'.join(map(str, substrate.sizes))} classes)",
        "fit_sample_size": substrate.fit_sample_size, "substrate": substrate.fingerprint,
        "embedding": substrate.embedding or {"model": "none (distilled)", "dtype": "-", "max_length": "-"},
        "seconds": round(seconds, 2),
        "docs_per_s": round(read / seconds, 1) if seconds else None,
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "outputs": {"store": db, "substrate": str(layout.substrate), "labels": str(layout.labels),
                    **({"embeddings": str(layout.embeddings)} if cfg.keep_embeddings else {})},
        "next": [f"hermes cells --db {db} --level 1",
                 f"hermes sql \"SELECT cell, n_docs, share_tokens FROM cells_l12 ORDER BY n_docs DESC LIMIT 10\" --db {db}",
                 f"hermes sql \"SELECT reason, count(*) FROM rejects GROUP BY reason\" --db {db}"],
    }


def _stack_text(substrate) -> str:
    """`source (7 classes), learned (76), learned (76)`: each stage and its codewords."""
    from hermes.stack import stage_text

    return ", ".join(f"{stage_text(st)} ({k}{' classes' if 'classes' in st else ''})"
                     for st, k in zip(substrate.stages, substrate.sizes))


def _check_stack(sub: Substrate, cfg: Config) -> None:
    """A substrate's fixed stages must label this corpus as they labeled the one it was fitted on."""
    from hermes.files import sha256

    for i in sub.fixed:
        stage = sub.stages[i]
        if stage["kind"] == "source" and stage["source_field"] != cfg.source_field:
            raise HermesError(f"stage {i + 1} of the substrate labels by source field '{stage['source_field']}', "
                              f"but this run reads the source from '{cfg.source_field}' (field 'source_field')",
                              hint=f"pass --source-field {stage['source_field']}")
        if stage["kind"] == "fasttext":
            model = Path(stage["model"])
            if not model.is_file():
                raise HermesError(f"{model}: the taxonomy model of stage {i + 1} of the substrate is missing",
                                  hint="put the model back where it was fitted, or refit the substrate")
            if sha256(model) != stage["model_sha256"]:
                raise HermesError(f"{model}: the taxonomy model of stage {i + 1} changed since the substrate was "
                                  f"fitted (sha256 differs)", hint="restore that model, or refit the substrate")


def _check_encoder(sub: Substrate, overrides: dict[str, Any], path) -> None:
    """A label run embeds with its substrate's encoder: asking for another one is refused, since its
    labels would not be comparable with the substrate's (the store holds one substrate's labels)."""
    if getattr(sub, "kind", "") != "embedding":
        return
    has = "static" if sub.static else "transformer"
    want = overrides.get("encoder")
    if want is not None and want != has:
        raise HermesError(f"{path}: the substrate embeds with the {has} encoder, not {want} (field 'encoder')",
                          hint="label with the substrate's own encoder (drop the setting), or fit a new substrate")
    model = overrides.get("model")
    if model is not None and model != (str(sub.encoder_dir) if sub.static else sub.embedding.get("model")):
        raise HermesError(f"{path}: the substrate embeds with {sub.embedding.get('model')}, not {model} (field 'model')",
                          hint="label with the substrate's own encoder (drop the setting), or fit a new substrate")


def run(inputs: Iterable[str | Path] | None = None, out: str | Path = "hermes-out", *,
        config: Config | str | Path | None = None, quiet: bool = False, engine: str = "local",
        address: str | None = None, **settings: Any) -> dict[str, Any]:
    """The main job: embed every document once, fit a substrate on a sample, label all, build the store.
    `settings`: any config key (configs/default.yaml), e.g. `max_length=128, quality="none"`; they
    override `config` (a file, a packaged config's name, or a Config), which overrides the defaults.
    `engine="ray"` embeds and labels the shards on Ray Data (`address` of a cluster, or local); the
    substrate is fitted and the store built here."""
    t0 = time.perf_counter()
    cfg = _config(config, settings)
    inputs, shards, layout, models, _, substrate, timings = _embed_and_fit(inputs, out, cfg, quiet, engine, address)
    t = time.perf_counter()
    run_step(engine, "quantize", shards, cfg, layout, "label", models=models, substrate=substrate, address=address,
             quiet=quiet)
    timings["quantize"] = time.perf_counter() - t
    return _finish("run", inputs, shards, substrate, layout, cfg, t0, timings)


def label(inputs: Iterable[str | Path], substrate: str | Path, out: str | Path, *,
          config: Config | str | Path | None = None, quiet: bool = False, engine: str = "local",
          address: str | None = None, append: bool = False, **settings: Any) -> dict[str, Any]:
    """Label a corpus with an existing substrate. Resumable: shards already labeled are skipped.
    `engine="ray"` runs the same per-shard function on Ray Data (`address` of a cluster, or local).
    `append=True` adds the shards to the store already in `out` (same substrate) instead of
    rebuilding it from these shards alone; shards it holds already are left as they are.
    `settings`: reading and quality config keys (what the substrate fixes is its own)."""
    t0 = time.perf_counter()
    if isinstance(config, (str, Path)):
        refuse_fit_keys(config)
    fixed_by_substrate = [k for k, v in settings.items() if k in FIT_KEYS and k not in ("encoder", "model")
                          and v is not None]
    if fixed_by_substrate:
        raise HermesError(f"{', '.join(fixed_by_substrate)}: settings of `hermes fit`; a label run uses its "
                          f"substrate's", hint="drop them, or fit a new substrate with them")
    cfg = _config(config, settings)
    sub = load_labeler(substrate)
    if getattr(sub, "static", False):
        sub.embedder().setup()      # a damaged or swapped encoder fails here, before anything is written
    _check_stack(sub, cfg)
    _check_encoder(sub, settings, substrate)
    inputs, shards = _plan(inputs, cfg)
    layout = Layout(Path(out))
    if append and layout.db.is_file():
        fold_wal(layout.db)          # an earlier append that found no room for its checkpoint
    held = _held_shards(layout, sub, shards, cfg) if append and layout.db.is_file() else None
    if append and held is None:
        _no_store_to_append_to(layout, shards)
    if held is not None:
        shards = [s for s in shards if layout.label_file(s).name not in held]
        if not shards:          # appended already (a rerun): the store as it is
            say(f"hermes label: every input shard is in {layout.db} already; nothing to append", quiet)
            return _finish("label", inputs, [], sub, layout, cfg, t0, {}, append=held)
    if Path(substrate).resolve() != layout.substrate.resolve():
        with replacing(layout.substrate) as (tmp,):
            shutil.copytree(substrate, tmp)
    models = models_for(cfg, sub)
    models.quality_scorer
    models.fixed.setup()
    # one shard at a time: embed, quantize, drop its cached embeddings (unless kept), so the disk
    # holds at most one shard's embeddings and a relaunch redoes only unfinished shards
    results = run_step(engine, "label", shards, cfg, layout, "embed+label", models=models, substrate=sub,
                       address=address, quiet=quiet)
    timings = {"embed": time.perf_counter() - t0}
    done = [r for r in results if not r.skipped]
    if done and len(done) == len(shards) and sum(r.n_docs for r in done) == 0:
        raise _no_documents(done)
    return _finish("label", inputs, shards, sub, layout, cfg, t0, timings, append=held)


def _no_store_to_append_to(layout: Layout, shards: list[Shard]) -> None:
    """--append where OUT has no store yet: the first append builds it, unless label files of other
    shards are there (a store lost or never built): those would not be in it."""
    mine = {layout.label_file(s).name for s in shards}
    others = sorted(p.name for p in layout.labels.glob("*.parquet") if p.name not in mine) \
        if layout.labels.is_dir() else []
    if others:
        raise HermesError(f"{layout.db}: no store to append to, but {layout.labels} holds {len(others)} label "
                          f"file(s) of other shards ({others[0]}, ...)",
                          hint="rerun the command that labeled them to rebuild the store, then append; or use "
                               "another --out")


APPEND_KEYS = ("quality", "quality_field", "quality_model", "quality_label", "tokenizer", "fields")


def _store_settings(cfg: Config) -> dict[str, Any]:
    """The settings of a label run that its store records (table store_info)."""
    return {"quality": cfg.quality, "quality_field": cfg.quality_field,
            "quality_model": cfg.quality_model if cfg.quality == "fasttext" else None,
            "quality_label": cfg.quality_label if cfg.quality == "fasttext" else None,
            "tokenizer": cfg.tokenizer or "the embedding model's",
            "fields": {"text": cfg.text_field, "id": cfg.id_field, "source": cfg.source_field}}


def _loaded(value: Any) -> Any:
    """A store_info value as it was given (the table keeps non-strings as JSON)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _held_shards(layout: Layout, sub, shards: list[Shard], cfg: Config) -> list[str]:
    """The label files the store in OUT holds, checked for an append: the same substrate, the same
    reading and quality settings, and no input shard that is in the store but changed since it
    was labeled."""
    found = store_fingerprint(layout.db)
    if found != sub.fingerprint:
        raise HermesError(f"{layout.db}: the store holds labels of substrate {found}; --append with substrate "
                          f"{sub.fingerprint} is refused (field 'substrate')",
                          hint="append with the store's own substrate, or label into another --out")
    info = store_info(layout.db)
    mine = _store_settings(cfg)
    for key in APPEND_KEYS:
        if key in info and _loaded(info[key]) != mine[key]:
            raise HermesError(f"{layout.db}: the store was labeled with {key} {_loaded(info[key])!r}; this --append "
                              f"would add rows made with {mine[key]!r} (field '{key}')",
                              hint="append with the store's settings, or relabel everything without --append")
    held = store_shards(layout.db)
    if held is None:
        raise HermesError(f"{layout.db}: this store does not record its label files, so it cannot be appended to",
                          hint="label once without --append to rebuild it; later appends then work")
    for shard in shards:
        if layout.label_file(shard).name in held:
            marker = read_marker(layout.label_marker(shard)) or {}
            if marker.get("shard") != shard.stat():
                raise HermesError(f"{shard.path}: in the store already, and changed since it was labeled",
                                  hint="relabel the whole store without --append")
    return held


def query(db: str | Path, sql: str) -> pa.Table:
    """One read-only SQL statement against a store."""
    return _query(db, sql)


def cells(db: str | Path, level: int = 1, limit: int | None = None) -> pa.Table:
    """The group-by view of one granularity (1 = L1, 2 = L12, 3 = L123), with each cell's terms."""
    if level not in LEVELS:
        raise HermesError(f"level {level} is not 1, 2 or 3")
    sql = (f"SELECT v.*, t.terms FROM cells_{view_suffix(level)} v "
           f"LEFT JOIN cell_terms t ON t.level = {level} AND t.cell = v.cell")
    sql += f" ORDER BY n_docs DESC LIMIT {int(limit)}" if limit is not None else " ORDER BY " + \
        ", ".join(f"v.c{i + 1}" for i in range(level))
    return _query(db, sql)


# ------------------------------------------------------------------------------ mixing

def mix(db: str | Path, out: str | Path, level: int = 1, rule: str = "natural", to_level: int | None = None,
        sampler: str = "proportional", eligible: str = "all", budget_tokens: int | None = None, seed: int = 0,
        max_epochs: float | None = None) -> dict[str, Any]:
    """One mixture: Stage-1 rule at `level`, Stage-2 sampler down to `to_level`, drawn with `seed`.
    Writes the mixture folder `out` and returns its description (spec, diagnostics, warnings).
    Made cell by cell from the store (hermes.streaming): memory is set by the largest cell."""
    from hermes import mixture, streaming
    from hermes.mixers import MixSpec

    spec = MixSpec(level=level, rule=rule, to_level=to_level, sampler=sampler, eligible=eligible,
                   budget_tokens=budget_tokens, seed=seed, max_epochs=max_epochs).validate()
    result, fp = streaming.build_and_write(db, spec, out)
    return {**mixture.describe(result, db, fp), "out": str(out)}


def compare(db: str | Path, levels: Iterable[int] = LEVELS, rules: Iterable[str] = ("natural", "uniform"),
            samplers: Iterable[str] = ("proportional", "equal"), eligible: Iterable[str] = ("all",),
            level: int = 1, budget_tokens: int | None = None, seed: int = 0, max_epochs: float | None = None,
            out: str | Path | None = None) -> dict[str, Any]:
    """A grid of mixtures (Stage-2 levels x rules x samplers x eligibility, Stage 1 at `level`):
    one row of diagnostics per mixture, plus pairwise TV at L1 and Jaccard of selected documents.
    With `out`, each mixture's folder is written under it, with compare.json beside them."""
    import json
    import shutil
    import tempfile

    import numpy as np

    from hermes import streaming
    from hermes.mixers import MixSpec

    levels = list(levels)
    bad = [m for m in levels if m not in LEVELS]
    if bad:
        raise HermesError(f"--levels {bad[0]} is not a level; levels are 1 (L1), 2 (L12), 3 (L123)")
    specs = [MixSpec(level=level, rule=r, to_level=m, sampler=s, eligible=e, budget_tokens=budget_tokens,
                     seed=seed, max_epochs=max_epochs).validate()
             for m in levels for r in rules for s in samplers for e in eligible]
    if not specs:
        raise HermesError("the grid is empty", hint="give at least one of each: --levels, --rules, --samplers, --eligible")
    rows, l1_dists, picked = [], [], []
    fp = None
    with tempfile.TemporaryDirectory(prefix="hermes-compare-") as work:
        for k, spec in enumerate(specs):      # each one cell by cell (hermes.streaming), its repeats kept on disk
            picked.append(Path(work) / f"repeats-{k}.parquet")
            folder = Path(out) / spec.name() if out is not None else Path(work) / f"mixture-{k}"
            m, fp = streaming.build_and_write(db, spec, folder, keep_repeats=picked[-1])
            if out is None:
                shutil.rmtree(folder)
            d = m.diagnostics
            row = {"mixture": spec.name(), "level": spec.level, "rule": spec.rule, "to_level": spec.draw_level,
                   "sampler": spec.sampler, "eligible": spec.eligible, "unique_docs": d["unique_docs"],
                   "selected_tokens": d["selected_tokens"]}
            for name, lv in d["levels"].items():
                row[f"eff_cells_{name}"] = lv["effective_cells"]
                row[f"tv_{name}"] = lv["tv_to_natural"]
                row[f"kl_{name}"] = lv["kl_to_natural"]
                row[f"covered_{name}"] = lv["cells_covered"]
            row.update({"pool_median": d["pool"]["median_eligible_docs"], "pool_p10": d["pool"]["p10_eligible_docs"],
                        "pool_share_under_30": d["pool"]["share_cells_under_30"], "max_epochs": d["epochs"]["max"],
                        "share_tokens_repeated": d["epochs"]["share_tokens_repeated"],
                        "mean_quality": d["mean_quality"], "warnings": len(m.warnings)})
            rows.append(row)
            dist = m.masses[1][1]
            l1_dists.append(dist / dist.sum())
        pairs = []
        for i in range(len(specs)):
            for j in range(i + 1, len(specs)):
                inter, union = streaming.shared_documents(picked[i], picked[j])
                pairs.append({"a": rows[i]["mixture"], "b": rows[j]["mixture"],
                              "tv_L1": round(0.5 * float(np.abs(l1_dists[i] - l1_dists[j]).sum()), 4),
                              "jaccard_docs": round(inter / union, 4) if union else 1.0})
    result = {"store": str(Path(db).resolve()), "substrate": fp, "mixtures": rows, "pairs": pairs}
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def export(mixture: str | Path, fmt: str, out: str | Path, corpus: Iterable[str | Path] | None = None,
           docs_per_shard: int = 50_000, seed: int | None = None) -> dict[str, Any]:
    """A mixture folder in a trainer's input format: jsonl | parquet | hf | megatron."""
    from hermes.export import export as _export

    return _export(mixture, fmt, out, [str(c) for c in corpus] if corpus else None, docs_per_shard, seed)


def propose(db: str | Path, out: str | Path, n: int = 32, level: int = 1, seed: int = 0) -> dict[str, Any]:
    """N candidate weightings of the level-L cells for proxy runs (weights files under OUT/candidates)."""
    from hermes import mixture, proxy
    from hermes.mixers import check_levels

    check_levels(level, level)
    con_cells = cells(db, level)
    from hermes.store import connect

    con = connect(db)
    try:
        fp = mixture.store_substrate(con)
    finally:
        con.close()
    return proxy.propose(con_cells.column("cell").to_pylist(),
                         con_cells.column("n_tokens").to_numpy().astype(float), n, Path(out), level, seed,
                         store=str(db), substrate=fp)


def optimize(candidates: str | Path | None, losses: str | Path, out: str | Path, model: str = "ridge",
             n_search: int = 100_000, seed: int = 0, *, weights: str | Path | None = None,
             target: str | None = None, run_column: str | None = None, rank: str | Path | None = None,
             rank_out: str | Path | None = None, rank_losses: str | Path | None = None) -> dict[str, Any]:
    """Fit loss ~ weights on proxy runs, search the simplex, write the predicted-best weights file.

    The runs are a `propose` folder (`candidates`) with its losses.csv, or two tables: `weights`
    (a run id column, then one weight column per domain or cell) and `losses`, joined on the run
    id (`run_column`, default the first column), minimising the loss column `target`. `rank`
    (mixtures in the same columns) is scored into `rank_out` (run,predicted_loss, best first);
    with `rank_losses` (their measured losses) the report gives the held-out Spearman."""
    from hermes import proxy

    if (candidates is None) == (weights is None):
        raise HermesError("give either --candidates DIR (a propose folder) or --weights FILE (a weights table)")
    if weights is not None and not target:
        raise HermesError("--weights needs --target, the loss column to minimise",
                          hint="e.g. --target metric/the_pile_pile_cc_val_loss")
    if (rank is None) != (rank_out is None):
        raise HermesError("--rank and --rank-out go together: the mixtures to rank and the file to write")
    if rank_losses is not None and rank is None:
        raise HermesError("--rank-losses needs --rank: the measured losses of the ranked mixtures")
    if candidates is not None:
        mix, y, meta = proxy.candidate_runs(Path(candidates), Path(losses))
        center, level, target = meta["natural"], meta["level"], target or "loss"
    else:
        mix, y = proxy.table_runs(Path(weights), Path(losses), target, run_column)
        center, level = None, None
    ranking = (Path(rank), Path(rank_out), Path(rank_losses) if rank_losses else None, target,
               run_column) if rank else None
    return proxy.optimize(mix, y, Path(out), center=center, model=model, n_search=n_search, seed=seed,
                          level=level, rank_mixtures=ranking)


def evaluate(db: str | Path, gold: Iterable[str] | None = None, sample: int = 20_000, seed: int = 0,
             corpus: Iterable[str | Path] | None = None, substrate: str | Path | None = None,
             quiet: bool = True) -> dict[str, Any]:
    """Clustering metrics per level for the store's code, plain RVQ and flat k-means on the same
    embeddings; with gold fields, NMI/ARI/homogeneity/completeness/purity against each."""
    from hermes.evaluate import evaluate as _evaluate

    return _evaluate(db, list(gold or []), sample, seed, [str(c) for c in corpus] if corpus else None, substrate,
                     progress=None if quiet else say)


def report(db: str | Path, out: str | Path, mixtures: Iterable[str | Path] = (),
           corpus: Iterable[str | Path] | None = None) -> dict[str, Any]:
    """A self-contained HTML report of the store (and of the given mixture folders)."""
    from hermes.report import report as _report

    return _report(db, out, list(mixtures), [str(c) for c in corpus] if corpus else None)


def train_quality(positive: Iterable[str | Path], negative: Iterable[str | Path], out: str | Path,
                  **settings: Any) -> dict[str, Any]:
    """Train a fastText quality classifier (positive vs negative corpora); writes OUT/model.bin and
    OUT/card.json with held-out precision, recall and AUC."""
    from hermes.fasttext_quality import train_quality as _train

    return _train([str(p) for p in positive], [str(n) for n in negative], out, **settings)


def distill(db: str | Path, out: str | Path, corpus: Iterable[str | Path] | None = None, sample: int = 200_000,
            holdout: float = 0.1, epochs: int | None = None, student: str = "linear", seed: int = 0,
            substrate: str | Path | None = None, max_system: int | None = None,
            quiet: bool = True) -> dict[str, Any]:
    """Train a student that predicts the store's code from text (`linear`: the teacher's tokens in
    its window, mapped by ridge regression into the teacher's transformed space and quantized by
    the teacher's codebooks; `fasttext`:
    classifiers for c1, L12 and L123), saved as a substrate of kind `distilled` for `hermes label`,
    with held-out agreement per level. `max_system` bounds the linear student's ridge system (memory
    8 max_system^2 bytes; default 40,000)."""
    from hermes.distill import distill as _distill

    return _distill(db, out, [str(c) for c in corpus] if corpus else None, sample=sample, holdout=holdout,
                    epochs=epochs, student=student, seed=seed, substrate=substrate, max_system=max_system,
                    progress=None if quiet else say)