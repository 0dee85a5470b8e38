"""Standalone Trainer: exact per-slot reproduction, early stopping, divergence, TensorBoard, progress, metrics."""

import copy
import io
import os
import struct

import pytest
import torch
from torch import nn

import ray_modelbatch as rmb
from ray_modelbatch import metrics
from ray_modelbatch.data import PerSlotStreams, SharedStream, SlotSampler, bootstrap, kfold, padded_per_slot, shards
from ray_modelbatch.errors import IncompatibleModelsError
from ray_modelbatch.trainer import EarlyStopping, History, Trainer


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target, dtype=torch.long)


def mlp(act=nn.Tanh, hidden=32):
    return nn.Sequential(nn.Linear(64, hidden), act(), nn.Linear(hidden, 10))


def engine_for(models, opt_cls=rmb.optim.Adam, **opt_kw):
    mb = rmb.ModelBatch(models)
    return rmb.FusedEngine(mb, opt_cls(mb, **opt_kw), nn.functional.cross_entropy)


def snapshot(eng):
    """Every slot's parameters, optimizer state and step count (for bit-identity checks)."""
    mb, opt = eng.mb, eng.optimizer
    return {
        "params": {n: p.detach().clone() for n, p in mb.params.items()},
        "state": {f"{dt}/{k}": v.clone() for dt, st in opt.state.items() for k, v in st.items()},
        "steps": opt.steps.clone(),
    }


def rows_equal(a, b, slots):
    """Bit-identical rows ``slots`` of every tensor of two snapshots."""
    idx = torch.as_tensor(slots)
    return all(
        torch.equal(a[part][k][idx], b[part][k][idx]) for part in ("params", "state") for k in a[part]
    ) and torch.equal(a["steps"][idx], b["steps"][idx])


# --------------------------------------------------------------------------- exact reproduction
def test_per_slot_streams_reproduce_independent_adam_training(digits):
    """Slot i of a fused run == one plain model + torch.optim.Adam on SlotSampler(indices_i, B, seed_i)."""
    x, y = digits
    n, batch, steps = x.shape[0], 24, 20
    routes = bootstrap(n, 2, seed=7) + shards(n, 2, seed=8)  # slots 0-1 bagged, 2-3 sharded
    seeds = [101, 202, 303, 404]
    lrs = [3e-3, 1e-2, 5e-3, 2e-2]
    models = [mlp() for _ in range(4)]
    refs = copy.deepcopy(models)
    eng = engine_for(models, lr=lrs, weight_decay=[0.0, 1e-3, 0.0, 1e-2])
    trainer = Trainer(eng, PerSlotStreams(x, y, batch, seeds, routes), eval_every=5, progress=False)
    hist = trainer.fit(steps)
    assert hist.status == ["finished"] * 4 and trainer.step_count == steps

    for i, ref in enumerate(refs):
        opt = torch.optim.Adam(ref.parameters(), lr=lrs[i], weight_decay=[0.0, 1e-3, 0.0, 1e-2][i])
        sampler = SlotSampler(routes[i], batch, seeds[i])
        for _ in range(steps):
            b = next(sampler)
            opt.zero_grad()
            nn.functional.cross_entropy(ref(x[b]), y[b]).backward()
            opt.step()
        got = eng.mb.slot_state(i)
        for k, v in ref.state_dict().items():
            # atol covers entries near zero (float32 rounding of values ~0.1 is ~1e-8 per step).
            torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=f"slot {i} {k}")
    # The slots really saw different data: same data would not tell a mix-up apart.
    assert not torch.allclose(eng.mb.slot_state(0)["0.weight"], eng.mb.slot_state(2)["0.weight"])


# ------------------------------------------------------------------------------ early stopping
def test_early_stopping_stops_a_slot_that_cannot_improve_and_freezes_it(digits):
    x, y = digits
    tr_x, tr_y, va_x, va_y = x[:1400], y[:1400], x[1400:], y[1400:]
    eng = engine_for([mlp() for _ in range(3)], lr=[1e-2, 0.0, 5e-3])  # slot 1 cannot learn
    es = EarlyStopping("val_loss", mode="min", patience=3)
    trainer = Trainer(eng, SharedStream(tr_x, tr_y, 32, seed=0), (va_x, va_y),
                      metrics={"accuracy": metrics.accuracy}, eval_every=5, early_stopping=es, progress=False)
    start = snapshot(eng)
    hist = trainer.fit(20)
    # Eval at 5 sets slot 1's best; 10, 15 and 20 do not improve on it: stopped at 20.
    assert hist.status == ["finished", "early_stopped", "finished"]
    assert hist.stopped_at == {1: 20}
    assert eng.mb.active.tolist() == [True, False, True]
    assert es.bad_evals[1] == 3 and es.bad_evals[0] == 0
    at_stop = snapshot(eng)
    # Adam's moments of slot 1 moved while it ran (so "frozen" below is not trivial).
    assert not torch.equal(at_stop["state"]["torch.float32/exp_avg"][1], start["state"]["torch.float32/exp_avg"][1])

    hist = trainer.fit(25)
    end = snapshot(eng)
    assert rows_equal(at_stop, end, [1])  # params, moments and step count bit-identical
    assert not torch.equal(at_stop["params"]["0.weight"][0], end["params"]["0.weight"][0])
    assert eng.optimizer.steps.tolist() == [45.0, 20.0, 45.0]
    assert hist.status == ["finished", "early_stopped", "finished"]
    assert hist.final(1)["step"] == 20 and hist.final(0)["step"] == 45
    assert hist.final(0)["val_loss"] < hist.results[0][0]["val_loss"]
    assert hist.best(0)["val_loss"] == min(r["val_loss"] for r in hist.results[0])


@pytest.mark.parametrize("restore_best", [False, True])
def test_early_stopping_can_put_a_stopped_slots_best_weights_back(digits, restore_best):
    x, y = digits
    eng = engine_for([mlp() for _ in range(4)], lr=[3e-2, 1e-1, 5e-2, 2e-1])
    es = EarlyStopping("val_loss", patience=1, restore_best=restore_best)  # the first eval that is no better stops
    trainer = Trainer(eng, SharedStream(x[:1400], y[:1400], 32, seed=0), (x[1400:1460], y[1400:1460]),
                      eval_every=2, early_stopping=es, progress=False)
    hist = trainer.fit(60)
    stopped = [s for s in range(4) if hist.status[s] == "early_stopped"]
    assert stopped, hist.status
    now = trainer.evaluate(stopped)  # the weights each stopped slot holds now
    for s in stopped:
        best, final = hist.best(s), hist.final(s)
        assert best["step"] < final["step"] == hist.stopped_at[s]
        held, other = (final, best) if not restore_best else (best, final)
        assert now[s]["val_loss"] == pytest.approx(held["val_loss"], rel=1e-6), (s, now[s], best, final)
        assert now[s]["val_loss"] != pytest.approx(other["val_loss"], rel=1e-6)
    assert hist.restored == ({s: hist.best(s)["step"] for s in stopped} if restore_best else {})


@pytest.mark.parametrize("per_slot", [False, True], ids=["shared stream", "per-slot streams"])
def test_a_trainer_resumed_from_its_state_dict_goes_on_bit_for_bit(digits, per_slot):
    """Interrupted after a fit() and resumed in a new Trainer (new models, a saved and reloaded state), the sweep
    ends exactly as the uninterrupted one: weights, dropout draws, moments, stream, early stopping, history."""
    x, y = digits
    tr_x, tr_y, va = x[:1400], y[:1400], (x[1400:1500], y[1400:1500])

    def trainer(seed):
        torch.manual_seed(seed)
        models = [nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 10)) for _ in range(3)]
        eng = engine_for(models, opt_cls=rmb.optim.AdamW, lr=[3e-2, 1e-2, 2e-1],
                         schedule=rmb.optim.schedules.warmup_cosine(60, 6))
        train = (PerSlotStreams(tr_x, tr_y, 16, seeds=[0, 1, 2]) if per_slot else SharedStream(tr_x, tr_y, 16, seed=3))
        return Trainer(eng, train, va, eval_every=4, progress=False,
                       early_stopping=EarlyStopping("val_loss", patience=2, restore_best=True))

    whole = trainer(0)
    whole.fit(24)
    saved = io.BytesIO()
    torch.save(whole.state_dict(), saved)
    whole.fit(36)

    resumed = trainer(1)  # other initial weights: everything must come from the state
    saved.seek(0)
    resumed.load_state_dict(torch.load(saved, weights_only=True))
    resumed.fit(36)
    a, b = snapshot(whole.engine), snapshot(resumed.engine)
    assert rows_equal(a, b, [0, 1, 2])
    assert whole.history.state_dict() == resumed.history.state_dict()
    assert whole.step_count == resumed.step_count == 60
    assert "early_stopped" in whole.history.status  # early stopping and its restore took part
    with pytest.raises(IncompatibleModelsError, match=r"another architecture \(parameter '3\.weight'"):
        other = Trainer(engine_for([mlp() for _ in range(3)]), SharedStream(tr_x, tr_y, 16), progress=False,
                        early_stopping=EarlyStopping("val_loss"))
        saved.seek(0)
        other.load_state_dict(torch.load(saved, weights_only=True))


def test_a_replaced_slot_trains_its_new_model_as_alone_with_a_record_of_its_own(digits, tmp_path):
    x, y = digits
    tr_x, tr_y, va = x[:1400], y[:1400], (x[1400:1500], y[1400:1500])
    torch.manual_seed(0)
    eng = engine_for([mlp() for _ in range(3)], opt_cls=rmb.optim.AdamW, lr=1e-2)
    es = EarlyStopping("val_loss", patience=50)
    trainer = Trainer(eng, SharedStream(tr_x, tr_y, 16, seed=4), va, eval_every=5, early_stopping=es,
                      logdir=str(tmp_path), progress=False)
    trainer.fit(10)
    old_results = list(trainer.history.results[1])
    new = mlp()
    alone = copy.deepcopy(new)
    trainer.replace_slot(1, new, hparams={"lr": 3e-3})
    trainer.fit(15)

    twin = SharedStream(tr_x, tr_y, 16, seed=4)  # the batches the stack saw, for the model alone
    for _ in range(10):
        twin.next_batch()
    ref = torch.optim.AdamW(alone.parameters(), lr=3e-3)
    for _ in range(15):
        xb, yb = twin.next_batch()
        ref.zero_grad()
        nn.functional.cross_entropy(alone(xb), yb).backward()
        ref.step()
    for k, v in alone.state_dict().items():
        torch.testing.assert_close(eng.mb.slot_state(1)[k], v, rtol=1e-5, atol=1e-6)
    hist = trainer.history
    assert hist.replaced == {1: [old_results]} and [r["step"] for r in hist.results[1]] == [15, 20, 25]
    assert hist.results[1][0]["slot_steps"] == 5  # fresh optimizer state
    assert [r["step"] for r in hist.results[0]] == [5, 10, 15, 20, 25]
    assert es.best_step[1] >= 15  # early stopping judged the new model alone
    trainer.close()
    assert sorted(os.listdir(tmp_path)) == ["slot_000", "slot_001", "slot_001_r1", "slot_002"]


# ------------------------------------------------------------------------------- divergence
def _diverge_run(x, y, lrs, steps=30):
    torch.manual_seed(0)
    eng = engine_for([mlp(nn.ReLU) for _ in range(4)], opt_cls=rmb.optim.SGD, lr=lrs, momentum=0.9)
    trainer = Trainer(eng, SharedStream(x, y, 32, seed=1), (x[:300], y[:300]), eval_every=7,
                      max_nonfinite_steps=4, progress=False)
    return eng, trainer.fit(steps)


def test_diverging_slot_is_reported_stopped_and_does_not_touch_the_others(digits):
    x, y = digits
    sane, h_sane = _diverge_run(x, y, [0.05, 0.02, 0.05, 0.01])
    bad, h_bad = _diverge_run(x, y, [0.05, 0.02, 1e20, 0.01])

    assert h_sane.nonfinite == {} and h_sane.status == ["finished"] * 4
    assert list(h_bad.nonfinite) == [2]
    steps = h_bad.nonfinite[2]
    first = steps[0]
    assert steps == list(range(first, first + 4))  # consecutive, then deactivated
    assert h_bad.status == ["finished", "finished", "diverged", "finished"]
    assert h_bad.stopped_at == {2: first + 3}
    assert not bool(bad.mb.active[2])
    assert bad.optimizer.steps[2].item() == first - 1  # non-finite steps were skipped
    # The other slots end bit-identical to a run where slot 2 was sane.
    assert rows_equal(snapshot(sane), snapshot(bad), [0, 1, 3])
    for s in (0, 1, 3):
        assert h_bad.results[s] == h_sane.results[s]


def test_history_records_and_summary(digits):
    x, y = digits
    eng = engine_for([mlp() for _ in range(2)], lr=1e-2)
    trainer = Trainer(eng, SharedStream(x, y, 16, 0), (x[:200], y[:200]), eval_every=4, progress=False)
    hist = trainer.fit(10)  # evals at 4, 8 and the last step
    assert [r["step"] for r in hist[0]] == [4, 8, 10]
    # The keys a Tune trial reports too (slot_results.iteration_result), plus the trainer's step.
    assert set(hist.final(1)) == {"step", "train_loss", "grad_norm", "nonfinite_steps", "lr", "slot_steps", "val_loss"}
    assert hist.final(1)["lr"] == pytest.approx(1e-2)
    assert hist.final(1)["slot_steps"] == 10 and hist.final(1)["nonfinite_steps"] == 0
    records = hist.to_records()
    assert len(records) == 6 and {r["slot"] for r in records} == {0, 1}
    assert all(r["status"] == "finished" for r in records)
    summary = hist.summary()
    assert summary[0]["best_val_loss"] == min(r["val_loss"] for r in hist[0])
    assert summary[0]["final_step"] == 10
    # Trainer.evaluate agrees with what was recorded at the last step.
    ev = trainer.evaluate()
    assert ev[1]["val_loss"] == pytest.approx(hist.final(1)["val_loss"])


# ----------------------------------------------------------------------- k-fold, paused slots
def test_kfold_trainer_evaluates_each_slot_on_its_own_fold_with_paused_slots(digits):
    x, y = digits
    k = 4
    train_idx, val_idx = kfold(x.shape[0], k, seed=0)
    xs, ys, mask = padded_per_slot(x, y, val_idx)
    eng = engine_for([mlp() for _ in range(k)], opt_cls=rmb.optim.AdamW, lr=1e-2)
    eng.mb.deactivate(1)  # paused by the caller: must neither train nor be evaluated
    fns = {"loss": metrics.cross_entropy, "accuracy": metrics.accuracy}
    trainer = Trainer(eng, PerSlotStreams(x, y, 32, range(k), train_idx), (xs, ys, mask),
                      metrics=fns, eval_every=5, progress=False)
    hist = trainer.fit(10)
    assert hist.status == ["finished", "inactive", "finished", "finished"]
    assert hist.results[1] == [] and eng.optimizer.steps.tolist() == [10.0, 0.0, 10.0, 10.0]
    for j in (0, 2, 3):
        alone = eng.evaluate(x[val_idx[j]], y[val_idx[j]], fns, slots=[j])
        assert hist.final(j)["val_loss"] == pytest.approx(alone["loss"].item(), rel=1e-5)
        assert hist.final(j)["val_accuracy"] == pytest.approx(alone["accuracy"].item(), rel=1e-6)
    with pytest.raises(ValueError, match="per-example metrics"):
        Trainer(eng, PerSlotStreams(x, y, 32, range(k), train_idx), (xs, ys, mask), progress=False)


# ---------------------------------------------------------------------------------- TensorBoard
def read_scalars(run_dir):
    """{tag: [(step, value)]} from a run's event files: TFRecord framing + tensorboardX's Event proto."""
    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import masked_crc32c

    out = {}
    files = [f for f in os.listdir(run_dir) if f.startswith("events.out.tfevents")]
    assert files, f"no event file in {run_dir}"
    for name in files:
        data = open(os.path.join(run_dir, name), "rb").read()
        pos = 0
        while pos < len(data):
            header = data[pos : pos + 8]
            (length,) = struct.unpack("<Q", header)
            assert struct.unpack("<I", data[pos + 8 : pos + 12])[0] == masked_crc32c(header)
            body = data[pos + 12 : pos + 12 + length]
            assert struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])[0] == masked_crc32c(body)
            pos += 16 + length
            ev = event_pb2.Event()
            ev.ParseFromString(body)
            for v in ev.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, []).append((ev.step, v.simple_value))
                else:
                    out.setdefault(v.tag, [])
    return out


def test_tensorboard_event_files_per_slot(digits, tmp_path):
    x, y = digits
    eng = engine_for([mlp() for _ in range(3)], lr=[1e-3, 1e-2, 3e-3],
                     schedule=rmb.optim.schedules.warmup_cosine(total_steps=10, warmup_steps=2))
    with Trainer(eng, SharedStream(x, y, 16, 0), (x[:100], y[:100]), metrics={"accuracy": metrics.accuracy},
                 eval_every=5, logdir=str(tmp_path), progress=False) as trainer:
        hist = trainer.fit(10)
    assert sorted(os.listdir(tmp_path)) == ["slot_000", "slot_001", "slot_002"]
    for s in range(3):
        scalars = read_scalars(tmp_path / f"slot_{s:03d}")
        for tag in ("train/loss", "train/grad_norm", "train/lr", "val/loss", "val/accuracy"):
            assert [step for step, _ in scalars[tag]] == [5, 10], tag
        for (step, value), rec in zip(scalars["val/loss"], hist.results[s]):
            assert value == pytest.approx(rec["val_loss"], rel=1e-6)
        lrs = [v for _, v in scalars["train/lr"]]
        assert lrs == pytest.approx([r["lr"] for r in hist.results[s]], rel=1e-6)
        assert "_hparams_/session_start_info" in scalars

    # Named runs, created lazily: a slot that never logs gets no directory.
    w = rmb.SlotWriter(tmp_path / "named", num_slots=2, names={0: "trial_a"})
    w.log(0, {"m": 1.5}, step=3)
    w.close()
    assert os.listdir(tmp_path / "named") == ["trial_a"]
    assert read_scalars(tmp_path / "named" / "trial_a")["m"] == [(3, 1.5)]


@pytest.mark.parametrize("schedule", [rmb.optim.schedules.multi_step([4, 8], 0.5), rmb.optim.schedules.one_cycle(10)],
                         ids=["multi_step", "one_cycle"])
def test_tensorboard_hparams_of_schedules_with_lists_and_strings(digits, tmp_path, schedule):
    """Milestone lists and anneal strategies reach TensorBoard's HParams as text, numbers as numbers."""
    x, y = digits
    eng = engine_for([mlp() for _ in range(2)], lr=[1e-3, 1e-2], schedule=schedule)
    with Trainer(eng, SharedStream(x, y, 16, 0), (x[:100], y[:100]), eval_every=5, logdir=str(tmp_path),
                 progress=False) as trainer:
        trainer.fit(10)
    assert "_hparams_/session_start_info" in read_scalars(tmp_path / "slot_000")
    flat = rmb.trainer.flat_hparams(eng.optimizer.get_hparams(0))
    params = {k: v for k, v in flat.items() if k.startswith("schedule_")}
    assert params and all(isinstance(v, (float, bool, str)) for v in params.values()), params
    if schedule.kind == "multi_step":
        assert flat["schedule_milestones"] == "[4, 8]" and flat["schedule_gamma"] == 0.5


def test_common_input_mistakes_are_named_in_one_line(digits):
    x, y = digits
    eng = engine_for([mlp() for _ in range(2)], lr=1e-3)
    with pytest.raises(rmb.InputShapeError, match=r"failed on its input's dtype: .*Double.*x\.float\(\)"):
        eng.train_step(x.double()[:16], y[:16])
    with pytest.raises(rmb.InputShapeError, match=r"input's dtype: .*Byte.*x\.float\(\) / 255"):
        eng.train_step(x[:16].to(torch.uint8), y[:16])
    with pytest.raises(TypeError, match=r"got torch\.optim\.\w+\.SGD\. Fix: ray_modelbatch\.optim\.SGD\(mb"):
        rmb.FusedEngine(eng.mb, torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1), nn.functional.cross_entropy)
    with pytest.raises(ValueError, match="has 100 inputs but 95 labels"):
        Trainer(eng, SharedStream(x, y, 16), (x[:100], y[:95]), progress=False)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    with pytest.raises(TypeError, match=r"got DataLoader\. Fix: .*IterableStreams"):
        Trainer(eng, loader, progress=False)
    with pytest.raises(TypeError, match="batch_size must be one number for every slot of a stack"):
        PerSlotStreams(x, y, [16, 32], seeds=[0, 1])
    with pytest.raises(ValueError, match=r"batch_size must be a whole number >= 1, got 16\.5"):
        SharedStream(x, y, 16.5)
    with pytest.raises(ValueError, match=r"fit\(steps\) takes a number of steps >= 0; got -5"):
        Trainer(eng, SharedStream(x, y, 16), progress=False).fit(-5)


# ----------------------------------------------------------------------------------- progress
def test_progress_bar_writes_to_a_file(digits):
    x, y = digits
    eng = engine_for([mlp() for _ in range(2)], lr=1e-2)
    es = EarlyStopping("accuracy", mode="max", patience=100)
    buf = io.StringIO()
    trainer = Trainer(eng, SharedStream(x, y, 16, 0), (x[:100], y[:100]), metrics={"accuracy": metrics.accuracy},
                      eval_every=3, early_stopping=es, progress=True, progress_file=buf)
    trainer.fit(9)
    out = buf.getvalue()
    assert "9/9" in out and "active=2" in out and "best=" in out
    assert trainer.history.metric == "val_accuracy"  # "accuracy" resolved to the recorded name


def test_early_stopping_unknown_metric_is_a_clear_error(digits):
    x, y = digits
    eng = engine_for([mlp()], lr=1e-2)
    trainer = Trainer(eng, SharedStream(x, y, 16, 0), (x[:50], y[:50]), eval_every=2,
                      early_stopping=EarlyStopping("val_f1"), progress=False)
    with pytest.raises(KeyError, match="val_f1"):
        trainer.fit(2)


# ------------------------------------------------------------------------------------- metrics
def test_metric_functions_match_torch():
    logits, target = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    torch.testing.assert_close(metrics.accuracy(logits, target), (logits.argmax(1) == target).float())
    torch.testing.assert_close(metrics.cross_entropy(logits, target),
                               nn.functional.cross_entropy(logits, target, reduction="none"))
    pred, tgt = torch.randn(6, 3), torch.randn(6, 3)
    torch.testing.assert_close(metrics.mse(pred, tgt), ((pred - tgt) ** 2).mean(1))
    # [B, 1] predictions against [B] targets: per-example, not broadcast to [B, B].
    p1, t1 = torch.randn(6, 1), torch.randn(6)
    torch.testing.assert_close(metrics.mse(p1, t1), (p1.squeeze(1) - t1) ** 2)
    assert metrics.mse(torch.randn(6), torch.randn(6)).shape == (6,)
    # vmapped over slots, as the engine does.
    out = torch.vmap(metrics.accuracy, in_dims=(0, None))(torch.randn(3, 6, 5), target)
    assert out.shape == (3, 6)


@pytest.mark.parametrize("fn", [metrics.accuracy, metrics.cross_entropy])
def test_the_library_metrics_batched_over_slots_equal_each_slot_alone(fn):
    """The engine computes ``metrics.accuracy`` and ``metrics.cross_entropy`` for every slot in one call
    (no vmap); each slot's values equal the one-model function's on that slot, bit for bit."""
    g = torch.Generator().manual_seed(0)
    out = torch.randn(4, 7, 5, generator=g)
    out[1, 2] = out[1, 2, 3]  # a tie: argmax picks the first index, alone and batched
    shared, per_slot = torch.randint(0, 5, (7,), generator=g), torch.randint(0, 5, (4, 7), generator=g)
    for target, per in ((shared, False), (per_slot, True)):
        got = metrics.slot_batched(fn, out, target, per_slot_targets=per)
        want = torch.stack([fn(out[i], target[i] if per else target) for i in range(4)])
        assert got is not None and torch.equal(got, want)
    if fn is metrics.accuracy:  # a sequence model's [n, B, T, C] outputs
        seq, tgt = torch.randn(3, 2, 6, 5, generator=g), torch.randint(0, 5, (2, 6), generator=g)
        assert torch.equal(metrics.slot_batched(fn, seq, tgt, False), torch.stack([fn(seq[i], tgt) for i in range(3)]))
    # other shapes and other functions are left to vmap
    assert metrics.slot_batched(fn, out, torch.randn(7), False) is None  # float targets
    assert metrics.slot_batched(fn, out, shared[:5], False) is None
    assert metrics.slot_batched(metrics.mse, out, out, True) is None
    assert metrics.slot_batched(lambda o, t: fn(o, t), out, shared, False) is None


def test_a_step_that_runs_out_of_memory_is_rerun_in_chunks_with_the_same_results(digits):
    """The Trainer steps through a SlotGroup, so it inherits the out-of-memory split of a host's group:
    a fused step of more than 2 slots that fails is rerun as chunks of 2, and every slot's history
    and state equal those of an undisturbed run to float rounding (per-slot streams: each chunk gets
    its own rows; a one-slot chunk runs a plain GEMM, which rounds differently from a batched one)."""
    x, y = digits
    torch.manual_seed(0)
    models = [mlp() for _ in range(5)]

    def run(inject: bool):
        eng = engine_for([copy.deepcopy(m) for m in models], lr=1e-2)
        if inject:
            real = eng.train_step

            def train_step(xb, yb, *, slots, **kw):
                if len(slots) > 2:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
                return real(xb, yb, slots=slots, **kw)

            eng.train_step = train_step
        trainer = Trainer(eng, PerSlotStreams(x, y, 16, seeds=list(range(5))), (x[:100], y[:100]),
                          eval_every=3, progress=False)
        return trainer.fit(7), snapshot(eng), trainer

    (h_ref, s_ref, _), (h_oom, s_oom, t_oom) = run(False), run(True)
    assert t_oom.group.max_chunk == 2
    for got, want in zip(h_oom.results, h_ref.results):
        assert got == [pytest.approx(r, rel=1e-5, abs=1e-7) for r in want]
    for k in s_ref:
        torch.testing.assert_close(s_oom[k], s_ref[k], rtol=1e-5, atol=1e-6)


class KeywordNet(nn.Module):
    """A model called with keyword inputs, as a Hugging Face model is (``model(**batch)``)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, pixels, weight):
        return self.fc(pixels * weight)


def test_dict_validation_data_is_evaluated_as_a_dict_training_batch_is(digits):
    """val=(dict of keyword inputs, labels): each slot's validation loss is its model's own on that dict."""
    x, y = digits
    xd = {"pixels": x[:512], "weight": torch.ones(512, 1)}
    vd = {"pixels": x[1400:], "weight": torch.ones(len(x) - 1400, 1)}
    torch.manual_seed(0)
    models = [KeywordNet() for _ in range(3)]
    eng = engine_for(models, lr=[1e-3, 3e-3, 1e-2])
    trainer = Trainer(eng, SharedStream(xd, y[:512], batch_size=64, seed=0), (vd, y[1400:]), eval_every=5,
                      progress=False)
    trainer.fit(10)
    got = trainer.evaluate()
    for s in range(3):
        alone = eng.mb.slot_module(s, KeywordNet())
        with torch.no_grad():
            want = nn.functional.cross_entropy(alone(**vd), y[1400:]).item()
        assert got[s]["val_loss"] == pytest.approx(want, rel=1e-5)
    with pytest.raises(TypeError, match="per-slot validation data .* must be three tensors"):
        Trainer(eng, SharedStream(xd, y[:512], batch_size=64, seed=0), (vd, y[1400:], None), progress=False)
