"""KV-cached generation (CALM and the baseline), the exact AE argmax, prompt modes, the checkpoint
loader and tools/generate.py end to end (CPU, one rank, tiny shapes)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

from calm_megatron import config as C
from tests.conftest import REPO, free_port

CALM_TINY = str(REPO / "configs/calm/tiny.yaml")
AR_TINY = str(REPO / "configs/ar/tiny.yaml")
PAD, EOS = 3, 2
# Small, mutually consistent autoencoder sizes (independent of what the tiny configs hold today).
SMALL_AE = ["autoencoder.hidden_size=64", "autoencoder.intermediate_size=128", "autoencoder.latent_size=16",
            "model.latent_size=16"]


@pytest.fixture(scope="module")
def calm(megatron_single):
    from calm_megatron.models.autoencoder import build_autoencoder
    from calm_megatron.models.calm import build_calm

    cfg = C.load(CALM_TINY, SMALL_AE)
    torch.manual_seed(0)
    model = build_calm(cfg.model, build_autoencoder(cfg.autoencoder)).eval()
    with torch.no_grad():  # the zero-initialised last head layer would make every draw the same chunk
        torch.nn.init.normal_(model.head.final_fc2.weight, std=0.05)
    return model


@pytest.fixture(scope="module")
def ar(megatron_single):
    from calm_megatron.models.ar import build_ar

    torch.manual_seed(0)
    return build_ar(C.load(AR_TINY).model).eval()


PROMPTS = [list(range(5, 5 + n)) for n in (9, 4, 13, 2)]  # lengths 9, 4, 13, 2 with K=4


def _pair(fn, model, max_new=12, **kw):
    """The same generation with the KV cache and with full recomputation (same seed)."""
    return [fn(model, PROMPTS, max_new, generator=torch.Generator().manual_seed(7), use_cache=cache, **kw)
            for cache in (True, False)]


# --------------------------------------------------------------------------- KV cache

def test_backbone_kv_cache_matches_full_forward(calm):
    """Megatron's static inference context through our backbone: prefill, one-position and multi-position steps."""
    from megatron.core.inference.contexts import StaticInferenceContext

    tokens = torch.randint(0, 4096, (3, 40), generator=torch.Generator().manual_seed(0))
    chunks = tokens.view(3, 10, 4)
    with torch.no_grad():
        full = calm.backbone(calm.embed_chunks(chunks))
        context = StaticInferenceContext(3, 10)
        outs = []
        for start, stop in ((0, 4), (4, 5), (5, 6), (6, 9), (9, 10)):
            outs.append(calm.backbone(calm.embed_chunks(chunks[:, start:stop]), inference_context=context))
            context.sequence_len_offset += stop - start
        cached = torch.cat(outs)
        assert torch.allclose(cached, full, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="KV cache holds"):
            calm.backbone(calm.embed_chunks(chunks[:, :1]), inference_context=context)


@pytest.mark.parametrize("options", [
    dict(),  # T=1, one plain draw, prompt_mode force (conditioning gives up after 64 draws here)
    dict(temperature=0.5, num_samples=24),  # Algorithm 2
    dict(temperature=1 / 3, num_samples=16, prompt_mode="left"),
    dict(temperature=0.7, sampler="exact", max_sampler_calls=8, on_cap="fallback"),  # Algorithm 1
    dict(prompt_mode="pad"),
])
def test_calm_kv_cached_generation_equals_recomputation(calm, options):
    from calm_megatron.generation import generate_calm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # cap fallbacks of an untrained model
        cached, recomputed = _pair(generate_calm, calm, pad_id=PAD, eos_id=EOS, max_prefix_draws=64, **options)
    assert cached.tokens == recomputed.tokens
    assert cached.finish_reasons == recomputed.finish_reasons == ["length"] * 4
    assert [len(t) for t in cached.tokens] == [12] * 4
    assert cached.steps == recomputed.steps  # the same backbone calls, one position each when cached
    assert cached.head_draws == recomputed.head_draws > 0


@pytest.mark.parametrize("options", [dict(), dict(temperature=0.7, top_p=0.9)])
def test_ar_kv_cached_generation_equals_recomputation(ar, options):
    from calm_megatron.generation import generate_ar

    cached, recomputed = _pair(generate_ar, ar, max_new=20, pad_id=PAD, **options)
    assert cached.tokens == recomputed.tokens
    assert [len(t) for t in cached.tokens] == [20] * 4


def test_eos_stops_only_its_sequence(calm, ar):
    """Deterministic draws (greedy baseline; a CALM head that ignores its noise), so rows are comparable."""
    from calm_megatron.generation import generate_ar, generate_calm

    saved = calm.head.noise_proj.weight.detach().clone()
    with torch.no_grad():
        calm.head.noise_proj.weight.zero_()
    try:
        for fn, model, extra in ((generate_ar, ar, dict(top_p=1e-9)),
                                 (generate_calm, calm, dict(pad_id=PAD, max_prefix_draws=8))):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                free = fn(model, PROMPTS, 16, **extra)
                eos = free.tokens[0][5]
                stopped = fn(model, PROMPTS, 16, eos_id=eos, **extra)
            for row, tokens in enumerate(free.tokens):
                if eos in tokens:
                    assert stopped.tokens[row] == tokens[:tokens.index(eos)]
                    assert stopped.finish_reasons[row] == "eos"
                else:
                    assert stopped.tokens[row] == tokens and stopped.finish_reasons[row] == "length"
    finally:
        with torch.no_grad():
            calm.head.noise_proj.weight.copy_(saved)


def test_context_limit_and_zero_new_tokens(calm, ar):
    from calm_megatron.generation import generate_ar, generate_calm

    full = generate_ar(ar, [list(range(128)), [1, 2, 3]], 5)
    assert full.tokens[0] == [] and full.finish_reasons == ["context", "length"] and len(full.tokens[1]) == 5
    near = generate_calm(calm, [list(range(4 * 63 + 2))], 50, pad_id=PAD, max_prefix_draws=4)
    assert near.finish_reasons == ["context"] and len(near.tokens[0]) == 2  # only the last chunk's free tokens
    assert generate_calm(calm, PROMPTS, 0, pad_id=PAD).tokens == [[]] * 4


# --------------------------------------------------------------------------- prompt modes

def test_prompt_modes_plan_the_fed_chunks():
    from calm_megatron.generation import _plan_calm_prompts

    prompt = [10, 11, 12, 13, 14, 15]  # 6 tokens, K=4
    force = _plan_calm_prompts([prompt], 4, 8, "force", PAD)
    assert force.full_chunks.tolist() == [1] and force.chunks[0, 0].tolist() == [10, 11, 12, 13]
    assert force.prefix_len.tolist() == [2] and force.prefix[0, :2].tolist() == [14, 15]
    pad = _plan_calm_prompts([prompt], 4, 8, "pad", PAD)
    assert pad.full_chunks.tolist() == [2] and pad.chunks[0, 1].tolist() == [14, 15, PAD, PAD]
    left = _plan_calm_prompts([prompt], 4, 8, "left", PAD)
    assert left.chunks[0, :2].flatten().tolist() == [PAD, PAD] + prompt and left.prefix_len.tolist() == [0]
    short = _plan_calm_prompts([[7, 8]], 4, 8, "force", PAD)  # shorter than K: left-padded to one chunk
    assert short.chunks[0, 0].tolist() == [PAD, PAD, 7, 8] and short.prefix_len.tolist() == [0]
    exact = _plan_calm_prompts([prompt[:4]], 4, 8, "force", PAD)
    assert exact.full_chunks.tolist() == [1] and exact.prefix_len.tolist() == [0]


def test_force_mode_conditions_the_first_chunk_on_the_prompt_tail():
    """draw_with_prefix is rejection sampling from the conditional; past the cap it overwrites."""
    from calm_megatron.generation import _ChunkSampler

    support = torch.tensor([[1, 2, 3, 4], [1, 5, 6, 7], [2, 2, 2, 2], [3, 3, 3, 3]])
    gen = torch.Generator().manual_seed(0)

    class Toy(_ChunkSampler):
        def draw(self, h, n):
            self.head_draws += h.shape[0] * n
            return support[torch.randint(0, 4, (h.shape[0], n), generator=gen)]

    sampler = Toy(None, type("D", (), {"chunk_size": 4})(), gen, max_prefix_draws=2048)
    prefix = torch.tensor([[1, 0, 0, 0], [9, 9, 0, 0], [0, 0, 0, 0]])
    chunks, short = sampler.draw_with_prefix(torch.zeros(3, 1), 400, prefix, torch.tensor([1, 2, 0]),
                                             torch.zeros(3, dtype=torch.bool))
    assert short.tolist() == [False, True, False]
    assert (chunks[0, :, 0] == 1).all()
    share = (chunks[0] == support[0]).all(-1).float().mean()
    assert 0.4 < share < 0.6  # P(chunk | starts with 1) is uniform over the two such chunks
    assert (chunks[1, :, :2] == 9).all()  # overwritten after the cap
    assert set(map(tuple, chunks[2].tolist())) == set(map(tuple, support.tolist()))


def test_pad_mode_feeds_pads_and_strips_them(calm):
    from calm_megatron.generation import generate_calm

    seen = []
    original = calm.embed_chunks
    calm.embed_chunks = lambda chunks: (seen.append(chunks.clone()), original(chunks))[1]
    try:
        out = generate_calm(calm, [[5, 6, 7, 8, 9, 10]], 4, prompt_mode="pad", pad_id=PAD)
    finally:
        del calm.embed_chunks
    assert seen[0][0].tolist() == [[5, 6, 7, 8], [9, 10, PAD, PAD]]
    assert PAD not in out.tokens[0]


# --------------------------------------------------------------------------- samplers

def test_fast_argmax_is_the_exact_argmax(megatron_single):
    from calm_megatron.generation import ChunkDecoder

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(20000, 96, generator=gen) * 0.02
    x = torch.randn(700, 96, generator=gen)
    x[:3] = weight[[5, 17, 19999]] * 50  # near-certain winners
    x[3] = 0  # every token ties: the lowest id wins (the full-fp32 path for a heavy row)
    weight[100:140] = weight[100]  # 40 identical rows: more candidates than the top-k pass holds ...
    x[4] = weight[100] * 50  # ... so this row is masked in full and rescored: the lowest id wins
    fake = type("AE", (), {"num_padded_local": 0, "decoder": None, "output_weight": weight,
                           "ae_config": type("A", (), {"chunk_size": 4})()})()
    fast, plain = ChunkDecoder(fake, fast=True), ChunkDecoder(fake, fast=False)
    exact = (x.double() @ weight.double().t()).argmax(-1)
    assert torch.equal(fast.argmax(x), exact)
    assert torch.equal(plain.argmax(x), exact)
    assert fast.argmax(x)[:5].tolist() == [5, 17, 19999, 0, 100]
    assert fast.top_k < 40 < fast.max_candidates


def test_chunk_decoder_matches_the_autoencoder(calm):
    from calm_megatron.generation import ChunkDecoder

    z = torch.randn(300, calm.model_cfg.latent_size, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ChunkDecoder(calm.autoencoder).decode(z), calm.decode_latents(z))


def test_staged_batch_approximation_is_algorithm_2(calm):
    """Decoding only shared prefixes gives Algorithm 2's selection over fully decoded draws."""
    from calm_megatron.generation import ChunkDecoder, _ChunkSampler
    from calm_megatron.sampling import sample_batch_approx

    decoder = ChunkDecoder(calm.autoencoder)
    h = torch.randn(6, calm.model_cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    fc2 = calm.head.final_fc2
    saved = fc2.weight.detach().clone(), fc2.bias.detach().clone()
    offset = torch.randn(fc2.bias.shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        try:  # all draws distinct; some repeated chunks; a few distinct chunks
            for scale, bias in ((1.0, 0.0), (1.0, 1.0), (0.1, 1.0)):
                fc2.weight.copy_(saved[0] * scale)
                fc2.bias.copy_(offset * bias)
                for temperature in (0.5, 0.25):
                    staged = _ChunkSampler(calm, decoder, torch.Generator().manual_seed(9), 0)
                    picked = staged.select_batch_approx(h, 64, temperature)
                    full = _ChunkSampler(calm, decoder, torch.Generator().manual_seed(9), 0)
                    candidates = full.draw(h, 64)
                    expected = sample_batch_approx(candidates, temperature, full.generator)
                    assert torch.equal(picked, expected)
                    assert staged.positions_decoded <= full.positions_decoded
                    if bias == 0.0:
                        assert staged.positions_decoded < 0.5 * full.positions_decoded
        finally:
            fc2.weight.copy_(saved[0])
            fc2.bias.copy_(saved[1])


def test_bad_inputs_are_refused(calm, ar):
    from calm_megatron.generation import generate_ar, generate_calm

    for temperature in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"temperature must be in \(0, 1\]"):
            generate_calm(calm, [[1, 2, 3, 4]], 4, temperature=temperature)
        with pytest.raises(ValueError, match=r"temperature must be in \(0, 1\]"):
            generate_ar(ar, [[1, 2, 3, 4]], 4, temperature=temperature)
    with pytest.raises(ValueError, match="T = 1/n"):
        generate_calm(calm, [[1, 2, 3, 4]], 4, temperature=0.4, sampler="batch")
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate_calm(calm, [[1, 2, 3, 4], []], 4)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        generate_ar(ar, [[]], 4)
    with pytest.raises(ValueError, match="longer than the context of 256 tokens"):
        generate_calm(calm, [list(range(257))], 4, pad_id=PAD)
    with pytest.raises(ValueError, match="longer than the context of 128 tokens"):
        generate_ar(ar, [list(range(129))], 4)
    with pytest.raises(ValueError, match="pass pad_id"):
        generate_calm(calm, [[1, 2, 3, 4, 5]], 4, prompt_mode="pad")
    with pytest.raises(ValueError, match="top_p"):
        generate_ar(ar, [[1]], 4, top_p=0.0)


# --------------------------------------------------------------------------- loading checkpoints

@pytest.mark.parametrize("global_layer_names", [True, False])
def test_loader_merges_tensor_and_pipeline_shards(megatron_single, tmp_path, global_layer_names, tiny_data,
                                                  monkeypatch, capsys):
    """A hand-made TP=2 x PP=2 step of a tiny baseline loads back into one TP=1 model.

    Shards as Megatron holds them (a SwiGLU fc1 shard is [its gates; its ups]); layer names global
    (current checkpoints) or numbered from 0 on each stage (older ones).
    """
    from safetensors.torch import save_file

    from calm_megatron.generation import generate, load_model_for_inference
    from calm_megatron.models.ar import build_ar

    cfg = C.load(AR_TINY, [f"model.vocab_size={tiny_data['vocab_size']}"])  # the tokenizer's vocabulary
    torch.manual_seed(1)
    ar = build_ar(cfg.model).eval()
    step = tmp_path / "step_00000001"
    (step / "model").mkdir(parents=True)
    C.save(cfg, str(step / "config.yaml"))
    (step / "trainer_state.json").write_text("{}")
    params = dict(ar.named_parameters())
    half = cfg.model.num_layers // 2

    def shard(name, value, tp):
        dim = value.partition_dim if getattr(value, "tensor_model_parallel", False) else -1
        if dim < 0:
            return value, dim
        if name.endswith("mlp.linear_fc1.weight"):
            gates, ups = value.chunk(2, dim)
            return torch.cat([gates.chunk(2, dim)[tp], ups.chunk(2, dim)[tp]], dim), dim
        return value.chunk(2, dim)[tp], dim

    for pp in range(2):
        for tp in range(2):
            tensors, meta = {}, {}
            for name, value in params.items():
                layer = int(name.split("layers.")[1].split(".")[0]) if "layers." in name else None
                stage = layer // half if layer is not None else (0 if name.startswith("embedding") else 1)
                if stage != pp:
                    continue
                if layer is not None and not global_layer_names:
                    name = name.replace(f"layers.{layer}.", f"layers.{layer - pp * half}.")
                local, dim = shard(name, value, tp)
                tensors[f"model/{name}"] = local.detach().clone().contiguous()
                meta[name] = {"partition_dim": dim, "shape": list(local.shape)}
                if global_layer_names:
                    meta[name]["glu"] = name.endswith("mlp.linear_fc1.weight")
            save_file(tensors, str(step / "model" / f"tp{tp:02d}_pp{pp:02d}.safetensors"))
            (step / "model" / f"tp{tp:02d}_pp{pp:02d}.json").write_text(json.dumps({"tp": 2, "params": meta}))
    loaded = load_model_for_inference(str(step), verify=False)
    assert loaded.stage == "ar" and loaded.tokenizer is None
    for name, value in loaded.model.named_parameters():
        assert torch.equal(value, params[name]), name
    out = generate(loaded, [[5, 6, 7]], 4, temperature=0.5, top_p=0.9, num_samples=8, sampler="exact",
                   generator=torch.Generator().manual_seed(0))  # CALM-only options are ignored
    assert out.finish_reasons == ["length"] and len(out.tokens[0]) == 4
    if global_layer_names:  # the tool on this baseline step: any T in (0, 1] (no 1/n rule), top-p
        from calm_megatron.training.checkpoint import write_manifest

        write_manifest(step)
        code, stdout, err = _tool_main(monkeypatch, capsys, step, "--prompt", "the king", "--temperature", "0.7",
                                       "--top-p", "0.9", "--max-new-tokens", "5", "--tokenizer", tiny_data["tokenizer"])
        assert code == 0, err
        assert stdout.splitlines()[0].startswith("the king") and "ar, 1 prompt(s), T=0.7" in stdout


# --------------------------------------------------------------------------- tools/generate.py

def _run(args, timeout=240):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def calm_run(tiny_data, tmp_path_factory):
    """A 2-step tiny autoencoder, then a 2-step tiny CALM on it, through the real entry point."""
    out = tmp_path_factory.mktemp("gen_runs")
    common = [f"data.tokenizer={tiny_data['tokenizer']}", "train.steps=2", "train.log_interval=1",
              "train.progress_bar=false", "logging.wandb_mode=disabled"]
    vocab = tiny_data["vocab_size"]
    ae = _run(["-m", "calm_megatron.train", "configs/ae/tiny.yaml", *common, f"data.train={tiny_data['ae_train']}",
               f"autoencoder.vocab_size={vocab}", *SMALL_AE[:3], "train.seq_len=64", "train.micro_batch_size=2", "train.global_batch_size=2",
               "optim.warmup_steps=0", f"run.out_dir={out / 'ae'}"])
    assert ae.returncode == 0, ae.stderr[-3000:]
    lm = _run(["-m", "calm_megatron.train", "configs/calm/tiny.yaml", *common, f"data.train={tiny_data['lm_train']}",
               f"autoencoder.vocab_size={vocab}", f"model.vocab_size={vocab}", *SMALL_AE, "train.seq_len=128",
               "model.max_position_embeddings=64", "train.micro_batch_size=1",
               "train.global_batch_size=1", f"model.autoencoder_checkpoint={out / 'ae'}", f"run.out_dir={out / 'calm'}"])
    assert lm.returncode == 0, lm.stderr[-3000:]
    return out / "calm"


def _tool_main(monkeypatch, capsys, *args):
    """tools/generate.py's main() in this process (distributed teardown disabled): (exit code, stdout, stderr)."""
    import runpy

    from calm_megatron import distributed

    tool = runpy.run_path(str(REPO / "tools/generate.py"), run_name="generate_tool")
    monkeypatch.setattr(distributed, "teardown", lambda: None)
    monkeypatch.setattr(sys, "argv", ["generate.py", *map(str, args)])
    code = tool["main"]()
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generate_tool_end_to_end(calm_run, monkeypatch, capsys):
    result = _run(["tools/generate.py", str(calm_run), "--prompt", "The king shall", "--prompt", "Thou art",
                   "--max-new-tokens", "8", "--temperature", "0.5", "--num-samples", "16", "--json"])
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [line["prompt"] for line in lines[:2]] == ["The king shall", "Thou art"]
    assert all(len(line["new_tokens"]) <= 8 and line["text"].startswith(line["prompt"]) for line in lines[:2])
    assert all(line["finish_reason"] in ("length", "eos") for line in lines[:2])
    assert lines[2]["tokens_per_second"] > 0
    code, out, err = _tool_main(monkeypatch, capsys, calm_run / "checkpoints", "--prompt", "Thou art",
                                "--sampler", "exact", "--temperature", "0.7", "--max-new-tokens", "4")
    assert code == 0 and out.splitlines()[0].startswith("Thou art") and "tokens/s:" in out.splitlines()[-1]
    code, out, err = _tool_main(monkeypatch, capsys, calm_run, "--prompt", "The " * 400, "--max-new-tokens", "4")
    assert code == 2 and err.startswith("error: ") and "longer than the context" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["--temperature", "0"], r"temperature must be in \(0, 1\]"),
    (["--temperature", "1.2"], r"temperature must be in \(0, 1\]"),
    (["--temperature", "0.4"], "T = 1/n"),
    (["--prompt", ""], "prompt 1 is empty"),
    (["--prompts-file", "/nonexistent/prompts.txt"], "No such file"),
])
def test_generate_tool_refuses_bad_input(args, message, tmp_path, monkeypatch, capsys):
    code, _, err = _tool_main(monkeypatch, capsys, tmp_path, "--prompt", "hello", *args)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
