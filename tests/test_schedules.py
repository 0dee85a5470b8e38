"""New per-slot schedules and the per-slot plateau rule against torch.optim.lr_scheduler, step by step.

Each schedule test gives every slot of one optimizer other parameters and
checks the learning rate each slot would use at each of its steps against the
torch scheduler of a one-model optimizer, over all phases of the schedule.
"""

import math

import pytest
from ray import tune
import torch
from torch import nn

import ray_modelbatch as rmb
from ray_modelbatch.errors import HyperparameterError
from ray_modelbatch.optim import schedules

from conftest import clones, make_models

L = torch.optim.lr_scheduler
LR = [0.05, 0.01, 0.002, 0.03]


def torch_lrs(make, lr, steps):
    """The lr torch uses at each of ``steps`` optimizer steps (scheduler.step() after each)."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    sched = make(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def our_lrs(schedule, steps, lr=LR):
    """The lr of each slot at each of its steps: ``[steps][S]`` (slots stepped for real, zero gradients)."""
    mb = rmb.ModelBatch([nn.Linear(2, 1) for _ in lr])
    opt = rmb.optim.SGD(mb, lr=lr, schedule=schedule)
    out = []
    for _ in range(steps):
        out.append(opt.current_lr().tolist())
        mb.zero_grad()
        opt.step()
    return out


def check(schedule, makers, steps, lr=LR, upto=None):
    got = our_lrs(schedule, steps, lr)
    for i, make in enumerate(makers):
        n = steps if upto is None else upto[i]
        want = torch_lrs(make, lr[i], n)
        assert [row[i] for row in got[:n]] == pytest.approx(want, rel=1e-10, abs=1e-15), f"slot {i}"
    return got


def test_exponential_matches_exponential_lr():
    gammas = [0.9, 0.95, 0.5, 1.0]
    check(schedules.exponential(gammas), [lambda o, g=g: L.ExponentialLR(o, gamma=g) for g in gammas], 30)


def test_multi_step_with_per_slot_milestone_lists_matches_multistep_lr():
    """Lists of different lengths (none, one, two, the full 8 with a repeat and a milestone at step 0)."""
    milestones = [[3, 7], [5], [], [0, 2, 2, 9, 12, 15, 20, 25]]
    gammas = [0.5, 0.1, 0.3, 0.8]
    sched = schedules.multi_step(milestones, gamma=gammas)
    check(sched, [lambda o, m=m, g=g: L.MultiStepLR(o, milestones=m, gamma=g) for m, g in zip(milestones, gammas)], 30)
    shared = schedules.multi_step([4, 10], gamma=0.5)
    check(shared, [lambda o: L.MultiStepLR(o, milestones=[4, 10], gamma=0.5)] * 4, 15)
    mb = rmb.ModelBatch([nn.Linear(2, 1) for _ in range(4)])
    assert rmb.optim.SGD(mb, schedule=sched).get_hparams(3)["schedule"] == schedules.Schedule(
        "multi_step", {"milestones": milestones[3], "gamma": 0.8})
    with pytest.raises(HyperparameterError, match="at most 8 milestones"):
        rmb.optim.SGD(mb, schedule=schedules.multi_step([[1] * 9, [], [], []]))


def test_one_cycle_matches_one_cycle_lr_in_every_phase():
    """Two-phase and three-phase, cos and linear, per-slot lengths and divisors; after its last step a
    slot stays at the final rate (torch raises there)."""
    cfg = [dict(total_steps=20, pct_start=0.3, anneal_strategy="cos", three_phase=False, div_factor=25.0,
                final_div_factor=1e4),
           dict(total_steps=25, pct_start=0.25, anneal_strategy="linear", three_phase=False, div_factor=25.0,
                final_div_factor=1e4),
           dict(total_steps=20, pct_start=0.4, anneal_strategy="cos", three_phase=True, div_factor=5.0,
                final_div_factor=1e3),
           dict(total_steps=30, pct_start=0.2, anneal_strategy="linear", three_phase=True, div_factor=10.0,
                final_div_factor=100.0)]
    sched = schedules.one_cycle(**{k: [c[k] for c in cfg] for k in cfg[0]})
    makers = [lambda o, c=c: L.OneCycleLR(o, max_lr=o.param_groups[0]["lr"], cycle_momentum=False, **c) for c in cfg]
    totals = [c["total_steps"] for c in cfg]
    got = check(sched, makers, 34, upto=totals)
    for i, c in enumerate(cfg):
        final = LR[i] / c["div_factor"] / c["final_div_factor"]
        assert [row[i] for row in got[totals[i] - 1:]] == pytest.approx([final] * (35 - totals[i]), rel=1e-10)
        assert max(row[i] for row in got) == pytest.approx(LR[i], rel=0.05)  # the peak is reached


def test_linear_matches_linear_lr():
    cfg = [(0.25, 1.0, 4), (1 / 3, 1.0, 5), (1.0, 0.1, 10), (0.5, 0.5, 0)]
    sched = schedules.linear(*[list(col) for col in zip(*cfg)])
    check(sched, [lambda o, c=c: L.LinearLR(o, start_factor=c[0], end_factor=c[1], total_iters=c[2]) for c in cfg], 16)


def hf_linear_with_warmup(warmup, total):
    """transformers.get_linear_schedule_with_warmup's lambda, written out."""
    def f(step):
        if step < warmup:
            return float(step) / float(max(1, warmup))
        return max(0.0, float(total - step) / float(max(1, total - warmup)))
    return f


def test_warmup_linear_matches_hf_linear_schedule_with_warmup():
    cfg = [(5, 20), (0, 10), (3, 3), (8, 15)]
    sched = schedules.warmup_linear([c[0] for c in cfg], [c[1] for c in cfg])
    check(sched, [lambda o, c=c: L.LambdaLR(o, hf_linear_with_warmup(*c)) for c in cfg], 24)


def hf_cosine_with_warmup(warmup, total, min_ratio=0.0):
    """transformers' _get_cosine_schedule_with_warmup_lr_lambda (num_cycles=0.5, min_lr_rate), written out."""
    def f(step):
        if step < warmup:
            return float(step) / float(max(1, warmup))
        progress = float(step - warmup) / float(max(1, total - warmup))
        factor = 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress))
        return max(0, factor * (1 - min_ratio) + min_ratio)
    return f


COSINE = [(5, 20, 0.0), (0, 12, 0.1), (1, 6, 0.0), (8, 15, 0.25)]  # (warmup, total, min_lr_ratio) per slot


def test_warmup_cosine_matches_hf_cosine_schedule_with_warmup():
    """HF's factor t / max(1, warmup) in warmup (step 0 has rate 0), cosine to min_lr_ratio at total_steps;
    after total_steps ours holds the minimum (HF's cosine rises again, so it is compared up to total)."""
    sched = schedules.warmup_cosine(*[[c[k] for c in COSINE] for k in (1, 0, 2)])
    got = check(sched, [lambda o, c=c: L.LambdaLR(o, hf_cosine_with_warmup(*c)) for c in COSINE], 24,
                upto=[c[1] + 1 for c in COSINE])
    assert [row[0] for row in got[:2]] == pytest.approx([0.0, LR[0] / 5], abs=1e-15)  # step 0: rate 0
    for i, (_, total, ratio) in enumerate(COSINE):
        assert [row[i] for row in got[total:]] == pytest.approx([LR[i] * ratio] * (24 - total), abs=1e-15)


def test_warmup_schedules_match_transformers():
    """Against transformers' own functions, when installed (the formula tests above always run)."""
    optimization = pytest.importorskip("transformers.optimization")
    cosine = schedules.warmup_cosine(*[[c[k] for c in COSINE] for k in (1, 0, 2)])
    check(cosine, [lambda o, c=c: optimization.get_cosine_with_min_lr_schedule_with_warmup(
        o, c[0], c[1], min_lr_rate=c[2]) for c in COSINE], 24, upto=[c[1] + 1 for c in COSINE])
    plain = schedules.warmup_cosine(20, 5)
    check(plain, [lambda o: optimization.get_cosine_schedule_with_warmup(o, 5, 20)] * 4, 21)
    lin = [(5, 20), (0, 10), (3, 3), (8, 15)]
    check(schedules.warmup_linear([c[0] for c in lin], [c[1] for c in lin]),
          [lambda o, c=c: optimization.get_linear_schedule_with_warmup(o, *c) for c in lin], 24)


@pytest.mark.parametrize("compiled", [False, True])
def test_one_kind_per_slot_trains_like_torch_schedulers(compiled):
    """A different new schedule in each slot of one Adam, through real training (compiled and eager)."""
    kinds = [schedules.exponential(0.9), schedules.multi_step([3, 6], gamma=0.5),
             schedules.one_cycle(12, anneal_strategy="linear"), schedules.warmup_linear(4, 12)]
    makers = [lambda o: L.ExponentialLR(o, 0.9), lambda o: L.MultiStepLR(o, [3, 6], 0.5),
              lambda o: L.OneCycleLR(o, max_lr=LR[2], total_steps=12, anneal_strategy="linear", cycle_momentum=False),
              lambda o: L.LambdaLR(o, hf_linear_with_warmup(4, 12))]
    models = make_models(4)
    refs = clones(models)
    mb = rmb.ModelBatch(models)
    opt = rmb.optim.Adam(mb, lr=LR, schedule=kinds, compile=compiled)
    ropts = [torch.optim.Adam(r.parameters(), lr=LR[i]) for i, r in enumerate(refs)]
    scheds = [m(o) for m, o in zip(makers, ropts)]
    g = torch.Generator().manual_seed(2)
    for _ in range(11):  # OneCycleLR raises past total_steps
        x, y = torch.randn(16, 5, generator=g), torch.randn(16, 3, generator=g)
        mb.zero_grad()
        losses, _ = mb.forward_loss(x, y, nn.functional.mse_loss)
        losses.sum().backward()
        opt.step()
        for r, o, s in zip(refs, ropts, scheds):
            o.zero_grad()
            nn.functional.mse_loss(r(x), y).backward()
            o.step()
            s.step()
    for i, r in enumerate(refs):
        got = mb.slot_state(i)
        for k, v in r.state_dict().items():
            torch.testing.assert_close(got[k], v, atol=1e-5, rtol=1e-5, msg=f"slot {i} {k}")
    assert (opt._compiled is not None) == compiled, "torch.compile fell back to eager"
    assert opt.get_hparams(2)["schedule"].params["anneal_strategy"] == "linear"


def test_schedule_parameters_are_checked_per_slot():
    mb = rmb.ModelBatch([nn.Linear(2, 1) for _ in range(3)])
    with pytest.raises(HyperparameterError, match=r"invalid pct_start for slot\(s\) \[1\]"):
        rmb.optim.SGD(mb, schedule=schedules.one_cycle(10, pct_start=[0.3, 1.5, 0.3]))
    with pytest.raises(HyperparameterError, match=r"start_factor for slot\(s\) \[0\]"):
        rmb.optim.SGD(mb, schedule=[schedules.linear(0.0), schedules.constant(), schedules.constant()])
    with pytest.raises(HyperparameterError, match="anneal_strategy must be one of"):
        rmb.optim.SGD(mb, schedule=schedules.one_cycle(10, anneal_strategy="exp"))
    with pytest.raises(ValueError, match="unknown schedule parameters"):
        schedules.Schedule("exponential", {"step_size": 3})
    # a warmup longer than its schedule would drop the rate to its end value mid-warmup
    with pytest.raises(HyperparameterError, match=r"warmup_steps \(50\) is more than total_steps \(10\) in the "
                                                   r"schedule of slot\(s\) \[2\]"):
        rmb.optim.SGD(mb, schedule=[schedules.warmup_cosine(100, 50), schedules.warmup_linear(5, 5),
                                    schedules.Schedule("warmup_cosine", {"total_steps": 10, "warmup_steps": 50})])
    # ... and where the builder is called, naming the argument order (HF's cosine and linear builders differ)
    with pytest.raises(HyperparameterError, match=r"warmup_cosine\(total_steps, warmup_steps, ...\) got "
                                                   r"warmup_steps=100 > total_steps=10.*Were the two swapped"):
        schedules.warmup_cosine(10, 100)  # HF's order: get_cosine_schedule_with_warmup(opt, 10, 100)
    with pytest.raises(HyperparameterError, match=r"warmup_linear\(warmup_steps, total_steps\) got "
                                                   r"warmup_steps=\[1, 50\] > total_steps=40"):
        schedules.warmup_linear([1, 50], 40)
    schedules.warmup_cosine(tune.randint(0, 5), 10)  # a search domain: checked once sampled, by the optimizer
    with pytest.raises(HyperparameterError, match=r"warmup_steps \(8\) is more than total_steps \(4, 6\)"):
        rmb.optim.SGD(mb, schedule=schedules.Schedule("warmup_linear", {"warmup_steps": 8, "total_steps": [4, 6, 9]}))


# ---------------------------------------------------------------- plateau
PLATEAUS = [
    dict(mode="min", factor=0.5, patience=2, threshold=0.1, threshold_mode="rel", cooldown=0, min_lr=0.0, eps=1e-8),
    dict(mode="max", factor=0.1, patience=1, threshold=0.5, threshold_mode="abs", cooldown=2, min_lr=1e-4, eps=1e-8),
    dict(mode="min", factor=0.3, patience=0, threshold=0.01, threshold_mode="abs", cooldown=1, min_lr=0.0, eps=1e-3),
]
NAN = float("nan")
# Ties (a change within the threshold), improvements, NaN and +inf (bad epochs in torch too), plateaus long
# enough for several reductions, cooldowns and min_lr.
METRICS = [
    [1.0, 0.95, 0.8, 0.8, NAN, 0.79, 0.5, 0.5, 0.5, 0.5, 0.49, 0.3, NAN, NAN, NAN, 0.2, 0.2, math.inf, 0.1, 0.1,
     0.1, 0.1, 0.1, 0.1],
    [1.0, 1.2, 2.0, 2.0, 2.4, NAN, 3.0, 3.0, 3.0, 3.0, 3.4, 3.6, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, -math.inf, 4.0,
     4.0, 6.0, 6.0],
    [5.0, 4.0, 4.0, 3.995, 3.0, 3.0, 3.0, NAN, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0,
     1.0, 1.0],
]
PLATEAU_LR = [0.01, 0.01, 0.002, 0.03]


def test_plateau_matches_reduce_lr_on_plateau_step_by_step():
    """Three slots with different rules, one without: after every report each slot's lr, best, bad-epoch
    count and cooldown counter are torch's. Slot 2 reports only every other time."""
    mb = rmb.ModelBatch([nn.Linear(2, 1) for _ in range(4)])
    opt = rmb.optim.SGD(mb, lr=PLATEAU_LR, plateau=[schedules.plateau(**p) for p in PLATEAUS] + [None])
    refs = [torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=PLATEAU_LR[i]) for i in range(3)]
    scheds = [L.ReduceLROnPlateau(o, **p) for o, p in zip(refs, PLATEAUS)]
    reductions = [0, 0, 0]
    for t in range(len(METRICS[0])):
        slots = [0, 1, 2, 3] if t % 2 == 0 else [0, 1, 3]
        values = [METRICS[s][t] if s < 3 else 123.0 for s in slots]
        before = opt.current_lr().tolist()
        opt.plateau_step(slots, torch.tensor(values, dtype=torch.float64) if t % 3 else values)
        lr = opt.current_lr().tolist()
        for s in slots:
            if s == 3:
                assert lr[3] == PLATEAU_LR[3]
                continue
            scheds[s].step(METRICS[s][t])
            reductions[s] += lr[s] < before[s]
            assert lr[s] == pytest.approx(refs[s].param_groups[0]["lr"], rel=1e-12), (t, s)
            sign = 1.0 if PLATEAUS[s]["mode"] == "min" else -1.0
            assert float(opt.scalars["plateau_num_bad"][s]) == scheds[s].num_bad_epochs, (t, s)
            assert float(opt.scalars["plateau_cooldown_left"][s]) == scheds[s].cooldown_counter, (t, s)
            if not math.isinf(scheds[s].best):  # -inf is not taken as a best here (see below)
                assert float(opt.scalars["plateau_best"][s]) * sign == scheds[s].best, (t, s)
    assert reductions == [4, 2, 1]
    assert opt.current_lr()[1].item() == pytest.approx(1e-4)  # held at min_lr
    assert opt.current_lr()[2].item() == pytest.approx(6e-4)  # later reductions were below eps: skipped


def test_plateau_refuses_an_infinite_best_and_multiplies_with_a_schedule():
    """torch would take a -inf loss as its best and then never see an improvement again; here any
    non-finite value is a bad epoch. The plateau multiplier scales whatever the schedule gives."""
    mb = rmb.ModelBatch([nn.Linear(2, 1) for _ in range(2)])
    opt = rmb.optim.SGD(mb, lr=0.1, schedule=schedules.step_decay(1, 0.5),
                        plateau=schedules.plateau(patience=1, factor=0.5))
    opt.plateau_step([0, 1], [1.0, 1.0])
    opt.plateau_step([0, 1], [-math.inf, math.inf])
    assert opt.scalars["plateau_best"].tolist() == [1.0, 1.0]
    assert opt.scalars["plateau_num_bad"].tolist() == [1.0, 1.0]
    opt.plateau_step([0], [NAN])  # a third bad epoch: patience 1 exceeded, slot 0 halves
    mb.zero_grad()
    opt.step()
    opt.step()  # the schedule has halved twice
    assert opt.current_lr().tolist() == pytest.approx([0.1 * 0.25 * 0.5, 0.1 * 0.25])


def test_plateau_reduced_lr_is_the_one_each_step_uses():
    """Training with a report every 2 steps: the parameters follow torch's SGD + ReduceLROnPlateau."""
    models = make_models(3)
    refs = clones(models)
    mb = rmb.ModelBatch(models)
    rules = [dict(patience=0, factor=0.5), dict(patience=1, factor=0.2, mode="max"), None]
    opt = rmb.optim.SGD(mb, lr=0.05, momentum=0.9,
                        plateau=[None if r is None else schedules.plateau(**r) for r in rules])
    ropts = [torch.optim.SGD(r.parameters(), lr=0.05, momentum=0.9) for r in refs]
    scheds = [None if r is None else L.ReduceLROnPlateau(o, **r) for o, r in zip(ropts, rules)]
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(16, 5, generator=g), torch.randn(16, 3, generator=g)
    for step in range(12):
        mb.zero_grad()
        losses, _ = mb.forward_loss(x, y, nn.functional.mse_loss)
        losses.sum().backward()
        opt.step()
        for r, o in zip(refs, ropts):
            o.zero_grad()
            nn.functional.mse_loss(r(x), y).backward()
            o.step()
        if step % 2:
            metric = [0.5, 0.5, 0.5]  # flat: every rule reduces after its patience
            opt.plateau_step([0, 1, 2], metric)
            for s, m in zip(scheds, metric):
                if s is not None:
                    s.step(m)
    for i, r in enumerate(refs):
        got = mb.slot_state(i)
        for k, v in r.state_dict().items():
            torch.testing.assert_close(got[k], v, atol=1e-5, rtol=1e-5, msg=f"slot {i} {k}")
    assert opt.current_lr().tolist() == pytest.approx([o.param_groups[0]["lr"] for o in ropts], rel=1e-12)
    assert opt.current_lr()[0].item() < 0.05 / 8


def test_plateau_state_is_per_slot_state():
    """In slot_tensors (snapshots), exported and imported with the slot, copied (PBT), reset, resized;
    get_hparams/set_hparams round-trip the rule and a new rule keeps the state."""
    mb = rmb.ModelBatch(make_models(3))
    rule = schedules.plateau(mode="max", patience=0, factor=0.5, cooldown=3)
    opt = rmb.optim.Adam(mb, lr=0.01, plateau=rule)
    assert {"optim.plateau_best", "optim.plateau_num_bad", "optim.plateau_cooldown_left",
            "optim.plateau_lr_mult"} <= set(opt.slot_tensors())
    opt.plateau_step([0, 1, 2], [1.0, 2.0, 3.0])
    opt.plateau_step([1], [1.0])  # slot 1 gets worse: halved, cooldown 3
    assert opt.current_lr().tolist() == pytest.approx([0.01, 0.005, 0.01])
    assert opt.get_hparams(1)["plateau"] == schedules.Plateau("max", 0.5, 0, 1e-4, "rel", 3, 0.0, 1e-8)

    exported = opt.slot_state(1)
    other = rmb.optim.Adam(rmb.ModelBatch(make_models(1)))
    other.load_slot_state(0, exported)
    assert other.current_lr().tolist() == pytest.approx([0.005])
    assert other.scalars["plateau_cooldown_left"].tolist() == [3.0]

    mb.copy_slot(1, 0)
    assert opt.current_lr()[0].item() == pytest.approx(0.005)
    opt.set_hparams(0, plateau=schedules.plateau(mode="max", patience=5))  # a new rule continues the state
    assert opt.current_lr()[0].item() == pytest.approx(0.005)
    opt.set_hparams(0, plateau=None)  # no rule: the multiplier no longer applies
    assert opt.current_lr()[0].item() == pytest.approx(0.01)
    opt.plateau_step([0], [0.0])  # ignored: slot 0 has no rule
    assert float(opt.scalars["plateau_cooldown_left"][0]) == 3.0

    mb.reset_slot(1, make_models(1)[0])
    assert opt.current_lr()[1].item() == pytest.approx(0.01)
    assert float(opt.scalars["plateau_best"][1]) == math.inf
    mb.resize(4, keep=[2, 1, 0])
    assert opt.scalars["plateau_lr_mult"].tolist() == [1.0, 1.0, 0.5, 1.0]

    with pytest.raises(HyperparameterError, match=r"invalid plateau_factor for slot\(s\) \[1\]"):
        opt.set_hparams([0, 1], plateau=schedules.plateau(factor=[0.5, 1.0]))
    with pytest.raises(ValueError, match="one value per slot"):
        opt.plateau_step([0, 1], [1.0])
    with pytest.raises(ValueError, match="more than once"):
        opt.plateau_step([1, 1], [1.0, 2.0])


def test_a_schedule_that_is_not_one_names_what_it_got_and_the_fix():
    from ray_modelbatch.errors import HyperparameterError
    from ray_modelbatch.optim import schedules as S

    with pytest.raises(HyperparameterError, match=r"must be one Schedule, built with .*got torch's StepLR, which "
                                                  r"cannot drive a fused optimizer: give schedule=schedules\.step_decay"):
        S.encode(torch.optim.lr_scheduler.StepLR, 1)
    with pytest.raises(HyperparameterError, match=r"one Schedule or a sequence of 3 \(one per slot\).*got a "
                                                  r"sequence of 1\.$"):
        S.encode([S.constant()], 3)
