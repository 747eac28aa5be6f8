"""Benchmark the static encoder path: `hermes label` end to end against the bare tokenizer and the
transformer, on the dev corpus (20 Newsgroups, 18,814 documents), and its memory at scale.

In one run:
- `static_label`: `hermes label` in a fresh process with a static substrate (model load, reading,
  tokenizing, counts, quality, embedding, quantizing, term counts, label files and the store build
  included), for each size in --docs (the dev corpus repeated under new ids past 18,814), with its
  wall time and peak RSS (os.wait4), and the peaks of its labeling and of its store build apart
  (`peak_rss_mb_by_phase`, from the RSS sampled every 0.1 s);
- `tokenizer`: the bare tokenizer, `encode_batch` of the dev corpus's whole texts on every core;
- `transformer`: the transformer's `encode` (max length 256, dtype auto) of a seeded 2,000-document
  subset, the embedding alone (a lower bound of the transformer path's time);
- `parts`: the static path's per-document work on the dev corpus timed part by part in this
  process (reading, tokenizing + embedding with the words of the same split, quality, term
  counts, quantizing).
The static substrate is fitted once (`hermes fit --encoder static` on the train split, the
context pass included; timed as `fit`) unless --substrate gives one. Prints JSON.

    python scripts/bench_encoder.py
    python scripts/bench_encoder.py --docs 200000,1000000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dev-corpus"


def hermes_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "hermes", *map(str, args)]


def timed_process(cmd: list[str]) -> dict:
    """Run a command in a fresh process: wall seconds, peak RSS (MB, os.wait4), its JSON summary,
    and its RSS sampled every 0.1 s (`rss_trace`: (seconds, MB) pairs)."""
    import threading

    trace: list[tuple[float, float]] = []
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.1):
                try:
                    with open(f"/proc/{proc.pid}/status") as f:
                        mb = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))
                except (OSError, StopIteration):      # exited (or not Linux): the peak still comes from wait4
                    continue
                trace.append((time.perf_counter() - t0, mb))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        done.set()
        sampler.join()
        out.seek(0)
        err.seek(0)
        if os.waitstatus_to_exitcode(status):
            raise SystemExit(f"{' '.join(cmd)} failed:\n{err.read()[-2000:]}")
        return {"seconds": round(seconds, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
                "summary": json.loads(out.read()), "rss_trace": trace}


def phase_peaks(run: dict) -> dict:
    """Peak RSS (MB) of labeling and of the store build, from the sampled trace: the build is the
    last `timings.store` seconds before the process's exit (so the start of the build, where the
    RSS is low, may count as labeling by the time the process takes to exit)."""
    trace, store = run["rss_trace"], run["summary"]["timings"].get("store", 0.0)
    if not trace:
        return {}
    end = trace[-1][0]
    build = [mb for t, mb in trace if t >= end - store - 0.1]
    label = [mb for t, mb in trace if t < end - store - 0.1]
    return {"label": round(max(label, default=0.0)), "store_build": round(max(build, default=0.0))}


def read_dev(dev: Path) -> list[dict]:
    records = []
    for split in ("train", "test"):
        with open(dev / f"{split}.jsonl", encoding="utf-8") as f:
            records += [json.loads(line) for line in f]
    return records


def write_corpus(records: list[dict], n: int, path: Path) -> Path:
    """n documents: the records in order, repeated under new ids (`<id>#<k>`) past their number."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            r = records[i % len(records)]
            k = i // len(records)
            f.write(json.dumps({"id": r["id"] if k == 0 else f"{r['id']}#{k}", "text": r["text"]}) + "\n")
    return path


def tokenizer_rate(texts: list[str], encoder_dir: Path) -> dict:
    from tokenizers import Tokenizer

    from hermes.static import tokenizer_threads

    tok = Tokenizer.from_file(str(encoder_dir / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    with tokenizer_threads():
        t0 = time.perf_counter()
        enc = tok.encode_batch(texts, add_special_tokens=False)
        seconds = time.perf_counter() - t0
    return {"docs": len(texts), "tokens": sum(len(e) for e in enc), "seconds": round(seconds, 2),
            "docs_per_s": round(len(texts) / seconds, 1)}


def transformer_rate(texts: list[str], n: int, dtype: str = "auto") -> dict:
    import numpy as np

    from hermes.embed import Embedder

    pick = np.sort(np.random.default_rng(0).choice(len(texts), min(n, len(texts)), replace=False))
    subset = [texts[i] for i in pick]
    enc = Embedder(max_length=256, dtype=dtype).setup()
    t0 = time.perf_counter()
    enc.encode(subset)
    seconds = time.perf_counter() - t0
    return {"docs": len(subset), "dtype": enc.dtype_, "max_length": 256, "seconds": round(seconds, 2),
            "docs_per_s": round(len(subset) / seconds, 2)}


def parts(corpus: Path, substrate: Path) -> dict:
    """The static path's per-document work, part by part, on one pass over `corpus` (seconds)."""
    import numpy as np

    from hermes.config import load_config
    from hermes.models import reading_fields
    from hermes.quality import heuristic_scores
    from hermes.read import discover, read_shard
    from hermes.static import StaticEncoder
    from hermes.substrate import Substrate
    from hermes.terms import TermCounter
    from hermes.words import Words

    cfg = load_config()
    sub = Substrate.load(substrate)
    enc = StaticEncoder(sub.encoder_dir).setup()
    spent = dict.fromkeys(("read", "tokenize_embed", "words", "quality", "terms", "quantize"), 0.0)
    terms, n = TermCounter(), 0
    for shard in discover([str(corpus)]):
        it = read_shard(shard, reading_fields(cfg), cfg.read_batch_size)
        while True:
            t = time.perf_counter()
            try:
                docs, _ = next(it)
            except StopIteration:
                break
            texts = docs.column("text")
            spent["read"] += time.perf_counter() - t
            t = time.perf_counter()
            tokens = enc.tokenize(texts)
            emb, ok = enc.vectors(tokens)
            spent["tokenize_embed"] += time.perf_counter() - t
            t = time.perf_counter()
            words = Words.of_split(texts, tokens.pieces)   # the words of the same split, as labeling uses
            spent["words"] += time.perf_counter() - t
            t = time.perf_counter()
            heuristic_scores(texts, words)
            spent["quality"] += time.perf_counter() - t
            t = time.perf_counter()
            codes = sub.encode(emb.astype(np.float16).astype(np.float32))
            spent["quantize"] += time.perf_counter() - t
            t = time.perf_counter()
            terms.add(texts, codes, words)
            spent["terms"] += time.perf_counter() - t
            n += len(texts)
    t = time.perf_counter()
    terms.table()
    spent["terms"] += time.perf_counter() - t
    return {"docs": n, "seconds": {k: round(v, 2) for k, v in spent.items()},
            "docs_per_s": {k: round(n / v, 1) for k, v in spent.items() if v >= 0.005}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", default="18814", help="documents labeled, comma-separated sizes (default: the dev "
                                                    "corpus once, 18,814)")
    ap.add_argument("--dev-corpus", type=Path, default=DEV)
    ap.add_argument("--substrate", type=Path, help="a static substrate (default: fit one on the train split)")
    ap.add_argument("--transformer-docs", type=int, default=2000)
    ap.add_argument("--transformer-dtypes", default="auto", help="dtypes the transformer is timed in, e.g. "
                                                                  "auto,fp32 (default: auto, as `hermes run` uses)")
    ap.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.docs.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="hermes-bench-encoder-"))
    records = read_dev(args.dev_corpus)
    texts = [r["text"] for r in records]
    result: dict = {"dev_docs": len(records), "sizes": sizes}
    substrate = args.substrate
    if substrate is None:
        fit = timed_process(hermes_cmd("fit", args.dev_corpus / "train.jsonl", "--encoder", "static", "--out",
                                       work / "fit", "--quiet", "--format", "json"))
        substrate = work / "fit" / "substrate"
        result["fit"] = {"seconds": fit["seconds"], "peak_rss_mb": fit["peak_rss_mb"],
                         "fingerprint": fit["summary"]["fingerprint"]}
    labels = {}
    for n in sizes:
        corpus = write_corpus(records, n, work / f"corpus-{n}" / "docs.jsonl")
        run = timed_process(hermes_cmd("label", corpus.parent, "--substrate", substrate, "--out", work / f"label-{n}",
                                       "--quiet", "--format", "json"))
        s = run["summary"]
        labels[str(n)] = {"docs": s["read"], "labeled": s["labeled"], "rejected": s["rejected"],
                          "shards": s["shards"], "seconds": run["seconds"],
                          "docs_per_s": round(s["read"] / run["seconds"], 1), "peak_rss_mb": run["peak_rss_mb"],
                          "peak_rss_mb_by_phase": phase_peaks(run), "timings": s["timings"]}
        if n != sizes[-1] or args.work is None:
            import shutil

            shutil.rmtree(work / f"corpus-{n}", ignore_errors=True)
    result["static_label"] = labels
    result["tokenizer"] = tokenizer_rate(texts, Path(substrate) / "encoder")
    result["parts"] = parts(write_corpus(records, len(records), work / "corpus-parts" / "docs.jsonl"), substrate)
    dtypes = args.transformer_dtypes.split(",")
    result["transformer"] = transformer_rate(texts, args.transformer_docs, dtypes[0])
    first = labels[str(sizes[0])]["docs_per_s"]
    result["ratios"] = {"static_label_vs_tokenizer": round(first / result["tokenizer"]["docs_per_s"], 3),
                        "static_label_vs_transformer": round(first / result["transformer"]["docs_per_s"], 1)}
    for dtype in dtypes[1:]:
        result[f"transformer_{dtype}"] = transformer_rate(texts, args.transformer_docs, dtype)
        result["ratios"][f"static_label_vs_transformer_{dtype}"] = \
            round(first / result[f"transformer_{dtype}"]["docs_per_s"], 1)
    if len(sizes) > 1:      # peak RSS of the largest size against the next one down
        big, small = labels[str(sizes[-1])], labels[str(sizes[-2])]
        result["ratios"][f"peak_rss_{sizes[-1]}_vs_{sizes[-2]}"] = round(big["peak_rss_mb"] / small["peak_rss_mb"], 3)
        if big["peak_rss_mb_by_phase"].get("label") and small["peak_rss_mb_by_phase"].get("label"):
            result["ratios"][f"label_peak_rss_{sizes[-1]}_vs_{sizes[-2]}"] = round(
                big["peak_rss_mb_by_phase"]["label"] / small["peak_rss_mb_by_phase"]["label"], 3)
    print(json.dumps(result, indent=2))
    if args.work is None:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
