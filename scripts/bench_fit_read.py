"""Benchmark `hermes fit` with a static encoder: one reading pass that embeds only the fit sample's
candidates, against embedding every document first and then drawing the sample (what `run` does,
and what `fit` did before), on the dev corpus repeated to --docs documents under new ids.

Both run in fresh processes on the same corpus, with the same saved static encoder (--model, so no
teacher pass is timed), and must give the same substrate (fingerprint). Prints JSON: each one's
wall seconds and peak RSS, and the ratio.

    python scripts/bench_fit_read.py --encoder out/substrate/encoder --docs 200000 --fit-sample 20000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_encoder import DEV, read_dev, timed_process, write_corpus  # noqa: E402

EMBED_ALL = """
import json, sys
from hermes import api
from hermes.config import load_config
cfg = load_config(None, {{"encoder": "static", "model": {model!r}, "fit_sample": {fit_sample}}})
substrate = api._embed_and_fit([{corpus!r}], {out!r}, cfg, quiet=True)[5]
print(json.dumps({{"fingerprint": substrate.fingerprint}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", type=Path, required=True, help="a saved static encoder (a substrate's encoder/)")
    ap.add_argument("--docs", type=int, default=200_000)
    ap.add_argument("--fit-sample", type=int, default=20_000)
    ap.add_argument("--dev-corpus", type=Path, default=DEV)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = write_corpus(read_dev(args.dev_corpus), args.docs, work / "corpus" / "docs.jsonl")
        fit = timed_process([sys.executable, "-m", "hermes", "fit", str(corpus), "--out", str(work / "fit"),
                             "--encoder", "static", "--model", str(args.encoder), "--fit-sample",
                             str(args.fit_sample), "-q", "--format", "json"])
        embed_all = timed_process([sys.executable, "-c", EMBED_ALL.format(
            model=str(args.encoder), fit_sample=args.fit_sample, corpus=str(corpus), out=str(work / "all"))])
    same = fit["summary"]["fingerprint"] == embed_all["summary"]["fingerprint"]
    print(json.dumps({"docs": args.docs, "fit_sample": args.fit_sample,
                      "fit_read_once": {k: fit[k] for k in ("seconds", "peak_rss_mb")},
                      "embed_every_document": {k: embed_all[k] for k in ("seconds", "peak_rss_mb")},
                      "speedup": round(embed_all["seconds"] / fit["seconds"], 2), "same_substrate": same}, indent=1))
    if not same:
        raise SystemExit("the two substrates differ")


if __name__ == "__main__":
    main()
