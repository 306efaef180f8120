"""`jaxlm train | eval | generate | fill-mask | predict | tokenizer | import | export | plot |
inspect`: argument parsing and the user-error boundary (exit code 2)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NoReturn

from jaxlm.config import SHIPPED_CONFIGS, config_path, shipped_config_names
from jaxlm.cli_tools import TOOL_COMMANDS, add_tool_commands
from jaxlm.errors import TrainingStopped, UserError
from jaxlm.host_memory import keep_freed_memory
from jaxlm.ranges import AT_LEAST_0, AT_LEAST_1, SEED, Range

if TYPE_CHECKING:
    from jaxlm.config import Config

DEFAULT_CONFIG_NAME = "tiny_clm"
INTERRUPTED = 130  # exit code of a command stopped by Ctrl-C (128 + SIGINT), as shells report it
DEFAULT_CONFIG = SHIPPED_CONFIGS / f"{DEFAULT_CONFIG_NAME}.yaml"  # its file (tools/ take paths)


class _Parser(argparse.ArgumentParser):
    """Reports a bad command line as one line and exit code 2, like every other bad input."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see {self.prog} --help)")


def _number(kind: type, allowed: Range) -> Callable[[str], float]:
    """An argparse type: the flag's text as `kind`, refused outside `allowed`."""

    def parse(text: str) -> float:
        value = kind(text)  # a ValueError here is argparse's "invalid int value"
        if value not in allowed:
            raise argparse.ArgumentTypeError(f"must be {allowed.describe(kind)}, got {value}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value, parsed as YAML (repeatable), e.g. --set train.steps=100",
    )


def _add_distributed(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "multi-process",
        "Several processes form one job (one per host or GPU). TPU pods, SLURM and the "
        "JAX_COORDINATOR_ADDRESS/... environment variables are detected; these flags are explicit.",
    )
    group.add_argument("--coordinator", metavar="HOST:PORT", default=None,
                       help="address of process 0's coordinator service")
    group.add_argument("--num-processes", type=_number(int, AT_LEAST_1), default=None,
                       help="processes in the job")
    group.add_argument("--process-id", type=_number(int, AT_LEAST_0), default=None,
                       help="this process's index")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="jaxlm",
        description="Train, evaluate and sample Transformer language models with JAX/Flax.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="train a model (resumes automatically if the run directory holds checkpoints)",
        description="Train from a YAML config. Re-running with the same run directory resumes "
        "from its latest checkpoint, data position included.",
    )
    train.add_argument(
        "--config",
        default=DEFAULT_CONFIG_NAME,
        metavar="FILE|NAME",
        help="YAML config file, or the name of a config shipped with jaxlm "
        f"({', '.join(shipped_config_names())}; default: {DEFAULT_CONFIG_NAME})",
    )
    _add_overrides(train)
    _add_distributed(train)
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.add_argument(
        "--dry-run",
        action="store_true",
        help="compile the train step for the configured mesh without data or training; print "
        "each param's sharding, the parameter count and per-device memory",
    )
    train.add_argument(
        "--topology",
        default=None,
        metavar="SLICE",
        help="with --dry-run: compile for this TPU slice instead of the devices present (e.g. "
        "v5e-256, v6e-64, v4-32, v5p-128; needs libtpu, not a TPU) and say whether the step fits "
        "its HBM; exit 1 if it does not",
    )
    train.add_argument(
        "--force-resume",
        action="store_true",
        help="resume even if the config now differs in keys that change the experiment "
        "(model, data, seed); without it such a resume is refused",
    )
    train.add_argument(
        "--stop-at",
        type=_number(int, AT_LEAST_1),
        default=None,
        metavar="STEP",
        help="end this session at STEP with a checkpoint; rerun to continue (time-sliced jobs)",
    )

    run_help = "run directory written by `jaxlm train` (holds checkpoints/ and config.yaml)"
    evaluate = commands.add_parser(
        "eval",
        help="evaluate a checkpoint on the validation split",
        description="Validation loss, perplexity, bits per byte and token accuracy of a "
        "checkpoint, restored onto whatever devices are present.",
    )
    evaluate.add_argument("--run", required=True, help=run_help)
    evaluate.add_argument("--step", type=_number(int, AT_LEAST_0), default=None,
                          help="checkpoint step (default: latest)")
    evaluate.add_argument("--batches", type=_number(int, AT_LEAST_1), default=None,
                          help="evaluate only this many batches (default: all)")
    evaluate.add_argument("--split", default=None, help="split to evaluate (default: data.eval_split)")
    evaluate.add_argument(
        "--pseudo-ppl-examples", type=_number(int, AT_LEAST_0), default=None, metavar="N",
        help="mlm runs: rows scored by pseudo-perplexity, each token masked in turn "
        "(default: train.pseudo_ppl_examples; 0 skips it)",
    )
    _add_overrides(evaluate)
    _add_distributed(evaluate)

    generate = commands.add_parser(
        "generate",
        help="sample a continuation of a prompt from a causal LM (or an encoder-decoder's output)",
        description="Sample text from a trained causal LM, all prompts as one batch with a KV "
        "cache. The context window (model.max_seq_len) does not slide: a row stops when prompt "
        "plus continuation fill it (a longer prompt keeps its last max_seq_len - 1 tokens). An "
        "encoder-decoder reads each prompt as its input (its first data.seq_len tokens) and "
        "writes up to max_seq_len tokens.",
    )
    generate.add_argument("--run", required=True, help=run_help)
    generate.add_argument(
        "--prompt",
        action="append",
        help="text to continue (default: empty); repeat for a batch, printed as one JSON line "
        'per prompt: {"prompt": ..., "text": ...}',
    )
    generate.add_argument("--step", type=_number(int, AT_LEAST_0), default=None,
                          help="checkpoint step (default: latest)")
    generate.add_argument("--max-new-tokens", type=_number(int, AT_LEAST_1), default=200,
                          help="tokens to sample at most")
    generate.add_argument("--temperature", type=_number(float, AT_LEAST_0), default=0.8,
                          help="softmax temperature; 0 means greedy")
    generate.add_argument("--top-k", type=_number(int, AT_LEAST_0), default=40,
                          help="sample from the k likeliest; 0 = all")
    generate.add_argument(
        "--top-p",
        type=_number(float, Range(0, 1, open_low=True)),
        default=1.0,
        help="nucleus sampling: from the likeliest tokens whose probability reaches p; 1 = all",
    )
    generate.add_argument("--seed", type=_number(int, SEED), default=0, help="sampling seed")
    _add_input_file(generate, "seq2seq and seq2seq_lm runs: complete the input of each record "
                    "(JSONL, or CSV by its .csv suffix; field data.fields.input), printed as one "
                    "JSON line per record: "
                    '{"input": ..., "text": ...}')
    _add_overrides(generate)
    _add_predict(commands, run_help)

    fill = commands.add_parser(
        "fill-mask",
        help="predict the tokens behind each [MASK] in a text (masked-LM checkpoints)",
        description="Print the top-k tokens, with probabilities, for each [MASK] in TEXT.",
    )
    fill.add_argument("text", help="text with one or more [MASK], e.g. 'def [MASK](self):'")
    fill.add_argument("--run", required=True, help=run_help)
    fill.add_argument("--step", type=_number(int, AT_LEAST_0), default=None,
                      help="checkpoint step (default: latest)")
    fill.add_argument("--top-k", type=_number(int, AT_LEAST_1), default=5,
                      help="candidates shown per mask")
    _add_overrides(fill)

    tokenizer = commands.add_parser(
        "tokenizer",
        help="train a SentencePiece tokenizer on a config's training split",
        description="Tokenizer tools.",
    )
    tokenizer_commands = tokenizer.add_subparsers(dest="tokenizer_command", required=True,
                                                  metavar="ACTION", help="train: a new model")
    train_tok = tokenizer_commands.add_parser(
        "train",
        help="train a SentencePiece model and write it where data.tokenizer points",
        description="Train a SentencePiece model (specials reserved like the byte tokenizer, byte "
        "fallback, lossless on any text) on the configured dataset's training split and write it "
        "to the PATH of the config's data.tokenizer: sentencepiece:PATH.",
    )
    train_tok.add_argument("--config", required=True, metavar="FILE|NAME",
                           help="YAML config file, or the name of a config shipped with jaxlm")
    train_tok.add_argument("--vocab-size", type=_number(int, AT_LEAST_1), required=True,
                           help="pieces, specials included")
    train_tok.add_argument("--model-type", choices=["unigram", "bpe"], default="unigram",
                           help="SentencePiece algorithm (default: unigram)")
    train_tok.add_argument("--max-documents", type=_number(int, AT_LEAST_1), default=100_000,
                           help="train on at most this many documents of the split")
    _add_overrides(train_tok)
    add_tool_commands(commands, _add_overrides)
    return parser


def _train(args: argparse.Namespace) -> int:
    from jaxlm import distributed
    from jaxlm.config import load_config
    from jaxlm.sharding import use_cpu_devices
    from jaxlm.train import train

    cfg = load_config(config_path(args.config), args.overrides)
    use_cpu_devices(cfg.mesh, cfg.train.batch_size, cfg.train.grad_accum_steps,
                    single_process=not distributed.joins_job(args.coordinator))
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    if args.dry_run:
        return _dry_run(cfg, args.topology)
    if args.topology:
        raise UserError("--topology describes a TPU slice to compile for: use it with --dry-run")
    train(
        cfg,
        show_progress=not args.no_progress,
        stop_at=args.stop_at,
        force_resume=args.force_resume,
    )
    return 0


def _dry_run(cfg: Config, topology: str | None) -> int:
    """Exit 1 when the step does not fit the devices' memory, so a launch script can stop."""
    from jaxlm.dryrun import dry_run
    from jaxlm.run import resolve
    from jaxlm.tokenizer import load_tokenizer

    cfg = resolve(cfg, load_tokenizer(cfg.data.tokenizer))
    if topology is None:
        report = dry_run(cfg)
    else:
        from jaxlm.topology import describe

        target = describe(topology)
        print(f"compiling for {target.name} ({target.libtpu_name}, {len(target.devices)} devices)")
        report = dry_run(cfg, target.devices, target.hbm_bytes)
    return 1 if report.get("fits") is False else 0


def _eval(args: argparse.Namespace) -> None:
    import jax

    from jaxlm import distributed
    from jaxlm.run import RunDir, load_run
    from jaxlm.data import open_split
    from jaxlm.evaluate import Evaluator
    from jaxlm.task_eval import exact_match
    from jaxlm.tokenizer import load_tokenizer

    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    cfg, setup, params, step = load_run(args.run, args.step, args.overrides)
    if args.pseudo_ppl_examples is None:
        args.pseudo_ppl_examples = cfg.train.pseudo_ppl_examples
    split = args.split or cfg.data.eval_split
    source, tokenizer = open_split(cfg.data, split, cfg.objective), load_tokenizer(cfg.data.tokenizer)
    evaluator = Evaluator(setup, source, tokenizer, RunDir(args.run).read_labels(cfg.model.num_labels))
    result = {"run": str(args.run), "step": step, "split": split, **evaluator(params, args.batches)}
    if cfg.objective == "mlm" and args.pseudo_ppl_examples:
        result.update(evaluator.pseudo_perplexity(params, args.pseudo_ppl_examples))
    if cfg.objective in ("seq2seq_lm", "seq2seq"):  # greedy outputs of as many records as batches hold
        count = args.batches * cfg.train.batch_size if args.batches else len(source)
        result.update(exact_match(setup, params, tokenizer, source, count))
    if jax.process_index() == 0:
        print(json.dumps(result))


def _generate(args: argparse.Namespace) -> None:
    from jaxlm.run import load_run
    from jaxlm.generate import generate
    from jaxlm.config import architecture
    from jaxlm.tokenizer import load_tokenizer

    cfg, setup, params, _ = load_run(args.run, args.step, args.overrides)
    if architecture(cfg) == "encoder" or cfg.objective == "classify":
        raise UserError(f"generate needs a causal LM or an encoder-decoder; {args.run} was trained "
                        f"with {cfg.objective}")
    if cfg.objective == "span_corruption":
        raise UserError(f"{args.run} was pretrained with span_corruption, which writes sentinel "
                        "ids, not text: fine-tune it with objective seq2seq, then generate")
    if args.input_file is not None:
        from jaxlm.cli_tasks import generate_file

        generate_file(args, cfg, setup, params)
        return
    prompts = args.prompt or [""]
    texts = generate(
        setup,
        params,
        load_tokenizer(cfg.data.tokenizer),
        prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    if len(prompts) == 1:  # a decoder's continuation follows its prompt; an encoder-decoder's not
        print(texts[0] if architecture(cfg) == "encoder_decoder" else prompts[0] + texts[0])
        return
    for prompt, text in zip(prompts, texts):
        print(json.dumps({"prompt": prompt, "text": text}))


def _add_input_file(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--input-file", type=Path, default=None, metavar="FILE", help=help_text)


def _add_predict(commands: argparse._SubParsersAction, run_help: str) -> None:
    predict = commands.add_parser(
        "predict",
        help="label each record of a file with a classify checkpoint",
        description="Print one JSON line per record of FILE: the predicted label and its "
        "probability (and the record's own label, where it has one).",
    )
    predict.add_argument("--run", type=Path, required=True, help=run_help)
    _add_input_file(predict, "JSONL, or CSV by its .csv suffix, with the run's data.fields "
                    "(text, optional text_pair and label)")
    predict.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    _add_overrides(predict)


def _predict(args: argparse.Namespace) -> None:
    from jaxlm.cli_tasks import predict

    predict(args)


def _fill_mask(args: argparse.Namespace) -> None:
    from jaxlm.run import load_run
    from jaxlm.fill_mask import MASK_TEXT, fill_mask
    from jaxlm.tokenizer import load_tokenizer

    if MASK_TEXT not in args.text:
        raise UserError(f"fill-mask text has no {MASK_TEXT}; write {MASK_TEXT} where a token is missing")
    cfg, setup, params, _ = load_run(args.run, args.step, args.overrides)
    if cfg.objective != "mlm":
        raise UserError(f"fill-mask needs a masked LM; {args.run} was trained with objective "
                        f"{cfg.objective} (use `jaxlm generate`)")
    answers = fill_mask(setup, params, load_tokenizer(cfg.data.tokenizer), args.text, args.top_k)
    for number, candidates in enumerate(answers, 1):
        listed = "  ".join(f"{text!r} {prob:.3f}" for text, prob in candidates)
        print(f"{MASK_TEXT} {number}: {listed}")


def _tokenizer(args: argparse.Namespace) -> None:
    from jaxlm.config import load_config
    from jaxlm.data import open_split
    from jaxlm.tokenizer import sentencepiece_path, train_sentencepiece

    cfg = load_config(config_path(args.config), args.overrides)
    output = sentencepiece_path(cfg.data.tokenizer)
    if output is None:
        raise UserError(f"data.tokenizer is '{cfg.data.tokenizer}'; set it to sentencepiece:PATH "
                        "(in the config or with --set) to say where the model goes")
    source = open_split(cfg.data, cfg.data.train_split)
    count = min(len(source), args.max_documents)
    texts = (source[i].decode("utf-8", errors="replace") for i in range(count))
    tokenizer = train_sentencepiece(texts, output, vocab_size=args.vocab_size,
                                    model_type=args.model_type)
    print(f"wrote {output}: {tokenizer.vocab_size} pieces ({args.model_type}) from {count} documents")




def main(argv: list[str] | None = None) -> int:
    commands = {"train": _train, "eval": _eval, "generate": _generate, "fill-mask": _fill_mask,
                "predict": _predict, "tokenizer": _tokenizer, **TOOL_COMMANDS}
    try:
        args = build_parser().parse_args(argv)
        if args.command in ("train", "eval"):  # steps over and over; before jax starts threads
            keep_freed_memory()
        code = commands[args.command](args)
    except UserError as err:
        print(f"jaxlm: error: {err}", file=sys.stderr)
        return 2
    except TrainingStopped as err:
        print(f"jaxlm: stopped: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # train turns Ctrl-C into TrainingStopped; other commands end here
        print("jaxlm: interrupted; run the same command again to redo it", file=sys.stderr)
        return INTERRUPTED
    return code or 0


def run_main() -> None:
    """Console entry point. After a stopped or interrupted command everything of ours is closed,
    but a failed or interrupted Orbax write can leave its I/O threads behind, which would print
    tracebacks while the interpreter shuts down: exit without that shutdown. A command that only
    reads a run and prints skips it too: tearing down jax's and flax's modules takes ~0.3 s of a
    3 s `generate`.

    No notebook runs in this process, so IPython (which flax imports for its reprs where it is
    installed: 0.2 s) is not imported."""
    sys.modules.setdefault("IPython", None)
    code = main()
    if code in (1, INTERRUPTED) or (code == 0 and sys.argv[1:2] in (["generate"], ["fill-mask"],
                                                                      ["predict"])):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
