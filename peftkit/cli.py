"""The `peftkit` command: parse arguments, call one function, print. No logic lives here."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from peftkit import __version__
from peftkit.errors import PeftkitError, Terminated, is_disk_full, is_file_too_large
from peftkit.train import RESUME_KEYWORDS, RESUME_LAST
from peftkit.utils.once import command_scope


PLUGIN_COMMANDS = ("peftkit.export.commands", "peftkit.evaluate.commands")


def positive_int(text: str) -> int:
    """argparse type for counts such as --max-new-tokens: a usage error names the flag, before anything loads."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _message(value: str) -> str:
    if not value.strip():  # an unset shell variable, most likely: the model would answer nothing in particular
        raise argparse.ArgumentTypeError("is empty; give the message to answer, or leave --prompt out to chat")
    return value


def _console() -> Any:
    from peftkit.utils.console import stdout_console

    return stdout_console(highlight=False, soft_wrap=True)  # piped output: no hard line breaks inside shown data


class _CurrentStderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Plain `LEVEL message` lines on sys.stderr as it is at each record (redirected or captured later too)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _log_handler() -> logging.Handler:
    """Log lines go to stderr, apart from what a command prints (`chat --prompt ... > reply.txt`): rich's layout on a
    terminal, plain unwrapped lines in a file or pipe (rich wraps those at 80 columns)."""
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        return RichHandler(console=Console(stderr=True), show_path=False, show_time=False, markup=False)
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter("%(levelname)-8s %(message)s"))
    return handler


@contextlib.contextmanager
def _progress_bars_for_logs() -> Iterator[None]:
    """In a file or pipe (nohup, a scheduler's job log) a progress bar redraws itself with a carriage return ten times
    a second, all of it kept: there the bars update every 30 s instead, while the command runs (the longest interval
    too: tqdm's monitor thread otherwise forces a redraw after 10 s). tqdm reads TQDM_* once, when first imported
    (transformers' trainer imports it), and launched workers inherit the setting; one the user set is kept, and a
    calling program (a notebook, a script) gets its environment back after `main()` (a tqdm it imported first keeps
    its own intervals)."""
    if sys.stderr.isatty() or "TQDM_MININTERVAL" in os.environ:
        yield
        return
    longest = "TQDM_MAXINTERVAL" not in os.environ
    os.environ["TQDM_MININTERVAL"] = "30"
    if longest:
        os.environ["TQDM_MAXINTERVAL"] = "30"
    try:
        yield
    finally:
        os.environ.pop("TQDM_MININTERVAL", None)
        if longest:
            os.environ.pop("TQDM_MAXINTERVAL", None)


def _setup_logging(verbose: bool) -> None:
    from peftkit.utils.once import track_warnings

    handler = _log_handler()
    track_warnings(handler)  # a launched worker keeps back the warnings its launcher showed
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[handler])
    # Under a launcher every rank runs this: global rank 0 tells the story; the first process on each other node
    # warns (what it finds there), the rest only report errors (each would repeat rank 0's warnings).
    rank, local_rank = (int(os.environ.get(name, "0") or 0) for name in ("RANK", "LOCAL_RANK"))
    level = logging.INFO if rank == 0 else logging.WARNING if local_rank == 0 else logging.ERROR
    logging.getLogger("peftkit").setLevel(logging.DEBUG if verbose else level)
    # bitsandbytes warns on import that optional hub-fetched CPU kernels are absent; nothing to act on. (That notice
    # and DeepSpeed's "Setting accelerator to CPU" are dropped for Python users too: `import peftkit`.)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()
    if rank == 0:
        transformers.logging.enable_progress_bar()
    else:  # "Loading weights" once, not once per process
        transformers.logging.disable_progress_bar()


def cmd_validate(args: argparse.Namespace) -> int:
    from peftkit.config.schema import method_label
    from peftkit.config.validate import validate_recipe
    from peftkit.train.launch import LaunchError, LaunchOptions, check_launch, check_process_count, load_train_recipe

    recipe, _ = load_train_recipe(args)  # a recipe file or a run directory, with --deepspeed as `train` takes it
    recipe = validate_recipe(recipe, check_model=not args.no_model)  # as it will run (a default length fitted)
    options = LaunchOptions.from_args(args)  # what `train` with these flags would refuse, before it loads anything
    if options.nproc * options.nnodes > 1 or options.hostfile:
        check_launch(recipe, options)
    elif problems := options.problems():
        raise LaunchError("; ".join(problems))
    check_process_count(recipe, options)
    if not Path(args.recipe).is_dir():  # a run directory's own recipe names that run: nothing to warn of
        _warn_if_output_dir_is_taken(recipe)
    check_data = not args.no_model and recipe.task == "causal_lm"
    tokenizer = None
    if check_data or (args.show_data and recipe.task == "causal_lm"):
        from peftkit.models import load_tokenizer

        tokenizer = load_tokenizer(recipe.model)
    data_line = _tokenized_data_line(recipe, tokenizer) if check_data else None
    if not args.no_model and recipe.task == "sequence_classification":
        data_line = _labeled_data_line(recipe)
    from rich.text import Text

    unchecked = (" without the checks that read the model (target modules, sizes, tokenized data: --no-model)"
                 if args.no_model else "")
    _console().print(Text.assemble(("OK", "green"), f" {args.recipe}: recipe is valid ({method_label(recipe.adapter)} on "
                                   f"{recipe.model.name}){unchecked}"))
    if data_line:
        _console().print(data_line, markup=False)
    if args.show_data and recipe.task == "causal_lm":
        _show_data(recipe, tokenizer, args.show_data)
    elif args.show_data:
        _show_labeled_data(recipe, args.show_data)
    return 0


def _warn_if_output_dir_is_taken(recipe: Any) -> None:
    """What `train` (without --resume / --force) would say of the recipe's output_dir, said as a warning: the
    recipe is valid, and the flags decide."""
    from peftkit.errors import RunDirError
    from peftkit.train.run_dir import check_run_dir, in_use, training_in

    try:
        holder = training_in(Path(recipe.output_dir))
        if holder is not None:  # what a run still training looks like to the check below is beside the point
            raise in_use(Path(recipe.output_dir), holder)
        check_run_dir(Path(recipe.output_dir), resume=False, force=False, recipe_dump=recipe.model_dump(mode="json"))
    except RunDirError as exc:
        logging.getLogger("peftkit").warning("`peftkit train` would refuse to start: %s", exc)
    except OSError as exc:  # a folder this user cannot read: train says so when it gets there
        logging.getLogger("peftkit").warning("output_dir %s cannot be checked here: %s", recipe.output_dir,
                                             exc.strerror or exc)


def _tokenized_data_line(recipe: Any, tokenizer: Any) -> str:
    """Tokenize the data as training will (raising what training would), and say how much of it fits."""
    from peftkit.data import build_datasets
    from peftkit.data.build import data_summary_line
    from peftkit.models import resolve_model_ref
    from peftkit.train.run import check_chat_asks, check_data_fits_vocabulary, warn_if_one_batch_holds_all

    check_chat_asks(recipe, tokenizer)  # each as training will say it
    data = build_datasets(recipe.data, tokenizer, recipe.train.seed)
    source = resolve_model_ref(recipe.model.name, revision=recipe.model.revision, allow_pickle=recipe.model.allow_pickle)
    check_data_fits_vocabulary(recipe, data, tokenizer, source)
    warn_if_one_batch_holds_all(recipe, len(data.train))
    return data_summary_line(data.stats, recipe.data.max_seq_len)


def _show_data(recipe: Any, tokenizer: Any, count: int) -> None:
    """The first training rows as the model sees them (its eval split left out), trained tokens highlighted."""
    from rich.text import Text

    from peftkit.data.build import supervised_segments, tokenize_examples, train_eval_examples
    from peftkit.data.chat import trained_count

    console = _console()
    console.print(Text.assemble("Trained tokens are shown ", ("[[like this]]", "bold green"), "; the rest is context only."))
    shown = 0
    for example in train_eval_examples(recipe.data, recipe.train.seed)[0]:
        rows, _ = tokenize_examples([example], tokenizer, recipe.data.max_seq_len, recipe.data.system_prompt,
                                    train_on_prompt=recipe.data.train_on_prompt, what=None)  # counted above already
        for row in rows[: count - shown]:
            shown += 1
            text = Text(f"--- row {shown} ({example.where}): {len(row['input_ids'])} tokens, "
                        f"{trained_count(row['labels'])} trained ---\n")
            for piece, trained in supervised_segments(row, tokenizer):
                text.append(f"[[{piece}]]" if trained else piece, style="bold green" if trained else None)
            console.print(text)
        if shown >= count:
            break


def _labeled_data_line(recipe: Any) -> str:
    """A classifier's data as training will split it: texts per label, eval and held-out texts (as chat recipes get
    their `Data:` line; read without the tokenizer)."""
    from peftkit.data.classification import label_names, labeled_train_eval, load_labeled

    items = load_labeled(recipe.data.train, recipe.data.columns)
    train, evals = labeled_train_eval(recipe.data, recipe.train.seed, items)
    labels = label_names(items)
    shown = ", ".join(f"{sum(i.label == name for i in train)} {name!r}" for name in labels[:MAX_LABELS_SHOWN])
    shown += f", ... ({len(labels)} labels)" if len(labels) > MAX_LABELS_SHOWN else ""
    parts = [f"{len(train)} training texts ({shown})", f"{len(evals)} eval texts"]
    if recipe.data.heldout:
        parts.append(f"{len(load_labeled(recipe.data.heldout, recipe.data.columns))} held-out texts")
    return "Data: " + ", ".join(parts)


MAX_LABELS_SHOWN = 6


def _show_labeled_data(recipe: Any, count: int) -> None:
    """A classifier's first training rows: the text as its tokenizer reads it (plain text, no chat template) and the
    label it learns; the whole text is input, the label the only target."""
    from peftkit.data.classification import labeled_train_eval
    from peftkit.models import resolve_model_ref
    from peftkit.train.classification import load_classification_tokenizer

    source = resolve_model_ref(recipe.model.name, revision=recipe.model.revision, allow_pickle=recipe.model.allow_pickle)
    tokenizer = load_classification_tokenizer(recipe, source)
    items = labeled_train_eval(recipe.data, recipe.train.seed)[0]  # as training splits it
    console = _console()
    for shown, item in enumerate(items[:count], start=1):
        ids = tokenizer(item.text, truncation=True, max_length=recipe.data.max_seq_len)["input_ids"]
        console.print(f"--- row {shown} ({item.where}): {len(ids)} tokens, label {item.label!r} ---", markup=False)
        console.print(tokenizer.decode(ids), markup=False)


def cmd_train(args: argparse.Namespace) -> int:
    from peftkit.train.launch import train_command  # one process, or --nproc/--hostfile workers

    return train_command(args, _console())


def cmd_chat(args: argparse.Namespace) -> int:
    from peftkit.runs import (
        is_model_folder, load_run, read_run_recipe, require_chat_run, trained_model_dir, use_run_threads,
    )
    from peftkit.serve.chat import chat

    if is_model_folder(args.run_dir):
        folder = Path(args.run_dir).resolve()  # `peftkit chat .` inside RUN/model has a parent too
        if trained_model_dir(folder.parent) == folder and (folder.parent / "recipe.yaml").is_file():
            args.run_dir = str(folder.parent)  # a full fine-tune's weights: chat with its run
        else:
            return _chat_with_model_folder(args)
    recipe = read_run_recipe(args.run_dir)
    require_chat_run(recipe, args.run_dir, "chat")
    use_run_threads(recipe, "chatting")
    system_prompt = recipe.data.system_prompt if args.system is None else (args.system or None)
    from peftkit.data.formats import read_tools

    tools = read_tools(args.tools) if args.tools else None
    if tools:  # before the weights load: a template that leaves tools out needs only the tokenizer to tell
        from peftkit.data.chat import check_tools_shown
        from peftkit.runs import read_run_tokenizer

        check_tools_shown(read_run_tokenizer(Path(args.run_dir), recipe.model), tools, system_prompt)
    run = load_run(args.run_dir, quantized_base=args.qlora_base == "quantized")
    chat(
        run.model,
        run.tokenizer,
        system_prompt=system_prompt,
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        tools=tools,
    )
    return 0


def _chat_with_model_folder(args: argparse.Namespace) -> int:
    """`peftkit chat RUN/merged` (or any model folder): the model as exported, with its chat template's own system
    prompt (a merged run's is the recipe's) unless --system is given."""
    from peftkit.errors import RunDirError
    from peftkit.models import resolve_device
    from peftkit.runs import load_model_folder
    from peftkit.serve.chat import chat
    from peftkit.utils.threads import choose_run_threads

    if args.qlora_base != "quantized":
        raise RunDirError(f"--qlora-base is for run directories; {args.run_dir} is a model folder, its weights are "
                         "loaded as they are")
    from peftkit.data.formats import read_tools

    tools = read_tools(args.tools) if args.tools else None
    choose_run_threads(None, "chatting", on_cpu=resolve_device("auto") == "cpu")
    model, tokenizer = load_model_folder(args.run_dir)
    chat(model, tokenizer, system_prompt=None if args.system is None else (args.system or None), prompt=args.prompt,
         max_new_tokens=args.max_new_tokens, tools=tools)
    return 0


def _cached_model_note(folder: Path) -> str:
    """`  (1.2 GB, from /path/model.gguf)`: which file a cached conversion came from, and what deleting it frees."""
    from peftkit.models.gguf_convert import files_served_by

    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    try:
        marker = json.loads((folder / "peftkit_source.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        marker = None
    source = marker.get("converted_from") if isinstance(marker, dict) else None
    source = source if isinstance(source, str) else None
    with contextlib.suppress(OSError):
        if source and not Path(source).exists():  # a venv since removed, a download since moved
            source += ", a file no longer there"
            copies = files_served_by(folder)
            source += f"; used for {', '.join(copies)}, the same file under another name" if copies else ""
    shown = f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.0f} MB"
    return f"  ({shown}{f', from {source}' if source else ''})"


def cmd_models(args: argparse.Namespace) -> int:
    from rich.table import Table

    from peftkit.errors import ModelNotFoundError
    from peftkit.models import BUILTINS, peftkit_home

    table = Table(title="Built-in models")
    table.add_column("name", no_wrap=True)
    table.add_column("task", no_wrap=True)
    table.add_column("available")
    table.add_column("description", overflow="fold")
    missing = []  # install commands go below the table, whole: a narrow terminal or a pipe cuts table cells
    for model in BUILTINS.values():
        try:
            model.locate()
            available = "yes"
        except ModelNotFoundError:
            available = "no (see below)"
            missing.append(model)
        table.add_row(model.name, model.task, available, model.description)
    console = _console()
    console.print(table)
    for model in missing:
        console.print(f"{model.name}: {model.install_hint}", markup=False)
    cache = peftkit_home() / "models"
    entries = sorted(p.name for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")) if cache.is_dir() else []
    console.print(f"Cache: {cache} ({len(entries)} converted model(s))", markup=False)
    for name in entries:
        console.print(f"  {name}{_cached_model_note(cache / name)}", markup=False)
    return 0


def _add_set_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", nargs="+", action="extend", default=[], dest="set_overrides", metavar="KEY=VALUE",
                   help="the same overrides as a flag (as `python -m benchmarks.*` takes them)")


def _add_launch_flags(p: argparse.ArgumentParser) -> None:
    dist = p.add_argument_group("distributed (docs/distributed.md)")
    dist.add_argument("--deepspeed", metavar="JSON|STAGE", help="DeepSpeed config file, or a ZeRO stage 0-3")
    dist.add_argument("--nproc", type=int, default=1, help="processes on this node (GPUs; CPU processes without one)")
    dist.add_argument("--nnodes", type=int, default=1, help="nodes (run the same command on each, with --node-rank)")
    dist.add_argument("--node-rank", type=int, default=0, help="this node's index, 0..nnodes-1")
    dist.add_argument("--master-addr", help="address of the node with --node-rank 0")
    dist.add_argument("--master-port", type=int, help="rendezvous port on the master node (default 29500)")
    dist.add_argument("--hostfile", help="DeepSpeed hostfile (`host slots=N` lines): launch on all hosts from here")
    dist.add_argument("--launcher", choices=["torchrun", "deepspeed"], help="default: torchrun; deepspeed with --hostfile")


def build_parser() -> argparse.ArgumentParser:
    """The `peftkit` argument parser with every sub-command (the export and eval areas register their own)."""
    from peftkit.runs import add_qlora_base_option

    parser = argparse.ArgumentParser(prog="peftkit", description="Parameter-efficient fine-tuning from YAML recipes.")
    parser.add_argument("--version", action="version", version=f"peftkit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and tracebacks with errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a recipe into a run directory")
    # optional for argparse only: `peftkit train --resume RUN_DIR` names the run through --resume (_resume_as_recipe)
    p.add_argument("recipe", nargs="?", help="recipe YAML file (or a run directory, to resume it)")
    p.add_argument("overrides", nargs="*", default=[], help="key.sub=value overrides, e.g. train.lr=1e-4")
    _add_set_flag(p)
    p.add_argument("--resume", nargs="?", const=RESUME_LAST, default=None, metavar="RUN_DIR|auto",
                   help="continue from the last complete checkpoint (of RUN_DIR, default: the recipe's output_dir); "
                        "`auto` starts fresh when there is none")
    p.add_argument("--force", action="store_true", help="overwrite an existing run directory")
    _add_launch_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("validate", help="check a recipe (and its data and model) without training")
    p.add_argument("recipe", help="recipe YAML file (or a run directory: its recipe.yaml)")
    p.add_argument("overrides", nargs="*", default=[], help="key.sub=value overrides, as `train` takes them")
    _add_set_flag(p)
    p.add_argument("--no-model", action="store_true", help="skip the checks that read the model's config")
    p.add_argument("--show-data", type=positive_int, default=0, metavar="N",
                   help="print the first N training rows as tokenized, trained (loss-bearing) tokens marked")
    _add_launch_flags(p)  # checked as `train` would check them
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("chat", help="chat with a trained run or a merged model (REPL, or --prompt for one answer)")
    p.add_argument("run_dir", help="run directory (output_dir of `peftkit train`), or a model folder in Hugging Face "
                   "layout (RUN/merged, as `peftkit merge` writes it)")
    p.add_argument("--prompt", type=_message, help="answer this one message and exit")
    p.add_argument("--system", help="system prompt (default: the recipe's data.system_prompt, for a model folder its "
                   "chat template's own; --system '' for none)")
    p.add_argument("--max-new-tokens", type=positive_int, default=256,
                   help="longest reply, in tokens (default: %(default)s)")
    p.add_argument("--tools", metavar="FILE", help="function schemas shown to the model (a JSON list, or a JSONL "
                   "whose first line has `tools`); in the REPL, /tool RESULT answers the model's last call")
    add_qlora_base_option(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("models", help="list built-in models and the conversion cache")
    p.set_defaults(func=cmd_models)

    # Feature areas register their own sub-commands (each module keeps heavy imports lazy).
    import importlib

    for module in PLUGIN_COMMANDS:
        importlib.import_module(module).register(sub)
    for command in sub.choices.values():  # `peftkit chat RUN -v` as well as `peftkit -v chat RUN`
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="debug logging, and tracebacks with errors")
    return parser



def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """The `peftkit` command (`argv`: its arguments, default sys.argv); returns the exit status: 0, 2 for bad input.
    Called with `argv` (from Python: a notebook, a script), it puts the caller's logging setup, torch thread count and
    environment back afterwards, and returns argparse's status instead of raising SystemExit."""
    if argv is None:
        code = _main(argv)
        try:
            sys.stdout.flush()
        except BrokenPipeError:  # `peftkit validate --show-data 30 | head -n 1`
            code = _stdout_gone()
    else:
        with _callers_state_kept():
            code = _main(argv)
    if "peftkit.train.launch" in sys.modules:  # a training worker leaves at once (launch.leave_worker_now says why)
        sys.modules["peftkit.train.launch"].leave_worker_now(code)
    return code


@contextlib.contextmanager
def _callers_state_kept() -> Iterator[None]:
    """What a command sets for itself (log handler and levels, transformers' verbosity, torch's threads,
    TOKENIZERS_PARALLELISM) put back for a Python caller, who goes on in the same process."""
    root, ours = logging.getLogger(), logging.getLogger("peftkit")
    handlers, levels = list(root.handlers), (root.level, ours.level, logging.getLogger("bitsandbytes").level)
    environ = {name: os.environ.get(name) for name in ("TOKENIZERS_PARALLELISM", "TQDM_MININTERVAL", "TQDM_MAXINTERVAL")}
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    transformers = sys.modules.get("transformers")
    verbosity = transformers.logging.get_verbosity() if transformers is not None else None
    try:
        yield
    finally:
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
        root.setLevel(levels[0])
        ours.setLevel(levels[1])
        logging.getLogger("bitsandbytes").setLevel(levels[2])
        for name, value in environ.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if threads is not None:
            torch.set_num_threads(threads)
        transformers = sys.modules.get("transformers")
        if transformers is not None:  # imported by the command: its default level (TRANSFORMERS_VERBOSITY or warnings)
            default = getattr(transformers.utils.logging, "_get_default_logging_level", lambda: logging.WARNING)
            transformers.logging.set_verbosity(verbosity if verbosity is not None else default())


@contextlib.contextmanager
def _full_disk_quiet_in_threads() -> Iterator[None]:
    """A full disk (or a file-size limit) met by a writer thread (TensorBoard's) printed a thread traceback, cut off by
    the command's own message when the main thread met it too: the message alone is said, the traceback under -v."""
    import threading

    previous = threading.excepthook

    def hook(args: Any) -> None:
        if is_disk_full(args.exc_value) or is_file_too_large(args.exc_value):
            logging.getLogger("peftkit").debug("thread %s stopped: %s", getattr(args.thread, "name", "?"), args.exc_value)
            return
        previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


def _main(argv: list[str] | None) -> int:
    import signal

    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)  # training installs its own while it trains
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        with _progress_bars_for_logs(), command_scope(), _full_disk_quiet_in_threads():
            return _run_command(argv)
    except SystemExit as exc:  # argparse: --help, --version, a usage error (it printed why)
        if argv is None:
            raise
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    except KeyboardInterrupt:  # also while the command's libraries import, before it starts
        print("interrupted (Ctrl-C): stopped before finishing; no half-written result is left in place (a training "
              "run that saved a checkpoint continues with --resume)", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated (SIGTERM)", file=sys.stderr)
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _naming_the_recipe(exc: PeftkitError, recipe: str | None) -> PeftkitError:
    """A recipe problem found after loading (validation, data, model) names the recipe file, as parse errors do."""
    from peftkit.errors import ConfigError

    if not isinstance(exc, ConfigError) or exc.source or not recipe or not Path(recipe).is_file() or recipe in str(exc):
        return exc
    return ConfigError(exc.problems, recipe)


def _set_flags_last(argv: list[str]) -> list[str]:
    """`--set k=v ... RECIPE`: argparse would take RECIPE as one more `--set` value; the flag goes last instead."""
    kept, moved, i = [], [], 0
    while i < len(argv):
        if argv[i] != "--set":
            kept.append(argv[i])
            i += 1
            continue
        moved.append(argv[i])
        i += 1
        while i < len(argv) and "=" in argv[i] and not argv[i].startswith("-"):
            moved.append(argv[i])
            i += 1
    return kept + moved


def _disk_full_message(exc: BaseException, args: argparse.Namespace, argv: list[str]) -> str:
    """Names the file when the error does; a full temporary folder (exports save the tokenizer and verify there)
    is named with TMPDIR, which sends the user to the right disk."""
    import shutil
    import tempfile

    filename = _file_named(exc)
    temporary = tempfile.gettempdir()
    try:
        temp_full = shutil.disk_usage(temporary).free < TEMP_FULL_BYTES
    except OSError:
        temp_full = False
    in_temp = filename is not None and Path(filename).resolve().is_relative_to(Path(temporary).resolve())
    what = filename or (f"a temporary file in {temporary}" if temp_full else "a checkpoint or output file")
    if args.func is cmd_train:  # the command as typed (overrides and launch flags kept), with --resume
        from peftkit.train.launch import resume_command

        then = f"resume with `{resume_command(argv)}`"
    else:
        then = "run the command again"
    where = (f"free space in {temporary} or set TMPDIR to a folder on a disk with room, and {then}" if temp_full or in_temp
             else f"free space and {then}")
    return f"no space left on device while writing {what}; {where}"


TEMP_FULL_BYTES = 64 * 2**20
"""Free space under which the temporary folder counts as the full disk."""


def _resume_as_recipe(args: argparse.Namespace, typed: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """`peftkit train --resume RUN_DIR` with no recipe: the run directory is the recipe (its recipe.yaml), as in
    `peftkit train RUN_DIR --resume`; returns the command line in that form, which resume hints repeat. Anything else
    without a recipe is refused in one line (a recipe file after --resume: put it first)."""
    from peftkit.utils.command_name import command

    given = args.resume if args.resume not in RESUME_KEYWORDS else None
    path = Path(given).expanduser() if given else None
    if path is not None and path.is_dir():
        args.recipe, args.resume = given, RESUME_LAST
        at = typed.index("--resume") if "--resume" in typed else -1
        rest = typed[:at] + typed[at + 2:] if at >= 0 and typed[at + 1:at + 2] == [given] else \
            [a for a in typed if a != f"--resume={given}"]
        place = rest.index("train") + 1
        return [*rest[:place], given, *rest[place:], "--resume"]
    if path is not None and path.is_file():
        parser.error(f"--resume takes an optional RUN_DIR, so it took the file {given}; put the recipe first: "
                     f"{command('train', given, '--resume')}")
    parser.error("train needs a recipe file, or a run directory to resume: `peftkit train RECIPE.yaml` or "
                 "`peftkit train RUN_DIR --resume`")


PATH_ARGUMENTS = ("recipe", "run_dir", "resume", "out", "adapters", "base", "data", "heldout", "general", "tools",
                  "deepspeed", "hostfile", "weights")
"""Arguments that name files or folders: a `~` the shell left as it is (quoted, `--out=~/x`, a script) is expanded
in every command alike, as recipes expand it."""


def _expand_home(args: argparse.Namespace) -> None:
    for name in PATH_ARGUMENTS:
        value = getattr(args, name, None)
        if isinstance(value, str) and value.startswith("~"):
            setattr(args, name, os.path.expanduser(value))
        elif isinstance(value, list):
            setattr(args, name, [os.path.expanduser(v) if isinstance(v, str) and v.startswith("~") else v for v in value])


def _run_command(argv: list[str] | None) -> int:
    parser = build_parser()
    typed = sys.argv[1:] if argv is None else list(argv)
    args, extra = parser.parse_known_args(_set_flags_last(typed))
    if getattr(args, "func", None) is cmd_train and args.recipe is None:
        typed = _resume_as_recipe(args, typed, parser)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]  # `k=v` after a flag: argparse stops collecting positionals there
    elif extra:
        from peftkit.config.schema import Recipe

        keys = [e for e in extra if hasattr(args, "overrides") and "=" not in e and e.split(".")[0] in Recipe.model_fields
                and not Path(e).exists()]  # `train.lr`, not `./runs/old` or `extra.yaml`
        parser.error(f"unrecognized arguments: {' '.join(extra)}" + (
            f" (a recipe override is KEY=VALUE, e.g. {keys[0]}=...)" if keys else ""))
    resume = getattr(args, "resume", None)
    if resume and "=" in resume and not Path(resume).exists():  # `--resume train.lr=1e-4`: an override, not a RUN_DIR
        args.resume, args.overrides = RESUME_LAST, [*args.overrides, resume]
    if hasattr(args, "set_overrides"):  # `--set k=v` and positional `k=v` are one list
        args.overrides = [*args.overrides, *args.set_overrides]
    args.argv = typed  # what the user typed (RUN_DIR first for `--resume RUN_DIR` alone): resume commands repeat it
    _expand_home(args)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except PeftkitError as exc:
        if args.verbose:
            import traceback

            traceback.print_exc()
        from peftkit.train.signals import TrainingInterrupted

        label = "stopped" if isinstance(exc, TrainingInterrupted) else "error"  # asked for, and resumable: no error
        print(f"{label}: {_naming_the_recipe(exc, getattr(args, 'recipe', None))}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - only OSErrors and a full disk (torch's, safetensors' words) are handled
        if not (isinstance(exc, OSError) or is_disk_full(exc) or is_file_too_large(exc)):
            raise
        if isinstance(exc, BrokenPipeError):  # `peftkit chat ... | head`: the reader has gone, nothing to say
            return _stdout_gone()
        if args.verbose:  # the traceback, then the same message and exit status as without -v
            import traceback

            traceback.print_exc()
        if is_file_too_large(exc) or (is_disk_full(exc) and _file_size_limit() is not None):
            message = _file_too_large_message(exc)
        elif is_disk_full(exc):
            message = _disk_full_message(exc, args, sys.argv[1:] if argv is None else list(argv))
        else:
            message = _os_error_message(exc)
        print(f"error: {message}{'' if args.verbose else ' (-v shows the traceback)'}", file=sys.stderr)
        return 2


def _file_named(exc: BaseException) -> str | None:
    """The file an error names (OSError's `filename`), if it names one."""
    filename = getattr(exc, "filename", None)
    return os.fsdecode(filename) if isinstance(filename, (str, bytes, os.PathLike)) else None


def _file_size_limit() -> int | None:
    """The `ulimit -f` limit on this process's files in bytes, None without one (torch's checkpoint writer then
    fails as on a full disk)."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


def _file_too_large_message(exc: BaseException) -> str:
    limit = _file_size_limit()
    allowed = f"this shell's `ulimit -f` ({limit} bytes)" if limit is not None else "the filesystem's (FAT32: 4 GB)"
    return (f"a file grew past the largest file size allowed while writing {_file_named(exc) or 'an output file'}: "
            f"{allowed}; write to another filesystem (--out, output_dir) or raise the limit, then run the command again")


def _stdout_gone() -> int:
    """The reader of stdout closed the pipe: leave quietly, as `head` expects, with a shell's status for SIGPIPE; the
    output still buffered would otherwise fail again at exit."""
    with contextlib.suppress(OSError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 128 + 13


def _os_error_message(exc: OSError) -> str:
    """Permission denied, a missing file, ...: which file, and the likely fix for that kind of error."""
    import errno

    where = f" ({_file_named(exc)})" if _file_named(exc) else ""
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        advice = "check its permissions, or use a place you can write to"
    elif exc.errno == errno.ENOENT:
        advice = "check the path"
    elif exc.errno == errno.EEXIST:
        advice = "use it, or run the command again with --force to replace it"
    else:
        advice = "check the path and free space"
    return f"{exc.strerror or exc}{where}; {advice}"


if __name__ == "__main__":
    sys.exit(main())
