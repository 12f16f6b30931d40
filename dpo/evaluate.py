"""`python -m dpo.evaluate`: evaluate a model (+ an optional LoRA adapter) on held-out preference pairs.

Under any objective training takes (`--loss-type` and its settings, the same flags, defaults and refusals
as `python -m dpo.train`, read into one dpo.loss_settings.LossSettings): its TRL trainer's eval metrics,
with the names of training's eval rows (dpo.objectives.metrics), and the length-normalised accuracy (dpo.objectives),
each a mean over the pairs (KTO: over its unpaired rows; a paired file is split as training splits it);
SimPO, CPO and ORPO read no reference. For a `builtin:` task also greedy generations of the policy and
the reference, scored by the task's reward, and their KL to the reference (dpo.eval.generation). The work is
dpo.eval.evaluation.Evaluation's; this module is the command line. Defaults are training's (`python -m dpo.train`)
and the built-in tasks'.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any

import torch

from dpo import cli, models, smollm2
from dpo.data import tasks
from dpo.data.sources import DataError
from dpo.eval.evaluation import Evaluation, GenerationSettings, format_metrics
from dpo.eval.generation import format_samples
from dpo.files import output_problem, write_json_atomic
from dpo.config import LOGPROB_MODES, ConfigError, TrainConfig
from dpo.flags import add_field_arguments
from dpo.data.sources import looks_local
from dpo.smollm2 import DEFAULT_MODEL
from dpo.loss_settings import LossSettings

PROG = "python -m dpo.evaluate"
NAME = "dpo.evaluate"  # what its error lines start with (python -m dpo.train's: "dpo")
_TRAIN_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
# The loss flags are training's (same names, help and defaults), read into the one LossSettings.
LOSS_FIELDS = tuple(f.name for f in dataclasses.fields(LossSettings))
# Settings that only one objective reads: given with another, the flag would change nothing.
ONLY_FOR = {f.name: f.metadata["only_for"] for f in dataclasses.fields(TrainConfig) if f.metadata.get("only_for")}


class EvalError(Exception):
    pass


def build_parser() -> cli.Parser:
    p = cli.Parser(
        prog=PROG, name=NAME,
        description="Evaluate a model (and LoRA adapter) on held-out preference pairs: TRL's eval metrics, "
                    "length-normalised accuracy, and for builtin: tasks greedy generations scored by the task's "
                    "reward and their KL to the reference (the base model).")
    # A required option has no default: SUPPRESS keeps "(default: None)" out of its help.
    p.add_argument("--model", required=True, default=argparse.SUPPRESS, help="a local model folder, a hub name, or smollm2-135m-instruct")
    p.add_argument("--adapter", default=None,
                   help="a LoRA adapter folder (policy = base + adapter; reference = base); None: the policy is "
                        "the base model")
    p.add_argument("--dataset", required=True, default=argparse.SUPPRESS,
                   help="a preference file/folder/hub dataset (all its rows are evaluated), or builtin:NAME "
                        "(its held-out split)")
    p.add_argument("--max-length", type=int, default=_TRAIN_DEFAULTS["max_length"],
                   help="max tokens of prompt+completion (as training)")
    p.add_argument("--batch-size", type=int, default=tasks.DEFAULT_EVAL["batch_size"],
                   help="pairs per forward pass (and prompts per generation batch)")
    p.add_argument("--eval-size", type=int, default=None,
                   help=f"pairs to evaluate: builtin: held-out rows to make (None: {tasks.DEFAULT_EVAL['n_pairs']}); "
                        "a file: its first N rows (None: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of a builtin task's held-out rows")
    p.add_argument("--generations", type=int, default=tasks.DEFAULT_EVAL["generations"],
                   help="builtin tasks: held-out prompts to generate for (0: none)")
    p.add_argument("--max-new-tokens", type=int, default=tasks.DEFAULT_EVAL["max_new_tokens"],
                   help="generation length limit")
    p.add_argument("--samples", type=int, default=3, help="generations to print side by side")
    p.add_argument("--logprobs", default=_TRAIN_DEFAULTS["logprobs"], choices=LOGPROB_MODES,
                   help="log-prob implementation")
    p.add_argument("--output", default=None, help="write every number (and the generations) to this JSON file")
    p.add_argument("--device", default=_TRAIN_DEFAULTS["device"],
                   help="auto (the GPU when there is one), cpu, cuda, cuda:N")
    loss = p.add_argument_group("loss (as python -m dpo.train: the objective and its settings)")
    add_field_arguments(loss, LOSS_FIELDS)
    return p


def check_args(args) -> torch.device:
    """Everything checkable before a model loads, as one-line errors; the device to run on."""
    for name, value, low in (("--max-length", args.max_length, 2), ("--batch-size", args.batch_size, 1),
                             ("--generations", args.generations, 0), ("--max-new-tokens", args.max_new_tokens, 1),
                             ("--samples", args.samples, 0), ("--eval-size", args.eval_size, 1)):
        if value is not None and value < low:
            raise EvalError(f"{name}: must be >= {low}, got {value}")
    if looks_local(args.model):
        problem = models.model_folder_problem(args.model)
        if problem is not None:
            raise EvalError(f"--model: {problem}")
    elif args.model != DEFAULT_MODEL and (problem := models.hub_problem(args.model)) is not None:
        raise EvalError(f"--model: {problem}")
    if args.adapter is not None:
        if not os.path.isdir(args.adapter):
            raise EvalError(f"--adapter: no such adapter folder: {args.adapter}")
        if not os.path.isfile(os.path.join(args.adapter, "adapter_config.json")):
            raise EvalError(f"--adapter: {args.adapter} holds no adapter_config.json (not a PEFT adapter folder)")
    if args.output and (problem := output_problem(args.output)) is not None:  # before the evaluation, not after
        raise EvalError(f"--output: {problem}")
    try:
        return models.resolve_device(args.device)
    except ValueError as e:
        raise EvalError(f"--device: {e}") from None


def loss_settings(args) -> LossSettings:
    """The loss flags given (the rest: training's defaults) as the one validated LossSettings; a bad value
    or combination is one EvalError naming the flag, as training words it."""
    given = {name: getattr(args, name) for name in LOSS_FIELDS if hasattr(args, name)}
    if not given.get("beta", 1.0) > 0:  # also NaN; training checks it before the loss settings too
        raise EvalError(f"--beta: must be > 0, got {given['beta']}")
    try:
        loss = TrainConfig(**given).loss_settings()
    except ConfigError as e:
        raise EvalError(str(e)) from None
    for name, owner in ONLY_FOR.items():
        if name in given and owner not in loss.loss_type:
            raise EvalError(f"--{name.replace('_', '-')}: applies to --loss-type {owner} only; the loss type is "
                            f"{' '.join(loss.loss_type)}")
    if loss.unpaired and args.batch_size < 2:
        raise EvalError("--batch-size: kto needs >= 2 rows per batch (its KL estimate pairs each row with another "
                        f"row's completion, as in training), got {args.batch_size}")
    return loss


def check_dataset(dataset: str) -> None:
    """Cheap dataset checks, so that a missing file fails before the model loads."""
    if tasks.is_builtin(dataset):
        tasks.parse_builtin(dataset)
    elif looks_local(dataset) and not os.path.exists(os.path.expanduser(dataset)):
        raise DataError(f"--dataset: no such file or folder: {dataset}")


def load_model(args, device: torch.device):
    """(model, tokenizer): the base model, with the adapter on top when given, in eval mode."""
    try:
        path = models.resolve_model_path(args.model)
    except smollm2.MissingDefaultModel as e:
        raise EvalError(f"--model: {e}") from None
    try:
        tokenizer = models.load_tokenizer(path)
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        model = models.load_model(path, dtype, str(device))
    except Exception as e:  # noqa: BLE001 - a missing/unreadable model is one line, not a traceback
        raise EvalError(f"--model: cannot load {args.model} ({type(e).__name__}: {cli.one_line(e)})") from None
    if args.adapter:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, args.adapter)
        except Exception as e:  # noqa: BLE001
            raise EvalError(f"--adapter: cannot load {args.adapter} ({type(e).__name__}: {cli.one_line(e)})") from None
    model.eval()
    return model, tokenizer


def run(args) -> dict[str, Any]:
    device = check_args(args)
    loss = loss_settings(args)
    check_dataset(args.dataset)
    started = time.time()
    model, tokenizer = load_model(args, device)
    evaluation = Evaluation.of_dataset(
        args.dataset, tokenizer, loss=loss, max_length=args.max_length,
        eval_size=args.eval_size, seed=args.seed, logprobs=args.logprobs, batch_size=args.batch_size,
        generation_settings=GenerationSettings(args.generations, args.max_new_tokens, args.batch_size))
    metrics = evaluation.after(model)
    print(f"evaluated {evaluation.describe_data()} under {describe_loss(loss)}"
          f"{' with adapter ' + args.adapter if args.adapter else _no_adapter(loss)}")
    print(format_metrics(metrics))
    result: dict[str, Any] = {
        "model": args.model, "adapter": args.adapter, "dataset": args.dataset, "max_length": args.max_length,
        "beta": loss.beta, "loss": dataclasses.asdict(loss), "batch_size": args.batch_size, "device": str(device),
        "data": evaluation.data_report.to_dict(), "metrics": metrics,
    }
    if evaluation.generations is not None:
        result["generations"] = evaluation.generations
        print_generations(evaluation.generations, args)
    result["seconds"] = round(time.time() - started, 2)
    if args.output:
        write_json_atomic(args.output, result)
        print(f"\nwrote {args.output}")
    return result


def describe_loss(loss: LossSettings) -> str:
    """"simpo (beta 2.0, simpo_gamma 0.7)": the loss type, its beta and the settings not at their defaults."""
    default = LossSettings(loss_type=loss.loss_type)
    changed = [f"{k} {v}" for k, v in dataclasses.asdict(loss).items()
               if k != "loss_type" and (k == "beta" or v != getattr(default, k))]
    return f"{' '.join(loss.loss_type)} ({', '.join(changed)})"


def _no_adapter(loss: LossSettings) -> str:
    if loss.needs_reference:
        return " (no adapter: policy = reference)"
    what = "--reference-free" if loss.reference_free else loss.objective
    return f" (no adapter: the base model; {what} uses no reference model)"


def print_generations(gen: dict[str, Any], args) -> None:
    print(f"\ngenerations: {gen['num_prompts']} held-out prompts, greedy, up to {args.max_new_tokens} tokens; "
          f"task reward ({gen['task']}) mean: policy {gen['policy_reward_mean']:.3f}, "
          f"reference {gen['reference_reward_mean']:.3f}; reward > 0: policy "
          f"{100 * gen['policy_positive_share']:.0f}%, reference {100 * gen['reference_positive_share']:.0f}%; "
          f"policy better on {100 * gen['policy_beats_reference']:.0f}% of prompts")
    print(f"KL to reference per generated token {gen['kl']['kl_per_token']:.4f}; log-ratio per token "
          f"{gen['kl']['logratio_per_token']:.4f}, per completion {gen['kl']['logratio_per_sequence']:.3f}")
    if args.samples:
        print()
        print(format_samples(gen, args.samples))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (EvalError, DataError) as e:
        print(f"{NAME}: error: {cli.one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{NAME}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
