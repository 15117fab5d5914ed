"""``run.py bench decode`` with beam search: both sides decode the same beams (the tokens agree), timed in
alternating rounds with the machine's state recorded."""

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from vlpeft_jax.benchmarks import decode  # noqa: E402
from vlpeft_jax.errors import ConfigError  # noqa: E402

TINY = ["--layers", "1", "--width", "32", "--heads", "2", "--vocab", "64", "--batch", "2", "--prompt-len", "4",
        "--new-tokens", "6", "--repeats", "2"]


def test_beam_search_bench_agrees_with_transformers():
    r = decode.run(TINY + ["--num-beams", "3"])
    assert r["config"]["decoding"] == "beam search, 3 beams"
    assert r["token_agreement"] == 1.0  # our beam search follows transformers' step for step
    assert len(r["jax"]["times_s"]) == len(r["torch"]["times_s"]) == 2
    assert r["jax_over_torch_q1"] <= r["jax_over_torch"] <= r["jax_over_torch_q3"]
    assert set(r["machine"]) >= {"load_average_before", "load_average_after", "other_cpu_share", "warnings"}


def test_bad_beam_count_is_one_error():
    with pytest.raises(ConfigError, match="--num-beams=0"):
        decode.run(TINY + ["--num-beams", "0"])
