"""The labeling commands: `run` (the main job), `fit`, `label`, `train-quality` and `distill`
(registered on the app in hermes.cli)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from hermes.console import (AddressOpt, BatchOpt, CodebookSizeOpt, CodebookSizesOpt, ConfigOpt, DeviceOpt, DtypeOpt,
                            EncoderDocsOpt, EncoderKind, EncoderOpt, Engine, EngineOpt, FitSampleOpt, IdFieldOpt,
                            KeepOpt, MaxLengthOpt, QualityFieldOpt, QualityLabelOpt, QualityModelOpt, QualityOpt,
                            QuietOpt, SourceFieldOpt, StagesOpt, SummaryFmt, SummaryOpt, TextFieldOpt, TokenizerOpt,
                            fit_settings, guarded, print_summary, read_settings)


@guarded
def run(
    inputs: Optional[List[str]] = typer.Argument(None, metavar="[INPUT]...",
                                                 help="Files, folders or globs; none = the bundled sample corpus."),
    out: Path = typer.Option(Path("hermes-out"), "--out", "-o", help="Output folder."),
    config: Optional[Path] = ConfigOpt,
    text_field: Optional[str] = TextFieldOpt,
    id_field: Optional[str] = IdFieldOpt,
    source_field: Optional[str] = SourceFieldOpt,
    encoder: Optional[EncoderKind] = EncoderOpt,
    encoder_docs: Optional[int] = EncoderDocsOpt,
    model: Optional[str] = typer.Option(None, "--model", help="Local sentence-transformers folder, the teacher of "
                                                             "a static encoder (default: the packaged "
                                                             "all-MiniLM-L6-v2), or a static encoder folder that "
                                                             "hermes saved."),
    dtype: Optional[str] = DtypeOpt,
    device: Optional[str] = DeviceOpt,
    max_length: Optional[int] = MaxLengthOpt,
    batch_size: Optional[int] = BatchOpt,
    tokenizer: Optional[str] = TokenizerOpt,
    codebook_size: Optional[int] = CodebookSizeOpt,
    codebook_sizes: Optional[str] = CodebookSizesOpt,
    fit_sample: Optional[int] = FitSampleOpt,
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the fit sample and k-means (default: 0)."),
    stages: Optional[str] = StagesOpt,
    quality: Optional[str] = QualityOpt,
    quality_field: Optional[str] = QualityFieldOpt,
    quality_model: Optional[str] = QualityModelOpt,
    quality_label: Optional[str] = QualityLabelOpt,
    keep_embeddings: Optional[bool] = KeepOpt,
    engine: Engine = EngineOpt,
    address: Optional[str] = AddressOpt,
    quiet: bool = QuietOpt,
    fmt: SummaryFmt = SummaryOpt,
) -> None:
    """The main job: fit a substrate on a sample, label every document, build the store.

    Writes OUT/labels.duckdb, OUT/substrate/, OUT/labels/ (one Parquet file per input shard) and
    OUT/rejects/. With no INPUT it runs on the sample corpus bundled with hermes.

    By default a static encoder is built from the model on a sample of INPUT first (the context
    pass), then embeds every document; --encoder transformer embeds with the model itself.

    A source first stage (one L1 cell per source, named by it, learned stages below):
    hermes run corpus/ --out out --stages source,learned,learned

    --engine ray embeds and labels the shards on Ray Data (on a cluster with --address); the
    substrate is fitted and the store built here.

    Example: hermes run corpus/*.jsonl.gz --out out --text-field text
    """
    from hermes import api

    overrides = {**fit_settings(model, dtype, max_length, codebook_size, fit_sample, seed, stages, encoder,
                                  encoder_docs, codebook_sizes),
                 **read_settings(text_field, id_field, source_field, device, batch_size, tokenizer,
                                   keep_embeddings, quality, quality_field, quality_model, quality_label)}
    summary = api.run(inputs, out=out, config=config, quiet=quiet, engine=engine.value, address=address, **overrides)
    print_summary(summary, fmt)


@guarded
def fit(
    inputs: List[str] = typer.Argument(..., metavar="INPUT...", help="Files, folders or globs."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder; the substrate goes to OUT/substrate."),
    config: Optional[Path] = ConfigOpt,
    text_field: Optional[str] = TextFieldOpt,
    id_field: Optional[str] = IdFieldOpt,
    source_field: Optional[str] = SourceFieldOpt,
    encoder: Optional[EncoderKind] = EncoderOpt,
    encoder_docs: Optional[int] = EncoderDocsOpt,
    model: Optional[str] = typer.Option(None, "--model", help="Local sentence-transformers folder (the teacher of a "
                                                             "static encoder), or a static encoder folder that "
                                                             "hermes saved."),
    dtype: Optional[str] = DtypeOpt,
    device: Optional[str] = DeviceOpt,
    max_length: Optional[int] = MaxLengthOpt,
    batch_size: Optional[int] = BatchOpt,
    codebook_size: Optional[int] = CodebookSizeOpt,
    codebook_sizes: Optional[str] = CodebookSizesOpt,
    fit_sample: Optional[int] = FitSampleOpt,
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed (default: 0)."),
    stages: Optional[str] = StagesOpt,
    quiet: bool = QuietOpt,
    fmt: SummaryFmt = SummaryOpt,
) -> None:
    """Fit the substrate only (embedding settings, transform, RVQ codebooks) on a sample of INPUT.

    The corpus is read once, to draw the sample (the same sample `hermes run` fits on) and, with the
    static encoder (the default), the encoder's own sample; only the sample is embedded (unless the
    encoder refuses more of its candidates than were kept in reserve: then every document is).

    Example: hermes fit corpus/ --out fitted --fit-sample 100000
    """
    from hermes import api

    overrides = {**fit_settings(model, dtype, max_length, codebook_size, fit_sample, seed, stages, encoder,
                                  encoder_docs, codebook_sizes),
                 **read_settings(text_field, id_field, source_field, device, batch_size, None, True)}
    summary = api.fit(inputs, out=out, config=config, quiet=quiet, **overrides)
    print_summary(summary, fmt)


@guarded
def label(
    inputs: List[str] = typer.Argument(..., metavar="INPUT...", help="Files, folders or globs."),
    substrate: Path = typer.Option(..., "--substrate", "-s", help="A substrate folder from `hermes fit`/`run`."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (labels.duckdb, labels/, rejects/)."),
    config: Optional[Path] = ConfigOpt,
    text_field: Optional[str] = TextFieldOpt,
    id_field: Optional[str] = IdFieldOpt,
    source_field: Optional[str] = SourceFieldOpt,
    device: Optional[str] = DeviceOpt,
    batch_size: Optional[int] = BatchOpt,
    tokenizer: Optional[str] = TokenizerOpt,
    quality: Optional[str] = QualityOpt,
    quality_field: Optional[str] = QualityFieldOpt,
    quality_model: Optional[str] = QualityModelOpt,
    quality_label: Optional[str] = QualityLabelOpt,
    keep_embeddings: Optional[bool] = KeepOpt,
    engine: Engine = EngineOpt,
    address: Optional[str] = AddressOpt,
    append: bool = typer.Option(False, "--append", help="Add INPUT to the store already in --out (same "
                                "substrate) instead of rebuilding it from INPUT alone; shards it holds are skipped."),
    quiet: bool = QuietOpt,
    fmt: SummaryFmt = SummaryOpt,
) -> None:
    """Label INPUT with an existing substrate and build the store. Resumable: rerun the same
    command after an interruption and only unfinished shards are done again.

    The embedding model, dtype and max length are the substrate's own. --engine ray runs the same
    per-shard function on Ray Data (on a cluster with --address); the store is built here. With
    --append the new shards' labels are added to the store in --out in one transaction, its rows
    untouched: a doc_id it holds already goes to rejects as a duplicate.

    Example: hermes label more/*.parquet --substrate out/substrate --out out-more
    """
    from hermes import api

    overrides = read_settings(text_field, id_field, source_field, device, batch_size, tokenizer, keep_embeddings,
                                quality, quality_field, quality_model, quality_label)
    summary = api.label(inputs, substrate=substrate, out=out, config=config, quiet=quiet, **overrides,
                        engine=engine.value, address=address, append=append)
    print_summary(summary, fmt)


@guarded
def train_quality(
    positive: List[str] = typer.Option(..., "--positive", help="High-quality corpus (files, folders, globs; repeatable)."),
    negative: List[str] = typer.Option(..., "--negative", help="Low-quality corpus (repeatable)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for model.bin and card.json."),
    text_field: str = typer.Option("text", "--text-field", help="Dotted path of the text field."),
    holdout: float = typer.Option(0.1, "--holdout", help="Share of documents held out for the metrics."),
    epochs: int = typer.Option(5, "--epochs", help="fastText epochs."),
    lr: float = typer.Option(0.1, "--lr", help="fastText learning rate."),
    word_ngrams: int = typer.Option(2, "--word-ngrams", help="fastText word n-grams."),
    dim: int = typer.Option(64, "--dim", help="fastText vector size."),
    bucket: int = typer.Option(200_000, "--bucket", help="fastText hash buckets (model size)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most N documents per side."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split and of fastText."),
    fmt: SummaryFmt = SummaryOpt,
) -> None:
    """Train a fastText quality classifier from positive and negative corpora, with the same text
    normaliser used at prediction; report held-out precision, recall and AUC; write the model and
    a card (data, settings, metrics).

    Example: hermes train-quality --positive good/ --negative junk/ --out quality-model
    """
    from hermes import api

    r = api.train_quality(positive, negative, out, text_field=text_field, holdout=holdout, epochs=epochs, lr=lr,
                          word_ngrams=word_ngrams, dim=dim, bucket=bucket, seed=seed, limit=limit)
    if fmt == SummaryFmt.json:
        typer.echo(json.dumps(r, indent=2))
        return
    m, d = r["metrics"], r["data"]
    auc = "n/a" if m["auc"] is None else f"{m['auc']:.4f}"
    typer.echo(f"hermes train-quality: {d['positive_docs']:,} positive, {d['negative_docs']:,} negative documents; "
               f"held out {m['holdout_docs']:,}: precision {m['precision']:.4f}, recall {m['recall']:.4f}, AUC {auc}")
    typer.echo(f"  wrote {r['out']}/model.bin and card.json; use: {r['use']}")


@guarded
def distill(
    db: Path = typer.Option(..., "--db", help="A labeled store (the teacher)."),
    out: Path = typer.Option(..., "--out", "-o", help="The distilled substrate folder to write."),
    corpus: Optional[List[str]] = typer.Option(None, "--corpus", help="The corpus, if it moved."),
    sample: int = typer.Option(200_000, "--sample", help="Documents to train on at most."),
    holdout: float = typer.Option(0.1, "--holdout", help="Share held out to measure agreement."),
    student: str = typer.Option("linear", "--student", help="linear (the teacher's tokens in its window, "
                                                             "mapped into the teacher's space by ridge "
                                                             "regression, quantized by its codebooks) | "
                                                             "fasttext (classifiers for c1, L12, L123)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Training epochs of the fasttext student "
                                                               "(default 25)."),
    substrate: Optional[Path] = typer.Option(None, "--substrate", help="The store's substrate, if not beside it "
                                                                       "(the linear student uses its codebooks)."),
    max_system: Optional[int] = typer.Option(None, "--max-system", help="The linear student's ridge system "
                                                                        "is at most this many rows square: "
                                                                        "memory 8 N^2 bytes (default 40,000: "
                                                                        "12.8 GB). Lower it on a smaller "
                                                                        "machine; token pairs, then token "
                                                                        "ids, are capped to fit."),
    seed: int = typer.Option(0, "--seed", help="Seed."),
    quiet: bool = QuietOpt,
    fmt: SummaryFmt = SummaryOpt,
) -> None:
    """Train a distilled fast labeler that predicts the store's code from text, saved as a substrate
    that `hermes label` accepts (no embedding model needed). The linear student (default) reads
    the teacher's tokens in the teacher's window, predicts each document's point in the teacher's
    transformed space from the TF-IDF of the tokens and of adjacent token pairs and from static
    and context token vectors (the context ones from one pass of the teacher's encoder over up to
    5,000 training documents), and quantizes it with the teacher's codebooks (the first learned
    stage by a decision rule fitted to the student's out-of-fold errors, the later ones from a
    second, less regularised prediction); the fasttext student classifies c1, the L12 and the L123
    cell. Reports held-out agreement with the store's substrate per level. The store must be
    labeled with the transformer (hermes run --encoder transformer): a static encoder is fast already.

    Example: hermes distill --db out/labels.duckdb --out fast-substrate
    """
    from hermes import api

    r = api.distill(db, out, corpus, sample=sample, holdout=holdout, epochs=epochs, student=student, seed=seed,
                    substrate=substrate, max_system=max_system, quiet=quiet)
    if fmt == SummaryFmt.json:
        typer.echo(json.dumps(r, indent=2))
        return
    a = r["agreement"]
    typer.echo(f"hermes distill: {r['out']} ({r['student']} student, substrate {r['fingerprint']}, "
               f"teacher {r['teacher']}), trained on "
               f"{r['train_docs']:,} documents in {r['train_seconds']} s")
    typer.echo(f"  held-out agreement ({r['holdout_docs']:,} docs): L1 {a['L1']:.3f}, L12 {a['L12']:.3f}, "
               f"L123 {a['L123']:.3f}; {r['holdout_docs_per_s']:,} docs/s")
    typer.echo(f"next: hermes label CORPUS --substrate {r['out']} --out DIR")
