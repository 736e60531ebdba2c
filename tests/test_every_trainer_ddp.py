"""Every trainer of the package trains under DDP without unused-parameter errors, on a dataset with
case labels and on one without (LiTS, MSD: the common case).

nnU-Net wraps the network in DDP without ``find_unused_parameters``: a parameter that gets no gradient
in one step fails the next step with "Expected to have finished reduction in the prior iteration".
A one-process gloo group is enough to see it. The list of trainers is the catalogue's (every method
and variant of every trainer module), so a method added later is covered without editing this test.
Trainers are built as ``nnUNetv2_train`` builds them (``get_trainer_from_args`` then ``initialize``,
with the deep-supervision weights nnU-Net uses under DDP) and take three real train steps.

Two processes (issue 14, item 1): each rank steps on its half of a batch; both ranks end with identical
parameters, and the gradients applied equal one process's on the whole batch, the case-level terms
included, whose qualifying samples (a label, tumor in the patch) are spread unevenly over the ranks.
"""
import copy
import os

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunet_liver_ext.catalogue import load_catalogue
from nnunet_liver_ext.training.multitask_trainer import LiverMultiTaskTrainer
from nnunet_liver_ext.training.optim import HybridOptimizer

from test_mti_net_trainer import DATASET_JSON, GlooGroup, make_batch, make_trainer, nnunet_folders  # noqa: F401

torch.set_num_threads(1)

WITHOUT_CASE_LABELS = {k: v for k, v in DATASET_JSON.items() if k not in ("characterization", "enhancement")}


def _our_trainers():
    catalogue = load_catalogue()
    assert not catalogue.errors, catalogue.errors
    return [e.name for e in catalogue.bases()]


@pytest.mark.parametrize("labelled", [True, False], ids=["with_case_labels", "without_case_labels"])
@pytest.mark.parametrize("name", _our_trainers())
def test_every_trainer_trains_under_ddp(nnunet_folders, name, labelled):  # noqa: F811
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    trainer_class = recursive_find_trainer_class_by_name(name)
    dataset_json = DATASET_JSON if labelled else WITHOUT_CASE_LABELS
    if issubclass(trainer_class, LiverMultiTaskTrainer):
        if any(key not in dataset_json for key in trainer_class.dataset_keys_required):
            pytest.skip(f"{name} refuses a dataset without {trainer_class.dataset_keys_required}")
        if "phases" in trainer_class.dataset_keys_required and "phases" not in dataset_json:
            pytest.skip(f"{name} needs phases")
    trainer = make_trainer(name, copy.deepcopy(dataset_json))
    group = GlooGroup()
    try:
        # as nnUNetTrainer.initialize does under DDP: the coarsest deep-supervision output keeps weight 1e-6
        trainer.is_ddp = True
        trainer.loss = trainer._build_loss()
        network = trainer.network
        trainer.network = DDP(network)
        for _ in range(3):
            result = trainer.train_step(make_batch(trainer))
        assert torch.isfinite(torch.as_tensor(result["loss"]))
        if labelled is False and hasattr(network, "cls_head"):
            assert network.cls_head is None
    finally:
        group.close()


# ---------------------------------------------------------------------------------------------------------------
# Two processes: what DDP averages is what one process computes on the union of the ranks' batches.

UNION_KEYS = ["a", "b", "c", "d"]  # d: no case label; its patch also has no tumor
RANK_SAMPLES = {0: [0, 1], 1: [2, 3]}  # rank 0: two qualifying samples for the case terms, rank 1: one
GRAD_RTOL = 1e-4  # per tensor, relative to the reference gradient's norm (fp32 sums in another order)


def _union_batch(trainer) -> dict:
    """Four samples of nnU-Net's layout that differ from each other: tumor in the first three patches only."""
    from test_mti_net_trainer import PATCH

    generator = torch.Generator().manual_seed(7)
    label = torch.zeros(len(UNION_KEYS), 1, *PATCH)
    for i in range(len(UNION_KEYS)):
        label[i, :, 2 + i:14, 4:28 - i, 4 + i:28] = 1
        if i < 3:
            label[i, :, 5:11, 10 + i:20, 8 + 2 * i:18 + i] = 2
    channels = trainer.num_input_channels
    contrast = torch.linspace(0.5, 2.0, channels).view(1, channels, 1, 1, 1)
    data = torch.randn(len(UNION_KEYS), channels, *PATCH, generator=generator) + label * contrast
    targets = [torch.nn.functional.interpolate(label, size=[round(p * s) for p, s in zip(PATCH, scale)],
                                               mode="nearest")
               for scale in trainer._get_deep_supervision_scales()]
    return {"data": data, "target": targets, "keys": list(UNION_KEYS)}


def _part(batch: dict, samples: list) -> dict:
    return {"data": batch["data"][samples], "target": [t[samples] for t in batch["target"]],
            "keys": [batch["keys"][i] for i in samples]}


def _deterministic(trainer) -> None:
    """Removes the only randomness that differs between a union batch and its parts: dropout masks, and
    the codebook's initialisation from the first batch's features (kept at its seeded random codes)."""
    for module in trainer.network.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        if isinstance(module, torch.nn.MultiheadAttention):
            module.dropout = 0.0
        if isinstance(getattr(module, "initialized", None), torch.Tensor):
            module.initialized.fill_(True)


def _step_recording_gradients(trainer, batch: dict) -> list:
    """One real train_step; the gradients each optimizer step applied (after clipping), by parameter name."""
    from nnunet_liver_ext.networks.contract import unwrap_network

    names = {id(p): n for n, p in unwrap_network(trainer.network).named_parameters()}
    applied = []
    # the trainer's optimizer and any it steps on its own (MTI-Net's discriminator Adam)
    optimizers = {id(o): o for o in vars(trainer).values() if isinstance(o, (torch.optim.Optimizer, HybridOptimizer))}

    def recording(optimizer):
        step = optimizer.step

        def recording_step(*args, **kwargs):
            grads = {names[id(p)]: p.grad.detach().clone()
                     for group in optimizer.param_groups for p in group["params"] if p.grad is not None}
            if grads:  # the discriminator's Adam inside the hybrid optimizer idles in the generator step
                applied.append(grads)
            return step(*args, **kwargs)
        return recording_step

    for optimizer in optimizers.values():
        optimizer.step = recording(optimizer)
    try:
        trainer.train_step(batch)
    finally:
        for optimizer in optimizers.values():
            del optimizer.step
    return applied


def _two_rank_worker(rank: int, world: int, port: int, names: list, out_dir: str) -> None:
    """Runs in each spawned process. The trainers are built before the process group exists (nnU-Net's
    __init__ would pick CUDA under DDP); rank 0 also steps an undistributed twin on the union batch."""
    import json

    torch.set_num_threads(1)
    trainers, references = {}, {}
    for name in names:
        trainer = make_trainer(name)
        trainer.is_ddp = True  # the DDP loss (coarsest deep-supervision weight 1e-6), in both runs
        trainer.loss = trainer._build_loss()
        _deterministic(trainer)
        if rank == 0:
            twin = make_trainer(name)
            twin.is_ddp = True
            twin.loss = twin._build_loss()
            twin.is_ddp = False
            _deterministic(twin)
            references[name] = _step_recording_gradients(twin, _union_batch(twin))
            del twin
        trainers[name] = trainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    report = {}
    try:
        for name, trainer in trainers.items():
            network = trainer.network
            trainer.network = DDP(network)
            applied = _step_recording_gradients(trainer, _part(_union_batch(trainer), RANK_SAMPLES[rank]))
            differ = []
            for n, p in network.named_parameters():
                rank0 = p.detach().clone()
                dist.broadcast(rank0, 0)
                if not torch.equal(rank0, p.detach()):
                    differ.append(n)
            entry = {"params_differing_from_rank0": differ, "steps": len(applied)}
            if rank == 0:
                reference = references[name]
                entry["reference_steps"] = len(reference)
                worst = {}
                for mine, ref in zip(applied, reference):
                    if set(mine) != set(ref):
                        worst["<parameters with a gradient differ>"] = sorted(set(mine) ^ set(ref))[:5]
                        continue
                    # gradients that are zero in exact arithmetic (a bias before instance norm or a softmax
                    # over tokens) are rounding noise on both sides: measured against the step's largest
                    noise = GRAD_RTOL * max(float(r.norm()) for r in ref.values())
                    for n, g in mine.items():
                        err = float((g - ref[n]).norm())
                        if err > GRAD_RTOL * float(ref[n].norm()) + noise:
                            worst[n] = err / float(ref[n].norm().clamp_min(1e-12))
                entry["gradients_off"] = dict(sorted(worst.items(), key=lambda kv: -kv[1]
                                                     if isinstance(kv[1], float) else 0)[:5])
                entry["checked_tensors"] = sum(len(m) for m in applied)
            report[name] = entry
            trainer.network = network
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


@pytest.fixture(scope="module")
def two_rank_report(nnunet_folders, tmp_path_factory):  # noqa: F811
    """Every catalogue trainer that takes the labelled test dataset, one train step each in two gloo processes."""
    import json
    import socket

    import torch.multiprocessing as mp

    entries = load_catalogue().entries
    names = [name for name in _our_trainers() if all(k in DATASET_JSON for k in entries[name].keys_required)]
    out = tmp_path_factory.mktemp("ddp2")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_rank_worker, args=(2, port, names, str(out)), nprocs=2, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("name", _our_trainers())
def test_every_trainer_two_processes_match_one_process_on_the_union_batch(two_rank_report, name):
    """Two gloo ranks, each with half of a four-sample batch in which the samples that count for the case
    terms (a label, tumor in the patch) are spread 2 / 1: after one step both ranks hold identical
    parameters, and the gradients every optimizer step applied equal those of one undistributed process on
    the whole batch, case-level terms included (tolerance GRAD_RTOL per tensor)."""
    rank0, rank1 = two_rank_report
    if name not in rank0:
        pytest.skip(f"{name} refuses the test dataset")
    for rank, entry in enumerate((rank0[name], rank1[name])):
        assert entry["params_differing_from_rank0"] == [], f"rank {rank}: {entry['params_differing_from_rank0'][:5]}"
        assert entry["steps"] >= 1
    assert rank0[name]["steps"] == rank0[name]["reference_steps"]
    assert rank0[name]["gradients_off"] == {}, rank0[name]["gradients_off"]
    assert rank0[name]["checked_tensors"] > 0
