"""Checks that need the file system or the model's structure; all run before any weights load."""

from __future__ import annotations

import logging
from typing import Any

from peftkit.config.schema import Recipe
from peftkit.errors import ConfigError, PeftkitError
from peftkit.utils.once import as_command, say_once

log = logging.getLogger(__name__)


def _check_data(recipe: Recipe) -> tuple[list[str], Any]:
    """Problems with the recipe's data files, and its first tool-use conversation (None without one): the
    model check renders that with the recipe's chat template, which may not support tools."""
    from peftkit.data.build import load_heldout
    from peftkit.data.formats import load_examples

    if recipe.task == "sequence_classification":  # `{text, label}` records, checked in their own module
        from peftkit.data.classification import check_classification_data

        return check_classification_data(recipe.data), None
    problems, tool_use, trailing = [], None, []
    for key in ("train", "eval"):
        path = getattr(recipe.data, key)
        if path is None:
            continue
        try:
            examples = load_examples(path, recipe.data.format, recipe.data.columns, mapped_elsewhere=key == "eval")
        except PeftkitError as exc:
            problems.append(f"data.{key}: {exc}")
            continue
        tool_use = tool_use or next((e for e in examples if e.tools or any(
            m["role"] == "tool" or m.get("tool_calls") for m in e.messages or ())), None)
        trailing += [e.where for e in examples if e.messages and e.messages[-1]["role"] != "assistant"]
        _warn_about_tool_calls(examples, f"data.{key}")
        blank = [e.where for e in examples if any(m["role"] == "user" and not str(m.get("content") or "").strip()
                                                  for m in e.messages or ())]
        if blank:  # a missing question (an empty prompt field) more often than a meant one
            log.warning("data.%s: %d conversation(s) have an empty user turn (first: %s): the reply after it is "
                        "trained to answer nothing; fill in the question, or drop the record", key, len(blank), blank[0])
    if trailing and not recipe.data.train_on_prompt:  # with it, the trailing turn is trained too
        # Not an error: the turns before it still train; but the trailing turn is never learnt from.
        log.warning("%d conversation(s) end with a user or tool turn after the last assistant reply (first: %s); "
                    "nothing after that reply is trained on, so the trailing turn only costs tokens: end each "
                    "conversation with the assistant's reply, or drop the trailing turn", len(trailing), trailing[0])
    if recipe.data.replay is not None:
        from peftkit.data.replay import answers_from_base, load_replay

        replay = recipe.data.replay
        try:  # as training reads it: auto-detected, without data.format / data.columns (they describe train/eval)
            replay_rows = load_replay(replay.path, replay.answers, known_only=replay.known_only)
        except PeftkitError as exc:
            problems.append(str(exc) if str(exc).startswith("data.replay") else f"data.replay: {exc}")
        else:
            text_rows = [e.where for e in replay_rows if not e.messages]
            if text_rows and answers_from_base(replay.path, replay.answers):
                problems.append(
                    f"data.replay: answers: {replay.answers} has the base model answer each replay prompt, but "
                    f"{len(text_rows)} of the {len(replay_rows)} records are plain text with no prompt to answer "
                    f"(first: {text_rows[0]}), which would be trained as written; give them as conversations or "
                    "prompt/response records, or set `data.replay.answers: dataset`")
    if recipe.data.heldout:
        try:
            heldout = load_heldout(recipe.data.heldout, recipe.data.system_prompt)
        except PeftkitError as exc:
            problems.append(f"data.heldout: {exc}")
        else:  # the template check renders training's tool use, else the held-out questions asked with tools
            tool_use = tool_use or next((item for item in heldout if item.tools), None)
    return problems, tool_use


def _warn_about_tool_calls(examples: list[Any], key: str) -> None:
    """Tool calls the record's `tools` do not declare: the model learns to call a function whose schema its prompt
    never shows (a warning); calls with no `tools` at all may have their schema in the system prompt (said, info)."""
    undeclared: list[tuple[str, list[str]]] = []
    unlisted: list[str] = []
    mismatched: list[tuple[str, str]] = []
    for example in examples:
        calls = [call["function"] for m in example.messages or () for call in m.get("tool_calls") or ()]
        called = {call["name"] for call in calls}
        if called and example.tools:
            schemas = {str(tool.get("function", tool).get("name")): tool.get("function", tool) for tool in example.tools}
            if called - schemas.keys():
                undeclared.append((example.where, sorted(called - schemas.keys())))
            mismatched += [(example.where, f"{call['name']} {problem}") for call in calls if call["name"] in schemas
                           if (problem := _arguments_problem(call.get("arguments"), schemas[call["name"]]))]
        elif called:
            unlisted.append(example.where)
    if undeclared:
        where, names = undeclared[0]
        log.warning("%s: %d conversation(s) call a tool their `tools` list does not declare (first: %s calls %s): the "
                    "model learns to call it without its schema in the prompt; add it to the record's `tools`", key,
                    len(undeclared), where, ", ".join(names))
    if mismatched:
        where, problem = mismatched[0]
        log.warning("%s: %d tool call(s) do not fit their tool's declared parameters (first: %s calls %s): the model "
                    "learns calls its prompt's schema does not describe; fix the arguments or the schema", key,
                    len(mismatched), where, problem)
    if unlisted:
        log.info("%s: %d conversation(s) make tool calls with no `tools` list (first: %s): no schema is shown in their "
                 "prompt, so the calls are learnt from the conversations alone (fine where the system prompt "
                 "describes the tools)", key, len(unlisted), unlisted[0])


def _arguments_problem(arguments: Any, tool: dict[str, Any]) -> str | None:
    """What a call's arguments get wrong against its tool's JSON-schema `parameters` (names only): an argument the
    schema does not list, unless it allows others (`additionalProperties`, `patternProperties`; function-calling
    schemas seldom say, and an unlisted argument is then most often a misspelt one), and a required one left out.
    None where they fit, or where the schema says nothing to check against."""
    schema = tool.get("parameters")
    if not isinstance(arguments, dict) or not isinstance(schema, dict) or not isinstance(schema.get("properties"), dict):
        return None
    open_ended = schema.get("additionalProperties") not in (None, False) or "patternProperties" in schema
    unknown = [] if open_ended else sorted(str(name) for name in set(arguments) - set(schema["properties"]))
    required = schema.get("required")
    named = {name for name in required if isinstance(name, str)} if isinstance(required, list) else set()
    missing = sorted(named - set(arguments))
    found = ([f"with {', '.join(f'`{name}`' for name in unknown)}, which the schema does not list"] if unknown else []) + (
        [f"without required {', '.join(f'`{name}`' for name in missing)}"] if missing else [])
    return "; ".join(found) or None


def _check_tool_use_template(recipe: Recipe, source: Any, example: Any) -> list[str]:
    from peftkit.data.build import HeldoutItem
    from peftkit.data.chat import (HistoryRenderedDifferently, heldout_tools_problem, render_with_reply_spans,
                                   with_system_prompt)
    from peftkit.models import load_tokenizer

    try:
        tokenizer = load_tokenizer(recipe.model, source)
        if isinstance(example, HeldoutItem):  # a question: its prompt must show the tools it is scored on calling
            problem = heldout_tools_problem(tokenizer, [example], recipe.data.system_prompt)
            return [f"data.heldout: {problem}"] if problem else []
        render_with_reply_spans(tokenizer, with_system_prompt(example.messages, recipe.data.system_prompt),
                                example.where, example.tools)
    except HistoryRenderedDifferently:  # checked the tool use already; training gives each turn a row of its own
        return []
    except PeftkitError as exc:
        return [f"model.chat_template: {exc}"]
    except (OSError, ValueError) as exc:  # a tokenizer that cannot load here is reported by training itself
        log.debug("tool-use template check skipped: %s", exc)
    return []


def bitsandbytes_problems(recipe: Recipe) -> list[str]:
    """Settings that need bitsandbytes when it cannot be imported: a quantized base, an 8-bit or paged optimizer.
    transformers imports bitsandbytes only when it builds the model or the optimizer, after the model loaded (and,
    for the optimizer, after the before-evaluation ran), and then fails with a bare ImportError."""
    from peftkit.adapters import effective_quantization

    optimizer = recipe.train.optimizer
    needs = []
    if effective_quantization(recipe) is not None:
        needs.append("quantization needs bitsandbytes: `pip install bitsandbytes` (or remove `quantization:`)")
    if "8bit" in optimizer or optimizer.startswith("paged_"):
        needs.append(f"train.optimizer {optimizer} needs bitsandbytes: `pip install bitsandbytes` "
                     "(or train.optimizer: auto)")
    if not needs:
        return []
    try:
        import bitsandbytes  # noqa: F401 - an installed but broken package fails here too
    except ImportError:
        return needs
    return []


def cpu_blocksize_problem(recipe: Recipe) -> str | None:
    """A QLoRA run on the CPU with blocks bitsandbytes' CPU kernels quantize wrongly (models.load.cpu_quantizes_wrongly)
    would train on a broken base without a word."""
    from peftkit.adapters import effective_quantization
    from peftkit.models.load import cpu_quantizes_wrongly, planned_device

    q = effective_quantization(recipe)
    if q is None or not cpu_quantizes_wrongly(q) or planned_device(recipe.train.device) != "cpu":
        return None
    return (f"quantization.blocksize {q.blocksize} on the CPU: bitsandbytes' CPU 4-bit kernels quantize blocks larger "
            "than 64 wrongly for many weight shapes (the base model loses its answers before any training); use 32 or "
            "64 on a CPU, or train on a CUDA GPU")


def _check_model(recipe: Recipe, tool_use: Any = None) -> tuple[list[str], Any]:
    """Problems with the model and what the recipe asks of it, and the model's skeleton (None where unreadable)."""
    from peftkit.adapters import check_targets, effective_quantization
    from peftkit.models.load import attention_problem, planned_device
    from peftkit.models.registry import BUILTINS
    from peftkit.models.resolve import resolve_model_ref
    from peftkit.models.skeleton import bidirectional_problem, model_skeleton

    try:
        source = resolve_model_ref(recipe.model.name, revision=recipe.model.revision, allow_pickle=recipe.model.allow_pickle)
    except PeftkitError as exc:
        return [f"model.name: {exc}"], None
    from peftkit.models.resolve import tokenizer_files_problem

    problems = [f"model.name: {problem}"] if (problem := tokenizer_files_problem(source)) else []
    if recipe.model.revision is not None and source.kind != "hub":  # harmless, but not what the user meant
        what = {"builtin": "a built-in model", "gguf": "a GGUF file"}.get(source.kind, "a local model folder")
        say_once(log, logging.WARNING, f"model.revision: {recipe.model.revision} picks a version of a Hub model, but "
                 f"{recipe.model.name} is {what}, which has none: it is ignored; remove model.revision")
    builtin = BUILTINS.get(recipe.model.name) if source.kind == "builtin" else None
    wrong_task = builtin is not None and builtin.task != "causal_lm" and recipe.task != builtin.task
    if wrong_task:
        problems.append(f"model.name: {builtin.name} is a {builtin.task} model; set `task: {builtin.task}` in the recipe")
    try:
        skeleton = model_skeleton(source, recipe.model, task=recipe.task)
    except PeftkitError as exc:
        return [*problems, f"model.name: {exc}"], None
    except (OSError, ValueError) as exc:
        return [*problems, f"model.name: cannot read the model configuration of {recipe.model.name!r}: {exc}"], None
    bidirectional = None if wrong_task or recipe.task != "causal_lm" else bidirectional_problem(skeleton.config,
                                                                                                  recipe.model.name)
    if bidirectional:  # the target and context checks would only add noise
        return [*problems, f"model.name: {bidirectional}"], skeleton
    problems.extend(check_targets(skeleton, recipe.adapter, recipe.task))
    problems.extend(_check_context(recipe, skeleton))
    if recipe.model.attn_implementation != "auto":
        device = planned_device(recipe.train.device)
        attention = attention_problem(recipe.model.attn_implementation, skeleton, device=device)
        problems.extend([attention] if attention else [])
    if tool_use is not None:
        problems.extend(_check_tool_use_template(recipe, source, tool_use))
    quantization = effective_quantization(recipe)
    if quantization is not None:
        from peftkit.models.load import no_quantizable_layer_problem

        nothing = no_quantizable_layer_problem(skeleton, quantization.bits)
        problems.extend([f"quantization: {nothing}"] if nothing else _check_keep_modules(skeleton, quantization.keep_modules or []))
    return problems, skeleton


def virtual_positions(recipe: Recipe) -> int:
    """Positions a prompt-learning adapter takes before the text: prompt tuning's soft prompt is part of the
    sequence, and prefix tuning's cached prefix shifts the text's position ids by its length."""
    if recipe.adapter.method in ("prefix_tuning", "prompt_tuning"):
        return recipe.adapter.num_virtual_tokens  # type: ignore[union-attr]
    return 0


def _virtual_note(recipe: Recipe) -> str:
    virtual = virtual_positions(recipe)
    return f" after {recipe.adapter.method}'s {virtual} virtual tokens" if virtual else ""


def _check_context(recipe: Recipe, skeleton: Any) -> list[str]:
    """`data.max_seq_len` (after prefix/prompt tuning's virtual tokens) against the model's positions: past a learned
    position table the forward pass fails (a problem where the recipe set it; the schema's default is lowered to
    fit); past a RoPE model's trained context it runs, untrained there (a warning)."""
    from peftkit.models.skeleton import learned_position_limit, trained_context

    length, virtual = recipe.data.max_seq_len, virtual_positions(recipe)
    learned = learned_position_limit(skeleton)
    if learned is not None and learned - virtual < 1:
        return []  # no room for any text: the adapter's own check (check_targets) reports num_virtual_tokens
    if learned is not None and length + virtual > learned and "max_seq_len" not in recipe.data.model_fields_set:
        return []  # the schema's default, not the recipe's: validate_recipe lowers it (fitted_max_seq_len)
    if learned is not None and length + virtual > learned:
        fewer = " (or use fewer adapter.num_virtual_tokens)" if virtual else ""
        return [f"data.max_seq_len: {length} tokens{_virtual_note(recipe)} do not fit {recipe.model.name!r}, which has "
                f"learned positions for {learned} tokens only (longer inputs fail inside the model); set "
                f"data.max_seq_len to {learned - virtual} or less{fewer}"]
    context = trained_context(skeleton)
    if learned is None and context is not None and length + virtual > context and context - virtual >= 1:
        default = "" if "max_seq_len" in recipe.data.model_fields_set else " (the default)"
        log.warning("data.max_seq_len %d%s%s is longer than the %d-token context %r was trained for: rows past it "
                    "train positions the model never saw; set data.max_seq_len to %d or less unless the model is meant "
                    "to be extended (rope scaling)", length, default, _virtual_note(recipe), context, recipe.model.name,
                    context - virtual)
    return []


def _check_keep_modules(skeleton: Any, keep: list[str]) -> list[str]:
    """Every `quantization.keep_modules` entry must name some linear layer (transformers' matching rules; GPT-2's
    Conv1D layers count, and so does the output head, which is kept anyway); the hint names the quantized ones."""
    import torch
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.quantizers_utils import should_convert_module

    from peftkit.models.load import quantizable_layers

    linear = [name for name, module in skeleton.named_modules() if isinstance(module, (torch.nn.Linear, Conv1D))]
    kinds = sorted({name.rsplit(".", 1)[-1] for name in quantizable_layers(skeleton)})
    return [
        f"quantization.keep_modules: {entry!r} matches no linear layer of the model; use names such as {', '.join(kinds)}"
        for entry in keep
        if all(should_convert_module(name, [entry]) for name in linear)
    ]


def fitted_max_seq_len(recipe: Recipe, skeleton: Any) -> Recipe:
    """The recipe with the schema's default data.max_seq_len lowered to a learned position table's size (a 512-token
    BERT), less prefix/prompt tuning's virtual tokens; a value the recipe set is checked, not changed (_check_context)."""
    from peftkit.models.skeleton import learned_position_limit

    if skeleton is None or "max_seq_len" in recipe.data.model_fields_set:
        return recipe
    learned = learned_position_limit(skeleton)
    if learned is None:
        return recipe
    fitted = learned - virtual_positions(recipe)
    if fitted < 1 or recipe.data.max_seq_len <= fitted:
        return recipe
    log.info("data.max_seq_len: the default %d lowered to %d, the positions %s has%s", recipe.data.max_seq_len, fitted,
             recipe.model.name, f" less {recipe.adapter.method}'s {virtual_positions(recipe)} virtual tokens"
             if virtual_positions(recipe) else "")
    return recipe.model_copy(update={"data": recipe.data.model_copy(update={"max_seq_len": fitted})})


@as_command
def validate_recipe(recipe: Recipe, *, check_model: bool = True) -> Recipe:
    """Raise one ConfigError listing every problem found; return the recipe as it will run (fitted_max_seq_len)
    when it is runnable."""
    from peftkit.adapters import check_recipe_adapter

    problems, tool_use = _check_data(recipe)
    problems += check_recipe_adapter(recipe)
    from peftkit.train.deepspeed import check_deepspeed  # `deepspeed:` combinations and JSON file

    problems.extend(check_deepspeed(recipe))
    problems.extend(bitsandbytes_problems(recipe))
    problems.extend(filter(None, [cpu_blocksize_problem(recipe)]))
    from peftkit.models.load import chat_template_setting_problem

    template_problem = chat_template_setting_problem(recipe.model.chat_template)  # a file: checked without the model
    problems.extend(filter(None, [template_problem]))
    skeleton = None
    if check_model:
        model_problems, skeleton = _check_model(recipe, None if template_problem else tool_use)
        problems.extend(model_problems)
    if problems:
        raise ConfigError(problems)
    _warn_about_ignored_settings(recipe)
    _warn_about_learning_rate(recipe)
    _warn_about_prefix_without_projection(recipe)
    _warn_about_unfreeze_schedule(recipe)
    _warn_about_this_machine(recipe)
    return fitted_max_seq_len(recipe, skeleton)


def _written(section: Any, field: str) -> bool:
    """Whether the recipe set `field` to other than its default. A run's stored recipe.yaml writes every default
    out, so being set is not enough: its resume (or `peftkit train RUN_DIR`) would warn of what the user never wrote."""
    return field in section.model_fields_set and getattr(section, field) != type(section).model_fields[field].default


def _warn_about_ignored_settings(recipe: Recipe) -> None:
    """Settings the recipe wrote that another one overrides: said, so a user does not wait for their effect."""
    if recipe.data.eval is not None and _written(recipe.data, "eval_fraction") and recipe.data.eval_fraction:
        log.warning("data.eval_fraction is ignored: data.eval names the eval set, and all of data.train trains")
    if recipe.data.max_eval_examples and (recipe.data.eval is not None or recipe.data.eval_fraction == 0):
        log.warning("data.max_eval_examples is ignored: it limits the eval split drawn by data.eval_fraction, and %s",
                    "data.eval names the eval set (used whole)" if recipe.data.eval is not None else
                    "data.eval_fraction is 0")
    if recipe.train.max_steps and _written(recipe.train, "epochs"):
        log.warning("train.epochs is ignored: train.max_steps=%d sets the length of training", recipe.train.max_steps)


# The learning rates each method is usually trained with (low, high): a recipe ten times outside says so before
# training, since too high a rate shows only as a NaN or exploding loss minutes later, and too low as nothing learnt.
USUAL_LR: dict[str, tuple[float, float]] = {
    "full": (1e-6, 2e-4), "partial": (1e-5, 1e-3), "lora": (2e-5, 1e-3), "qlora": (2e-5, 1e-3),
    "ia3": (1e-4, 1e-2), "prefix_tuning": (1e-4, 1e-2), "prompt_tuning": (1e-4, 3e-1),
}


def learning_rate_advice(method: str, lr: float) -> str | None:
    """A sentence when `lr` is ten times above or below what `method` usually trains with, else None."""
    low, high = USUAL_LR.get(method, (0.0, float("inf")))
    if lr > 10 * high:
        return (f"train.lr {lr:g} is more than ten times the usual rate for {method} ({low:g} to {high:g}): "
                "expect the loss to explode or turn NaN; lower train.lr unless you mean it")
    if lr < low / 10:
        return (f"train.lr {lr:g} is less than a tenth of the usual rate for {method} ({low:g} to {high:g}): "
                "the model will barely change; raise train.lr unless you mean it")
    return None


def _warn_about_prefix_without_projection(recipe: Recipe) -> None:
    """peft's (and peftkit's) default trains the prefix directly, which the prefix-tuning paper found unstable, and a
    trial on SmolLM2 confirmed (eval loss 3.0 -> 9.1 in three steps); the default stays because projection
    checkpoints cannot be trained from under DeepSpeed, so the advice is given outside it."""
    if recipe.adapter.method != "prefix_tuning" or recipe.adapter.prefix_projection or recipe.deepspeed is not None:
        return
    say_once(log, logging.WARNING, "prefix tuning without adapter.prefix_projection trains the prefix directly, which "
             "is unstable (a trial on SmolLM2 went from eval loss 3.0 to 9.1 in three steps at lr 1e-3): set "
             "`prefix_projection: true` with `encoder_hidden_size: 256` and lr about 5e-3, as "
             "recipes/quickstart-prefix.yaml does")


def _warn_about_learning_rate(recipe: Recipe) -> None:
    advice = learning_rate_advice(recipe.adapter.method, recipe.train.lr)
    if advice:
        log.warning(advice)


def _warn_about_unfreeze_schedule(recipe: Recipe) -> None:
    """Training warns of a gradual-unfreezing schedule that ends before train_last_layers; said here too where the
    recipe alone gives the run's length (train.max_steps for every_steps, train.epochs for every_epochs)."""
    adapter = recipe.adapter
    schedule = getattr(adapter, "unfreeze_schedule", None)
    if schedule is None or (schedule.every_epochs and recipe.train.max_steps):
        return
    from peftkit.adapters.partial import unfinished_schedule_advice

    advice = unfinished_schedule_advice(schedule.start_layers, adapter.train_last_layers, schedule,
                                        recipe.train.max_steps or 0, recipe.train.epochs)
    if advice:
        say_once(log, logging.WARNING, advice)


def _warn_about_this_machine(recipe: Recipe) -> None:
    """A recipe may be checked here and trained elsewhere: what only this machine lacks is a warning, not a problem."""
    import torch

    if recipe.train.eval_steps and recipe.data.eval is None and recipe.data.eval_fraction == 0:
        log.warning("train.eval_steps is set, but there is no eval set (data.eval_fraction is 0 and no data.eval): "
                    "nothing will be evaluated")
    if recipe.train.device == "cuda" and not torch.cuda.is_available():
        log.warning("train.device is `cuda`, and this machine has no CUDA GPU: `train` will refuse to start here")
    elif recipe.train.device == "mps" and not torch.backends.mps.is_available():
        log.warning("train.device is `mps`, and this machine has no Apple GPU: `train` will refuse to start here")
    from peftkit.models.load import planned_device

    advice = paged_optimizer_advice(recipe.train.optimizer, planned_device(recipe.train.device))
    if advice:
        say_once(log, logging.WARNING, advice)


def paged_optimizer_advice(optimizer: str, device: str) -> str | None:
    """A sentence when a paged optimizer (axolotl's and the QLoRA paper's `paged_adamw_*`) is asked for off CUDA,
    where bitsandbytes runs it unpaged."""
    if not optimizer.startswith("paged_") or device == "cuda":
        return None
    return (f"train.optimizer {optimizer} pages optimizer states between GPU and CPU memory; on {device} there is "
            f"nothing to page and it runs as {optimizer.removeprefix('paged_')}")
