"""Data pipeline: tokenizer round trip, AE/LM packing, shard index checks, hash verification, loaders, CLI."""
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from calm_megatron.data.corpus import Document, build_corpus_files, choose_valid_works, corpus_is_complete
from calm_megatron.data.shards import (check_shard_index, iter_blocks, iter_documents, num_blocks, verify_shards,
                                       write_shards)
from calm_megatron.data.tokenizer import (load_tokenizer, round_trip_ok, tokenizer_fingerprint,
                                          tokenizer_vocab_size, train_sentencepiece)

REPO = Path(__file__).resolve().parents[1]
K = 4
TRICKY = [
    "Tab\tseparated\tvalues and  double  spaces",
    "  leading and trailing spaces  ",
    "line one\nline two\n\n\nafter blank lines\n",
    "digits 0123456789 and 3.14159, 1,000,000",
    "unicode: café, naïve, straße, Ελληνικά, 日本語, emoji 🙂🚀",
    "windows\r\nline\rendings",
    "",
]


def _documents() -> list[str]:
    rng = np.random.default_rng(0)
    words = ("the quick brown fox jumps over lazy dog and then sleeps under a warm sun while birds sing "
             "ancient songs of kings queens rivers mountains 42 1999").split()
    docs = []
    for n in range(12):
        lines = [" ".join(rng.choice(words, size=int(rng.integers(3, 12)))) for _ in range(int(rng.integers(2, 30)))]
        docs.append(f"Document {n}.\n" + "\n".join(lines) + ("\n\tindented  line" if n % 3 == 0 else ""))
    return docs + TRICKY[:-1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A jsonl corpus, a tiny sentencepiece model, AE and LM shards."""
    root = tmp_path_factory.mktemp("data")
    docs = _documents()
    jsonl = root / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = train_sentencepiece([str(jsonl)], str(root / "tok" / "spm"), vocab_size=400)
    ae = write_shards([str(jsonl)], str(tok.path), str(root / "ae"), "ae", seq_len=32, chunk_size=K,
                      size_limit=1 << 12, progress=False)
    lm = write_shards([str(jsonl)], str(tok.path), str(root / "lm"), "lm", seq_len=64, chunk_size=K,
                      progress=False)
    return {"root": root, "docs": docs, "jsonl": jsonl, "tok": tok, "ae": root / "ae", "lm": root / "lm",
            "ae_index": ae, "lm_index": lm}


def _all_tokens(path) -> np.ndarray:
    return np.concatenate([block for _, block in iter_blocks(path)])


# ---------------------------------------------------------------- tokenizer

def test_round_trip_is_exact_on_tricky_text(corpus):
    tok = corpus["tok"]
    for text in TRICKY + ["\n".join(TRICKY), "never seen: ʘ‿ʘ ∮ E⋅da = Q \x00 \x7f"]:
        assert round_trip_ok(tok, text), repr(text)


def test_tokenizer_ids_vocab_and_fingerprint(corpus):
    tok, path = corpus["tok"], corpus["tok"].path
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert tokenizer_vocab_size(path) == tok.vocab_size <= 400
    assert tokenizer_fingerprint(path) == tok.fingerprint and len(tok.fingerprint) == 16
    assert load_tokenizer(str(path)[:-len(".model")]).fingerprint == tok.fingerprint  # prefix accepted


def test_hf_tokenizer_gets_a_pad_token(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    hf = Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel()
    hf.train_from_iterator(["hello world", "hello there"],
                           trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    hf.save(str(tmp_path / "tokenizer.json"))
    before = hf.get_vocab_size(with_added_tokens=True)
    tok = load_tokenizer(tmp_path)  # a folder holding tokenizer.json
    assert tok.vocab_size == before + 1 and tok.pad_id == before
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.encode("hello") and 1 not in tok.encode("hello")


# ---------------------------------------------------------------- packing

def test_ae_packing_keeps_documents_whole_and_chunk_aligned(corpus):
    tok, tokens = corpus["tok"], _all_tokens(corpus["ae"])
    assert all(len(block) == 32 for _, block in iter_blocks(corpus["ae"]))
    pos = 0
    for doc in (d for d in corpus["docs"] if d):
        assert pos % K == 0  # every document starts a chunk: no chunk straddles two documents
        ids = tok.encode(doc)
        assert tokens[pos:pos + len(ids)].tolist() == ids
        assert tokens[pos + len(ids)] == tok.eos_id
        end = pos + len(ids) + 1 + (-(len(ids) + 1) % K)
        assert (tokens[pos + len(ids) + 1:end] == tok.pad_id).all()
        pos = end
    assert (tokens[pos:] == tok.pad_id).all()  # the last partial block is padded, no text dropped
    assert len(tokens) - pos < 32


def test_lm_packing_bos_per_document_no_eos_remainder_dropped(corpus):
    tok, tokens = corpus["tok"], _all_tokens(corpus["lm"])
    stream = np.concatenate([[tok.bos_id] + tok.encode(d) for d in corpus["docs"] if d])
    assert len(tokens) == len(stream) // 64 * 64
    assert (tokens == stream[:len(tokens)]).all()
    assert tok.eos_id not in tokens.tolist()


def test_parallel_tokenization_is_identical(corpus, tmp_path):
    out = tmp_path / "ae2"
    write_shards([str(corpus["jsonl"])], str(corpus["tok"].path), str(out), "ae", seq_len=32, chunk_size=K,
                 workers=2, progress=False)
    assert (_all_tokens(out) == _all_tokens(corpus["ae"])).all()


def test_calm_index_records_how_blocks_were_made(corpus):
    index = json.loads((corpus["ae"] / "calm_index.json").read_text())
    tok = corpus["tok"]
    assert index["format_version"] == 1 and index["packing"] == "ae"
    assert (index["chunk_size"], index["seq_len"], index["vocab_size"]) == (K, 32, tok.vocab_size)
    assert (index["tokenizer"], index["tokenizer_fingerprint"]) == (tok.path.name, tok.fingerprint)
    assert (index["pad_id"], index["eos_id"], index["bos_id"]) == (3, 2, 1)
    assert index["num_documents"] == len([d for d in corpus["docs"] if d]) and index["num_empty_documents"] == 0
    assert index["num_samples"] == num_blocks(corpus["ae"]) > 1
    assert index["num_tokens"] == index["num_samples"] * 32 == len(_all_tokens(corpus["ae"]))
    assert index["num_text_tokens"] + index["num_documents"] + index["num_pad_tokens"] == index["num_tokens"]
    lm = json.loads((corpus["lm"] / "calm_index.json").read_text())
    assert lm["packing"] == "lm" and lm["num_dropped_tokens"] > 0


def test_blank_line_text_mode(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first para\nstill first\n\n  \nsecond para\n\n\nthird")
    assert list(iter_documents([path], txt_mode="blank-line")) == ["first para\nstill first", "second para",
                                                                  "third"]
    assert list(iter_documents([path])) == [path.read_text()]


# ---------------------------------------------------------------- index checks and verification

def test_check_shard_index_accepts_the_matching_run(corpus):
    tok = corpus["tok"]
    check_shard_index(corpus["ae"], stage="ae", chunk_size=K, vocab_size=tok.vocab_size, seq_len=32,
                      tokenizer=str(tok.path))
    for stage in ("calm", "ar"):
        check_shard_index(corpus["lm"], stage=stage, chunk_size=K, vocab_size=tok.vocab_size, seq_len=64)


@pytest.mark.parametrize("change, named", [
    ({"chunk_size": 8}, ["chunk_size=4", "chunk_size=8"]),
    ({"vocab_size": 999}, ["vocab_size=", "vocab_size=999"]),
    ({"seq_len": 64}, ["seq_len=32", "seq_len=64"]),
    ({"stage": "calm"}, ["packing=ae", "packing=lm"]),
])
def test_check_shard_index_names_both_values(corpus, change, named):
    args = dict(stage="ae", chunk_size=K, vocab_size=corpus["tok"].vocab_size, seq_len=32) | change
    with pytest.raises(ValueError) as err:
        check_shard_index(corpus["ae"], **args)
    message = str(err.value)
    assert str(corpus["ae"]) in message and "\n" not in message
    assert all(part in message for part in named), message


def test_check_shard_index_refuses_another_tokenizer(corpus, tmp_path):
    other = tmp_path / "other.model"
    other.write_bytes(corpus["tok"].path.read_bytes() + b"\0")
    with pytest.raises(ValueError, match=f"{corpus['tok'].fingerprint}.*{tokenizer_fingerprint(other)}"):
        check_shard_index(corpus["ae"], "ae", K, corpus["tok"].vocab_size, 32, tokenizer=str(other))


def test_check_shard_index_missing_or_empty(corpus, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        check_shard_index(tmp_path / "nope", "ae", K, 400, 32)
    (tmp_path / "no_index").mkdir()
    with pytest.raises(ValueError, match="calm_index.json"):
        check_shard_index(tmp_path / "no_index", "ae", K, 400, 32)
    empty = tmp_path / "empty"
    shutil.copytree(corpus["ae"], empty)
    index = json.loads((empty / "calm_index.json").read_text())
    (empty / "calm_index.json").write_text(json.dumps(index | {"num_samples": 0}))
    with pytest.raises(ValueError, match="zero samples"):
        check_shard_index(empty, "ae", K, corpus["tok"].vocab_size, 32)


def test_verify_shards_catches_a_flipped_byte(corpus, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(corpus["ae"], broken)
    assert verify_shards(broken) == len(json.loads((broken / "index.json").read_text())["shards"]) > 1
    shard = sorted(broken.glob("shard.*.mds.zstd"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=shard.name):
        verify_shards(broken)
    with pytest.raises(ValueError, match=shard.name):
        list(iter_blocks(broken))


# ---------------------------------------------------------------- loaders

def test_train_loader_batches_are_int64_and_deterministic(corpus):
    from calm_megatron.data.loader import build_train_loader

    def first_batches(seed, n):
        stream = iter(build_train_loader(str(corpus["ae"]), batch_size=2, seed=seed, dp_rank=0, dp_size=1))
        return [next(stream)["tokens"] for _ in range(n)]

    loader = build_train_loader(str(corpus["ae"]), batch_size=2, seed=7, dp_rank=0, dp_size=1)
    n = loader.batches_per_epoch + 2  # crosses into the second epoch
    batches = [b["tokens"] for _, b in zip(range(n), loader)]
    assert all(str(b.dtype) == "torch.int64" for b in batches)
    assert all(tuple(b.shape) == (2, 32) for b in batches) and loader.epoch == 1
    again = first_batches(7, 3)
    assert all((a == b).all() for a, b in zip(batches, again))
    other = first_batches(8, 3)
    assert any((a != b).any() for a, b in zip(batches, other))


def test_train_loader_state_resumes_batch_for_batch(corpus):
    from calm_megatron.data.loader import build_train_loader
    loader = build_train_loader(str(corpus["ae"]), batch_size=2, seed=5, dp_rank=0, dp_size=1)
    stream = iter(loader)
    for _ in range(3):
        next(stream)
    state = loader.state_dict()
    expected = [next(stream)["tokens"] for _ in range(3)]
    del stream, loader
    resumed = build_train_loader(str(corpus["ae"]), batch_size=2, seed=5, dp_rank=0, dp_size=1)
    resumed.load_state_dict(state)
    stream = iter(resumed)
    assert all((next(stream)["tokens"] == batch).all() for batch in expected)


def test_train_loader_refuses_a_rank_layout_it_cannot_serve(corpus):
    from calm_megatron.data.loader import build_train_loader
    with pytest.raises(ValueError, match=r"dp_size=2"):
        build_train_loader(str(corpus["ae"]), batch_size=2, seed=0, dp_rank=1, dp_size=2)


RANK_SCRIPT = textwrap.dedent("""
    import json, sys, torch.distributed as dist
    from calm_megatron.data.loader import build_train_loader
    rank, port, plain, replicated = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    def epoch(path, **kw):
        loader = build_train_loader(path, batch_size=1, seed=3, **kw)
        return [b["tokens"][0].tolist() for _, b in zip(range(loader.batches_per_epoch), loader)]
    out = {"dp": epoch(plain, dp_rank=rank, dp_size=2),
           "tp": epoch(replicated, dp_rank=0, dp_size=1, replication=2)}
    dist.barrier()
    print(json.dumps(out))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_data_parallel_ranks_get_disjoint_samples_and_replicas_identical(corpus, tmp_path):
    replicated = tmp_path / "replicated"
    shutil.copytree(corpus["ae"], replicated)  # its own folder: a second dataset in the same processes
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   PYTHONPATH=str(REPO))
        procs.append(subprocess.Popen([sys.executable, str(script), str(rank), str(port), str(corpus["ae"]),
                                       str(replicated)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=90)
        assert proc.returncode == 0, stderr[-2000:]
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    block_id = {tuple(b.tolist()): i for i, b in iter_blocks(corpus["ae"])}
    ids = [[block_id[tuple(s)] for s in out["dp"]] for out in outs]
    total = num_blocks(corpus["ae"])
    assert len(ids[0]) == len(ids[1]) == (total + 1) // 2
    assert len(set(ids[0]) & set(ids[1])) == total % 2  # disjoint (one sample repeated when total is odd)
    assert set(ids[0]) | set(ids[1]) == set(range(total))
    assert outs[0]["tp"] == outs[1]["tp"] and len(outs[0]["tp"]) == total


@pytest.mark.parametrize("dp_size, batch_size", [(1, 3), (2, 3), (3, 2)])
def test_eval_batches_cover_every_block_exactly_once(corpus, dp_size, batch_size):
    from calm_megatron.data.loader import iter_eval_batches, num_eval_batches
    path = corpus["ae"]
    expected = [tuple(b.tolist()) for _, b in iter_blocks(path)]
    seen = []
    for rank in range(dp_size):
        batches = list(iter_eval_batches(path, batch_size, rank, dp_size))
        assert len(batches) == num_eval_batches(path, batch_size, rank, dp_size)
        assert all(str(b["tokens"].dtype) == "torch.int64" and b["tokens"].shape[0] <= batch_size
                   for b in batches)
        seen += [tuple(row.tolist()) for b in batches for row in b["tokens"]]
    assert sorted(seen) == sorted(expected)
    capped = [tuple(row.tolist()) for r in range(dp_size)
              for b in iter_eval_batches(path, batch_size, r, dp_size, max_batches=1) for row in b["tokens"]]
    assert sorted(capped) == sorted(expected[:batch_size * dp_size])


# ---------------------------------------------------------------- corpus split and the CLI

def test_corpus_split_is_deterministic_and_keeps_editions_together(tmp_path):
    docs = [Document("shakespeare", f"play{i}_gut{ed}", f"shakespeare/play{i}", "x" * 1000)
            for i in range(40) for ed in ("", "_f")]
    docs += [Document("kjv", f"kjv_{b:02d}", f"kjv/{b:02d}", "y" * 2000) for b in range(30)]
    valid = choose_valid_works(docs, fraction=0.04, min_valid_chars=5000)
    assert valid == choose_valid_works(list(reversed(docs)), fraction=0.04, min_valid_chars=5000)
    assert any(w.startswith("kjv/") for w in valid) and any(w.startswith("shakespeare/") for w in valid)
    meta = build_corpus_files(docs, tmp_path, sources={})
    assert meta["train"]["documents"] + meta["valid"]["documents"] == len(docs)
    assert corpus_is_complete(tmp_path)
    (tmp_path / "valid.jsonl").write_text("")
    assert not corpus_is_complete(tmp_path)


@pytest.mark.parametrize("make_input, message", [
    (lambda d: d / "missing.jsonl", "not found"),
    (lambda d: (d / "empty.jsonl").write_text("") or d / "empty.jsonl", "empty"),
])
def test_prepare_data_rejects_missing_and_empty_input(corpus, tmp_path, make_input, message):
    path = make_input(tmp_path)
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "prepare_data.py"), "--input", str(path),
                           "--tokenizer", str(corpus["tok"].path), "--out", str(tmp_path / "out"),
                           "--packing", "ae", "--chunk-size", "4", "--seq-len", "32"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr and str(path) in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
