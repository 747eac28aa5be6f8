"""Make the report of the bundled sample shown in the README: scripts/report-sample.{html,png}.

Runs (or reuses) `hermes run` on the bundled sample, makes two mixtures (uniform at L1 down to
L12 with the quality top 30%, and natural), writes the report and a Chromium screenshot of it.

    python scripts/make_report_sample.py --work /tmp/hermes-sample
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

from hermes import api

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/hermes-sample"))
    args = ap.parse_args()
    out = args.work / "out"
    if not (out / "labels.duckdb").is_file():
        api.run(None, out=out)
    db = out / "labels.duckdb"
    mixes = [args.work / "uniform-l12-top30", args.work / "natural"]
    api.mix(db, mixes[0], rule="uniform", to_level=2, eligible="top:0.3")
    api.mix(db, mixes[1], rule="natural")
    html = HERE / "report-sample.html"
    api.report(db, html, mixes)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium is needed for the screenshot (apt-get install chromium)")
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={args.work / 'chromium'}", "--window-size=1400,1500",
                    "--virtual-time-budget=5000", f"--screenshot={HERE / 'report-sample.png'}", html.as_uri()],
                   check=True, capture_output=True)
    print(f"wrote {html} and {HERE / 'report-sample.png'}")


if __name__ == "__main__":
    main()
