"""bench.bench_federated without Ray: the grid it runs, and the report and plots it writes."""
import numpy as np

from bench import bench_federated


def test_the_grid_covers_every_partition_and_strategy_plus_the_faulty_workers():
    cells = bench_federated.cells(bench_federated.PARTITIONS, bench_federated.STRATEGIES, bench_federated.FAULTS)
    assert len(cells) == 4 * 5 + 2
    assert {"partition": "iid", "strategy": "median", "fault": "scale:1:100", "rounds": None} in cells
    longer = bench_federated.cells(["iid"], ["fedavg"], (), rounds=[4, 16])
    assert [c["rounds"] for c in longer] == [4, 16]


def test_the_report_has_a_row_per_cell_and_both_plots(tmp_path):
    rows = [{"partition": "iid", "strategy": "fedavg", "fault": None, "test_accuracy": 0.9941,
             "round_accuracy": [0.98, 0.9941], "seconds": 70.2},
            {"partition": "classes:3", "strategy": "median", "fault": None, "error": "the job failed"}]
    bench_federated.write_report({"machine": {"cpu": "AMD EPYC"}, "job_args": "", "precision": "fp32", "cells": rows},
                                 tmp_path)
    table = (tmp_path / "federated.md").read_text()
    assert "| iid | fedavg |  | 2 | 99.41% | 98.00 99.41 | 70.2 |" in table
    assert "| classes:3 | median |  |  | failed |" in table
    assert "AMD EPYC" in table and (tmp_path / "federated_rounds.png").stat().st_size > 0
    labels = np.random.default_rng(0).integers(0, 10, 3000)
    bench_federated.plot_shards(labels, ["iid", "dirichlet:0.1"], 3, 0, tmp_path / "shards.png")
    assert (tmp_path / "shards.png").stat().st_size > 0
