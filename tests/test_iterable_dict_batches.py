"""A factory of iterables may yield Hugging Face style dict batches (input_ids, attention_mask, labels).

Such a batch is the model's whole input (``x`` the dict, ``y`` None), as for
dataset streams. Every check compares against the same pipeline yielding
``(x, y)`` tuples, or against what a one-model loop over the factory sees.
"""

from __future__ import annotations

import copy
import io
import itertools
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ray_modelbatch import FusedEngine, ModelBatch, optim
from ray_modelbatch.data import sweep_inputs
from ray_modelbatch.iterable_streams import IterableStreams
from ray_modelbatch.slot_group import SlotGroup, stack_key
from ray_modelbatch.tune.spec import SlotSpec

N, B, L, VOCAB, C = 45, 6, 5, 20, 3
SIZES = [6, 4, 6, 6, 9, 6, 5, 3]  # items per epoch (sum N): 4 of batch_size rows, 4 of other sizes (skipped)
FULL = SIZES.count(B)
KEYS = ("input_ids", "attention_mask", "labels")
_g = torch.Generator().manual_seed(0)
IDS = torch.randint(1, VOCAB, (N, L), generator=_g)
MASK = (torch.arange(L) < torch.randint(1, L + 1, (N, 1), generator=_g)).long()  # right padding, >= 1 token
LABELS = torch.randint(0, C, (N,), generator=_g)
COLUMNS = {"input_ids": IDS, "attention_mask": MASK, "labels": LABELS}


def chunks(seed: int, epoch: int) -> list[torch.Tensor]:
    """One epoch's row numbers per item: a seeded order of rows, cut into items of seeded sizes."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    perm = torch.randperm(N, generator=g)
    sizes = [SIZES[k] for k in torch.randperm(len(SIZES), generator=g).tolist()]
    ends = list(itertools.accumulate(sizes))
    return [perm[e - n:e] for n, e in zip(sizes, ends)]


def dict_batches(seed: int, epoch: int):
    """The HF form: a generator of dict batches whose labels are a column."""
    for rows in chunks(seed, epoch):
        yield {k: v[rows] for k, v in COLUMNS.items()}


def tuple_batches(column: str):
    """The same pipeline as ``(x, y)`` tuples: x = ``column``, y = labels."""
    def factory(seed: int, epoch: int):
        for rows in chunks(seed, epoch):
            yield COLUMNS[column][rows], LABELS[rows]
    return factory


class Examples(Dataset):
    """What ``datasets.Dataset.with_format("torch")`` gives: one dict per example."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in COLUMNS.items()}


def dict_loader(seed: int, epoch: int) -> DataLoader:
    """A DataLoader over dict examples (default_collate gives dict batches); its last batch is partial."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return DataLoader(Examples(), batch_size=B, shuffle=True, generator=g, drop_last=False)


def tuple_loader(column: str):
    def factory(seed: int, epoch: int) -> DataLoader:
        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        return DataLoader(TensorDataset(COLUMNS[column], LABELS), batch_size=B, shuffle=True, generator=g,
                          drop_last=False)
    return factory


def by_hand(factory, seed: int, steps: int) -> list[dict]:
    """The first ``steps`` full dict batches of factory(seed, 0), factory(seed, 1), ...: what a solo loop sees."""
    out = []
    for epoch in itertools.count():
        for batch in factory(seed, epoch):
            if batch["labels"].shape[0] == B:
                out.append(batch)
                if len(out) == steps:
                    return out


def take(streams, slots, steps, skip=None):
    return [streams.next_batch(slots, skip) for _ in range(steps)]


def slot_rows(batches, j) -> list[dict]:
    """Slot ``j``'s dict batches out of stacked steps (``y`` must be None in the dict form)."""
    assert all(y is None for _, y in batches)
    return [{k: v[j] for k, v in x.items()} for x, _ in batches]


def same_dicts(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(set(p) == set(q) and all(torch.equal(p[k], q[k]) for k in p)
                                    for p, q in zip(a, b))


# ------------------------------------------------------------------------------ (a) the same rows as tuples
@pytest.mark.parametrize("dicts, tuples", [(dict_batches, tuple_batches), (dict_loader, tuple_loader)],
                         ids=["generator", "dataloader"])
def test_dict_batches_give_each_slot_the_rows_of_the_tuple_form_column_by_column(dicts, tuples):
    seeds, steps = [3, 4], 3 * FULL + 2 if dicts is dict_batches else 2 * (N // B) + 2  # across two epoch ends
    streams = IterableStreams(dicts, B, seeds)
    got = take(streams, [0, 1], steps)
    x0, y0 = got[0]
    assert y0 is None and set(x0) == set(KEYS) and x0["input_ids"].shape == (2, B, L) and x0["labels"].shape == (2, B)
    for column in ("input_ids", "attention_mask"):
        ref = IterableStreams(tuples(column), B, seeds)
        want = take(ref, [0, 1], steps)
        for (x, _), (xt, yt) in zip(got, want):
            assert torch.equal(x[column], xt) and torch.equal(x["labels"], yt)
        assert ref.skipped == streams.skipped > 0  # wrong-sized items are skipped alike in both forms
        assert [s.position() for s in ref.slots] == [s.position() for s in streams.slots]
    for j, seed in enumerate(seeds):
        assert same_dicts(slot_rows(got, j), by_hand(dicts, seed, steps))
    assert not same_dicts(slot_rows(got, 0), slot_rows(got, 1))


def test_dict_batches_follow_skip_masks_and_fill_steps_where_no_slot_runs():
    streams = IterableStreams(dict_batches, B, [1, 2, 3])
    x, y = streams.next_batch([0, 1, 2], skip=[True, False, True])
    assert y is None and all(torch.equal(x[k][0], x[k][1]) and torch.equal(x[k][2], x[k][1]) for k in KEYS)
    assert [s.position()[1:] for s in streams.slots] == [(0, 0), (0, 1), (0, 0)]
    fx, fy = streams.next_batch([0, 2], skip=[True, True])  # a fixed filler batch, nobody advances
    assert fy is None and {k: tuple(v.shape) for k, v in fx.items()} == \
        {"input_ids": (2, B, L), "attention_mask": (2, B, L), "labels": (2, B)}
    assert [s.position()[1:] for s in streams.slots] == [(0, 0), (0, 1), (0, 0)]
    got = take(streams, [0, 1, 2], 2)
    assert same_dicts(slot_rows(got, 0), by_hand(dict_batches, 1, 2))
    assert same_dicts(slot_rows(got, 1), by_hand(dict_batches, 2, 3)[1:])
    empty, none = streams.next_batch([])
    assert none is None and empty["input_ids"].shape == (0, B, L)
    assert IterableStreams(dict_loader, B, [0]).steps_per_epoch() == N // B


def test_fields_keep_the_old_split_of_a_dict_batch_with_labels():
    streams = IterableStreams(dict_batches, B, [5], fields=("input_ids", "labels"))
    ref = IterableStreams(tuple_batches("input_ids"), B, [5])
    for (x, y), (xt, yt) in zip(take(streams, [0], 5), take(ref, [0], 5)):
        assert torch.equal(x, xt) and torch.equal(y, yt)


# ------------------------------------------------------------------------------ (b) state and replay
def test_a_dict_stream_state_saved_mid_epoch_resumes_identical_batches_in_a_fresh_stream():
    a = IterableStreams(dict_batches, B, [7, 8])
    take(a, [0, 1], FULL + 2)  # mid epoch 1
    buf = io.BytesIO()
    torch.save({"stream": a.slot_state(1), "all": a.state_dict()}, buf)
    saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert saved["stream"] == {"seed": 8, "epoch": 1, "taken": 2, "batch_size": B}

    fresh = IterableStreams(dict_batches, B, [0])
    fresh.load_slot_state(0, saved["stream"])
    whole = IterableStreams(dict_batches, B, [0, 0])
    whole.load_state_dict(saved["all"])
    ahead = take(a, [0, 1], FULL + 1)  # crosses the next epoch end
    assert same_dicts(slot_rows(take(fresh, [0], FULL + 1), 0), slot_rows(ahead, 1))
    assert same_dicts(slot_rows(take(whole, [0, 1], FULL + 1), 0), slot_rows(ahead, 0))
    assert same_dicts(slot_rows(ahead, 1), by_hand(dict_batches, 8, 2 * FULL + 3)[FULL + 2:])


def test_capture_and_restore_replay_the_same_dict_batches():
    streams = IterableStreams(dict_loader, B, [5])
    take(streams, [0], 3)
    mid = streams.capture_slot(0)
    ahead = take(streams, [0], N // B)  # crosses the epoch end (7 full batches per epoch)
    streams.restore_slot(0, mid)
    assert same_dicts(slot_rows(take(streams, [0], N // B), 0), slot_rows(ahead, 0))


# ------------------------------------------------------------------------------ (c) training end to end
@dataclass
class Output:
    loss: torch.Tensor
    logits: torch.Tensor


class TinyClassifier(nn.Module):
    """An HF-shaped model without transformers: keyword inputs in, an object with ``.loss`` out."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, C)

    def forward(self, input_ids, attention_mask, labels):
        m = attention_mask.unsqueeze(-1).to(self.head.weight.dtype)
        pooled = (self.embed(input_ids) * m).sum(-2) / m.sum(-2).clamp(min=1.0)
        logits = self.head(pooled)
        return Output(F.cross_entropy(logits, labels), logits)


def hf_step(model, batch, config):
    return model(**batch).loss


SEEDS, LRS, STEPS = [11, 12, 13], [0.5, 0.2, 0.1], FULL + 3


def _solo(model: nn.Module, seed: int, lr: float) -> nn.Module:
    solo = copy.deepcopy(model)
    opt = torch.optim.SGD(solo.parameters(), lr=lr)
    for batch in by_hand(dict_batches, seed, STEPS):
        opt.zero_grad()
        solo(**batch).loss.backward()
        opt.step()
    return solo


def test_fused_engine_trains_on_dict_batches_like_each_model_alone():
    torch.manual_seed(0)
    models = [TinyClassifier() for _ in SEEDS]
    mb = ModelBatch(models)
    engine = FusedEngine(mb, optim.SGD(mb, lr=LRS), step_fn=hf_step)
    streams = IterableStreams(dict_batches, B, SEEDS)
    losses = []
    for _ in range(STEPS):
        x, y = streams.next_batch([0, 1, 2])
        assert y is None
        losses.append(engine.train_step(x, y, per_slot=True).losses)
    assert torch.isfinite(torch.stack(losses)).all() and not torch.equal(losses[0], losses[-1])
    for i, model in enumerate(models):
        solo = _solo(model, SEEDS[i], LRS[i])
        for a, b in zip(mb.slot_module(i, TinyClassifier()).parameters(), solo.parameters()):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"slot {i}")


def test_a_slot_group_streams_dict_batches_from_data_to_the_step():
    val = {k: v[:12] for k, v in COLUMNS.items()}
    data = sweep_inputs({"train": dict_batches, "val": val}, "cpu")
    assert data.iterable and data.y_val is None and set(data.x_val) == set(KEYS)
    seen = []

    def step(model, batch, config):
        seen.append(sorted(batch))
        return model(**batch).loss

    def evaluate(model, batch, config):
        out = model(**batch)
        return {"nll": out.loss, "accuracy": (out.logits.argmax(-1) == batch["labels"]).float().mean()}

    spec = SlotSpec(model=lambda c: None, optimizer=optim.SGD, hparams=lambda c: {}, loss=None, data=lambda: None,
                    train_step=step, eval_step=evaluate, batch_size=B, steps_per_report=3)
    torch.manual_seed(0)
    first = TinyClassifier()
    group = SlotGroup(spec, stack_key(first), first, data, 4, "cpu", config={})
    assert isinstance(group.streams, IterableStreams)
    slots = [group.add(f"t{i}", TinyClassifier(), seed=s, hparams={"lr": 0.3}) for i, s in enumerate(SEEDS[:2])]
    done = []
    while not done:
        done = group.step(slots)
    res = group.finish(done)
    assert seen[-1] == sorted(KEYS)
    for s in slots:
        assert res[s]["slot_steps"] == 3 and {"nll", "accuracy", "train_loss"} <= set(res[s])
        with torch.no_grad():
            alone = evaluate(group.mb.slot_module(s, TinyClassifier()).eval(), val, {})
        assert res[s]["nll"] == pytest.approx(float(alone["nll"]), rel=1e-5)
    assert group.streams.slot_state(slots[0]) == {"seed": SEEDS[0], "epoch": 0, "taken": 3, "batch_size": B}


# ------------------------------------------------------------------------------ (d) clear errors
def _one_line(info) -> str:
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_columns_with_different_row_counts_are_one_clear_error_and_no_slot_moves():
    def ragged(seed, epoch):
        yield {"input_ids": IDS[:B], "attention_mask": MASK[:B], "labels": LABELS[:B - 1]}

    streams = IterableStreams(ragged, B, [1, 2])
    with pytest.raises(ValueError, match="5 rows in its column 'labels' but 6 in 'input_ids'") as info:
        streams.next_batch([0, 1])
    assert "pad or truncate" in _one_line(info)
    assert [s.position() for s in streams.slots] == [(1, 0, 0), (2, 0, 0)]


@pytest.mark.parametrize("factory, match", [
    (lambda s, e: [{"input_ids": IDS[:B], "text": ["a"] * B, "labels": LABELS[:B]}], r"x\['text'\]"),
    (lambda s, e: [{"input_ids": IDS[:B], "mask": MASK[:B]}], "call a dict batch's label column 'labels'"),
    (lambda s, e: [{"input_ids": IDS[:B], "labels": LABELS[:B]}] if s == 1 else
     [{"input_ids": IDS[:B], "attention_mask": MASK[:B], "labels": LABELS[:B]}], "different columns"),
    (lambda s, e: [{"input_ids": IDS[:B], "labels": LABELS[:B]}] if s == 1 else [(IDS[:B], LABELS[:B])],
     "differ in form"),
    (lambda s, e: [{"input_ids": IDS[:B, :s + 2], "labels": LABELS[:B]}], "padding='max_length'"),
])
def test_malformed_dict_batches_are_one_clear_line(factory, match):
    with pytest.raises((ValueError, TypeError), match=match) as info:
        IterableStreams(factory, B, [1, 2]).next_batch([0, 1])
    _one_line(info)


def test_dict_training_batches_need_validation_in_the_same_form():
    with pytest.raises(ValueError, match="same form") as info:
        sweep_inputs({"train": dict_batches, "val": (IDS[:5], LABELS[:5])})
    _one_line(info)
