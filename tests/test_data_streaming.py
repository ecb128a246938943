"""Streaming token shards from a real S3-compatible store (SeaweedFS): writing, exact resume on several ranks and
at another data-parallel size, rank layouts (TP peers, DP shares, pipeline stages), stream mixtures, and
failures that become clear errors (store killed, store restarted, corrupt shard, mismatched data, credentials).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from calm_megatron.data.shards import write_shards
from calm_megatron.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from tests.conftest import REPO, data_overrides, free_port
from tests.services.seaweedfs import seaweedfs  # noqa: F401  (session-scoped fixture)

K, SEQ = 4, 64
BATCH = 2  # per rank: with E % 8 == 0 both 2 ranks and 1 rank consume whole epochs


def _blocks_of(tok, docs) -> int:
    """AE blocks the packing rule makes of `docs` (EOS per document, padded to K, cut into SEQ-token blocks)."""
    tokens = sum(-(-(len(tok.encode(d)) + 1) // K) * K for d in docs)
    return -(-tokens // SEQ)


def _prepare(args, env=None, timeout=180):
    return subprocess.run([sys.executable, str(REPO / "tools" / "prepare_data.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


@pytest.fixture(scope="module")
def s3_corpus(seaweedfs, tiny_data, tmp_path_factory):  # noqa: F811
    """Two AE streams on s3 written by tools/prepare_data.py: `a` (a number of blocks divisible by 8, many small
    shards) and `b` (another corpus), plus the same `a` written locally."""
    root = tmp_path_factory.mktemp("s3_corpus")
    tok = load_tokenizer(tiny_data["tokenizer"])
    docs = [json.loads(line)["text"] for line in open(tiny_data["root"] / "train.jsonl")]
    n = next(n for n in range(150, len(docs)) if _blocks_of(tok, docs[:n]) % 8 == 0)
    (root / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:n]))
    (root / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[n:n + 60]))
    common = ["--tokenizer", tiny_data["tokenizer"], "--packing", "ae", "--chunk-size", K, "--seq-len", SEQ,
              "--shard-mb", "0.004"]
    result = _prepare(["--input", root / "a.jsonl", "--out", "s3://calm/stream/a", "--workers", 2, *common])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "s3://calm/stream/a:" in result.stdout and "tokenizing" in result.stderr  # summary, progress bar
    for name, out in (("b", "s3://calm/stream/b"), ("a", str(root / "a_local"))):
        write_shards([str(root / f"{name}.jsonl")], str(tiny_data["tokenizer"]), out, "ae", seq_len=SEQ,
                     chunk_size=K, size_limit=int(0.004 * (1 << 20)), progress=False)
    return {"a": "s3://calm/stream/a", "b": "s3://calm/stream/b", "local": root / "a_local", "root": root,
            "tok": tok, "vocab": tok.vocab_size, "num_a": _blocks_of(tok, docs[:n])}


def _run_ranks(spec: dict, nproc: int, tmp_path: Path, timeout: float = 240) -> list:
    """Launch tests/dist/data_streaming.py on `nproc` gloo ranks (one process each); return every rank's JSON."""
    out = tmp_path / f"{spec['mode']}_{nproc}"
    out.mkdir()
    spec = dict(spec, out=str(out))
    port = free_port()
    procs = []
    for rank in range(nproc):
        env = {**os.environ, "PYTHONPATH": str(REPO), "RANK": str(rank), "WORLD_SIZE": str(nproc),
               "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(REPO / "tests" / "dist" / "data_streaming.py"),
                                       json.dumps(spec)], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + timeout
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=max(1, deadline - time.monotonic()))[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    failed = [(rank, p.returncode) for rank, p in enumerate(procs) if p.returncode != 0]
    assert not failed, f"ranks failed {failed}:\n" + "\n".join(log[-4000:] for log in logs)
    return [json.loads((out / f"out_{rank}.json").read_text()) for rank in range(nproc)]


def _flat(batches) -> list:
    return [i for batch in batches for i in batch]


# ---------------------------------------------------------------- writing and checking on s3

def test_prepare_data_to_s3_matches_local_and_checks_the_run(s3_corpus):
    from calm_megatron import config as C
    from calm_megatron.data.shards import check_shard_index, iter_blocks, read_shard_index

    remote = [b.tolist() for _, b in iter_blocks(s3_corpus["a"])]
    local = [b.tolist() for _, b in iter_blocks(s3_corpus["local"])]
    assert remote == local and len(remote) == s3_corpus["num_a"]
    index = read_shard_index(s3_corpus["a"])
    assert (index["packing"], index["chunk_size"], index["seq_len"], index["vocab_size"]) == ("ae", K, SEQ,
                                                                                              s3_corpus["vocab"])
    assert index["tokenizer_fingerprint"] == s3_corpus["tok"].fingerprint and index["num_samples"] == len(remote)
    both = f"{s3_corpus['a']},{s3_corpus['b']}"
    assert check_shard_index(both, "ae", K, s3_corpus["vocab"], SEQ, tokenizer=str(s3_corpus["tok"].path))[
        "num_samples"] == len(remote) + read_shard_index(s3_corpus["b"])["num_samples"]
    with pytest.raises(ValueError, match=r"chunk_size=4 but the run uses chunk_size=8"):
        check_shard_index(s3_corpus["a"], "ae", 8, s3_corpus["vocab"], SEQ)
    other = s3_corpus["root"] / "other.model"
    other.write_bytes(s3_corpus["tok"].path.read_bytes() + b"\0")
    with pytest.raises(ValueError) as err:
        check_shard_index(s3_corpus["a"], "ae", K, s3_corpus["vocab"], SEQ, tokenizer=str(other))
    assert s3_corpus["tok"].fingerprint in str(err.value) and tokenizer_fingerprint(other) in str(err.value)
    # the trainer's config validation refuses it the same way, naming both values
    base = ["autoencoder.vocab_size=%d" % s3_corpus["vocab"], f"train.seq_len={SEQ}", f"data.train={both}"]
    cfg = C.load("configs/ae/tiny.yaml", base + ["autoencoder.chunk_size=8"])
    with pytest.raises(C.ConfigError, match=r"data.train: s3://calm/stream/a: .*chunk_size=4 .*chunk_size=8"):
        C.validate(cfg, 1)
    with pytest.raises(ValueError, match="has no calm_index.json"):
        read_shard_index("s3://calm/stream/nothing")
    result = _prepare(["--input", s3_corpus["root"] / "b.jsonl", "--tokenizer", s3_corpus["tok"].path, "--out",
                       s3_corpus["b"], "--packing", "ae", "--chunk-size", K, "--seq-len", SEQ, "--no-progress"])
    assert result.returncode == 2 and "is not empty" in result.stderr and "--overwrite" in result.stderr


def test_eval_batches_from_s3_equal_local(s3_corpus):
    from calm_megatron.data.loader import iter_eval_batches

    for rank in range(2):
        remote = [b["tokens"].tolist() for b in iter_eval_batches(s3_corpus["a"], 3, rank, 2, max_batches=4)]
        local = [b["tokens"].tolist() for b in iter_eval_batches(str(s3_corpus["local"]), 3, rank, 2, max_batches=4)]
        assert remote == local and len(remote) == 4


# ---------------------------------------------------------------- ranks and resume (from s3)

def test_two_ranks_resume_batch_for_batch_and_split_the_epoch(s3_corpus, tmp_path):
    """2 ranks from s3: resume at several points (odd ones, the last batch of the epoch, the epoch end, into the
    next epoch) equals the uninterrupted run on every rank; DP shares are disjoint and cover the epoch; TP peers
    read identical batches; a resume at dp=1 from the dp=2 states yields exactly the rest of the epoch."""
    spec = {"mode": "resume", "path": s3_corpus["a"], "lookup_path": str(s3_corpus["local"]), "batch_size": BATCH,
            "seed": 7, "points": [1, 3, 6, "P-1", "P", "P+1"], "remaining_points": [0, 1, 3, 6, "P-1"]}
    outs = _run_ranks(spec, 2, tmp_path)
    total = s3_corpus["num_a"]
    assert all(o["num_blocks"] == o["unique_blocks"] == total for o in outs)  # ids identify blocks
    per_epoch = outs[0]["per_epoch"]
    assert per_epoch == total // (2 * BATCH)
    assert outs[0]["states"] == outs[1]["states"]  # one global position
    assert [int(p) for p in outs[0]["points"]] == [1, 3, 6, per_epoch - 1, per_epoch, per_epoch + 1]
    for rank, out in enumerate(outs):
        for n, got in out["resumed"].items():
            assert got == out["ref"][int(n):], f"rank {rank} resumed at step {n} differs"
    epoch = [_flat(o["ref"][:per_epoch]) for o in outs]
    assert not set(epoch[0]) & set(epoch[1])  # DP ranks: disjoint shares ...
    assert sorted(epoch[0] + epoch[1]) == list(range(total))  # ... that cover the epoch exactly once
    assert outs[0]["ref"][per_epoch:] != outs[0]["ref"][:3]  # the next epoch is reshuffled
    assert outs[0]["remaining"] == outs[1]["remaining"]  # TP peers: identical batches
    assert sorted(_flat(outs[0]["remaining"]["0"])) == list(range(total))
    for n in (1, 3, 6, per_epoch - 1):  # 2 -> 1 rank: exactly the rest of the epoch
        seen = _flat(outs[0]["ref"][:n]) + _flat(outs[1]["ref"][:n])
        rest = _flat(outs[0]["remaining"][str(n)])
        assert len(rest) == total - len(seen) and sorted(seen + rest) == list(range(total)), f"resume at {n}"


@pytest.mark.slow
def test_megatron_rank_layouts_tp_peers_and_pipeline_stages(s3_corpus, tmp_path):
    """4 ranks in Megatron's order (tp fastest, then dp, then pp): every reader of one DP replica (all its TP
    ranks, first and last pipeline stage) gets the same batches; middle stages read nothing."""
    layouts = [[2, 2, 1], [1, 2, 2], [1, 1, 4]]
    outs = _run_ranks({"mode": "layouts", "path": s3_corpus["a"], "lookup_path": str(s3_corpus["local"]),
                       "batch_size": BATCH, "seed": 3, "layouts": layouts}, 4, tmp_path)
    total = s3_corpus["num_a"]
    for tp, dp, pp in layouts:
        key = f"tp{tp}_dp{dp}_pp{pp}"
        by_dp = {}
        for rank, out in enumerate(outs):
            entry = out[key]
            pp_rank = rank // (tp * dp)
            if pp_rank not in (0, pp - 1):
                assert entry["batches"] is None and "reads no data" in entry["refused"]
                continue
            by_dp.setdefault(entry["dp_rank"], []).append(entry["batches"])
        assert sorted(by_dp) == list(range(dp)), key
        for replicas in by_dp.values():
            assert all(r == replicas[0] for r in replicas), f"{key}: readers of one replica differ"
        shares = [_flat(r[0]) for r in by_dp.values()]
        assert sorted(sum(shares, [])) == list(range(total)), key


# ---------------------------------------------------------------- mixtures, determinism, epoch accounting

def test_partial_batches_and_odd_resume_points_keep_the_epoch_count(tiny_data):
    """Every epoch's batch count is asserted against its partition (an epoch cut short is an error); with a
    batch size that does not divide the epoch and odd resume points, nothing trips and order is kept."""
    from calm_megatron.data.loader import build_train_loader, expected_batches

    path = str(tiny_data["ae_train"])
    loader = build_train_loader(path, batch_size=3, seed=2, dp_rank=0, dp_size=1)
    epoch_size, per_epoch = loader.dataset.epoch_size, loader.batches_per_epoch
    assert epoch_size % 3 and per_epoch == expected_batches(epoch_size, 1, 1, 3) == epoch_size // 3
    stream, ref, states = iter(loader), [], []
    for _ in range(2 * per_epoch + 2):
        ref.append(next(stream)["tokens"])
        states.append(loader.state_dict())
    loader.close()
    for n in (0, 7, per_epoch - 1, per_epoch, per_epoch + 3):
        resumed = build_train_loader(path, batch_size=3, seed=2, dp_rank=0, dp_size=1)
        resumed.load_state_dict(states[n])
        stream = iter(resumed)
        assert all((next(stream)["tokens"] == batch).all() for batch in ref[n + 1:])
        resumed.close()
    assert expected_batches(10, 1, 2, 2, 0) == 2 and expected_batches(10, 1, 2, 2, 8) == 0
    assert expected_batches(11, 1, 2, 1, 0) == 6 and expected_batches(11, 4, 1, 1, 0) == 12


def test_explicit_cache_dir_is_reused_locked_and_refreshed(tiny_data, tmp_path):
    """data.cache_dir survives restarts (shards are not fetched again), refuses a second live loader, and is
    emptied when the data behind it was rewritten."""
    from calm_megatron.data.loader import build_train_loader

    data, cache = tmp_path / "data", tmp_path / "cache"
    shutil.copytree(tiny_data["ae_train"], data)

    def run(n=3):
        loader = build_train_loader(str(data), batch_size=2, seed=1, dp_rank=0, dp_size=1, cache_dir=str(cache))
        batches = [b["tokens"] for _, b in zip(range(n), loader)]
        return loader, batches

    first, batches = run()
    with pytest.raises(ValueError, match="in use by another loader"):
        run()
    first.close()
    cached = sorted(p.name for p in cache.rglob("shard.*.mds"))
    assert cached
    stamp = {p: p.stat().st_mtime_ns for p in cache.rglob("shard.*.mds")}
    again, batches_again = run()
    assert all((a == b).all() for a, b in zip(batches, batches_again))
    assert all(p.stat().st_mtime_ns == t for p, t in stamp.items())  # read from the cache, not fetched again
    again.close()
    shutil.rmtree(data)
    shutil.copytree(tiny_data["lm_train"], data)  # other data under the same path
    fresh, batches_fresh = run()
    fresh.close()
    assert fresh.seq_len == 128 and all(b.shape == (2, 128) for b in batches_fresh)  # no stale 64-token shard


def test_stream_lists_and_weights_are_checked():
    from calm_megatron.data.streams import parse_streams

    assert [s.weight for s in parse_streams("a,b", [1, 3])] == [1.0, 3.0]
    assert parse_streams(" a , s3://b/c ")[1].path == "s3://b/c"
    for train, weights, message in (("a,a", [], "twice"), ("a,b", [1], "has 1 values"), ("a", [0], "> 0"),
                                    ("a,,b", [], "comma-separated"), ("gs://x/y", [], "unsupported")):
        with pytest.raises(ValueError, match=message):
            parse_streams(train, weights)


def test_weighted_mixture_is_deterministic_and_resumes(s3_corpus):
    from calm_megatron.data.loader import build_train_loader
    from calm_megatron.data.shards import iter_blocks, read_shard_index

    paths = f"{s3_corpus['a']},{s3_corpus['b']}"
    sizes = [read_shard_index(p)["num_samples"] for p in (s3_corpus["a"], s3_corpus["b"])]
    lookup = {}
    for stream, path in enumerate((s3_corpus["a"], s3_corpus["b"])):
        lookup.update({b.tobytes(): (stream, i) for i, b in iter_blocks(path)})

    def epoch(seed, state=None, weights=(1.0, 3.0)):
        loader = build_train_loader(paths, batch_size=BATCH, seed=seed, dp_rank=0, dp_size=1, weights=weights)
        if state:
            loader.load_state_dict(state)
        stream, rows, states = iter(loader), [], []
        for _ in range(loader.batches_per_epoch):
            rows += [lookup[r.numpy().astype("uint32").tobytes()] for r in next(stream)["tokens"]]
            states.append(loader.state_dict())
        loader.close()
        return rows, states

    rows, states = epoch(5)
    total = sum(sizes)
    from_b = sum(1 for s, _ in rows if s == 1)
    assert len(rows) == total - total % BATCH and abs(from_b - 0.75 * total) <= BATCH  # weight 3 of 4
    assert from_b > sizes[1]  # stream b is upsampled to its weight
    assert epoch(5)[0] == rows and epoch(6)[0] != rows  # deterministic per seed
    again, _ = epoch(5, states[4])  # the state after 5 batches (10 samples)
    assert again[:len(rows) - 10] == rows[10:]
    with pytest.raises(ValueError, match="train_weights has 1 values but data.train names 2"):
        build_train_loader(paths, batch_size=BATCH, seed=5, dp_rank=0, dp_size=1, weights=[1.0])


# ---------------------------------------------------------------- failures

def _ids(batch) -> list:
    return [tuple(r) for r in batch["tokens"].tolist()]


def _reference(path, **kw):
    from calm_megatron.data.loader import build_train_loader

    loader = build_train_loader(path, batch_size=4, seed=1, dp_rank=0, dp_size=1, shuffle=False, predownload=4, **kw)
    batches = [_ids(b) for _, b in zip(range(loader.batches_per_epoch), loader)]
    loader.close()
    return batches


def _loader(path, **kw):
    from calm_megatron.data.loader import build_train_loader

    return build_train_loader(path, batch_size=4, seed=1, dp_rank=0, dp_size=1, shuffle=False, predownload=4, **kw)


def test_store_restarted_within_seconds_loses_nothing(s3_corpus, seaweedfs):  # noqa: F811
    ref = _reference(s3_corpus["a"])
    loader = _loader(s3_corpus["a"], timeout_s=60)
    stream = iter(loader)
    got = [_ids(next(stream)) for _ in range(len(ref) // 4)]
    seaweedfs.kill()
    start = time.monotonic()
    restart = threading.Thread(target=seaweedfs.start)
    restart.start()
    try:
        got += [_ids(next(stream)) for _ in range(len(ref) - len(got))]
    finally:
        restart.join()
        loader.close()
    assert got == ref
    assert time.monotonic() - start > 2  # the store really was away while the loader needed it


def test_store_killed_mid_epoch_fails_within_timeout_then_resumes(s3_corpus, seaweedfs):  # noqa: F811
    from calm_megatron.data.errors import DataStorageError

    ref = _reference(s3_corpus["a"])
    timeout = 6.0
    loader = _loader(s3_corpus["a"], timeout_s=timeout)
    stream = iter(loader)
    got = [_ids(next(stream)) for _ in range(len(ref) // 3)]
    state = loader.state_dict()
    seaweedfs.kill()
    start = time.monotonic()
    try:
        with pytest.raises(DataStorageError) as err:
            while True:
                got.append(_ids(next(stream)))
                state = loader.state_dict()
        elapsed = time.monotonic() - start
    finally:
        loader.close()
        seaweedfs.start()
    message = str(err.value)
    assert err.value.resumable and elapsed < timeout + 10, (elapsed, message)  # slack for loaded CI hosts
    assert seaweedfs.endpoint in message and re.search(r"shard\.\d{5}\.mds\.zstd", message), message
    resumed = _loader(s3_corpus["a"], timeout_s=30)
    resumed.load_state_dict(state)
    rest = [_ids(b) for _, b in zip(range(len(ref) - len(got)), resumed)]
    resumed.close()
    assert got + rest == ref


def test_store_killed_with_loader_workers_fails_within_timeout(s3_corpus, seaweedfs):  # noqa: F811
    from calm_megatron.data.errors import DataStorageError

    timeout = 6.0
    loader = _loader(s3_corpus["a"], timeout_s=timeout, num_workers=2)
    stream = iter(loader)
    for _ in range(3):
        next(stream)
    seaweedfs.kill()
    start = time.monotonic()
    try:
        with pytest.raises(DataStorageError) as err:
            for _ in range(loader.batches_per_epoch):
                next(stream)
        elapsed = time.monotonic() - start
    finally:
        loader.close()
        seaweedfs.start()
    assert err.value.resumable and elapsed < timeout + 10 and "data.timeout_s=6" in str(err.value), str(err.value)


def test_corrupt_shard_is_named(s3_corpus, seaweedfs, tmp_path):  # noqa: F811
    from calm_megatron.data.errors import DataCorruptionError

    client = seaweedfs.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="calm", Prefix="stream/a/")["Contents"]]
    for key in keys:
        client.copy_object(Bucket="calm", Key=key.replace("stream/a/", "stream/bad/"),
                           CopySource={"Bucket": "calm", "Key": key})
    victim = "stream/bad/shard.00003.mds.zstd"
    data = bytearray(client.get_object(Bucket="calm", Key=victim)["Body"].read())
    data[len(data) // 2] ^= 0x01
    client.put_object(Bucket="calm", Key=victim, Body=bytes(data))
    loader = _loader("s3://calm/stream/bad", timeout_s=20)
    try:
        with pytest.raises(DataCorruptionError, match=r"s3://calm/stream/bad/shard\.00003\.mds\.zstd is corrupt"):
            list(zip(range(loader.batches_per_epoch + 1), loader))
    finally:
        loader.close()
    assert DataCorruptionError("x").resumable is False
    local = tmp_path / "bad"
    shutil.copytree(s3_corpus["local"], local)
    shard = local / "shard.00002.mds.zstd"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    shard.write_bytes(bytes(raw))
    loader = _loader(str(local), timeout_s=20)
    try:
        with pytest.raises(DataCorruptionError, match=re.escape(str(shard))):
            list(zip(range(loader.batches_per_epoch + 1), loader))
    finally:
        loader.close()


def test_unreachable_store_and_bad_credentials_are_clear(s3_corpus, monkeypatch):
    from calm_megatron.data.errors import DataStorageError
    from calm_megatron.data.shards import read_shard_index

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(DataStorageError, match="access denied") as err:
        read_shard_index(s3_corpus["a"])
    assert not err.value.resumable and "not-the-secret" not in str(err.value)
    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://user:pw@127.0.0.1:{free_port()}")
    from calm_megatron.data import storage
    with pytest.raises(DataStorageError, match=r"failed after 2 attempt\(s\).*endpoint http://127\.0\.0\.1") as err:
        storage.read_bytes(s3_corpus["a"] + "/calm_index.json", storage.RetryPolicy(attempts=2))
    assert err.value.resumable and "pw@" not in str(err.value)


# ---------------------------------------------------------------- a real training run from s3

def test_training_from_s3_never_writes_credentials(s3_corpus, seaweedfs, tiny_data, tmp_path):  # noqa: F811
    """`python -m calm_megatron.train` streams from s3:// with a secret key in the environment; neither the
    key id nor the secret appears in its output, logs, saved config or checkpoints."""
    train = "s3://calm/leakcheck/ae_train"
    write_shards([str(tiny_data["root"] / "train.jsonl")], str(tiny_data["tokenizer"]), train, "ae", seq_len=SEQ,
                 chunk_size=K, progress=False, overwrite=True)
    key_id = "CALMLEAKCHECKKEY02"
    env = {**os.environ, **seaweedfs.env(key_id), "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu",
           "WANDB_MODE": "disabled"}
    secret = env["AWS_SECRET_ACCESS_KEY"]
    out = tmp_path / "run"
    args = [*data_overrides(tiny_data, "ae"), f"data.train={train}", f"data.cache_dir={tmp_path / 'cache'}",
            f"autoencoder.vocab_size={tiny_data['vocab_size']}", "autoencoder.hidden_size=32",
            "autoencoder.intermediate_size=64", "autoencoder.latent_size=8", f"train.seq_len={SEQ}",
            "train.steps=3", "train.micro_batch_size=2", "train.global_batch_size=2", "train.eval_batches=1",
            "train.progress_bar=false", "checkpoint.interval=2", "logging.wandb_mode=disabled",
            f"run.out_dir={out}"]
    result = subprocess.run([sys.executable, "-m", "calm_megatron.train", "configs/ae/tiny.yaml", *args], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    state = json.loads((out / "checkpoints" / "step_00000003" / "trainer_state.json").read_text())
    assert state["loader"]["sample_in_epoch"] == 6  # the loader state went into the checkpoint
    assert train in (out / "config.yaml").read_text()
    texts = [result.stdout, result.stderr]
    files = [p for p in out.rglob("*") if p.is_file()] + [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert len(files) > 5
    for path in files:
        texts.append(path.read_bytes().decode("latin-1"))
    for text in texts:
        assert secret not in text and key_id not in text
