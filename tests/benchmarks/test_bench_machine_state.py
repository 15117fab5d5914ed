"""Every ``run.py bench`` command reports how busy the machine was and the thread settings (issue 20), and the
round-robin timer of the sparse/KLAFT benches swaps its order every round."""

import pytest

from vlpeft_jax.benchmarks import klaft, metrics, sparse

KEYS = {"load_average_before", "load_average_after", "other_cpu_share", "wall_s", "cores", "warnings"}


@pytest.mark.parametrize("bench, argv", [
    (klaft, ["--layers", "1", "--width", "32", "--heads", "2", "--vocab", "64", "--batch", "2", "--seq", "8",
             "--topics", "3", "--steps", "2"]),
    (sparse, ["--hidden", "32", "--intermediate", "64", "--layers", "1", "--heads", "2", "--vocab", "64", "--seq", "8",
              "--steps", "2", "--mode-ks", "1", "--no-full"]),
    (metrics, ["--images", "20", "--repeats", "2"]),
], ids=["klaft", "sparse", "metrics"])
def test_bench_records_the_machine(bench, argv, capsys):
    r = bench.run(argv)
    assert set(r["machine"]) >= KEYS and r["machine"]["wall_s"] > 0 and r["threads"]["cores"] >= 1
    assert "other processes' CPU share" in capsys.readouterr().out


def test_round_robin_swaps_the_order_every_round():
    order = []

    class Fake:
        def __init__(self, name):
            self.name, self.state, self.times, self.record = name, 0, [], {}

        def compiled(self, state, batch):
            order.append(self.name)
            return state, {"loss": 0.0}

    a, b = Fake("a"), Fake("b")
    sparse.time_round_robin([a, b], {}, steps=3, warmup=1)
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert len(a.times) == len(b.times) == 3 and a.record["step_s"] == min(a.times)
