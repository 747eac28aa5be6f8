"""Engines: where a per-shard step runs. `run_local` loops in this process; `run_on_ray` hands the
same step to Ray Data, one task per shard, on a cluster (`address`) or on this machine. Workers
write their outputs (embedding caches, label files) into the shared output folder; this process
then goes on from them (fits the substrate, builds the store) as it does after a local run.

A step is named, so that a Ray worker can build it where it runs (`ShardStep`):
- `embed`: read, count and embed a shard into the cache (the first half of `hermes run`);
- `quantize`: a shard's cached embeddings to its label file, then drop the cache unless kept (the
  second half of `hermes run`, once the substrate is fitted);
- `label`: the whole of `hermes label` for a shard, with the substrate in the output folder.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from hermes.config import Config
from hermes.errors import HermesError
from hermes.layout import Layout, ShardResult
from hermes.models import Models
from hermes.progress import Progress, say
from hermes.read import Shard

ENGINES = ("local", "ray")
STEPS = ("embed", "quantize", "label")


class ShardStep:
    """One named step over shards, with the models it needs loaded once. In this process it can
    reuse the Models already loaded (`models`); a Ray worker builds them from the config."""

    def __init__(self, step: str, config: dict, root: str, static_encoder: str | None = None,
                 models: Models | None = None, substrate=None):
        from hermes.distilled import load_labeler
        from hermes.models import models_for

        if step not in STEPS:
            raise HermesError(f"unknown step '{step}'", hint=f"valid steps: {', '.join(STEPS)}")
        self.step, self.cfg, self.layout = step, Config(**config), Layout(Path(root))
        self.substrate = None if step == "embed" else substrate or load_labeler(self.layout.substrate)
        if models is not None:
            self.models = models
        elif step == "embed":
            self.models = Models(self.cfg)
            if static_encoder:
                self.models.use_static(Path(static_encoder))
        else:
            self.models = models_for(self.cfg, self.substrate)

    def __call__(self, shard: Shard, progress: Progress | None = None) -> ShardResult:
        from hermes.layout import drop_cached_embeddings
        from hermes.pipeline import embed_shard, label_one_shard, quantize_shard

        if self.step == "embed":
            return embed_shard(shard, self.models, self.layout, progress)
        if self.step == "quantize":
            result = quantize_shard(shard, self.substrate, self.models, self.layout, progress)
            if not self.cfg.keep_embeddings:
                drop_cached_embeddings(shard, self.layout)
            return result
        return label_one_shard(shard, self.substrate, self.models, self.layout, progress)


def run_local(step: Callable[[Shard, Progress | None], ShardResult], shards: list[Shard], title: str,
              quiet: bool = False) -> list[ShardResult]:
    """The step over the shards, one after the other, with a progress line."""
    progress = Progress(title, total_shards=len(shards), quiet=quiet)
    results = [step(shard, progress) for shard in shards]
    progress.close()
    return results


class _RayWorker:
    """A Ray Data actor: builds the step once, then runs it shard after shard."""

    def __init__(self, **step_args):
        import ray

        from hermes import layout

        layout.WORKER["node"] = ray.get_runtime_context().get_node_id()     # in run.log's lines
        self.step = ShardStep(**step_args)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        docs, rejects, skipped = [], [], []
        for text in batch["shard"]:
            r = self.step(Shard(**json.loads(str(text))))
            docs.append(r.n_docs)
            rejects.append(r.n_rejects)
            skipped.append(r.skipped)
        return {"shard": batch["shard"], "docs": np.array(docs), "rejects": np.array(rejects),
                "skipped": np.array(skipped)}


def collect(shards: list[Shard], rows: list[dict]) -> list[ShardResult]:
    """Ray's output rows back in the order of `shards`, matched by each shard's key (the parts of a
    split file share a name, not a key)."""
    by_key = {Shard(**json.loads(str(r["shard"]))).key: r for r in rows}
    missing = [s.key for s in shards if s.key not in by_key]
    if missing:
        raise HermesError(f"ray returned no result for shard {missing[0]}", hint="rerun: finished shards are skipped")
    return [ShardResult(s, int(by_key[s.key]["docs"]), int(by_key[s.key]["rejects"]), bool(by_key[s.key]["skipped"]))
            for s in shards]


def run_on_ray(step: str, shards: list[Shard], cfg: Config, layout: Layout, address: str | None = None,
               quiet: bool = False, static_encoder: str | None = None) -> list[ShardResult]:
    try:
        import ray
    except ImportError:
        raise HermesError("--engine ray needs Ray", hint="pip install 'hermes-coarse2fine[ray]' (or 'ray[data]')") from None
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:       # a new Ray on this machine, never a cluster that `ray start` once recorded in /tmp/ray
            ray.init(address="local", include_dashboard=False, log_to_driver=False)
    cpus = ray.cluster_resources().get("CPU", 1)
    say(f"ray: {step} {len(shards)} shards on {cpus:g} CPUs", quiet)
    workers = max(1, min(len(shards), int(cpus) // 2 or 1))
    ds = ray.data.from_items([{"shard": json.dumps(asdict(s))} for s in shards])
    step_args = {"step": step, "config": cfg.to_dict(), "root": str(layout.root.resolve()),
                 "static_encoder": static_encoder}
    # Ray prints a dead worker's error on stdout; it goes to stderr, so that stdout holds only what
    # hermes prints (a --format json summary stays one JSON document). A dead worker is replaced
    # and its shard done again from the start (the per-shard function writes beside, then renames).
    with contextlib.redirect_stdout(sys.stderr):
        rows = ds.map_batches(_RayWorker, fn_constructor_kwargs=step_args, batch_size=1, batch_format="numpy",
                              concurrency=workers, num_cpus=1).take_all()
    return collect(shards, rows)


def run_step(engine: str, step: str, shards: list[Shard], cfg: Config, layout: Layout, title: str,
             models: Models | None = None, substrate=None, address: str | None = None, quiet: bool = False,
             static_encoder: str | None = None) -> list[ShardResult]:
    """A step over every shard on `engine`; locally it reuses `models` and `substrate` (loaded
    already), on Ray each worker loads its own from `layout` and the config."""
    if engine == "ray":
        return run_on_ray(step, shards, cfg, layout, address=address, quiet=quiet, static_encoder=static_encoder)
    if engine != "local":
        raise HermesError(f"unknown engine '{engine}'", hint=f"valid engines: {', '.join(ENGINES)}")
    if address:
        raise HermesError("--address is the address of a Ray cluster: it needs --engine ray")
    runner = ShardStep(step, cfg.to_dict(), str(layout.root), static_encoder, models=models, substrate=substrate)
    return run_local(runner, shards, title, quiet)
