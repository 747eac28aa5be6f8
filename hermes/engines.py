"""Engines: where the per-shard function runs. `local` is a loop in this process (hermes.api);
`ray` hands the same function to Ray Data, one task per shard, on a cluster (`address`) or on
this machine. Workers write their label files next to each other; this process then builds the
store from them, as it does after a local run."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from hermes.config import Config
from hermes.errors import HermesError
from hermes.pipeline import Layout, ShardResult
from hermes.progress import say
from hermes.read import Shard


class _ShardLabeler:
    """A Ray Data actor: loads the substrate and the models once, then labels shard after shard."""

    def __init__(self, config: dict, root: str):
        from hermes.distill import load_labeler
        from hermes.pipeline import stages_for

        self.layout = Layout(Path(root))
        self.substrate = load_labeler(self.layout.substrate)
        self.stages = stages_for(Config(**config), self.substrate)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        from hermes.pipeline import label_one_shard

        docs, rejects, skipped = [], [], []
        for text in batch["shard"]:
            r = label_one_shard(Shard(**json.loads(str(text))), self.substrate, self.stages, self.layout)
            docs.append(r.n_docs)
            rejects.append(r.n_rejects)
            skipped.append(r.skipped)
        return {"shard": batch["shard"], "docs": np.array(docs), "rejects": np.array(rejects),
                "skipped": np.array(skipped)}


def run_on_ray(shards: list[Shard], cfg: Config, layout: Layout, address: str | None = None,
               quiet: bool = False) -> list[ShardResult]:
    try:
        import ray
    except ImportError:
        raise HermesError("--engine ray needs Ray", hint="pip install 'hermes-coarse2fine[ray]' (or 'ray[data]')") from None
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(include_dashboard=False, log_to_driver=False)
    say(f"ray: {len(shards)} shards on {ray.cluster_resources().get('CPU', 0):g} CPUs", quiet)
    workers = max(1, min(len(shards), int(ray.cluster_resources().get("CPU", 1)) // 2 or 1))
    ds = ray.data.from_items([{"shard": json.dumps(asdict(s))} for s in shards])
    out = ds.map_batches(_ShardLabeler, fn_constructor_kwargs={"config": cfg.to_dict(), "root": str(layout.root)},
                         batch_size=1, batch_format="numpy", concurrency=workers, num_cpus=1).take_all()
    by_name = {json.loads(str(r["shard"]))["name"]: r for r in out}
    return [ShardResult(s, int(by_name[s.name]["docs"]), int(by_name[s.name]["rejects"]), bool(by_name[s.name]["skipped"]))
            for s in shards]
