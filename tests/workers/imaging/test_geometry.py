"""Fitting a picture to the model's input: the block means a reader may compute while it presents a frame."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from inferq.protocol.registry import ImageInput
from inferq.workers.imaging import geometry
from inferq.workers.imaging.geometry import halve_in_strips, halvings_before_fit, reduction_levels

MODEL = ImageInput(height=224, width=224, channels=1)


@pytest.mark.parametrize(("shape", "halvings"), [((2500, 2000), 3), ((1001, 803), 2), ((257, 513), 1), ((9, 7), 4)])
def test_halving_in_strips_gives_the_whole_pictures_block_means_bit_for_bit(
    shape: tuple[int, int], halvings: int
) -> None:
    picture = np.random.default_rng(7).random(shape, dtype=np.float32)
    strips: list[int] = []

    def present_rows(start: int, stop: int, out: np.ndarray) -> None:
        strips.append(stop - start)
        out[:] = picture[start:stop]

    halved = halve_in_strips(shape, halvings, present_rows)
    whole = np.asarray(Image.fromarray(picture).reduce(2**halvings))
    assert halved.dtype == np.float32
    assert halved.tobytes() == whole.tobytes()
    # Every row presented once, never more than a strip at a time (a block row where a block is taller).
    assert sum(strips) == shape[0]
    assert max(strips) <= max(2**halvings, geometry._STRIP_ROWS)


def test_a_reader_halves_only_as_far_as_the_fit_would_first() -> None:
    # 2500 rows halve three times and still cover 224; the fit then halves no further.
    assert halvings_before_fit(2500, 2000, MODEL) == 3
    assert reduction_levels(-(-2500 // 8), -(-2000 // 8), MODEL, most=12) == 0
    assert halvings_before_fit(300, 300, MODEL) == 0  # 150 would not cover 224
    # At the fit's cap, the fit would halve the smaller picture again: a reader leaves it whole.
    assert halvings_before_fit(224 * 2**13, 224 * 2**13, MODEL) == 0
