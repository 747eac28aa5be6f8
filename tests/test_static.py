"""The static encoder: built from the real teacher on the corpus, saved in a format that
sentence-transformers loads, and used by `run`, `fit` and `label` (local and Ray)."""

from __future__ import annotations

import json
import shutil

import duckdb
import numpy as np
import pytest

from tests.conftest import invoke, write_jsonl

# Texts with no token the encoder knows: binary, and only the tokenizer's unknown and special tokens.
NO_TOKEN = [{"id": "binary", "text": "\x00\x01\x02\x03"}, {"id": "specials", "text": "[UNK] [CLS] [SEP]"}]
CODES = "SELECT doc_id, c1, c2, c3, n_tokens, n_chars, quality FROM labels ORDER BY doc_id"


@pytest.fixture(scope="session")
def static_run(tmp_path_factory, sample_records):
    """One real `hermes run --encoder static` on 300 real documents plus texts with no known token."""
    root = tmp_path_factory.mktemp("static")
    corpus = write_jsonl(root / "corpus" / "a.jsonl", sample_records + NO_TOKEN)
    out = root / "out"
    r = invoke("run", corpus, "--out", out, "--encoder", "static", "--max-length", "128", "--format", "json")
    assert r.exit_code == 0, r.output
    return {"root": root, "corpus": corpus, "out": out, "db": out / "labels.duckdb", "stderr": r.stderr,
            "summary": json.loads(r.stdout), "records": sample_records}


def _rows(db, sql=CODES):
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_a_small_corpus_builds_the_encoder_on_all_of_it_and_says_so(static_run):
    assert "fewer than encoder_docs (2,000)" in static_run["stderr"]
    m = json.loads((static_run["out"] / "substrate" / "encoder" / "hermes_encoder.json").read_text())
    assert m["docs"] == len(static_run["records"]) + len(NO_TOKEN) and m["docs_requested"] == 2000
    assert m["teacher"] == "all-MiniLM-L6-v2" and m["weighting"] == {"kind": "sif", "a": 1e-3,
                                                                     "counted_over": "the sample's whole texts"}
    assert not (static_run["out"] / "encoder").exists()      # the substrate holds the encoder


def test_the_saved_encoder_loads_in_plain_sentence_transformers_with_the_same_vectors(static_run):
    from sentence_transformers import SentenceTransformer

    from hermes.static import StaticEncoder

    folder = static_run["out"] / "substrate" / "encoder"
    texts = [r["text"] for r in static_run["records"][:50]]
    theirs = SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_numpy=True)
    mine = StaticEncoder(folder).encode(texts)
    np.testing.assert_allclose(mine, theirs, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(mine, axis=1), 1.0, atol=1e-5)


def test_a_document_vector_reads_the_whole_text(static_run):
    from hermes.static import StaticEncoder

    enc = StaticEncoder(static_run["out"] / "substrate" / "encoder")
    long = " ".join(r["text"] for r in static_run["records"][:20])
    head = enc.encode([long[:2000]])[0]
    whole = enc.encode([long])[0]
    assert enc.count([long])[0] > 1000 and float(head @ whole) < 0.999


def test_ids_the_sample_lacks_get_mapped_vectors(static_run):
    from hermes.static import StaticEncoder, context_vectors

    rng = np.random.default_rng(0)
    isolated = rng.normal(size=(50, 4))
    A, b = rng.normal(size=(4, 3)), rng.normal(size=3)
    counts = np.where(np.arange(50) < 30, 2.0, 0.0)            # ids 30..49 unseen
    truth = isolated @ A + b
    out = context_vectors(truth * counts[:, None], counts, isolated)
    np.testing.assert_allclose(out, truth, atol=1e-8)          # seen: their mean; unseen: the fitted map
    enc = StaticEncoder(static_run["out"] / "substrate" / "encoder").setup()
    seen = enc.manifest_["token_ids_seen"]
    assert seen < enc.manifest_["vocab"] - 1000 and enc.known_.sum() > seen + 1000


def test_run_then_label_give_identical_codes_and_counts(static_run, tmp_path):
    r = invoke("label", static_run["corpus"], "--substrate", static_run["out"] / "substrate", "--out", tmp_path / "l",
               "--quiet", "--format", "json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["substrate"] == static_run["summary"]["substrate"]
    mine, theirs = _rows(tmp_path / "l" / "labels.duckdb"), _rows(static_run["db"])
    assert mine == theirs and len(mine) == len(static_run["records"])
    # with --keep-embeddings the shard goes through the embedding cache instead: the same labels
    r = invoke("label", static_run["corpus"], "--substrate", static_run["out"] / "substrate", "--out", tmp_path / "k",
               "--quiet", "--keep-embeddings")
    assert r.exit_code == 0, r.output
    assert _rows(tmp_path / "k" / "labels.duckdb") == theirs


def test_n_tokens_come_from_the_same_tokenization_and_match_the_token_counter(static_run):
    from hermes.embed import Embedder, TokenCounter

    counts = dict(_rows(static_run["db"], "SELECT doc_id, n_tokens FROM labels"))
    ids = [r["id"] for r in static_run["records"]]
    expected = TokenCounter(Embedder().tokenizer_path).count([r["text"] for r in static_run["records"]])
    assert [counts[i] for i in ids] == expected.tolist()


def test_texts_with_no_known_token_go_to_rejects_not_to_labels(static_run):
    rejects = dict(_rows(static_run["db"], "SELECT doc_id, reason FROM rejects"))
    assert set(rejects) == {"binary", "specials"} and all("no token" in v for v in rejects.values())
    rows = _rows(static_run["db"], "SELECT count(*), count(*) FILTER (WHERE c1 IS NULL OR c2 IS NULL OR c3 IS NULL) "
                                   "FROM labels WHERE doc_id IN ('binary', 'specials')")
    assert rows == [(0, 0)]


def test_the_fingerprint_changes_with_the_encoder(static_run, e2e):
    from hermes.substrate import Substrate

    sub = Substrate.load(static_run["out"] / "substrate")
    assert sub.embedding["encoder"] == "static" and sub.fingerprint != e2e["summary"]["substrate"]
    before = sub.compute_fingerprint()
    assert before == sub.fingerprint
    sub.embedding = {**sub.embedding, "fingerprint": "0" * 16}
    assert sub.compute_fingerprint() != before


def test_a_saved_encoder_is_accepted_by_model_for_a_new_fit(static_run, tmp_path):
    encoder = static_run["out"] / "substrate" / "encoder"
    r = invoke("fit", static_run["corpus"], "--out", tmp_path / "f", "--encoder", "static", "--model", encoder,
               "--quiet", "--format", "json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["fingerprint"] == static_run["summary"]["substrate"]
    r = invoke("fit", static_run["corpus"], "--out", tmp_path / "g", "--model", encoder, "--encoder", "transformer",
               "--quiet")
    assert r.exit_code == 1 and "static encoder" in r.stderr and "--encoder static" in r.stderr


@pytest.mark.parametrize("damage", ["weights", "teacher", "missing"])
def test_a_damaged_or_swapped_encoder_is_refused_with_one_line(static_run, tmp_path, damage):
    sub = tmp_path / "substrate"
    shutil.copytree(static_run["out"] / "substrate", sub)
    enc = sub / "encoder"
    if damage == "weights":
        data = bytearray((enc / "model.safetensors").read_bytes())
        data[-8:] = b"\x00" * 8
        (enc / "model.safetensors").write_bytes(bytes(data))
    elif damage == "teacher":
        m = json.loads((enc / "hermes_encoder.json").read_text())
        (enc / "hermes_encoder.json").write_text(json.dumps({**m, "teacher": "another-model"}))
    else:
        shutil.rmtree(enc)
    out = tmp_path / "o"
    r = invoke("label", static_run["corpus"], "--substrate", static_run["out"] / "substrate", "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    before = _rows(out / "labels.duckdb")
    r = invoke("label", static_run["corpus"], "--substrate", sub, "--out", out)
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(enc) in lines[0], r.stderr
    assert {"weights": "damaged", "teacher": "another-model", "missing": "not found"}[damage] in lines[0]
    # nothing already written is lost: the store and the substrate's copy of the good encoder stay
    assert _rows(out / "labels.duckdb") == before
    from hermes.substrate import Substrate

    Substrate.load(out / "substrate").embedder().setup()


def test_a_label_run_with_another_encoder_is_refused(static_run, e2e, tmp_path):
    from hermes import api
    from hermes.errors import HermesError
    from hermes.substrate import Substrate

    with pytest.raises(HermesError, match="static encoder, not transformer"):
        api.label([static_run["corpus"]], substrate=static_run["out"] / "substrate", out=tmp_path / "o",
                  encoder="transformer", quiet=True)
    # refused before anything is written: an output labeled with the static substrate keeps it
    out = tmp_path / "kept"
    api.label([static_run["corpus"]], substrate=static_run["out"] / "substrate", out=out, quiet=True)
    with pytest.raises(HermesError, match="transformer encoder, not static"):
        api.label([static_run["corpus"]], substrate=e2e["out"] / "substrate", out=out,
                  encoder="static", quiet=True)
    assert Substrate.load(out / "substrate").fingerprint == static_run["summary"]["substrate"]


def test_ray_labels_a_static_substrate_like_the_local_engine(static_run, tmp_path):
    ray = pytest.importorskip("ray")
    for i in range(2):
        write_jsonl(tmp_path / "corpus" / f"p{i}.jsonl", static_run["records"][i * 40:(i + 1) * 40])
    outs = {}
    for engine in ("local", "ray"):
        r = invoke("label", tmp_path / "corpus", "--substrate", static_run["out"] / "substrate",
                   "--out", tmp_path / engine, "--engine", engine, "--quiet")
        assert r.exit_code == 0, r.output
        outs[engine] = _rows(tmp_path / engine / "labels.duckdb")
    ray.shutdown()
    assert outs["local"] == outs["ray"] and len(outs["local"]) == 80


def test_the_alignment_maps_static_vectors_onto_the_teachers_and_folds_into_the_rows():
    from hermes.static import _align, _bags

    rng = np.random.default_rng(0)
    vocab, dim = 400, 16
    rows = rng.normal(size=(vocab, dim))
    window = [list(rng.integers(0, vocab, rng.integers(5, 40))) for _ in range(300)]
    M = rng.normal(size=(dim, dim))
    S = np.asarray(_bags(window, vocab) @ rows)
    teacher = S @ M
    teacher /= np.linalg.norm(teacher, axis=1, keepdims=True)
    mapped, info = _align(rows, window, teacher)
    assert info["kind"] == "ridge" and info["cosine_before"] < 0.9 < 0.99 < info["cosine_after"]
    got = np.asarray(_bags(window, vocab) @ mapped)          # the map is in the rows: a plain mean of them
    got /= np.linalg.norm(got, axis=1, keepdims=True)
    assert float(np.mean(np.sum(got * teacher, axis=1))) > 0.99
    few, none = _align(rows, window[:20], teacher[:20])
    assert none["kind"] == "none" and few is rows


def test_the_alignment_learns_from_the_sample_texts_spans_too():
    from hermes.embed import Spans
    from hermes.static import _align, _bags
    from hermes.vectors import unit_rows

    rng = np.random.default_rng(1)
    vocab, dim = 400, 48
    rows = rng.normal(size=(vocab, dim))
    M = rng.normal(size=(dim, dim))

    def pairs(n, noise=1.0):      # the teacher: a linear map of the static vectors, and more
        bags = [list(rng.integers(0, vocab, rng.integers(5, 40))) for _ in range(n)]
        S = unit_rows(np.asarray(_bags(bags, vocab) @ rows))
        return bags, unit_rows(S @ M + noise * rng.normal(size=(n, dim)))

    window, teacher = pairs(110)                    # too few texts to find a 48 x 48 map in the noise
    parts, targets = pairs(2000)
    spans = Spans(np.concatenate(parts).astype(np.int64), np.array([len(p) for p in parts]), targets,
                  np.arange(2000) % 110)
    held, truth = pairs(300, noise=0.0)

    def held_out_cosine(mapped):
        got = unit_rows(np.asarray(_bags(held, vocab) @ mapped))
        return float(np.mean(np.sum(got * truth, axis=1)))

    alone, _ = _align(rows, window, teacher)
    both, info = _align(rows, window, teacher, spans)
    assert info["spans"] == 2000 and info["docs"] == 110
    assert held_out_cosine(both) > 0.95 > 0.9 > held_out_cosine(alone)


def test_a_rerun_on_the_same_corpus_reuses_the_encoder(static_run, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(static_run["out"], out)
    r = invoke("run", static_run["corpus"], "--out", out, "--encoder", "static", "--max-length", "128",
               "--codebook-size", "4", "--format", "json")
    assert r.exit_code == 0, r.output
    assert "reusing the static encoder" in r.stderr and "context vectors" not in r.stderr
    summary = json.loads(r.stdout)
    assert summary["embedding"]["fingerprint"] == static_run["summary"]["embedding"]["fingerprint"]
    assert summary["substrate"] != static_run["summary"]["substrate"] and summary["codebook_sizes"] == [4, 4, 4]


def test_a_text_with_no_token_at_the_end_of_a_batch_is_flagged_not_a_crash(static_run):
    from hermes.static import StaticEncoder

    enc = StaticEncoder(static_run["out"] / "substrate" / "encoder")
    vecs, counts, ok = enc.encode_counted(["a first text", "\x00\x01", "[UNK]", "\u200b"])
    assert ok.tolist() == [True, False, False, False] and counts.tolist()[1:] == [0, 1, 0]
    assert np.isfinite(vecs).all() and not vecs[1:].any()


def test_a_repeated_doc_id_whose_first_copy_has_no_token(static_run, tmp_path):
    records = static_run["records"][:120] + [{"id": "dup", "text": "\x00\x01"},
                                              {"id": "dup", "text": "a second copy with real words in it"}]
    corpus = write_jsonl(tmp_path / "c" / "a.jsonl", records)
    r = invoke("run", corpus, "--out", tmp_path / "o", "--encoder", "static", "--model",
               static_run["out"] / "substrate" / "encoder", "--quiet", "--format", "json")
    assert r.exit_code == 0, r.output
    rejects = _rows(tmp_path / "o" / "labels.duckdb", "SELECT line, reason FROM rejects")
    assert [(line, "no token" in reason) for line, reason in rejects] == [(121, True)]
    assert _rows(tmp_path / "o" / "labels.duckdb", "SELECT count(*) FROM labels WHERE doc_id = 'dup'") == [(1,)]


def test_label_quantizes_the_float16_values_run_caches(static_run, tmp_path, monkeypatch):
    """`run` quantizes the float16 embedding cache; the one-pass label path rounds to float16 too,
    so both give the same codes even where rounding moves a document across a boundary."""
    from hermes import api
    from hermes.substrate import Substrate

    seen = []
    encode = Substrate.encode

    def recording(self, embeddings, fixed=None):
        seen.append(np.array(embeddings))
        return encode(self, embeddings, fixed)

    monkeypatch.setattr(Substrate, "encode", recording)
    api.label([static_run["corpus"]], substrate=static_run["out"] / "substrate", out=tmp_path / "o", quiet=True)
    assert seen and all(np.array_equal(x, x.astype(np.float16).astype(np.float32)) for x in seen)


TRICKY = ["a\vb c\fd", "x[CLS]y [SEP] [UNK]", "two[MASK]words [MASK]", "café naïve 中文字", "\x00\x01", "", "   ",
          "\u200b", "a" * 150 + " b", "tab\tsep\r\nline\u00a0nbsp\u2003em", "\x1cfoo\x1dbar\x85baz", "emoji 😀👍🏽",
          "don't stop-believing (now)!", "repeat repeat repeat. Repeat", "[SE\vP] hi", "a [MAS\fK] b",
          # cut around ASCII punctuation: added tokens inside punctuation, marks after it, words > 100 chars
          "x.[SEP].y [[MASK]] ...", "<\u0338b a,\u0301b", "e-mail@host.com (100%)!", "a" * 150 + "-b,c",
          "x[CLS]y,z ¡hola! ¿qué? ,,,", "[[UNK]]!"]


def test_texts_encoded_piece_by_piece_equal_their_whole_tokenization(static_run):
    """The piece cache's bags of ids give the same counts and vectors as tokenizing each whole text,
    on real documents and on texts built to break the split (controls, special tokens in the text,
    the separator's own text, CJK, long words), also when its table fills and starts again."""
    from hermes.static import StaticEncoder
    from hermes.vectors import count_rows

    enc = StaticEncoder(static_run["out"] / "substrate" / "encoder").setup()
    assert enc.pieces_ is not None and enc.pieces_.separator == ("[MASK]", 103)
    assert enc.pieces_.parts is not None        # BERT's pre-tokenizer: pieces are cached by their parts too
    texts = [r["text"] for r in static_run["records"]] + TRICKY
    for limit in (1_000_000, 500):
        enc.pieces_.limit = enc.pieces_.parts.limit = limit
        enc.pieces_._clear()
        enc.pieces_.parts._clear()
        for part in (texts[:40], texts, TRICKY):            # cold, partly warm, warm
            vecs, counts, ok = enc.encode_counted(part)
            ids, lengths = enc.token_ids(part)
            bags = count_rows(ids, lengths, len(enc.rows_), np.float32)
            whole = np.asarray(bags @ enc.rows_)
            norm = np.linalg.norm(whole, axis=1)
            good = (bags @ enc.known_.astype(np.float32) > 0) & (norm > 0)
            whole[good] /= norm[good, None]
            whole[~good] = 0
            assert counts.tolist() == lengths.tolist()
            assert ok.tolist() == good.tolist()
            np.testing.assert_allclose(vecs, whole, atol=2e-5)
            # at most the limit, or one batch's distinct pieces (the empty piece of edge whitespace too)
            assert len(enc.pieces_) <= max(limit, len({w for t in part for w in t.split()} | {""}))
    assert enc.count(TRICKY).tolist() == enc.token_ids(TRICKY)[1].tolist()
    alone = enc.encode(texts[:7])                    # a text's vector does not depend on its batch
    assert np.array_equal(alone, enc.encode(texts)[:7]) and np.array_equal(alone[3:], enc.encode(texts[3:7]))


def test_release_empties_the_piece_tables_and_the_vectors_stay_the_same(static_run):
    """What labeling gives back before the store is built: both piece tables start again (a new
    generation, so no slot of the old one is read), and the same texts get the same vectors."""
    from hermes.static import StaticEncoder

    enc = StaticEncoder(static_run["out"] / "substrate" / "encoder").setup()
    texts = [r["text"] for r in static_run["records"][:200]]
    before = enc.encode_counted(texts)
    tables = (enc.pieces_, enc.pieces_.parts)
    assert all(len(t) for t in tables)
    generations = [t.generation for t in tables]
    enc.release()
    assert [len(t) for t in tables] == [0, 0]
    assert [t.generation for t in tables] == [g + 1 for g in generations]
    assert all(len(t.ids) == 1 << 16 for t in tables)           # the arrays are small again
    after = enc.encode_counted(texts)
    for a, b in zip(before, after):
        assert np.array_equal(a, b)


def test_the_encoders_split_gives_the_same_words_and_quality_as_splitting_again(static_run):
    """The words made from `tokenize`'s split into pieces (what the quality heuristic and the term
    counts get): each text holds the same words (bar empty strings, which count as none) as
    `Words.of`, and the scores and term counts are the same; a batch that drops rows makes them
    from its remaining rows' pieces."""
    import pyarrow as pa

    from hermes.labelers import Batch, StaticTokens, StaticVectors, apply
    from hermes.quality import heuristic_scores
    from hermes.static import StaticEncoder
    from hermes.terms import TermCounter
    from hermes.words import Words

    def held(words):
        occ = words.occurrences.tocsr().copy()
        occ.sum_duplicates()
        names = words.distinct.to_pylist()
        return [sorted((names[j], round(v)) for j, v in zip(occ[i].indices, occ[i].data) if names[j])
                for i in range(occ.shape[0])]

    enc = StaticEncoder(static_run["out"] / "substrate" / "encoder").setup()
    texts = pa.array([r["text"] for r in static_run["records"]] + TRICKY + ["a \u00a0b\u2003c \x1cd\x85e "])
    words = Words.of_pieces(texts, enc.tokenize(texts).pieces)
    again = Words.of(texts)
    assert held(words) == held(again)
    np.testing.assert_array_equal(heuristic_scores(texts, words), heuristic_scores(texts, again))
    codes = np.arange(len(texts))[:, None] % np.array([[3, 2, 1]])
    counts = [TermCounter(), TermCounter()]
    counts[0].add(texts, codes, words)
    counts[1].add(texts, codes, again)
    assert counts[0].table().equals(counts[1].table())
    # through the labeler: the words come from the encoder's pieces, also after refused rows leave
    docs = pa.table({"doc_id": [f"d{i}" for i in range(len(texts))], "line": list(range(len(texts))), "text": texts})
    batch, rejects = apply(Batch(docs, "f"), [StaticTokens(enc, counts=True), StaticVectors(enc)])
    assert sum(t.num_rows for t in rejects) and batch.words.pieces is not None
    assert held(batch.words) == held(Words.of(batch.column("text")))


def test_the_heuristics_counts_kept_per_piece_across_batches_give_the_same_scores(static_run):
    """The quality heuristic's word counts, kept per piece of text by its slot in the encoder's
    table (PieceSums), score every batch as splitting it afresh does: cold and warm, after the
    table starts again (slots then name other pieces), with pieces that hold other whitespace, and
    after rows leave the batch."""
    import pyarrow as pa

    from hermes.quality import heuristic_scores, word_counts
    from hermes.static import StaticEncoder
    from hermes.words import PieceSums, Words

    enc = StaticEncoder(static_run["out"] / "substrate" / "encoder").setup()
    sums = PieceSums(word_counts, 6)
    texts = [r["text"] for r in static_run["records"]] + TRICKY + ["a \u00a0b\u2003c \x1cd\x85e "]
    for limit in (1_000_000, 300):
        enc.pieces_.limit = limit
        enc.pieces_._clear()
        for part in (texts[:40], texts, TRICKY, texts[::-1], texts[20:60]):
            arr = pa.array(part)
            words = Words.of_pieces(arr, enc.tokenize(arr).pieces)
            assert words.pieces is not None and words.pieces.table[1] == enc.pieces_.generation
            np.testing.assert_array_equal(heuristic_scores(arr, words, sums), heuristic_scores(arr))
        assert sums._runs._have.sum() > 0
    keep = np.arange(len(texts)) % 3 > 0
    words = Words.of_pieces(pa.array(texts), enc.tokenize(pa.array(texts)).pieces).take(keep)
    kept = pa.array([t for t, k in zip(texts, keep) if k])
    np.testing.assert_array_equal(heuristic_scores(kept, words, sums), heuristic_scores(kept))


def test_a_tokenizer_that_does_not_split_at_whitespace_encodes_whole_texts():
    from hermes.static import piece_cache

    bert = {"normalizer": {"type": "BertNormalizer", "clean_text": True}, "pre_tokenizer": {"type": "BertPreTokenizer"},
            "added_tokens": [{"id": 102, "content": "[SEP]", "special": True}], "model": {"unk_token": "[UNK]"}}
    assert piece_cache(None, bert, 10, np.ones(10, bool)).separator == ("[SEP]", 102)
    byte_level = {**bert, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False}}
    metaspace = {**bert, "pre_tokenizer": {"type": "Metaspace"}}
    joining = {**bert, "normalizer": {"type": "Sequence", "normalizers": [{"type": "Replace"}]}}
    spaced_token = {**bert, "added_tokens": [{"id": 5, "content": "new york", "special": False}]}
    for spec in (byte_level, metaspace, joining, spaced_token):
        assert piece_cache(None, spec, 10, np.ones(10, bool)) is None
    # pieces are cut at punctuation only behind BERT's pre-tokenizer and normalisers that never join
    # a character to the next (NFC would join "<" and a combining mark into one symbol)
    assert piece_cache(None, bert, 10, np.ones(10, bool)).parts is not None
    whitespace = {**bert, "pre_tokenizer": {"type": "Whitespace"}}
    nfc = {**bert, "normalizer": {"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Lowercase"}]}}
    # an added token matched after normalising: "<foo>" in "<FOO>" must not be cut at its "<"
    added = {**bert, "added_tokens": bert["added_tokens"] + [{"id": 7, "content": "<foo>", "normalized": True}]}
    for spec in (whitespace, nfc, added):
        assert piece_cache(None, spec, 10, np.ones(10, bool)).parts is None


def test_the_encoder_sample_is_the_same_from_arrow_batches_as_from_lists():
    """The encoder's Reservoir takes the read batches' Arrow text columns as they are (only the
    texts that enter the sample become Python strings) and draws what it draws from lists of str."""
    import numpy as np
    import pyarrow as pa

    from hermes.static import Reservoir

    texts = [f"text {i}" for i in range(5000)]
    cuts = np.sort(np.random.default_rng(0).integers(0, len(texts), 40)).tolist()
    batches = [texts[a:b] for a, b in zip([0] + cuts, cuts + [len(texts)])]
    for n in (10, 700, 6000):
        from_lists, from_arrow = Reservoir(n, seed=3), Reservoir(n, seed=3)
        for b in batches:
            from_lists.add(b)
            from_arrow.add(pa.chunked_array([pa.array(b, pa.string())]))
        assert from_arrow.texts == from_lists.texts and from_arrow.seen == from_lists.seen == len(texts)
        assert len(from_lists.texts) == min(n, len(texts)) and len(set(from_lists.texts)) == len(from_lists.texts)


def test_term_counts_kept_per_piece_across_batches_equal_counting_the_words_afresh(static_run, monkeypatch):
    """The term counts find each piece of text's words once while the encoder's table keeps it
    (PieceRuns): over batches, cold and warm, after the table starts again (slots then name other
    pieces), after prunings renumber the terms, and after rows leave a batch, the table equals
    splitting every batch into words afresh."""
    import pyarrow as pa

    from hermes.static import StaticEncoder
    from hermes.terms import TermCounter
    from hermes.words import Words

    enc = StaticEncoder(static_run["out"] / "substrate" / "encoder").setup()
    texts = [r["text"] for r in static_run["records"]] + TRICKY + ["a \u00a0b\u2003c \x1cd\x85e "]
    monkeypatch.setattr(TermCounter, "PRUNE_EVERY", 150)
    monkeypatch.setattr(TermCounter, "KEEP", 20)
    for limit in (1_000_000, 300):
        enc.pieces_.limit = limit
        enc.pieces_._clear()
        by_piece, afresh = TermCounter(), TermCounter()
        for k, part in enumerate((texts[:40], texts, TRICKY, texts[::-1], texts[20:60], texts[:40])):
            codes = (np.arange(len(part))[:, None] * np.array([[1, 3, 7]]) + k) % np.array([[3, 2, 5]])
            keep = np.arange(len(part)) % 4 > 0 if k == 3 else np.ones(len(part), dtype=bool)
            kept = [t for t, y in zip(part, keep) if y]
            words = Words.of_pieces(pa.array(part), enc.tokenize(pa.array(part)).pieces).take(keep)
            assert words.pieces is not None
            by_piece.add(kept, codes[keep], words)
            afresh.add(kept, codes[keep])
        assert by_piece.table().equals(afresh.table()) and by_piece.table().num_rows > 100
        assert by_piece._piece_terms._have.any()


@pytest.mark.parametrize("hash_mod", [None, 7, 1])
def test_string_slots_find_what_a_dict_finds_whatever_the_hashes_collide(monkeypatch, hash_mod):
    """The piece table's StringSlots numbers strings in the order added and finds them again as a
    dict does: sliced arrays, both offset widths, empty strings, non-ASCII, and hashes that collide
    (reduced modulo 7, or all one), which only the byte-for-byte check and the dict of the
    colliding strings tell apart."""
    import random

    import pyarrow as pa

    from hermes import static

    if hash_mod:
        real = static._hash_strings
        monkeypatch.setattr(static, "_hash_strings", lambda o, d, m: real(o, d, m) % np.uint64(hash_mod))
    rng = random.Random(1)
    table, ref = static.StringSlots(places=16), {}     # small, so that the table grows many times
    alphabet = ["a", "b", "é", "中", "ab", "\x00", "xyzzy" * 300]
    for batch in range(40):
        strings = sorted({"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 5)))
                          for _ in range(rng.randint(0, 150))})
        arr = pa.array(["zz"] + strings, pa.large_string() if batch % 2 else pa.string())[1:]    # a slice
        found = table.find(arr)
        assert found.tolist() == [ref.get(s, -1) for s in strings], batch
        new = np.flatnonzero(found < 0)
        slots = table.add(arr.take(pa.array(new, pa.int64())))
        assert slots.tolist() == list(range(len(ref), len(ref) + len(new)))
        ref.update(zip([strings[i] for i in new], slots.tolist()))
    assert len(table) == len(ref) > 500 and table.n_bytes == sum(len(s.encode()) for s in ref)
    assert (len(table._odd) > len(ref) // 2) == bool(hash_mod)


@pytest.mark.parametrize("good", [0, 1])
def test_a_static_fit_of_a_corpus_the_encoder_all_but_refuses_fails_with_one_line(static_run, tmp_path, good):
    """`fit` finds out only after reading which documents its static encoder takes: with fewer than
    two, it stops as `run` does, with one line, instead of fitting on nothing."""
    records = [{"id": f"b{i}", "text": "\x00\x01\x02"} for i in range(30)] + static_run["records"][:good]
    corpus = write_jsonl(tmp_path / "c.jsonl", records)
    encoder = static_run["out"] / "substrate" / "encoder"
    for command in ("fit", "run"):
        r = invoke(command, corpus, "--out", tmp_path / command, "--encoder", "static", "--model", encoder, "--quiet")
        assert r.exit_code == 1, (command, r.output)
        assert r.stderr.count("Error: ") == 1 and ("document(s)" in r.stderr or "no document" in r.stderr), r.stderr
    assert not (tmp_path / "fit" / "substrate").exists()
