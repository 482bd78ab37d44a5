"""Pipeline splits: the balance against every split by hand, the prediction's arithmetic, the command."""
from __future__ import annotations

import itertools
import json

import pytest

from localssl.cli import main
from localssl.engine.stages import BlockCost, balance, check_stages, predict


def brute(costs, n):
    """The smallest slowest stage over every split of ``costs`` into ``n`` contiguous non-empty stages."""
    best = float("inf")
    for cuts in itertools.combinations(range(1, len(costs)), n - 1):
        edges = (0, *cuts, len(costs))
        best = min(best, max(sum(costs[a:b]) for a, b in zip(edges, edges[1:])))
    return best


@pytest.mark.parametrize("costs", [[5, 1, 1, 1, 1, 1], [1, 2, 3, 4, 5, 6], [3, 3, 3, 9], [2, 7, 1, 1, 8, 2, 2]])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_balance_finds_the_best_split(costs, n):
    sizes = balance(costs, n)
    assert len(sizes) == n and sum(sizes) == len(costs) and min(sizes) >= 1
    edges = [0, *itertools.accumulate(sizes)]
    assert max(sum(costs[a:b]) for a, b in zip(edges, edges[1:])) == brute(costs, n)


def test_balance_and_check_refuse_impossible_splits():
    with pytest.raises(ValueError, match="3 blocks into 4 stages"):
        balance([1, 1, 1], 4)
    with pytest.raises(ValueError, match="6 blocks in all"):
        check_stages([2, 2], 6, 2)
    with pytest.raises(ValueError, match="each of the 3 ranks"):
        check_stages([3, 3], 6, 3)


def test_predict_by_hand():
    costs = [BlockCost(0.010, 400), BlockCost(0.030, 200), BlockCost(0.020, 100)]
    p = predict(costs, [2, 1])
    assert p.stage_seconds == pytest.approx([0.040, 0.020])
    assert p.sequential_per_s == pytest.approx(1 / 0.060) and p.pipeline_per_s == pytest.approx(1 / 0.040)
    assert p.speedup == pytest.approx(1.5) and p.boundary_bytes == [200]


def test_stages_command_measures_and_splits(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LOCALSSL_CACHE", str(tmp_path / "cache"))
    assert main(["stages", "--width", "0.0625", "--batch-size", "8", "--subset", "16", "--ranks", "2", "3",
                 "--device", "cpu", "--amp", "off", "--repeats", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["blocks"]) == 6 and all(b["seconds"] > 0 and b["out_bytes"] > 0 for b in res["blocks"])
    assert [s["ranks"] for s in res["splits"]] == [2, 3]
    for s in res["splits"]:
        assert s["stages"] == balance([b["seconds"] for b in res["blocks"]], s["ranks"])
    assert main(["stages", "--width", "0.0625", "--batch-size", "8", "--subset", "16", "--ranks", "2", "7",
                 "--device", "cpu", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "    7  only 6 blocks: at most 6 stages" in out and "speedup" in out
    assert main(["stages", "--width", "0.0625", "--subset", "16", "--batch-size", "8", "--ranks", "0"]) == 2
    assert "--ranks and --repeats must be >= 1" in capsys.readouterr().err
