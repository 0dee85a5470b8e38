"""Population Based Training of DCGANs on scikit-learn's digits: two networks, two optimizers, one fused stack.

A port of Ray Tune's own PBT DCGAN example (``pbt_dcgan_mnist``) to fused
slots, on the 8x8 digits that ship with scikit-learn instead of MNIST. What
stays as in the Tune script:

- the generator and discriminator, each with its own Adam (``betas=(0.5,
  0.999)``) and its own learning rate (``netG_lr``, ``netD_lr``) in the config;
- the training step as written for one GAN: the discriminator's update on
  real and generated images, then the generator's update through the updated
  discriminator, with noise drawn inside the step;
- the metric, an inception score (``is_score``) from a digits classifier
  trained once per process, reported under its own name;
- PBT mutating both learning rates and copying weights and both optimizers'
  state from donors.

What changes: the model is an ``nn.ModuleDict`` of the parts, and the step is
given as one function per part (``train_step={"D": ..., "G": ...}``, run in
that order); ``data()`` returns the images. ::

    python examples/pbt_gan.py                  # 8 GANs, 12 iterations, PBT every 3
    python examples/pbt_gan.py --trials 16 --slots 16 --max-t 20

Every trial's GAN is one slot of the stack, so the 8 alternating updates run
as one computation per part.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import time

import ray
import torch
import torch.nn.functional as F
from ray import tune
from ray.tune.schedulers import PopulationBasedTraining
from torch import nn

import ray_modelbatch
from ray_modelbatch.tune import SweepProgress, batched_trainable

Z = 16  # noise size
STEPS_PER_REPORT = 20


# ------------------------------------------------------------------ the data
def load_images() -> tuple[torch.Tensor, ...]:
    """Digits as 1x8x8 images in [-1, 1] with their labels; a fixed 80/20 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    val, train = perm[:360], perm[360:]
    return x[train], y[train], x[val], y[val]


# ---------------------------------------------------------------- the model
class Generator(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        self.width = width
        self.project = nn.Linear(Z, width * 2 * 2)
        self.up = nn.Sequential(
            nn.BatchNorm2d(width), nn.ReLU(),
            nn.ConvTranspose2d(width, width // 2, 4, 2, 1), nn.BatchNorm2d(width // 2), nn.ReLU(),  # 4x4
            nn.ConvTranspose2d(width // 2, 1, 4, 2, 1), nn.Tanh(),  # 8x8
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.up(self.project(z).view(-1, self.width, 2, 2))


def discriminator(width: int = 32) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, width // 2, 4, 2, 1), nn.LeakyReLU(0.2),  # 4x4
        nn.Conv2d(width // 2, width, 4, 2, 1), nn.LeakyReLU(0.2),  # 2x2
        nn.Flatten(), nn.Linear(width * 2 * 2, 1),
    )


def classifier() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


_CLASSIFIER: dict[str, torch.Tensor] = {}


def trained_classifier() -> dict[str, torch.Tensor]:
    """A digits classifier for the inception score, trained once per process (about a second)."""
    if _CLASSIFIER:
        return _CLASSIFIER
    with torch.random.fork_rng(), torch.device("cpu"):
        torch.manual_seed(0)
        x, y, _, _ = load_images()
        net = classifier()
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        for i in range(300):
            idx = torch.randint(0, x.shape[0], (128,))
            opt.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
        _CLASSIFIER.update({k: v.detach().clone() for k, v in net.state_dict().items()})
        return _CLASSIFIER


def make_gan(config: dict) -> nn.ModuleDict:
    """The trial's GAN; the frozen classifier rides along in each slot to score its samples."""
    clf = classifier()
    clf.load_state_dict(trained_classifier())
    clf.requires_grad_(False)
    return nn.ModuleDict({"D": discriminator(), "G": Generator(), "C": clf})


# ------------------------------------------------------ the step, as for one GAN
def d_step(model: nn.ModuleDict, batch: tuple, config: dict) -> dict:
    real, _ = batch
    fake = model["G"](torch.randn(real.shape[0], Z)).detach()
    real_logit, fake_logit = model["D"](real), model["D"](fake)
    loss = (F.binary_cross_entropy_with_logits(real_logit, torch.ones_like(real_logit))
            + F.binary_cross_entropy_with_logits(fake_logit, torch.zeros_like(fake_logit)))
    return {"loss": loss, "d_real": torch.sigmoid(real_logit).mean(), "d_fake": torch.sigmoid(fake_logit).mean()}


def g_step(model: nn.ModuleDict, batch: tuple, config: dict) -> torch.Tensor:
    real, _ = batch
    logit = model["D"](model["G"](torch.randn(real.shape[0], Z)))
    return F.binary_cross_entropy_with_logits(logit, torch.ones_like(logit))


def inception_score(model: nn.ModuleDict, batch: tuple, config: dict) -> dict:
    """exp(E[KL(p(y|x) || p(y))]) of generated digits under the classifier: 1 (useless) to 10 (ideal)."""
    real, _ = batch
    p = torch.softmax(model["C"](model["G"](torch.randn(real.shape[0], Z))), dim=-1)
    marginal = p.mean(0, keepdim=True)
    kl = (p * (torch.log(p + 1e-12) - torch.log(marginal + 1e-12))).sum(-1).mean()
    return {"is_score": torch.exp(kl)}


def make_trainable(slots: int) -> type:
    adam = functools.partial(ray_modelbatch.optim.Adam, betas=(0.5, 0.999))
    return batched_trainable(
        model=make_gan,
        optimizer={"D": adam, "G": adam},
        hparams=lambda c: {"D": {"lr": c["netD_lr"]}, "G": {"lr": c["netG_lr"]}},
        data=load_images,
        train_step={"D": d_step, "G": g_step},
        eval_step=inception_score,
        batch_size=64,
        steps_per_report=STEPS_PER_REPORT,
        slots_per_host=slots,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--trials", type=int, default=8, help="population size")
    p.add_argument("--slots", type=int, default=8, help="slots of the one host")
    p.add_argument("--max-t", type=int, default=12, help=f"Tune iterations per trial ({STEPS_PER_REPORT} steps each)")
    p.add_argument("--interval", type=int, default=3, help="PBT perturbation interval (iterations)")
    p.add_argument("--storage", default="./runs", help="RunConfig storage_path")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray; None: os.cpu_count()")
    args = p.parse_args()

    started = time.monotonic()
    if not ray.is_initialized():
        ray.init(num_cpus=args.num_cpus or os.cpu_count() or 2, include_dashboard=False, logging_level="WARNING")
    T = make_trainable(args.slots)
    try:
        pbt = PopulationBasedTraining(
            time_attr="training_iteration",
            perturbation_interval=args.interval,
            hyperparam_mutations={"netG_lr": tune.loguniform(1e-4, 1e-2), "netD_lr": tune.loguniform(1e-4, 1e-2)},
        )
        tuner = tune.Tuner(
            T,
            param_space={"netG_lr": tune.loguniform(1e-4, 1e-2), "netD_lr": tune.loguniform(1e-4, 1e-2)},
            tune_config=tune.TuneConfig(metric="is_score", mode="max", num_samples=args.trials, scheduler=pbt,
                                        max_concurrent_trials=T.max_concurrent(), reuse_actors=True),
            run_config=tune.RunConfig(
                name="pbt_gan", storage_path=os.path.abspath(args.storage),
                stop={"training_iteration": args.max_t},
                checkpoint_config=tune.CheckpointConfig(checkpoint_frequency=args.interval, num_to_keep=4),
                callbacks=[SweepProgress(T, metric="is_score", mode="max")], verbose=0,
            ),
        )
        results = tuner.fit()
    finally:
        T.shutdown_hosts()
    errors = [r for r in results if r.error is not None]
    print(f"\n{len(results)} GANs ({len(errors)} errored), {args.max_t} iterations of {STEPS_PER_REPORT} steps, "
          f"PBT every {args.interval}, in {time.monotonic() - started:.0f} s")
    print(f"{'trial':>6} {'netG_lr':>9} {'netD_lr':>9} {'is_score':>8} {'loss_D':>7} {'loss_G':>7}")
    for r in sorted((r for r in results if r.metrics), key=lambda r: -r.metrics["is_score"]):
        m, c = r.metrics, r.config
        print(f"{m['trial_id'].rsplit('_', 1)[-1]:>6} {c['netG_lr']:>9.2e} {c['netD_lr']:>9.2e} "
              f"{m['is_score']:>8.3f} {m['loss_D']:>7.3f} {m['loss_G']:>7.3f}")
    best = results.get_best_result(scope="last")
    gan = T.load_model(best.checkpoint)  # the best trial's GAN as a plain nn.ModuleDict
    with torch.no_grad():
        samples = gan["G"](torch.randn(10, Z))
        labels = gan["C"](samples).argmax(-1).tolist()
    print(f"best is_score {best.metrics['is_score']:.3f}; its generator's samples are classified as {labels}")
    if errors or not math.isfinite(best.metrics["is_score"]):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
