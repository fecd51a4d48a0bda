"""Recipe loading: YAML text -> overrides -> `Recipe`, with every problem reported at once."""

from __future__ import annotations

import copy
import difflib
import os
import re
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from peftkit.config.schema import NAMED_CHAT_TEMPLATES, STORED_RUN, Recipe, is_inline_template
from peftkit.errors import ConfigError
from peftkit.utils.yaml_flow import flow_yaml

DATA_PATH_KEYS = ("train", "eval", "heldout")

# Names users bring from transformers / peft / axolotl / LLaMA-Factory / TRL configs, mapped to where peftkit keeps
# them (`section.key`): inside that section the did-you-mean hint names the key, anywhere else its whole path.
KEY_ALIASES: dict[str, str] = {
    "base_model": "model.name",
    "model_name_or_path": "model.name",
    "template": "model.chat_template",
    "chat_template": "model.chat_template",
    "flash_attention": "model.attn_implementation",
    "sdp_attention": "model.attn_implementation",
    "load_in_4bit": "quantization.bits",
    "load_in_8bit": "quantization.bits",
    "quantization_bit": "quantization.bits",
    "finetuning_type": "adapter.method",
    "peft_type": "adapter.method",
    "lora_r": "adapter.r",
    "lora_rank": "adapter.r",
    "rank": "adapter.r",
    "lora_alpha": "adapter.alpha",
    "lora_dropout": "adapter.dropout",
    "lora_target": "adapter.target_modules",
    "lora_target_linear": "adapter.target_modules",
    "lora_target_modules": "adapter.target_modules",
    "peft_use_dora": "adapter.use_dora",
    "peft_use_rslora": "adapter.use_rslora",
    "use_peft": "adapter.method",
    "lora_modules_to_save": "adapter.modules_to_save",
    "lora_layers_to_transform": "adapter.layers",
    "layers_to_transform": "adapter.layers",
    "dataset": "data.train",
    "datasets": "data.train",
    "dataset_name": "data.train",
    "type": "data.format",
    "dataset_text_field": "data.columns",
    "sequence_len": "data.max_seq_len",
    "cutoff_len": "data.max_seq_len",
    "max_length": "data.max_seq_len",
    "max_seq_length": "data.max_seq_len",
    "model_max_length": "data.max_seq_len",
    "default_system_message": "data.system_prompt",
    "val_set_size": "data.eval_fraction",
    "val_size": "data.eval_fraction",
    "max_eval_samples": "data.max_eval_examples",
    "train_on_inputs": "data.train_on_prompt",
    "completion_only_loss": "data.train_on_prompt",
    "assistant_only_loss": "data.train_on_prompt",
    "learning_rate": "train.lr",
    "num_epochs": "train.epochs",
    "num_train_epochs": "train.epochs",
    "micro_batch_size": "train.batch_size",
    "per_device_train_batch_size": "train.batch_size",
    "per_device_eval_batch_size": "eval.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "lr_scheduler": "train.scheduler",
    "lr_scheduler_type": "train.scheduler",
    "warmup_steps": "train.warmup_ratio",
    "optim": "train.optimizer",
    "bf16": "train.dtype",
    "fp16": "train.dtype",
    "torch_dtype": "train.dtype",
    "eval_strategy": "train.eval_steps",
    "evaluation_strategy": "train.eval_steps",
    "evals_per_epoch": "train.eval_steps",
    "save_strategy": "train.save_steps",
    "saves_per_epoch": "train.save_steps",
    "packing": "train.packing",
    "sample_packing": "train.packing",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "use_gradient_checkpointing": "train.gradient_checkpointing",
}

_EVALS_EVERY = "a step count (`eval_steps: N`: every N optimizer steps); left out, the run evaluates at the end of each epoch"
_SAVES_EVERY = "a step count (`save_steps: N`: every N optimizer steps); left out, the run saves at the end of each epoch"
_LAYER_RANGE = "a range [first, last] of layer indices, e.g. [0, 11]"

ALIAS_NOTES: dict[str, str] = {
    "template": "`chatml`, `plain`, a Jinja template file, or leave it out for the tokenizer's own",
    "flash_attention": "`flash_attention: true` is `attn_implementation: flash_attention_2`",
    "sdp_attention": "`sdp_attention: true` is `attn_implementation: sdpa`",
    "load_in_4bit": "`load_in_4bit: true` is `quantization: {bits: 4}`, or `adapter.method: qlora`",
    "load_in_8bit": "`load_in_8bit: true` is `quantization: {bits: 8}`",
    "finetuning_type": "LLaMA-Factory's `freeze` is `partial`",
    "lora_target": "`all` is `all-linear`; several modules are a list, e.g. [q_proj, v_proj]",
    "lora_target_linear": "`lora_target_linear: true` is `target_modules: all-linear`",
    "use_peft": "`use_peft: true` is `adapter.method: lora`, the default; `false` is `method: full`",
    "lora_layers_to_transform": _LAYER_RANGE,
    "layers_to_transform": _LAYER_RANGE,
    "dataset_name": "a Hub dataset is written `hf:OWNER/NAME` there (a split: `hf:OWNER/NAME:train`)",
    "torch_dtype": "`auto`, `float32`, `bfloat16` or `float16`",
    "eval_strategy": _EVALS_EVERY,
    "evaluation_strategy": _EVALS_EVERY,
    "evals_per_epoch": _EVALS_EVERY,
    "save_strategy": _SAVES_EVERY,
    "saves_per_epoch": _SAVES_EVERY,
    "dataset": "a data file or a list of them",
    "datasets": "a data file or a list of them",
    "dataset_text_field": "`dataset_text_field: FIELD` is `columns: {text: FIELD}`",
    "completion_only_loss": "in the opposite sense: `completion_only_loss: true` is `train_on_prompt: false`, the default",
    "assistant_only_loss": "in the opposite sense: `assistant_only_loss: true` is `train_on_prompt: false`, the default",
    "val_set_size": "a fraction of the training data below 1, e.g. 0.05; a count of examples such as `100` is not "
                    "taken: give a fraction, and cap the split at 100 examples with `data.max_eval_examples: 100`",
    "val_size": "a fraction of the training data below 1, e.g. 0.05; a count of examples such as `100` is not taken: "
                "give a fraction, and cap the split at 100 examples with `data.max_eval_examples: 100`",
    "warmup_steps": "a fraction of the training steps, e.g. 0.05",
    "bf16": "`bf16: true` is `dtype: bfloat16`",
    "fp16": "`fp16: true` is `dtype: float16`",
}
"""What to add to an alias's hint where the value is written differently (or means the opposite)."""

GENERIC_ALIASES: dict[str, tuple[str, ...]] = {
    "type": (), "rank": (), "max_length": (), "dataset": (), "datasets": (), "template": ("data",), "packing": ("data",),
}
"""Aliases that are common words (`quantization.type`, `eval.max_length`, `deepspeed.rank` mean something else):
besides in their target's own section they apply only at the top level and in the sections named here."""

CLOSE_BEFORE_ALIAS = 0.75
"""Inside a section, a key of its own spelled at least this much like the unknown key (difflib ratio) is suggested
before another section's alias (`eval.micro_batch_size` is `eval.batch_size`, not `train.batch_size`)."""

NOT_NEEDED: dict[str, str] = {
    "stage": "peftkit always runs supervised fine-tuning (LLaMA-Factory's `stage: sft`)",
    "do_train": "`peftkit train` trains",
    "do_eval": "every run evaluates on `data.eval`, or on `data.eval_fraction` of the training data",
    "dataset_dir": "data files are found relative to the recipe's folder: give their paths in `data.train`",
    "resume_from_checkpoint": "resume with `peftkit train RECIPE --resume` (`--resume auto` in jobs that always pass it)",
    "overwrite_output_dir": "`peftkit train RECIPE --force` replaces a finished run",
    "model_type": "the model class follows from `task` (causal_lm: AutoModelForCausalLM)",
    "tokenizer_type": "the tokenizer is the model's own (AutoTokenizer)",
    "max_samples": "peftkit trains on every example of data.train: give a shorter file, or a Hub split as "
                   "`hf:OWNER/NAME:train[:500]`",
}
"""Foreign keys that have no peftkit setting, with the reason: a did-you-mean would point somewhere wrong."""

SECTION_SHORTHANDS: dict[str, str] = {"model": "name", "adapter": "method", "data": "train", "quantization": "bits"}
"""The key a section given as a single value (axolotl's `adapter: lora`) most likely meant."""

FORMAT_ALIASES: dict[str, str] = {"chat_template": "chat", "conversational": "chat", "completion": "text",
                                  "prompt-completion": "prompt_completion"}
"""axolotl / TRL names of data formats -> `data.format` values."""

AXOLOTL_COLUMNS: dict[str, str] = {"field_messages": "messages", "message_field_role": "role",
                                   "message_field_content": "content", "field_instruction": "prompt",
                                   "field_input": "input", "field_output": "response", "field_system": "system",
                                   "field": "text"}
"""axolotl dataset-entry field mappings -> `data.columns` keys."""


class DuplicateKeyError(yaml.MarkedYAMLError):
    """A key given twice in one mapping: PyYAML would keep the last value without a word."""


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue  # keys merged in from an anchor (`<<: *base`) may be overridden on purpose
            key = self.construct_object(key_node)
            if key in first_line:
                raise DuplicateKeyError(
                    problem=f"duplicate key `{key}` (first given at line {first_line[key]}); YAML would keep only "
                    "the last value: remove one of them",
                    problem_mark=key_node.start_mark,
                )
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def expand_path(value: str) -> Path:
    """`~`, `$HOME` and `${VAR}` as a shell would expand them; an unset variable stays as written."""
    try:
        return Path(os.path.expandvars(value)).expanduser()
    except RuntimeError:  # `~name` of a user this machine does not know
        user = value.split("/", 1)[0]
        raise ConfigError(f"{value}: there is no user {user[1:]!r} here, so {user} cannot be expanded; write the "
                          "path out (or `~/...` for your own home)") from None


def unset_variable_message(expanded: str) -> str | None:
    """What to say of a path that still holds `$VAR` / `${VAR}` after `expand_path`: that variable is not set."""
    unset = [name for name in re.findall(r"\$\{?(\w+)", expanded) if name not in os.environ]
    return f"${unset[0]} is not set in the environment, so it was not expanded: export it or write the path out" \
        if unset else None


_YAML_11_BOOLEANS = {"yes", "no", "on", "off", "y", "n"}
"""Words YAML 1.1 reads as booleans; on the command line they stay text (a bool field still takes them)."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (["train", "lr"], 0.0001). Values are parsed as YAML scalars / lists / `{...}` maps;
    anything else stays the text it is (`data.system_prompt=You are: a bot` is a sentence, not a mapping)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key.sub=value (e.g. train.lr=1e-4)")
    if not raw.strip():  # `output_dir=$OUT` with OUT unset: the recipe's value must not quietly give way to a default
        raise ConfigError(f"override {text!r} has no value (an unset shell variable?); write {key.strip()}=null for "
                          f"the default, or \"{key.strip()}=''\" (quoted so the shell keeps the '') for an empty text")
    try:
        value = _yaml_load(raw)
    except yaml.YAMLError:
        value = raw
    if (isinstance(value, dict) and not raw.lstrip().startswith("{")) or raw.strip().lower() in _YAML_11_BOOLEANS:
        value = raw
    quoted = raw.strip()[:1] in ("'", '"')
    if "#" in raw and not quoted and (value is None or isinstance(value, str)):  # `#1 helper` is text, not a YAML comment
        value = raw.strip()
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    if isinstance(overrides, str):  # iterated, a string would be read one character at a time
        raise ConfigError(f"overrides are a list of 'key=value' strings, not one string: pass [{overrides!r}]")
    for text in overrides:
        path, value = parse_override(text)
        if value is None and _drop_key(data, path):  # its default applies (none is other than null where null is
            continue  # allowed), and another method's key can be taken out of a recipe that switches method
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: `{part}` is not a section")
            node = child
        node[path[-1]] = value
    return data


def _drop_key(data: dict[str, Any], path: list[str]) -> bool:
    """Remove the key at `path` where the recipe has it; False (nothing changed) where it does not: a misspelt key, or
    one of a section the recipe lacks, is then set to null and refused or checked as before."""
    node: Any = data
    for part in path[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or path[-1] not in node:
        return False
    del node[path[-1]]
    return True


NEVER_RECIPES = (".jsonl", ".ndjson", ".csv", ".tsv", ".parquet")
"""Data-file suffixes no recipe has; a `.json` or `.txt` file may hold a recipe (YAML reads JSON)."""


def _data_file_refusal(path: Path, suffix: str) -> ConfigError:
    return ConfigError(f"{path} is a data file ({suffix}), not a recipe: commands take a recipe YAML that "
                       f"names its data, e.g. a copy of recipes/quickstart.yaml (or the README's \"A recipe\") with "
                       f"`data: {{train: {path}}}`")


def _reads_as_records(data: Any) -> bool:
    """Parsed text that is data, not a recipe: a list, a string (plain text), or records in a known format."""
    from peftkit.data.formats import detect_format

    if isinstance(data, (list, str)):
        return True
    return isinstance(data, dict) and not set(data) & set(Recipe.model_fields) and detect_format(data) is not None


def read_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.y*ml"))
        hint = f"; it holds {', '.join(found[:5])}" if found else ""
        raise ConfigError(f"{path} is a folder; give the recipe file itself (a .yaml file){hint}")
    if not path.is_file():
        raise ConfigError(f"recipe file {path} does not exist (check the path; the README's \"A recipe\" section "
                          "and the repository's recipes/ have examples)")
    from peftkit.data.files import data_suffix

    suffix = data_suffix(path)
    if suffix in NEVER_RECIPES or path.suffix.lower() == ".gz":  # `peftkit train data/train.jsonl`
        raise _data_file_refusal(path, suffix)
    try:
        data = _parsed_yaml(path)
    except ConfigError:
        if suffix == ".txt":  # plain-text training data is rarely YAML
            raise _data_file_refusal(path, suffix) from None
        raise
    if suffix in (".json", ".txt") and _reads_as_records(data):
        raise _data_file_refusal(path, suffix)
    if data is None:
        raise ConfigError("the recipe is empty; it needs at least a `data.train` file", str(path))
    if not isinstance(data, dict):
        raise ConfigError(f"the recipe must be a mapping of sections, got {type(data).__name__}", str(path))
    return data


def _parsed_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"recipe file is not UTF-8 text (byte {exc.start}); save it as UTF-8", str(path)) from None
    try:
        data = _yaml_load(text)
    except DuplicateKeyError as exc:
        mark = exc.problem_mark
        raise ConfigError(f"{path}:{mark.line + 1}: {exc.problem}") from None  # file:line names the source
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        lines = text.splitlines()
        line = f" (`{lines[mark.line].strip()[:80]}`)" if mark and mark.line < len(lines) else ""
        start = exc.context_mark
        started = (f", {exc.context} that starts at line {start.line + 1} (`{lines[start.line].strip()[:80]}`)"
                   if exc.context and start and start.line < len(lines) and (not mark or start.line != mark.line) else "")
        raise ConfigError(f"YAML syntax error at {where}{line}: {exc.problem}{started}{_yaml_advice(str(exc.problem))}",
                          str(path)) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"YAML syntax error: {exc}", str(path)) from None
    return data


def _leaf_types(annotation: Any) -> list[Any]:
    args = typing.get_args(annotation)
    return [annotation] if not args else [leaf for arg in args for leaf in _leaf_types(arg)]


def _section_class(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """Walk the schema along an error location to the section class it points into."""
    cls: type[BaseModel] = Recipe
    for part in loc:
        field = cls.model_fields.get(str(part))
        if field is None:
            return None
        found = [t for t in _leaf_types(field.annotation) if isinstance(t, type) and issubclass(t, BaseModel)]
        if not found:
            return None
        cls = found[0]
    return cls


def _sections_for(loc: tuple[Any, ...]) -> list[type[BaseModel]]:
    """Candidate classes owning the last key of `loc` (handles tagged unions)."""
    from peftkit.config import schema

    if loc and loc[0] == "adapter" and len(loc) >= 2:
        for cls in schema.ADAPTER_CLASSES:
            if cls.model_fields["method"].default == loc[1]:
                # Nested blocks (e.g. `adapter.partial.unfreeze_schedule.x`) walk down from the method's class.
                for part in loc[2:-1]:
                    field = cls.model_fields.get(str(part))
                    found = [t for t in _leaf_types(field.annotation) if isinstance(t, type) and issubclass(t, BaseModel)] if field else []
                    if not found:
                        return []
                    cls = found[0]
                return [cls]
    if loc and loc[0] == "deepspeed" and len(loc) == 3:  # `deepspeed.<zero|json tag>.key`
        return [schema.DeepSpeedConfig]
    cls = _section_class(loc[:-1])
    return [cls] if cls is not None else []


def _section_owning(key: str) -> list[str]:
    """`train.lr` for a top-level `lr`: the sections that have a field of that name."""
    from peftkit.config import schema

    owners = []
    for name, field in schema.Recipe.model_fields.items():
        classes = [t for t in _leaf_types(field.annotation) if isinstance(t, type) and issubclass(t, BaseModel)]
        if name == "adapter":
            classes = list(schema.ADAPTER_CLASSES)
        if any(key in cls.model_fields for cls in classes):
            owners.append(f"{name}.{key}")
    return owners


def _alias_hint(key: str, section: list[str], known: list[str]) -> str | None:
    """peftkit's name for a foreign `key` found in `section` (a path; [] at the top level): the key itself inside its
    own section, else its whole path. None: no alias applies here, because the key is a common word that means
    something else in this section (GENERIC_ALIASES), this section has a key spelled much like it, or it is an alias
    of a key that this section's adapter method does not have."""
    target = KEY_ALIASES.get(key)
    if target is None:
        return None
    parent, _, leaf = target.rpartition(".")
    where = ".".join(section)
    if parent == where:
        return leaf if leaf in known else None
    if not where:
        return target
    if key in GENERIC_ALIASES and where not in GENERIC_ALIASES[key]:
        return None
    return None if difflib.get_close_matches(key, known, n=1, cutoff=CLOSE_BEFORE_ALIAS) else target


def _axolotl_columns(entries: list[Any]) -> dict[str, Any]:
    """The field mappings of axolotl dataset entries (the first entry that has some), as `data.columns`."""
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        fields = {**entry, **(entry["type"] if isinstance(entry.get("type"), dict) else {})}  # `type: {field_...}`
        columns: dict[str, Any] = {ours: fields[theirs] for theirs, ours in AXOLOTL_COLUMNS.items()
                                   if isinstance(fields.get(theirs), str)}
        mapping = fields.get("message_property_mappings")
        if isinstance(mapping, dict):
            columns.update({k: mapping[k] for k in ("role", "content") if isinstance(mapping.get(k), str)})
        for key in ("role", "content"):
            if columns.get(key) == key:  # peftkit's default already
                del columns[key]
        roles = fields.get("roles")  # axolotl: role -> speaker names; peftkit: speaker name -> role
        if isinstance(roles, dict):
            columns["roles"] = {str(name): role for role, names in roles.items()
                                if role in ("system", "user", "assistant", "tool")
                                for name in ([names] if isinstance(names, str) else names or [])}
        if columns and not columns.items() <= {"messages": "messages", "text": "text"}.items():
            return columns  # (the field names peftkit detects by itself need no mapping)
    return {}


def _entry_source(path: str, bases: tuple[Path, ...]) -> str:
    """An axolotl entry's `path` as `data.train` names it: `hf:OWNER/NAME` for a Hub dataset id (one slash, no
    data-file suffix, and neither such a file nor a folder OWNER next to the recipe or here), else the path as
    written."""
    from peftkit.data.files import looks_like_hub_id

    if not looks_like_hub_id(path):
        return path
    local = any((base / path).exists() or (base / path).parent.is_dir() for base in bases or (Path.cwd(),))
    return path if local else f"hf:{path}"


def _dataset_entries_fix(value: Any, key: str, top: bool = False, bases: tuple[Path, ...] = ()) -> str:
    """What `data.<key>` takes instead of axolotl's dataset entries (`[{path: a.jsonl, type: sharegpt}, ...]`),
    written with the entries' paths (a Hub id as `hf:OWNER/NAME`; local paths are looked for in `bases`) and field
    mappings; `top`: the fix writes the `data:` section around it."""
    entries = value if isinstance(value, list) else [value]
    paths = [entry.get("path") if isinstance(entry, dict) else entry for entry in entries]
    paths = [_entry_source(path, bases) for path in paths if isinstance(path, str)] or ["FILE.jsonl"]
    columns = _axolotl_columns(entries)
    written = f"data: {flow_yaml({key: paths})}" if top else f"{key}: {flow_yaml(paths)}"
    fix = f"a data file or a list of them, not axolotl's dataset entries: write `{written}`"
    if columns:
        return fix + f"; axolotl's field mappings are written as `data.columns: {flow_yaml(columns)}` (`data.format` stays auto)"
    return fix + "; each file's format is detected, or set `data.format`"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _unknown_key(loc: tuple[Any, ...], shown: list[str], value: Any, bases: tuple[Path, ...] = ()) -> str:
    """An `extra_forbidden` key: peftkit's name for it (a foreign alias, a close spelling, or the section owning
    it), or why it is not needed, or the keys valid there. Inside a section its own keys come first: a close
    spelling of one of them before another section's alias."""
    key, dotted = str(loc[-1]), ".".join(shown)
    known = [name for cls in _sections_for(loc) for name in cls.model_fields]
    # their top-level keys (inside a section `model_type`, `max_samples`, ... are a misplaced key of another kind)
    if key in NOT_NEEDED and len(loc) == 1 and not (key == "stage" and _is_number(value)):  # `stage: 3`: a ZeRO stage
        return f"unknown key `{dotted}` is not needed: {NOT_NEEDED[key]}; remove it"
    section, _, sub = key.partition(".")
    if sub and len(loc) == 1 and section in Recipe.model_fields:  # `train.lr: 1e-4`: the command line's form
        return (f"unknown key `{key}`: in a recipe file a dotted key is written nested, `{section}: {{{sub}: "
                f"{flow_yaml(value) if not isinstance(value, dict) else '...'}}}` (the dotted form is for overrides on the "
                "command line)")
    hint = _alias_hint(key, shown[:-1], known)
    if hint in ("train", "data.train") and any(isinstance(e, dict) for e in (value if isinstance(value, list) else [value])):
        fix = _dataset_entries_fix(value, "train", top=hint == "data.train", bases=bases)
        return f"unknown key `{dotted}`: did you mean `{hint}`? It takes {fix}"
    if hint is not None:
        note = f" ({ALIAS_NOTES[key]})" if key in ALIAS_NOTES else ""
        return f"unknown key `{dotted}`: did you mean `{hint}`?{note}"
    if tuple(loc[:2]) == ("data", "columns") and key in AXOLOTL_COLUMNS:  # axolotl's name for one of ours
        return f"unknown key `{dotted}`: did you mean `{AXOLOTL_COLUMNS[key]}`? (axolotl's `{key}`)"
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    found = (_section_owning(key) if len(loc) == 1 else []) + close  # a key of the same name first
    if found:
        return f"unknown key `{dotted}`: did you mean `{found[0]}`?"
    if loc[0] == "adapter" and len(loc) == 3:
        from peftkit.config import schema

        owners = [c.model_fields["method"].default for c in schema.ADAPTER_CLASSES if key in c.model_fields]
        whose = f" (a key of {' and '.join(f'`method: {m}`' for m in owners)})" if owners else " (another method's key)"
        return (f"`{key}` is not a parameter of adapter method `{loc[1]}` (its parameters: {', '.join(known)}); "
                f"remove it from the recipe's adapter section{whose}")
    valid = f" (valid keys here: {', '.join(known)})" if known else ""
    return f"unknown key `{dotted}`{valid}"


_BOOL_TEXT = ("true", "false")
"""How schema.Section hands a true/false given for a number on to pydantic: text, which no number field parses."""


def _friendly(err: dict[str, Any], bases: tuple[Path, ...] = ()) -> str:
    loc = tuple(err["loc"])
    # Drop the union tag from displayed locations: `adapter.lora.r` reads as `adapter.r`.
    shown = [str(p) for i, p in enumerate(loc) if not (i == 1 and loc[0] in ("adapter", "deepspeed") and len(loc) >= 2)]
    dotted = ".".join(shown) or "(top level)"
    kind = err["type"]
    got = err.get("input")
    if kind == "extra_forbidden":
        return _unknown_key(loc, shown, got, bases)
    if kind == "dataset_entries":
        return f"`{dotted}` takes {_dataset_entries_fix(got, str(loc[-1]), bases=bases)}"
    if kind in ("model_type", "model_attributes_type") and len(loc) == 1 and isinstance(got, (str, int, float)):
        if loc[0] in SECTION_SHORTHANDS and not isinstance(got, bool):
            fix = f"write `{loc[0]}: {flow_yaml({SECTION_SHORTHANDS[loc[0]]: got})}`"
        elif loc[0] == "quantization" and got is True:
            fix = "write `quantization: {bits: 4}` (QLoRA's 4-bit NF4) or `{bits: 8}`"
        else:
            fix = f"write its keys under it, e.g. `{loc[0]}: {{KEY: VALUE}}`"
        return f"`{dotted}` is a section of keys, not a single value (got {got!r}): {fix}"
    if kind in ("model_type", "model_attributes_type", "dict_type") and isinstance(got, list):
        return (f"`{dotted}` is a section of keys, not a list: write its keys under it without `- ` "
                f"(e.g. `{shown[-1] if shown else 'section'}: {{KEY: VALUE}}`)")
    if kind == "literal_error" and loc == ("data", "format") and got in FORMAT_ALIASES:
        return (f"`data.format`: {got!r} is not a peftkit format name; peftkit calls it `{FORMAT_ALIASES[got]}`: "
                f"write `format: {FORMAT_ALIASES[got]}` (or leave `format` out: each record's format is detected)")
    if kind == "union_tag_invalid":
        from peftkit.config import schema

        valid = ", ".join(c.model_fields["method"].default for c in schema.ADAPTER_CLASSES)
        method = err["input"].get("method")
        variant = LORA_VARIANT_KEYS.get(str(method).lower())
        hint = f" ({method} is LoRA with a switch: `method: lora` and `{variant}: true`)" if variant else ""
        if not variant and str(method).lower() in valid.split(", "):
            hint = f" (names are lower case: `method: {str(method).lower()}`)"
        return f"`{dotted}.method` = {method!r} is not an adapter method; choose one of: {valid}{hint}"
    if kind == "missing" and len(loc) >= 2 and isinstance(loc[-1], int):  # a pair given one value: `layers: [3]`
        return f"`{'.'.join(shown[:-1])}` has too few values: its item {loc[-1] + 1} is missing"
    if kind in ("int_parsing", "float_parsing") and got in _BOOL_TEXT:
        return f"`{dotted}` must be a number, not {got} (YAML reads yes/no/on/off as true/false)"
    if kind == "missing":
        return f"`{dotted}` is required but missing"
    if kind == "finite_number":
        return (f"`{dotted}` must be a finite number, not {got!r} (YAML reads `.inf` / `.nan` as infinity / not a "
                "number); give a real value, or remove the key for the default")
    if kind == "int_parsing" and isinstance(got, str) and re.fullmatch(r"[0-9.]+[eE][+-]?[0-9]+", got.strip()):
        return (f"`{dotted}` must be a whole number; YAML reads {got!r} as text, not a number: write it out "
                f"(e.g. {int(float(got)) if float(got).is_integer() else 1000})")
    if kind == "string_type" and isinstance(got, (int, float)) and isinstance(loc[-1], str):  # YAML: 2024, 1.0, yes, off
        if isinstance(got, bool):
            return (f"`{dotted}`: YAML reads the value as {str(got).lower()} (yes / no / on / off / true / false are "
                    "true/false values); quote it to use it as text")
        return f"`{dotted}`: {got!r} reads as a number; quote it to use it as text ({dotted}: \"{got}\")"
    number_text = (kind != "literal_error" and isinstance(got, str)  # YAML 1.1 reads `-1e-3` as text
                   and re.fullmatch(r"[+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?", got.strip()))
    got_text = f" (got {got})" if number_text else f" (got {got!r})" if not isinstance(got, dict) else ""
    message = err["msg"].removeprefix("Value error, ")
    return f"`{dotted}`: {message}{got_text}" if shown else message  # a whole-recipe check names its own keys


def _resolve_data_paths(data: dict[str, Any], base: Path) -> None:
    from peftkit.data.files import is_pattern, matching_files
    from peftkit.data.hub import is_hub_ref
    from peftkit.data.replay import BUILTIN_PREFIX

    section = data.get("data")
    if not isinstance(section, dict):
        return
    def resolved(value: Any) -> Any:
        if isinstance(value, str) and value and not is_hub_ref(value):
            path = expand_path(value)  # `~/data.jsonl` is the user's home, not a folder named ~
            return str(path if path.is_absolute() else (base / path).resolve())
        return value

    def matched(value: Any) -> list[Any]:
        """A pattern as the files it matches (so the run's recipe.yaml lists them), matched inside `base`."""
        text = str(expand_path(value)) if isinstance(value, str) and value else ""
        if text and is_pattern(text, base):
            return [resolved(str(f)) for f in matching_files(text, base)]
        return [resolved(value)]

    for key in DATA_PATH_KEYS:
        if key not in section:  # absent stays absent: a missing `train` is reported as missing, not as None
            continue
        value = section[key]
        if key in ("train", "eval") and isinstance(value, (str, list)):
            files = [f for v in (value if isinstance(value, list) else [value]) for f in matched(v)]
            section[key] = files[0] if isinstance(value, str) and len(files) == 1 else files
        else:
            section[key] = [resolved(v) for v in value] if isinstance(value, list) else resolved(value)
    replay = section.get("replay")
    if isinstance(replay, dict) and "path" in replay and not str(replay["path"]).startswith(BUILTIN_PREFIX):
        replay["path"] = resolved(replay.get("path"))  # relative to the recipe's folder, as the other data files


def _absolute_model_paths(data: dict[str, Any], recipe_dir: Path) -> None:
    """`model.name` / `model.chat_template` given as relative paths become absolute, so the run directory's
    recipe.yaml finds them from anywhere (`peftkit chat RUN_DIR` run elsewhere). A path is looked up in the
    current directory first (where transformers would look), then next to the recipe (as data paths are)."""
    from peftkit.models.registry import BUILTINS

    section = data.get("model")
    if not isinstance(section, dict):
        return
    for key in ("name", "chat_template"):
        value = section.get(key)
        if key == "chat_template" and isinstance(value, str) and is_inline_template(value):
            continue  # the Jinja template itself, not a file name
        if isinstance(value, str) and value and value not in BUILTINS and value not in NAMED_CHAT_TEMPLATES:
            path = expand_path(value)
            if path.is_absolute():
                section[key] = str(path)
                continue
            found = next((p for p in (path, recipe_dir / path) if p.exists()), None)
            if found is not None:
                section[key] = str(found.resolve())


_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\])$")
_TYPE_WORDS = {"str": "a string", "list[str]": "a list of strings", "int": "an integer", "float": "a number",
               "bool": "true or false", "none": "null"}


def _collapse_union_branches(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """pydantic reports a `str | list[str]` field once per branch (`data.train.str`, `data.train.list[str]`);
    keep the branch matching the value's shape, or say once which shapes the field takes."""
    kept, branches = [], {}
    for err in errors:
        loc = tuple(err["loc"])
        at = next((i for i, part in enumerate(loc) if isinstance(part, str) and _TYPE_TAG.match(part)), None)
        if at is None:
            kept.append(err)
        elif len(loc) > at + 1:  # inside a value of the branch's shape (a list item): that branch is the one
            kept.append({**err, "loc": loc[:at] + loc[at + 1:]})
            branches.setdefault(loc[:at], []).append(None)
        else:
            branches.setdefault(loc[:at], []).append((loc[at], err))
    for field, found in branches.items():
        if None in found:
            continue
        value = found[0][1]["input"]
        same_shape = [err for tag, err in found if tag.startswith("list") == isinstance(value, list)]
        if isinstance(value, (list, str)) and same_shape:
            kept += [{**err, "loc": field} for err in same_shape]
        else:
            shapes = " or ".join(_TYPE_WORDS.get(tag, tag) for tag, _ in found)
            kept.append({"type": "union_shape", "loc": field, "msg": f"expected {shapes}", "input": value})
    return kept


def _merge_dataset_entries(errors: list[dict[str, Any]], data: Any) -> list[dict[str, Any]]:
    """One error for axolotl's dataset entries (mappings) given as `data.train` / `data.eval`, not one per entry."""
    section = data.get("data") if isinstance(data, dict) else None
    kept, merged = [], set()
    for err in errors:
        loc = tuple(err["loc"])
        where = loc[:2] if loc[:1] == ("data",) and loc[1:2] in (("train",), ("eval",)) else None
        value = section.get(where[1]) if where and isinstance(section, dict) else None
        if not any(isinstance(entry, dict) for entry in (value if isinstance(value, list) else [value])):
            kept.append(err)
        elif where not in merged:
            merged.add(where)
            kept.append({"type": "dataset_entries", "loc": where, "input": value})
    return kept


def recipe_from_dict(data: dict[str, Any], source: str | None = None, *, stored_run: bool = False) -> Recipe:
    """A recipe from a mapping, as `load_recipe` reads one: an adapter without `method` is LoRA, and relative paths
    that exist here (the current directory, as `load_recipe` looks next to the recipe file) are made absolute, so
    the run's recipe.yaml finds them from anywhere. The caller's mapping is left as it was. `stored_run`: the
    recipe.yaml of a trained run, exempt from refusals of settings it ignored (schema.STORED_RUN)."""
    data = _from_current_directory(data) if isinstance(data, dict) else data
    try:
        return Recipe.model_validate(data, context={STORED_RUN: True} if stored_run else None)
    except ValidationError as exc:
        errors = _merge_dataset_entries(_collapse_union_branches(exc.errors()), data)
        bases = (Path(source).parent, Path.cwd()) if source else (Path.cwd(),)  # where a dataset entry's path may be
        problems = [_friendly(e, bases) for e in errors]
        raise ConfigError(list(dict.fromkeys(problems)), source) from None


def revalidated(recipe: Recipe) -> Recipe:
    """`recipe` checked again: `recipe.model_copy(update=...)`, the documented way to change a frozen recipe, skips
    pydantic's checks, so a negative lr or a section given as a dict reached training (and failed there, in torch or
    peft, after the run directory was made). What the recipe set stays set (a default length is still fitted); it is
    read as a stored run is, so settings it ignores are not refused anew."""
    data = recipe.model_dump(mode="json", exclude_unset=True, warnings=False)
    if isinstance(data.get("adapter"), dict):  # the method picks the adapter's class, default or not
        data["adapter"]["method"] = recipe.adapter.method
    return recipe_from_dict(data, stored_run=True)


def _from_current_directory(data: dict[str, Any]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    if isinstance(data.get("adapter"), dict) and "method" not in data["adapter"]:
        data["adapter"]["method"] = "lora"
    cwd = Path.cwd()
    _absolute_model_paths(data, cwd)

    def existing(value: Any) -> Any:
        if not isinstance(value, str) or not value:
            return value
        path = expand_path(value)
        return str(path.resolve()) if not path.is_absolute() and path.exists() else value

    section = data.get("data")
    if isinstance(section, dict):
        for key in DATA_PATH_KEYS:
            value = section.get(key)
            if value is not None:
                section[key] = [existing(v) for v in value] if isinstance(value, list) else existing(value)
        if isinstance(section.get("replay"), dict) and "path" in section["replay"]:
            section["replay"]["path"] = existing(section["replay"]["path"])
    if isinstance(data.get("deepspeed"), str):
        data["deepspeed"] = existing(data["deepspeed"])
    return data


def _missing_files(data: dict[str, Any]) -> list[str]:
    from peftkit.data.files import hub_id_hint, is_pattern, missing_local_files

    section = data.get("data") if isinstance(data.get("data"), dict) else {}
    named = [(f"data.{key}", section.get(key)) for key in DATA_PATH_KEYS]
    replay = section.get("replay")
    if isinstance(replay, dict):
        named.append(("data.replay.path", replay.get("path")))
    return [f"`{key}`: no file matches the pattern {path} (`**` reaches into subfolders)" if is_pattern(path)
            else f"`{key}`: file {path} does not exist{hub_id_hint(Path(path))}" for key, value in named
            for path in missing_local_files([v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str)])]


LORA_VARIANT_KEYS = {"dora": "use_dora", "rslora": "use_rslora", "rs_lora": "use_rslora"}
"""LoRA variants other tools name as methods, and the `adapter` key that turns each on."""


def _yaml_advice(problem: str) -> str:
    """What usually causes a YAML parser's complaint in a hand-written recipe."""
    if "'\\t'" in problem:
        return "; YAML indents with spaces only: replace the tab"
    if "mapping values are not allowed" in problem:
        return ("; a value that holds ': ' must be quoted (system_prompt: \"Note: you are ...\"), and a line that "
                "is a key of its own is indented as the keys beside it are")
    if "expected <block end>" in problem or "did not find expected key" in problem:
        return "; indent this line as the other keys of its section are (spaces, the same number for each)"
    return ""


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Parse a recipe file. Relative paths in it are resolved against the recipe's directory, those given as
    overrides (the command line) against the current directory."""
    path = Path(path)
    data = read_yaml(path)
    for section in ("model", "adapter", "data", "train", "eval"):  # every key commented out: the section's defaults
        if section in data and data[section] is None:
            data[section] = {}
    recipe_dir = path.resolve().parent
    _resolve_file_paths(data, recipe_dir)
    apply_overrides(data, overrides or [])
    _resolve_file_paths(data, Path.cwd())  # what the recipe named is absolute by now: this reaches the overrides
    if isinstance(data.get("output_dir"), str):  # `${RUNS}/x` and `~/runs/x` as for data files (relative stays relative)
        data["output_dir"] = str(expand_path(data["output_dir"]))
        unset = unset_variable_message(data["output_dir"])
        if unset:
            raise ConfigError(f"output_dir: {unset}", str(path))
    if isinstance(data.get("adapter"), dict) and "method" not in data["adapter"]:
        data["adapter"]["method"] = "lora"
    _absolute_model_paths(data, recipe_dir)
    try:
        return recipe_from_dict(data, str(path))
    except ConfigError as exc:  # missing files too, so that one `validate` lists every problem (the later checks
        problems = _named_overrides([*exc.problems, *_missing_files(data)], overrides or [])  # need a valid recipe)
        raise ConfigError(problems, exc.source) from None


def _named_overrides(problems: list[str], overrides: list[str]) -> list[str]:
    """A problem with a value given on the command line says so: the recipe file does not hold it."""
    given = {text.split("=", 1)[0].strip(): text for text in overrides}
    named = []
    for problem in problems:
        key = next((k for k in given if problem.startswith((f"`{k}`", f"{k}:", f"{k} "))), None)
        unknown = re.match(r"unknown key `([^`]+)`", problem)  # `trian` of `trian.lr=5e-4`: a section misspelt
        if key is None and unknown:
            key = next((k for k in given if k == unknown[1] or k.startswith(unknown[1] + ".")), None)
        named.append(f"{problem} (set on the command line: `{given[key]}`)" if key else problem)
    return named


def _resolve_file_paths(data: dict[str, Any], base: Path) -> None:
    """Relative data files and the DeepSpeed config file, made absolute against `base`."""
    _resolve_data_paths(data, base)
    if isinstance(data.get("deepspeed"), str):
        deepspeed = expand_path(data["deepspeed"])
        data["deepspeed"] = str(deepspeed if deepspeed.is_absolute() else (base / deepspeed).resolve())


def recipe_to_yaml(recipe: Recipe) -> str:
    """Every key written out, defaults included: what a run directory stores as recipe.yaml."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
