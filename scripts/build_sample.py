"""Build the sample corpus bundled with hermes from the 20 Newsgroups dev corpus.

Draws the same number of documents from every newsgroup (the corpus's finest gold
group), with a fixed seed, and writes them gzip-compressed into the package together
with a provenance record (input files and their sha256, seed, counts, output sha256).

    python scripts/build_sample.py --dev-corpus ../shared/data/dev-corpus --per-group 150
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import random
from collections import defaultdict
from pathlib import Path

PACKAGE_DATA = Path(__file__).resolve().parents[1] / "hermes" / "data"
KEEP = ("id", "source", "title", "text", "labels", "leaf")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dev-corpus", type=Path, default=Path("../shared/data/dev-corpus"))
    ap.add_argument("--per-group", type=int, default=150)
    ap.add_argument("--seed", type=int, default=20260101)
    ap.add_argument("--out", type=Path, default=PACKAGE_DATA / "sample.jsonl.gz")
    args = ap.parse_args()

    inputs = [args.dev_corpus / "train.jsonl", args.dev_corpus / "test.jsonl"]
    by_group: dict[str, list[dict]] = defaultdict(list)
    for path in inputs:
        with open(path, encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                by_group[rec["leaf"]].append({k: rec[k] for k in KEEP})

    rng = random.Random(args.seed)
    picked: list[dict] = []
    for group in sorted(by_group):
        docs = by_group[group]
        picked.extend(rng.sample(docs, min(args.per_group, len(docs))))
    rng.shuffle(picked)

    buf = io.BytesIO()
    # mtime=0 keeps the compressed bytes reproducible.
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=9) as gz:
        for rec in picked:
            gz.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(buf.getvalue())

    counts: dict[str, int] = defaultdict(int)
    for rec in picked:
        counts[rec["leaf"]] += 1
    provenance = {
        "what": "sample corpus bundled with hermes: documents drawn evenly across the 20 newsgroups",
        "dataset": "20 Newsgroups, 20news-bydate (train and test splits), as prepared in the dev corpus",
        "built_by": "scripts/build_sample.py",
        "inputs": {p.name: sha256(p) for p in inputs},
        "seed": args.seed,
        "per_group": args.per_group,
        "n_documents": len(picked),
        "n_chars": sum(len(r["text"]) for r in picked),
        "fields": list(KEEP),
        "per_group_counts": dict(sorted(counts.items())),
        "output": args.out.name,
        "output_sha256": sha256(args.out),
        "license": "no explicit license; research and development use only (see the dev corpus README)",
    }
    (args.out.parent / "sample.provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    print(json.dumps({k: provenance[k] for k in ("n_documents", "n_chars", "output_sha256")}))


if __name__ == "__main__":
    main()
