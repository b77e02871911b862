"""The worker half of training (training/worker.py), without Ray: rounds, steps, mid-round
checkpoints, the data order, and the state a restarted worker resumes from."""
import pytest
import torch
from ray.train import Checkpoint

from training import model
from training import worker as train  # these three tests moved from test_train_cli.py with the worker code
from training.storage import init_path, partial_path, worker_path
from training.worker import ShardOrder, WorkerState


def test_rounds_split_steps_evenly():
    bounds = [train.round_bounds(401, 4, r) for r in range(4)]
    assert bounds[0][0] == 0 and bounds[-1][1] == 401
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert max(e - s for s, e in bounds) - min(e - s for s, e in bounds) <= 1


@pytest.mark.parametrize("every, expected", [(0, []), (4, [4, 8]), (10, []), (3, [3, 6, 9])])
def test_mid_round_checkpoints_fall_strictly_inside_the_round(every, expected):
    assert [step for step in range(1, 11) if train.checkpoint_due(step, 10, every)] == expected


@pytest.mark.parametrize("precision, compute_dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_train_step_computes_in_the_asked_precision_and_keeps_fp32_weights(precision, compute_dtype):
    torch.manual_seed(0)
    net = model.Net()
    seen = []
    net.features[0][0].register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=2)
    before = net.fc2.weight.detach().clone()
    progress = train.new_progress()
    train.train_step(net, optimizer, schedule, torch.randint(0, 256, (8, 28, 28), dtype=torch.uint8),
                     torch.randint(0, 10, (8,)), progress, precision)
    assert seen == [compute_dtype]
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in net.parameters())
    assert not torch.equal(net.fc2.weight, before) and progress["seen"] == 8


def test_the_order_by_step_is_one_seeded_stream_of_epochs():
    """A restarted worker asks for the batch of step k directly; it must be what one uninterrupted
    stream of seeded per-epoch permutations gives (the order before this refactoring)."""
    generator = torch.Generator().manual_seed(7)
    stream = [b for _ in range(3) for b in torch.randperm(25, generator=generator).split(10)]  # 3 steps per epoch
    order = ShardOrder(25, 10, seed=7)
    assert order.steps_per_epoch == 3
    for step in [4, 5, 8, 0, 1, 2, 3, 6, 7]:  # out of order, as after a restart
        assert torch.equal(order.batch(step), stream[step]), step


def state_of(rank: int = 1) -> WorkerState:
    torch.manual_seed(0)
    return WorkerState.fresh("run-a", rank, model.Net(), lr=1e-3, total_steps=20)


def trained(state: WorkerState, steps: int) -> WorkerState:
    for _ in range(steps):
        train.train_step(state.model, state.optimizer, state.schedule, torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8),
                         torch.randint(0, 10, (4,)), state.progress, "fp32")
        state.progress["step"] += 1
    return state


def checkpoint_of(tmp_path, averaged: dict, round_index: int) -> Checkpoint:
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    torch.save({"state_dict": averaged}, folder / train.CHECKPOINT_MODEL)
    (folder / train.CHECKPOINT_ROUND).write_text(str(round_index))
    return Checkpoint.from_directory(folder)


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_fresh_worker_starts_from_the_runs_initial_weights(tmp_path):
    initial = model.initial_weights(3)
    init_path(tmp_path, "run-a").parent.mkdir(parents=True)
    torch.save(initial, init_path(tmp_path, "run-a"))
    state = state_of()
    state.resume(tmp_path, None)
    assert state.round == 0 and state.progress == train.new_progress()
    assert same_weights(state.model.state_dict(), initial)


def test_a_restart_mid_round_resumes_the_workers_own_model_schedule_and_progress(tmp_path, capfd):
    before = trained(state_of(), 3)
    before.round = 2
    before.save(partial_path(tmp_path, "run-a", 2, 1))
    averaged = model.initial_weights(5)  # round 1's average, from Ray Train's checkpoint

    state = state_of()
    state.resume(tmp_path, checkpoint_of(tmp_path, averaged, 1))
    assert state.round == 2 and state.progress == before.progress
    assert same_weights(state.model.state_dict(), before.model.state_dict())  # its own, not the average
    assert state.schedule.state_dict() == before.schedule.state_dict()
    assert state.optimizer.param_groups[0]["lr"] == before.optimizer.param_groups[0]["lr"]
    logs = capfd.readouterr().out  # training.worker.say writes to the process stdout
    assert "resuming after round 1" in logs and "resuming round 2 at step 3" in logs


def test_a_restart_between_rounds_takes_the_average_with_the_workers_own_optimizer(tmp_path):
    before = trained(state_of(), 4)
    before.round = 1
    before.save(worker_path(tmp_path, "run-a", 1, 1))  # round 1 finished and averaged
    averaged = model.initial_weights(5)

    state = state_of()
    state.resume(tmp_path, checkpoint_of(tmp_path, averaged, 1))
    assert state.round == 2 and state.progress == train.new_progress()
    assert same_weights(state.model.state_dict(), averaged)
    assert state.schedule.state_dict() == before.schedule.state_dict()


def test_another_workers_file_is_refused(tmp_path):
    other = trained(state_of(rank=2), 1)
    path = partial_path(tmp_path, "run-a", 0, 1)
    other.save(path)  # rank 2's state under rank 1's name
    init_path(tmp_path, "run-a").parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.initial_weights(0), init_path(tmp_path, "run-a"))
    with pytest.raises(RuntimeError, match="is not worker 1's file of round 0"):
        state_of(rank=1).resume(tmp_path, None)


def test_ray_trains_per_report_metrics_log_is_silenced():
    """Ray Train logs each worker's whole metrics dict at every report, from a logger named after its
    file; quiet_reports turns that one off (the aggregator prints a line per round instead)."""
    import logging

    from ray.train.v2._internal.execution import context

    logger = logging.getLogger(context.__file__)
    level = logger.level
    try:
        train.quiet_reports()
        assert logger is context.logger and not logger.isEnabledFor(logging.INFO)
    finally:
        logger.setLevel(level)
