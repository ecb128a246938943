"""Launch a script under torchrun on gloo and return its JSON output (one job per group of assertions)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, free_port


def torchrun_json(script: str, nproc: int, spec: dict, tmp_path: Path, timeout: int = 600) -> dict:
    """Run `tests/dist/<script>` on `nproc` ranks with `spec` (+ an output path); return rank 0's JSON."""
    out = tmp_path / f"{Path(script).stem}_{nproc}.json"
    spec = dict(spec, out=str(out))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(REPO / "tests" / "dist" / script), json.dumps(spec)]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"torchrun {script} x{nproc} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return json.loads(out.read_text())
