"""With ``nonfinite="error"`` a step's θ, Δ and gradients are proven finite by its LCA and only
a non-finite step is checked piece by piece: the message must be the one the checked path
("skip", adaptive) gives, for every rule and gradient mode."""

from __future__ import annotations

import numpy as np
import pytest

import replay
from replay.errors import ReplayError
from tests.reliability.helpers import ARGS, TASK, record, record_poisoned
from tests.reliability.tasks import FlakyMLP, PoisonMLP

RULES = ["first-order", "trapezoid", "simpson", "adaptive"]
MODES = {"exact": "exact", "sampled": replay.Sampled(batches=2, batch_size=8, seed=1)}


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return record(str(tmp_path_factory.mktemp("clean") / "traj"), steps=12)


def refusal(store, out, **kw) -> str:
    with pytest.raises(ReplayError) as err:
        replay.run(store, out=str(out), scheduler="sync", precision="float64", progress=False,
                   datasets=["train"], **kw)
    return str(err.value)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("rule", RULES)
def test_a_poisoned_gradient_is_named_at_its_step_and_point(clean, tmp_path, rule, mode):
    traj = replay.open_trajectory(clean)
    # 0.bias[1] peaks inside the trajectory: the gradient is NaN at θ_top alone.
    b = [float(traj.params(t)["0.bias"][1]) for t in traj.steps]
    top = int(np.argmax(b))
    assert 0 < top < len(b) - 1
    task = PoisonMLP(above=(max(b) + sorted(b)[-2]) / 2, index=1, **ARGS)
    msg = refusal(clean, tmp_path / "c.zarr", task=task, quadrature=rule,
                  gradient=MODES[mode], chunk_size=4)
    # The first interval to take a gradient at θ_top: its end (s=1) unless first order, which
    # only takes a forward pass there.
    first = top if rule == "first-order" else top - 1
    s = 0 if first == top else 1
    assert msg == (f"the gradient of '0.bias' is not finite on dataset 'train' at step {first} "
                   f"(s={s} along the update); pass nonfinite='skip' (CLI --nonfinite skip) to "
                   "mark such steps and continue"), msg


@pytest.mark.parametrize("rule", RULES)
def test_a_poisoned_checkpoint_is_named_before_its_losses(tmp_path, rule):
    store = record_poisoned(tmp_path / "traj", poison=[(6, "2.bias", float("inf"))])
    msg = refusal(store, tmp_path / "c.zarr", task=TASK, task_args=ARGS, quadrature=rule,
                  chunk_size=4, steps="4:12")
    assert msg == ("checkpoint at step 6 has non-finite values in '2.bias'; pass "
                   "nonfinite='skip' (CLI --nonfinite skip) to mark such steps and continue")


@pytest.mark.parametrize("nan_loss_call", [0, 7])
def test_a_step_finite_when_evaluated_again_says_so(clean, tmp_path, nan_loss_call):
    # Loss calls of a Simpson replay (one batch): step 0 at s = 0, 1, 0.5, then each step at
    # s = 1, 0.5. A NaN gradient in the 3rd (step 0), finite when evaluated again; the NaN loss
    # of the 7th (step 2) is found first, but the earlier step is the one to name.
    task = FlakyMLP(nan_call=3, nan_loss_call=nan_loss_call, **ARGS)
    msg = refusal(clean, tmp_path / "c.zarr", task=task, quadrature="simpson", chunk_size=4)
    assert msg.startswith("the LCA of step 0 is not finite, yet evaluated again every loss and "
                          "gradient of the step is finite"), msg
    assert msg.endswith("replay with nonfinite='skip' (CLI --nonfinite skip)")
