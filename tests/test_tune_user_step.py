"""A Tune sweep with the user's own step, metric names, searched batch size and optimizer, a Dataset with per-trial
augmentation, a plateau rule on the user's metric, and the trained model back (issue 11, items 1-5)."""

from __future__ import annotations

import pytest
from ray import tune

from tune_helpers import (accuracy_step, chosen_optimizer, digits, digits_pipeline, errors, fit,  # noqa: F401
                          gan_d_step, gan_g_step, gan_gap, make_model, ray_session, regularized_step, tiny_gan)


def test_sweep_with_own_steps_names_batch_size_and_optimizer(ray_session, tmp_path):
    import torch

    from ray_modelbatch.tune import batched_trainable

    from ray_modelbatch.optim import schedules

    plateau = schedules.plateau(mode="min", factor=0.5, patience=0)
    T = batched_trainable(
        model=make_model, optimizer=chosen_optimizer, data=digits_pipeline,
        hparams=lambda c: {"lr": c["lr"], "plateau": plateau}, plateau_metric="nll",
        train_step=regularized_step, eval_step=accuracy_step, batch_size=lambda c: c["batch_size"],
        steps_per_report=10, slots_per_host=8, idle_timeout_s=3.0,
    )
    space = {"batch_size": tune.grid_search([16, 32]), "opt": tune.grid_search(["rmsprop", "sgd"]),
             "l2": tune.grid_search([0.0, 1e-4]), "lr": tune.sample_from(lambda s: 3e-3 if s.config.opt == "rmsprop"
                                                                             else 0.02),
             "seed": 0}  # a fixed init: the accuracy bound below is not left to chance
    grid, log = fit(T, space, tmp_path, metric="accuracy", mode="max",
                    run_kw={"stop": {"training_iteration": 3},
                            "checkpoint_config": tune.CheckpointConfig(checkpoint_at_end=True)})
    assert not errors(grid)
    assert len(grid) == 8
    stacks = {}
    for r in grid:
        m = r.metrics
        assert {"accuracy", "nll", "penalty", "train_loss"} <= set(m), sorted(m)
        assert not any(k.startswith("val_") for k in m)
        stacks.setdefault((r.config["batch_size"], r.config["opt"]), set()).add(m["stack"])
    # one stack per (batch size, optimizer family); the l2 values share it as per-slot tensors
    assert all(len(v) == 1 for v in stacks.values()) and len({s for v in stacks.values() for s in v}) == 4
    # the plateau rule halved a trial's lr after each report whose nll did not improve
    for r in grid:
        df = r.metrics_dataframe.sort_values("training_iteration")
        best, lr = float("inf"), r.config["lr"]
        for nll, got in zip(df["nll"], df["lr"]):
            if not nll < best * (1 - 1e-4):
                lr *= 0.5
            best = min(best, nll)
            assert got == pytest.approx(lr), (r.config, list(df["nll"]), list(df["lr"]))
    best = grid.get_best_result()
    assert best.metrics["accuracy"] > 0.8
    model = T.load_model(best.checkpoint)
    x, y, xv, yv = digits()
    with torch.no_grad():
        acc = float((model(xv).argmax(-1) == yv).float().mean())
    assert acc == pytest.approx(best.metrics["accuracy"], abs=1e-6)


def test_a_model_in_parts_trains_in_a_sweep_and_comes_back(ray_session, tmp_path):
    """A GAN: one optimizer and learning rate per part, alternating steps, its own metric, the ModuleDict back."""
    import torch

    from ray_modelbatch import optim
    from ray_modelbatch.tune import batched_trainable

    T = batched_trainable(
        model=tiny_gan, optimizer={"D": optim.Adam, "G": optim.Adam}, data=digits,
        hparams=lambda c: {"D": {"lr": c["lr_d"]}, "G": {"lr": c["lr_g"]}},
        train_step={"D": gan_d_step, "G": gan_g_step}, eval_step=gan_gap,
        batch_size=32, steps_per_report=10, slots_per_host=4, idle_timeout_s=3.0,
    )
    grid, _ = fit(T, {"lr_d": tune.grid_search([1e-3, 3e-3]), "lr_g": 2e-3}, tmp_path, metric="pixel_gap",
                  mode="min", run_kw={"stop": {"training_iteration": 3},
                                      "checkpoint_config": tune.CheckpointConfig(checkpoint_at_end=True)})
    assert not errors(grid)
    for r in grid:
        m = r.metrics
        assert {"pixel_gap", "loss_D", "loss_G", "train_loss"} <= set(m) and m["training_iteration"] == 3
        assert m["lr"] == pytest.approx(r.config["lr_d"])  # the first part's (D) learning rate
    gan = T.load_model(grid.get_best_result().checkpoint)
    state = T.load_state(grid.get_best_result().checkpoint)
    assert set(state["optimizer"]["parts"]) == {"D", "G"} and state["optimizer"]["parts"]["G"]["steps"] == 30
    with torch.no_grad():
        assert gan["G"](torch.randn(5, 8)).shape == (5, 64)
