"""LoRA (with DoRA / rsLoRA and PiSSA / OLoRA / EVA / CorDA initialisation) as a `peft.LoraConfig`.

PiSSA, OLoRA and CorDA move the principal part of each targeted weight into the adapter and leave a
residual in the base. Such an adapter only fits that residual base, so we keep a copy of the
initial adapter and let peft convert the trained one into a plain LoRA of rank 2r at save
time: the saved adapter then applies to the untouched base model like any other.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from peftkit.adapters.modules import (layer_index, lora_module_types, matches_target, peft_targets, rank_limit,
                                      selected_linear, target_problems, text_decoder)
from peftkit.adapters.registry import (
    PEFT_TASK_TYPES, AdapterMethod, TrainerExtras, decayed_parameter_names, register, trainer_optimizer_class,
)
from peftkit.config.schema import LoraAdapterConfig
from peftkit.errors import ConfigError
from peftkit.utils.once import say_once

log = logging.getLogger(__name__)

INIT_TO_PEFT: dict[str, Any] = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora", "eva": "eva",
                                 "corda": "corda", "corda_kpm": "corda", "loftq": True}
"""`loftq` starts as default LoRA and is then set from the quantization error (adapters/loftq.py)."""
TASK_TYPES = PEFT_TASK_TYPES
CORDA_INITS = {"corda": "ipm", "corda_kpm": "kpm"}
"""CorDA (peft): `corda` builds the adapter from the components of W·C that matter most on the training
rows (instruction-previewed); `corda_kpm` from those that matter least on general-knowledge rows, to
leave what the model knows in the frozen part (knowledge-preserved)."""
CALIBRATED_INITS = ("eva", *CORDA_INITS)
KNOWLEDGE_INITS = ("corda_kpm",)
"""Calibrated on general-knowledge rows (`peftkit.data.build.general_rows`) instead of the training rows."""
CONVERTED_INITS = ("pissa", "olora", *CORDA_INITS)
"""Inits that rewrite the base weights; their adapters are converted to plain LoRA when saved."""
INITIAL_ADAPTER_ATTR = "peftkit_initial_adapter"

__all__ = ["lora_config", "matches_target", "check", "init_problems", "build", "save"]


def _targets(cfg: LoraAdapterConfig, model: torch.nn.Module | None) -> str | list[str]:
    """peft refuses `layers_to_transform` with a string target (regex or `all-linear`), CorDA's preprocessing
    does not expand `all-linear`, and peft's suffix matching would reach into a vision tower: resolve to names."""
    target = cfg.target_modules
    if model is None:
        return target
    # peft expands `all-linear` into `target_parameters` for fused 3-D expert weights (Mixtral, Qwen-MoE in
    # transformers 5): LoRA there needs dropout 0 and cannot be merged or exported, so all-linear stays linear
    string_needs_names = isinstance(target, str) and (cfg.layers is not None or cfg.init in CORDA_INITS
                                                      or (target == "all-linear" and has_fused_experts(model)))
    if not string_needs_names and text_decoder(model) is None:
        return target
    names = sorted(n for n in selected_linear(model, target) if _in_layers(n, cfg.layers))
    if target == "all-linear" and has_fused_experts(model):
        kinds = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in names}))
        say_once(log, logging.INFO, f"adapter.target_modules all-linear on this mixture-of-experts model adapts its "
                                    f"linear layers ({kinds}); its experts keep their weights fused in 3-D tensors, "
                                    "which LoRA here leaves as they are")
    return names


def has_fused_experts(model: torch.nn.Module) -> bool:
    """Whether the model keeps weights as 3-D parameters of its own modules (an MoE's experts stacked in one
    tensor) rather than in linear layers."""
    return any(param.dim() == 3 for module in model.modules() if "expert" in type(module).__name__.lower()
               for param in module.parameters(recurse=False))


def _in_layers(name: str, layers: tuple[int, int] | None) -> bool:
    if layers is None:
        return True
    index = layer_index(name)
    return index is not None and layers[0] <= index <= layers[1]


def _only_conv1d_targets(cfg: LoraAdapterConfig, model: torch.nn.Module | None) -> bool:
    """GPT-2-style `Conv1D` layers store weights transposed: peft needs `fan_in_fan_out` (it would warn and
    set it per layer otherwise)."""
    if model is None:
        return False
    kinds = selected_linear(model, cfg.target_modules).values()
    return bool(kinds) and all(kind == "Conv1D" for kind in kinds)


def lora_config(cfg: LoraAdapterConfig, task: str = "causal_lm", model: torch.nn.Module | None = None) -> Any:
    from peft import LoraConfig

    layers = list(range(cfg.layers[0], cfg.layers[1] + 1)) if cfg.layers else None
    extra: dict[str, Any] = {}
    if cfg.init == "eva":
        from peft import EvaConfig

        extra["eva_config"] = EvaConfig(rho=2.0)
    if cfg.init in CORDA_INITS:
        from peft.tuners.lora.config import CordaConfig

        extra["corda_config"] = CordaConfig(corda_method=CORDA_INITS[cfg.init])
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=_targets(cfg, model),
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        init_lora_weights=INIT_TO_PEFT[cfg.init],
        layers_to_transform=layers,
        modules_to_save=cfg.modules_to_save,
        fan_in_fan_out=_only_conv1d_targets(cfg, model),
        task_type=TASK_TYPES[task],
        **extra,
    )


def check(model: torch.nn.Module, cfg: LoraAdapterConfig, task: str = "causal_lm") -> list[str]:
    """Problems with target_modules / layers / modules_to_save / init against the module tree."""
    problems = []
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if cfg.layers is not None and n_layers is not None and cfg.layers[1] >= n_layers:
        problems.append(f"adapter.layers {list(cfg.layers)} is out of range: this model has layers 0..{n_layers - 1}")
    matched, target_issues = target_problems("adapter.target_modules", cfg.target_modules, model, " (or use `all-linear`)")
    if target_issues and has_fused_experts(model):
        target_issues = [f"{target_issues[0]}. This model keeps its experts' weights fused in 3-D parameters, not in "
                         "linear layers (w1 / w2 / w3 in older code): LoRA here adapts the attention and any linear "
                         "MLP layers", *target_issues[1:]]
    problems.extend(target_issues)
    if matched and cfg.layers is not None and not any(_in_layers(n, cfg.layers) for n in matched) and not problems:
        problems.append(f"adapter.target_modules {cfg.target_modules!r} matches no module inside adapter.layers {list(cfg.layers)}")
    if not problems:
        problems.extend(_wrapped_module_problems(model, cfg))
    problems.extend(check_modules_to_save(model, cfg.modules_to_save))
    return problems


def _wrapped_module_problems(model: torch.nn.Module, cfg: LoraAdapterConfig) -> list[str]:
    """What peft would only find out while wrapping: a target it cannot adapt, or a rank above a layer's size."""
    wrapped = {n: m for n, m in peft_targets(model, _targets(cfg, model), cfg.modules_to_save).items()
               if _in_layers(n, cfg.layers)}
    kinds = lora_module_types()
    unsupported = [f"{n} ({type(m).__name__})" for n, m in wrapped.items() if not isinstance(m, kinds)]
    if unsupported:
        shown = ", ".join(unsupported[:4]) + (f" and {len(unsupported) - 4} more" if len(unsupported) > 4 else "")
        return [f"adapter.target_modules {cfg.target_modules!r} matches modules LoRA cannot adapt: {shown}. LoRA adapts "
                "Linear, Embedding, Conv1d/2d/3d, Conv1D (GPT-2) and MultiheadAttention layers: use `all-linear`, a list "
                "of layer names (e.g. [q_proj, v_proj]) or a narrower regex (e.g. `.*\\.(q_proj|v_proj)`)"]
    tied = _tied_output_head(model, wrapped)
    if tied is not None:
        return [f"adapter.target_modules {cfg.target_modules!r} includes the output head {tied}, whose weight is tied to "
                "the input embeddings: its LoRA could never be merged (merging would change the embeddings too) and "
                f"peft would save the whole embedding matrix with it. Leave {tied.rsplit('.', 1)[-1]} out of the targets, "
                f"or train it fully with `modules_to_save: [{tied.rsplit('.', 1)[-1]}]` (that unties it)"]
    sizes = {n: size for n, m in wrapped.items() if (size := rank_limit(m)) is not None}
    if sizes:
        smallest = min(sizes, key=sizes.__getitem__)
        if cfg.r > sizes[smallest]:
            kinds_ok = sorted({n.rsplit(".", 1)[-1] for n, size in sizes.items() if size >= cfg.r})
            narrow = sorted({n.rsplit(".", 1)[-1] for n, size in sizes.items() if size < cfg.r})
            instead = (f"target the others by name: {kinds_ok}" if kinds_ok else "target larger layers")
            return [f"adapter.r = {cfg.r} is larger than the smallest targeted layer ({smallest}: {sizes[smallest]} "
                    f"wide; layers narrower than r: {', '.join(narrow)}); a rank above a layer's smaller dimension adds "
                    f"no capacity, only memory: {instead}, or lower r to {sizes[smallest]}"]
    return []


def _tied_output_head(model: torch.nn.Module, wrapped: dict[str, torch.nn.Module]) -> str | None:
    """The name of a targeted output head that shares its weight with the input embeddings, if any."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tokens = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if head is None or tokens is None or not getattr(text_config, "tie_word_embeddings", False):
        return None
    return next((name for name, module in wrapped.items() if module is head), None)


def check_modules_to_save(model: torch.nn.Module, names: Sequence[str] | None) -> list[str]:
    missing = [m for m in names or [] if not any(n.endswith(m) for n, _ in model.named_modules() if n)]  # as peft matches
    if not missing:
        return []
    tops = sorted({n.split(".")[-1] for n, mod in model.named_modules() if n and not list(mod.children())} | {n for n, _ in model.named_children()})
    return [f"adapter.modules_to_save: {', '.join(missing)} not found in this model (module names include: {', '.join(tops[:30])})"]


def _eva_dataloader(calibration: Sequence[dict[str, list[int]]], batch_size: int = 8) -> Any:
    from torch.utils.data import DataLoader

    from peftkit.data.build import PaddingCollator

    collate = PaddingCollator(pad_token_id=0)

    def without_labels(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        batch = collate([{"input_ids": r["input_ids"], "labels": r["input_ids"]} for r in rows])
        batch.pop("labels")
        return batch

    return DataLoader(list(calibration), batch_size=batch_size, shuffle=False, collate_fn=without_labels)


def init_problems(init: str, quantized: bool, use_dora: bool = False) -> list[str]:
    """Inits that cannot work with (or without) a quantized base, or with DoRA; checked in recipe validation (no
    weights needed) and in `build`."""
    if init == "loftq" and use_dora:
        return ["adapter.init: loftq does not combine with use_dora; use one of them"]
    if init == "loftq" and not quantized:
        return ["adapter.init: loftq corrects the quantization error of a 4-bit/8-bit base; use method: qlora "
                "(or a quantization block), or another init"]
    if init in (*CONVERTED_INITS, *CALIBRATED_INITS) and quantized:
        return [f"adapter.init: {init} is not supported over a quantized base in peftkit; use default, gaussian or loftq"]
    return []


def build(
    model: Any,
    cfg: LoraAdapterConfig,
    *,
    task: str = "causal_lm",
    quantized: bool = False,
    calibration: Sequence[dict[str, list[int]]] | None = None,
) -> Any:
    """`get_peft_model` with the recipe's LoRA config; EVA and CorDA run on `calibration` first (the training
    rows; for `corda_kpm` general-knowledge rows, see `peftkit.data.build.general_rows`)."""
    from peft import get_peft_model

    problems = [*check(model, cfg, task), *init_problems(cfg.init, quantized, cfg.use_dora)]
    if cfg.init in CALIBRATED_INITS and not calibration:
        problems.append(f"adapter.init: {cfg.init} needs data to compute its initialisation (none was given)")
    if problems:
        raise ConfigError(problems)
    if quantized:
        from peftkit.adapters.qlora import prepare

        model = prepare(model, gradient_checkpointing=getattr(cfg, "gradient_checkpointing", False))
    config = lora_config(cfg, task, model)
    if cfg.init == "eva":
        from peft import initialize_lora_eva_weights

        with tied_adapter_warning_said():
            peft_model = get_peft_model(model, config, low_cpu_mem_usage=True)
        say_untied_head(peft_model)
        initialize_lora_eva_weights(peft_model, _eva_dataloader(calibration or []), show_progress_bar=False)
        return peft_model
    if cfg.init in CORDA_INITS:
        _preprocess_corda(model, config, calibration or [])
    with tied_adapter_warning_said():
        peft_model = get_peft_model(model, config)
    say_untied_head(peft_model)
    if cfg.init == "loftq":
        from peftkit.adapters import loftq

        config = peft_model.get_base_model().config  # a hub model's commit (model.revision resolved) in _commit_hash
        loftq.initialise(peft_model, config._name_or_path, revision=getattr(config, "_commit_hash", None))
    if cfg.init in CONVERTED_INITS:
        _keep_initial_adapter(peft_model)
    return peft_model


@contextlib.contextmanager
def tied_adapter_warning_said() -> Iterator[None]:
    """Build or attach a LoRA without peft's warning of "complications ... when merging" for tied embeddings in
    the adapter; say_untied_head says what happens instead (once: attaching a saved adapter says nothing)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Model has `tie_word_embeddings=True` and a tied layer",
                                category=UserWarning)
        yield


def say_untied_head(peft_model: Any) -> None:
    """A language model whose output head is its input embeddings, with an adapter on either: peft changes only the
    one it wraps, so the trained model has a head of its own (peftkit's merge writes it so). Said in place of
    peft's warning of "complications ... when merging"."""
    base = peft_model.get_base_model()
    if not getattr(base.config, "tie_word_embeddings", False) or base.get_output_embeddings() is None:
        return  # (a classifier's score head is no token head)
    wrapped = [name for name, module in (("input embeddings", base.get_input_embeddings()),
                                         ("output head", base.get_output_embeddings()))
               if module is not None and (hasattr(module, "base_layer") or hasattr(module, "original_module"))]
    if wrapped:
        log.info("The base ties its output head to the input embeddings, and the adapter trains the %s: the other "
                 "keeps the base's weights, so the tuned model has a head of its own; merges and exports write it "
                 "untied (llama.cpp's Gemma 2 cannot run that: its GGUF exports are refused)", " and ".join(wrapped))


def _preprocess_corda(model: Any, config: Any, calibration: Sequence[dict[str, list[int]]]) -> None:
    """peft's CorDA preprocessing: input covariance of every targeted layer over `calibration` (one row
    per forward: peft's hook takes one sequence at a time), then the SVD of W·C."""
    from peft.tuners.lora.corda import preprocess_corda

    device = next(model.parameters()).device

    def run_model() -> None:
        with torch.no_grad():
            for row in calibration:
                model(input_ids=torch.tensor([row["input_ids"]], device=device), use_cache=False)

    log.info("CorDA (%s): covariance of %d calibration rows, then one SVD per targeted layer",
             config.corda_config.corda_method, len(calibration))
    was_training = model.training
    preprocess_corda(model, config, run_model=run_model)
    model.train(was_training)


def _keep_initial_adapter(peft_model: Any) -> None:
    """Save the freshly initialised PiSSA/OLoRA adapter (the conversion reference) to a temp dir."""
    folder = Path(tempfile.mkdtemp(prefix="peftkit-initial-adapter-"))
    atexit.register(shutil.rmtree, folder, True)
    config = peft_model.peft_config["default"]
    init = config.init_lora_weights
    config.init_lora_weights = True  # peft's documented way: do not re-run the SVD on reload
    try:
        peft_model.save_pretrained(str(folder), safe_serialization=True)
    finally:
        config.init_lora_weights = init
    setattr(peft_model, INITIAL_ADAPTER_ATTR, str(folder))


def rewrote_base(peft_model: Any) -> bool:
    """Built here with an init that moved part of the base weights into the adapter (CONVERTED_INITS)."""
    return getattr(peft_model, INITIAL_ADAPTER_ATTR, None) is not None


def save(peft_model: Any, directory: Path) -> None:
    """Standard PEFT layout; PiSSA/OLoRA adapters are converted so they apply to the original base."""
    initial = getattr(peft_model, INITIAL_ADAPTER_ATTR, None)
    if initial is not None and Path(initial).is_dir():
        peft_model.save_pretrained(str(directory), safe_serialization=True, path_initial_model_for_weight_conversion=initial)
        _restore_trained_modules(peft_model, Path(directory))
    else:
        peft_model.save_pretrained(str(directory), safe_serialization=True)


def _restore_trained_modules(peft_model: Any, directory: Path) -> None:
    """peft's conversion (`subtract_mutated_init`, peft 0.21) keeps only the lora_A/lora_B tensors, so a
    trained task head (`modules_to_save`, e.g. a classifier's `score`) and DoRA's trained magnitudes would be lost
    (the adapter reloaded with fresh magnitudes): put them back. The magnitudes carry over unchanged, since the
    converted adapter on the original weights adds up to the same weight matrix as the trained one on the residual."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    path = directory / "adapter_model.safetensors"
    saved = load_file(str(path))
    missing = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(peft_model).items()
               if k not in saved and ("lora_" not in k or "lora_magnitude_vector" in k)}
    if missing:
        save_file({**saved, **missing}, str(path), metadata={"format": "pt"})


def trainer_extras(model: Any, cfg: LoraAdapterConfig, args: Any) -> TrainerExtras:
    """LoRA+ (`loraplus_lr_ratio`): the B matrices learn at lr x ratio, every other trained tensor at lr.

    Not peft's `create_loraplus_optimizer`: it also gives every 1-D tensor (DoRA magnitudes, a bias or norm trained
    whole through `modules_to_save`) the B matrices' rate, and decays norms. Weight decay here is the Trainer's own
    choice (`get_decay_parameter_names`: no biases or norms; nor DoRA magnitudes), as without LoRA+. A LoRA on an embedding layer (all its
    tensors, as peft groups them) learns at peft's LoRA+ embedding rate, 1e-6 (its `loraplus_lr_embedding` default,
    from the paper's code). The optimizer class and its settings stay the Trainer's own (`args.optim`, betas)."""
    if cfg.loraplus_lr_ratio is None:
        return TrainerExtras()
    from peft.tuners.lora import Embedding as LoraEmbedding

    embedding_lr = 1e-6  # peft.optimizers.create_loraplus_optimizer's loraplus_lr_embedding
    decayed = decayed_parameter_names(model)
    on_embeddings = {id(p) for m in model.modules() if isinstance(m, LoraEmbedding) for p in m.parameters()}
    groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in on_embeddings:
            lr = embedding_lr
        else:
            lr = args.learning_rate * (cfg.loraplus_lr_ratio if "lora_B" in name else 1.0)
        groups.setdefault((lr, name in decayed), []).append(param)
    # train.lr's groups first: the Trainer logs the first group's learning rate as the run's
    ordered = sorted(groups.items(), key=lambda item: item[0][0] != args.learning_rate)
    param_groups = [{"params": params, "lr": lr, "weight_decay": args.weight_decay if decay else 0.0}
                    for (lr, decay), params in ordered]
    optimizer_cls, kwargs = trainer_optimizer_class(args, model)
    if "bitsandbytes" in str(optimizer_cls) and kwargs.get("optim_bits") == 8:
        # as the Trainer's create_optimizer does: embedding layers keep 32-bit optimizer states
        import bitsandbytes

        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, torch.nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return TrainerExtras(optimizer=optimizer_cls(param_groups, lr=args.learning_rate, **kwargs))


METHOD = register(
    AdapterMethod(name="lora", config_class=LoraAdapterConfig, build=build, check=check, quantization=True, save=save,
                  trainer_extras=trainer_extras)
)
