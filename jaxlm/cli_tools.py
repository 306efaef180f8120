"""`jaxlm import | export | plot | inspect`: commands around runs (Hugging Face conversion, curves,
one-screen reports), kept apart from the training commands in `jaxlm.cli`."""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxlm.errors import UserError
from jaxlm.host_memory import one_arena


def add_tool_commands(commands: argparse._SubParsersAction, add_overrides) -> None:
    _add_hf_commands(commands)
    _add_plot(commands)
    _add_inspect(commands, add_overrides)


def _add_hf_commands(commands: argparse._SubParsersAction) -> None:
    imp = commands.add_parser(
        "import",
        help="convert a Hugging Face GPT-2 / LLaMA / BERT checkpoint into a jaxlm run directory",
        description="Read config.json and safetensors (one file or shards with an index) of a "
        "Hugging Face model directory and write a run directory whose step-0 checkpoint works "
        "with eval, generate, fill-mask, train (resume) and init_from. Nothing is downloaded.",
    )
    imp.add_argument("--hf", type=Path, required=True, help="Hugging Face model directory")
    imp.add_argument("--out", type=Path, required=True, help="run directory to create")
    imp.add_argument("--objective", choices=["clm", "mlm"], default=None,
                     help="default: clm for GPT-2 and LLaMA, mlm for BERT")
    export = commands.add_parser(
        "export",
        help="write a run's checkpoint as a Hugging Face model directory",
        description="Write config.json, safetensors, generation_config.json and the run's "
        "tokenizer files, loadable with transformers' AutoModelForCausalLM / "
        "AutoModelForMaskedLM.from_pretrained(DIR).",
    )
    export.add_argument("--run", required=True, metavar="RUN_DIR[@STEP]",
                        help="run directory, optionally @STEP (default: latest checkpoint)")
    export.add_argument("--out", type=Path, required=True, help="directory to create")
    export.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="dtype of the written tensors (default: float32)")
    export.add_argument("--max-shard-mb", type=int, default=5000,
                        help="split the safetensors into files of at most this size, with an index")


def _add_inspect(commands: argparse._SubParsersAction, add_overrides) -> None:
    inspect = commands.add_parser(
        "inspect",
        help="one screen about a run: model, mesh, checkpoints, last metrics, resumability",
        description="Architecture and parameter count, objective, tokenizer, the mesh it was "
        "trained on, checkpoints with steps and sizes, last train/eval metrics, tokens seen, wall "
        "time, and whether `jaxlm train` would resume it cleanly with the config now on disk. "
        "Reads the run without changing it.",
    )
    inspect.add_argument("run", metavar="RUN", help="run directory of `jaxlm train`")
    inspect.add_argument("--config", type=Path, default=None,
                         help="the config a resume would use (default: RUN/config.yaml)")
    add_overrides(inspect)


def _add_plot(commands: argparse._SubParsersAction) -> None:
    plot = commands.add_parser(
        "plot",
        help="draw training curves of one or more runs into a PNG",
        description="Train loss (raw and smoothed), eval loss, learning rate and tokens/s against "
        "step, from each run's metrics.jsonl; several runs are overlaid, named in the legend.",
    )
    plot.add_argument("runs", nargs="+", metavar="RUN", help="run directory of `jaxlm train`")
    plot.add_argument("--out", default="curves.png", metavar="FILE.png",
                      help="where to write the PNG (default: curves.png here)")


def _import(args: argparse.Namespace) -> None:
    from jaxlm.hf.importer import import_hf

    one_arena()
    cfg = import_hf(args.hf, args.out, args.objective)
    print(f"wrote {args.out}: {cfg.objective} model, {cfg.model.n_layers} layers, d_model "
          f"{cfg.model.d_model}, vocab {cfg.model.vocab_size}, tokenizer {cfg.data.tokenizer}")


def _export(args: argparse.Namespace) -> None:
    from jaxlm.hf.exporter import export_run

    one_arena()
    run_text, _, step_text = args.run.rpartition("@") if "@" in args.run else (args.run, "", "")
    if step_text and not step_text.isdigit():
        raise UserError(f"--run '{args.run}' must look like RUN_DIR or RUN_DIR@STEP")
    if args.max_shard_mb <= 0:
        raise UserError(f"--max-shard-mb must be positive, got {args.max_shard_mb}")
    out = export_run(Path(run_text), int(step_text) if step_text else None, args.out, args.dtype,
                     args.max_shard_mb * 2**20)
    print(f"wrote {out} ({args.dtype})")


def _plot(args: argparse.Namespace) -> None:
    from jaxlm.plot import render
    from jaxlm.run import RunDir, run_path

    runs = [RunDir(run_path(r)) for r in args.runs]
    short = [run.root.name for run in runs]
    labels = short if len(set(short)) == len(short) else [str(run.root) for run in runs]
    png = render({label: run.read_metrics() for label, run in zip(labels, runs)})
    out = run_path(args.out)
    try:
        out.write_bytes(png)
    except OSError as err:
        raise UserError(f"cannot write {out} ({err.strerror or err}); choose another --out") from None
    print(f"wrote {out} ({', '.join(labels)})")


def _inspect(args: argparse.Namespace) -> None:
    from jaxlm.inspect_run import inspect_run

    print("\n".join(inspect_run(args.run, args.config, args.overrides)))


TOOL_COMMANDS = {"import": _import, "export": _export, "plot": _plot, "inspect": _inspect}
