"""distq.problems.standardize: column statistics against numpy, the maps' round trip, rewards in the user's coordinates."""
import numpy as np
import torch

from distq.problems.rewards import LinearReward
from distq.problems.standardize import InUserCoordinates, column_statistics, fitted, identity, stored


def test_column_statistics_match_numpy_in_float64():
    values = np.random.default_rng(0).normal((1e4, -3.0), (2.0, 0.5), size=(200_000, 2)).astype(np.float32)
    mean, std = column_statistics(torch.from_numpy(values))
    np.testing.assert_allclose(mean.numpy(), values.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(std.numpy(), values.astype(np.float64).std(0), rtol=1e-9)


def test_maps_round_trip_and_in_place_matches_out_of_place():
    points = torch.tensor([[170.0, 70.0], [180.0, 55.0], [160.0, 85.0]])
    s = fitted(points)
    z = s.to_model(points)
    assert torch.allclose(z.mean(0), torch.zeros(2), atol=1e-6) and torch.allclose(z.std(0, correction=0), torch.ones(2))
    assert torch.allclose(s.to_user(z), points)
    copy = points.clone()
    assert s.to_model_(copy) is copy and torch.equal(copy, z)


def test_constant_column_is_only_centred():
    s = fitted(torch.tensor([[0.0, 5.0], [2.0, 5.0]]))
    assert s.scale.tolist() == [1.0, 1.0] and s.mean.tolist() == [1.0, 5.0]


def test_identity_is_free_and_old_checkpoints_are_identity():
    x = torch.randn(4, 3)
    assert identity(3).to_model(x) is x and identity(3).state() is None
    assert stored({"columns": ["a", "b", "c"]}).identity  # a checkpoint from before data.standardize


def test_reward_sees_the_users_coordinates():
    # h(x) = c . x on z = (x - m) / s is c . (s z + m): the closed form
    s = fitted(torch.tensor([[170.0, 70.0], [190.0, 40.0]]))
    reward = InUserCoordinates(LinearReward((1.0, -2.0)), s)
    z = torch.randn(5, 2)
    expected = (z * s.scale + s.mean) @ torch.tensor([1.0, -2.0])
    assert torch.allclose(reward(z), expected)
    stored_again = stored({"columns": ["h", "w"], "standardization": s.state()})
    assert stored_again.same_as(s)
