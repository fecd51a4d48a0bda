"""Load a tokenizer and a (possibly quantized) model for a recipe."""

from __future__ import annotations

import errno
import logging
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from peftkit.config.schema import NAMED_CHAT_TEMPLATES, ModelConfig, QuantizationConfig, is_inline_template
from peftkit.errors import MissingDependencyError, ModelNotFoundError, PeftkitError
from peftkit.utils.log_filters import PrefixFilter, add_prefix_filter, silence_library_notices
from peftkit.utils.once import remembered
from peftkit.models.resolve import (ModelSource, hub_hint, materialize, needs_remote_code, remote_code_error, resolve_model_ref,
                                    tokenizer_files_problem)

log = logging.getLogger(__name__)
# peft still reads the deprecated `is_gradient_checkpointing` whenever it wraps a model (training, eval,
# chat, export); the warning is not actionable for users.
warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
# A LoRA on the embeddings: peft says on saving that it saves the embedding layers too, which is what it should do.
warnings.filterwarnings("ignore", message=r"Setting `save_embedding_layers` to `True` as embedding layers found",
                        category=UserWarning)
# Prompt and prefix tuning: peft drops the position ids transformers' generate passes, and says so on every call.
warnings.filterwarnings("ignore", message="Position ids are not supported for parameter efficient tuning",
                        category=UserWarning)
# GPT-2-style Conv1D layers among the targets (IA3, LoRA on c_attn and lm_head, a QLoRA adapter merged onto the
# full-precision base): peft sets fan_in_fan_out per layer, as it must, and says so for each layer at every load.
warnings.filterwarnings("ignore", message=r"fan_in_fan_out is set to (True|False) but the target module is",
                        category=UserWarning)

CHATML_TEMPLATE = (
    "{% set first = 0 %}"
    "{% if tools %}{{ '<|im_start|>system\n' }}"
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% set first = 1 %}{% endif %}"
    "{{ 'You can call these functions, described as JSON schemas:\n<tools>' }}"
    "{% for tool in tools %}{{ '\n' + (tool | tojson) }}{% endfor %}"
    "{{ '\n</tools>\nTo call one, reply with <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>.<|im_end|>\n' }}"
    "{% endif %}"
    "{% for message in messages[first:] %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'tool' %}{{ '<tool_response>\n' + message['content'] + '\n</tool_response>' }}"
    "{% else %}{{ message['content'] or '' }}{% endif %}"
    "{% if message['tool_calls'] is defined and message['tool_calls'] %}{% for call in message['tool_calls'] %}"
    "{% if message['content'] or not loop.first %}{{ '\n' }}{% endif %}"
    "{{ '<tool_call>{\"name\": ' + (call['function']['name'] | tojson) + ', \"arguments\": '"
    " + (call['function']['arguments'] | tojson) + '}</tool_call>' }}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""ChatML; with `tools`, the schemas go into the system turn and calls are written as <tool_call> JSON (the
Hermes / Qwen2.5 convention), and tool results are `tool` turns wrapped in <tool_response>. Without tools it
renders exactly as plain ChatML."""
PLAIN_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### User:\n' + message['content'] + '\n\n' }}"
    "{% else %}{{ '### Assistant:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)
"""For base models whose vocabulary has no ChatML tokens: each reply ends with the model's own end token,
which the model already has an embedding for and generation already stops on (LLaMA-Factory's `default`
template does the same). ChatML's markers would be split into characters there, and the model would
learn to spell `<|im_end|>` instead of learning to stop."""
PLAIN_TEMPLATE_WITH_BOS = "{{ bos_token }}" + PLAIN_TEMPLATE
CHATML_END = "<|im_end|>"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def planned_device(preference: str = "auto") -> str:
    """The device `train.device` names here (`auto`: a CUDA GPU if one is visible), without checking or selecting it."""
    if preference != "auto":
        return preference
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(preference: str = "auto") -> str:
    """`auto`: a visible CUDA GPU, else the CPU; a device asked for by name must be present (one message, before
    loading). Under a launcher, `cuda` is this process's own GPU (LOCAL_RANK)."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise PeftkitError("train.device is `cuda` but no CUDA GPU is visible; use `auto` or `cpu`")
    if preference == "mps" and not torch.backends.mps.is_available():
        raise PeftkitError("train.device is `mps` but this machine has no Apple GPU (MPS); use `auto` or `cpu`")
    device = planned_device(preference)
    if device == "cuda":
        use_local_gpu()
    return device


def use_local_gpu() -> None:
    """Under a launcher every process sees all GPUs: make its own (LOCAL_RANK) the current one before any weights
    load, so that `cuda` (device maps, `.to`) means that GPU, not GPU 0 for every rank."""
    local_rank = int(os.environ.get("LOCAL_RANK", "-1"))
    if 0 <= local_rank < torch.cuda.device_count():
        torch.cuda.set_device(local_rank)


def resolve_dtype(preference: str, device: str) -> torch.dtype:
    """float32 on CPU: bf16 is emulated (~30x slower) on CPUs without AVX512-BF16/AMX."""
    if preference != "auto":
        return _DTYPES[preference]
    if device == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):  # V100 / T4: fp16
        return torch.bfloat16
    if device == "cuda":
        return torch.float16
    return torch.float32


def weights_dtype(dtype: torch.dtype, *, trains_model_weights: bool) -> torch.dtype:
    """The dtype to load weights in for training with `dtype`. fp16 mixed precision (GPUs without bf16) needs fp32
    weights wherever gradients reach the model's own weights (full / partial fine-tuning, `modules_to_save`, a
    classifier's head): its GradScaler refuses fp16 gradients. Adapters alone keep an fp16 base (peft keeps their
    own weights in fp32)."""
    return torch.float32 if dtype == torch.float16 and trains_model_weights else dtype


def _unreadable_files(path: Path | None) -> list[Path]:
    """A model directory's files (or the directory itself) that this user may not read."""
    if path is None or not path.exists():
        return []
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return [p for p in files if not os.access(p, os.R_OK)]


@contextmanager
def loading_errors(source: ModelSource, what: str) -> Iterator[None]:
    """transformers' loading failures as one peftkit message: hub unreachable, files missing, remote code needed."""
    try:
        yield
    except OSError as exc:
        unreadable = _unreadable_files(source.path)
        if unreadable:  # safetensors reports a file it may not read as "No such file or directory"
            raise ModelNotFoundError(f"could not load {what} {source.ref}: permission denied: {unreadable[0]}"
                                     + (f" (and {len(unreadable) - 1} more)" if len(unreadable) > 1 else "")
                                     + "; make it readable for this user (`chmod a+r FILE`) or copy the model "
                                     "somewhere you own") from None
        if exc.errno == errno.ENOSPC:
            from huggingface_hub.constants import HF_HUB_CACHE

            raise ModelNotFoundError(f"could not load {what} {source.ref}: no space left on device (the hub cache is "
                                     f"{HF_HUB_CACHE}); free some space, or set HF_HUB_CACHE to a disk with room") from None
        if source.kind == "hub" and "does not appear to have a file named" in str(exc):
            if "pytorch_model.bin" in str(exc):  # model.allow_pickle was set: neither kind is there
                raise ModelNotFoundError(f"model {source.ref!r} has no weights files at this revision (neither "
                                         "safetensors nor pytorch_model.bin); check the repository and model.revision"
                                         ) from None
            raise ModelNotFoundError(
                f"model {source.ref!r} has no safetensors weights at this revision. If it has pickle files (.bin), "
                "peftkit loads them only where the recipe allows it: set `model.allow_pickle: true` if you trust its "
                "author (pickle files can run code), or pick a revision or copy of the model with safetensors") from None
        if source.kind == "hub":
            raise ModelNotFoundError(hub_hint(source.ref, source.revision)) from None
        raise ModelNotFoundError(f"could not load {what} {source.ref}: {exc}") from None
    except ValueError as exc:
        if needs_remote_code(exc):
            raise remote_code_error(source.ref) from None
        raise
    except Exception as exc:
        from safetensors import SafetensorError

        if isinstance(exc, SafetensorError):  # a truncated or damaged weights file
            raise ModelNotFoundError(f"could not load {what} {source.ref}: a weights file is damaged ({exc}); "
                                     "download or copy the model again") from None
        raise


def load_tokenizer(cfg: ModelConfig, source: ModelSource | None = None) -> Any:
    """The model's tokenizer with the recipe's chat template choice applied and a pad token set (training pads)."""
    from transformers import AutoTokenizer

    source = source or resolve_model_ref(cfg.name, revision=cfg.revision, allow_pickle=cfg.allow_pickle)
    problem = tokenizer_files_problem(source)
    if problem:
        raise ModelNotFoundError(problem)
    with loading_errors(source, "the tokenizer of"):
        tokenizer = AutoTokenizer.from_pretrained(
            materialize(source), revision=source.revision, trust_remote_code=cfg.trust_remote_code
        )
    apply_chat_template_setting(tokenizer, cfg.chat_template)
    if tokenizer.pad_token is None:
        # Padding positions are masked by position in our collator (and by the attention mask in generation), so
        # reusing any token is safe: EOS, else UNK, else another special token, else the vocabulary's first.
        specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if t]
        tokenizer.pad_token = (tokenizer.eos_token or tokenizer.unk_token or (specials[0] if specials else None)
                               or tokenizer.convert_ids_to_tokens(0))
    return tokenizer


def save_tokenizer(tokenizer: Any, folder: str | Path) -> None:
    """`save_pretrained`, keeping the `legacy` flag transformers (5.x) leaves out of tokenizer_config.json.

    Without it a Llama/T5-style tokenizer loaded with `legacy=True` (a `▁` before the text after each
    special token, as sentencepiece does) comes back non-legacy, and the saved run would tokenize chat
    prompts differently from the training run.
    """
    import json

    tokenizer.save_pretrained(str(folder))
    legacy = getattr(tokenizer, "legacy", None)
    config_path = Path(folder) / "tokenizer_config.json"
    if not config_path.is_file():
        return
    config = json.loads(config_path.read_text(encoding="utf-8"))
    changed = isinstance(legacy, bool) and config.get("legacy") != legacy
    if changed:
        config["legacy"] = legacy
    auto_map = config.get("auto_map")
    if isinstance(auto_map, dict) and isinstance(auto_map.get("AutoTokenizer"), str):
        # A remote-code tokenizer: transformers (5.23) writes its class as one string, which its own AutoTokenizer
        # reads as a [slow, fast] pair (indexing the string's letters) and then fails to load
        reference = auto_map["AutoTokenizer"]
        auto_map["AutoTokenizer"] = [None, reference] if getattr(tokenizer, "is_fast", False) else [reference, None]
        changed = True
    if changed:
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def is_single_token(tokenizer: Any, text: str) -> bool:
    return len(tokenizer.encode(text, add_special_tokens=False)) == 1


def _template_label(setting: str) -> str:
    """How a message names the `model.chat_template` setting: its file, or the inline template (too long to quote)."""
    return "(the Jinja template given inline)" if is_inline_template(setting) else setting


class TemplateSettingError(ValueError):
    """`model.chat_template` names a file that holds no template (said as the setting's problem)."""


def template_text(setting: str) -> str:
    """The Jinja text `model.chat_template` gives: itself (inline), a template file's text, or the `chat_template` of
    a tokenizer_config.json-style JSON file (its `default` where it holds several named ones). Raises OSError for an
    unreadable file, UnicodeDecodeError and TemplateSettingError for one that holds no template."""
    import json

    if is_inline_template(setting):
        return setting
    path = Path(setting).expanduser()
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() != ".json":
        if not text.strip():
            raise TemplateSettingError("is empty; write the Jinja chat template into it")
        return text
    try:
        found = json.loads(text).get("chat_template") if text.strip().startswith("{") else None
    except ValueError:
        found = None
    if isinstance(found, list):  # transformers' several named templates: [{"name": ..., "template": ...}]
        found = next((t.get("template") for t in found if isinstance(t, dict) and t.get("name") == "default"), None)
    if not isinstance(found, str) or not found.strip():
        raise TemplateSettingError("is a JSON file without a `chat_template` text (as tokenizer_config.json holds "
                                   "one); name that file, or a file holding the Jinja template itself")
    return found


def chat_template_setting_problem(setting: str | None) -> str | None:
    """What is wrong with `model.chat_template` before any tokenizer loads (None when nothing is)."""
    if not setting or setting in NAMED_CHAT_TEMPLATES:
        return None
    inline = is_inline_template(setting)
    if not inline and not _is_file(Path(setting).expanduser()):
        problem = f"model.chat_template: {setting} is neither `chatml`, `plain`, an existing template file nor a Jinja template"
        from peftkit.config.load import unset_variable_message

        if unset := unset_variable_message(setting):
            return f"{problem}: {unset}"
        if re.fullmatch(r"[A-Za-z][\w.-]*", setting) and not Path(setting).suffix:  # a name, as other tools take
            problem += (" (another tool's template name? Leave model.chat_template out to use the tokenizer's own "
                        "template, as axolotl's `tokenizer_default` does; named templates such as llama3 or qwen2 are "
                        "not built in: the model's own tokenizer brings its template, or give the Jinja file)")
        return problem
    try:
        problem = template_syntax_problem(template_text(setting))
    except UnicodeDecodeError as exc:
        problem = f"is not UTF-8 text (byte {exc.start}); save it as UTF-8"
    except TemplateSettingError as exc:
        problem = str(exc)
    except OSError as exc:
        problem = f"cannot be read ({exc.strerror or exc})"
    if not problem:
        return None
    named = f"model.chat_template {_template_label(setting)}" if inline else f"model.chat_template: {setting}"
    return f"{named} {problem}"


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name too long for a path (a template pasted without `{%`): not a file
        return False


def template_syntax_problem(template: str) -> str | None:
    """Why `template` does not compile as transformers compiles chat templates (its `{% generation %}` tag and
    filters included), or None. A template that cannot compile fails on every conversation: said as the template's
    fault, not the first record's."""
    from jinja2.exceptions import TemplateSyntaxError

    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # moved in another transformers: rendering still reports it (data/chat.py)
        return None
    try:
        _compile_jinja_template(template)
    except TemplateSyntaxError as exc:
        return f"is not a valid Jinja chat template (line {exc.lineno}: {exc.message}); fix the template"
    return None


def template_with_default_system(template: str, system_prompt: str, *, fold: bool = False) -> str:
    """`template` that renders a conversation without a system message as if it began with `system_prompt`.

    Exports carry this so that a server which gets only user messages (vLLM, llama.cpp, a plain
    `apply_chat_template` call) prompts the model the way it was trained, instead of falling back to the base
    template's own default system prompt or none. A conversation with its own system message is unchanged.
    `fold`: for templates that refuse system messages (or leave them out), the prompt goes at the start of the
    first user message, as training put it there (data/chat.py fold_system_prompt); so does a client's own
    system message, which the template itself would reject or drop.
    (Jinja `if` blocks do not open a scope, so the `set` replaces `messages` for the rest of the template.)
    """
    import json

    if fold:
        literal = json.dumps(system_prompt + "\n\n", ensure_ascii=False)  # a valid Jinja string literal
        return ("{% if messages and messages[0]['role'] == 'system' and messages|length > 1 and messages[1]['role'] == "
                "'user' %}{% set messages = [{'role': 'user', 'content': messages[0]['content'] + '\\n\\n' + "
                "messages[1]['content']}] + messages[2:] %}{% elif messages and messages[0]['role'] == 'user' %}"
                "{% set messages = [{'role': 'user', 'content': " + literal + " + messages[0]['content']}] + "
                "messages[1:] %}{% endif %}" + template)
    literal = json.dumps(system_prompt, ensure_ascii=False)
    return ("{% if not messages or messages[0]['role'] != 'system' %}"
            "{% set messages = [{'role': 'system', 'content': " + literal + "}] + messages %}{% endif %}" + template)


def set_default_system_prompt(tokenizer: Any, system_prompt: str | None) -> bool:
    """Give the tokenizer's chat template `system_prompt` as its default (see template_with_default_system).

    A tokenizer with several named templates (`default`, `tool_use`, ...) gets it in each. Returns False, changing
    nothing, when there is no system prompt or no template."""
    template = getattr(tokenizer, "chat_template", None)
    named = template if isinstance(template, dict) else {None: template}
    if not system_prompt or not named or not all(isinstance(t, str) and t for t in named.values()):
        return False
    from jinja2.exceptions import TemplateError

    probe = [{"role": "system", "content": "Probe system prompt."}, {"role": "user", "content": "U"}]
    wrapped = {}
    for name, one in named.items():
        try:  # a template that refuses system messages, or leaves them out: training folded them (data/chat.py _render)
            fold = "Probe system prompt." not in tokenizer.apply_chat_template(
                probe, tokenize=False, add_generation_prompt=True, chat_template=one)
        except TemplateError:
            fold = True
        wrapped[name] = template_with_default_system(one, system_prompt, fold=fold)
    tokenizer.chat_template = wrapped[None] if None in wrapped else wrapped
    return True


def apply_chat_template_setting(tokenizer: Any, setting: str | None) -> None:
    """`chatml`, `plain` or a template file; without a setting, the tokenizer's own template, else ChatML
    when the vocabulary has its tokens, else PLAIN_TEMPLATE."""
    if setting == "chatml":
        if not is_single_token(tokenizer, CHATML_END):
            raise PeftkitError(
                f"model.chat_template is `chatml`, but this tokenizer has no {CHATML_END} token: the model would "
                "learn to spell it out and never learn to stop. Use `plain` (replies end with the model's own "
                f"end token {tokenizer.eos_token!r}), or a template file written for this model"
            )
        tokenizer.chat_template = CHATML_TEMPLATE
    elif setting == "plain":
        tokenizer.chat_template = _plain_template(tokenizer)
    elif setting:
        problem = chat_template_setting_problem(setting)
        if problem:
            raise PeftkitError(problem)
        tokenizer.chat_template = template_text(setting)
        from peftkit.data.chat import reply_end_problem

        problem = reply_end_problem(tokenizer)
        if problem:
            raise PeftkitError(f"model.chat_template {_template_label(setting)}: {problem}")
    elif not getattr(tokenizer, "chat_template", None):
        if is_single_token(tokenizer, CHATML_END):
            tokenizer.chat_template = CHATML_TEMPLATE
            _warn_once("chatml", "The tokenizer has no chat template; using ChatML (set model.chat_template to override)")
        elif not tokenizer.eos_token:  # plain text trains without a template; conversations are refused when rendered
            tokenizer.no_template_reason = NO_EOS_NO_TEMPLATE
        else:
            tokenizer.chat_template = _plain_template(tokenizer)
            _warn_once("plain", "The tokenizer has no chat template and no ChatML tokens; using peftkit's plain "
                       "template ('### User:' / '### Assistant:', replies end with %r; set model.chat_template "
                       "to override)", tokenizer.eos_token)
    else:  # the model's own template: held to what a template file is held to
        from peftkit.data.chat import reply_end_problem

        problem = reply_end_problem(tokenizer)
        if problem:
            raise PeftkitError(f"the model's own chat template: {problem}. (`model.chat_template` replaces it)")


NO_EOS_NO_TEMPLATE = ("the tokenizer has no chat template, no ChatML tokens and no end-of-sequence token, so no "
                      "template can end a reply with a token: set model.chat_template to a template file whose replies "
                      "end with a special token of this vocabulary (plain-text data needs no template)")


def _plain_template(tokenizer: Any) -> str:
    """PLAIN_TEMPLATE, opened with the BOS token where the tokenizer starts every text with one (Llama and Mistral
    base models were pretrained so): chat rows are tokenized without the tokenizer's own special tokens."""
    if not tokenizer.eos_token:
        raise PeftkitError("the tokenizer has no end-of-sequence token, so the plain chat template cannot end a "
                           "reply; set model.chat_template to a template file that fits this model")
    return PLAIN_TEMPLATE_WITH_BOS if adds_bos(tokenizer) else PLAIN_TEMPLATE


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer starts every text with BOS itself (so the GGUF says so, and llama.cpp and Ollama add it)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


_warned: set[str] = remembered(set())


def _warn_once(topic: str, message: str, *args: Any) -> None:
    """Commands load the tokenizer more than once (training, then the evaluation); say it once."""
    if topic not in _warned:
        _warned.add(topic)
        log.warning(message, *args)


def bnb_config(
    cfg: QuantizationConfig, device: str, compute_dtype: torch.dtype | None = None, quant_storage: torch.dtype | None = None,
    transformers_skips: list[str] | None = None,
) -> Any:
    """quant_storage: the tensor dtype the packed 4-bit weights are stored in; DeepSpeed ZeRO-3 needs it to
    match the model's other parameters (peftkit.train.deepspeed.quant_storage_dtype); uint8 otherwise.

    transformers_skips: what transformers leaves unquantized on its own (the output head, tied embeddings). A
    skip list replaces transformers' defaults instead of adding to them, so `keep_modules` is sent with them."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise MissingDependencyError(
            "quantization needs bitsandbytes: `pip install bitsandbytes` (or remove the `quantization:` block)"
        ) from None
    from transformers import BitsAndBytesConfig

    # The recipe's compute_dtype when it names one, else the model's dtype (`compute_dtype`).
    dtype = resolve_dtype(cfg.compute_dtype, device) if cfg.compute_dtype != "auto" else (compute_dtype or resolve_dtype("auto", device))
    skip = unquantized_modules(cfg, transformers_skips) if transformers_skips is not None else None
    if cfg.bits == 8:  # LLM.int8 reads none of the 4-bit keys (the schema refuses them with bits: 8)
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        llm_int8_skip_modules=skip,
        bnb_4bit_quant_type=cfg.quant_type,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=quant_storage or torch.uint8,
    )


def silence_bnb_cpu_warnings() -> None:
    """bitsandbytes 8-bit warns about a dtype cast on every CPU matmul; say it once instead (its hub-kernel advice is
    dropped from import on: `utils.log_filters`).

    The messages go through `logging` loggers (not `warnings`), so a logging filter lets the first cast warning
    through and drops the repeats. Call before bitsandbytes loads."""
    warnings.filterwarnings("ignore", message=r".*MatMul8bitLt: inputs will be cast from.*")
    add_prefix_filter("bitsandbytes.autograd._functions", PrefixFilter("MatMul8bitLt: inputs will be cast", keep_first=True))
    silence_library_notices()


def disable_bnb_cpu_repacking(model: Any) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 converts a Linear4bit weight to a packed layout
    on its first forward without gradients (generation, evaluation) and keeps it: later training
    forwards then run that kernel, which is bf16-precision and passes no gradient to its input,
    so LoRA layers below it silently get wrong gradients. Measured on a 128->64 nf4 layer: output
    off by 6e-3 and input grad None after one `inference_mode` call. Returns the layers changed.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def unquantized_modules(cfg: QuantizationConfig, transformers_skips: list[str]) -> list[str] | None:
    """bitsandbytes' skip list: transformers' defaults with `keep_modules` (None where there are neither)."""
    return sorted({*transformers_skips, *(cfg.keep_modules or [])}) or None


def default_skips(source: ModelSource, cfg: ModelConfig, task: str) -> list[str]:
    """The modules transformers keeps unquantized by default, read from a weightless (meta) copy of the model."""
    from peftkit.models.skeleton import model_skeleton

    return kept_unquantized(model_skeleton(source, cfg, task))


def kept_unquantized(model: torch.nn.Module) -> list[str]:
    """transformers' get_keys_to_not_convert named as modules: it takes the last parameter's name less `.weight`,
    which for a bias (`classifier.bias`) names no module."""
    from transformers.quantizers.base import get_keys_to_not_convert

    return sorted({key.removesuffix(".bias") for key in get_keys_to_not_convert(model)})


@contextmanager
def four_bit_blocksize(blocksize: int) -> Iterator[None]:
    """Inside: the bitsandbytes `Linear4bit` layers transformers creates quantize in blocks of `blocksize`.

    transformers' `BitsAndBytesConfig` has no block size; its loader builds each quantized weight from the
    empty layer's `Params4bit` attributes, so setting them on new layers is enough. From then on every
    weight carries its block size in its own `quant_state` (forward, dequantize and merge follow it).
    """
    if blocksize == 64:  # bitsandbytes' default: nothing to change
        yield
        return
    import bitsandbytes as bnb

    original = bnb.nn.Linear4bit.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.weight.blocksize = blocksize

    bnb.nn.Linear4bit.__init__ = init
    try:
        yield
    finally:
        bnb.nn.Linear4bit.__init__ = original


ATTENTION_PACKAGES = {"flash_attention_2": ("flash_attn", "flash-attn"), "flash_attention_3": ("flash_attn_interface", "flash-attn-3")}
"""Kernel -> (module, pip name) it needs."""
ATTENTION_SUPPORT_FLAGS = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn",
                           "flash_attention_3": "_supports_flash_attn", "flex_attention": "_supports_flex_attn"}
"""Kernel -> the transformers model-class attribute that says the architecture has it."""


def attention_problem(name: str, model: Any = None, *, device: str = "cuda") -> str | None:
    """Why `model.attn_implementation: name` cannot load on `device` (a flash kernel's missing package on a GPU;
    elsewhere it falls back), or for `model` (a skeleton is enough) an architecture without that kernel; or None."""
    import importlib.util

    if name in ATTENTION_PACKAGES and device == "cuda" and importlib.util.find_spec(ATTENTION_PACKAGES[name][0]) is None:
        return (f"model.attn_implementation: {name} needs the {ATTENTION_PACKAGES[name][1]} package (CUDA GPUs only: "
                f"`pip install {ATTENTION_PACKAGES[name][1]} --no-build-isolation`); or use sdpa / auto")
    flag = ATTENTION_SUPPORT_FLAGS.get(name)
    if model is not None and flag and not getattr(model, flag, False):
        has = [kernel for kernel, attribute in ATTENTION_SUPPORT_FLAGS.items() if getattr(model, attribute, False)]
        return (f"model.attn_implementation: {type(model).__name__} has no {name} kernel in transformers; "
                f"use {' / '.join(['auto', 'eager', *has])}")
    return None


def attention_kwargs(cfg: ModelConfig, device: str) -> dict[str, Any]:
    """`from_pretrained` keyword for the recipe's attention kernel: none for `auto`, and none (with a
    warning) for a flash kernel off a CUDA GPU, so a GPU-trained run still chats and merges on a CPU."""
    name = cfg.attn_implementation
    if name == "auto":
        return {}
    if (name in ATTENTION_PACKAGES or name == "flex_attention") and device != "cuda":
        why = "has no backward pass" if name == "flex_attention" else "does not run"
        log.warning("model.attn_implementation %s needs a CUDA GPU (off one it %s); loading on %s with transformers' "
                    "default attention instead (same results, other kernel)", name, why, device)
        return {}
    problem = attention_problem(name, device=device)
    if problem:
        raise MissingDependencyError(problem)
    return {"attn_implementation": name}


def cpu_quantizes_wrongly(quantization: QuantizationConfig) -> bool:
    """bitsandbytes' CPU 4-bit quantization (0.50) computes blocks larger than 64 wrongly for many weight shapes
    (relative error 0.2 against nf4's 0.09 on SmolLM2's 576 x 576 projections: its top-1 agreement with the fp32 model
    falls to 0 %, `python -m benchmarks.quant_error`)."""
    return quantization.bits == 4 and quantization.blocksize > 64


def load_model(
    cfg: ModelConfig,
    quantization: QuantizationConfig | None = None,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    task: str = "causal_lm",
    num_labels: int | None = None,
    source: ModelSource | None = None,
    quant_storage: torch.dtype | None = None,
) -> Any:
    """The base model of `cfg` on `device`: quantized when `quantization` is given (bitsandbytes), weights from
    safetensors unless the recipe allows pickle, remote code only where `trust_remote_code` is set."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from peftkit.utils.threads import say_busy_cpu_warning

    say_busy_cpu_warning()  # the slow part of a command starts here

    source = source or resolve_model_ref(cfg.name, revision=cfg.revision, allow_pickle=cfg.allow_pickle)
    kwargs: dict[str, Any] = {
        "revision": source.revision,
        "trust_remote_code": cfg.trust_remote_code,
        "dtype": dtype,
        "use_safetensors": None if cfg.allow_pickle else True,
        **attention_kwargs(cfg, device),
    }
    if quantization is not None:
        if device == "cpu" and cpu_quantizes_wrongly(quantization):
            # validate refuses such a recipe for CPU training; a GPU run's base rebuilt here (merge, export
            # verification, chat / eval on the CPU) would be another, broken one, and its merge ship without a word
            raise PeftkitError(
                f"quantization.blocksize {quantization.blocksize}: bitsandbytes' CPU 4-bit kernels quantize blocks "
                "larger than 64 wrongly, so this 4-bit base cannot be rebuilt on a CPU as a GPU builds it (merge "
                "and export's verification always rebuild it on the CPU; chat and eval where there is no CUDA GPU). "
                "On a CPU, chat and eval can put the adapter on the full-precision weights (--qlora-base original), "
                "and `export --format adapter --no-verify` writes the adapter alone; to merge, train with "
                "quantization.blocksize 64 (the default) or less")
        silence_bnb_cpu_warnings()
        # A classifier's head is sent too: transformers keeps only the last *parameter's* module, and for a head with
        # a bias (BERT's `classifier.bias`) that name matches no module, so the new head was quantized
        skips = default_skips(source, cfg, task) if quantization.keep_modules or task != "causal_lm" else None
        kwargs["quantization_config"] = bnb_config(quantization, device, dtype, quant_storage, transformers_skips=skips)
        kwargs["device_map"] = {"": torch.cuda.current_device() if device == "cuda" else device}  # this rank's GPU
    auto = AutoModelForCausalLM
    if task == "sequence_classification":
        auto = AutoModelForSequenceClassification
        kwargs["num_labels"] = num_labels
    with loading_errors(source, "model weights from"), \
            four_bit_blocksize(quantization.blocksize if quantization is not None and quantization.bits == 4 else 64):
        model = auto.from_pretrained(materialize(source), **kwargs)
    if quantization is None:
        model.to(device)
    else:
        require_quantized_layers(model, quantization.bits)
        disable_bnb_cpu_repacking(model)  # bnb's CPU inference packing breaks later training and merging
    return model


def quantizable_layers(model: torch.nn.Module) -> list[str]:
    """The layers transformers' bitsandbytes quantizer replaces: plain torch.nn.Linear (not a subclass such as Falcon's
    FalconLinear) and GPT-2's Conv1D, except what it keeps by default (the output head, a classifier's `score`, tied
    weights: transformers' get_keys_to_not_convert). Works on a meta skeleton, so a recipe is checked before any
    weights load."""
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.quantizers_utils import should_convert_module

    try:
        kept = kept_unquantized(model)
    except (AttributeError, IndexError, TypeError):  # not a transformers model: its output head alone
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        kept = [name for name, module in model.named_modules() if head is not None and module is head]
    return [name for name, module in model.named_modules()
            if (type(module) is torch.nn.Linear or isinstance(module, Conv1D)) and should_convert_module(name, kept)]


def no_quantizable_layer_problem(model: torch.nn.Module, bits: int) -> str | None:
    """transformers quantizes the layers `quantizable_layers` names; a model built from its own linear class comes
    back all full precision, and a QLoRA run would claim a 4-bit base it never had."""
    if quantizable_layers(model):
        return None
    linear = sorted({type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.Linear)})
    return (f"bitsandbytes would quantize no layer of this {type(model).__name__} to {bits} bits (its linear layers "
            f"are {', '.join(linear) or 'not torch.nn.Linear'}, which transformers' quantizer leaves alone): train it "
            "with `method: lora` on the full-precision model, without a `quantization:` block")


def require_quantized_layers(model: torch.nn.Module, bits: int) -> None:
    """The loaded model's check: at least one layer came back 4/8-bit (see no_quantizable_layer_problem)."""
    import bitsandbytes as bnb

    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    if not any(isinstance(module, kinds) for module in model.modules()):
        raise PeftkitError(no_quantizable_layer_problem(model, bits) or f"bitsandbytes quantized no layer of this "
                           f"{type(model).__name__} to {bits} bits: train it with `method: lora`")
