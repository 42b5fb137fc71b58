"""The one training loop, shared by pretraining and fine-tuning (full or LoRA).

`train(model, train_windows, val_windows, cfg, run)` runs `cfg.steps` optimizer steps of AdamW
(weight decay on matrices only: norms, biases and 1-D tensors get none) with linear warm-up then a
cosine decay to `min_lr_ratio * lr`, gradient accumulation, gradient-norm clipping and, with
`dtype="bf16"`, bf16 autocast (weights and optimizer stay fp32). Only parameters with
`requires_grad` are trained and checkpointed, so a LoRA run saves its adapter alone.

Loss normalisation is exact: each step's loss is the sum of token losses over every target token of
the global batch (all micro-batches, all ranks) divided by their count, so gradient accumulation and
any number of processes give the gradient one process would get for the whole batch, and masked
tokens (chat SFT) weigh nothing.

Data order: step s trains on windows [s*G, (s+1)*G) of the seeded order (G = batch * accum * world);
rank r takes rows r*batch .. of each micro-batch, reading only its own rows.

Determinism: with the same seed, data, thread count and world size, a run gives bit-identical
weights, and so does a run stopped at any moment and resumed from its newest checkpoint (model,
optimizer, scheduler, data position and every rank's RNG state are restored).

Every `eval_every` steps the validation loss and perplexity are measured (at most `eval_batches`
batches, the same windows each time); progress shows loss, tokens/s and ETA; log.csv/log.jsonl and
loss.png go into the run folder; checkpoints every `save_every` steps and at the end (rank 0 only).

Long runs: after the first steps the time per step is measured and the whole run's estimate printed
("200 steps, ~36 s/step: about 2 h; Ctrl-C saves and stops"). Ctrl-C (SIGINT, in the main thread)
stops at the end of the step in progress on every rank, saves a checkpoint there, and raises
`Interrupted` (a KeyboardInterrupt) naming it; a second Ctrl-C stops at once without saving.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from llmos.errors import LlmosError
from llmos.train import checkpoint, distributed
from llmos.train.data import Windows
from llmos.train.distributed import World
from llmos.train.log import RunLog


class Interrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C after saving `checkpoint` (None on ranks other than 0)."""

    def __init__(self, run: Path, step: int, checkpoint: Path | None) -> None:
        super().__init__(f"stopped at step {step}; saved {checkpoint}")
        self.run, self.step, self.checkpoint = run, step, checkpoint


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8  # rows per micro-batch, per process
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50  # steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 turns clipping off
    dtype: str = "fp32"  # "bf16": autocast matmuls to bf16
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 8  # global batches of validation windows per evaluation
    save_every: int = 100
    keep: int = 2  # complete checkpoints kept
    log_every: int = 10
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_every", "save_every", "log_every", "keep"):
            if int(getattr(self, name)) <= 0:
                raise LlmosError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.dtype not in ("fp32", "bf16"):
            raise LlmosError(f"dtype must be fp32 or bf16, got {self.dtype!r}")
        if not 0 < self.val_fraction < 1:
            raise LlmosError(f"val-fraction must be between 0 and 1, got {self.val_fraction}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr for the update after `step` updates: linear warm-up, then cosine."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = min((step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1), 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> tuple[torch.optim.AdamW, list[str]]:
    """AdamW over the trainable parameters: decay on matrices, none on vectors. Also their names,
    in the optimizer's order (checkpoints key the moments by them)."""
    decay, no_decay, names_d, names_n = [], [], [], []
    for name, p in model.named_parameters():  # tied weights appear once
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
        (names_d if p.dim() >= 2 else names_n).append(name)
    if not decay and not no_decay:
        raise LlmosError("the model has no trainable parameters")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    return opt, names_d + names_n


def autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    if cfg.dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def token_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Sum of the masked token cross-entropies (a scalar)."""
    T = x.shape[1]
    logits = model(x, torch.arange(T, device=x.device))  # (B, T, V)
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")  # (B*T,)
    return (ce * m.reshape(-1)).sum()


@torch.no_grad()
def evaluate(model: nn.Module, windows: Windows, cfg: TrainConfig, world: World) -> tuple[float, float]:
    """(mean loss, perplexity) over the first `eval_batches` global batches of validation windows
    (fewer if the split is smaller), shared out over the ranks: the same windows however many."""
    n = min(windows.n, cfg.eval_batches * cfg.batch_size * cfg.grad_accum * world.size)
    mine = list(range(world.rank, n, world.size))
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=world.device)
    for i in range(0, len(mine), cfg.batch_size):
        x, y, m = (t.to(world.device) for t in windows.rows(mine[i : i + cfg.batch_size]))
        with autocast(cfg, world.device):
            totals[0] += token_losses(model, x, y, m).double()
        totals[1] += m.sum().double()
    model.train(was_training)
    distributed.all_reduce_sum(totals)
    loss = (totals[0] / totals[1].clamp(min=1)).item()
    return loss, math.exp(min(loss, 50.0))


# --- checkpoint state ---------------------------------------------------------------------------

def _rng_tensor(device: torch.device) -> torch.Tensor:
    state = torch.get_rng_state()
    if device.type == "cuda":
        state = torch.cat([state, torch.cuda.get_rng_state(device)])
    return state


def _set_rng(state: torch.Tensor, device: torch.device) -> None:
    cpu_len = torch.get_rng_state().numel()
    torch.set_rng_state(state[:cpu_len].clone())
    if device.type == "cuda" and state.numel() > cpu_len:
        torch.cuda.set_rng_state(state[cpu_len:].clone(), device)


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    sd = opt.state_dict()
    tensors = {f"{i}.{k}": v for i, st in sd["state"].items() for k, v in st.items() if isinstance(v, torch.Tensor)}
    return tensors, sd["param_groups"]


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("rng."):
            continue
        i, _, name = key.partition(".")
        state.setdefault(int(i), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": groups})


def duration(seconds: float) -> str:
    """A rough human duration: "7 ms", "4.2 s", "36 s", "12 min", "2.5 h"."""
    if seconds < 1:
        return f"{seconds * 1000:.2g} ms" if seconds < 0.01 else f"{seconds * 1000:.0f} ms"
    if seconds < 10:
        return f"{seconds:.2g} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.2g} h" if seconds < 10 * 3600 else f"{seconds / 3600:.0f} h"


class _StopRequest:
    """SIGINT sets a flag the loop reads between steps (a step cut in half cannot be saved); the
    second SIGINT gets the previous handler, which raises KeyboardInterrupt at once. Installed only in
    the main thread, where Python delivers signals; elsewhere Ctrl-C is the caller's business."""

    def __init__(self, speak: bool) -> None:
        self.requested, self.speak, self.previous = False, speak, None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, None):  # ignored (nohup, &) or not Python's
            return
        self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)
        if self.speak:
            print("\nCtrl-C: saving a checkpoint after this step (Ctrl-C again to stop without saving)",
                  file=sys.stderr, flush=True)

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def agreed(self, world: World) -> bool:
        """Whether any rank was asked to stop (all ranks must stop at the same step)."""
        if world.size == 1:
            return self.requested
        flag = torch.tensor(float(self.requested), device=world.device)
        return bool(distributed.all_reduce_sum(flag) > 0)


class _Trainer:
    def __init__(self, model: nn.Module, cfg: TrainConfig, run: Path, world: World, extra_state: dict[str, Any]) -> None:
        self.model, self.cfg, self.run, self.world = model, cfg, run, world
        self.opt, self.param_names = make_optimizer(model, cfg)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, cfg))
        self.step, self.data_pos, self.tokens, self.elapsed = 0, 0, 0, 0.0
        self.extra_state = extra_state

    def trainable(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def restore(self, folder: Path) -> None:
        tensors, state = checkpoint.load(folder)
        params = self.trainable()
        saved = tensors.get("model.safetensors", {})
        if set(saved) != set(params) or state.get("param_names") != self.param_names:
            raise LlmosError(f"{folder} was written for other trainable parameters ({len(saved)} tensors for "
                             f"{len(params)}); resume with the run's own settings")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])
        opt_tensors = tensors.get("optimizer.safetensors", {})
        _load_optimizer(self.opt, opt_tensors, state["optimizer_groups"])
        self.sched.load_state_dict(state["scheduler"])
        self.step, self.data_pos = int(state["step"]), int(state["data_pos"])
        self.tokens, self.elapsed = int(state.get("tokens", 0)), float(state.get("elapsed_s", 0.0))
        rng = opt_tensors.get(f"rng.{self.world.rank}")
        if rng is not None and int(state.get("world_size", 1)) == self.world.size:
            _set_rng(rng, self.world.device)
        else:  # another number of processes: still seeded, though not the stream the run had
            torch.manual_seed(self.cfg.seed * 7919 + self.world.rank + 104729 * self.step)
        version, internal, gauss = state["python_rng"]  # JSON turned random.getstate()'s tuples into lists
        random.setstate((version, tuple(internal), gauss))

    def save(self) -> Path | None:
        rngs = distributed.all_gather(_rng_tensor(self.world.device))  # every rank takes part
        if not self.world.main:
            distributed.barrier()
            return None
        opt_tensors, groups = _optimizer_tensors(self.opt)
        opt_tensors.update({f"rng.{r}": t for r, t in enumerate(rngs)})
        state = {
            "step": self.step, "data_pos": self.data_pos, "tokens": self.tokens, "elapsed_s": self.elapsed,
            "world_size": self.world.size, "param_names": self.param_names, "optimizer_groups": groups,
            "scheduler": self.sched.state_dict(), "python_rng": random.getstate(), "train": asdict(self.cfg),
            **self.extra_state,
        }
        files = {"model.safetensors": self.trainable(), "optimizer.safetensors": opt_tensors}
        folder = checkpoint.save(self.run, self.step, files, state, keep=self.cfg.keep)
        distributed.barrier()
        return folder


def train(
    model: nn.Module,
    train_windows: Windows,
    val_windows: Windows | None,
    cfg: TrainConfig,
    run: Path,
    world: World,
    *,
    resume_from: Path | None = None,
    progress: bool = True,
    extra_state: dict[str, Any] | None = None,
    on_eval: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train `model` in place (on world.device) and return the last logged metrics."""
    run = Path(run)
    if world.main:
        run.mkdir(parents=True, exist_ok=True)
    model.to(world.device).train()
    if resume_from is None:
        torch.manual_seed(cfg.seed * 7919 + world.rank)  # dropout (LoRA) noise differs per rank
        random.seed(cfg.seed)
    trainer = _Trainer(model, cfg, run, world, extra_state or {})
    if resume_from is not None:
        trainer.restore(resume_from)
    log = RunLog(run, resume_step=trainer.step) if world.main else None
    net: nn.Module = model
    if world.size > 1:
        ids = [world.device.index] if world.device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    B, A, W = cfg.batch_size, cfg.grad_accum, world.size
    rows_per_step = B * A * W
    bar = tqdm(total=cfg.steps, initial=trainer.step, unit="step", dynamic_ncols=True,
               disable=not (progress and world.main), desc=run.name)
    last: dict[str, Any] = {}
    window_t0, window_tokens = time.perf_counter(), 0
    saved_at = first_step = trainer.step
    saved: Path | None = None
    estimated = not (progress and world.main)
    stop = _StopRequest(speak=world.main)
    try:
        stop.install()
        while trainer.step < cfg.steps:
            t0 = time.perf_counter()
            micro = [
                train_windows.batch(trainer.data_pos + a * W * B + world.rank * B, B) for a in range(A)
            ]
            count = distributed.all_reduce_sum(torch.tensor(sum(float(m.sum()) for _, _, m in micro), device=world.device))
            count = count.clamp(min=1.0)
            loss_sum = torch.zeros((), device=world.device)
            for a, (x, y, m) in enumerate(micro):
                x, y, m = x.to(world.device), y.to(world.device), m.to(world.device)
                sync = a == A - 1 or W == 1
                with (contextlib.nullcontext() if sync else net.no_sync()), autocast(cfg, world.device):
                    loss = token_losses(net, x, y, m) / count
                # DDP averages gradients over ranks; the loss is already a share of the global mean.
                (loss * W).backward()
                loss_sum += loss.detach()
            grad_norm = None
            if cfg.grad_clip > 0:
                params = [p for group in trainer.opt.param_groups for p in group["params"]]
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            lr = trainer.opt.param_groups[0]["lr"]
            trainer.opt.step()
            trainer.sched.step()
            trainer.opt.zero_grad(set_to_none=True)
            trainer.step += 1
            trainer.data_pos += rows_per_step
            step_tokens = rows_per_step * cfg.seq_len
            trainer.tokens += step_tokens
            trainer.elapsed += time.perf_counter() - t0
            window_tokens += step_tokens
            train_loss = float(distributed.all_reduce_sum(loss_sum))
            if not math.isfinite(train_loss):
                raise LlmosError(f"training diverged at step {trainer.step} (loss {train_loss}); lower --lr or use --dtype fp32")

            row: dict[str, Any] | None = None
            final = trainer.step == cfg.steps
            evaluating = val_windows is not None and (trainer.step % cfg.eval_every == 0 or final)
            if trainer.step % cfg.log_every == 0 or final or evaluating:
                now = time.perf_counter()
                tps = window_tokens / max(now - window_t0, 1e-9)
                window_t0, window_tokens = now, 0
                row = {"step": trainer.step, "tokens": trainer.tokens, "lr": lr, "train_loss": train_loss,
                       "grad_norm": grad_norm, "tok_per_s": tps, "elapsed_s": trainer.elapsed}
                bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
            if evaluating:
                assert row is not None and val_windows is not None
                val_loss, ppl = evaluate(model, val_windows, cfg, world)
                row.update(val_loss=val_loss, val_ppl=ppl)
                bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{val_loss:.3f}", ppl=f"{ppl:.1f}", refresh=False)
                if on_eval is not None:
                    on_eval(row)
                window_t0 = time.perf_counter()  # evaluation time is not training throughput
            if row is not None:
                last = row
                if log is not None:
                    log.write(row)
                    if "val_loss" in row:
                        log.plot()
            if trainer.step % cfg.save_every == 0 or final:
                saved = trainer.save()
                saved_at = trainer.step
            bar.update(1)
            step_s, done = time.perf_counter() - t0, trainer.step - first_step
            # The first step pays one-off costs, so measure the second, unless the first was long.
            if not estimated and not final and (done == 2 or (done == 1 and step_s > 10)):
                todo = cfg.steps - first_step
                bar.write(f"{todo} steps{f' from step {first_step}' if first_step else ''}, ~{duration(step_s)}/step: "
                          f"about {duration(step_s * todo)}; Ctrl-C saves and stops", file=sys.stderr)
                estimated = True
            if not final and stop.agreed(world):
                if saved_at != trainer.step:
                    saved = trainer.save()
                raise Interrupted(run, trainer.step, saved if world.main else None)
    finally:
        stop.restore()
        bar.close()
    if saved_at != trainer.step:  # e.g. resumed at the final step: nothing ran, nothing to save
        trainer.save()
    if log is not None:
        log.plot()
    return {**last, "step": trainer.step, "tokens": trainer.tokens}
