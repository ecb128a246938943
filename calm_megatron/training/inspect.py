"""A human-readable description of a checkpoint step (tools/inspect_checkpoint.py)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Tuple

import yaml

from calm_megatron.training import checkpoint


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024:
            return f"{nbytes:.1f}{unit}"
        nbytes /= 1024
    return f"{nbytes:.1f}TiB"


def describe_step(path: str) -> Tuple[dict, Optional[str]]:
    """(facts about the step, the verification error or None). Reads JSON/YAML only, no tensors."""
    try:
        step = checkpoint.resolve_step(path)
    except checkpoint.CheckpointError as err:
        return {"path": path}, str(err)
    out: dict = {"path": str(step)}
    state_file, cfg_file = step / "trainer_state.json", step / "config.yaml"
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        out.update(step=state["step"], tokens_seen=state["tokens_seen"], layout=state["layout"])
    if cfg_file.is_file():
        cfg = yaml.safe_load(cfg_file.read_text())
        section = cfg["autoencoder"] if cfg["run"]["stage"] == "ae" else cfg["model"]
        out["stage"] = cfg["run"]["stage"]
        out["model"] = ", ".join(f"{k}={v}" for k, v in section.items() if isinstance(v, (int, float)))
        out["zero_stage"] = cfg["parallel"]["zero_stage"]
    files = sorted(p for p in step.rglob("*") if p.is_file())
    out["files"] = len(files)
    out["bytes"] = _human(sum(p.stat().st_size for p in files))
    for shard in sorted((step / "model").glob("*.safetensors")):
        out[f"shard {shard.name}"] = _human(shard.stat().st_size)
    try:
        checkpoint.verify(step)
        return out, None
    except checkpoint.CheckpointError as err:
        return out, str(err)
