"""An export folder to GGUF through llama.cpp's own HF-to-GGUF converter, pinned.

The converter (``convert_hf_to_gguf.py``, its ``conversion/`` package and its own ``gguf-py``)
is taken from the llama.cpp source vendored in the llama-cpp-python sdist of
:data:`LLAMACPP_PIN`: fetched once with pip into the bakery cache, or found in
``$BAKERY_LLAMACPP_SRC`` (a llama.cpp source folder). It runs in this Python (it needs torch,
numpy, safetensors, transformers and sentencepiece).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from bakery.gguf.read import GGUFError
from bakery.io.digest import file_sha256

LLAMACPP_PIN = "llama-cpp-python==0.3.36"
OUTTYPES = ("f32", "f16", "bf16", "q8_0", "auto")
_SCRIPT = "convert_hf_to_gguf.py"
_MEMBERS = (_SCRIPT, "conversion/", "gguf-py/")


def _cache() -> Path:
    from bakery.models import cache_dir

    return cache_dir() / "llama.cpp" / LLAMACPP_PIN.split("==")[1]


def _extract(sdist: Path, dest: Path) -> None:
    """Only the converter's files, regular files only, never outside ``dest``."""
    tmp = Path(tempfile.mkdtemp(prefix=".llama.cpp-", dir=dest.parent))
    with tarfile.open(sdist) as tar:
        for m in tar.getmembers():
            parts = m.name.split("/")
            if len(parts) < 4 or parts[1:3] != ["vendor", "llama.cpp"] or not m.isfile():
                continue
            rel = "/".join(parts[3:])
            if ".." in parts or not any(rel == p or rel.startswith(p) for p in _MEMBERS):
                continue
            out = tmp / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(m)
            assert src is not None
            out.write_bytes(src.read())
    if not (tmp / _SCRIPT).is_file():
        raise GGUFError(f"{sdist} holds no vendor/llama.cpp/{_SCRIPT}: not the llama-cpp-python sdist")
    os.replace(tmp, dest)


def converter_dir(fetch: bool = True) -> Path:
    """The folder holding ``convert_hf_to_gguf.py`` (fetched with pip into the cache if needed)."""
    env = os.environ.get("BAKERY_LLAMACPP_SRC")
    if env:
        if not (Path(env) / _SCRIPT).is_file():
            raise GGUFError(f"BAKERY_LLAMACPP_SRC={env} holds no {_SCRIPT}: point it at a llama.cpp "
                            "source folder, or unset it to use the pinned converter")
        return Path(env)
    dest = _cache()
    if (dest / _SCRIPT).is_file():
        return dest
    manual = (f"pip download --no-deps --no-binary :all: {LLAMACPP_PIN} -d DIR, then set "
              "BAKERY_LLAMACPP_SRC to DIR's extracted vendor/llama.cpp")
    if not fetch:
        raise GGUFError(f"llama.cpp's converter is not in {dest}; {manual}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    print(f"[bakery] fetching llama.cpp's converter ({LLAMACPP_PIN} sdist) into {dest} (once)...",
          file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
               LLAMACPP_PIN, "-d", tmp]
        run = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if run.returncode != 0 or not sdists:
            raise GGUFError(f"could not fetch {LLAMACPP_PIN} with pip ({run.stderr.strip()[-400:]}); "
                            f"do it by hand: {manual}")
        if not (dest / _SCRIPT).is_file():
            _extract(sdists[0], dest)
    return dest


def check_requirements() -> None:
    missing = [m for m in ("torch", "numpy", "safetensors", "transformers", "sentencepiece")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise GGUFError(f"llama.cpp's converter needs {', '.join(missing)} in this Python: "
                        f"pip install {' '.join(missing)}")


def convert(export: Path, out_file: Path, outtype: str = "auto") -> dict[str, str]:
    """Run the pinned converter on ``export``; return what ran (for the manifest)."""
    if outtype not in OUTTYPES:
        raise GGUFError(f"--outtype {outtype}: llama.cpp's converter writes {', '.join(OUTTYPES)}; "
                        "quantize further with llama.cpp's llama-quantize")
    check_requirements()
    out_file, export = Path(out_file).resolve(), Path(export).resolve()  # it runs in the converter's folder
    src = converter_dir()
    script = src / _SCRIPT
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # use the pinned gguf-py
    env["PYTHONPATH"] = os.pathsep.join([str(src), str(src / "gguf-py")])
    cmd = [sys.executable, str(script), str(export), "--outfile", str(out_file), "--outtype", outtype]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(src))
    if run.returncode != 0 or not out_file.is_file():
        tail = "\n".join((run.stderr or run.stdout).strip().splitlines()[-6:])
        hint = ""
        if "pre-tokenizer was not recognized" in tail:
            hint = (" llama.cpp's converter does not know this tokenizer (it recognises the tokenizers "
                    "of published models by a hash); a model with a tokenizer of its own cannot be "
                    "converted by it.")
        raise GGUFError(f"llama.cpp's converter ({LLAMACPP_PIN}) failed on {export}:{hint}\n{tail}")
    return {"converter": f"{LLAMACPP_PIN}: vendor/llama.cpp/{_SCRIPT}",
            "converter_sha256": file_sha256(script), "outtype": outtype,
            "command": " ".join(["python", _SCRIPT, str(export), "--outfile", out_file.name,
                                 "--outtype", outtype])}
