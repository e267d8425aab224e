"""Batch statistics over the global batch: two gloo processes on the CPU against one process.

Synchronized statistics promise that a batch split over processes is normalized, trained and
differentiated exactly as the concatenated batch in one process. Every scenario below runs once, in
two spawned processes (a single spawn for the whole module, so the suite pays the start-up of two
interpreters once); each process holds its share of the batch and saves what it computed with
``torch.save``. The tests then compare, in this process, with one process on the concatenation, so
a failure reads as an ordinary assertion.

The shares are uneven (rows ``[0, 4)`` and ``[4, 7)``) and padded: rank 1 has no unpadded entry at
some steps, and at one step neither rank has any. In a NormLSTM that needs the layer to run, and
check, the global batch's steps on every process (``uneven_ends``).

Tolerances. Everything runs in float64. A synchronized statistic adds the two shares' partial
sums, where one process adds all entries in one pass: the same numbers summed in another order,
which agree to a few ulps. Measured: means of ~100 to 3e-14 (3e-16 relative), LSTM outputs and
statistics to 2e-15, parameter gradients of up to ~20 to 4e-14 (2e-15 relative). ``TOL`` (1e-12,
relative and absolute) is far above that and far below any real discrepancy: each process's own
statistics differ from the global ones by ~1e-1 in the outputs here, and a gradient without the
other process's contribution is off by as much. What every rank computes from the same
all-reduced values (statistics, population buffers) is compared for bitwise equality.
"""

from __future__ import annotations

import datetime
import os
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from rnorm.functional.distributed import global_step_counts, synced_masked_moments, world_size
from rnorm.functional.normalization import masked_moments
from rnorm.nn import NormLSTM
from rnorm.norms import SequenceBatchNorm, TimeBatchNorm, set_statistics_sync

TOL = dict(rtol=1e-12, atol=1e-12)
WORLD = 2
SHARES = (slice(0, 4), slice(4, 7))  # rows of the global batch held by rank 0 and rank 1
BATCH, STEPS, FEATURES = 7, 5, 3
TIMEOUT = datetime.timedelta(seconds=60)  # a collective that waits longer has been mismatched

# -- the data: built here, saved for the workers --------------------------------------------------

# Moments over (T, B, F) per step (dims (1,)), over steps and samples (dims (0, 1)), and over the
# samples of one step (B, F) (dims (0,)): the batch axis is 1, 1 and 0.
MOMENT_CASES = {"per_step": ((1,), 1), "sequence": ((0, 1), 1), "one_step": ((0,), 0)}

# (input, recurrent, cell) strategies, layers, bidirectional, implementation: BN-LSTM and BN-e* on
# the fused recurrence (per-step all-reduces in its torch-ops loop), and BN-LSTM on the reference
# loop (all-reduces recorded by autograd).
LSTM_CASES = {
    "bn/bn/bn": ("bn", "bn", "bn", 2, False, "fused"),
    "seqbn/bn/bn": ("seqbn", "bn", "bn", 1, True, "fused"),
    "bn/bn/bn reference": ("bn", "bn", "bn", 2, False, "reference"),
}
# Lengths of the global batch. "ragged": each share has >= 2 sequences at every step up to its
# longest, 6 in both. "uneven_ends": rank 1's longest is 3, so it holds no sequence at steps 3-5 and
# only one at step 2, which the global batch makes up for.
LSTM_LENGTHS = {"ragged": [6, 3, 6, 2, 6, 4, 6], "uneven_ends": [6, 6, 4, 5, 3, 1, 2]}
LSTM_STEPS, LSTM_INPUT, LSTM_HIDDEN = 6, 3, 4


def _step_mask() -> torch.Tensor:
    """``(T, B)``: all of step 0; a ragged middle; step 3 only rank 0's rows; step 4 no row at all."""
    mask = torch.tensor(
        [
            [1, 1, 1, 1, 1, 1, 1],
            [1, 0, 1, 1, 0, 1, 1],
            [1, 1, 0, 1, 1, 0, 0],
            [1, 0, 1, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0],
        ],
        dtype=torch.bool,
    )
    assert not mask[3, SHARES[1]].any() and not mask[4].any()
    return mask


def _inputs() -> dict:
    g = torch.Generator().manual_seed(0)
    # A mean of 100 against a spread of ~3: the naive E[x^2] - E[x]^2 would lose ~8 digits here.
    x = 100.0 + 3.0 * torch.randn(STEPS, BATCH, FEATURES, generator=g, dtype=torch.float64)
    inputs = {
        "x": x,
        "mask": _step_mask(),
        # Per-rank weights of the statistics in each rank's loss (mean and var are (T, F) at most).
        "weights": torch.randn(WORLD, 2, STEPS, FEATURES, generator=g, dtype=torch.float64),
        "lstm_x": torch.randn(BATCH, LSTM_STEPS, LSTM_INPUT, generator=g, dtype=torch.float64),
        "lstm_lengths": {key: torch.tensor(lengths) for key, lengths in LSTM_LENGTHS.items()},
        "lstm_models": {},
    }
    for name in LSTM_CASES:
        torch.manual_seed(1)
        inputs["lstm_models"][name] = _lstm(name).double().state_dict()
    # A weight per output entry, so the loss is a sum over samples: the ranks' losses add up to it.
    # Sized for the widest case (2 directions; 2 layers x 1 direction in h_n), sliced to each.
    inputs["out_weights"] = torch.randn(BATCH, LSTM_STEPS, 2 * LSTM_HIDDEN, generator=g, dtype=torch.float64)
    inputs["h_weights"] = torch.randn(2, BATCH, LSTM_HIDDEN, generator=g, dtype=torch.float64)
    return inputs


def _lstm(name: str) -> NormLSTM:
    input_norm, recurrent_norm, cell_norm, layers, bidirectional, impl = LSTM_CASES[name]
    return NormLSTM(
        LSTM_INPUT,
        LSTM_HIDDEN,
        num_layers=layers,
        bidirectional=bidirectional,
        input_norm=input_norm,
        recurrent_norm=recurrent_norm,
        cell_norm=cell_norm,
        impl=impl,
    )


def _loaded_lstm(inputs: dict, name: str) -> NormLSTM:
    model = _lstm(name).double()
    model.load_state_dict(inputs["lstm_models"][name])
    return model


def _moment_inputs(inputs: dict, case: str, rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """``x``, ``mask`` and ``dims`` of a moments case, restricted to ``rows`` of the batch axis."""
    dims, batch_axis = MOMENT_CASES[case]
    x, mask = inputs["x"], inputs["mask"]
    if case == "one_step":  # step 3: rank 1 holds no unpadded row
        x, mask = x[3], mask[3]
    index = (slice(None),) * batch_axis + (rows,)
    return x[index], mask[index], dims


def _moment_loss(mean: torch.Tensor, var: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``Σ a·mean + b·var``: rank ``r`` uses its own ``weights[r]``; one process their sum."""
    a, b = weights[0], weights[1]
    if mean.dim() == 1:
        a, b = a[0], b[0]
    return (a * mean).sum() + (b * var).sum()


def _run_lstm(model: NormLSTM, inputs: dict, rows: slice, lengths: str) -> dict:
    """Forward and backward of ``model`` in training on ``rows`` of the global batch."""
    model.train()
    model.zero_grad()
    x = inputs["lstm_x"][rows].clone().requires_grad_(True)
    out, (h_n, c_n) = model(x, lengths=inputs["lstm_lengths"][lengths][rows])
    out_weights = inputs["out_weights"][rows, :, : out.shape[-1]]
    h_weights = inputs["h_weights"][: h_n.shape[0], rows]
    loss = (out * out_weights).sum() + (h_n * h_weights).sum() + (c_n * h_weights).sum()
    loss.backward()
    return {
        "out": out.detach(),
        "h_n": h_n.detach(),
        "c_n": c_n.detach(),
        "x_grad": x.grad,
        "grads": {name: p.grad for name, p in model.named_parameters() if p.grad is not None},
        "buffers": {name: b.clone() for name, b in model.named_buffers()},
    }


# -- the workers ----------------------------------------------------------------------------------


def _worker(rank: int, directory: str) -> None:
    torch.set_num_threads(1)  # two processes on (at least) two cores
    dist.init_process_group(
        "gloo", init_method=f"file://{directory}/store", rank=rank, world_size=WORLD, timeout=TIMEOUT
    )
    try:
        inputs = torch.load(os.path.join(directory, "inputs.pt"), weights_only=True)
        rows = SHARES[rank]
        results = {"world_size": world_size(), "moments": {}, "grads": {}, "lstm": {}, "lstm_local": {}}
        alone = dist.new_group([0]), dist.new_group([1])  # every rank creates every group

        for case in MOMENT_CASES:
            x, mask, dims = _moment_inputs(inputs, case, rows)
            for masked in (True, False):
                results["moments"][case, masked] = synced_masked_moments(x, mask if masked else None, dims)
            # A group of one process: exactly masked_moments.
            single = zip(synced_masked_moments(x, mask, dims, group=alone[rank]), masked_moments(x, mask, dims))
            results["moments"][case, "alone"] = [torch.equal(a, b) for a, b in single]
            x = x.clone().requires_grad_(True)
            mean, var, _ = synced_masked_moments(x, mask, dims)
            _moment_loss(mean, var, inputs["weights"][rank]).backward()
            results["grads"][case] = x.grad

        counts = inputs["mask"][:, rows].sum(1)
        results["step_counts"] = global_step_counts(counts[: 3 if rank else 5])  # uneven step counts

        results["norms"] = _run_norms(inputs, rows)

        for name in LSTM_CASES:
            results["lstm"][name] = _run_lstm(_loaded_lstm(inputs, name), inputs, rows, "ragged")
            model = _loaded_lstm(inputs, name)
            changed = set_statistics_sync(model, False)
            results["lstm_local"][name] = (changed, _run_lstm(model, inputs, rows, "ragged"))
        results["ddp"] = _train(DistributedDataParallel(_loaded_lstm(inputs, "seqbn/bn/bn")), inputs, rows)
        torch.save(results, os.path.join(directory, f"rank{rank}.pt"))

        # Last, after both ranks have saved: if the layer cannot run this batch, one rank fails
        # alone and the other is stopped in a collective; only this scenario's test then fails.
        dist.barrier()
        try:
            uneven = {name: _run_lstm(_loaded_lstm(inputs, name), inputs, rows, "uneven_ends") for name in LSTM_CASES}
        except Exception:
            Path(directory, f"rank{rank}_uneven_ends.err").write_text(traceback.format_exc())
            raise
        torch.save(uneven, os.path.join(directory, f"rank{rank}_uneven_ends.pt"))
    finally:
        dist.destroy_process_group()


def _train(model: nn.Module, inputs: dict, rows: slice, steps: int = 2) -> dict:
    """``steps`` of SGD on ``rows`` of the global batch; the trained model's state."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    lengths = inputs["lstm_lengths"]["ragged"][rows]
    scale = WORLD if isinstance(model, DistributedDataParallel) else 1  # DDP averages the gradients
    for _ in range(steps):
        optimizer.zero_grad()
        out, _ = model(inputs["lstm_x"][rows], lengths=lengths)
        (scale * (out * inputs["out_weights"][rows, :, : out.shape[-1]]).sum()).backward()
        optimizer.step()
    module = model.module if isinstance(model, DistributedDataParallel) else model
    return {key: value.clone() for key, value in module.state_dict().items()}


def _run_norms(inputs: dict, rows: slice) -> dict:
    """``bn`` (vectorized and step by step) and ``seqbn`` on ``rows``: outputs, statistics, gradients."""
    x, mask = inputs["x"][:, rows], inputs["mask"][:, rows]
    weights = inputs["weights"][0, 0, 0]  # (F,)
    results = {}
    norms = {"bn": TimeBatchNorm("cell", FEATURES), "seqbn": SequenceBatchNorm("input", FEATURES, learn_beta=True)}
    for name, norm in norms.items():
        norm = norm.double().train()
        share = x.clone().requires_grad_(True)
        y = norm(share, mask)
        (y * weights * mask.unsqueeze(-1)).sum().backward()
        results[name] = {
            "y": y.detach(),
            "x_grad": share.grad,
            "gamma_grad": norm.gamma.grad,
            "beta_grad": norm.beta.grad,
            "running_mean": norm.running_mean,
            "running_var": norm.running_var,
            "num_batches_tracked": norm.num_batches_tracked,
        }
    norm = TimeBatchNorm("cell", FEATURES).double().train()
    results["bn_step"] = {
        "y": torch.stack([norm.step(x[t], t, mask[t]) for t in range(STEPS)]),
        "running_mean": norm.running_mean,
        "running_var": norm.running_var,
    }
    return results


def _spawn(directory: Path) -> None:
    """Run :func:`_worker` in ``WORLD`` processes; raise with a worker's traceback if one fails."""
    context = mp.start_processes(_worker, (str(directory),), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + 2 * TIMEOUT.total_seconds()
    while not context.join(timeout=1.0):  # raises ProcessRaisedException if a worker failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError("The distributed workers did not finish in time.")


@pytest.fixture(scope="module")
def distributed(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[dict]]:
    """The inputs, and what each of the two processes computed from its share.

    ``ranks[r]["uneven_ends"]`` holds the last scenario's results, or the tracebacks it failed with.
    """
    assert dist.is_available() and dist.is_gloo_available()  # the CPU build has gloo: never skip
    directory = tmp_path_factory.mktemp("distributed")
    inputs = _inputs()
    torch.save(inputs, directory / "inputs.pt")
    try:
        _spawn(directory)
        failure = None
    except mp.ProcessRaisedException as error:
        failure = error
    saved = [directory / f"rank{rank}.pt" for rank in range(WORLD)]
    if failure is not None and not all(path.exists() for path in saved):
        raise failure  # before the last scenario: every test needs these results
    ranks = [torch.load(path, weights_only=True) for path in saved]
    errors = [directory / f"rank{rank}_uneven_ends.err" for rank in range(WORLD)]
    # The first failure is what matters: a rank that fails stops the other in a collective.
    errors = "\n".join(f"rank {rank}: {path.read_text()}" for rank, path in enumerate(errors) if path.exists())
    for rank, results in enumerate(ranks):
        if failure is not None:
            results["uneven_ends"] = errors or str(failure)
        else:
            results["uneven_ends"] = torch.load(directory / f"rank{rank}_uneven_ends.pt", weights_only=True)
    return inputs, ranks


# -- the tests ------------------------------------------------------------------------------------


def test_not_distributed_is_masked_moments() -> None:
    assert not dist.is_initialized() and world_size() == 1
    inputs = _inputs()
    for case in MOMENT_CASES:
        x, mask, dims = _moment_inputs(inputs, case)
        for m in (mask, None):
            for a, b in zip(synced_masked_moments(x, m, dims), masked_moments(x, m, dims)):
                assert torch.equal(a, b)
    counts = torch.tensor([3, 2, 0])
    assert global_step_counts(counts) is counts


def test_workers_ran_distributed(distributed) -> None:
    _, ranks = distributed
    assert [r["world_size"] for r in ranks] == [WORLD, WORLD]


@pytest.mark.parametrize("case", MOMENT_CASES)
@pytest.mark.parametrize("masked", [True, False])
def test_synced_moments_are_those_of_the_concatenated_batch(distributed, case: str, masked: bool) -> None:
    inputs, ranks = distributed
    x, mask, dims = _moment_inputs(inputs, case)
    expected = masked_moments(x, mask if masked else None, dims)
    for rank in ranks:
        got = rank["moments"][case, masked]
        for a, b in zip(got, expected):
            assert a.shape == b.shape and a.dtype == b.dtype
            torch.testing.assert_close(a, b, **TOL)
    for a, b in zip(ranks[0]["moments"][case, masked], ranks[1]["moments"][case, masked]):
        assert torch.equal(a, b)  # the same all-reduced sums, the same arithmetic
    if masked and case != "sequence":
        # Rank 1 holds nothing at step 3 and no rank anything at step 4: global counts 2, then 0.
        count = expected[2].reshape(1) if case == "one_step" else expected[2][3:]
        assert count.tolist() == ([2.0] if case == "one_step" else [2.0, 0.0])


@pytest.mark.parametrize("case", MOMENT_CASES)
def test_a_group_of_one_process_is_masked_moments(distributed, case: str) -> None:
    _, ranks = distributed
    assert ranks[0]["moments"][case, "alone"] == [True] * 3 and ranks[1]["moments"][case, "alone"] == [True] * 3


@pytest.mark.parametrize("case", MOMENT_CASES)
def test_gradients_flow_across_processes(distributed, case: str) -> None:
    inputs, ranks = distributed
    x, mask, dims = _moment_inputs(inputs, case)
    x = x.clone().requires_grad_(True)
    mean, var, _ = masked_moments(x, mask, dims)
    # The ranks' losses add up to this one: each weighs the global statistics with its weights.
    _moment_loss(mean, var, inputs["weights"].sum(0)).backward()
    _, batch_axis = MOMENT_CASES[case]
    for rows, rank in zip(SHARES, ranks):
        expected = x.grad[(slice(None),) * batch_axis + (rows,)]
        torch.testing.assert_close(rank["grads"][case], expected, **TOL)


def test_global_step_counts_pads_the_shorter_process(distributed) -> None:
    inputs, ranks = distributed
    counts = inputs["mask"].sum(1)  # rank 0 sent all 5 steps, rank 1 its first 3
    for rank in ranks:
        assert rank["step_counts"].tolist() == counts.tolist()


@pytest.mark.parametrize("name", ["bn", "seqbn", "bn_step"])
def test_normalizers_match_one_process(distributed, name: str) -> None:
    inputs, ranks = distributed
    full = _run_norms(inputs, slice(None))[name]
    mask = inputs["mask"]
    for rows, rank in zip(SHARES, ranks):
        got = rank["norms"][name]
        valid = mask[:, rows]
        torch.testing.assert_close(got["y"][valid], full["y"][:, rows][valid], **TOL)
        if "x_grad" in got:
            torch.testing.assert_close(got["x_grad"], full["x_grad"][:, rows], **TOL)
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            if key in got:
                assert torch.equal(got[key], ranks[0]["norms"][name][key])
                torch.testing.assert_close(got[key], full[key], **TOL)
    for key in ("gamma_grad", "beta_grad"):
        if key in full:
            torch.testing.assert_close(ranks[0]["norms"][name][key] + ranks[1]["norms"][name][key], full[key], **TOL)


def _reference_lstm(inputs: dict, name: str, lengths: str, rows: slice = slice(None)) -> dict:
    return _run_lstm(_loaded_lstm(inputs, name), inputs, rows, lengths)


def _assert_lstm_matches_one_process(inputs: dict, ranks: list[dict], lengths: str) -> None:
    """Each rank's share of the outputs and input gradients, the statistics and the summed
    parameter gradients are those of one process on the whole batch."""
    for name in LSTM_CASES:
        full = _reference_lstm(inputs, name, lengths)
        for rows, rank in zip(SHARES, ranks):
            got = rank[name]
            torch.testing.assert_close(got["out"], full["out"][rows], **TOL, msg=name)
            torch.testing.assert_close(got["h_n"], full["h_n"][:, rows], **TOL, msg=name)
            torch.testing.assert_close(got["c_n"], full["c_n"][:, rows], **TOL, msg=name)
            torch.testing.assert_close(got["x_grad"], full["x_grad"][rows], **TOL, msg=name)
            assert got["buffers"].keys() == full["buffers"].keys()
            for key, buffer in got["buffers"].items():
                assert torch.equal(buffer, ranks[0][name]["buffers"][key]), (name, key)
                torch.testing.assert_close(buffer, full["buffers"][key], **TOL, msg=(name, key))
        grads = [rank[name]["grads"] for rank in ranks]
        assert grads[0].keys() == grads[1].keys() == full["grads"].keys()
        for key, expected in full["grads"].items():
            # What DDP all-reduces (it then divides by the world size; the loss here is a plain sum).
            torch.testing.assert_close(grads[0][key] + grads[1][key], expected, **TOL, msg=(name, key))


def test_norm_lstm_matches_one_process(distributed) -> None:
    inputs, ranks = distributed
    _assert_lstm_matches_one_process(inputs, [rank["lstm"] for rank in ranks], "ragged")


def test_norm_lstm_with_a_process_out_of_sequences(distributed) -> None:
    """Rank 1's sequences all end by step 3: it must still run steps 3-5 (with nothing to count)
    for rank 0's statistics, and its lonely sample at step 2 is not alone in the global batch."""
    inputs, ranks = distributed
    uneven = [rank["uneven_ends"] for rank in ranks]
    if isinstance(uneven[0], str):
        pytest.fail(f"A worker failed:\n{uneven[0]}")
    _assert_lstm_matches_one_process(inputs, uneven, "uneven_ends")


def test_ddp_training_matches_one_process(distributed) -> None:
    """Under DistributedDataParallel (gradient all-reduce and buffer broadcast included), two SGD
    steps on the shares give the parameters and statistics of two steps on the whole batch."""
    inputs, ranks = distributed
    model = _loaded_lstm(inputs, "seqbn/bn/bn").train()
    expected = _train(model, inputs, slice(None))
    for rank in ranks:
        assert rank["ddp"].keys() == expected.keys()
        for key, value in rank["ddp"].items():
            assert torch.equal(value, ranks[0]["ddp"][key]), key
            torch.testing.assert_close(value, expected[key], **TOL, msg=key)


@pytest.mark.parametrize("name", LSTM_CASES)
def test_without_sync_each_process_uses_its_own_batch(distributed, name: str) -> None:
    inputs, ranks = distributed
    full = _reference_lstm(inputs, name, "ragged")
    expected_changed = 3 * len(_lstm(name).cells)
    for rows, rank in zip(SHARES, ranks):
        changed, got = rank["lstm_local"][name]
        assert changed == expected_changed
        alone = _reference_lstm(inputs, name, "ragged", rows)  # one process that only ever saw this share
        torch.testing.assert_close(got["out"], alone["out"], **TOL)
        for key, buffer in got["buffers"].items():
            torch.testing.assert_close(buffer, alone["buffers"][key], **TOL, msg=key)
        # ...which is not the global batch's: the outputs and statistics really differ.
        assert (got["out"] - full["out"][rows]).abs().max() > 1e-3
        means = [k for k in got["buffers"] if k.endswith("running_mean")]
        assert all((got["buffers"][k] - full["buffers"][k]).abs().max() > 1e-3 for k in means)
