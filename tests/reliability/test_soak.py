"""The server under faults (issue 17, point 6): the smoke of ``lmforge soak``. A served model gets a flood
of requests at once, streams dropped after their first event and bodies sent a byte at a time, twice:
every request is answered (200, or 429 past the queue), another client is served meanwhile, and the
engine's queue and batch go back to zero after each round."""

from __future__ import annotations

from lmforge.reliability.soak import _gauges, soak


def test_the_server_answers_everyone_and_frees_what_faulty_clients_held():
    report = soak(rounds=2, flood=80, disconnects=8, slow=2, max_queue=16, progress=False)
    assert report.ok, report.problems
    assert set(report.statuses) <= {"200", "429"} and sum(report.statuses.values()) == 160
    assert report.statuses.get("429", 0) > 0  # the flood went past the queue: refused, not dropped
    assert report.freed == [True, True] and report.disconnects == 16 and report.slow_bodies == 4
    assert len(report.probe_seconds) == 6 and sum(report.probe_statuses.values()) == 6


def test_the_gauges_are_read_from_a_scrape():
    scrape = ('# HELP lmforge_queue_length x\nlmforge_queue_length{model="a"} 3.0\n'
              'lmforge_running_batch_size{model="a"} 1.0\nlmforge_running_batch_size{model="b"} 2.0\n')
    assert _gauges(scrape) == {"lmforge_queue_length": 3.0, "lmforge_running_batch_size": 3.0}
