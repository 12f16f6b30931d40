"""`python -m dpo.train`: the command line and `run(cfg)`, the one entry point that the CLI, the
benchmarks and the tests drive.

run(cfg):
    check the output folder, the checkpoint to resume, the data and the model path   (before any model loads)
    build the model and the pairs (dpo.build), the trainer (dpo.trainer)             (a signal now stops at once)
    evaluate before training (--eval-dataset)
    loop: trainer.train_step() -> metrics row to the run folder -> checkpoint every --save-steps
    final checkpoint, adapter/, evaluation after, curves.png

Nothing lost (dpo.run.lifecycle writes, checkpoints, resumes and handles signals; dpo.run.checkpoint stores):
- A checkpoint every --save-steps and at the end: trainable tensors, optimizer, scheduler, RNG
  states, the step (= the data position: step_plan is deterministic) and the run's config; with
  --precompute-ref also the reference log-probs (ref_logps.safetensors), so a resume need not
  recompute them. --resume / --resume-from continue a run exactly as if it had never stopped.
- SIGINT/SIGTERM before the first step: stop at once, nothing saved (there is nothing to save yet).
  During training: the current optimizer step finishes, a checkpoint is written, and the run exits
  with 130/143 and the command that resumes it. A second signal stops at once (a checkpoint write
  in progress is let finish first, so no half-written folder appears).
- A non-finite loss or gradient norm never reaches the weights: --on-nan stop (exit 3, naming the
  step, the rows and the checkpoint of the last good step) or --on-nan skip (no update; counted; a run
  that skipped more than half its steps ends with exit 3, not as a success).
- Step 1 of a fresh run whose policy is its reference checks the loss against the untrained value
  (dpo.first_step: ln 2 for sigmoid) and stops (exit 3) when it is not: broken batching or reference.
Exit codes of main(): 0 done, 2 refused (bad flags, data, output dir or checkpoint), 3 a step's numbers
are wrong (non-finite, step 1's loss not the untrained value, or most steps skipped), 128+signal when
stopped by a signal.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from dpo.data.sources import DataError
from dpo import distributed, first_step, host_memory, models
from dpo.run import diskspace
from dpo.data import tasks
from dpo.run import trackers
from dpo.build import (PreparedData, build_model, check_before_loading, check_same_tokenization, cpu_threads,
                       peak_after_layout, plan_run, planned_as_before, prepare_data, read_rows)
from dpo.run.checkpoint import Checkpoint, CheckpointError
from dpo.run.state import restore_rng
from dpo.run.card import write_run_card
from dpo.cli import first_line, python_command
from dpo.config import ConfigError, TrainConfig
from dpo.flags import config_from_args
from dpo.run.lifecycle import Checkpointer, Commands, StopNow, StopSignals, TrainingStopped, load_reference_cache
from dpo.run.folder import (RunWriter, check_output_dir, find_resume_checkpoint, load_resume_checkpoint,
                            set_aside_later_checkpoints)
from dpo.run.plots import plot_curves
from dpo.loss_settings import LossSettings
from dpo.eval.evaluation import Evaluation
from dpo.schedule import lr_factor, warmup_steps_for
from dpo.smollm2 import MissingDefaultModel
from dpo.trainer import NonFiniteStep, Trainer

EXIT_REFUSED = 2
EXIT_NONFINITE = 3


@dataclass
class RunHooks:
    """Calls from a run to its caller, for what only a caller needs: a benchmark times each step, a
    test gives the model the starting weights of a comparison. Both optional; the CLI uses neither."""

    model_built: Callable[[torch.nn.Module], None] | None = None  # the model with its LoRA, before training
    step_done: Callable[[dict], None] | None = None  # after each optimizer step, with its metrics row


def resumed_plan(cfg: TrainConfig) -> TrainConfig:
    """The plan's settings of the checkpoint this run resumes (not planned again: free memory may differ)."""
    path = find_resume_checkpoint(cfg)
    saved = path / "config.json" if path is not None else None
    if saved is None or not saved.is_file():
        return cfg  # load_resume_checkpoint says what is wrong
    return planned_as_before(cfg, json.loads(saved.read_text()))


def describe_rows(row_ids: list[int], rows, limit: int = 8) -> str:
    """'3 (data.jsonl line 4), 7 (data.jsonl line 8)': row ids with where they came from."""
    def one(r: int) -> str:
        where = rows[r].where if rows is not None and 0 <= r < len(rows) and rows[r].row_id == r else ""
        return f"{r} ({where})" if where else str(r)
    shown = ", ".join(one(r) for r in row_ids[:limit])
    return shown + (f", ... ({len(row_ids)} in all)" if len(row_ids) > limit else "")


def agreed_signal(signals: StopSignals, trainer: Trainer) -> int | None:
    """The signal that stops the run, the same on every rank: a signal may reach the ranks at different
    steps, and a rank that left the loop alone would wait in a checkpoint barrier while the others wait
    in the next step's all-reduce. One tiny all-reduce per step settles it (every rank then stops)."""
    if trainer.dist.enabled:
        (agreed,) = distributed.max_across([float(signals.received or 0)], trainer.dist, trainer.device)
        if agreed and signals.received is None:
            signals.received = int(agreed)
    return signals.received


@dataclass
class Checked:
    """What stage 1 of a run found: the config (a resumed run's plan applied), where it runs, the checkpoint
    it continues, its rows, whether checkpoints fit on the disk, and its trackers."""

    cfg: TrainConfig
    dist: distributed.DistInfo
    device: torch.device
    resumed: Checkpoint | None
    rows: list
    checkpoints: bool | None
    sinks: list


def check_run(cfg: TrainConfig) -> Checked:
    """Stage 1, checks that cost a second (before any model loads): the device, the output folder, the
    checkpoint to resume, the rows, the model, the disk and the trackers. Raises what it refuses."""
    loss = cfg.loss_settings()  # validated with the config; the one object training and evaluation take
    if loss.unpaired and distributed.from_env().enabled:  # its per-side metrics differ between ranks
        raise ConfigError("--loss-type kto: runs on one process for now (its KL blocks and per-side metrics are "
                          "not yet shared across ranks); launch it without torchrun/accelerate")
    try:  # a GPU this machine lacks: one line now, not torch's assertion later
        models.resolve_device(cfg.device)
    except ValueError as e:
        raise ConfigError(f"--device: {e}") from None
    dist, device = distributed.setup(cfg.device)  # one process, or one rank of torchrun/accelerate launch
    if device.type == "cpu":
        threads = cpu_threads(cfg.threads, dist.world_size)
        torch.set_num_threads(threads)
        if dist.is_main:
            print(f"dpo: {threads} CPU thread(s) per process (--threads to change)")
    if dist.is_main:
        check_output_dir(cfg.output_dir, cfg.run_dict(), resume=bool(cfg.resume or cfg.resume_from),
                         overwrite=cfg.overwrite)
    resuming_a_plan = (cfg.resume or cfg.resume_from) and cfg.budget.plans and device.type == "cuda"
    cfg = resumed_plan(cfg) if resuming_a_plan else cfg
    resumed = load_resume_checkpoint(cfg, cfg.run_dict())
    rows = read_rows(cfg)
    models.resolve_model_path(cfg.model)  # the default model missing: say so before anything loads
    for line in check_before_loading(cfg, device) + unused_settings(cfg) if dist.is_main else []:
        print(f"dpo: warning: {line}", file=sys.stderr)
    checkpoints = None if cfg.plan else diskspace.check_disk(  # False: no room for them, the adapter only
        cfg, num_rows=len(rows), start_step=resumed.step if resumed else 0, needs_reference=loss.needs_reference,
        unpaired=loss.unpaired, dist=dist, device=device, may_precompute=resumed is None and cfg.budget.plans)
    try:  # a tracker whose package is missing: say so now, not after the model loads
        sinks = (trackers.make_sinks(trackers.parse_report_to(cfg.report_to), cfg.output_dir)
                 if dist.is_main and not cfg.plan else [])
    except trackers.TrackerError as e:
        raise ConfigError(str(e)) from None
    return Checked(cfg, dist, device, resumed, rows, checkpoints, sinks)


def plan_the_run(checked: Checked, data: PreparedData):
    """Stage 2b: (the config the run uses from here on, the plan or None), from the one tokenization's
    lengths. Several ranks could plan apart (each its own free memory): not planned; a resumed CPU run plans
    again (its only choice, checkpointing, changes no number)."""
    cfg = checked.cfg
    if (checked.resumed is not None and checked.device.type != "cpu") or checked.dist.enabled:
        return cfg, None
    cfg, chosen = plan_run(cfg, data.items, checked.device, not cfg.loss_settings().needs_reference)
    if chosen is not None and checked.dist.is_main:
        print(chosen.format(every_setting=cfg.plan))
    return cfg, chosen


def run(cfg: TrainConfig, argv: list[str] | None = None, hooks: RunHooks | None = None) -> dict:
    """Train as `cfg` says. Returns {"history" (this process's rows), "steps", "adapter_dir", "checkpoint",
    "seconds", "model", "tokenizer", "skipped_steps", "config" (the run's config as planned: config.json),
    "layout", "predicted_peak_gib" (the plan's predicted peak; None when not planned)}.

    Raises ConfigError, DataError, CheckpointError or MissingDefaultModel for what it refuses (before a
    model loads where it can), and TrainingStopped after a signal, a non-finite step (--on-nan stop) or a
    run whose steps were mostly skipped (--on-nan skip; its adapter and checkpoint are saved).
    `argv` (the command line) only shapes the resume command the messages print.
    """
    started, hooks, commands = time.time(), hooks or RunHooks(), Commands(cfg, argv)
    checked = check_run(cfg)  # 1. what costs a second
    dist, resumed = checked.dist, checked.resumed
    data = prepare_data(checked.cfg, checked.rows)  # 2. the one tokenization, then the plan from its lengths
    cfg, chosen = plan_the_run(checked, data)
    if cfg.plan:  # --plan: show it and stop, writing nothing
        if chosen is None:
            print("dpo: no plan: several ranks, a resumed GPU run and --memory-budget none run as configured")
        distributed.teardown(dist)
        return {"plan_only": True, "config": cfg}
    run_config = cfg.run_dict()
    writer = RunWriter(cfg.output_dir, enabled=dist.is_main, sinks=checked.sinks)  # 3. the run folder
    if cfg.overwrite and dist.is_main:
        writer.clear_previous_run()
    if resumed is not None and dist.is_main:
        set_aside_later_checkpoints(cfg.output_dir, resumed.step)
    distributed.barrier(dist)
    with StopSignals() as signals:  # 4. the model, the loop and the saves
        saver = Checkpointer(cfg, run_config, signals, commands, enabled=dist.is_main, checkpoints=checked.checkpoints)
        session = _Session(cfg, cfg.loss_settings(), run_config, resumed, data, writer, saver, signals, commands, dist,
                           checked.device, hooks, chosen)
        try:
            result = session.train_and_save()
        except StopNow as e:  # a signal before the first step, or a second one: out at once
            raise stopped_at_once(e.signum, saver, commands, started=session.trainer is not None
                                  and session.trainer.step > (resumed.step if resumed else 0)) from None
        finally:
            writer.close(session.files)  # the trackers get curves.png (if drawn) and end, however the run ended
            distributed.teardown(dist)
    result["seconds"] = time.time() - started
    result["predicted_peak_gib"] = session.predicted_peak_gib
    return finish(result, cfg, resumed, dist)


def finish(result: dict, cfg: TrainConfig, resumed: Checkpoint | None, dist: distributed.DistInfo) -> dict:
    """The run's last lines: the summary, a refusal when most steps were skipped, the next commands."""
    if dist.is_main:
        print(summary(result, resumed))
    failed = mostly_skipped(result["steps"], result["skipped_steps"])
    if failed:
        raise TrainingStopped(f"{failed}; the adapter in {result['adapter_dir']} is not a trained result. "
                              "Check the rows these steps read (python -m dpo.data) and the learning rate",
                              EXIT_NONFINITE, result["checkpoint"])
    if dist.is_main:
        print(next_commands(cfg))
    return result


def next_commands(cfg: TrainConfig) -> str:
    """The last line of a finished run: the commands that evaluate its adapter (with the run's loss settings
    and max length, as training scored it) and export the run."""
    default, now = TrainConfig().to_dict(), cfg.to_dict()
    evaluate = ["--model", cfg.model, "--adapter", os.path.join(cfg.output_dir, "adapter"),
                "--dataset", cfg.eval_dataset or cfg.dataset]
    for name in ("max_length", *(f.name for f in dataclasses.fields(LossSettings))):
        value, flag = now[name], "--" + name.replace("_", "-")
        if value == default[name] or value is None:
            continue
        if isinstance(value, bool):
            evaluate.append(flag if value else flag.replace("--", "--no-", 1))
        else:
            evaluate += [flag, *map(str, value if isinstance(value, list) else [value])]
    export = ["--run-dir", cfg.output_dir, "--format", "merged", "--output", os.path.join(cfg.output_dir, "merged")]
    return (f"dpo: next: evaluate with {python_command('dpo.evaluate', evaluate)} ; "
            f"export with {python_command('dpo.export', export)} (or --format adapter, gguf)")


MAX_SKIPPED_SHARE = 0.5  # a run that skipped more of its steps than this did not train: it fails


def mostly_skipped(steps: int, skipped: list[int]) -> str | None:
    """Why a run whose steps were mostly skipped (--on-nan skip) is no success, or None when it is one."""
    if not skipped:
        return None
    if len(skipped) >= steps:
        return f"error: all {steps} steps were skipped for a non-finite loss or gradient norm: no step updated the weights"
    if len(skipped) > MAX_SKIPPED_SHARE * steps:
        return (f"error: {len(skipped)} of {steps} steps were skipped for a non-finite loss or gradient norm (more "
                f"than {MAX_SKIPPED_SHARE:.0%})")
    return None


def unused_settings(cfg: TrainConfig) -> list[str]:
    """Settings given that change nothing in this run, one line each."""
    if cfg.eval_steps > 0 and cfg.eval_dataset is None and not tasks.is_builtin(cfg.dataset):
        return [f"--eval-steps {cfg.eval_steps} does nothing without --eval-dataset (there is nothing to evaluate on)"]
    return []


def summary(result: dict, resumed: Checkpoint | None) -> str:
    """The last line of a finished run: steps, skipped steps, time, where the adapter and checkpoint are."""
    skipped = result["skipped_steps"]
    note = f" ({len(skipped)} skipped for a non-finite loss or gradient norm: steps {skipped})" if skipped else ""
    resumed_note = f" (resumed at step {resumed.step})" if resumed is not None else ""
    return (f"dpo: {result['steps']} steps{resumed_note}{note} in {result['seconds']:.1f} s; adapter saved to "
            f"{result['adapter_dir']}; checkpoint {result['checkpoint'] or 'none'}")


def schedule_change(cfg: TrainConfig, step: int, old_total: int, new_total: int) -> str:
    """The line a resume whose total changed prints: its schedule is rebuilt over the new total and goes on
    from `step` (Trainer.load_state), so the next rate is the new schedule's, not the one first planned."""
    def rate(total: int) -> float:
        return cfg.learning_rate * lr_factor(step, kind=cfg.lr_scheduler, total=total,
                                             warmup=warmup_steps_for(cfg.warmup_steps, total))
    first = (f"the first run's schedule had planned {rate(old_total):.3g}" if step < old_total
             else f"the first run's schedule ended at step {old_total}")
    return (f"dpo: the run now has {new_total} steps (it had {old_total}): the {cfg.lr_scheduler} learning-rate "
            f"schedule is rebuilt over {new_total} steps and goes on from step {step}: step {step + 1} runs at "
            f"{rate(new_total):.3g} ({first})")


class _Session:
    """One run after its checks: build the trainer, evaluate, loop, save. Holds what the phases share."""

    def __init__(self, cfg: TrainConfig, loss: LossSettings, run_config: dict, resumed: Checkpoint | None,
                 data: PreparedData, writer: RunWriter, saver: Checkpointer, signals: StopSignals, commands: Commands,
                 dist: distributed.DistInfo, device: torch.device, hooks: RunHooks, plan=None):
        self.cfg, self.loss, self.run_config, self.resumed, self.data = cfg, loss, run_config, resumed, data
        self.writer, self.saver, self.signals, self.commands = writer, saver, signals, commands
        self.dist, self.device, self.hooks, self.plan = dist, device, hooks, plan
        self.predicted_peak_gib: float | None = None  # of the layout that runs: set once build_trainer chose it
        self.trainer: Trainer | None = None
        self.files: list[str] = []  # what the trackers also keep (curves.png)

    def train_and_save(self) -> dict:
        """Build (or restore) the trainer, run the loop, then the final checkpoint and adapter/."""
        self.signals.immediate = True  # nothing to save yet: a signal stops at once
        trainer, tokenizer = self.build_trainer()
        held_out = self.evaluate_before(tokenizer)
        if self.resumed is not None:
            restore_rng(self.resumed.rng_state)  # last, just before the first step
        self.signals.immediate = False
        try:
            history = self.loop(held_out)
        except NonFiniteStep as e:
            raise stopped_on_nan(e, trainer, self.saver, self.commands, self.data.rows) from None
        if self.signals.received is not None and trainer.step < trainer.total_steps:
            path = self.saver.save(trainer)
            name = signal.Signals(self.signals.received).name
            raise TrainingStopped(f"stopped by {name} after step {trainer.step} of {trainer.total_steps}; "
                                  f"checkpoint {path}. Resume with: {self.commands.resume()}",
                                  128 + self.signals.received, path)
        final = self.saver.save_final(trainer)  # None: checkpoints off, or the disk filled up (said so)
        with self.signals.protected():
            adapter_dir = self.writer.save_adapter(trainer.model, tokenizer)
        if held_out is not None:
            self.writer.append_metrics({"step": trainer.step, **held_out.after(trainer.model)})
            self.writer.write_json("eval.json", held_out.to_dict())
            print(held_out.report())
        if self.dist.is_main:
            self.files += draw_curves(self.writer)
            write_run_card(self.cfg.output_dir)  # adapter/README.md: base model, data, settings, numbers, command
        return {"history": history, "steps": trainer.step, "adapter_dir": adapter_dir, "checkpoint": final,
                "model": trainer.model, "tokenizer": tokenizer, "skipped_steps": list(trainer.skipped_steps),
                "config": self.run_config, "layout": trainer.scorer.layout}

    def build_trainer(self):
        cfg, dist = self.cfg, self.dist
        model, tokenizer = build_model(cfg, self.device, self.data.tokenizer)
        if self.hooks.model_built is not None:
            self.hooks.model_built(model)
        pairs, report = self.data.items, self.data.report
        check_same_tokenization(tokenizer, self.data)
        if dist.is_main:
            print(report.format())
            if dist.enabled:
                print(f"dpo: {dist.world_size} ranks, {cfg.per_device_batch_size} pairs each per micro-batch "
                      f"({cfg.per_device_batch_size * dist.world_size * cfg.grad_accum} pairs per optimizer step)")
        trainer = self.trainer = Trainer(model, tokenizer, cfg, pairs, device=self.device, dist=dist, loss=self.loss)
        try:
            trainer.choose_layout()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.predicted_peak_gib = peak_after_layout(self.plan, trainer.scorer.layout)
        if self.resumed is not None:
            trainer.load_state(self.resumed)
            if cfg.precompute_ref and self.loss.needs_reference:
                load_reference_cache(trainer, self.resumed)
            print(f"dpo: resuming from {self.resumed.path} at step {trainer.step} of {trainer.total_steps}")
            planned = int(self.resumed.trainer_state.get("total_steps", trainer.total_steps))
            if planned != trainer.total_steps:
                print(schedule_change(cfg, trainer.step, planned, trainer.total_steps))
        if cfg.precompute_ref and self.loss.needs_reference and trainer.ref_cache is None:
            trainer.precompute_reference()
        return trainer, tokenizer

    def evaluate_before(self, tokenizer) -> Evaluation | None:
        """--eval-dataset: the starting model (the reference) scored, in a resumed run too."""
        held_out = Evaluation.for_run(self.cfg, tokenizer) if self.dist.is_main else None
        # after every read that can refuse (so a refused run leaves no folder): config.json, metrics
        self.writer.start(self.run_config, self.resumed)
        if held_out is not None:
            before = held_out.before(self.trainer.model)
            if self.resumed is None:
                self.writer.append_metrics({"step": 0, **before})
        return held_out

    def loop(self, held_out: Evaluation | None) -> list[dict]:
        """Optimizer steps until the last one or a signal; metrics after each, a checkpoint every --save-steps."""
        from tqdm.auto import tqdm

        trainer, history, every = self.trainer, [], self.cfg.eval_steps
        untrained = self.untrained_loss()
        with tqdm(total=trainer.total_steps, initial=trainer.step, desc="dpo", unit="step",
                  disable=bool(os.environ.get("TQDM_DISABLE")) or not self.dist.is_main) as bar:
            while trainer.step < trainer.total_steps and agreed_signal(self.signals, trainer) is None:
                row = trainer.train_step()
                self.writer.append_metrics(row)
                history.append(row)
                if untrained is not None and row["step"] == 1 and not row.get("skipped"):
                    problem = first_step.first_step_problem(row["loss"], *untrained)
                    if problem is not None:
                        raise TrainingStopped(f"error: {problem}", EXIT_NONFINITE)
                if self.hooks.step_done is not None:
                    self.hooks.step_done(row)
                bar.update(1)
                if row.get("skipped"):
                    bar.write(f"dpo: step {row['step']} skipped ({row['skipped']})")
                else:
                    shown = {"acc": "rewards/accuracies", "kl": "kl", "pairs/s": "pairs_per_second"}  # KTO: no acc
                    bar.set_postfix({"loss": f"{row['loss']:.4f}",
                                     **{k: f"{row[m]:.2f}" for k, m in shown.items() if m in row}})
                if self.saver.due(trainer.step):
                    self.saver.save(trainer)
                if held_out is not None and every > 0 and trainer.step % every == 0 and trainer.step < trainer.total_steps:
                    self.writer.append_metrics({"step": trainer.step, **held_out.metrics(trainer.model)})
        return history

    def untrained_loss(self) -> tuple[float, str, float] | None:
        """(expected step-1 loss, its name, relative tolerance) when this run starts with policy == reference
        and its loss has a known value there (dpo.first_step); None otherwise."""
        if self.resumed is not None or not first_step.policy_is_reference(self.trainer.model):
            return None
        expected, name = first_step.expected_first_loss(self.loss, dropout_off=self.cfg.disable_dropout)
        if expected is None:
            return None
        return expected, name, first_step.relative_tolerance(models.resolve_dtype(self.cfg.dtype, self.device))


def draw_curves(writer: RunWriter) -> list[str]:
    """OUTPUT_DIR/curves.png from metrics.jsonl ([its path], or [] when it could not be drawn: a plotting
    failure is reported, never fatal)."""
    try:
        path = plot_curves(writer.metrics_path, os.path.join(writer.dir, "curves.png"))
    except Exception as e:  # noqa: BLE001  (the run's results are saved already)
        print(f"dpo: warning: could not draw curves.png: {first_line(e)}", file=sys.stderr)
        return []
    print(f"dpo: curves: {path}")
    return [str(path)]


def stopped_on_nan(e: NonFiniteStep, trainer: Trainer, saver: Checkpointer, commands: Commands,
                   rows) -> TrainingStopped:
    """--on-nan stop: keep the last good step (nothing was updated), name the step and the rows."""
    path = saver.save(trainer, rng_state=trainer.rng_at_step_start)
    return TrainingStopped(
        f"error: non-finite {e.what} at step {e.step} (row ids {describe_rows(e.row_ids, rows)}); stopped before "
        f"updating the weights. Last good checkpoint: {path} (step {trainer.step}). To skip such steps, "
        f"resume with: {commands.resume('--on-nan', 'skip')}", EXIT_NONFINITE, path)


def stopped_at_once(signum: int, saver: Checkpointer, commands: Commands, started: bool) -> TrainingStopped:
    """A signal before the first step of this invocation (`started` False), or a second signal during training."""
    name = signal.Signals(signum).name
    when = f"by a second {name}" if started else f"by {name} before the first step"
    if saver.last is None:
        return TrainingStopped(f"stopped at once {when}; no checkpoint was written. "
                               f"Start over with: {commands.restart()}", 128 + signum)
    return TrainingStopped(f"stopped at once {when}; the last checkpoint is {saver.describe_last()}. "
                           f"Resume with: {commands.resume()}", 128 + signum, saver.last)


def _as_flags(settings: dict) -> str:
    """{"max_steps": 8, "shuffle": False} -> "--max-steps 8 --no-shuffle": settings as a user types them."""
    def one(k, v):
        flag = k.replace("_", "-")
        return (f"--{flag}" if v else f"--no-{flag}") if isinstance(v, bool) else f"--{flag} {v}"
    return " ".join(one(k, v) for k, v in settings.items())


DEFAULT_RUN_HELP = (f"With no --dataset: the built-in default run, --dataset {tasks.DEFAULT_RUN['dataset']} with "
                    "these settings in place of the defaults above (flags given still win): "
                    + _as_flags({k: v for k, v in tasks.DEFAULT_RUN.items() if k != "dataset"}))


def main(argv: list[str] | None = None) -> int:
    """`python -m dpo.train`: 0 done, 2 refused (one line, no traceback), 3 non-finite step, 128+N stopped by
    signal N (130 SIGINT, 143 SIGTERM) after saving a checkpoint."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        cfg = config_from_args(argv, epilog=DEFAULT_RUN_HELP)
        if cfg.dataset is None:  # the default run: the built-in task with settings measured to move the model
            stamp = time.strftime("%Y%m%d-%H%M%S")
            cfg = config_from_args(argv, base={**tasks.DEFAULT_RUN, "output_dir": f"runs/default-{stamp}"},
                                   epilog=DEFAULT_RUN_HELP)
            print(f"dpo: no --dataset given: the default run ({cfg.model} on {cfg.dataset}, {cfg.max_steps} steps "
                  f"of {cfg.per_device_batch_size * cfg.grad_accum} pairs; --help lists every option)")
        run(cfg, argv)
    except SystemExit as e:  # argparse: --help (0) or a bad flag (2; it printed its one line)
        return e.code if isinstance(e.code, int) else EXIT_REFUSED
    except TrainingStopped as e:
        print(f"dpo: {e}", file=sys.stderr)
        return e.exit_code
    except (ConfigError, DataError, CheckpointError, MissingDefaultModel) as e:
        print(f"dpo: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print("dpo: interrupted before training started; nothing was saved", file=sys.stderr)
        return 128 + signal.SIGINT
    return 0


if __name__ == "__main__":
    host_memory.return_freed_memory()  # this process's allocator: freed activations leave it (dpo.host_memory)
    sys.exit(main())
