"""Benchmark labeling: throughput against the bare encoder, and peak memory against corpus size.

Part 1, throughput (the real packaged model): N documents of the bundled sample in 4 JSONL shards.
In one run, on the same documents, model, dtype, max length and batch size:
- `bare_encoder`: SentenceTransformer.encode over the texts (model load timed separately);
- `hermes_label`: `hermes.label` end to end with a substrate fitted on the same documents
  (reading, token counts, quality, embedding, transform + quantization, term counts, label files,
  store), model load included.
ratio = hermes docs/s / bare encoder docs/s (with and without the bare encoder's load time).

Part 2, memory: `hermes label` in a fresh process on 20k and 200k documents (the sample repeated
with new ids, 10 shards) and its peak RSS (os.wait4). So that 200k documents fit in minutes on a
CPU, this part uses a tiny local sentence-transformers encoder (1 layer, width 64, random
weights, the real model's tokenizer): memory use of the pipeline is what is measured, not the
encoder's. Prints JSON.

    python scripts/bench_label.py --docs 2000 --memory-sizes 20000,200000
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def sample_records() -> list[dict]:
    from hermes.api import sample_corpus

    with gzip.open(sample_corpus(), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def write_shards(records: list[dict], folder: Path, shards: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-len(records) // shards)
    for i in range(shards):
        with open(folder / f"part-{i:03d}.jsonl", "w", encoding="utf-8") as f:
            for r in records[i * per:(i + 1) * per]:
                f.write(json.dumps({"id": r["id"], "text": r["text"]}) + "\n")
    return folder


def throughput(n_docs: int, work: Path, batch_size: int, max_length: int) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer

    from hermes import api
    from hermes.embed import resolve_dtype, resolve_model

    records = sample_records()
    records = (records * (n_docs // len(records) + 1))[:n_docs]
    records = [{"id": f"{r['id']}#{i}", "text": r["text"]} for i, r in enumerate(records)]
    corpus = write_shards(records, work / "corpus", 4)
    texts = [r["text"] for r in records]
    dtype = resolve_dtype("auto", "cpu")
    over = {"encoder": "transformer", "max_length": max_length, "batch_size": batch_size, "dtype": dtype}
    api.fit([corpus], out=work / "fitted", quiet=True, **over)

    t = time.perf_counter()
    st = SentenceTransformer(str(resolve_model("all-MiniLM-L6-v2")), device="cpu",
                             model_kwargs={"dtype": torch.bfloat16 if dtype == "bf16" else torch.float32})
    st.max_seq_length = max_length
    load = time.perf_counter() - t
    t = time.perf_counter()
    st.encode(texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False)
    encode = time.perf_counter() - t
    del st

    t = time.perf_counter()
    summary = api.label([corpus], substrate=work / "fitted" / "substrate", out=work / "labeled",
                        batch_size=batch_size, quiet=True)
    hermes_s = time.perf_counter() - t
    bare = n_docs / encode
    return {"docs": n_docs, "model": "all-MiniLM-L6-v2", "dtype": dtype, "max_length": max_length,
            "batch_size": batch_size, "bare_encoder_docs_per_s": round(bare, 2),
            "bare_encoder_load_s": round(load, 2),
            "hermes_label_docs_per_s": round(n_docs / hermes_s, 2), "hermes_label_s": round(hermes_s, 2),
            "hermes_timings_s": summary["timings"],
            "ratio": round((n_docs / hermes_s) / bare, 3),
            "ratio_bare_with_load": round((n_docs / hermes_s) / (n_docs / (encode + load)), 3)}


def tiny_encoder(folder: Path) -> Path:
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    from hermes.embed import resolve_model

    tok = AutoTokenizer.from_pretrained(str(resolve_model("all-MiniLM-L6-v2")))
    torch.manual_seed(0)
    hf = folder / "hf"
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=128, max_position_embeddings=512)).save_pretrained(hf)
    tok.save_pretrained(hf)
    word = models.Transformer(str(hf), max_seq_length=64)
    st = SentenceTransformer(modules=[word, models.Pooling(word.get_word_embedding_dimension(), "mean")])
    st.save(str(folder / "st"))
    return folder / "st"


def peak_rss(args: list[str]) -> tuple[float, float]:
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "hermes", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"hermes {' '.join(args)} failed: {proc.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - t


def memory(sizes: list[int], work: Path) -> list[dict]:
    model = tiny_encoder(work / "tiny")
    base = sample_records()
    out = []
    fitted = None
    for n in sizes:
        records = [{"id": f"{base[i % len(base)]['id']}#{i}", "text": base[i % len(base)]["text"]} for i in range(n)]
        corpus = write_shards(records, work / f"corpus-{n}", 10)
        if fitted is None:
            fitted = work / "tiny-fit"
            subprocess.run([sys.executable, "-m", "hermes", "fit", str(corpus), "--out", str(fitted), "--model",
                            str(model), "--encoder", "transformer", "--quiet", "--fit-sample", "20000"], check=True)
        rss, secs = peak_rss(["label", str(corpus), "--substrate", str(fitted / "substrate"),
                              "--out", str(work / f"labeled-{n}"), "--quiet"])
        out.append({"docs": n, "peak_rss_mb": round(rss, 1), "seconds": round(secs, 1)})
        print(json.dumps(out[-1]), file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--memory-sizes", default="20000,200000")
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        result = {"throughput": throughput(args.docs, work, args.batch_size, args.max_length)}
        print(json.dumps(result["throughput"]), file=sys.stderr, flush=True)
        if not args.skip_memory:
            mem = memory([int(s) for s in args.memory_sizes.split(",")], work)
            result["memory"] = {"encoder": "tiny local encoder (1 layer, width 64); see the docstring",
                                "runs": mem, "rss_ratio_largest_to_smallest":
                                round(mem[-1]["peak_rss_mb"] / mem[0]["peak_rss_mb"], 3)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
