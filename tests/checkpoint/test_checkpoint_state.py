"""af_train.checkpoint.state: the RNG state a checkpoint carries."""

from __future__ import annotations

import torch

from af_train.checkpoint.state import rng_state, set_rng_state


def test_rng_state_round_trip():
    state = rng_state()
    expected = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    torch.rand(5)
    set_rng_state(state)
    again = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]
