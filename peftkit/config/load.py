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

from peftkit.config.schema import NAMED_CHAT_TEMPLATES, STORED_RUN, Recipe
from peftkit.errors import ConfigError

DATA_PATH_KEYS = ("train", "eval", "heldout")

# Names users bring from transformers / peft / axolotl configs, mapped to ours for did-you-mean hints.
KEY_ALIASES = {
    "learning_rate": "lr",
    "num_epochs": "epochs",
    "num_train_epochs": "epochs",
    "micro_batch_size": "batch_size",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "lr_scheduler": "scheduler",
    "lr_scheduler_type": "scheduler",
    "lora_r": "r",
    "rank": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "lora_target_modules": "target_modules",
    "sequence_len": "max_seq_len",
    "max_length": "max_seq_len",
    "base_model": "name",
    "model_name_or_path": "name",
    "cutoff_len": "max_seq_len",
    "max_seq_length": "max_seq_len",
    "val_set_size": "eval_fraction",
    "flash_attention": "attn_implementation",
    "sdp_attention": "attn_implementation",
    "optim": "optimizer",
    "bf16": "dtype",
    "fp16": "dtype",
    "dataset": "train",
    "datasets": "data",
    "dataset_text_field": "columns",
    "train_on_inputs": "train_on_prompt",
}


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
    unset = re.findall(r"\$\{?(\w+)", expanded)
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
    try:
        value = _yaml_load(raw) if raw.strip() else None
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


def read_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.y*ml"))
        hint = f"; it holds {', '.join(found[:5])}" if found else ""
        raise ConfigError(f"{path} is a folder; give the recipe file itself (a .yaml file){hint}")
    if not path.is_file():
        raise ConfigError(f"recipe file {path} does not exist (check the path; the README's \"A recipe\" section "
                          "and the repository's recipes/ have examples)")
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
        tab = "; YAML indents with spaces only: replace the tab" if "'\\t'" in str(exc.problem) else ""
        raise ConfigError(f"YAML syntax error at {where}: {exc.problem}{tab}", str(path)) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"YAML syntax error: {exc}", str(path)) from None
    if data is None:
        raise ConfigError("the recipe is empty; it needs at least a `data.train` file", str(path))
    if not isinstance(data, dict):
        raise ConfigError(f"the recipe must be a mapping of sections, got {type(data).__name__}", str(path))
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


def _friendly(err: dict[str, Any]) -> str:
    loc = tuple(err["loc"])
    # Drop the union tag from displayed locations: `adapter.lora.r` reads as `adapter.r`.
    shown = [str(p) for i, p in enumerate(loc) if not (i == 1 and loc[0] in ("adapter", "deepspeed") and len(loc) >= 2)]
    dotted = ".".join(shown) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        key = str(loc[-1])
        known: list[str] = []
        for cls in _sections_for(loc):
            known.extend(cls.model_fields)
        hint = [KEY_ALIASES[key]] if KEY_ALIASES.get(key) in known else difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = hint or _section_owning(key) if len(loc) == 1 else hint
        if hint:
            return f"unknown key `{dotted}`: did you mean `{hint[0]}`?"
        if loc[0] == "adapter" and len(loc) == 3:
            return f"`{key}` is not a parameter of adapter method `{loc[1]}` (its parameters: {', '.join(known)})"
        valid = f" (valid keys here: {', '.join(known)})" if known else ""
        return f"unknown key `{dotted}`{valid}"
    if kind == "union_tag_invalid":
        from peftkit.config import schema

        valid = ", ".join(c.model_fields["method"].default for c in schema.ADAPTER_CLASSES)
        return f"`{dotted}.method` = {err['input'].get('method')!r} is not an adapter method; choose one of: {valid}"
    if kind == "missing":
        return f"`{dotted}` is required but missing"
    got = err.get("input")
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
    got_text = f" (got {got!r})" if not isinstance(got, dict) else ""
    message = err["msg"].removeprefix("Value error, ")
    return f"`{dotted}`: {message}{got_text}" if shown else message  # a whole-recipe check names its own keys


def _resolve_data_paths(data: dict[str, Any], base: Path) -> None:
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

    for key in DATA_PATH_KEYS:
        if key not in section:  # absent stays absent: a missing `train` is reported as missing, not as None
            continue
        value = section[key]
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


def recipe_from_dict(data: dict[str, Any], source: str | None = None, *, stored_run: bool = False) -> Recipe:
    """A recipe from a mapping, as `load_recipe` reads one: an adapter without `method` is LoRA, and relative paths
    that exist here (the current directory, as `load_recipe` looks next to the recipe file) are made absolute, so
    the run's recipe.yaml finds them from anywhere. The caller's mapping is left as it was. `stored_run`: the
    recipe.yaml of a trained run, exempt from refusals of settings it ignored (schema.STORED_RUN)."""
    data = _from_current_directory(data) if isinstance(data, dict) else data
    try:
        return Recipe.model_validate(data, context={STORED_RUN: True} if stored_run else None)
    except ValidationError as exc:
        problems = [_friendly(e) for e in _collapse_union_branches(exc.errors())]
        raise ConfigError(list(dict.fromkeys(problems)), source) from None


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
    from peftkit.data.formats import missing_local_files

    section = data.get("data") if isinstance(data.get("data"), dict) else {}
    named = [(f"data.{key}", section.get(key)) for key in DATA_PATH_KEYS]
    replay = section.get("replay")
    if isinstance(replay, dict):
        named.append(("data.replay.path", replay.get("path")))
    return [f"`{key}`: file {path} does not exist" for key, value in named
            for path in missing_local_files([v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str)])]


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
        raise ConfigError([*exc.problems, *_missing_files(data)], exc.source) from None  # need a valid recipe)


def _resolve_file_paths(data: dict[str, Any], base: Path) -> None:
    """Relative data files and the DeepSpeed config file, made absolute against `base`."""
    _resolve_data_paths(data, base)
    if isinstance(data.get("deepspeed"), str):
        deepspeed = expand_path(data["deepspeed"])
        data["deepspeed"] = str(deepspeed if deepspeed.is_absolute() else (base / deepspeed).resolve())


def recipe_to_yaml(recipe: Recipe) -> str:
    """Every key written out, defaults included: what a run directory stores as recipe.yaml."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
