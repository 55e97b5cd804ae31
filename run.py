"""Train, evaluate and predict with a GPT-J-family model from one params YAML.

Examples:
  python run.py --mode train --params configs/params_gptj_tiny.yaml --model-dir runs/tiny
  python run.py --mode train --params configs/params_gptj_6B.yaml --model-dir runs/6b \\
      --checkpoint-path converted/gptj6b --set optimizer.learning_rate=1e-5
  python run.py --mode eval --params runs/tiny/params.yaml --model-dir runs/tiny --steps 50
  python run.py --mode train_and_eval --params configs/params_gptj_tiny.yaml --model-dir runs/tiny
  python run.py --mode predict --params runs/tiny/params.yaml --model-dir runs/tiny \\
      --tokenizer demo_work/tokenizer --prompt "def main(" --max-new-tokens 32
  python run.py --mode predict --hf-checkpoint ~/gpt-j-6b --weight-format int8 \\
      --tokenizer ~/gpt-j-6b --prompt "The meaning of life is" --output out.jsonl

Re-running the same command after a crash or kill resumes from the last checkpoint in
--model-dir. Flags override the params file; --set overrides any key (repeatable).
"""
from __future__ import annotations

import argparse
import os
import sys

from config.quiet import add_verbose_flag, quiet_tensorflow

MODES = ("train", "eval", "train_and_eval", "predict")


def build_parser() -> argparse.ArgumentParser:
    from config.cli import ArgumentParser
    parser = ArgumentParser(prog="run.py", description=__doc__.split("\n\n")[0],
                            epilog=__doc__.split("\n\n", 1)[1],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", required=True, choices=MODES,
                        help="train: train to max_steps; eval: evaluate the latest checkpoint; train_and_eval: "
                             "train, evaluating every runconfig.eval_every_steps; predict: continue --prompt "
                             "or --prompts-file (greedy, sampling or beam search)")
    parser.add_argument("--params", default=None, help="params YAML (train_input, eval_input, model, "
                                                       "optimizer, runconfig); optional with --hf-checkpoint")
    parser.add_argument("--model-dir", default=None,
                        help="where checkpoints, TensorBoard events, params.yaml and eval results go "
                             "(runconfig.model_dir)")
    parser.add_argument("--max-steps", type=int, default=None, help="train until this global step "
                                                                    "(runconfig.max_steps)")
    parser.add_argument("--steps", type=int, default=None, help="eval batches; default: the whole eval input "
                                                                "(runconfig.eval_steps)")
    parser.add_argument("--checkpoint-path", default=None,
                        help="warm start: load model weights only from a converted HF checkpoint directory or "
                             "another run's checkpoint, when --model-dir has no checkpoint yet")
    parser.add_argument("--execution", choices=("standard", "weight_streaming"), default=None,
                        help="runconfig.execution")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params key, e.g. --set model.num_hidden_layers=2 (repeatable)")
    add_verbose_flag(parser)
    from runtime.preflight import add_skip_flag
    add_skip_flag(parser)
    from generation.flags import add_predict_flags
    add_predict_flags(parser.add_argument_group("predict mode (see docs/generation.md)"))
    return parser


def effective_overrides(args: argparse.Namespace) -> list[str]:
    flags = {"runconfig.model_dir": args.model_dir, "runconfig.max_steps": args.max_steps,
             "runconfig.eval_steps": args.steps, "runconfig.checkpoint_path": args.checkpoint_path,
             "runconfig.execution": args.execution}
    return list(args.overrides) + [f"{k}={v}" for k, v in flags.items() if v is not None]


def memory_estimate(args: argparse.Namespace, params):
    """The peak memory of training or evaluating (runtime/peak_memory.py), checked before anything is built."""
    from runtime import peak_memory
    resuming = os.path.exists(os.path.join(params.runconfig.model_dir, "checkpoint"))
    return peak_memory.run_estimate(params, args.mode, args.params, resuming)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.params is None and args.hf_checkpoint is None:
        parser.error("the following arguments are required: --params (or, for --mode predict, --hf-checkpoint)")
    quiet_tensorflow(args.verbose)
    from config.params import ParamsError, load_params
    from runtime import preflight
    estimator = None
    try:
        if args.mode == "predict":
            return predict_mode(args)
        if args.hf_checkpoint:
            raise ParamsError("--hf-checkpoint is for --mode predict; to train from it, convert it "
                              "(python -m checkpoint_utils.convert_hf) and pass --checkpoint-path")
        params = load_params(args.params, effective_overrides(args))
        model_dir = params.runconfig.model_dir
        if not model_dir:
            raise ParamsError("no model directory: pass --model-dir or set runconfig.model_dir")
        preflight.check(memory_estimate(args, params), args.skip_memory_check)
        from runtime.devices import configure_devices
        configure_devices(params.runconfig)            # before anything starts TensorFlow's devices
    except (ParamsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # TensorFlow loads from here on: the checks above ran without it.
    from runtime.estimator import Estimator, InputExhaustedError, NonFiniteLossError, TrainingTerminated
    from runtime.run_dir import RunDirLockedError
    from runtime.logging_utils import log
    try:
        estimator = Estimator(params, model_dir, training=args.mode in ("train", "train_and_eval"))
        status = 0
        if args.mode == "train":
            estimator.train()
        elif args.mode == "eval":
            estimator.evaluate()
        else:
            estimator.train_and_evaluate()
    except (ParamsError, FileNotFoundError, ValueError, InputExhaustedError, RunDirLockedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingTerminated:        # workers stop together at one step, so all of them end here
        status = 143
    except NonFiniteLossError as err:
        log(f"error: {err}")
        return 3
    except KeyboardInterrupt:
        if estimator is None:
            return 130
        status = 130
    estimator.finish(status)          # a multi-worker process exits here, with the other workers
    return status


def predict_mode(args: argparse.Namespace) -> int:
    """Generate from the weights the estimator would restore (model_dir's latest checkpoint, else
    --checkpoint-path), or from --hf-checkpoint, loaded straight into --weight-format
    (generation/loading.py): no training state and no float32 model beside a packed one. It runs
    on one device whatever runconfig.mesh says (checkpoints have the standard layout)."""
    from checkpoint_utils.hf_checkpoint import hf_checkpoint_params
    from config.params import ParamsError, load_params
    from generation import predict
    from runtime import preflight
    if args.hf_checkpoint and args.checkpoint_path:
        raise ParamsError("give one of --checkpoint-path and --hf-checkpoint (the weights to generate with)")
    overrides = effective_overrides(args)
    params = (hf_checkpoint_params(args.hf_checkpoint, args.params, overrides) if args.hf_checkpoint
              else load_params(args.params, overrides))
    model_dir = params.runconfig.model_dir
    if not (args.output or model_dir):
        raise ParamsError("predict needs --output (or --model-dir, whose predictions.jsonl is the default)")
    job = predict.prepare(args, params.model)      # prompts and flags checked before the model is built
    preflight.check(predict.memory_estimate(job, params.model), args.skip_memory_check)
    from generation.loading import load_generation_model, predict_source     # TensorFlow loads here
    source = args.hf_checkpoint or predict_source(model_dir, params.runconfig.checkpoint_path)
    model = load_generation_model(params.model, source, job.weight_format)
    predict.run_job(model, job, args.output or os.path.join(model_dir, "predictions.jsonl"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
