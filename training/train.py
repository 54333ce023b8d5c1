"""`nmt-train`: the training loop.

Run directory (`--out`):
    spm.model          the joint SentencePiece vocabulary
    last/              resumable checkpoint (weights + optimizer, schedule, RNG, loop position)
    best/              best validation BLEU so far
    epochs/            weights of the last `--average-last` epochs
    averaged/          their element-wise mean (the paper's checkpoint averaging)
    final/             the better of best/ and averaged/ on validation BLEU: the model to ship
    metrics.jsonl, curves.png

Distributed: `torchrun --nproc_per_node N -m nmt.training.train ...` (gloo on CPU, nccl on CUDA);
every rank sees the same shuffled batch list and takes every N-th batch.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import distributed as dist
from .checkpoint import (
    CheckpointMeta,
    InferenceSettings,
    average_weights,
    load_checkpoint,
    read_train_state,
    write_checkpoint,
)
from .cli import TrainConfig, parse_config
from .cpu import cpu_has_fast_bf16, cpu_summary
from .data import DataError, ParallelCorpus, multi30k, read_parallel, token_batches
from .evaluate import SearchOptions, score, translate
from .examples import Examples, encode_corpus, make_batch
from .model import Transformer
from .optim import (
    load_optimizer_state,
    load_rng_state,
    make_optimizer,
    noam_lr,
    optimizer_state,
    rng_state,
    smoothed_loss,
)
from .output_loss import projected_cross_entropy
from .report import append_jsonl, plot_curves, read_jsonl
from .tokenizer import MODEL_FILENAME, PAD_ID, Tokenizer

log = logging.getLogger("nmt.train")


def load_corpora(cfg: TrainConfig) -> tuple[ParallelCorpus, ParallelCorpus]:
    if cfg.train_files:
        train, valid = read_parallel(*cfg.train_files), read_parallel(*cfg.valid_files)
    else:
        train = multi30k("train", cfg.src_lang, cfg.tgt_lang, cfg.data_dir)
        valid = multi30k("val", cfg.src_lang, cfg.tgt_lang, cfg.data_dir)
    if cfg.train_limit:
        train = ParallelCorpus(train.src[: cfg.train_limit], train.tgt[: cfg.train_limit])
    if cfg.valid_limit:
        valid = ParallelCorpus(valid.src[: cfg.valid_limit], valid.tgt[: cfg.valid_limit])
    return train, valid


def prepare_run_dir(cfg: TrainConfig) -> None:
    out = cfg.out_dir
    if cfg.resume:
        if not (out / "last").is_dir():
            raise DataError(f"cannot resume: {out / 'last'} does not exist")
        return
    if out.exists() and any(out.iterdir()):
        if not cfg.force:
            raise DataError(f"run directory {out} is not empty; pass --force to replace it or --resume to continue")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def prepare_tokenizer(cfg: TrainConfig, train: ParallelCorpus, ctx: dist.Context) -> Tokenizer:
    path = cfg.out_dir / MODEL_FILENAME
    if ctx.is_main and not path.exists():
        if cfg.tokenizer:
            shutil.copyfile(cfg.tokenizer, path)
        else:
            Tokenizer.train(train.src + train.tgt, path, cfg.model.vocab_size)
    ctx.barrier()
    tokenizer = Tokenizer.load(path)
    if tokenizer.vocab_size != cfg.model.vocab_size:
        raise DataError(
            f"tokenizer {path} has {tokenizer.vocab_size} pieces, but --vocab-size is {cfg.model.vocab_size}"
        )
    return tokenizer


def resolve_amp(requested: str, device_type: str, cpu_bf16: bool) -> str:
    """--amp auto: bf16 autocast on CUDA, and on CPUs with native bf16 (AMX or AVX-512 BF16), where
    it measured fastest for the tiny and small presets alike once attention runs SDPA's math
    kernels (`nmt-bench train`, bench/results/train.md); fp32 on other CPUs, where bf16 is
    emulated and slower. "bf16-output" (only the output layer in bf16) stays selectable."""
    if requested == "auto":
        return "bf16" if device_type == "cuda" or cpu_bf16 else "none"
    if requested == "fp16" and device_type != "cuda":
        raise ValueError(f"--amp fp16 needs CUDA; this run is on {device_type}")
    return requested


def attention_backend(device_type: str):
    """On CPU, SDPA's plain math kernels: for these short sentences they trained faster than the
    flash-attention CPU kernel (a fifth of a step in fp32; under bf16 autocast that kernel made
    bf16 slower than fp32, the math kernels made it the fastest; `nmt-bench train`)."""
    if device_type != "cpu":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


class Trainer:
    def __init__(
        self, cfg: TrainConfig, ctx: dist.Context, tokenizer: Tokenizer, train: Examples, valid: ParallelCorpus
    ):
        self.cfg, self.ctx, self.tokenizer, self.train, self.valid = cfg, ctx, tokenizer, train, valid
        self.valid_examples = encode_corpus(valid, tokenizer, max_len=10**9)
        torch.manual_seed(cfg.seed)
        self.model = Transformer(cfg.model).to(ctx.device)
        self.optimizer = make_optimizer(self.model)
        self.amp = amp = self._amp_mode()
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        # "bf16-output": only the output layer's products in bf16 (training/output_loss.py).
        self.bf16_output = amp in ("bf16", "bf16-output")
        self.step, self.epoch, self.batch_in_epoch = 0, 1, 0
        self.best_bleu, self.bad_epochs = float("-inf"), 0
        self.bar: tqdm | None = None
        if cfg.resume:
            self._restore()
        elif cfg.init_from:
            self.model.load_state_dict(load_checkpoint(cfg.init_from).model.state_dict())
        self.train_model = ctx.wrap(torch.compile(self.model) if cfg.compile else self.model)
        self.meta = self.checkpoint_meta({})

    def _amp_mode(self) -> str:
        try:
            return resolve_amp(self.cfg.amp, self.ctx.device.type, cpu_has_fast_bf16())
        except ValueError as e:
            raise DataError(str(e)) from e

    def _restore(self) -> None:
        tensors, state = read_train_state(self.cfg.out_dir / "last")
        if state["model"] != self.cfg.model.to_dict():
            raise DataError(f"cannot resume: {self.cfg.out_dir / 'last'} holds a different model config")
        self.model.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
        load_optimizer_state(self.optimizer, tensors, state["optimizer"])
        load_rng_state(tensors)
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.best_bleu, self.bad_epochs = state["best_bleu"], state["bad_epochs"]

    def epoch_batches(self) -> list[list[list[int]]]:
        """This rank's optimizer steps for the current epoch, each a list of `accum_steps` batches."""
        batches = token_batches(
            self.train.src_lengths, self.train.tgt_lengths, self.cfg.max_tokens, self.cfg.seed + self.epoch
        )
        mine = self.ctx.shard(batches)
        k = self.cfg.accum_steps
        return [mine[i : i + k] for i in range(0, len(mine) - k + 1, k)]

    def lr(self) -> float:
        return noam_lr(self.step, self.cfg.model.d_model, self.cfg.warmup, self.cfg.lr)

    def update(self, group: list[list[int]]) -> tuple[torch.Tensor, int]:
        """One optimizer step over `group` (gradient accumulation); returns (loss sum, tokens).

        The loss stays a tensor: reading it (`.item()`) would wait for the device every step.
        """
        self.step += 1
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr()
        total_loss, total_tokens = torch.zeros((), device=self.ctx.device), 0
        for i, indices in enumerate(group):
            batch = make_batch(self.train, indices).to(self.ctx.device)
            keep = batch.tgt_out != PAD_ID
            sync = i == len(group) - 1
            with self.ctx.no_sync(self.train_model, sync), self._autocast(), attention_backend(self.ctx.device.type):
                states = self.train_model(batch.src, batch.src_mask, batch.tgt_in, keep, project=False)
                loss, _ = projected_cross_entropy(
                    states, self.model.embedding.weight, batch.tgt_out[keep], self.cfg.label_smoothing, self.bf16_output
                )
            self.scaler.scale(loss / batch.n_tokens / len(group)).backward()
            total_loss += loss.detach()
            total_tokens += batch.n_tokens
        if self.cfg.clip_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return total_loss, total_tokens

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=self.amp_dtype)

    def progress_bar(self, steps_per_epoch: int) -> tqdm:
        """One bar for the whole run (its ETA is the run's), created at the first epoch."""
        if self.bar is None:
            total = steps_per_epoch * self.cfg.max_epochs
            if self.cfg.max_steps:
                total = min(total, self.cfg.max_steps)
            self.bar = tqdm(
                total=total,
                initial=self.step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                disable=not (self.cfg.progress and self.ctx.is_main),
                mininterval=2.0,
            )
        return self.bar

    def run(self) -> None:
        records_path = self.cfg.out_dir / "metrics.jsonl"
        started = time.monotonic()
        while self.epoch <= self.cfg.max_epochs:
            stopped_early = self.train_epoch()
            if self.ctx.is_main:
                record = self.end_of_epoch(partial=stopped_early)
                append_jsonl(records_path, record)
                plot_curves(read_jsonl(records_path), self.cfg.out_dir / "curves.png")
                log.info(
                    "epoch %d: %s", record["epoch"], {k: record[k] for k in ("train_loss", "valid_loss", "valid_bleu")}
                )
            out_of_time = self.cfg.time_limit is not None and time.monotonic() - started > self.cfg.time_limit * 60
            if stopped_early or self.ctx.broadcast_flag(self.ctx.is_main and (out_of_time or self.out_of_patience())):
                break
        if self.bar is not None:
            self.bar.close()
        self.ctx.barrier()
        if self.ctx.is_main:
            self.finish()
        # Every rank leaves together: a rank that tore its process group down while the main one still
        # chose the final model made the main one abort at exit (gloo, "terminate called ...").
        self.ctx.barrier()

    def train_epoch(self) -> bool:
        """Train the rest of the current epoch; True when --max-steps ended it early."""
        groups = self.epoch_batches()
        start, tokens = time.perf_counter(), 0
        loss_sum = torch.zeros((), device=self.ctx.device)
        bar = self.progress_bar(len(groups))
        self.model.train()
        for group in groups[self.batch_in_epoch :]:
            loss, n = self.update(group)
            loss_sum, tokens, self.batch_in_epoch = loss_sum + loss, tokens + n, self.batch_in_epoch + 1
            bar.update()
            if self.step % 10 == 0 and not bar.disable:  # reading the loss waits for the device
                elapsed = time.perf_counter() - start
                bar.set_postfix(
                    epoch=self.epoch,
                    loss=f"{loss.item() / n:.3f}",
                    lr=f"{self.lr():.2e}",
                    tok_s=f"{tokens * self.ctx.world / elapsed:.0f}",
                )
            if self.cfg.save_every_steps and self.step % self.cfg.save_every_steps == 0:
                self.save_last()
            if self.cfg.max_steps and self.step >= self.cfg.max_steps:
                break
        loss_sum = loss_sum.item()
        totals = self.ctx.all_reduce_sum([loss_sum, float(tokens)])
        self.epoch_stats = {
            "train_loss": totals[0] / max(totals[1], 1),
            "train_tokens": int(totals[1]),
            "seconds": time.perf_counter() - start,
        }
        finished_epoch = self.batch_in_epoch >= len(groups)
        if finished_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        return not finished_epoch

    @torch.no_grad()
    def validation_loss(self) -> float:
        self.model.eval()
        ex = self.valid_examples
        total, tokens = 0.0, 0
        for indices in token_batches(ex.src_lengths, ex.tgt_lengths, max(self.cfg.max_tokens, max(ex.tgt_lengths))):
            batch = make_batch(ex, indices).to(self.ctx.device)
            with self._autocast():
                logits = self.model(batch.src, batch.src_mask, batch.tgt_in)
            total += smoothed_loss(logits, batch.tgt_out, 0.0)[1].item()
            tokens += batch.n_tokens
        return total / tokens

    def validation_bleu(self, model: Transformer) -> float:
        options = SearchOptions(beam_size=self.cfg.valid_beam, batch_size=128)
        hypotheses = translate(model, self.tokenizer, self.valid.src, options, self.ctx.device)
        return score(hypotheses, self.valid.tgt)["bleu"]

    def end_of_epoch(self, partial: bool) -> dict:
        epoch = self.epoch if partial else self.epoch - 1
        last = partial or epoch >= self.cfg.max_epochs
        valid_loss = self.validation_loss()
        bleu = self.validation_bleu(self.model) if last or epoch % self.cfg.valid_bleu_every == 0 else None
        self.model.train()
        record = {
            "event": "epoch",
            "epoch": epoch,
            "partial": partial,
            "step": self.step,
            "lr": self.lr(),
            **self.epoch_stats,
            "valid_loss": valid_loss,
            "valid_bleu": bleu,
            "tokens_per_s": self.epoch_stats["train_tokens"] / max(self.epoch_stats["seconds"], 1e-9),
        }
        self.meta = self.checkpoint_meta({"epoch": epoch, "step": self.step, "valid_bleu": bleu})
        if bleu is not None and bleu > self.best_bleu:
            self.best_bleu, self.bad_epochs = bleu, 0
            write_checkpoint(self.cfg.out_dir / "best", self.model, self.tokenizer_file, self.meta)
        elif bleu is not None and not partial:
            self.bad_epochs += self.cfg.valid_bleu_every
        if not partial:
            self.save_epoch_weights(epoch)
        self.save_last()
        return record

    def checkpoint_meta(self, info: dict) -> CheckpointMeta:
        inference = InferenceSettings(self.cfg.beam, self.cfg.length_penalty)
        return CheckpointMeta(self.cfg.src_lang, self.cfg.tgt_lang, info, inference)

    @property
    def tokenizer_file(self) -> Path:
        return self.cfg.out_dir / MODEL_FILENAME

    def save_last(self) -> None:
        if not self.ctx.is_main:
            return
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        opt_tensors, opt_meta = optimizer_state(self.optimizer)
        state = {
            "model": self.cfg.model.to_dict(),
            "optimizer": opt_meta,
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "best_bleu": self.best_bleu,
            "bad_epochs": self.bad_epochs,
        }
        write_checkpoint(
            self.cfg.out_dir / "last",
            self.model,
            self.tokenizer_file,
            self.meta,
            train_state=({**tensors, **opt_tensors, **rng_state()}, state),
        )

    def save_epoch_weights(self, epoch: int) -> None:
        from safetensors.torch import save_file

        folder = self.cfg.out_dir / "epochs"
        folder.mkdir(exist_ok=True)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()},
            folder / f"epoch_{epoch:04d}.safetensors",
        )
        for old in sorted(folder.glob("epoch_*.safetensors"))[: -max(self.cfg.average_last, 1)]:
            old.unlink()

    def out_of_patience(self) -> bool:
        return self.cfg.patience > 0 and self.bad_epochs >= self.cfg.patience

    def finish(self) -> None:
        """final/ = the better on validation BLEU of best/ and averaged/, the best average of the
        last k epochs for k in 2, 5, 10, ... up to --average-last (each score goes to metrics.jsonl)."""
        out = self.cfg.out_dir
        chosen, best = out / "best", self.best_bleu
        files = sorted((out / "epochs").glob("epoch_*.safetensors"))
        counts = sorted({k for k in (2, 5, 10, 15, 20) if k < len(files)} | {len(files)})
        averages: list[tuple[float, int, Transformer]] = []
        for k in (k for k in counts if 1 < k <= self.cfg.average_last):
            averaged = Transformer(self.cfg.model).to(self.ctx.device)
            averaged.load_state_dict(average_weights(files[-k:]))
            bleu = self.validation_bleu(averaged)
            append_jsonl(out / "metrics.jsonl", {"event": "averaged", "epochs": k, "valid_bleu": bleu})
            log.info("average of the last %d epochs: validation BLEU %.2f", k, bleu)
            if not averages or bleu > averages[0][0]:
                averages = [(bleu, k, averaged)]
        if averages:
            bleu, k, averaged = averages[0]
            info = {"averaged_epochs": [f.stem for f in files[-k:]], "valid_bleu": bleu}
            write_checkpoint(out / "averaged", averaged, self.tokenizer_file, self.checkpoint_meta(info))
            if bleu > best:
                chosen, best = out / "averaged", bleu
        if chosen.is_dir():
            shutil.rmtree(out / "final", ignore_errors=True)
            shutil.copytree(chosen, out / "final")
            log.info("final model: %s (validation BLEU %.2f) -> %s", chosen.name, best, out / "final")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = parse_config(argv)
    ctx = dist.setup(cfg.device)
    try:
        if ctx.is_main:
            prepare_run_dir(cfg)
        ctx.barrier()
        train_corpus, valid = load_corpora(cfg)
        tokenizer = prepare_tokenizer(cfg, train_corpus, ctx)
        train = encode_corpus(train_corpus, tokenizer, cfg.max_len)
        if ctx.is_main:
            log.info(
                "train %d pairs (%d longer than %d tokens dropped), valid %d pairs, device %s, world %d",
                len(train),
                train.dropped,
                cfg.max_len,
                len(valid),
                ctx.device,
                ctx.world,
            )
        trainer = Trainer(cfg, ctx, tokenizer, train, valid)
        if ctx.is_main:
            log.info("model: %s, %.2fM parameters", cfg.model, trainer.model.num_parameters() / 1e6)
            log.info("precision: %s; CPU: %s", trainer.amp, cpu_summary())
        trainer.run()
    except DataError as e:
        print(f"nmt-train: error: {e}", file=sys.stderr)
        return 2
    finally:
        ctx.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
