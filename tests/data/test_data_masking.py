"""MLM masking: statistics, special-token safety, determinism from (seed, epoch, sample index)."""

from __future__ import annotations

import pytest
import torch

from af_train.data.masking import IGNORE_INDEX, MaskingConfig, mask_codes, masking_generator, num_to_mask

MASK_ID = 1025
CODEBOOK = 1024


def _mask_many(config: MaskingConfig, rows: int, length: int, seed: int):
    codes = torch.randint(0, CODEBOOK, (rows, length), generator=torch.Generator().manual_seed(seed + 1000))
    corrupted, labels = mask_codes(
        codes, config, mask_id=MASK_ID, codebook_size=CODEBOOK, generator=masking_generator(seed, 0, 0)
    )
    return codes, corrupted, labels


@pytest.mark.parametrize(
    "rate,mask_fraction,random_fraction", [(0.25, 0.8, 0.1), (0.15, 0.5, 0.5), (0.4, 1.0, 0.0), (0.3, 0.0, 0.0)]
)
def test_masking_statistics_match_the_configuration(rate, mask_fraction, random_fraction):
    seed = int(torch.randint(0, 2**31, (1,)))
    rows, length = 400, 250
    codes, corrupted, labels = _mask_many(MaskingConfig(rate, mask_fraction, random_fraction), rows, length, seed)

    chosen = labels != IGNORE_INDEX
    # exactly round(rate * n) positions per row, each row on its own
    assert chosen.sum(dim=1).tolist() == [round(rate * length)] * rows
    # targets are the original codes; untouched positions keep their token
    assert torch.equal(labels[chosen], codes[chosen])
    assert torch.equal(corrupted[~chosen], codes[~chosen])

    n = chosen.sum().item()
    as_mask = (corrupted[chosen] == MASK_ID).sum().item() / n
    kept = (corrupted[chosen] == codes[chosen]).sum().item() / n
    random = 1.0 - as_mask - kept
    keep_fraction = 1.0 - mask_fraction - random_fraction
    tol = 4 * (0.25 / n) ** 0.5 + 2e-3  # 4 sigma of a proportion, plus random codes equal by chance
    assert abs(as_mask - mask_fraction) < tol
    assert abs(kept - (keep_fraction + random_fraction / CODEBOOK)) < tol
    assert abs(random - random_fraction * (1 - 1 / CODEBOOK)) < tol
    randomised = chosen & (corrupted != MASK_ID) & (corrupted != codes)
    if random_fraction > 0:
        values = corrupted[randomised]
        assert values.min() >= 0 and values.max() < CODEBOOK
        assert values.unique().numel() > 0.5 * min(values.numel(), CODEBOOK)  # spread over the codebook


def test_positions_are_uniform_and_rows_independent():
    codes = torch.arange(64).repeat(2, 1)  # two identical rows
    hits = torch.zeros(2, 64)
    same_positions = 0
    for index in range(600):
        _, labels = mask_codes(
            codes, MaskingConfig(0.25), mask_id=MASK_ID, codebook_size=CODEBOOK,
            generator=masking_generator(3, 0, index),
        )
        chosen = labels != IGNORE_INDEX
        hits += chosen
        same_positions += int(torch.equal(chosen[0], chosen[1]))
    assert same_positions == 0, "rows of a sample must be masked independently"
    expected = 600 * 16 / 64
    assert ((hits - expected).abs() < 5 * expected**0.5).all(), "some positions are masked far more often"


def test_masking_is_a_pure_function_of_seed_epoch_and_index():
    codes = torch.randint(0, CODEBOOK, (2, 100))
    config = MaskingConfig(0.25)

    def run(seed, epoch, index):
        return mask_codes(
            codes, config, mask_id=MASK_ID, codebook_size=CODEBOOK, generator=masking_generator(seed, epoch, index)
        )

    state = torch.random.get_rng_state()
    first = run(5, 2, 17)
    torch.manual_seed(999)  # the global RNG must not matter
    again = run(5, 2, 17)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    for other in [(6, 2, 17), (5, 3, 17), (5, 2, 18)]:
        assert not torch.equal(run(*other)[0], first[0]), f"{other} should mask differently"
    torch.random.set_rng_state(state)
    before = torch.random.get_rng_state()
    run(1, 1, 1)
    assert torch.equal(torch.random.get_rng_state(), before), "masking consumed the global RNG"


def test_edge_cases_and_config_errors():
    assert num_to_mask(0, 0.25) == 0
    assert num_to_mask(10, 0.0) == 0
    assert num_to_mask(3, 0.1) == 1  # at least one target whenever masking is on
    empty = torch.zeros((1, 0), dtype=torch.long)
    corrupted, labels = mask_codes(
        empty, MaskingConfig(), mask_id=MASK_ID, codebook_size=CODEBOOK, generator=masking_generator(0, 0, 0)
    )
    assert corrupted.shape == labels.shape == (1, 0)
    with pytest.raises(ValueError, match="rate"):
        MaskingConfig(rate=1.0)
    with pytest.raises(ValueError, match="sum to <= 1"):
        MaskingConfig(mask_fraction=0.8, random_fraction=0.3)
    with pytest.raises(ValueError, match="rows, frames"):
        mask_codes(torch.zeros(5, dtype=torch.long), MaskingConfig(), mask_id=MASK_ID, codebook_size=CODEBOOK,
                   generator=masking_generator(0, 0, 0))
