from twisted.internet.task import Clock

from spegel_tx.reclaim import RECLAIM_DELAY, Reclaimer


def test_a_burst_of_cut_off_requests_costs_one_collection_after_it_ends() -> None:
    clock = Clock()
    trims: list[int] = []
    reclaimer = Reclaimer(clock, trim=lambda: trims.append(1))

    for _ in range(100):
        reclaimer.soon()
        clock.advance(RECLAIM_DELAY / 10)
    assert reclaimer.runs == 0, "still within the burst"
    clock.advance(RECLAIM_DELAY)

    assert (reclaimer.runs, trims) == (1, [1])
