"""Population Based Training on scikit-learn's digits: a population of Tune trials in fused slots.

Every ``--interval`` iterations PBT ranks the population by validation loss;
a trial in the bottom quantile is paused, takes over the weights, optimizer
state and data-stream position of a trial in the top quantile (its
checkpoint, exported from that trial's slot) and continues with a perturbed
learning rate and weight decay. The recipient keeps its own slot on the host:
the checkpoint is loaded into it, and its per-trial warmup-cosine schedule
goes on from the donor's step count::

    python examples/pbt_sweep.py                       # 8 trials on 8 slots, 30 iterations
    python examples/pbt_sweep.py --trials 16 --slots 16 --max-t 40

Prints every exploit (who copied whom, at which iteration, old and new
hyperparameters, from PBT's own ``pbt_global.txt`` log) and the best trial.
Data, model and search space are those of ``asha_sweep.py``; hidden size
is fixed here (a checkpoint only restores into the same architecture).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import ray
from ray import tune
from ray.tune.schedulers import PopulationBasedTraining
from ray.tune.search.basic_variant import BasicVariantGenerator

from ray_modelbatch.tune import SweepProgress

from asha_sweep import (STEPS_PER_REPORT, init_ray, lost_slot_state, make_trainable, sample_configs, search_space,
                        short_id)


def exploit_events(experiment_path: str) -> list[dict]:
    """PBT's exploit log: one entry per exploit, in order (``pbt_global.txt`` of the experiment)."""
    path = os.path.join(experiment_path, "pbt_global.txt")
    if not os.path.exists(path):
        return []
    events = []
    with open(path) as f:
        for line in f:
            target_tag, donor_tag, target_iter, donor_iter, donor_cfg, new_cfg = json.loads(line)
            events.append({
                # experiment tags start with the trial's index: "3_hidden=64,lr=...". Its ID ends in 00003.
                "recipient": f"{int(target_tag.split('_', 1)[0]):05d}",
                "donor": f"{int(donor_tag.split('_', 1)[0]):05d}",
                "iteration": int(target_iter),
                "donor_iteration": int(donor_iter),
                "donor_config": donor_cfg,
                "new_config": new_cfg,
            })
    return events


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--trials", type=int, default=8, help="population size")
    p.add_argument("--slots", type=int, default=8, help="slots of the one host")
    p.add_argument("--max-t", type=int, default=30, help=f"Tune iterations per trial ({STEPS_PER_REPORT} steps each)")
    p.add_argument("--interval", type=int, default=5, help="PBT perturbation interval (iterations)")
    p.add_argument("--hidden", type=int, default=64, help="hidden size of every trial's MLP")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial config draw")
    p.add_argument("--storage", default="./runs", help="RunConfig storage_path")
    p.add_argument("--name", default="pbt_sweep", help="the experiment's name (its folder under --storage)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray; None: os.cpu_count()")
    args = p.parse_args()
    if args.trials > args.slots:
        print(f"note: {args.trials} trials on {args.slots} slots: PBT's paused trials keep their place in the "
              "concurrency limit, so the population runs in waves of at most --slots trials")

    t_start = time.monotonic()
    started_ray = init_ray(args.num_cpus)
    T = make_trainable(args.slots)
    try:
        space = {**search_space(args.max_t), "hidden": args.hidden}
        configs = sample_configs(space, args.trials, args.seed)
        pbt = PopulationBasedTraining(
            time_attr="training_iteration",
            perturbation_interval=args.interval,
            hyperparam_mutations={"lr": tune.loguniform(1e-4, 3e-2), "wd": tune.loguniform(1e-5, 1e-1)},
            quantile_fraction=0.25,
            resample_probability=0.25,
        )
        tuner = tune.Tuner(
            T,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric="val_loss",
                mode="min",
                num_samples=args.trials,
                # An explicit generator ignores TuneConfig(max_concurrent_trials=...) in Ray 2.60.
                search_alg=BasicVariantGenerator(points_to_evaluate=configs, max_concurrent=T.max_concurrent()),
                scheduler=pbt,
                # A pause (an exploit, or PBT letting paused trials catch up) keeps the trial's actor:
                # Tune hands it to the resumed trial (reset_config, then restore from the checkpoint)
                # instead of starting a new one. Each attachment has its own slot, so a paused trial's
                # cached trial actor never resets the slot of the trial that runs meanwhile.
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=args.name,
                storage_path=os.path.abspath(args.storage),
                stop={"training_iteration": args.max_t},
                # PBT points a recipient at the donor's checkpoint: never delete checkpoints under it.
                checkpoint_config=tune.CheckpointConfig(num_to_keep=None, checkpoint_frequency=args.interval),
                callbacks=[SweepProgress(T, metric="val_loss")],  # one line of progress every 5 s
                verbose=0,
            ),
        )
        t_fit = time.monotonic()
        results = tuner.fit()
        fit_s = time.monotonic() - t_fit
        hosts = T.host_stats()
    finally:
        T.shutdown_hosts()
        if started_ray:
            ray.shutdown()

    errors = [r for r in results if r.error is not None]
    lost = lost_slot_state(results)
    events = exploit_events(results.experiment_path)
    print(f"\n{len(results)} trials on {args.slots} slots ({len(errors)} errored), {args.max_t} iterations each, "
          f"PBT every {args.interval}: {len(events)} exploits")
    print("iter = the recipient's training_iteration as PBT logs it (its last stored result when it exploited)")
    print(f"{'iter':>4}  {'recipient':>9} <- {'donor':<5}  {'lr (donor -> new)':>23}  {'wd (donor -> new)':>23}")
    for e in events:
        d, n = e["donor_config"], e["new_config"]
        print(f"{e['iteration']:>4}  {e['recipient']:>9} <- {e['donor']:<5}  "
              f"{d['lr']:>10.2e} -> {n['lr']:<9.2e}  {d['wd']:>10.2e} -> {n['wd']:<9.2e}")

    print(f"\nFinal population (by last validation loss):")
    print(f"{'trial':>6} {'lr':>9} {'wd':>9} {'val_loss':>8} {'val_acc':>7} {'slot':>4} {'copied from (iter)':<}")
    got_from = {}
    for e in events:
        got_from.setdefault(e["recipient"], []).append(f"{e['donor']}({e['iteration']})")
    for r in sorted((r for r in results if r.metrics), key=lambda r: r.metrics["val_loss"]):
        m, c = r.metrics, r.config
        tid = short_id(m["trial_id"])
        print(f"{tid:>6} {c['lr']:>9.2e} {c['wd']:>9.2e} {m['val_loss']:>8.4f} {m['val_acc']:>7.4f} "
              f"{m['slot']:>4} {' '.join(got_from.get(tid, [])) or '-'}")
    best = results.get_best_result(metric="val_loss", mode="min", scope="last")
    print(f"\nbest trial {short_id(best.metrics['trial_id'])}: val_loss {best.metrics['val_loss']:.4f}, "
          f"val_acc {best.metrics['val_acc']:.4f} after {best.metrics['slot_steps']} steps; final config "
          f"lr={best.config['lr']:.3g}, wd={best.config['wd']:.3g}, warmup_steps={best.config['warmup_steps']}")
    for h in hosts:
        print(f"host {h['host']}: busy {h['busy_fraction']:.1%} of {h['wall_s']:.1f}s "
              f"({h['fused_steps']} fused steps = {h['slot_steps']} slot-steps, "
              f"{h['slot_steps'] / max(h['fused_steps'], 1):.1f} slots per fused step, "
              f"{h['stepped_fraction']:.0%} of the slots held)")
    print(f"time: fit {fit_s:.1f}s, total {time.monotonic() - t_start:.1f}s; results in {results.experiment_path}")
    print(f"slot integrity: every result had slot_steps == iteration x {STEPS_PER_REPORT}" if not lost else
          f"WARNING: {len(lost)} trials' slots lost their state mid-trial: {', '.join(lost)}")
    if errors or lost:
        raise SystemExit(f"{len(errors)} trials errored, {len(lost)} lost slot state"
                         + (f"; e.g. {errors[0].error!r}" if errors else ""))


if __name__ == "__main__":
    main()
