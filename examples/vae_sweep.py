"""An ASHA sweep of beta-VAEs on scikit-learn's digits, with the training step a VAE script already has.

Each trial is one variational autoencoder (64 -> hidden -> 2x8 -> hidden -> 64)
with its own learning rate, KL weight ``beta`` and width, trained with Adam;
ASHA stops the weak ones early. The step is the one written for one VAE:

- the encoder gives ``mu`` and ``log_var``, and the code is sampled with
  ``torch.distributions.Normal(mu, sigma).rsample()`` (the
  reparameterization trick), inside the step;
- the loss is the reconstruction error plus ``beta`` times
  ``torch.distributions.kl_divergence`` to the unit Gaussian;
- validation reports the negative ELBO (beta = 1, so trials with different
  betas compare), its reconstruction part and the KL, under their own names.

Each fused slot samples its codes from a random generator of its own, which
starts where the trial's seeded model construction left torch's: every trial
draws the very numbers it would draw alone, whatever runs beside it, and a
paused or rolled-back trial draws them again (``ray_modelbatch.slot_random``)::

    python examples/vae_sweep.py                       # 24 VAEs through 8 slots
    python examples/vae_sweep.py --trials 64 --slots 16 --max-t 20
"""

from __future__ import annotations

import argparse
import math
import os
import time

import ray
import torch
import torch.nn.functional as F
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from torch import nn
from torch.distributions import Normal, kl_divergence

import ray_modelbatch
from asha_sweep import load_digits_split  # examples/asha_sweep.py: digits in [0, 1], a fixed 80/20 split
from ray_modelbatch.tune import SweepProgress, batched_trainable

LATENT = 8
STEPS_PER_REPORT = 22  # one pass over the 1,438 training digits in batches of 64 (their labels go unused)


class VAE(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 2 * LATENT))
        self.decoder = nn.Sequential(nn.Linear(LATENT, hidden), nn.ReLU(), nn.Linear(hidden, 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


def elbo_terms(model: VAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstruction error and KL to the unit Gaussian, per example averaged over the batch."""
    mu, log_var = model(x).chunk(2, dim=-1)
    q = Normal(mu, torch.exp(0.5 * log_var))
    z = q.rsample()  # drawn from the slot's own generator when fused
    logits = model.decoder(z)
    recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1).mean()
    kl = kl_divergence(q, Normal(torch.zeros_like(mu), torch.ones_like(mu))).sum(-1).mean()
    return recon, kl


def train_step(model: VAE, batch: tuple, config: dict) -> dict:
    recon, kl = elbo_terms(model, batch[0])
    return {"loss": recon + config["beta"] * kl, "recon": recon, "kl": kl}


def eval_step(model: VAE, batch: tuple, config: dict) -> dict:
    recon, kl = elbo_terms(model, batch[0])
    return {"val_nelbo": recon + kl, "val_recon": recon, "val_kl": kl}


def make_trainable(slots: int) -> type:
    return batched_trainable(
        model=lambda c: VAE(c["hidden"]),
        optimizer=ray_modelbatch.optim.Adam,
        hparams=lambda c: {"lr": c["lr"]},
        data=load_digits_split,
        train_step=train_step,
        eval_step=eval_step,
        batch_size=64,
        steps_per_report=STEPS_PER_REPORT,
        slots_per_host=slots,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--trials", type=int, default=24, help='Tune trials (num_samples)')
    p.add_argument("--slots", type=int, default=8, help="slots of the one host")
    p.add_argument("--max-t", type=int, default=12, help=f"Tune iterations per trial ({STEPS_PER_REPORT} steps each)")
    p.add_argument("--storage", default="./runs", help="RunConfig storage_path")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray; None: os.cpu_count()")
    args = p.parse_args()

    started = time.monotonic()
    if not ray.is_initialized():
        ray.init(num_cpus=args.num_cpus or os.cpu_count() or 2, include_dashboard=False, logging_level="WARNING")
    T = make_trainable(args.slots)
    try:
        tuner = tune.Tuner(
            T,
            param_space={"lr": tune.loguniform(3e-4, 1e-2), "beta": tune.loguniform(0.1, 4.0),
                         "hidden": tune.choice([64, 128]), "seed": tune.randint(0, 2**31 - 1)},
            tune_config=tune.TuneConfig(
                metric="val_nelbo", mode="min", num_samples=args.trials,
                scheduler=ASHAScheduler(time_attr="training_iteration", max_t=args.max_t, grace_period=min(2, args.max_t)),
                max_concurrent_trials=T.max_concurrent(), reuse_actors=True),
            run_config=tune.RunConfig(
                name="vae_sweep", storage_path=os.path.abspath(args.storage),
                callbacks=[SweepProgress(T, metric="val_nelbo", mode="min")], verbose=0),
        )
        results = tuner.fit()
    finally:
        T.shutdown_hosts()
    errors = [r for r in results if r.error is not None]
    print(f"\n{len(results)} VAEs ({len(errors)} errored), at most {args.max_t} iterations of {STEPS_PER_REPORT} "
          f"steps, in {time.monotonic() - started:.0f} s")
    print(f"{'trial':>6} {'lr':>9} {'beta':>6} {'hidden':>6} {'iters':>5} {'val_nelbo':>9} {'recon':>7} {'kl':>6}")
    done = sorted((r for r in results if r.metrics), key=lambda r: r.metrics["val_nelbo"])
    for r in done[:8]:
        m, c = r.metrics, r.config
        print(f"{m['trial_id'].rsplit('_', 1)[-1]:>6} {c['lr']:>9.2e} {c['beta']:>6.2f} {c['hidden']:>6} "
              f"{m['training_iteration']:>5} {m['val_nelbo']:>9.2f} {m['val_recon']:>7.2f} {m['val_kl']:>6.2f}")
    best = results.get_best_result()
    print(f"best val_nelbo {best.metrics['val_nelbo']:.2f} (lr {best.config['lr']:.2e}, beta "
          f"{best.config['beta']:.2f}, hidden {best.config['hidden']})")
    if errors or not math.isfinite(best.metrics["val_nelbo"]):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
