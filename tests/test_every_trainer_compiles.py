"""torch.compile (issue 13, item 4): nnU-Net compiles ``self.network`` on CUDA by default
(``nnUNet_compile``), so every trainer must run compiled, or turn compiling off itself with a reason.

What the CPU shows, for every trainer of the catalogue (a method added later is covered without
editing this test):
- its network's training forward (``heads=True``, as ``train_step`` calls it) traces into ONE graph:
  a graph break costs a host sync and a split graph every step on the GPU (the Mamba codebook's usage
  counters and dead-code restart had eight, from ``.item()``, ``bincount`` and logging);
- a training step with the network compiled (dynamo + AOTAutograd, the ``aot_eager`` backend: the
  graph capture, the functionalisation of the buffers and attributes the forward mutates, the
  compiled backward) gives the eager step's loss, weights and codebook state.
Inductor's code generation runs in the slow test at the end (minutes per network on two cores).
The GPU run (Triton kernels, AMP, speed) is in ``benchmarks/performance.py --modes compiled``.
"""
import copy

import pytest
import torch
import torch._dynamo

from nnunet_liver_ext.catalogue import load_catalogue
from nnunet_liver_ext.networks.contract import unwrap_network

from test_mti_net_trainer import DATASET_JSON, make_batch, make_trainer, nnunet_folders  # noqa: F401

torch.set_num_threads(1)

MAIN_TRAINERS = ["nnUNetTrainerSTDNet", "nnUNetTrainerDynTransNet", "nnUNetTrainerMambaCodebook",
                 "nnUNetTrainerMTINet"]


def _our_trainers():
    catalogue = load_catalogue()
    assert not catalogue.errors, catalogue.errors
    return [e.name for e in catalogue.bases()]


def _network_and_input(name):
    trainer = make_trainer(name, copy.deepcopy(DATASET_JSON))
    return trainer, trainer.network, make_batch(trainer)["data"]


@pytest.mark.parametrize("name", _our_trainers())
def test_training_forward_is_one_graph(nnunet_folders, name):  # noqa: F811
    _, network, data = _network_and_input(name)
    network.train()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(network)(data, heads=True)
    assert explained.graph_break_count == 0, [str(b.reason).splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_count == 1


def _train(name: str, compile_network=None, steps: int = 3):
    """Losses, every step's parameter gradients, and the buffers and codebook counters at the end."""
    trainer = make_trainer(name, copy.deepcopy(DATASET_JSON))
    if compile_network is not None:
        torch._dynamo.reset()
        trainer.network = compile_network(trainer.network)
    network = unwrap_network(trainer.network)
    torch.manual_seed(1)
    losses, grads = [], []
    for _ in range(steps):
        losses.append(float(trainer.train_step(make_batch(trainer))["loss"]))
        # a compiled backward gives zeros where eager leaves None (the coarsest deep-supervision output, weight 0)
        grads.append({k: torch.zeros_like(v) if v.grad is None else v.grad.clone()
                      for k, v in network.named_parameters()})
    state = {k: v.clone() for k, v in network.named_buffers()}
    codebook = getattr(network, "codebook", None)
    if codebook is not None:  # per-epoch counters live outside the state dict
        state.update(counts=codebook.counts.clone(), restarted=codebook.restarted.clone())
    return losses, grads, state


def _assert_same_training(reference, other, rtol: float) -> None:
    """Gradients per tensor within ``rtol`` of the reference's norm (plus a rounding floor), not the weights:
    Adam(W) turns a gradient at rounding level (a conv bias an instance norm cancels) into a step of
    about the learning rate whose sign depends on the summation order."""
    (losses, grads, state), (other_losses, other_grads, other_state) = reference, other
    assert other_losses == pytest.approx(losses, rel=rtol, abs=rtol)
    for step, (g, other_g) in enumerate(zip(grads, other_grads)):
        assert set(other_g) == set(g), step
        for key, value in g.items():
            error = float((other_g[key] - value).norm())
            assert error <= rtol * float(value.norm()) + 1e-6 * value.numel() ** 0.5, (step, key, error,
                                                                                      float(value.norm()))
    assert set(other_state) == set(state)
    for key, value in state.items():
        if key == "counts":  # codebook assignments: an argmin, a near tie may go the other way after rounding
            assert int(other_state[key].sum()) == int(value.sum())
            assert int((other_state[key] - value).abs().sum()) <= 2 * max(1, int(rtol * value.sum())), key
            continue
        torch.testing.assert_close(other_state[key], value, rtol=rtol, atol=rtol, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("name", MAIN_TRAINERS)
def test_compiled_training_steps_equal_eager_ones(nnunet_folders, name):  # noqa: F811
    _assert_same_training(_train(name), _train(name, lambda net: torch.compile(net, backend="aot_eager")), 1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nnUNetTrainer", *MAIN_TRAINERS])
def test_inductor_training_steps_equal_eager_ones(nnunet_folders, name):  # noqa: F811
    """nnU-Net's own compile call (``torch.compile(network)``: inductor) on the CPU: generated C++ instead
    of Triton, but the same decompositions, fusions and buffer handling. ``fallback_random``: inductor's own
    random numbers (the codebook's candidates) differ from eager's by design; the test wants the same ones.
    Dropout off in both runs: under torch 2.11 (the GPU machine's) ``fallback_random`` still draws the
    Transformer's attention-dropout masks in another order than eager (STD-Net's loss 1.3298 vs 1.3235 with
    dropout, equal to 1e-7 without); dropout itself is compared under ``aot_eager`` above."""
    import torch._inductor.config

    with torch._inductor.config.patch(fallback_random=True):
        compiled = _train(name, lambda network: torch.compile(_without_dropout(network)), steps=1)
    # one step: after it, the weights differ by rounding, which can move a codebook assignment (an argmin)
    _assert_same_training(_train(name, _without_dropout, steps=1), compiled, 1e-2)


def _without_dropout(network: torch.nn.Module) -> torch.nn.Module:
    for module in network.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        elif isinstance(module, torch.nn.MultiheadAttention):
            module.dropout = 0.0
    return network
