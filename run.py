"""Train, evaluate and predict with a GPT-J-family model from one params YAML.

Examples:
  python run.py --mode train --params configs/params_gptj_tiny.yaml --model-dir runs/tiny
  python run.py --mode train --params configs/params_gptj_6B.yaml --model-dir runs/6b \\
      --checkpoint-path converted/gptj6b --set optimizer.learning_rate=1e-5
  python run.py --mode eval --params runs/tiny/params.yaml --model-dir runs/tiny --steps 50
  python run.py --mode train_and_eval --params configs/params_gptj_tiny.yaml --model-dir runs/tiny
  python run.py --mode predict --params runs/tiny/params.yaml --model-dir runs/tiny \\
      --tokenizer demo_work/tokenizer --prompt "def main(" --max-new-tokens 32

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
    parser.add_argument("--params", required=True, help="params YAML (train_input, eval_input, model, "
                                                        "optimizer, runconfig)")
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


def memory_estimate(args: argparse.Namespace, params, job):
    """The peak memory this command will need (runtime/peak_memory.py), checked before anything is built."""
    from runtime import peak_memory
    if args.mode == "predict":
        from generation import predict
        return predict.memory_estimate(job, params.model)
    resuming = os.path.exists(os.path.join(params.runconfig.model_dir, "checkpoint"))
    return peak_memory.run_estimate(params, args.mode, args.params, resuming)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_tensorflow(args.verbose)
    from config.params import ParamsError, load_params
    from runtime import preflight
    estimator = None
    try:
        params = load_params(args.params, effective_overrides(args))
        model_dir = params.runconfig.model_dir
        if not model_dir:
            raise ParamsError("no model directory: pass --model-dir or set runconfig.model_dir")
        if args.mode == "predict" and params.runconfig.mesh is not None:
            raise ParamsError("predict does not run on runconfig.mesh (generation.mesh.MeshGenerator does, from "
                              "Python); a mesh run's checkpoint is a one-device one: add --set runconfig.mesh=null")
        job = None
        if args.mode == "predict":
            from generation import predict
            job = predict.prepare(args, params.model)      # prompts and flags checked before the model is built
        preflight.check(memory_estimate(args, params, job), args.skip_memory_check)
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
        elif args.mode == "train_and_eval":
            estimator.train_and_evaluate()
        else:
            from generation import predict
            estimator.restore(require=True)
            predict.run_job(estimator.model, job, args.output or os.path.join(model_dir, "predictions.jsonl"))
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


if __name__ == "__main__":
    sys.exit(main())
