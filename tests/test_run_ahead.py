"""Run-ahead is exact: a slot's results and checkpoints do not depend on when, or beside whom, it steps.

Two levels:

* the :class:`SlotGroup` alone (no Ray): slots stepped in random subsets,
  through the masked whole-stack path, the gather path and one-slot steps,
  give bit-identical results to slots stepped all together; an export of an
  older boundary is the state at that boundary; a rollback replays exactly;
* real Tune runs with ``run_ahead=2`` against the same runs with
  ``run_ahead=0`` (a slot steps only while its trial waits), for FIFO, ASHA,
  HyperBand (pause and resume) and PBT (exploit and explore): every reported
  result and every checkpoint is bit-identical.
"""

from __future__ import annotations

import os
import random
import re

import pytest
import torch
import torch.nn.functional as F
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler, PopulationBasedTraining
from torch import nn

import tune_helpers as h
from ray_modelbatch import optim
from ray_modelbatch.amp import SlotGradScaler
from ray_modelbatch.cpu_memory import huge_pages_usable
from ray_modelbatch.model_batch import ModelBatch
from ray_modelbatch.slot_group import SlotGroup, stack_key
from ray_modelbatch.tune.spec import SlotSpec
from tune_helpers import ray_session, trainables  # noqa: F401 - shared fixtures

K = 3  # steps per iteration in the group tests


def _spec(**kw) -> SlotSpec:
    kw.setdefault("batch_size", 16)
    kw.setdefault("steps_per_report", K)
    kw.setdefault("metrics", {"acc": lambda o, y: (o.argmax(-1) == y).float().mean()})
    kw.setdefault("loss", None if kw.get("train_step") else F.cross_entropy)
    kw.setdefault("optimizer", lambda mb: optim.AdamW(mb, lr=1e-2))
    return SlotSpec(model=lambda c: None, hparams=lambda c: {}, data=lambda: None, **kw)


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200, 12, generator=g)
    y = torch.randint(0, 4, (200,), generator=g)
    return x, y, x[:40], y[:40]


class _SmallCNN(nn.Module):
    """A convolution with BatchNorm on the 12 features as a 3x4 image: a stack on the direct path that steps whole."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm, self.head = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(48, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.norm(self.conv(x.view(-1, 1, 3, 4)))).flatten(1))


def _model(bn: bool, dropout: float = 0.0, conv: bool = False) -> nn.Module:
    if conv:
        return _SmallCNN()
    mid = [nn.BatchNorm1d(24)] if bn else []
    drop = [nn.Dropout(dropout)] if dropout else []
    return nn.Sequential(nn.Linear(12, 24), *mid, nn.ReLU(), *drop, nn.Linear(24, 4))


def _sampling_step(model, batch, config):
    """A user's step that samples (a VAE-like reparameterized draw through torch.distributions, and a fill)."""
    x, y = batch
    h = model(x)
    z = torch.distributions.Normal(h, 0.1 + 0.1 * torch.sigmoid(h)).rsample()
    return F.cross_entropy(z + 0.01 * torch.empty_like(h).uniform_(), y)


def _group(n: int, bn: bool = False, run_ahead: int = 2, dropout: float = 0.0, sampling: bool = False,
           conv: bool = False, sgd: bool = False) -> SlotGroup:
    torch.manual_seed(0)
    models = [_model(bn, dropout, conv) for _ in range(n)]
    spec = _spec(**({"train_step": _sampling_step} if sampling else {}),
                 **({"optimizer": lambda mb: optim.SGD(mb, lr=1e-2)} if sgd else {}))
    g = SlotGroup(spec, stack_key(models[0]), models[0], _data(), n, "cpu", run_ahead=run_ahead)
    for i, m in enumerate(models):
        g.add(f"t{i}", m, seed=10 + i, hparams={"lr": 1e-3 * (i + 1), "weight_decay": 0.01 * i})
    return g


def _train(g: SlotGroup, schedule) -> dict[int, list[dict]]:
    """Step ``g`` along ``schedule`` (lists of slots); every slot's results, in order."""
    out: dict[int, list[dict]] = {s: [] for s in range(g.capacity)}
    for slots in schedule:
        for s, r in g.finish(g.step(slots)).items():
            out[s].append(r)
    return out


def _random_schedule(n: int, iterations: int, seed: int) -> list[list[int]]:
    """Random subsets (sizes 1..n) until every slot has taken ``iterations * K`` steps."""
    rng = random.Random(seed)
    left = {s: iterations * K for s in range(n)}
    schedule = []
    while any(left.values()):
        live = [s for s, v in left.items() if v]
        pick = [s for s in live if rng.random() < rng.choice([0.2, 0.6, 1.0])] or [rng.choice(live)]
        for s in pick:
            left[s] -= 1
        schedule.append(pick)
    return schedule


def _state(blob: bytes) -> dict:
    import io

    return torch.load(io.BytesIO(blob), weights_only=True)


def _assert_same_state(a: dict, b: dict, where="") -> None:
    assert a["signature"] == b["signature"], where
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), (where, k)
    assert a["optimizer"]["steps"] == b["optimizer"]["steps"], where
    for dt, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["optimizer"]["state"][dt][k]), (where, dt, k)
    assert torch.equal(a["random"], b["random"]), where  # the dropout generator's state
    sa, sb = a["stream"], b["stream"]
    assert (sa is None) == (sb is None)
    if sa is not None:
        for k, v in sa.items():
            assert torch.equal(v, sb[k]) if isinstance(v, torch.Tensor) else v == sb[k], (where, k)


# --------------------------------------------------------------------------------- the group alone


@pytest.mark.parametrize("bn,dropout,sampling", [(False, 0.0, False), (True, 0.0, False), (False, 0.3, False),
                                                  (False, 0.0, True)],
                         ids=["mlp_direct_path", "batchnorm_vmap", "mlp_dropout", "sampling_step"])
def test_a_slot_trains_the_same_whichever_slots_step_beside_it(bn, dropout, sampling):
    n, iters = 6, 4
    together = _group(n, bn, dropout=dropout, sampling=sampling)
    want = _train(together, [list(range(n))] * (iters * K))
    mixed = _group(n, bn, dropout=dropout, sampling=sampling)
    got = _train(mixed, _random_schedule(n, iters, seed=1))
    paths = mixed.stats
    assert mixed.forward_path() == ("vmap: the trainable's own train_step runs under torch.vmap" if sampling
                                    else "direct")
    if bn or sampling:  # on vmap a gather may round differently: always the whole stack, masked
        assert paths.masked and not paths.gathered, paths
    else:
        assert paths.masked and paths.gathered, paths  # both paths, and one-slot steps, were taken
    for s in range(n):
        assert len(got[s]) == iters
        assert got[s] == want[s], s  # bit for bit: floats compared with ==
        _assert_same_state(_state(together.export(s)), _state(mixed.export(s)), s)
    assert [r["slot_steps"] for r in got[0]] == [K, 2 * K, 3 * K, 4 * K]


class _ConvNet(nn.Module):
    """Conv1d-BatchNorm-ReLU-Linear on the 12 features as a 1-channel signal: its training steps do not gather
    exactly (a grouped convolution's weight gradient), so its stack trains whole."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv1d(1, 4, 3, padding=1), nn.BatchNorm1d(4), nn.Linear(48, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x.unsqueeze(1)))).flatten(1))


def _conv_group(n: int) -> SlotGroup:
    torch.manual_seed(0)
    models = [_ConvNet() for _ in range(n)]
    g = SlotGroup(_spec(), stack_key(models[0]), models[0], _data(), n, "cpu", run_ahead=2)
    for i, m in enumerate(models):
        g.add(f"t{i}", m, seed=10 + i, hparams={"lr": 1e-3 * (i + 1)})
    return g


def test_a_stack_that_trains_whole_evaluates_only_its_finished_slots_where_that_is_measured_exact():
    """A CNN stack steps whole, but its evaluation forward gathers exactly (measured once per stack size), so a
    finished slot is evaluated with one other row instead of the whole stack, with the very same results."""
    n, iters = 8, 3
    together = _conv_group(n)
    assert not together.mb.train(True).gather_exact
    want = _train(together, [list(range(n))] * (iters * K))
    mixed = _conv_group(n)
    got = _train(mixed, _random_schedule(n, iters, seed=2))
    assert mixed.stats.masked and not mixed.stats.gathered  # training: the whole stack, masked
    assert mixed._eval_exact == {n: True}
    assert mixed.stats.evaluated == n * iters
    assert mixed.stats.eval_rows < n * mixed.stats.evaluated / 2, mixed.stats  # far from one stack per slot
    for s in range(n):
        assert got[s] == want[s], s  # bit for bit: floats compared with ==


def test_a_stack_whose_gathered_evaluation_rounds_differently_evaluates_whole(monkeypatch):
    """Where the measurement finds a gather's metrics differ from the whole stack's in any bit, every
    evaluation runs the whole stack, as training does."""
    g = _conv_group(8)
    real = SlotGroup._evaluate_rows

    def off_by_a_bit(self, rows):
        res = real(self, rows)
        return res if rows is None else {k: [v * (1 + 2**-20) for v in vals] for k, vals in res.items()}

    monkeypatch.setattr(SlotGroup, "_evaluate_rows", off_by_a_bit)
    _train(g, [[0, 3]] * K)
    assert g._eval_exact == {8: False}
    assert g.stats.evaluated == 2 and g.stats.eval_rows == 8


def test_the_evaluation_gather_is_measured_on_held_slots_only():
    """Free rows say nothing about a kernel (a row of zeros gives zeros whichever kernel runs): a stack that holds
    two slots evaluates whole, unmeasured, and measures once it holds three."""
    g = _conv_group(8)
    for s in range(2, 8):
        g.remove(s)
    _train(g, [[0, 1]] * K)
    assert g._eval_exact == {} and g.stats.evaluated == 2 and g.stats.eval_rows == 8  # one whole evaluation
    g.add("t8", _ConvNet(), seed=99, hparams={"lr": 1e-3})
    _train(g, [[0, 1, 2]] * K)
    assert g._eval_exact == {8: True}


def test_export_of_an_older_boundary_is_the_state_at_that_boundary_and_leaves_the_slot_alone():
    ref, g = _group(4), _group(4)
    at: dict[int, bytes] = {}
    for it in range(1, 4):  # the reference exports at every boundary
        _train(ref, [list(range(4))] * K)
        at[it] = ref.export(1)
    _train(g, [list(range(4))] * (3 * K) + [[0, 1, 2, 3]])  # 3 iterations and one step into the 4th
    assert g.iteration[1] == 3 and g.meter.steps[1] == 1
    for it in (1, 2, 3):  # run_ahead=2: the last three boundaries are kept
        _assert_same_state(_state(g.export(1, it)), _state(at[it]), it)
    with pytest.raises(ValueError, match="keep only the last 3 boundaries"):
        g.export(1, 0)
    # Exporting did not disturb the live slot: both go on identically.
    _train(ref, [list(range(4))])
    assert _train(g, [list(range(4))] * (K - 1)) == _train(ref, [list(range(4))] * (K - 1))


def test_a_slot_loaded_from_its_export_trains_on_as_if_it_had_never_left():
    """A pause and resume, or a move to another host: the loaded slot draws the dropout masks (and batches) the
    original goes on to draw, because its generator's state travels in the checkpoint."""
    g = _group(3, dropout=0.3)
    _train(g, [[0, 1, 2]] * K)
    blob = g.export(0)
    want = _train(g, [[0, 1, 2]] * K)[0]
    other = _group(3, dropout=0.3)  # slot 2 here has other weights, state and generator until the load
    other.load(2, blob, {"lr": 1e-3, "weight_decay": 0.0})
    assert _train(other, [[0, 1, 2]] * K)[2] == want


@pytest.mark.parametrize("dropout,sampling", [(0.0, False), (0.3, False), (0.0, True)],
                         ids=["mlp", "mlp_dropout", "sampling_step"])
def test_rollback_replays_the_same_iterations(dropout, sampling):
    g = _group(3, dropout=dropout, sampling=sampling)
    first = _train(g, [[0, 1, 2]] * (2 * K))
    _train(g, [[0, 1, 2]] * (K + 1))  # slot 1 runs ahead one more iteration and a step
    g.rollback(1, 1)
    assert g.iteration[1] == 1 and g.meter.steps[1] == 0
    again = _train(g, [[1]] * K)
    assert again[1] == [first[1][1]]  # iteration 2 again, bit for bit


def test_scaler_keeps_the_scale_of_masked_slots():
    mb = ModelBatch([_model(False) for _ in range(3)])
    sc = SlotGradScaler(mb, init_scale=8.0, growth_interval=1)
    opt = optim.SGD(mb, lr=0.1)
    mb.sync_grads()
    sc.step(opt, None, skip=torch.tensor([False, True, False]))
    sc.update(None, keep=torch.tensor([False, True, False]))
    assert sc.scales.tolist() == [16.0, 8.0, 16.0] and sc.growth_tracker.tolist() == [0, 0, 0]


# ------------------------------------------------------------------------------------ real Tune

LRS = [0.05, 0.02, 0.01, 0.003]


def _run(trainables, tmp_path, run_ahead, scheduler, stop, lrs=LRS, dropout=0.0, space=None, host=None, **kw):
    T = trainables(slots_per_host=len(lrs), run_ahead=run_ahead, **(host or {}))
    space = {"lr": tune.grid_search(lrs), "seed": tune.sample_from(lambda c: int(c["lr"] * 10_000)),
             "dropout": dropout, **(space or {})}
    where = re.sub(r"\W", "", f"ahead{run_ahead}" + "".join(f"_{k}{v}" for k, v in (host or {}).items()))
    grid, log = h.fit(T, space, tmp_path / where, scheduler=scheduler,
                      run_kw={"stop": {"training_iteration": stop},
                              "checkpoint_config": tune.CheckpointConfig(num_to_keep=None, checkpoint_frequency=1)},
                      **kw)
    assert h.errors(grid) == []
    [stats] = T.host_stats()
    T.shutdown_hosts()  # its CPU goes to the next run's host now, not after the idle timeout
    by_seed = {}
    for r in grid:
        seed = log.rows(r)[0]["config"]["seed"]
        ckpts = {}
        for p in h.trial_checkpoints(r.path):
            st = h.load_slot_state(p)
            ckpts[st["optimizer"]["steps"]] = st
        by_seed[seed] = (log.by_trial[r.metrics["trial_id"]], ckpts)
    return by_seed, stats


REPORTED = ("train_loss", "grad_norm", "lr", "nonfinite_steps", "slot_steps", "val_loss", "val_acc")


def _histories(rows):
    """Each result keyed by the trial's history up to it: (iteration, lr) of every result so far.

    PBT may exploit differently in two runs (its ranking is by results that arrive in another order),
    so a result is compared only with the result of the same history in the other run.
    """
    out, seen = {}, []
    for row in rows:
        seen.append((row["training_iteration"], row["config"]["lr"]))
        out[tuple(seen)] = row
    return out


def _compare(a, b):
    """Every result both runs reported, and every checkpoint both wrote, is bit-identical."""
    assert a.keys() == b.keys()
    compared = ckpts = 0
    for seed in a:
        rows_a, ck_a = a[seed]
        rows_b, ck_b = b[seed]
        hb = _histories(rows_b)
        for key, row in _histories(rows_a).items():
            other = hb.get(key)
            if other is None:
                continue
            got, want = {k: row[k] for k in REPORTED}, {k: other[k] for k in REPORTED}
            if got != want:  # pytest.fail, not assert: the rows are too large to introspect
                pytest.fail(f"trial seed {seed}, history {key}: {got} != {want}")
            compared += 1
        same_history = {r["slot_steps"] for k, r in _histories(rows_a).items() if k in hb}
        for steps in ck_a.keys() & ck_b.keys() & same_history:
            _assert_same_state(ck_a[steps], ck_b[steps], (seed, steps))
            ckpts += 1
    assert compared >= len(a) and ckpts >= len(a), (compared, ckpts)
    return compared, ckpts


SCHEDULERS = {
    "fifo": lambda: FIFOScheduler(),
    "asha": lambda: ASHAScheduler(max_t=6, grace_period=2, reduction_factor=2),
    "hyperband": lambda: HyperBandScheduler(time_attr="training_iteration", max_t=4, reduction_factor=2),
    # Synchronous, two trials, one possible new lr: the bad trial exploits the good one at every
    # perturbation, in both runs (as in test_tune_schedulers' PBT test).
    "pbt": lambda: PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=2, synch=True,
                                           quantile_fraction=0.5, resample_probability=1.0,
                                           hyperparam_mutations={"lr": [0.001]}),
}


# FIFO and ASHA run in CI's slow step (`pytest -m slow`): HyperBand and PBT cover pauses and restores here.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("fifo", "asha") else n
                                  for n in SCHEDULERS])
def test_tune_results_and_checkpoints_are_those_without_run_ahead(trainables, tmp_path, name):
    stop = {"fifo": 4, "asha": 6, "hyperband": 4, "pbt": 6}[name]
    # HyperBand (max_t 4, eta 2) pauses the first arrivals of its second bracket of 3 at its rung:
    # 6 trials, all live at once.
    lrs = {"hyperband": [0.05, 0.02, 0.01, 0.03, 0.015, 1e-5], "pbt": [0.05, 1e-5]}.get(name, LRS)
    # With dropout where trials pause and resume (HyperBand) or take a donor's state (PBT): each slot's dropout
    # generator travels with its checkpoint and rolls back with it (see slot_random).
    dropout = 0.2 if name in ("hyperband", "pbt") else 0.0
    base, _ = _run(trainables, tmp_path, 0, SCHEDULERS[name](), stop, lrs, dropout)
    ahead, stats = _run(trainables, tmp_path, 2, SCHEDULERS[name](), stop, lrs, dropout)
    _compare(base, ahead)
    assert stats["run_ahead"] == 2
    assert [v["forward"] for v in stats["stacks"].values()] == ["direct"]  # the MLP (with dropout) runs directly
    # the host's OpenMP threads sleep between ops (tune/host.py _passive_openmp), unless the user chose
    assert stats["omp_wait_policy"] == os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
    # a CPU host leaves one core of its node to Tune's driver (tune/host.py default_threads): 1 of the 2 here
    assert stats["threads"] == 1
    # the engine thread's big tensors stay mapped: on huge pages where the node has them, else every thread of
    # the host allocates from glibc's main arena (cpu_memory.allocator_env); a user's own arena setting is kept
    if "MALLOC_ARENA_MAX" in os.environ:
        assert stats["malloc_arena_max"] == os.environ["MALLOC_ARENA_MAX"]
    else:
        assert stats["big_tensors"] == ("huge pages" if huge_pages_usable() else "one malloc arena")
    # where the engine thread's time went: disjoint parts of the host's time, and the thread's CPU within busy
    parts = [stats[k] for k in ("busy_s", "wait_s", "command_s", "housekeeping_s")]
    assert all(p >= 0 for p in parts) and sum(parts) <= stats["wall_s"] + 0.05, stats
    assert stats["busy_s"] > 0 and stats["command_s"] > 0  # it stepped, and served the trials' attaches
    # ... and what the serving went to, by command: every trial attached once, and within command_s
    commands = stats["commands"]
    assert commands["attach"]["count"] >= len(lrs), commands
    assert sum(c["wall_s"] for c in commands.values()) <= stats["command_s"] + 1e-6
    assert all(0 <= c["cpu_s"] <= c["wall_s"] + 0.01 for c in commands.values()), commands
    if name in ("hyperband", "pbt"):  # pauses and exploits save slots and restore them
        assert commands["save"]["count"] > 0 and commands["restore"]["count"] > 0, commands
    assert 0 < stats["busy_cpu_s"] <= stats["busy_s"] + 0.01 and stats["busy_preempted"] >= 0
    # the engine thread's wait for a core (Linux): a part of its life, never negative
    assert 0 <= stats["engine_cpu_wait_s"] <= stats["wall_s"] + 0.05
    if name == "pbt":  # the recipients really took a donor's state and a new lr
        exploited = [row for rows, _ in ahead.values() for row in rows if row["config"]["lr"] == 0.001]
        assert exploited and all(r["slot_steps"] == h.K * r["training_iteration"] for r in exploited)
    if name == "hyperband":
        assert any(row["iterations_since_restore"] < row["training_iteration"]
                   for rows, _ in ahead.values() for row in rows), "no trial was paused and resumed"


def test_trials_with_their_own_dropout_rates_share_a_stack_and_train_as_in_stacks_of_their_own(trainables, tmp_path):
    """A continuous dropout rate (slot_dropout): one stack, every result and checkpoint bit-identical to a run
    that keeps each rate in a stack of its own (stack_by), through HyperBand's pauses and resumes."""
    lrs = [0.05, 0.02, 0.01, 0.03, 0.015, 1e-5]
    space = {"dropout": tune.sample_from(lambda c: round(0.05 + 7 * c["lr"], 4))}
    apart, split = _run(trainables, tmp_path, 2, SCHEDULERS["hyperband"](), 4, lrs, 0.0, space,
                        {"stack_by": ["dropout"]})
    together, stats = _run(trainables, tmp_path, 2, SCHEDULERS["hyperband"](), 4, lrs, 0.0, space)
    _compare(apart, together)
    assert len(split["stacks"]) == len(lrs) and len(stats["stacks"]) == 1, (split["stacks"], stats["stacks"])
    rates = {row["config"]["dropout"] for rows, _ in together.values() for row in rows}
    assert len(rates) == len(lrs) and min(rates) > 0


@pytest.mark.parametrize("kept,conv", [([1, 4, 6], False), ([5], False), ([2], True)])
def test_a_sparse_stack_that_steps_whole_drops_its_free_rows_and_its_slots_train_on(kept, conv):
    """A stack whose gathers are not exact (masked whole-stack steps: a BatchNorm MLP, or a convolution,
    both on the direct path) that keeps 3 of 8 slots, or one, compacts to as many rows after COMPACT_AFTER_STEPS
    steps; the kept slots move in order and train on as in the uncompacted stack (to float rounding: the
    row count changed), and their run-ahead boundaries move with them.

    The convolution trains with SGD, to the last bit of its losses and a unit in the last place of its
    weights: its kernels round each slot alike at any row count, but an elementwise update does not quite
    (where a vectorized loop's tail falls depends on the buffer's length). With AdamW at lr 1e-2 that
    rounding grows to 1e-4 of the loss within a few iterations, so it would hide a wrong row."""
    from ray_modelbatch.slot_group import COMPACT_AFTER_STEPS

    plain, sparse = _group(8, bn=True, conv=conv, sgd=conv), _group(8, bn=True, conv=conv, sgd=conv)
    rel, abs_ = (1e-7, 1e-8) if conv else (1e-5, 1e-6)
    assert not sparse._exact_gathers() and sparse.forward_path() == "direct"
    for g in (plain, sparse):
        for s in set(range(8)) - set(kept):
            g.remove(s)
    where = {s: s for s in kept}  # the sparse group's current row of each kept slot
    want: dict[int, list[dict]] = {s: [] for s in kept}
    got: dict[int, list[dict]] = {s: [] for s in kept}
    for step in range(COMPACT_AFTER_STEPS + 2 * K):
        for s, r in plain.finish(plain.step(kept)).items():
            want[s].append(r)
        moved = sparse.compact_if_sparse()
        if moved:
            assert step == COMPACT_AFTER_STEPS - 1 and moved == {s: i for i, s in enumerate(kept)}, (step, moved)
            where = {s: moved[row] for s, row in where.items()}
        back = {row: s for s, row in where.items()}
        for row, r in sparse.finish(sparse.step(sorted(where.values()))).items():
            got[back[row]].append(r)
    assert sparse.capacity == sparse.used == len(kept) and sparse.stats.compacted == 1
    assert plain.capacity == 8 and plain.stats.compacted == 0
    for s in kept:
        assert len(got[s]) == len(want[s]) > COMPACT_AFTER_STEPS // K
        for a, b in zip(got[s], want[s]):
            assert a["slot_steps"] == b["slot_steps"]
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=rel, abs=abs_)
            assert a["val_loss"] == pytest.approx(b["val_loss"], rel=rel, abs=abs_)
        mine, ref = _state(sparse.export(where[s])), _state(plain.export(s))
        for k, v in ref["model"].items():
            torch.testing.assert_close(mine["model"][k], v, rtol=10 * rel, atol=10 * abs_)
    # the boundary captured before the compaction moved with its slot: bit for bit the uncompacted one
    early = (COMPACT_AFTER_STEPS - 1) // K
    back_to = kept[-1]
    assert sparse.iteration[where[back_to]] - early < sparse.snapshots.depth
    for s in kept:
        _assert_same_state(_state(sparse.export(where[s], early)), _state(plain.export(s, early)), s)
    sparse.rollback(where[back_to], early)
    _assert_same_state(_state(sparse.export(where[back_to])), _state(plain.export(back_to, early)))


@pytest.mark.parametrize("conv", [False, True])
def test_an_empty_stack_gives_back_its_rows_and_a_later_trial_trains_in_it_as_in_a_new_stack(conv):
    """Once its last trial is gone a stack shrinks to one free row (its weights, optimizer state, snapshots and
    streams with it); a trial that comes later takes that row and trains bit for bit as in a stack of one."""
    g, ref = _group(6, conv=conv, sgd=conv), _group(1, conv=conv, sgd=conv)
    _train(g, [list(range(6))] * (2 * K))
    for s in range(5):
        g.remove(s)
    assert not g.release_if_empty() and g.capacity == 6  # one trial left: nothing to give back
    g.remove(5)
    ref.remove(0)
    assert g.release_if_empty() and g.capacity == 1 and g.used == 0 and g.stats.released == 1
    assert not g.release_if_empty()  # already one row
    assert all(t.shape[0] == 1 for t in g.mb.params.values()) and g.snapshots.capacity == 1
    for group in (g, ref):
        torch.manual_seed(5)
        assert group.add("late", _model(False, 0.0, conv), seed=77, hparams={"lr": 2e-3, "weight_decay": 0.0}) == 0
    got, want = _train(g, [[0]] * (3 * K)), _train(ref, [[0]] * (3 * K))
    assert len(got[0]) == 3 and got[0] == want[0]
    _assert_same_state(_state(g.export(0)), _state(ref.export(0)))


def test_a_full_stack_that_steps_whole_grows_one_row_and_an_exact_one_a_quarter():
    """Every free row of a stack that steps whole (BatchNorm here) is computed on every fused step, so it grows
    one row at a time; a stack with exact gathers (Linear and ReLU) computes only the rows that step and grows by
    a quarter, at least MIN_CAPACITY rows."""
    from ray_modelbatch.slot_group import MIN_CAPACITY

    for bn, sizes in ((True, [4, 4, 4, 4, 5, 6, 7, 8, 9]), (False, [4, 4, 4, 4, 8, 8, 8, 8, 8 + MIN_CAPACITY])):
        torch.manual_seed(0)
        models = [_model(bn) for _ in range(9)]
        g = SlotGroup(_spec(), stack_key(models[0]), models[0], _data(), 16, "cpu")
        seen = []
        for i, m in enumerate(models):
            g.add(f"t{i}", m, seed=10 + i, hparams={"lr": 1e-3})
            seen.append(g.capacity)
        assert seen == sizes, (bn, seen)
        g.step(sorted(g.owner))  # and it trains on at that size
