"""Data parallelism with ZeRO-1/2 and gradient accumulation equal 1-rank training of the same global batch.

Compared with SGD (scale bugs show directly) and AdamW, losses and global grad norms within 1e-5.
Noise-free AE settings (no dropout, z = mu) so that every layout sees the same computation.
"""
import pytest

from tests.conftest import REPO
from tests.dist_helpers import torchrun_json

pytestmark = pytest.mark.distributed

STEPS = 5
BASE = ["autoencoder.dropout=0.0", "autoencoder.variational=false", "train.seq_len=32",
        "autoencoder.hidden_size=64", "autoencoder.intermediate_size=128", "autoencoder.latent_size=16",
        "autoencoder.init_std=0.02", "optim.schedule=constant",
        "train.global_batch_size=4", "optim.warmup_steps=0", "optim.grad_clip=0.0"]
OPTIMS = {"sgd": ["optim.optimizer=sgd", "optim.lr=0.05"], "adamw": ["optim.optimizer=adamw", "optim.lr=0.003"]}


def _scenarios(micro: int, zero_stages):
    return {f"{opt}_zero{z}_micro{micro}": BASE + OPTIMS[opt] + [f"train.micro_batch_size={micro}",
                                                                 f"parallel.zero_stage={z}"]
            for opt in OPTIMS for z in zero_stages}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ae_dp")
    spec = {"config": str(REPO / "configs/ae/tiny.yaml"), "steps": STEPS}
    one = torchrun_json("train_equivalence.py", 1, dict(spec, scenarios={**_scenarios(4, [0]), **_scenarios(2, [0])}),
                        tmp)
    two = torchrun_json("train_equivalence.py", 2, dict(spec, scenarios=_scenarios(2, [1, 2])), tmp)
    return one, two


def _assert_close(run, ref, what):
    for key in ("loss", "grad_norm"):
        for step, (a, b) in enumerate(zip(run[key], ref[key])):
            assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), f"{what}: {key} at step {step}: {a} vs {b}"


@pytest.mark.parametrize("opt", list(OPTIMS))
def test_gradient_accumulation_equals_big_batch(runs, opt):
    one, _ = runs
    _assert_close(one[f"{opt}_zero0_micro2"], one[f"{opt}_zero0_micro4"], f"{opt} GAS=2 vs one batch")


@pytest.mark.parametrize("opt", list(OPTIMS))
@pytest.mark.parametrize("zero", [1, 2])
def test_two_rank_zero_equals_one_rank(runs, opt, zero):
    one, two = runs
    _assert_close(two[f"{opt}_zero{zero}_micro2"], one[f"{opt}_zero0_micro4"], f"{opt} DP=2 ZeRO-{zero}")


def test_training_moves(runs):
    """The compared runs really train (equal numbers from a frozen model would prove nothing)."""
    one, _ = runs
    adamw, sgd = one["adamw_zero0_micro4"], one["sgd_zero0_micro4"]
    assert adamw["loss"][-1] < adamw["loss"][0] - 0.01
    assert all(g > 0 for g in adamw["grad_norm"] + sgd["grad_norm"])
    assert len(set(sgd["loss"])) == len(sgd["loss"])
