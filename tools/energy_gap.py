#!/usr/bin/env python
"""The headroom CALM's energy loss offers on an autoencoder: the baseline's next chunks vs random ones.

At every chunk start of held-out blocks, N chunks are sampled from the autoregressive baseline (K
tokens, T=1) and N chunks are taken from random positions (the marginal); both are encoded by the
autoencoder and scored with CALM's energy loss against the true chunk's posterior
(calm_megatron/metrics/energy_gap.py). Prints JSON: reference_loss, marginal_loss, gap = 1 -
reference/marginal. A CALM as good as the baseline could lower its loss by about `gap` below the
marginal level; a small gap means little training signal.

usage: tools/energy_gap.py --autoencoder AE_OR_CALM_RUN --baseline AR_RUN [--data HELD_OUT] [--batches 2]
"""
import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--autoencoder", required=True, help="an autoencoder run/step, or a CALM one (its frozen AE)")
    parser.add_argument("--baseline", required=True, help="a baseline (ar) run/step or HF folder")
    parser.add_argument("--data", help="held-out MDS shard folder (default: the baseline's data.valid)")
    parser.add_argument("--batches", type=int, default=2, help="batches of held-out blocks to score")
    parser.add_argument("--batch-size", type=int, default=4, help="blocks per batch")
    parser.add_argument("--samples", type=int, default=8, help="N chunks per position for each side")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the sampling")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    import torch

    from calm_megatron.cli import exit_status
    from calm_megatron.hf import HFFormatError
    from calm_megatron.hf.brier import held_out_blocks, held_out_data
    from calm_megatron.hf.loading import load_model
    from calm_megatron.metrics.energy_gap import ar_next_chunks, energy_gap
    from calm_megatron.training.checkpoint import CheckpointError

    def work() -> int:
        ae_source, baseline = load_model(args.autoencoder), load_model(args.baseline)
        if ae_source.kind not in ("ae", "calm"):
            raise ValueError(f"--autoencoder {args.autoencoder} is a {ae_source.kind} run: pass an ae or calm run")
        if baseline.kind != "ar":
            raise ValueError(f"--baseline {args.baseline} is a {baseline.kind} run: pass an ar (baseline) run")
        autoencoder = ae_source.model if ae_source.kind == "ae" else ae_source.model.autoencoder
        data = held_out_data(baseline, args.data)
        generator = torch.Generator().manual_seed(args.seed)
        sampler = ar_next_chunks(baseline.model.logits, autoencoder.ae_config.chunk_size, generator)
        result = energy_gap(autoencoder, held_out_blocks(data, args.batch_size, args.batches), sampler,
                            num_samples=args.samples, generator=generator)
        print(json.dumps(dict(result, autoencoder=args.autoencoder, baseline=args.baseline, data=str(data)),
                         indent=1))
        return 0

    return exit_status(work, CheckpointError, HFFormatError, ValueError)


if __name__ == "__main__":
    sys.exit(main())
