"""The mlxtune command line: each command parses, calls one library function, prints the result.

A user error (MlxtuneError) becomes one red line on stderr and exit code 2 (a ConfigError, one line
per problem); a bug keeps its traceback. The conversion happens inside Typer's own invocation of
the command, so an in-process test runner sees exactly what a terminal sees.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

from mlxtune.errors import ConfigError, MlxtuneError


class _Commands(TyperGroup):
    """mlxtune's commands: a user error ends as its line(s) in red and its exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MlxtuneError as e:
            for problem in e.problems if isinstance(e, ConfigError) else [str(e)]:
                typer.secho(f"error: {problem}", fg="red", err=True)
            raise typer.Exit(e.exit_code) from None
        except OSError as e:
            from mlxtune.atomic import storage_error

            # A full disk wherever it strikes (a log line, a plot) is the user's to fix, not a bug.
            friendly = storage_error(e.filename or "an output file", e)
            if friendly is None:
                raise
            typer.secho(f"error: {friendly}", fg="red", err=True)
            raise typer.Exit(friendly.exit_code) from None


# Plain Click help: Typer's rich help shows every flag with a '<bool>' type, as if it took one.
app = typer.Typer(cls=_Commands, add_completion=False, no_args_is_help=True,
                  pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Prepare data, fine-tune (LoRA, DoRA, QLoRA), fuse, serve and evaluate "
                       "LLMs with MLX.")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        import mlx.core as mx

        print(f"mlxtune {version('mlxtune')} (mlx {mx.__version__}, mlx-lm {version('mlx-lm')})")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                          help="Print the versions of mlxtune, MLX and mlx-lm.")
             ) -> None:
    """Prepare data, fine-tune (LoRA, DoRA, QLoRA), fuse, serve and evaluate LLMs with MLX."""


models_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="List, locate, inspect and convert models.")
app.add_typer(models_app, name="models")


def _table(rows: list[dict], columns: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(*columns, box=None, pad_edge=False)
    for row in rows:
        # Text, not markup: a file name like data[1].json or a dataset's name[train] shows as is.
        table.add_row(*(Text(str(row.get(c, ""))) for c in columns))
    Console(soft_wrap=True).print(table)


@models_app.command("list")
def models_list() -> None:
    """Built-in models, models mlxtune converted, and models in the Hugging Face cache."""
    from mlxtune.models.resolve import cached_models

    _table(cached_models(), ["name", "kind", "about", "path"])


@models_app.command("path")
def models_path(name: str = typer.Argument(..., help="Model folder, .gguf file, built-in name "
                                                     "or Hugging Face repo id.")) -> None:
    """Print the local MLX folder for NAME (converting or fetching it first if needed)."""
    from mlxtune.models.resolve import resolve_model

    print(resolve_model(name))


@models_app.command("info")
def models_info(name: str = typer.Argument(..., help="Any model name `models path` takes."),
                as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Architecture, parameters, quantization and size on disk of a model."""
    from mlxtune.models.info import model_info
    from mlxtune.models.resolve import resolve_model

    info = model_info(resolve_model(name))
    if as_json:
        print(json.dumps(info, indent=2))
        return
    info["parameters"] = f"{info['parameters'] / 1e6:,.1f}M"
    for key, value in info.items():
        print(f"{key:>16}  {value}")


@models_app.command("convert")
def models_convert(
    source: str = typer.Argument(..., help="Hugging Face folder or repo id, or a .gguf file."),
    out: Path = typer.Option(..., "--out", help="Folder to write the MLX model to."),
    quantize: Optional[int] = typer.Option(None, "--quantize", help="Quantize to 4 or 8 bits "
                                                                   "(also 2, 3, 5, 6)."),
    group_size: int = typer.Option(64, "--group-size", help="Quantization group size."),
) -> None:
    """Convert a model to an MLX folder, quantized the way mlx-lm writes it."""
    from mlxtune.models.convert import convert_model

    print(convert_model(source, out, quantize, group_size))


@app.command()
def prepare(
    raw: list[Path] = typer.Argument(..., help="Raw data: .json, .jsonl, .csv, .tsv, .txt, "
                                               ".parquet files, Hugging Face datasets (a "
                                               "save_to_disk folder or a hub id such as "
                                               "org/name); several are merged."),
    out: Path = typer.Option(..., "--out", help="Folder for train/valid/test.jsonl and "
                                                "report.json (replaced atomically)."),
    format_: str = typer.Option("auto", "--format", help="auto, alpaca, sharegpt, chat, "
                                "completions, text or preference (default: detected per "
                                "file)."),
    columns: Optional[str] = typer.Option(None, "--columns", help="Which fields hold what, e.g. "
                                          "prompt=Question,completion=Answer (also system=, "
                                          "text=)."),
    system: Optional[str] = typer.Option(None, "--system", help="System message for chat "
                                         "examples that have none (makes the output chat)."),
    valid_fraction: float = typer.Option(0.1, "--valid-fraction", help="Share of examples for "
                                         "valid.jsonl."),
    test_fraction: float = typer.Option(0.1, "--test-fraction", help="Share of examples for "
                                        "test.jsonl."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split (same seed, same split)."),
    model: Optional[str] = typer.Option(None, "--model", help="Count tokens with this model's "
                                        "tokenizer and chat template (weights are not loaded)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Drop examples longer "
                                             "than this (needs --model)."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first row that would be "
                                "dropped (malformed, empty, unanswered, duplicate, too long); "
                                "write nothing."),
    split: Optional[str] = typer.Option(None, "--split", help="Split of Hugging Face dataset "
                                        "inputs to read (default: train, or the only one)."),
    subset: Optional[str] = typer.Option(None, "--subset", help="Configuration (subset) of hub "
                                         "dataset inputs."),
) -> None:
    """Turn raw data into mlx-lm's train/valid/test JSONL: detect, clean, dedupe, split, report."""
    from mlxtune.prepare import PrepareOptions, prepare_dataset

    options = PrepareOptions(format=format_, columns=columns, system=system,
                             valid_fraction=valid_fraction, test_fraction=test_fraction,
                             seed=seed, model=model, max_tokens=max_tokens, strict=strict,
                             split=split, subset=subset)
    report = prepare_dataset(raw, out, options)
    for rows, names in report.tables():
        _table(rows, names)
    for note in report.notes:
        print(f"note: {note}")
    print(f"wrote {out}: train/valid/test.jsonl ({report.format}) and report.json")


@app.command()
def train(
    config: Path = typer.Argument(..., help="Training YAML (a superset of mlx_lm.lora -c)."),
    overrides: list[str] = typer.Option([], "--set", help="Override a key: --set a.b=value "
                                                          "(repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run's last checkpoint."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check config and data, print the "
                                                          "memory plan, load nothing."),
    hosts: Optional[str] = typer.Option(None, "--hosts", help="Train data-parallel on these "
                                        "hosts (comma-separated) via mlx.launch."),
    processes: Optional[int] = typer.Option(None, "-n", "--processes", help="Processes per host "
                                            "for a distributed run (mlx.launch -n)."),
    force: bool = typer.Option(False, "--force", help="Start even when the memory plan says the "
                               "run will not fit."),
) -> None:
    """Fine-tune with LoRA, DoRA or QLoRA as the YAML says; writes a run folder."""
    from mlxtune.train.run import launch_or_train

    code = launch_or_train(config, overrides, resume=resume, dry_run=dry_run, hosts=hosts,
                           processes=processes, force=force)
    if code:
        raise typer.Exit(code)


@app.command("eval")
def eval_(
    data: Path = typer.Option(..., "--data", help="Prepared data folder (its test.jsonl) or a "
                                                  "chat/completions/text JSONL file."),
    model: str = typer.Option(..., "--model", help="With --url: the model name the server "
                              "serves; else a local model (folder, .gguf, built-in, repo id)."),
    out: Path = typer.Option(..., "--out", help="Folder for results.jsonl, summary.json and "
                                                "report.html."),
    url: Optional[str] = typer.Option(None, "--url", help="OpenAI-compatible API base URL, e.g. "
                                      "http://127.0.0.1:8080/v1."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="Adapter folder for a local "
                                           "model (a run folder of mlxtune train)."),
    compare: Optional[str] = typer.Option(None, "--compare", help="A second model (typically the "
                                          "base) to answer the same prompts."),
    metrics: Optional[str] = typer.Option(None, "--metrics", help="Comma-separated: exact, "
                                          "contains, rouge, chrf, bleu, json (default: all "
                                          "but bleu)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N examples."),
    concurrency: int = typer.Option(4, "--concurrency", help="Requests in flight to a server."),
    max_tokens: int = typer.Option(256, "--max-tokens", help="Longest answer, in tokens."),
    timeout: float = typer.Option(120.0, "--timeout", help="Seconds to wait for one answer."),
    retries: int = typer.Option(3, "--retries", help="Retries of a failed request."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="API key (default: "
                                          "$OPENAI_API_KEY, else none)."),
    resume: bool = typer.Option(False, "--resume", help="Finish an interrupted eval in --out."),
    response_format: Optional[Path] = typer.Option(None, "--response-format", help="JSON file: "
                                                   "a JSON Schema (or a whole OpenAI "
                                                   "response_format) sent with every request "
                                                   "(needs --url)."),
) -> None:
    """Answer the test prompts with a server or a local model, score them, compare two models."""
    from mlxtune.evaluate.run import run_eval

    summary = run_eval(data, out, model, url=url, adapter=adapter, compare=compare,
                       metrics=metrics, limit=limit, concurrency=concurrency,
                       max_tokens=max_tokens, timeout=timeout, retries=retries, api_key=api_key,
                       resume=resume, response_format=response_format)
    _table(*reversed(summary.table()))
    print(f"results in {out}: {summary.written}")


@app.command()
def fuse(
    out: Optional[Path] = typer.Option(None, "--out", help="Folder to write the fused model to."),
    run: Optional[Path] = typer.Option(None, "--run", help="Run folder of mlxtune train "
                                       "(runs/NAME)."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="Adapter folder "
                                           "(adapters.safetensors + adapter_config.json)."),
    model: Optional[str] = typer.Option(None, "--model", help="Base model (default: the one the "
                                        "adapter was trained on)."),
    dequantize: bool = typer.Option(False, "--dequantize", help="Write fp16 weights "
                                    "(transformers loads them) instead of re-quantizing."),
    gguf: Optional[Path] = typer.Option(None, "--gguf", help="Also write this GGUF file "
                                        "(llama-family models)."),
    gguf_type: str = typer.Option("f16", "--gguf-type", help="GGUF weights: f16, q8_0 or q4_0."),
    ollama: Optional[Path] = typer.Option(None, "--ollama", help="Also write this folder: the "
                                          "model as GGUF and a Modelfile for `ollama create`."),
    gguf_adapter: Optional[Path] = typer.Option(None, "--gguf-adapter", help="Write the adapter "
                                                "alone as a llama.cpp GGUF LoRA file (no --out "
                                                "needed)."),
) -> None:
    """Merge an adapter into its base model; report how much the merge moved the logits."""
    from mlxtune.fuse import fuse as fuse_adapter

    fuse_adapter(out, run=run, adapter=adapter, model=model, dequantize=dequantize, gguf=gguf,
                 gguf_type=gguf_type, ollama=ollama, gguf_adapter=gguf_adapter)


@app.command()
def serve(
    model: Optional[str] = typer.Option(None, "--model", help="Base model (default: the --run's)."),
    adapters: list[str] = typer.Option([], "--adapter", help="NAME=DIR: serve this adapter as "
                                       "model NAME (repeatable)."),
    run: Optional[Path] = typer.Option(None, "--run", help="Serve this run's adapter under the "
                                       "run's name, on its base model."),
    fuse_run: bool = typer.Option(False, "--fuse", help="Fuse the --run adapter into the base in "
                                  "memory instead of swapping it per request."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8080, "--port", help="Port to listen on."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Require 'Authorization: "
                                          "Bearer KEY' on every /v1 request."),
    max_loras: int = typer.Option(4, "--max-loras", help="Adapters resident in the batch step "
                                  "(stacked); the least recently used idle one leaves first."),
    max_cpu_loras: Optional[int] = typer.Option(None, "--max-cpu-loras", min=0, help="More "
                                                "adapters kept in host memory (default: "
                                                "--max-loras); the rest reload from disk."),
    max_lora_rank: int = typer.Option(64, "--max-lora-rank", help="Refuse adapters of higher "
                                      "rank."),
    max_batch: int = typer.Option(8, "--max-batch", help="Requests generated together, whatever "
                                  "adapter each asks for."),
    max_queue: int = typer.Option(64, "--max-queue", min=0, help="Requests that may wait beyond "
                                  "the running batch; more get 429 with Retry-After."),
    no_ui: bool = typer.Option(False, "--no-ui", help="Do not serve the playground page at /."),
    request_timeout: float = typer.Option(600.0, "--request-timeout", min=0.001,
                                          help="Seconds a request may take, waiting included; "
                                          "then it stops and gets 408."),
) -> None:
    """Serve a base model and its adapters with an OpenAI-compatible HTTP API (and a playground
    page at / to chat with two of them side by side)."""
    from mlxtune.serve import serve as run_server

    run_server(model, adapters, run, fuse_run, host, port, api_key, max_loras, max_lora_rank,
               max_batch, max_queue, ui=not no_ui, max_cpu_loras=max_cpu_loras,
               request_timeout=request_timeout)


@app.command()
def doctor(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Platform, MLX backend, BLAS speed, memory, and what to do about anything slow."""
    from mlxtune.platform import system_report

    report = system_report()
    if as_json:
        print(json.dumps(report, indent=2))
        return
    for key in ("os", "python", "chip", "cores", "memory_gb", "available_gb", "mlx", "backend"):
        print(f"{key:>18}  {report[key]}")
    print(f"{'blas':>18}  {', '.join(report['blas']) or '(none found in this process)'}")
    fast = report["fast_blas"]
    print(f"{'fast blas':>18}  {fast['fast_blas']}; preloaded {fast['preloaded'] or 'nothing'}; "
          f"core type {fast['coretype'] or 'auto'}; candidates {', '.join(fast['found']) or 'none'}")
    if fast["measured"]:
        figures = ", ".join(f"{name} {m['gflops']}" if "gflops" in m else f"{name} failed"
                            for name, m in fast["measured"].items())
        print(f"{'blas pick':>18}  {fast['picked']} (measured on this CPU, GFLOP/s: {figures})")
    else:
        print(f"{'blas pick':>18}  not measured on this CPU: python -m mlxtune.blas --pick")
    print(f"{'cpu matmul':>18}  {report['cpu_matmul_gflops']} GFLOP/s (fp32, 1024x1024)")
    print(f"{'cpu kernels':>18}  {report['cpu_kernels']}")
    for line in report["advice"] or ["nothing to fix"]:
        print(f"{'advice':>18}  {line}")


def main() -> None:
    """Entry point: preload the fast BLAS, then run the app."""
    from mlxtune.blas import preload_fast_blas

    # Before anything imports MLX: on Linux CPU this re-executes once with OpenBLAS preloaded.
    preload_fast_blas()
    # The name is set: the BLAS re-exec runs us as `python -m mlxtune`.
    app(prog_name="mlxtune")


if __name__ == "__main__":
    main()
