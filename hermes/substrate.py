"""The substrate: everything fitted that turns an embedding into a code, saved as a folder.

    substrate/
      manifest.json        format, hermes version, embedding settings, transform and
                           quantizer settings, the stage stack (with a fixed stage's class
                           names), fit-sample size, array checksums, fingerprint
      codebook_1.npy ...   one array per RVQ stage
      transform_*.npy      the transform's arrays, if it has any
      encoder/             with a static encoder: the encoder itself (a sentence-transformers
                           folder, hermes.static); the manifest records its recipe and checksum

The fingerprint hashes every setting that changes the codes plus the arrays themselves, so two
substrates share a fingerprint only if they encode identically. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hermes._version import __version__
from hermes.errors import HermesError
from hermes.files import replacing
from hermes.rvq import ResidualQuantizer
from hermes.stack import LEARNED, N_STAGES, fixed_indices
from hermes.transform import TRANSFORMS, transform_class

FORMAT = "hermes-substrate"
FORMAT_VERSION = 2


@dataclass
class Substrate:
    embedding: dict[str, Any]            # model, model_dim, dtype, max_length
    transform: Any
    quantizer: ResidualQuantizer
    fit_sample_size: int
    created_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    hermes_version: str = __version__
    fingerprint: str = ""
    training: dict[str, Any] = field(default_factory=dict)   # how the fit went (losses); not fingerprinted
    # the stage stack (hermes.stack); a fixed stage also records its sorted class names, and
    # a fasttext stage its model's path and sha256
    stages: list[dict[str, Any]] = field(default_factory=lambda: [dict(LEARNED) for _ in range(N_STAGES)])
    # a static encoder's folder (copied into the substrate's encoder/ on save); its recipe and
    # checksum are in `embedding`, so the fingerprint covers it
    encoder_dir: Path | None = None
    _static_encoder: Any = field(default=None, repr=False, compare=False)   # loaded once, by embedder()

    kind = "embedding"

    @property
    def sizes(self) -> list[int]:
        return self.quantizer.sizes_

    @property
    def fixed(self) -> list[int]:
        return fixed_indices(self.stages)

    def class_names(self) -> dict[int, list[str]]:
        """Each fixed stage's class names (stage index -> names; code = position)."""
        return {i: self.stages[i]["classes"] for i in self.fixed}

    @property
    def static(self) -> bool:
        return self.embedding.get("encoder") == "static"

    def embedder(self):
        """An encoder with this substrate's embedding settings: its static encoder, checked against
        the manifest (the same instance on every call), or the transformer (model, dtype, max length)."""
        from hermes.embed import Embedder
        from hermes.static import StaticEncoder

        e = self.embedding
        if self.static:         # one instance: it is checked and loaded once, on its first setup()
            if self._static_encoder is None or self._static_encoder.folder != Path(self.encoder_dir):
                self._static_encoder = StaticEncoder.of_substrate(e, self.encoder_dir)
            return self._static_encoder
        return Embedder(model=e["model"], dtype=e["dtype"], max_length=e["max_length"])

    def encode(self, embeddings: np.ndarray, fixed: dict[int, np.ndarray] | None = None) -> np.ndarray:
        """Embeddings (n, d) -> codes (n, stages); `fixed` gives each fixed stage's class index per row."""
        return self.quantizer.encode(self.transform.transform(embeddings), fixed=fixed)

    # -- persistence ---------------------------------------------------------------------

    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = {f"codebook_{i + 1}": np.ascontiguousarray(c, dtype=np.float32)
                  for i, c in enumerate(self.quantizer.codebooks_)}
        arrays.update({f"transform_{k}": np.ascontiguousarray(v) for k, v in self.transform.state().items()})
        return arrays

    def _settings(self) -> dict[str, Any]:
        settings = {"embedding": self.embedding, "transform": self.transform.params(),
                    "rvq": {**self.quantizer.params(), "sizes": self.quantizer.sizes_},
                    "fit_sample_size": self.fit_sample_size}
        if self.fixed:            # an all-learned stack keeps the fingerprint it always had
            settings["stages"] = self.stages
        return settings

    def compute_fingerprint(self) -> str:
        return _fingerprint(self._settings(), {k: _sha256(v) for k, v in self._arrays().items()})

    def manifest(self) -> dict[str, Any]:
        arrays = self._arrays()
        checksums = {k: _sha256(v) for k, v in arrays.items()}
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "hermes_version": self.hermes_version,
                "created_at": self.created_at, **self._settings(), "stages": self.stages,
                "training": self.training, "arrays": checksums,
                "fingerprint": _fingerprint(self._settings(), checksums)}

    def save(self, path: str | Path) -> Path:
        """Write to a temporary folder and rename it into place, so a folder is whole or absent."""
        path = Path(path)
        if self.static and (self.encoder_dir is None or not Path(self.encoder_dir).is_dir()):
            raise HermesError(f"{path}: the substrate of a static encoder needs the encoder's folder to save",
                              hint="fit with --encoder static")
        with replacing(path) as (tmp,):
            tmp.mkdir()
            for name, arr in self._arrays().items():
                np.save(tmp / f"{name}.npy", arr, allow_pickle=False)
            if self.static:
                shutil.copytree(self.encoder_dir, tmp / "encoder")
            manifest = self.manifest()
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        self.fingerprint = manifest["fingerprint"]
        if self.static:
            self.encoder_dir = path / "encoder"
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Substrate":
        """An embedding substrate folder (a distilled labeler's is refused: see distill.load_labeler)."""
        path = Path(path)
        mpath = path / "manifest.json"
        m = read_manifest(path)
        if m.get("kind") == "distilled":
            raise HermesError(f"{mpath}: a distilled labeler, not an embedding substrate (field 'kind')",
                              hint="pass the embedding substrate the store was fitted with")
        if m.get("format_version") != FORMAT_VERSION:
            raise HermesError(
                f"{mpath}: substrate format_version {m.get('format_version')} was written by hermes "
                f"{m.get('hermes_version')}; this hermes {__version__} reads version {FORMAT_VERSION}",
                hint="re-fit the substrate with this version of hermes")
        arrays: dict[str, np.ndarray] = {}
        for name, checksum in m.get("arrays", {}).items():
            apath = path / f"{name}.npy"
            try:
                arr = np.load(apath, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise HermesError(f"{apath}: missing or unreadable ({e})",
                                  hint="the substrate is incomplete; re-create it with `hermes fit`") from None
            if _sha256(arr) != checksum:
                raise HermesError(f"{apath}: checksum does not match the manifest (field 'arrays.{name}')",
                                  hint="the substrate was modified or is corrupt; re-create it with `hermes fit`")
            arrays[name] = arr
        try:
            tkind = m["transform"]["kind"]
            if tkind not in TRANSFORMS:
                raise HermesError(f"{mpath}: unknown transform kind {tkind!r} (field 'transform.kind')",
                                  hint=f"this hermes knows {', '.join(TRANSFORMS)}; upgrade hermes")
            transform = transform_class(tkind).from_state(
                m["transform"], {k[len("transform_"):]: v for k, v in arrays.items() if k.startswith("transform_")})
            rv = m["rvq"]
            q = ResidualQuantizer(stages=rv["stages"], codebook_size=rv["codebook_size"],
                                  min_points_per_code=rv["min_points_per_code"], iters=rv["iters"], seed=rv["seed"],
                                  max_points_per_code=rv.get("max_points_per_code", 256),
                                  fixed={int(k): v for k, v in rv.get("fixed", {}).items()})
            q.codebooks_ = [arrays[f"codebook_{i + 1}"].astype(np.float32) for i in range(rv["stages"])]
            q.n_fit_ = m["fit_sample_size"]
            sub = cls(embedding=m["embedding"], transform=transform, quantizer=q,
                      fit_sample_size=m["fit_sample_size"], created_at=m["created_at"],
                      hermes_version=m["hermes_version"], fingerprint=m["fingerprint"],
                      training=m.get("training", {}),
                      stages=m.get("stages") or [dict(LEARNED) for _ in range(N_STAGES)],
                      encoder_dir=path / "encoder" if m["embedding"].get("encoder") == "static" else None)
        except KeyError as e:
            raise HermesError(f"{mpath}: field {e} is missing", hint="re-create the substrate with `hermes fit`") from None
        if sub.compute_fingerprint() != m["fingerprint"]:
            raise HermesError(f"{mpath}: the fingerprint does not match the settings and arrays (field 'fingerprint')",
                              hint="the manifest was edited; re-create the substrate with `hermes fit`")
        return sub


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of a substrate folder (embedding or distilled), checked to be one."""
    mpath = path / "manifest.json"
    if not path.is_dir():
        raise HermesError(f"{path}: substrate folder not found",
                          hint="pass the substrate/ folder that `hermes fit` or `hermes run` wrote")
    if not mpath.is_file():
        raise HermesError(f"{mpath}: missing; {path} is not a substrate folder",
                          hint="pass the substrate/ folder that `hermes fit` or `hermes run` wrote")
    try:
        m = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise HermesError(f"{mpath}:{e.lineno}: corrupt manifest ({e.msg})",
                          hint="re-create the substrate with `hermes fit`") from None
    if m.get("format") != FORMAT:
        raise HermesError(f"{mpath}: not a hermes substrate manifest (field 'format')",
                          hint="re-create the substrate with `hermes fit`")
    return m


def load_for_store(db: str | Path, path: str | Path | None = None) -> Substrate:
    """The embedding substrate that made the labels of the store `db`: its folder beside the store,
    or `path`. An error if it did not make them, or is a distilled labeler."""
    from hermes.store import connect

    db = Path(db)
    sub = Substrate.load(path or db.parent / "substrate")
    con = connect(db)
    try:
        fps = [r[0] for r in con.execute("SELECT DISTINCT substrate FROM labels").fetchall()]
    finally:
        con.close()
    if fps != [sub.fingerprint] or sub.kind != "embedding":
        made = f"{sub.fingerprint}, a distilled labeler" if sub.kind != "embedding" else sub.fingerprint
        raise HermesError(f"{db}: labels were made by substrate {', '.join(fps)}, not {made} (field 'substrate')",
                          hint="pass the embedding substrate that made the store with --substrate")
    return sub


def _sha256(arr: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def _fingerprint(settings: dict[str, Any], checksums: dict[str, str]) -> str:
    blob = json.dumps({"settings": settings, "arrays": checksums, "format_version": FORMAT_VERSION},
                      sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
