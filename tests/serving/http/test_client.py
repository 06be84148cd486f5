"""The client of our own servers: Retry-After read as the server writes it, retries bounded."""

import httpx

from flywheel.serving.http.client import post_with_retry, retry_after


def answer(status, retry=None):
    return httpx.Response(status, headers={"retry-after": retry} if retry is not None else {})


def test_retry_after_in_seconds_and_anything_else_falls_back():
    assert retry_after(answer(503, "5")) == 5.0
    assert retry_after(answer(503, "0.5")) == 0.5
    assert retry_after(answer(503, "Wed, 21 Oct 2015 07:28:00 GMT"), default=2.0) == 2.0
    assert retry_after(answer(503)) == 1.0
    assert retry_after(answer(503, "-3")) == 0.0


class Flaky:
    """A client whose server answers `statuses` in turn (what the sleeps see is recorded)."""

    def __init__(self, statuses):
        self.statuses = list(statuses)
        self.posts = 0

    def post(self, url, **kwargs):
        self.posts += 1
        status, retry = self.statuses.pop(0)
        return answer(status, retry)


def test_503_and_429_are_retried_as_asked_then_the_answer_comes_back():
    waits = []
    flaky = Flaky([(503, "2"), (429, "1"), (200, None)])
    r = post_with_retry(flaky, "/v1/feedback", json={}, sleep=waits.append)
    assert r.status_code == 200 and waits == [2.0, 1.0] and flaky.posts == 3


def test_other_errors_are_not_retried():
    flaky = Flaky([(422, None), (200, None)])
    assert post_with_retry(flaky, "/", sleep=lambda s: None).status_code == 422 and flaky.posts == 1


def test_the_budget_bounds_the_waiting_and_a_huge_retry_after_is_capped():
    waits = []
    flaky = Flaky([(503, "3600")] * 10)
    r = post_with_retry(flaky, "/", budget=50, max_wait=20, sleep=waits.append)
    assert r.status_code == 503 and waits == [20, 20, 10] and flaky.posts == 4
