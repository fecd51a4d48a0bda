"""Reading a run directory back: its recipe, tokenizer and the base model with the adapter."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftkit.config import Recipe, recipe_from_dict
from peftkit.config.load import read_yaml
from peftkit.errors import ModelNotFoundError, PeftkitError, RunDirError

if TYPE_CHECKING:
    from peftkit.config.schema import ModelConfig
    from peftkit.models.resolve import ModelSource


@dataclass
class LoadedRun:
    run_dir: Path
    recipe: Recipe
    model: Any
    tokenizer: Any

    def with_system_prompt(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """`messages` as `peftkit chat` and the evaluation ask them: the recipe's `data.system_prompt` first unless
        they have a system turn of their own (the run's tokenizer template would otherwise put the base model's
        default system prompt there, one the run was not trained with)."""
        from peftkit.data.chat import with_system_prompt

        return with_system_prompt(messages, self.recipe.data.system_prompt)


def read_run_recipe(run_dir: str | Path) -> Recipe:
    """The recipe a run was trained with (its recipe.yaml), or one message saying why `run_dir` is not a run."""
    run_dir = Path(run_dir)
    if run_dir.is_file() and run_dir.suffix.lower() == ".gguf":
        raise RunDirError(f"{run_dir} is a GGUF file, which llama.cpp and Ollama run (`llama-cli -m {run_dir}`; the "
                          "export's Modelfile: `ollama create NAME -f Modelfile`); pass the run directory it was "
                          "exported from, or its merged model folder (RUN/merged)")
    if run_dir.is_file():
        what = "the recipe" if run_dir.suffix.lower() in (".yaml", ".yml") else "a file in it"
        raise RunDirError(f"{run_dir} is a file; pass the run directory a `peftkit train` run wrote (the recipe's "
                          f"output_dir), not {what}")
    if not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} does not exist; pass the output_dir of a `peftkit train` run")
    path = run_dir / "recipe.yaml"
    if not path.is_file():
        if is_model_folder(run_dir):
            raise RunDirError(f"{run_dir} is a model folder (config.json, no recipe.yaml), not a peftkit run directory: "
                              "pass the run directory it came from (`peftkit chat` also takes the folder itself)")
        if (run_dir / "adapter_config.json").is_file():
            raise RunDirError(f"{run_dir} is an adapter folder (adapter_config.json, no recipe.yaml), not a peftkit run "
                              "directory: pass the run directory it came from")
        runs = sorted(str(found.parent) for found in run_dir.glob("*/recipe.yaml"))
        hint = (f"; it holds runs: pass one of them ({', '.join(runs[:5])}{' ...' if len(runs) > 5 else ''})" if runs
                else "; pass the output_dir of a `peftkit train` run (a folder holding recipe.yaml)")
        raise RunDirError(f"{run_dir} is not a peftkit run directory (no recipe.yaml){hint}")
    return recipe_from_dict(read_yaml(path), str(path), stored_run=True)


def use_run_threads(recipe: Recipe, doing: str, *, on_cpu: bool = False) -> None:
    """A command that runs a trained model (chat, eval, merge, export) uses OMP_NUM_THREADS threads where it is set,
    else its run's train.num_threads, else the cores free now (`utils.threads.choose_threads`). The commands call
    this, not the library functions: a Python caller keeps its own thread count. `on_cpu`: the command works on the
    CPU whatever device the run trained on (merge, export)."""
    from peftkit.models import resolve_device
    from peftkit.utils.threads import choose_run_threads

    choose_run_threads(recipe.train.num_threads, doing, on_cpu=on_cpu or resolve_device(recipe.train.device) == "cpu")


def is_model_folder(folder: str | Path) -> bool:
    """A whole model in Hugging Face layout, not a run: what `peftkit merge` writes (RUN/merged), a full
    fine-tune's RUN/model, or any downloaded model directory."""
    folder = Path(folder)
    return (folder / "config.json").is_file() and not (folder / "recipe.yaml").is_file()


def load_model_folder(folder: str | Path, *, device: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) of a model folder, for generation: safetensors weights only and no remote code, in fp32 on
    a CPU and the GPU's half precision on one. A merged export's chat template already holds the run's system prompt
    as its default."""
    from peftkit.config.schema import ModelConfig
    from peftkit.models import load_model, load_tokenizer, resolve_device, resolve_dtype
    from peftkit.models.resolve import resolve_model_ref

    check_device_argument(device)
    folder = Path(folder)
    try:
        architectures = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError, AttributeError) as exc:
        raise RunDirError(f"{folder / 'config.json'} cannot be read as a model config ({exc}); re-export the model") from None
    if any(str(name).endswith("ForSequenceClassification") for name in architectures):
        raise RunDirError(f"{folder} holds a sequence classifier ({', '.join(architectures)}); `peftkit chat` is for "
                          "chat models")
    cfg = ModelConfig(name=str(folder))
    source = resolve_model_ref(cfg.name)  # a folder with pickle weights only is refused here, with the reason
    device = resolve_device(device or "auto")
    tokenizer = load_tokenizer(cfg, source)
    model = load_model(cfg, None, device=device, dtype=resolve_dtype("auto", device), source=source)
    model.eval()
    return model, tokenizer


def no_quantized_base(subject: str) -> str:
    """`--qlora-base original` refused for runs trained without a quantized base (`subject`: "RUN was", "these
    runs were"): eval, chat and merge say it alike."""
    return f"{subject} not trained on a quantized base, so --qlora-base original has nothing to choose: drop it"


def require_chat_run(recipe: Recipe, run_dir: str | Path, command: str) -> None:
    """`chat` and `eval` generate text: a sequence classifier gets one message instead of a failure mid-load."""
    if recipe.task == "sequence_classification":
        raise RunDirError(
            f"{run_dir} is a sequence classifier (task: sequence_classification); `peftkit {command}` is for chat "
            "models. Its accuracy and macro-F1 are in summary.json; label texts from Python: "
            "peftkit.runs.load_run(RUN_DIR) and peftkit.train.classification.predict_labels (docs/adapters.md)")


def trained_model_dir(run_dir: Path) -> Path | None:
    """RUN_DIR/model for full / partial runs, which save the whole trained model instead of an adapter."""
    folder = run_dir / "model"
    return folder if (folder / "config.json").is_file() else None


def adapter_dir(run_dir: Path) -> Path:
    """The run's adapter folder (standard PEFT layout), or one message: still training, stopped early, or no run."""
    from peftkit.train.run_dir import training_in

    path = run_dir / "adapter"
    if not (path / "adapter_config.json").is_file():
        holder = training_in(run_dir)
        if holder is not None:
            raise RunDirError(f"{run_dir} is still training ({holder}); its adapter is written when the run ends")
        if (run_dir / "summary.json").is_file():
            raise RunDirError(f"{run_dir} is a finished run whose adapter/ folder is missing or incomplete (no "
                              "adapter_config.json); restore it, or train again with `--force`")
        raise RunDirError(f"{run_dir} has no trained adapter (adapter/adapter_config.json); the run did not finish: "
                          + _how_to_finish(run_dir))
    refuse_unfinished(run_dir, path)
    return path


def _how_to_finish(run_dir: Path) -> str:
    from peftkit.train.checkpoints import all_damaged, latest_complete
    from peftkit.utils.command_name import command

    again = f"train it again with `{command('train', str(run_dir), '--force')}`"
    if latest_complete(run_dir) is None:
        return f"it saved no checkpoint to resume from, so {again}"
    damaged = all_damaged(run_dir)
    return f"{damaged}, so {again}" if damaged else f"resume it with `{command('train', str(run_dir), '--resume')}`"


def refuse_unfinished(run_dir: Path, weights: Path) -> None:
    """A run stopped after writing its trained weights but before its summary: its tokenizer (with the recipe's chat
    template) may be missing, and chat or eval would quietly use the base model's. A folder without checkpoints (one
    put together by hand) has nothing to finish and is taken as it is."""
    from peftkit.train.checkpoints import latest_complete
    from peftkit.train.run_dir import training_in

    if (run_dir / "summary.json").is_file() or latest_complete(run_dir) is None:
        return
    holder = training_in(run_dir)
    if holder is not None:
        raise RunDirError(f"{run_dir} is still training ({holder}): it has written {weights.name}/ and is finishing the "
                          "rest (summary.json last); wait for it to end")
    raise RunDirError(f"{run_dir} did not finish: it stopped after writing {weights.name}/ but before summary.json; "
                      + _how_to_finish(run_dir))


def trained_quantization(run_dir: Path, quantization: Any) -> Any:
    """The run's quantization with `compute_dtype: auto` replaced by the dtype its 4-bit layers computed in, as
    summary.json recorded it: `auto` follows the device (bfloat16 on a GPU, float32 on a CPU), so resolving it again
    where a GPU run is exported would pick another dtype than training's. Runs whose summary predates the record
    computed in their `dtype` (the model's); without a summary the quantization is returned as it is."""
    if quantization is None or quantization.bits != 4 or quantization.compute_dtype != "auto":
        return quantization
    import json

    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return quantization
    recorded = (summary.get("quantization") or {}).get("compute_dtype")
    if recorded in (None, "auto"):
        recorded = summary.get("dtype")
    if recorded not in ("float32", "bfloat16", "float16"):
        return quantization
    return quantization.model_copy(update={"compute_dtype": recorded})


QLORA_BASES = ("quantized", "original")
"""Where a QLoRA adapter is put: the quantized weights it was trained on, or the original ones."""


def add_qlora_base_option(parser: Any) -> None:
    """`--qlora-base quantized|original` for commands that load a run (`quantized_base` of load_run)."""
    parser.add_argument("--qlora-base", choices=QLORA_BASES, default="quantized",
                        help="QLoRA runs: put the adapter on the quantized weights it was trained on (default) or on "
                             "the original unquantized ones, as a serving engine that loads adapters onto the base does")


def _require_bitsandbytes_for(run_dir: Path, recipe: Any) -> None:
    """A QLoRA run loads its base quantized as in training, which needs bitsandbytes; without it, the way out for a
    finished run is its original weights, not a recipe change."""
    from peftkit.adapters import effective_quantization

    quantization = effective_quantization(recipe)
    if quantization is None:
        return
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        from peftkit.errors import MissingDependencyError

        raise MissingDependencyError(
            f"{run_dir} was trained on a {quantization.bits}-bit base, which loads with bitsandbytes: `pip install "
            "bitsandbytes`, or pass `--qlora-base original` (quantized_base=False in Python) to run the adapter on the "
            "original weights (answers differ a little from training's)") from None


def load_run(run_dir: str | Path, *, device: str | None = None, quantized_base: bool = True) -> LoadedRun:
    """Base model (quantized as in training) + trained adapter, ready for generation.

    `quantized_base=False` puts a QLoRA adapter on the original full-precision weights instead: how a
    serving engine that loads the adapter onto the unquantized model (vLLM multi-LoRA) will run it. `device`: one
    of DEVICES (default: the recipe's train.device)."""
    from peft import PeftModel

    from peftkit.adapters import prepare_for_generation
    from peftkit.data.classification import finish_loaded_model, load_kwargs
    from peftkit.models import load_model, resolve_device, resolve_dtype, resolve_model_ref

    check_device_argument(device)
    run_dir = Path(run_dir)
    recipe = read_run_recipe(run_dir)
    if not quantized_base:
        from peftkit.adapters import effective_quantization

        # Only lora/qlora recipes may quantize (check_recipe_adapter), so such a run always has an adapter.
        if effective_quantization(recipe) is None:
            raise RunDirError(f"{no_quantized_base(f'{run_dir} was')} (in Python, leave quantized_base at True)")
    full_model = trained_model_dir(run_dir)
    if full_model is not None:
        refuse_unfinished(run_dir, full_model)
    adapter = None if full_model is not None else adapter_dir(run_dir)
    device = resolve_device(device or recipe.train.device)
    dtype = resolve_dtype(recipe.train.dtype, device)
    tokenizer = read_run_tokenizer(run_dir, recipe.model)
    extra = load_kwargs(run_dir, recipe)  # classification: task head and label count
    if adapter is None:
        model = load_model(recipe.model, None, device=device, dtype=dtype, source=resolve_model_ref(str(full_model)), **extra)
    else:
        from peftkit.errors import ExportError
        from peftkit.export.compat import read_adapter

        try:
            info = read_adapter(adapter)  # a damaged or mismatched adapter is one message, before the base loads
        except ExportError as exc:
            raise RunDirError(str(exc)) from None
        _refuse_dora_over_int8_on_cpu(run_dir, recipe, info.config, device, quantized_base)
        from peftkit.models.fingerprint import warn_if_other_base

        try:
            source = resolve_model_ref(recipe.model.name, revision=recipe.model.revision,
                                       allow_pickle=recipe.model.allow_pickle)
        except ModelNotFoundError as exc:
            raise ModelNotFoundError(f"{exc}. The run was trained on it: put the base model back, or set model.name "
                                     f"in {run_dir / 'recipe.yaml'} to where it is now") from None
        _raise_if_other_base(run_dir, recipe, info, source)  # from the config: a base of another size is refused
        warn_if_other_base(run_dir, source, recipe.model.name)  # before its weights load; other weights are said
        if quantized_base:
            _require_bitsandbytes_for(run_dir, recipe)
        with _head_restored_by_adapter(bool(extra)):
            base = load_base_model(run_dir, recipe, device, quantized=quantized_base, source=source)  # resolved once
        from peftkit.adapters.lora import tied_adapter_warning_said

        with tied_adapter_warning_said():  # said at training
            model = PeftModel.from_pretrained(base, str(adapter))
    finish_loaded_model(model, run_dir, recipe, tokenizer)
    prepare_for_generation(model)
    model.eval()
    if recipe.task == "sequence_classification":  # predict_labels cuts texts where the run's scores did
        from peftkit.train.classification import MAX_SEQ_LEN_ATTR

        setattr(model, MAX_SEQ_LEN_ATTR, recipe.data.max_seq_len)
    return LoadedRun(run_dir, recipe, model, tokenizer)


def _refuse_dora_over_int8_on_cpu(run_dir: Path, recipe: Recipe, adapter_config: dict[str, Any], device: str,
                                  quantized_base: bool) -> None:
    """A DoRA adapter trained over an 8-bit base on a GPU fails on the CPU's second forward pass (the upstream bug
    behind adapters.DORA_INT8_ON_CPU): said before loading, with the ways that work."""
    from peftkit.adapters import dora_over_int8_on_cpu, effective_quantization

    if quantized_base and dora_over_int8_on_cpu(adapter_config.get("use_dora"), effective_quantization(recipe), device):
        raise RunDirError(f"{run_dir} trained DoRA over an 8-bit base, which peft cannot run on the CPU (it drops the "
                          "int8 scales after the first pass): use a CUDA GPU, or pass --qlora-base original "
                          "(quantized_base=False in Python) to run it on the full-precision weights")


DEVICES = ("auto", "cpu", "cuda", "mps")


def check_device_argument(device: str | None) -> None:
    """`load_run(device=...)`: a device this machine lacks is said before any weights load, not as torch's bare
    AssertionError once they have."""
    if device is None:
        return
    if device not in DEVICES:
        raise PeftkitError(f"device={device!r} is not one of {', '.join(DEVICES)}; leave it out to use the run's "
                           "train.device")
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise PeftkitError("device='cuda' but no CUDA GPU is visible on this machine; pass device='cpu' (or 'auto': "
                           "a GPU where there is one)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise PeftkitError("device='mps' but this machine has no Apple GPU (MPS); pass device='cpu' (or 'auto')")


def read_run_tokenizer(run_dir: Path, model: ModelConfig, source: ModelSource | None = None) -> Any:
    """The tokenizer the run saved (training's, chat template and pad token included: its template as training
    rendered it, no system prompt added), or for a run that saved none the base model's (`model`, found at `source`
    when given), set up as training set it up."""
    folder = run_dir / "tokenizer"
    if not (folder / "tokenizer_config.json").is_file():
        from peftkit.models import load_tokenizer

        return load_tokenizer(model, source)
    from transformers import AutoTokenizer

    # a remote-code tokenizer is saved with its code: run only where the recipe allowed it, never asked at a prompt
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=model.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


@contextlib.contextmanager
def _head_restored_by_adapter(classifier: bool) -> Iterator[None]:
    """A classifier's base loads with a fresh task head, which transformers reports as "newly initialized: you should
    probably TRAIN this model"; the adapter's saved head replaces it a moment later, so the warning is kept quiet."""
    if not classifier:
        yield
        return
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _raise_if_other_base(run_dir: Path, recipe: Recipe, info: Any, source: Any) -> None:
    """The adapter's shapes against the base's config, as merge checks them, before any weight loads: a base model of
    another size is one message naming the shapes, not torch's page of `size mismatch` lines after a long load."""
    from peftkit.data.classification import load_kwargs
    from peftkit.errors import ExportError
    from peftkit.export.compat import check_adapter_matches_base
    from peftkit.models.skeleton import model_skeleton

    try:  # a classifier's adapter may target its pooler, and its head has the run's label count
        check_adapter_matches_base(info, model_skeleton(source, recipe.model, **load_kwargs(run_dir, recipe)),
                                   recipe.model.name)
    except ExportError as exc:
        trained_on = info.config.get("base_model_name_or_path")
        here = getattr(source, "path", None)
        changed = (here is not None and trained_on is not None
                   and Path(str(trained_on)).expanduser().resolve() == Path(here).resolve())
        fix = (f"(the model at {here} has been replaced since the run trained on it: put the original back there, or "
               f"set `model.name` in {run_dir / 'recipe.yaml'} to where it is now)" if changed
               else f"(`model.name` in {run_dir / 'recipe.yaml'})")
        raise RunDirError(str(exc).replace("(the run's recipe.yaml `model.name`, or --base)", fix)) from None


def load_base_model(run_dir: Path, recipe: Recipe, device: str, *, quantized: bool = True, source: Any = None) -> Any:
    """The model the run started from, loaded as training loaded it (quantized where the recipe is,
    unless `quantized` is False). `source`: the recipe's model reference, when the caller resolved it already."""
    from peftkit.adapters import effective_quantization
    from peftkit.data.classification import load_kwargs
    from peftkit.models import load_model, resolve_dtype

    dtype = resolve_dtype(recipe.train.dtype, device)
    quantization = effective_quantization(recipe) if quantized else None
    return load_model(recipe.model, quantization, device=device, dtype=dtype, source=source, **load_kwargs(run_dir, recipe))
