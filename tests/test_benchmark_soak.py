"""The soak and S3-listing benchmarks' own arithmetic and server: throughput by tenths and memory growth from
sampled points (benchmarks.soak), and the loopback server's sorted listing giving exactly moto's own pages
(benchmarks.s3listing). No timing here: the benchmarks measure, the tests check how they compute."""

from __future__ import annotations

import pytest

from benchmarks import s3listing, soak


def test_tenths_start_at_the_first_result_and_interpolate_between_progress_lines():
    # start-up until 10 s, then 100 images/s for the first half and 50 images/s for the second
    points = [{"t_s": 5.0, "done": 0}, {"t_s": 10.0, "done": 100}]
    points += [{"t_s": 10.0 + k, "done": 100 + 100 * k} for k in range(1, 10)]  # 1,000 at 19 s
    points += [{"t_s": 19.0 + 2 * k, "done": 1000 + 100 * k} for k in range(1, 11)]  # 2,000 at 39 s
    rates = soak.tenths(points, 2000)
    assert rates[0] == pytest.approx(100.0) and rates[4] == pytest.approx(100.0)
    assert rates[5] == pytest.approx(50.0) and rates[-1] == pytest.approx(50.0)
    assert soak.time_at(points, 150) == pytest.approx(10.5)
    assert soak.time_at(points, 5000) is None


def test_growth_is_the_highest_rss_after_ten_percent_minus_the_rss_then():
    samples = [
        {"t_s": 1.0, "driver_mb": 500.0, "actors": {7: 900.0}},  # start-up peak, before 10%: not growth
        {"t_s": 2.0, "driver_mb": 300.0, "actors": {7: 600.0}},  # the run reaches 10% here
        {"t_s": 3.0, "driver_mb": 320.0, "actors": {7: 600.0, 8: 400.0}},  # a second actor appears
        {"t_s": 4.0, "driver_mb": 310.0, "actors": {7: 640.0, 8: 410.0}},
    ]
    assert soak.growth(samples, 2.1, lambda s: s["driver_mb"]) == {
        "at_10pct_mb": 300.0,
        "peak_after_mb": 320.0,
        "growth_mb": 20.0,
    }
    actors = {pid: soak.growth(samples, 2.1, value) for pid, value in soak.actor_series(samples)}
    assert actors[7]["growth_mb"] == 40.0 and actors[8] == {
        "at_10pct_mb": 400.0,
        "peak_after_mb": 410.0,
        "growth_mb": 10.0,
    }
    figures = {"driver": {"growth_mb": 20.0}, "actors": actors, "last_over_first_tenth": 0.85}
    checks = soak.checks(figures, {"rows": 10, "pass": True})
    assert [name for name, c in checks.items() if not c["pass"]] == ["last_over_first_tenth"]
    faster_at_the_end = soak.checks({**figures, "last_over_first_tenth": 1.2}, {"rows": 10, "pass": True})
    assert all(c["pass"] for c in faster_at_the_end.values())


def test_the_loopback_servers_sorted_listing_gives_moto_s_own_pages():
    """keep_sorted_listings only caches moto's sort between pages: every page, folder and token is moto's."""
    from moto import mock_aws

    with mock_aws():
        backend = s3listing.s3_backend()
        backend.create_bucket("soak-listing", "us-east-1")
        for i in range(2345):
            backend.put_object("soak-listing", f"k{i % 7}/img_{i:05d}.jpg" if i % 3 else f"img_{i:05d}.jpg", b"")
        bucket = backend.get_bucket("soak-listing")

        def pages(prefix, delimiter):
            token, out = None, []
            while True:
                keys, truncated, token = backend.list_objects_v2(bucket, prefix, delimiter, token, None, 1000)
                out.append([getattr(k, "name", k) for k in keys])
                if not truncated:
                    return out

        expected = {(p, d): pages(p, d) for p in ("", "k3/") for d in ("/", None)}
        s3listing.keep_sorted_listings(backend)
        assert {(p, d): pages(p, d) for p in ("", "k3/") for d in ("/", None)} == expected
        assert len(expected[("", None)]) == 3 and sum(map(len, expected[("", None)])) == 2345
