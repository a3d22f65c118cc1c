"""The one training loop, run by every Ray Train worker (`train_loop_per_worker(config)`).

Each worker streams its shard of the train split (`ray.train.get_dataset_shard`), trains through the
engine of the configured strategy, validates on its shard of the val split (sums all-reduced, so
every rank sees the same metrics and takes the same early-stopping decision), exports the best
epoch's model, and reports metrics with a checkpoint each epoch:

    <run>/checkpoint_epochNNNN/deepspeed/state/*   DeepSpeed files of every rank (ZeRO shards)
    <run>/checkpoint_epochNNNN/train_state.json    epoch, step, best metric, history (rank 0)
    <run>/model/                                   export of the best epoch (medfusion.export)

The driver (medfusion.training.run) hands every worker a `TrainJob`, as a plain dict because that is
what Ray Train's `train_loop_config` carries.

On start it resumes from `ray.train.get_checkpoint()`: the newest checkpoint of this run, whether
the worker group was restarted after a crash (FailureConfig) or the run was started again with the
same name (`--resume`). An epoch interrupted by a crash is run again from its start, so the final
step count equals an undisturbed run's.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import tempfile
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from medfusion import storage
from medfusion.config import ObjectiveConfig, TrainConfig
from medfusion.loader import load_config
from medfusion.training.engine import Engine, build_engine

TRAIN_STATE_FILE = "train_state.json"
EXPORT_DIR = "model"
FAULT_MARKER = ".fault_injected"
CHECKPOINT_PREFIX = "checkpoint_epoch"
STATE_KEY = "medfusion"  # our part of the engine checkpoint's client state


def checkpoint_name(epoch: int) -> str:
    return f"{CHECKPOINT_PREFIX}{epoch:04d}"


@dataclass
class TrainJob:
    """What the driver hands every worker of one run."""

    train: dict[str, Any]
    """The TrainConfig as a dict (medfusion.loader.to_dict); each worker loads it back."""
    run_uri: str
    """The run folder <storage_uri>/<name>."""
    steps_per_epoch: int
    """Optimizer steps per epoch: the span of the learning-rate schedule is this times the epochs."""
    micro_batches_per_epoch: int
    """Micro-batches each worker runs per epoch (the same on every rank, so no collective waits)."""
    lineage: dict[str, Any] = field(default_factory=dict)
    """medfusion.lineage record of the run, written into every export."""
    objective: dict[str, Any] = field(default_factory=dict)
    """ObjectiveConfig fields, the weights of val_objective (default weights when empty)."""
    threads: int = 0
    """torch threads per worker; 0: one per reserved CPU."""
    bench: dict[str, int] | None = None
    """Benchmark mode ({warmup_steps, steps}): one epoch of training only, the first warmup_steps untimed."""

    def to_dict(self) -> dict[str, Any]:
        """The job as Ray Train's `train_loop_config` carries it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> TrainJob:
        """The job back from a worker's `train_loop_config`."""
        return cls(**config)


@dataclass
class TrainingState:
    """What a checkpoint carries besides the engine's tensors (JSON-able)."""

    epoch: int = 0
    """The next epoch to run."""
    best: float | None = None
    best_epoch: int = -1
    best_loss: float | None = None
    """val_loss of the best epoch: a tie on the selection metric goes to the lower loss."""
    bad_epochs: int = 0
    stopped_early: bool = False
    history: list[dict[str, float]] = field(default_factory=list)

    def improved(self, value: float, mode: str, loss: float | None = None) -> bool:
        if not np.isfinite(value):
            return False
        if self.best is None:
            return True
        if value == self.best and loss is not None and self.best_loss is not None:
            # Accuracy saturates early while the boxes and the text still improve: on a tie the
            # lower val_loss marks the better model.
            return loss < self.best_loss
        return value < self.best if mode == "min" else value > self.best

    def record(
        self, epoch: int, value: float, mode: str, patience: int, epochs: int, loss: float | None = None
    ) -> bool:
        """Account for a finished epoch's selection metric (and its val_loss, which breaks ties);
        return whether it is the new best."""
        better = self.improved(value, mode, loss)
        if better:
            self.best, self.best_epoch, self.best_loss, self.bad_epochs = value, epoch, loss, 0
        else:
            self.bad_epochs += 1
        self.epoch = epoch + 1
        self.stopped_early = bool(patience) and self.bad_epochs >= patience and self.epoch < epochs
        return better


def _world() -> tuple[int, int]:
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def _several_ranks() -> bool:
    """Whether a process group of more than one rank is up (collectives are needed)."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if _several_ranks():
        torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _inject_fault(cfg: TrainConfig, run_uri: str, step: int, rank: int, world: int) -> None:
    """Testing aid: the last rank SIGKILLs itself once, at global step `cfg.fault_inject_step`."""
    if not cfg.fault_inject_step or step != cfg.fault_inject_step or rank != world - 1:
        return
    marker = storage.join(run_uri, FAULT_MARKER)
    if storage.exists(marker):
        return
    storage.write_text(marker, f"rank {rank} killed itself at step {step}\n")
    print(f"[medfusion] fault injection: rank {rank} sends SIGKILL to itself at global step {step}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def _train_epoch(engine: Engine, cfg: TrainConfig, job: TrainJob, epoch: int) -> dict[str, float]:
    """One pass over this worker's shard (capped at `micro_batches`), timing the data wait."""
    import ray.train

    rank, world = _world()
    micro_batches = job.micro_batches_per_epoch
    bench = job.bench
    sync = engine.device.type == "cuda" and bench is not None
    warmup = bench["warmup_steps"] * cfg.grad_accum if bench else 0
    shard = ray.train.get_dataset_shard("train")
    batches = shard.iter_batches(
        batch_size=cfg.data.batch_size,
        prefetch_batches=cfg.data.columns_prefetch,
        local_shuffle_buffer_size=cfg.shuffle_buffer or None,
        local_shuffle_seed=cfg.seed + epoch + 7919 * rank if cfg.shuffle_buffer else None,
    )
    engine.train(True)
    sums: dict[str, float] = {}
    samples = timed_samples = 0
    data_wait = step_time = 0.0
    iterator = iter(batches)
    for micro in range(micro_batches):
        start = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            break
        fetched = time.perf_counter()
        parts = engine.train_step(batch)
        if sync:
            torch.cuda.synchronize(engine.device)
        done = time.perf_counter()
        size = len(batch["image"])
        samples += size
        for name, value in parts.items():
            sums[name] = sums.get(name, 0.0) + float(value) * size
        if micro >= warmup:
            timed_samples += size
            data_wait += fetched - start
            step_time += done - start
        if (micro + 1) % cfg.grad_accum == 0:
            step = engine.global_step
            if rank == 0 and not bench and cfg.log_every_steps and step % cfg.log_every_steps == 0:
                print(
                    f"[medfusion] epoch {epoch} step {step} ({(micro + 1) // cfg.grad_accum}/"
                    f"{micro_batches // cfg.grad_accum}) loss {float(parts.get('total', float('nan'))):.4f}",
                    flush=True,
                )
            _inject_fault(cfg, job.run_uri, step, rank, world)
    totals = _all_reduce_sum([samples, *sums.values()], engine.device)
    metrics = {
        f"train_{name}_loss" if name != "total" else "train_loss": v / max(totals[0], 1)
        for name, v in zip(sums, totals[1:], strict=True)
    }
    metrics.update(
        samples_per_s=world * timed_samples / step_time if step_time else 0.0,  # all workers (equal shards)
        data_wait_share=data_wait / step_time if step_time else 0.0,
    )
    if bench is not None:
        metrics.update(
            timed_samples=timed_samples,
            timed_s=step_time,
            data_wait_s=data_wait,
            peak_memory_mib=_peak_memory_mib(engine.device),
        )
    return metrics


def _all_gather(value: Any) -> list[Any]:
    """Every rank's `value` in rank order (just [value] on one worker)."""
    if _several_ranks():
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, value)
        return gathered
    return [value]


@torch.no_grad()
def _validate(engine: Engine, cfg: TrainConfig, tokenizer: Any, objective: ObjectiveConfig) -> dict[str, float]:
    """Losses, accuracy, macro AUROC, mean IoU, BLEU-4 of greedy findings and the objective on the
    val split. Sums are all-reduced; AUROC and BLEU need the whole split, so every rank gathers the
    (small) per-sample scores and texts and computes the same numbers."""
    import ray.train

    from medfusion.metrics import classification_metrics, corpus_bleu, objective_value
    from medfusion.models import cxcywh_to_xyxy, finding_boxes, paired_iou, to_tensors

    engine.train(False)
    _, world = _world()
    # ZeRO-3 gathers parameters collectively at every decoder step: all ranks decode max_len steps.
    early_exit = not (cfg.strategy == "deepspeed" and cfg.zero_stage == 3 and world > 1)
    decoder_dtype = next(engine.module.decoder.parameters()).dtype
    names = ("total", "cls", "box", "text")
    sums = np.zeros(len(names) + 4)  # loss parts..., samples, correct, iou sum, boxes
    probs, labels, generated, references = [], [], [], []
    shard = ray.train.get_dataset_shard("val")
    for batch in shard.iter_batches(batch_size=cfg.data.batch_size):
        tensors = to_tensors(batch, engine.device)
        out = engine.forward(tensors)
        _, parts = engine.module.loss(tensors, out)
        size = len(batch["image"])
        sums[: len(names)] += [float(parts.get(n, torch.tensor(0.0))) * size for n in names]
        if engine.module.multi_label:
            correct = ((out["logits"] > 0) == (tensors["labels"] > 0.5)).all(dim=1)
            probs.append(torch.sigmoid(out["logits"]).cpu().numpy())
        else:
            correct = out["logits"].argmax(dim=1) == tensors["labels"].argmax(dim=1)
            probs.append(torch.softmax(out["logits"], dim=1).cpu().numpy())
        labels.append(tensors["labels"].cpu().numpy())
        # Each finding's own box against the box the model gives that class (clamped to the image as
        # the predictor does, so val IoU matches evaluation's per-class IoU).
        target, has_box = finding_boxes(tensors)
        has_box = has_box > 0.5
        pred_box = cxcywh_to_xyxy(out["class_boxes"][has_box]).clamp(0.0, 1.0)
        iou = paired_iou(pred_box, target[has_box].float())[0] if has_box.any() else torch.zeros(0)
        sums[len(names) :] += [size, float(correct.sum()), float(iou.sum()), float(has_box.sum())]
        if engine.module.describes:
            ids = engine.module.decoder.greedy(
                out["regions"].to(decoder_dtype),
                out["context"].to(decoder_dtype),
                cfg.model.max_decode_len,
                early_exit=early_exit,
            )  # (B, max_len)
            generated += [tokenizer.decode(row) for row in ids.cpu().numpy()]
            references += [str(text) for text in batch["findings"]]
    totals = _all_reduce_sum(sums.tolist(), engine.device)
    n, correct, iou_sum, boxes = totals[len(names) :]
    metrics = {
        "val_loss" if name == "total" else f"val_{name}_loss": totals[i] / max(n, 1) for i, name in enumerate(names)
    }
    if not engine.module.describes:
        metrics["val_text_loss"] = float("nan")  # no decoder loss (no findings text): undefined, not 0
    metrics["val_accuracy"] = correct / max(n, 1)
    metrics["val_mean_iou"] = iou_sum / boxes if boxes else float("nan")
    ranks = _all_gather((probs, labels, generated, references))
    all_probs = [p for rank in ranks for p in rank[0]]
    if all_probs:
        all_labels = np.concatenate([y for rank in ranks for y in rank[1]])
        scores = classification_metrics(np.concatenate(all_probs), all_labels, engine.module.multi_label)
        metrics["val_auroc_macro"] = scores["auroc_macro"]
    else:
        metrics["val_auroc_macro"] = float("nan")
    references = [t for rank in ranks for t in rank[3]]
    # No findings to compare with (a dataset without them): undefined, not 0.
    metrics["val_bleu4"] = (
        corpus_bleu([t for rank in ranks for t in rank[2]], references)
        if any(t.strip() for t in references)
        else float("nan")
    )
    metrics["val_objective"] = objective_value(
        metrics, objective.weights, objective.classification_metric, prefix="val_"
    )
    metrics["val_samples"] = n
    return metrics


def _export_best(engine: Engine, cfg: TrainConfig, job: TrainJob, metrics: dict[str, float], rank: int) -> None:
    """Export the current weights as the run's best model (gathering ZeRO-3 shards on every rank)."""
    from medfusion.data.dataset import open_dataset
    from medfusion.export import export_model
    from medfusion.models import build_model

    state = engine.full_state_dict()
    if rank != 0:
        return
    info = open_dataset(cfg.dataset_uri)
    model = build_model(cfg.model, len(info.tokenizer), len(info.classes))
    model.load_state_dict(state)
    export_model(
        model.eval(),
        storage.join(job.run_uri, EXPORT_DIR),
        tokenizer=info.tokenizer,
        classes=info.classes,
        data_settings=cfg.data,
        metrics=metrics,
        lineage={**job.lineage, "epoch": metrics["epoch"], "global_step": metrics["global_step"]},
    )


def _report(engine: Engine, state: TrainingState, metrics: dict[str, float], rank: int) -> None:
    """Every rank writes its checkpoint part to a local folder; Ray Train uploads them into one."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="medfusion-ckpt-") as folder:
        engine.save(folder, {STATE_KEY: asdict(state)})
        if rank == 0:
            with open(os.path.join(folder, TRAIN_STATE_FILE), "w") as f:
                json.dump({**asdict(state), "global_step": engine.global_step}, f, indent=2)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(folder),
            checkpoint_dir_name=checkpoint_name(int(metrics["epoch"])),
        )
    # The controller registers a reported checkpoint a little later; a crash in between would make
    # a restart (or --resume) go back one more epoch. Wait until it is committed to the run.
    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """The Ray Train worker function.

    Args:
        config: a `TrainJob` as a dict (`TrainJob.to_dict`).

    Returns:
        History, step count, best epoch and early-stop flag of the run (what rank 0's return value
        gives the driver); in benchmark mode the timed metrics of the one epoch.
    """
    import ray.train

    from medfusion.data.dataset import open_dataset
    from medfusion.models import build_model
    from medfusion.models.backbones import load_image_weights

    job = TrainJob.from_dict(config)
    cfg = load_config(TrainConfig, base=job.train)
    objective = load_config(ObjectiveConfig, base=job.objective)
    # Ray Data hands out read-only views of its object store, which torch warns about once per
    # worker; the model never writes to its inputs.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
    rank, world = _world()
    torch.set_num_threads(job.threads or max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed)
    info = open_dataset(cfg.dataset_uri)
    model = build_model(cfg.model, len(info.tokenizer), len(info.classes))
    if cfg.model.image_init_uri:  # the user's image weights; a resumed run's checkpoint replaces them
        load_image_weights(model.image_encoder, cfg.model.image_init_uri)
    engine = build_engine(model, cfg, total_steps=job.steps_per_epoch * cfg.epochs)
    bench = job.bench

    # Where every rank runs (a restart after a lost node lands on other nodes): printed and returned.
    worker_nodes = _all_gather(ray.get_runtime_context().get_node_id())
    if rank == 0 and not bench:
        print(
            "[medfusion] workers on nodes: "
            + ", ".join(f"rank {r} {n}" for r, n in enumerate(worker_nodes))
            + f" (run {cfg.name})",
            flush=True,
        )

    state = TrainingState()
    checkpoint = None if bench else ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = TrainingState(**engine.load(folder)[STATE_KEY])
        print(
            f"[medfusion] rank {rank}: resumed at epoch {state.epoch}, global step {engine.global_step} "
            f"(run {cfg.name})",
            flush=True,
        )

    mode = cfg.mode
    for epoch in range(state.epoch, 1 if bench else cfg.epochs):
        torch.manual_seed(cfg.seed + 1009 * epoch + rank)  # modality dropout: reproducible, distinct per rank
        started = time.perf_counter()
        metrics: dict[str, float] = {"epoch": epoch, **_train_epoch(engine, cfg, job, epoch)}
        if bench:
            return {**metrics, "global_step": engine.global_step, "world_size": world}
        metrics.update(_validate(engine, cfg, info.tokenizer, objective))
        metrics.update(global_step=engine.global_step, lr=engine.lr, epoch_s=time.perf_counter() - started)
        value = metrics[cfg.select_metric]
        if state.record(epoch, value, mode, cfg.patience, cfg.epochs, loss=metrics["val_loss"]):
            _export_best(engine, cfg, job, metrics, rank)
        metrics.update(best=state.best if state.best is not None else float("nan"), best_epoch=state.best_epoch)
        state.history.append(metrics)
        if rank == 0:
            print(
                f"[medfusion] epoch {epoch}: step {engine.global_step} train_loss {metrics['train_loss']:.4f} "
                f"val_loss {metrics['val_loss']:.4f} val_accuracy {metrics['val_accuracy']:.4f} "
                f"val_mean_iou {metrics['val_mean_iou']:.4f} val_bleu4 {metrics['val_bleu4']:.4f} "
                f"val_objective {metrics['val_objective']:.4f} lr {metrics['lr']:.2e} "
                f"{metrics['samples_per_s']:.1f} samples/s data wait {100 * metrics['data_wait_share']:.1f}%",
                flush=True,
            )
        _report(engine, state, metrics, rank)
        if state.stopped_early:
            if rank == 0:
                print(
                    f"[medfusion] early stop: no {cfg.select_metric} improvement in {cfg.patience} epochs", flush=True
                )
            break
    return {
        "history": state.history,
        "global_step": engine.global_step,
        "epochs_run": state.epoch,
        "best": state.best,
        "best_epoch": state.best_epoch,
        "stopped_early": state.stopped_early,
        "world_size": world,
        "worker_nodes": worker_nodes,
    }
