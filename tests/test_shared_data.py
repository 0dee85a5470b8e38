"""The sweep's data is loaded once, in the driver, while the slot hosts start (``ray_modelbatch.tune.shared_data``).

Each ``data()`` below records the process that called it in a directory, so the
tests see where it ran: in the driver only (plain tensors), in the host (a
dataset, which the driver does not ship; ``data_in_driver=False``), or in both
when the driver's call failed.
"""

from __future__ import annotations

import functools
import os
import sys

import numpy as np
import pytest
import torch
from ray import tune

import tune_helpers as h
from ray_modelbatch.tune.shared_data import DataMailbox, load_in_driver, plain_nbytes
from tune_helpers import ray_session, trainables  # noqa: F401 - shared fixtures
from ray import cloudpickle

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the hosts cannot import a test module


def _record(where: str) -> None:
    with open(os.path.join(where, f"{os.getpid()}"), "a") as f:
        f.write("x")


def recorded_digits(where: str):
    _record(where)
    return h.digits()


def recorded_pipeline(where: str):
    _record(where)
    return h.digits_pipeline()


def fails_in_the_driver(where: str, driver_pid: int):
    _record(where)
    if os.getpid() == driver_pid:
        raise OSError("only the hosts' nodes have the files")
    return h.digits()


def _callers(where) -> dict[int, int]:
    return {int(p): len(open(os.path.join(where, p)).read()) for p in os.listdir(where)}


def _sweep(T, tmp_path) -> dict:
    grid, _ = h.fit(T, {"lr": tune.grid_search([0.05, 0.02]), "seed": 1}, tmp_path,
                    run_kw={"stop": {"training_iteration": 2}})
    assert h.errors(grid) == []
    [stats] = T.host_stats()
    return stats


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priorities are Linux's")
def test_the_drivers_data_thread_leaves_the_cores_to_the_starting_processes(tmp_path):
    """data() runs at the lowest CPU priority, in its own thread only: the driver keeps its own."""
    import threading
    from types import SimpleNamespace

    record = str(tmp_path / "priority")

    def data():  # (sent by value, as the driver sends the user's: it reports through a file)
        with open(record, "w") as f:
            f.write(str(os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
        return object()  # not plain data: nothing goes to Ray's object store

    offered = []
    registry = SimpleNamespace(offer_data=SimpleNamespace(remote=offered.append))
    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    load_in_driver(cloudpickle.dumps(SimpleNamespace(data=data)), registry).join(timeout=30)
    assert offered == [None]  # each host loads it itself
    assert open(record).read() == "19"
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before


def test_plain_nbytes_counts_cpu_tensors_and_arrays_in_containers_only():
    x = torch.zeros(4, 8)
    assert plain_nbytes((x, torch.zeros(4, dtype=torch.long), {"ids": x, "mask": None}, [np.zeros(3)])) == 128 + 32 + 128 + 24
    # a TensorDataset and random_split's Subsets of one travel (tensors and row numbers); other datasets do not
    tensors = torch.utils.data.TensorDataset(x, torch.zeros(4, dtype=torch.long))
    train, val = torch.utils.data.random_split(tensors, [3, 1])
    assert plain_nbytes(tensors) == 160 and plain_nbytes((train, val)) == 160 + 3 * 8 + 160 + 8
    assert plain_nbytes(torch.utils.data.Subset(h.DigitsDataset(), [0, 1])) is None  # a dataset of its own
    assert plain_nbytes(type("Own", (torch.utils.data.TensorDataset,), {})(x)) is None  # a subclass
    assert plain_nbytes((x, lambda seed, epoch: iter(()))) is None  # a factory of iterables
    assert plain_nbytes(x.to_sparse()) is None
    assert plain_nbytes(torch.zeros(100, 10)[:2]) == 4000  # a view travels with its whole storage
    mailbox = DataMailbox(pending=True)
    assert mailbox.get() == ("pending", None)
    mailbox.offer(None)
    assert mailbox.get() == ("none", None)
    assert DataMailbox(pending=False).get() == ("none", None)


def recorded_split(where: str):
    """data() as Tune's CIFAR tutorial writes it: random_split of one TensorDataset into (train, val)."""
    _record(where)
    x, y, xv, yv = h.digits()
    both = torch.utils.data.TensorDataset(torch.cat([x, xv]), torch.cat([y, yv]))
    return tuple(torch.utils.data.random_split(both, [len(x), len(xv)], generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("form", ["tensors", "random_split"])
def test_tensor_data_is_loaded_once_in_the_driver_and_reaches_the_host(trainables, tmp_path, form):
    where = tmp_path / "calls"
    where.mkdir()
    load = {"tensors": recorded_digits, "random_split": recorded_split}[form]
    T = trainables(slots_per_host=2, data=functools.partial(load, str(where)))
    stats = _sweep(T, tmp_path)
    assert _callers(where) == {os.getpid(): 1}  # the driver, once; never the host
    assert stats["data_source"].startswith("driver")


@pytest.mark.parametrize("case", ["dataset", "opted_out", "driver_fails"])
def test_the_host_loads_the_data_itself_when_the_driver_does_not_ship_it(trainables, tmp_path, case):
    where = tmp_path / "calls"
    where.mkdir()
    data, kw = {
        "dataset": (functools.partial(recorded_pipeline, str(where)), {}),
        "opted_out": (functools.partial(recorded_digits, str(where)), {"data_in_driver": False}),
        "driver_fails": (functools.partial(fails_in_the_driver, str(where), os.getpid()), {}),
    }[case]
    T = trainables(slots_per_host=2, data=data, **kw)
    stats = _sweep(T, tmp_path)
    callers = _callers(where)
    assert callers.get(stats["pid"]) == 1 and stats["data_source"] == "host"
    assert callers.get(os.getpid()) == (None if case == "opted_out" else 1)
