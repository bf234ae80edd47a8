"""distq.problems.rewards: built-ins on hand-picked points, user functions, and the per-call output checks."""
import math
import textwrap
import uuid

import numpy as np
import pytest
import torch
from sklearn.datasets import make_swiss_roll

from distq.errors import DistqError
from distq.problems.rewards import BUILTINS, Reward, load_reward
from distq.setup.config import RewardConfig

PROBE2 = torch.zeros(4, 2)


def _reward(fn, probe=PROBE2, coef=None):
    return load_reward(RewardConfig(fn=fn, coef=coef), probe)


def _error(fn, probe=PROBE2, coef=None) -> str:
    with pytest.raises(DistqError) as info:
        _reward(fn, probe, coef)
    return str(info.value)


def test_gmm1d_right_hand_picked():
    h = _reward("gmm1d_right", torch.zeros(3, 1))
    x = torch.tensor([[6.0], [4.0], [9.0], [-2.0]])
    assert torch.equal(h(x), torch.tensor([0.0, -2.0, -3.0, -8.0]))


def test_rectangle_hand_picked():
    h = _reward("swiss_roll_rectangle")
    inside = [[0.0, 5.0], [-15.0, 0.0], [15.0, 17.5], [-3.0, 17.0]]
    outside = [[-15.01, 5.0], [15.01, 5.0], [0.0, -0.01], [0.0, 17.51], [20.0, 10.0], [0.0, -8.0]]
    out = h(torch.tensor(inside + outside))
    assert out.dtype == torch.float32
    assert out.tolist() == [1.0] * len(inside) + [0.0] * len(outside)


def test_rectangle_scores_half_on_swiss_roll_data():
    # Section 12: data score 0.50 (2 decimals, so true p in [0.495, 0.505]); binomial s.e. sqrt(p(1-p)/n) ~ 0.0035.
    n = 20000
    x = torch.from_numpy(make_swiss_roll(n, noise=0.5, random_state=0)[0][:, [0, 2]].astype(np.float32))
    score = _reward("swiss_roll_rectangle")(x).mean().item()
    assert abs(score - 0.5) < 0.005 + 4 * math.sqrt(0.25 / n)


def test_rectangle_needs_two_dimensions():
    assert "d = 1" in _error("swiss_roll_rectangle", torch.zeros(3, 1))


def test_linear_equals_manual_dot():
    coef = (0.5, -2.0, 3.0)
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(0))
    out = _reward("linear", torch.zeros(2, 3), coef)(x)
    manual = torch.tensor([sum(c * float(v) for c, v in zip(coef, row)) for row in x])
    assert torch.allclose(out, manual, atol=1e-5)


def test_linear_coef_length_checked():
    assert "reward.coef" in _error("linear", torch.zeros(2, 3), coef=(1.0, 2.0))


def test_name_is_the_reference():
    h = _reward("gmm1d_right", torch.zeros(2, 1))
    assert h.name == "gmm1d_right" and h.__name__ == "gmm1d_right"


def _write(path, source):
    path.write_text(textwrap.dedent(source))
    return path


def test_user_reward_from_file(tmp_path, monkeypatch):
    _write(tmp_path / "rew.py", """
        import numpy as np
        def total(x):
            return x.sum(1, keepdim=True).double()
        def numpy_norm(x):
            return np.linalg.norm(x.numpy(), axis=1)
    """)
    x = torch.tensor([[1.0, 2.0], [3.0, -4.0]])
    absolute = _reward(f"{tmp_path / 'rew.py'}:total")
    assert torch.equal(absolute(x), torch.tensor([3.0, -1.0])) and absolute(x).dtype == torch.float32
    monkeypatch.chdir(tmp_path)
    relative = _reward("rew.py:numpy_norm")
    assert torch.allclose(relative(x), torch.tensor([math.sqrt(5), 5.0])) and relative.name == "rew.py:numpy_norm"


def test_user_reward_from_module(tmp_path, monkeypatch):
    package = f"distq_test_pkg_{uuid.uuid4().hex}"
    (tmp_path / package).mkdir()
    _write(tmp_path / package / "__init__.py", "")
    _write(tmp_path / package / "mod.py", "def first(x):\n    return 2 * x[:, 0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    h = _reward(f"{package}.mod:first")
    assert torch.equal(h(torch.tensor([[1.0, 9.0], [-3.0, 0.0]])), torch.tensor([2.0, -6.0]))


@pytest.mark.parametrize("ref, expected", [
    ("swiss_roll_rectangl", "swiss_roll_rectangle"),  # unknown built-in: suggests and lists them
    ("nope.py:h", "does not exist"),
    ("no/such/dir/r.py:h", "does not exist"),
    ("distq_no_such_module_xyz:h", "No module named"),
    ("distq.problems.rewards:no_such_function", "no attribute 'no_such_function'"),
    ("distq.problems.rewards:BUILTINS", "not callable"),
    ("distq.problems.rewards:", "neither a built-in"),
    (":h", "neither a built-in"),
])
def test_bad_references(ref, expected):
    message = _error(ref)
    assert "reward.fn" in message and ref in message and expected in message
    if ":" not in ref:
        assert all(name in message for name in BUILTINS)


def test_import_error_inside_file_is_reported(tmp_path):
    _write(tmp_path / "broken.py", "import torch\nraise ValueError('boom at import')\n")
    message = _error(f"{tmp_path / 'broken.py'}:h")
    assert "reward.fn" in message and "broken.py" in message and "boom at import" in message
    _write(tmp_path / "syntax.py", "def h(x):\n    return x +\n")
    assert "SyntaxError" in _error(f"{tmp_path / 'syntax.py'}:h")


@pytest.fixture
def user_file(tmp_path):
    return _write(tmp_path / "bad_rewards.py", """
        import numpy as np
        import torch
        def full(x):
            return x
        def nan(x):
            out = x[:, 0].clone()
            out[1] = float("nan")
            return out
        def as_list(x):
            return x[:, 0].tolist()
        def strings(x):
            return np.array(["a"] * len(x))
        def crash(x):
            return 1 / 0
        def nan_on_big_batches(x):
            return x[:, 0] * (float("nan") if len(x) > 4 else 1.0)
    """)


@pytest.mark.parametrize("fn, expected", [
    ("full", "shape (4, 2)"),
    ("nan", "1 non-finite"),
    ("as_list", "returned list"),
    ("strings", "dtype <U1"),
    ("crash", "ZeroDivisionError"),
])
def test_bad_outputs_fail_on_probe(user_file, fn, expected):
    message = _error(f"{user_file}:{fn}")
    assert f"reward.fn '{user_file}:{fn}'" in message and expected in message


def test_every_call_is_checked(user_file):
    h = _reward(f"{user_file}:nan_on_big_batches")
    with pytest.raises(DistqError, match="5 non-finite"):
        h(torch.zeros(5, 2))


def test_digit_reward_recognises_sklearns_digits():
    """The classifier-probability reward on the digits themselves: high on images of the target, low elsewhere."""
    from sklearn.datasets import load_digits

    from distq.problems.rewards import load_reward
    from distq.setup.config import RewardConfig

    digits = load_digits()
    images = torch.tensor(digits.data, dtype=torch.float32)
    reward = load_reward(RewardConfig(fn="digit", target=3), images[:8])
    probability = reward(images)
    assert float(probability[digits.target == 3].mean()) > 0.8
    assert float(probability[digits.target != 3].mean()) < 0.05
    with pytest.raises(DistqError, match="d = 64"):
        load_reward(RewardConfig(fn="digit"), torch.zeros(8, 2))
    brightness = load_reward(RewardConfig(fn="brightness"), images[:8])
    assert torch.allclose(brightness(images[:5]), images[:5].mean(1))


# ---- conditional rewards h(x, c) (Algorithm 2) ----------------------------------------------------------------------

def test_a_two_argument_reward_gets_the_condition_values():
    """h(x, c) receives the values of the label column (here 3 and 7), not the internal indices."""
    reward = Reward(lambda x, c: x[:, 0] * c, "scaled", condition_values=(3, 7))
    x = torch.ones(3, 2)
    assert torch.equal(reward(x, torch.tensor([1, 0, 1])), torch.tensor([7.0, 3.0, 7.0]))
    plain = Reward(lambda x: x[:, 0], "plain", condition_values=(3, 7))
    assert torch.equal(plain(x, torch.tensor([1, 0, 1])), torch.ones(3))  # h(x) ignores the condition


def test_bad_conditional_rewards_name_reward_fn(user_file):
    with pytest.raises(DistqError, match=r"reward.fn 'three' must take .* requires 3 positional arguments \(x, c, d\)"):
        Reward(lambda x, c, d: x, "three")
    with pytest.raises(DistqError, match="reward.fn 'cond' takes a condition, h\\(x, c\\), but the run is "
                                         "unconditional: set data.condition"):
        Reward(lambda x, c: x[:, 0], "cond")
    reward = Reward(lambda x, c: x * c.unsqueeze(1), "wide", condition_values=(0, 1))
    with pytest.raises(DistqError, match=r"reward.fn 'wide' returned shape \(2, 2\)"):
        reward(torch.ones(2, 2), torch.tensor([0, 1]))
    with pytest.raises(DistqError, match="reward.fn 'wide' takes a condition, h\\(x, c\\), but was given points "
                                         "without their conditions"):
        reward(torch.ones(2, 2))
    nan = Reward(lambda x, c: x[:, 0] / c, "ratio", condition_values=(0, 1))
    with pytest.raises(DistqError, match="reward.fn 'ratio' returned 1 non-finite"):
        nan(torch.zeros(2, 2), torch.tensor([0, 1]))


def test_own_digit_scores_each_image_as_its_own_condition():
    """own_digit(x, c) = digit(target = c)(x), row by row; on the digits it is high (each image is its own digit)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = torch.tensor(digits.data, dtype=torch.float32), torch.tensor(digits.target)
    own = load_reward(RewardConfig(fn="own_digit"), images, labels, tuple(range(10)))
    mixed = torch.tensor([3, 8, 3, 1])  # each loading fits the classifier: compare with one target's reward
    first = torch.stack([images[labels == c][0] for c in mixed.tolist()])
    threes = load_reward(RewardConfig(fn="digit", target=3), images)(first)
    assert torch.equal(own(first, mixed)[mixed == 3], threes[mixed == 3])
    assert not torch.allclose(own(first, mixed), threes)
    assert float(own(images, labels).mean()) > 0.8
    with pytest.raises(DistqError, match="reward.fn 'own_digit' needs condition values that are digits"):
        Reward(own.fn, "own_digit", tuple(range(5, 15)))(images[:2], labels[:2] + 5)
    with pytest.raises(DistqError, match="reward.fn 'own_digit' takes a condition"):
        Reward(own.fn, "own_digit")


def test_weighted_sum_of_two_builtins_equals_the_hand_computed_sum():
    """h = 2 rectangle + 0.5 linear(1, -1) on fixed points, summed by hand; `parts` gives each reward."""
    x = torch.tensor([[0.0, 1.0], [20.0, 5.0], [-3.0, 18.0], [14.0, 17.0]])
    rectangle = [1.0, 0.0, 0.0, 1.0]  # inside -15 <= x0 <= 15, 0 <= x1 <= 17.5
    linear = [-1.0, 15.0, -21.0, -3.0]  # x0 - x1
    cfg = RewardConfig(fn=("swiss_roll_rectangle", "linear"), coef=(1.0, -1.0), weights=(2.0, 0.5))
    reward = load_reward(cfg, x)
    expected = torch.tensor([2 * r + 0.5 * h for r, h in zip(rectangle, linear)])
    assert torch.allclose(reward(x), expected) and reward.names == ("swiss_roll_rectangle", "linear")
    assert torch.equal(reward.parts(x), torch.tensor([rectangle, linear]).T)
    equal = load_reward(RewardConfig(fn=("swiss_roll_rectangle", "linear"), coef=(1.0, -1.0)), x)
    assert torch.allclose(equal(x), torch.tensor(rectangle) + torch.tensor(linear))  # default weights: 1 each


def test_a_repeated_reward_is_named_by_position_and_a_conditional_one_works_in_a_list(tmp_path):
    x, labels = torch.randn(8, 2), torch.tensor([0, 1] * 4)
    twice = load_reward(RewardConfig(fn=("brightness", "brightness"), weights=(1.0, 3.0)), x)
    assert twice.names == ("fn0", "fn1") and torch.allclose(twice(x), 4 * x.mean(-1))
    path = _write(tmp_path / "conditional.py", "def h(x, c):\n    return c.float()\n")
    ref = f"{path}:h"
    mixed = load_reward(RewardConfig(fn=("brightness", ref), weights=(1.0, 2.0)), x, labels, (10, 20))
    assert torch.allclose(mixed(x, labels), x.mean(-1) + 2 * torch.tensor([10.0, 20.0] * 4))
    with pytest.raises(DistqError, match="reward.fn"):
        load_reward(RewardConfig(fn=("brightness", ref)), x)  # h(x, c) in an unconditional run
