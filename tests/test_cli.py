"""The command line: the main job end to end, misuse paths, help, README."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import duckdb
import pytest

from hermes.cli import app
from tests.conftest import FAST, invoke, write_jsonl

README = Path(__file__).resolve().parents[1] / "README.md"
COMMANDS = sorted(c.name or c.callback.__name__ for c in app.registered_commands)


def test_run_summary_reports_what_it_did(e2e):
    s = e2e["summary"]
    assert s["labeled"] == 300 and s["rejected"] == 7
    assert s["reject_reasons"]["duplicate doc_id"] == 1 and s["reject_reasons"]["invalid JSON"] == 1
    con = duckdb.connect(str(e2e["db"]), read_only=True)
    distinct = [con.execute(f"SELECT count(DISTINCT ({cols})) FROM labels").fetchall()[0][0]
                for cols in ("c1", "c1, c2", "c1, c2, c3")]
    con.close()
    assert s["cells"] == dict(zip(("l1", "l12", "l123"), distinct))          # the summary counts the store's cells
    assert s["codebook_sizes"] == [7, 4, 4] and s["codebook_rule"] == "7/4/4 codewords (codebook_sizes)"
    for path in s["outputs"].values():
        assert Path(path).exists()
    assert not (e2e["out"] / "embeddings").exists()        # dropped unless --keep-embeddings


def test_cells_json_prints_the_level_table(e2e):
    r = invoke("cells", "--db", e2e["db"], "--level", "2", "--format", "json")
    assert r.exit_code == 0
    table = json.loads(r.stdout)
    con = duckdb.connect(str(e2e["db"]), read_only=True)
    assert len(table) == con.execute("SELECT count(*) FROM cells_l12").fetchall()[0][0]
    con.close()
    assert {"c1", "c2", "cell", "parent", "n_docs", "share_docs", "n_children"} <= set(table[0])


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_sql_formats(e2e, fmt):
    r = invoke("sql", "SELECT level, count(*) AS n FROM cells GROUP BY level ORDER BY level", "--db", e2e["db"],
               "--format", fmt)
    assert r.exit_code == 0
    assert "level" in r.stdout and len(r.stdout.strip().splitlines()) >= 3


def test_sql_refuses_writes_with_exit_1(e2e):
    r = invoke("sql", "DELETE FROM labels", "--db", e2e["db"])
    assert r.exit_code == 1
    assert r.stderr.startswith("Error: refused") and "DELETE" in r.stderr
    assert "Traceback" not in r.output


def test_label_with_the_substrate_reproduces_the_codes_and_resumes(e2e, tmp_path):
    out = tmp_path / "relabel"
    corpus = e2e["corpus"] / "b.jsonl"
    r = invoke("label", corpus, "--substrate", e2e["out"] / "substrate", "--out", out, "--format", "json", "--quiet")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["substrate"] == e2e["summary"]["substrate"]
    con = duckdb.connect(str(out / "labels.duckdb"), read_only=True)
    mine = dict((d, (a, b, c)) for d, a, b, c in con.execute("SELECT doc_id, c1, c2, c3 FROM labels").fetchall())
    con.close()
    con = duckdb.connect(str(e2e["db"]), read_only=True)
    theirs = dict((d, (a, b, c)) for d, a, b, c in con.execute("SELECT doc_id, c1, c2, c3 FROM labels").fetchall())
    con.close()
    assert mine and all(theirs[d] == codes for d, codes in mine.items())
    # a second run finds the shard done and does not redo it
    marker = next((out / "labels" / "_done").glob("*.json"))
    before = marker.stat().st_mtime_ns
    r = invoke("label", corpus, "--substrate", e2e["out"] / "substrate", "--out", out, "--quiet")
    assert r.exit_code == 0 and marker.stat().st_mtime_ns == before


def test_label_refuses_a_config_that_sets_fit_settings(e2e, tmp_path):
    cfg = tmp_path / "label.yaml"
    cfg.write_text("quality: heuristic\nseed: 3\nstages: [learned, learned, learned]\n")
    r = invoke("label", e2e["corpus"], "--substrate", e2e["out"] / "substrate", "--out", tmp_path / "o",
               "--config", cfg, "--quiet")
    assert r.exit_code == 1
    assert "label.yaml: seed, stages are settings of `hermes fit`; a label run uses its substrate's" in r.stderr
    assert not (tmp_path / "o").exists()
    cfg.write_text("quality: heuristic\n")                    # reading and quality settings are the label run's
    r = invoke("label", e2e["corpus"], "--substrate", e2e["out"] / "substrate", "--out", tmp_path / "o",
               "--config", cfg, "--quiet")
    assert r.exit_code == 0, r.output


def test_label_refuses_a_damaged_substrate(e2e, tmp_path):
    bad = tmp_path / "substrate"
    shutil.copytree(e2e["out"] / "substrate", bad)
    (bad / "codebook_3.npy").unlink()
    r = invoke("label", e2e["corpus"] / "b.jsonl", "--substrate", bad, "--out", tmp_path / "o")
    assert r.exit_code == 1
    assert "codebook_3.npy" in r.stderr and "hermes fit" in r.stderr
    assert not (tmp_path / "o" / "labels.duckdb").exists()


@pytest.mark.parametrize("case", ["missing", "unknown-format", "empty", "no-text-field", "all-rejected"])
def test_bad_corpora_fail_with_one_line_and_write_no_store(tmp_path, case):
    if case == "missing":
        target, expect = tmp_path / "nope.jsonl", "nope.jsonl: no such file"
    elif case == "unknown-format":
        target = tmp_path / "corpus.xml"
        target.write_text("<doc/>")
        expect = "corpus.xml: unknown corpus format"
    elif case == "empty":
        target = write_jsonl(tmp_path / "empty.jsonl", [])
        expect = "corpus is empty"
    elif case == "no-text-field":
        target = write_jsonl(tmp_path / "c.jsonl", [{"id": 1, "body": "some words here"}])
        expect = "no record has the text field 'text' (fields found: id, body)"
    else:
        target = write_jsonl(tmp_path / "c.jsonl", [{"id": 1, "text": " "}, {"id": 2, "text": 3}])
        expect = "all 2 records were rejected"
    out = tmp_path / "out"
    r = invoke("run", target, "--out", out, *FAST)
    assert r.exit_code == 1, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expect in lines[0], r.stderr
    assert "Traceback" not in r.output
    assert not (out / "labels.duckdb").exists()


def test_a_failed_rebuild_keeps_the_previous_store(e2e, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(e2e["out"], out)
    before = (out / "labels.duckdb").read_bytes()
    r = invoke("run", tmp_path / "missing.jsonl", "--out", out, *FAST)
    assert r.exit_code == 1
    assert (out / "labels.duckdb").read_bytes() == before


@pytest.mark.parametrize("args, code, message", [
    (["cells", "--db", "x.duckdb", "--level", "4"], 2, "'4' is not one of"),
    (["sql", "SELECT 1", "--db", "missing.duckdb"], 1, "missing.duckdb: no such store"),
    (["run", "--config", "missing.yaml"], 1, "missing.yaml: config file not found"),
    (["run", "--dtype", "fp8"], 1, "dtype = 'fp8' is not one of"),
    (["label", "x.jsonl"], 2, "Missing option"),
    (["frobnicate"], 2, "No such command"),
])
def test_misuse_exit_codes_and_messages(tmp_path, monkeypatch, args, code, message):
    monkeypatch.chdir(tmp_path)
    r = invoke(*args)
    assert r.exit_code == code, r.output
    assert message in r.stderr
    assert "Traceback" not in r.output


def test_debug_shows_the_traceback(tmp_path):
    from hermes.errors import HermesError

    with pytest.raises(HermesError):
        invoke("--debug", "run", tmp_path / "missing.jsonl", "--out", tmp_path / "o")
    from hermes import console

    console.STATE["debug"] = False


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example_and_is_in_the_readme(command):
    r = invoke(command, "--help")
    assert r.exit_code == 0
    assert "Example: hermes " + command in r.stdout
    assert re.search(rf"`hermes {command}\b", README.read_text()), f"hermes {command} missing from README"


def test_top_level_help_lists_the_commands():
    r = invoke("--help")
    assert r.exit_code == 0 and all(c in r.stdout for c in COMMANDS)


def test_ci_runs_the_readme_test_command_word_for_word():
    blocks = re.findall(r"```bash\n(.*?)\n```", README.read_text(), re.S)
    main_job, tests = blocks[0].strip(), blocks[1].strip()
    assert "hermes run" in main_job and "pytest" in tests
    ci = (README.parent / ".ci" / "run").read_text()
    assert tests in ci.splitlines()


def test_every_function_the_python_quickstart_calls_is_in_the_hermes_module():
    import hermes

    quickstart = README.read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    code = "\n".join(re.findall(r"```python\n(.*?)\n```", quickstart, re.S))
    called = set(re.findall(r"\bhermes\.(\w+)\(", code))
    assert called and not {name for name in called if not callable(getattr(hermes, name, None))}


def test_fit_picks_codebook_sizes_by_the_rule_and_says_why(sample_records, tmp_path):
    from hermes.rvq import plan_codebook_sizes

    corpus = write_jsonl(tmp_path / "c.jsonl", sample_records[:300])
    r = invoke("fit", corpus, "--out", tmp_path / "f", "--format", "json", "--max-length", "128", "--encoder",
               "transformer")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    sizes, why = plan_codebook_sizes(300, 300)
    assert s["codebook_sizes"] == sizes == [2, 2, 7] and s["codebook_rule"] == why
    assert f"fit: {why}" in r.stderr                                   # printed before the fit
    r = invoke("fit", corpus, "--out", tmp_path / "f", "--format", "json", "--codebook-sizes", "3,2,4", "-q",
               "--encoder", "transformer")
    assert json.loads(r.stdout)["codebook_sizes"] == [3, 2, 4]         # the flag overrides the rule
    r = invoke("fit", corpus, "--out", tmp_path / "f", "--codebook-sizes", "3,x,4")
    assert r.exit_code == 1 and "--codebook-sizes 3,x,4: 'x' is not an integer" in r.stderr


def test_the_python_api_takes_settings_as_keyword_arguments(e2e, tmp_path):
    from hermes import api
    from hermes.errors import HermesError

    with pytest.raises(HermesError, match=r"settings: unknown config key\(s\): max_lenght"):
        api.run([e2e["corpus"]], out=tmp_path / "o", max_lenght=64)
    with pytest.raises(HermesError, match="seed: settings of `hermes fit`; a label run uses its substrate's"):
        api.label([e2e["corpus"]], substrate=e2e["out"] / "substrate", out=tmp_path / "l", seed=3)
    # a quality model implies the fasttext quality source in the API too, not only on the command line
    from hermes.config import load_config

    assert load_config(overrides={"quality_model": "m.bin"}).quality == "fasttext"
    assert load_config(overrides={"quality_field": "meta.q"}).quality == "field"
    assert not (tmp_path / "o").exists() and not (tmp_path / "l").exists()


def test_progress_and_notes_go_to_stderr_unless_quiet(e2e, tmp_path):
    """Without --quiet: the per-step progress (documents, shards) on stderr, the summary alone on stdout."""
    corpus = write_jsonl(tmp_path / "c.jsonl", e2e["records"][:40])
    r = invoke("label", corpus, "--substrate", e2e["out"] / "substrate", "--out", tmp_path / "o", "--format", "json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["labeled"] == 40                            # stdout is the summary only
    assert "embed+label: 40 docs" in r.stderr and "shards 1/1" in r.stderr
    r = invoke("label", corpus, "--substrate", e2e["out"] / "substrate", "--out", tmp_path / "q", "--quiet")
    assert r.exit_code == 0 and r.stderr == ""


def test_reading_flags_reach_the_store(e2e, tmp_path):
    """--id-field, --quality-field and --tokenizer through the command line."""
    from hermes.embed import resolve_model

    recs = [{"key": f"k{i}", "score": i / 10, "text": r["text"]} for i, r in enumerate(e2e["records"][:10])]
    corpus = write_jsonl(tmp_path / "c.jsonl", recs)
    r = invoke("label", corpus, "--substrate", e2e["out"] / "substrate", "--out", tmp_path / "o", "--id-field", "key",
               "--quality-field", "score", "--tokenizer", resolve_model("all-MiniLM-L6-v2"), "--quiet")
    assert r.exit_code == 0, r.output
    con = duckdb.connect(str(tmp_path / "o" / "labels.duckdb"), read_only=True)
    rows = con.execute("SELECT doc_id, quality FROM labels ORDER BY doc_id").fetchall()
    info = dict(con.execute("SELECT key, value FROM store_info").fetchall())
    con.close()
    assert rows == sorted((r["key"], r["score"]) for r in recs)
    assert info["quality"] == "field" and info["tokenizer"] == str(resolve_model("all-MiniLM-L6-v2"))


def test_label_redoes_a_shard_whose_input_or_settings_changed(e2e, tmp_path):
    """A rerun skips an unchanged shard, redoes one whose file changed, and redoes all when a setting
    that changes the labels' columns (the quality source) changed."""
    for name in ("a", "b"):
        write_jsonl(tmp_path / "c" / f"{name}.jsonl", e2e["records"][:20] if name == "a" else e2e["records"][20:40])
    args = ["label", tmp_path / "c", "--substrate", e2e["out"] / "substrate", "--out", tmp_path / "o", "--quiet"]
    assert invoke(*args).exit_code == 0
    markers = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "o" / "labels" / "_done").glob("*.json")}
    write_jsonl(tmp_path / "c" / "b.jsonl", e2e["records"][20:45])                    # b gets 5 more records
    assert invoke(*args).exit_code == 0
    now = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "o" / "labels" / "_done").glob("*.json")}
    changed = sorted(k for k in now if now[k] != markers[k])
    assert len(changed) == 1 and "b.jsonl" in changed[0]
    con = duckdb.connect(str(tmp_path / "o" / "labels.duckdb"), read_only=True)
    assert con.execute("SELECT count(*) FROM labels").fetchall()[0][0] == 45
    con.close()
    assert invoke(*args, "--quality", "none").exit_code == 0                           # another quality source
    again = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "o" / "labels" / "_done").glob("*.json")}
    assert all(again[k] != now[k] for k in now)
    con = duckdb.connect(str(tmp_path / "o" / "labels.duckdb"), read_only=True)
    assert con.execute("SELECT count(*) FROM labels WHERE quality IS NOT NULL").fetchall()[0][0] == 0
    con.close()
