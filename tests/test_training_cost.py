"""The training benchmark's cost arithmetic: the epoch line fit and the wall-time-against-RTT model."""
import pytest

from bench.training_cost import Sync, ddp_sync, epoch_costs, job_round_trips, job_sync, line_fit, rtt_model


def test_line_fit_recovers_a_fixed_cost_and_a_cost_per_epoch():
    fit = line_fit([2, 4, 8], [30 + 20 * e for e in (2, 4, 8)])
    assert fit["intercept"] == pytest.approx(30) and fit["slope"] == pytest.approx(20)


def test_line_fit_refuses_a_single_epoch_count():
    with pytest.raises(ValueError, match="two distinct"):
        line_fit([2, 2], [10, 11])


def test_epoch_costs_fit_each_scheme_and_compare_the_job_growth_with_the_plain_anchor():
    points = {"job": {2: 70.0, 4: 110.0, 8: 190.0}, "net_plain": {2: 40.0, 4: 76.0, 8: 148.0},
              "ddp": {2: 64.0}}
    costs = epoch_costs(points)
    assert costs["fits"]["job"] == pytest.approx({"intercept": 30.0, "slope": 20.0})
    assert costs["fits"]["net_plain"] == pytest.approx({"intercept": 4.0, "slope": 18.0})
    assert "ddp" not in costs["fits"]  # one epoch count: no line
    growth = costs["growth_ratio"]
    assert (growth["from_epochs"], growth["to_epochs"]) == (2, 8)
    assert growth["ratio"] == pytest.approx(120 / 108)


def test_ddp_synchronises_every_step_with_a_ring_all_reduce():
    sync = ddp_sync(steps=400, epochs=2, workers=3, gradient_bytes=742_472, buffer_bytes=1_736)
    assert sync.count == 400
    assert sync.hops == 2 * 2 + 2  # ring: 2(n-1) hops, plus the buffers' broadcast down a tree of 3
    assert sync.bytes_per_sync == pytest.approx(4 / 3 * 742_472 + 1_736)
    # one worker: no all-reduce at all, only the per-epoch reports
    alone = ddp_sync(steps=400, epochs=2, workers=1, gradient_bytes=742_472, buffer_bytes=1_736)
    assert alone.seconds(rtt_s=0.01, bandwidth_bit_s=1e9) == pytest.approx(2 * 2 * 0.005)


def test_the_job_synchronises_once_a_round_through_the_storage():
    assert job_round_trips(partial_saves=0) == 10
    sync = job_sync(rounds=4, workers=3, weight_bytes=750_000, state_bytes=2_250_000, partial_saves_per_round=1)
    assert sync.count == 4 and sync.hops == 2 * 13
    # 3 workers: 2 state saves each (the round's end and one mid-round), weights out and back; the average saved once
    assert sync.bytes_per_sync == 3 * (2 * 2_250_000 + 2 * 750_000) + 750_000


def test_sync_seconds_add_latency_and_transfer():
    sync = Sync(count=10, hops=4, bytes_per_sync=125_000, extra_hops=2)  # 1 Mbit per sync
    assert sync.seconds(rtt_s=0.02, bandwidth_bit_s=1e9) == pytest.approx(10 * (4 * 0.01 + 0.001) + 2 * 0.01)


def test_rtt_model_finds_where_the_job_pulls_ahead():
    job, ddp = Sync(count=4, hops=40, bytes_per_sync=0), Sync(count=400, hops=5, bytes_per_sync=0)
    model = rtt_model(job_wall=72.0, job=job, ddp_wall=64.0, ddp=ddp, bandwidth_bit_s=1e9, rtts_ms=[0, 10, 50])
    # per ms of RTT: the job 4 x 40 x 0.5 ms = 0.08 s, DDP 400 x 5 x 0.5 ms = 1 s; 8 s apart at 0
    assert model["job_faster_from_rtt_ms"] == pytest.approx(8 / 0.92)
    assert model["job_seconds"] == pytest.approx([72.0, 72.8, 76.0])
    assert model["ddp_seconds"] == pytest.approx([64.0, 74.0, 114.0])


def test_rtt_model_says_when_the_job_is_already_faster_or_never_is():
    cheap, dear = Sync(count=1, hops=1, bytes_per_sync=0), Sync(count=100, hops=1, bytes_per_sync=0)
    assert rtt_model(60.0, cheap, 64.0, dear, 1e9, [0, 10])["job_faster_from_rtt_ms"] == 0.0
    assert rtt_model(70.0, dear, 64.0, cheap, 1e9, [0, 10])["job_faster_from_rtt_ms"] is None


# ---------------------------------------------------------------- the reports, from made-up runs (no Ray)

def made_up_runs():
    def job(epochs, seconds):
        return {"seconds": seconds, "test_accuracy": 0.994, "epochs": epochs, "precision": "fp32", "workers": 3,
                "rounds": 2 * epochs, "aggregate_seconds": [1.5] * (2 * epochs)}
    ddp = {"seconds": 64.0, "test_accuracy": 0.995, "epochs": 2, "precision": "fp32", "workers": 3, "steps": 400,
           "gradient_bytes": 742_472, "buffer_bytes": 1_736, "allreduce_ms_median": 2.0}
    runs = [{"epochs": e, "job": job(e, 30 + 21 * e), "net_plain": {"seconds": 4 + 18 * e, "test_accuracy": 0.995,
                                                                      "precision": "fp32", "epochs": e}}
            for e in (2, 4, 8)]
    runs[0]["ddp"] = ddp
    return runs, ddp


def test_epoch_report_names_fixed_costs_per_epoch_costs_and_the_growth_ratio(tmp_path):
    from bench import bench_training

    runs, _ = made_up_runs()
    sweep = {"machine": "AMD EPYC, 2 cores", "runs": runs,
             "costs": epoch_costs(bench_training.sweep_points(runs))}
    bench_training.write_epoch_report(sweep, tmp_path)
    report = (tmp_path / "training_epochs.md").read_text()
    assert "| 2 | 72.0 | 99.40% | 64.0 | 99.50% | 40.0 |" in report
    assert "fixed cost" in report and "| 30.0 | 21.0 |" in report
    assert "126.0 s / 108.0 s = **1.17x**" in report and "AMD EPYC" in report
    assert (tmp_path / "training_epochs.png").stat().st_size > 0


def test_rtt_report_from_the_measured_job_and_ddp_rows(tmp_path):
    from bench import bench_training

    runs, ddp = made_up_runs()
    rtt = bench_training.rtt_results(runs[0]["job"], ddp, [], bandwidth_bit_s=1e9)
    # the default job: 4 rounds of 100 steps per worker, one mid-round checkpoint each (every 50 steps)
    assert rtt["measured"]["partial_saves_per_round"] == 1 and rtt["job_sync"]["count"] == 4
    assert rtt["ddp_sync"]["count"] == 400
    assert rtt["job_seconds"][0] > 72.0 and rtt["ddp_seconds"][0] > 64.0  # the bandwidth term, even at RTT 0
    assert 0 < rtt["job_faster_from_rtt_ms"] < 10
    bench_training.write_rtt_report({"machine": "AMD EPYC, 2 cores", **rtt}, tmp_path)
    report = (tmp_path / "training_rtt.md").read_text()
    assert "A model, not a measurement" in report and "pulls ahead" not in report
    assert f"The job is faster from an RTT of **{rtt['job_faster_from_rtt_ms']:.1f} ms**." in report
    assert (tmp_path / "training_rtt.png").stat().st_size > 0
