"""Benchmark the distilled fast labeler against the embedding path it was distilled from.

Given a labeled store (its substrate beside it) and a distilled substrate (`hermes distill`), on
the same N documents, in one run:
- `embedding_path`: the encoder (model, dtype, max length of the substrate) + transform + RVQ;
- `distilled`: the student (linear: the teacher's tokenizer over its window, TF-IDF of tokens and
  of adjacent token pairs x W plus the static and context parts, then the teacher's codebooks,
  the stages after the first learned one from a second prediction; fasttext: three classifiers
  with hierarchical decoding);
docs/s of each (labeling compute only, the texts already in memory; model loads excluded), the
speed-up, and the agreement of the distilled codes with the embedding path's at L1, L12, L123.
The documents are the ones held out at distillation (holdout.json), so the agreement is held-out
agreement. Prints JSON.

    python scripts/bench_distill.py --db out/labels.duckdb --distilled fast --docs 2000
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", type=Path, required=True)
    ap.add_argument("--distilled", type=Path, required=True)
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    from hermes.read import lookup
    from hermes.store import connect, info_fields, store_info
    from hermes.substrate import Substrate

    teacher = Substrate.load(args.db.parent / "substrate")
    fast = Substrate.load(args.distilled).setup()
    holdout = args.distilled / "holdout.json"
    if holdout.is_file():
        ids = json.loads(holdout.read_text())[: args.docs]
    else:       # an older distilled substrate: any documents (some may have been trained on)
        con = connect(args.db)
        ids = [r[0] for r in con.execute("SELECT doc_id FROM labels ORDER BY hash(doc_id || ?) LIMIT ?",
                                         [str(args.seed), args.docs]).fetchall()]
        con.close()
    info = store_info(args.db)
    found = lookup(info["inputs"], info_fields(info), set(ids))
    ids = [d for d in ids if d in found]
    texts = [found[d]["text"] for d in ids]
    # a fixed stage (source, taxonomy) takes its code from the document on both paths (as stored)
    con = connect(args.db)
    stored = dict((r[0], r[1:]) for r in con.execute("SELECT doc_id, c1, c2, c3 FROM labels WHERE doc_id IN "
                                                     "(SELECT unnest(?))", [ids]).fetchall())
    con.close()
    codes_stored = np.array([stored[d] for d in ids], dtype=np.int64)
    fixed = {i: codes_stored[:, i] for i in teacher.fixed}
    enc = teacher.embedder().setup()
    enc.encode(texts[:16])
    t = time.perf_counter()
    emb = enc.encode(texts).astype(np.float16).astype(np.float32)
    codes_teacher = teacher.encode(emb, fixed=fixed)
    emb_s = time.perf_counter() - t
    fast_fixed = {i: fixed[i] for i in fast.fixed}
    fast.encode_texts(texts[:16], {i: c[:16] for i, c in fast_fixed.items()})
    t = time.perf_counter()
    codes_fast = fast.encode_texts(texts, fast_fixed)
    fast_s = time.perf_counter() - t
    n = len(texts)
    print(json.dumps({
        "docs": n, "held_out": holdout.is_file(), "teacher": teacher.fingerprint, "distilled": fast.fingerprint,
        "student": fast.student,
        "embedding_path_docs_per_s": round(n / emb_s, 1), "distilled_docs_per_s": round(n / fast_s, 1),
        "speedup": round(emb_s / fast_s, 1), "speedup_target_50x_met": emb_s / fast_s >= 50,
        "agreement": {name: round(float((codes_fast[:, :lv] == codes_teacher[:, :lv]).all(1).mean()), 4)
                      for lv, name in ((1, "L1"), (2, "L12"), (3, "L123"))},
        "agreement_target_0.8_at_L1_met": bool((codes_fast[:, 0] == codes_teacher[:, 0]).mean() >= 0.8),
        "agreement_recorded_at_distillation": fast.recorded["agreement"],
    }, indent=2))


if __name__ == "__main__":
    main()
