"""The end-to-end demo on the embedded default: a small public-domain corpus, local shards, CPU.

Each step runs the same command-line tool a user would run, skips work that is already done, and
the whole run ends in `<out>/summary.json`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: List[str], what: str, env: Dict[str, str] = None) -> None:
    print(f"\n==> {what}\n    $ {' '.join(cmd)}", flush=True)
    started = time.time()
    result = subprocess.run(cmd, cwd=REPO, env={**os.environ, **(env or {})})
    if result.returncode != 0:
        raise SystemExit(f"demo: step '{what}' failed with exit code {result.returncode}")
    print(f"    ({what}: {time.time() - started:.1f}s)", flush=True)


def _tool(name: str) -> List[str]:
    return [sys.executable, str(REPO / "tools" / name)]


def prepare_data(data: Path, vocab_size: int, seq_len: int) -> Dict[str, Path]:
    """Corpus, tokenizer and AE shards under `data` (each skipped when present)."""
    corpus, tok_prefix = data / "corpus", data / "tokenizer" / "spm"
    paths = {"corpus": corpus, "tokenizer": tok_prefix.with_suffix(".model"),
             "ae_train": data / "shards" / "ae" / "train", "ae_valid": data / "shards" / "ae" / "valid"}
    if not (corpus / "corpus.json").is_file():
        _run(_tool("fetch_corpus.py") + ["--out", str(corpus)], "fetch the demo corpus")
    if not paths["tokenizer"].is_file():
        _run(_tool("train_tokenizer.py") + ["--input", str(corpus / "train.jsonl"), "--out-prefix",
                                            str(tok_prefix), "--vocab-size", str(vocab_size)],
             "train the tokenizer")
    for split in ("train", "valid"):
        out = paths[f"ae_{split}"]
        if not (out / "calm_index.json").is_file():
            _run(_tool("prepare_data.py") + ["--input", str(corpus / f"{split}.jsonl"), "--tokenizer",
                                             str(paths["tokenizer"]), "--out", str(out), "--packing", "ae",
                                             "--chunk-size", "4", "--seq-len", str(seq_len)],
                 f"write AE shards ({split})")
    return paths


def train_autoencoder(paths: Dict[str, Path], out: Path, overrides: List[str]) -> dict:
    run_dir = out / "ae"
    cmd = [sys.executable, "-m", "calm_megatron.train", "configs/ae/tiny.yaml", "run.name=demo_ae",
           f"run.out_dir={run_dir}", f"data.tokenizer={paths['tokenizer']}", f"data.train={paths['ae_train']}",
           f"data.valid={paths['ae_valid']}", "train.eval_batches=0"] + overrides
    _run(cmd, "train the autoencoder (stage 1)", env={"WANDB_MODE": os.environ.get("WANDB_MODE", "offline")})
    return json.loads((run_dir / "train_summary.json").read_text())


def run_demo(out: Path, data: Path, ae_overrides: List[str]) -> dict:
    """Run every demo step and write `<out>/summary.json`."""
    started = time.time()
    from calm_megatron import config as C

    ae_cfg = C.load(str(REPO / "configs/ae/tiny.yaml"), ae_overrides)
    paths = prepare_data(data, ae_cfg.autoencoder.vocab_size, ae_cfg.train.seq_len)
    ae = train_autoencoder(paths, out, ae_overrides)
    summary = {"ae_recon_token_acc": ae["recon_token_acc"], "ae_recon_chunk_acc": ae["recon_chunk_acc"],
               "ae_params": ae["ae_params"], "tokens_seen": ae["tokens_seen"],
               "ae_train_wall_seconds": ae["train_wall_seconds"], "ae_checkpoint": ae["checkpoint"],
               "wall_seconds": round(time.time() - started, 1)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print("\n==> demo finished\n" + json.dumps(summary, indent=1))
    print(f"\n  data (corpus, tokenizer, shards): {data}\n  autoencoder run: {out / 'ae'}"
          f"\n  summary: {out / 'summary.json'}")
    return summary
