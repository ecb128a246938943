"""One rank of the multi-rank data-streaming tests (tests/test_data_streaming.py launches one process per rank).

argv[1] is a JSON spec: {"mode": ..., "path": shard folder (s3://...), "lookup_path": a local copy of it (to map
tokens to block ids), "out": folder for out_<rank>.json, ...}.
Rank and world come from RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; the group is gloo.

Batches are written as lists of global sample ids (block indices of the shard folder), so the test can check
disjointness, coverage and equality without shipping tokens.

modes:
- resume: an uninterrupted run over 1.x epochs (states after every step), then for each resume point N a fresh
  loader from the state at N, compared batch for batch; then the states at dp=1 with every rank a TP peer of
  the one replica (dp_rank=0 of 1): the rest of the epoch, identical on every rank.
- layouts: Megatron rank order (tp fastest, then dp, then pp) for several (tp, dp, pp); only the first and last
  pipeline stages read.
"""
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from calm_megatron.data.loader import IdleTrainLoader, build_train_loader, expected_batches
from calm_megatron.data.shards import iter_blocks


def block_ids(path):
    ids = {}
    for i, block in iter_blocks(path):
        ids.setdefault(block.tobytes(), i)
    return ids


def take(loader, n, lookup):
    stream = iter(loader)
    return [[lookup[row.numpy().astype("uint32").tobytes()] for row in next(stream)["tokens"]] for _ in range(n)]


def build(spec, **kw):
    args = dict(batch_size=spec["batch_size"], seed=spec["seed"], timeout_s=60, predownload=spec.get("predownload"))
    args.update(kw)
    return build_train_loader(spec["path"], **args)


def resolve_point(point, per_epoch):
    """An int, or "P", "P-1", "P+1" (P: batches per epoch)."""
    text = str(point)
    return per_epoch + int(text[1:] or 0) if text.startswith("P") else int(text)


def mode_resume(spec, rank, world, lookup):
    out = {}
    ref_loader = build(spec, dp_rank=rank, dp_size=world)
    per_epoch = ref_loader.batches_per_epoch
    total = per_epoch + 3
    states, ref = [ref_loader.state_dict()], []
    stream = iter(ref_loader)
    for _ in range(total):
        ref.append([lookup[row.numpy().astype("uint32").tobytes()] for row in next(stream)["tokens"]])
        states.append(ref_loader.state_dict())
    ref_loader.close()
    points = sorted({min(max(0, resolve_point(p, per_epoch)), total - 1) for p in spec["points"]})
    resumed = {}
    for n in points:
        loader = build(spec, dp_rank=rank, dp_size=world)
        loader.load_state_dict(states[n])
        resumed[str(n)] = take(loader, total - n, lookup)
        loader.close()
    # The same states at dp=1, every rank a tensor-parallel peer of the one replica: the rest of the epoch
    # (point 0: a fresh loader, the whole epoch).
    remaining = {}
    for point in spec["remaining_points"]:
        n = resolve_point(point, per_epoch)
        loader = build(spec, dp_rank=0, dp_size=1)
        if n:
            loader.load_state_dict(states[n])
        state = states[n] if n else {"num_canonical_nodes": 1, "sample_in_epoch": 0}
        count = expected_batches(loader.dataset.epoch_size, state["num_canonical_nodes"], 1, spec["batch_size"],
                                 state["sample_in_epoch"])
        remaining[str(n)] = take(loader, count, lookup)
        loader.close()
    out.update(per_epoch=per_epoch, ref=ref, states=states, resumed=resumed, points=points, remaining=remaining)
    return out


def mode_layouts(spec, rank, world, lookup):
    out = {}
    for tp, dp, pp in spec["layouts"]:
        assert tp * dp * pp == world
        dp_rank, pp_rank = (rank // tp) % dp, rank // (tp * dp)
        reads = pp_rank in (0, pp - 1)
        loader = build(spec, dp_rank=dp_rank, dp_size=dp, reads_data=reads)
        key = f"tp{tp}_dp{dp}_pp{pp}"
        if reads:
            out[key] = {"dp_rank": dp_rank, "batches": take(loader, loader.batches_per_epoch, lookup)}
        else:
            assert isinstance(loader, IdleTrainLoader)
            try:
                iter(loader)
                raise AssertionError("an idle loader must refuse to be iterated")
            except RuntimeError as err:
                out[key] = {"dp_rank": dp_rank, "batches": None, "refused": str(err)}
        loader.close()
        dist.barrier()
    return out


def main():
    spec = json.loads(sys.argv[1])
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)
    lookup = block_ids(spec.get("lookup_path") or spec["path"])
    out = {"resume": mode_resume, "layouts": mode_layouts}[spec["mode"]](
        spec, rank, world, lookup)
    out["num_blocks"], out["unique_blocks"] = max(lookup.values()) + 1, len(lookup)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    Path(spec["out"], f"out_{rank}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main()
