"""The client's retry arithmetic: backoff grows with jitter inside its bounds, Retry-After is a floor, bulk files
are cut into requests of bounded size."""

from __future__ import annotations

from email.utils import formatdate

import pytest
import urllib3

from inferq.producers.client import _BULK_MAX_BYTES, RetryPolicy, _file_chunks, _retry_after_s, new_idempotency_key


def test_backoff_grows_exponentially_with_jitter_up_to_its_ceiling() -> None:
    policy = RetryPolicy(first_delay_s=0.5, max_delay_s=4.0)
    for attempt, ceiling_s in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (9, 4.0)]:
        delays = {policy.delay_s(attempt, None) for _ in range(50)}
        assert all(ceiling_s / 2 <= d <= ceiling_s for d in delays)
        assert len(delays) > 1  # jittered, so clients refused together do not return together


def test_retry_after_is_a_floor_with_a_little_jitter() -> None:
    policy = RetryPolicy(first_delay_s=0.25)
    assert all(3.0 <= policy.delay_s(0, 3.0) <= 3.25 for _ in range(50))


def test_retry_after_is_read_as_seconds_or_as_an_http_date() -> None:
    assert _retry_after_s(urllib3.HTTPResponse(status=503, headers={"Retry-After": "7"})) == 7.0
    dated = _retry_after_s(urllib3.HTTPResponse(status=503, headers={"Retry-After": formatdate(usegmt=True)}))
    assert dated is not None and 0.0 <= dated <= 1.0
    assert _retry_after_s(urllib3.HTTPResponse(status=503, headers={"Retry-After": "soon"})) is None
    assert _retry_after_s(urllib3.HTTPResponse(status=503)) is None


@pytest.mark.parametrize("policy", [{"max_attempts": 0}, {"first_delay_s": -1}, {"max_delay_s": 0.1}])
def test_a_nonsensical_retry_policy_is_refused(policy: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="invalid retry policy"):
        RetryPolicy(**policy)  # type: ignore[arg-type]


def test_files_are_cut_by_count_and_by_bytes() -> None:
    assert list(_file_chunks([1] * 5, 2)) == [(0, 2), (2, 4), (4, 5)]
    big = _BULK_MAX_BYTES // 2 + 1
    assert list(_file_chunks([big, big, 10, _BULK_MAX_BYTES * 2], 100)) == [(0, 1), (1, 3), (3, 4)]
    assert list(_file_chunks([], 10)) == []


def test_idempotency_keys_are_fresh_each_time() -> None:
    assert len({new_idempotency_key() for _ in range(100)}) == 100
