"""The recipe schema: frozen, typed sections that reject unknown keys.

Field docstrings are the reference for recipe authors (README.md's recipe section points here).
Semantic checks that need the file system or several sections live in `validate.py`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union, get_args

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, PositiveFloat, PositiveInt, SerializerFunctionWrapHandler,
                      Tag, ValidationInfo, field_validator, model_serializer, model_validator)

DType = Literal["auto", "float32", "bfloat16", "float16"]
NAMED_CHAT_TEMPLATES = ("chatml", "plain")
"""`model.chat_template` values that name a built-in template instead of a file."""


def is_inline_template(setting: str) -> bool:
    """`model.chat_template` holding the Jinja text itself (as axolotl's and TRL's configs can), not a file name."""
    return "{%" in setting or "{{" in setting


MAX_LORA_RANK = 65536
"""Above any layer width of today's models: a rank this large is a typo (the model check compares with the
targeted layers' own sizes)."""


def _numeric_not_bool(annotation: Any) -> bool:
    """Whether a field of this type takes numbers but not true/false (pydantic reads `yes` as 1 for an int)."""
    seen: set[Any] = set()

    def walk(tp: Any) -> None:
        seen.add(tp)
        for arg in get_args(tp):
            walk(arg)

    walk(annotation)
    return bool(seen & {int, float}) and not (seen & {bool, Any, True, False})


class Section(BaseModel):
    # `.inf` / `.nan` are valid YAML floats, but no setting means them: an infinite lr trains a NaN adapter.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, data: Any) -> Any:
        """true/false for a number becomes the text `true` / `false`, which the field then refuses at its own key
        (config/load.py says why), beside the section's other problems."""
        if isinstance(data, dict):
            numeric = {key: str(value).lower() for key, value in data.items() if isinstance(value, bool)
                       and isinstance(key, str) and key in cls.model_fields
                       and _numeric_not_bool(cls.model_fields[key].annotation)}
            return {**data, **numeric} if numeric else data
        return data

    def changed_from_defaults(self, keys: tuple[str, ...] | list[str]) -> list[str]:
        """Those of `keys` set to other than their defaults. Compared with the defaults, not with the keys written: a
        run's recipe.yaml writes every key, and a refusal of settings that do not apply must still load it."""
        fields = type(self).model_fields
        return [key for key in keys if getattr(self, key) != fields[key].default]


def check_target_regex(value: Any) -> Any:
    """peft compiles a string target as a regex only when it builds the adapter: check it while validating."""
    if not isinstance(value, str) or value == "all-linear":
        return value
    if re.fullmatch(r"\s*\w+(\s*,\s*\w+)+\s*,?\s*", value):  # LLaMA-Factory's `lora_target: q_proj,v_proj`
        names = [name.strip() for name in value.split(",") if name.strip()]
        raise ValueError(f"`{value}` is one string, read as a regular expression; several module names are a list: "
                         f"[{', '.join(names)}]")
    if value.strip() == "all":
        raise ValueError("`all` (LLaMA-Factory's) is written `all-linear` here")
    try:
        re.compile(value)
    except re.error as exc:
        unclosed = " (a list needs its closing `]`)" if value.startswith("[") and not value.rstrip().endswith("]") else ""
        raise ValueError(
            f"is not a valid regular expression ({exc}){unclosed}; a string is a regex matched against the full module "
            "name, e.g. `.*\\.(q_proj|v_proj)`; for module names write a list, e.g. [q_proj, v_proj], or use all-linear"
        ) from None
    return value


class ModelConfig(Section):
    name: str = "smollm2-135m-instruct"
    """Built-in name (`peftkit models`), local model directory, `.gguf` file, or hub id."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when `name` is a hub id."""
    trust_remote_code: bool = False
    """Run code shipped with the model. Off by default: only enable for models you trust."""
    allow_pickle: bool = False
    """Allow loading `.bin` (pickle) weights. Off by default: pickle can execute code."""
    chat_template: str | None = None
    """`chatml`, `plain`, a path to a Jinja file (or a tokenizer_config.json-style JSON file's `chat_template`), the
    Jinja text itself, or null: the tokenizer's own, else ChatML when the vocabulary
    has its tokens, else `plain` (`### User:` / `### Assistant:`, replies closed by the model's end token)."""
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"] = "auto"
    """transformers' attention kernel. `auto`: its default (sdpa where the architecture has it). The flash
    kernels need a CUDA GPU and their package (`flash-attn`), flex attention a CUDA GPU to train; elsewhere (a CPU
    chat, merge or eval of a GPU-trained run) the default is used, with a warning."""


FOUR_BIT_ONLY = ("quant_type", "double_quant", "compute_dtype", "blocksize")
"""`quantization:` keys that only 4-bit quantization reads: 8-bit (LLM.int8) stores int8 weights per row and computes
in the model's dtype."""


STORED_RUN = "stored_run"
"""Validation context key: the recipe.yaml of a run already trained. Refusals added after a run was trained (settings
it ignored) must not make it unloadable: it is read as it trained; new recipes get them."""


def stored_run(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get(STORED_RUN))


class QuantizationConfig(Section):
    bits: Literal[4, 8] = 4
    """4: QLoRA's 4-bit weights (the keys below); 8: LLM.int8 (per-row int8 weights; the 4-bit-only keys are refused)."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit only: the 4-bit number grid."""
    double_quant: bool = True
    """4-bit only: quantize the blocks' absmax constants too (QLoRA's double quantization: 0.37 bits per weight
    less at blocksize 64)."""
    compute_dtype: DType = "auto"
    """4-bit only. `auto`: float32 on CPU (no fast bf16 on AVX2), bfloat16 on GPUs that support it, else
    float16."""
    blocksize: Literal[32, 64, 128, 256, 512, 1024, 2048, 4096] = 64
    """4-bit only: weights per quantization block (one absmax each). bitsandbytes' and the QLoRA paper's
    64 by default; 32 costs 0.125 bits per weight more and halves nf4's error on SmolLM2-135M
    (`python -m benchmarks.quant_error`)."""
    keep_modules: list[str] | None = None
    """Module names (suffixes such as `down_proj`, or transformers' patterns) left unquantized, in the
    model's dtype; the output head always is. For small models whose accuracy the 4-bit grid hurts most
    (`python -m benchmarks.quant_error` ranks the module kinds)."""

    @model_validator(mode="after")
    def _four_bit_keys_need_4_bits(self, info: ValidationInfo) -> "QuantizationConfig":
        # Compared with the defaults, not `model_fields_set`: recipe.yaml files written before 8-bit records left the
        # 4-bit-only keys out hold them at their defaults. A finished run's recipe is read as it trained (STORED_RUN).
        if stored_run(info):
            return self
        changed = self.changed_from_defaults(FOUR_BIT_ONLY) if self.bits == 8 else []
        if changed:
            raise ValueError(f"{', '.join(changed)} {'applies' if len(changed) == 1 else 'apply'} to 4-bit quantization "
                             "only (8-bit quantizes each row to int8 and computes in the model's dtype, and would ignore "
                             f"{'it' if len(changed) == 1 else 'them'}); remove {'it' if len(changed) == 1 else 'them'}, "
                             "or set bits: 4")
        return self

    @model_serializer(mode="wrap")
    def _record_what_is_used(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """An 8-bit run's recipe.yaml and summary.json leave out the 4-bit keys (nf4, double quantization...) it never
        used, instead of recording their defaults as if they applied."""
        record = handler(self)
        if self.bits == 8:
            for key in FOUR_BIT_ONLY:
                record.pop(key, None)
        return record


class LoraAdapterConfig(Section):
    method: Literal["lora"] = "lora"
    r: Annotated[int, Field(gt=0, le=MAX_LORA_RANK)] = 16
    """LoRA rank; at most the smallest dimension of the targeted layers (more adds no capacity)."""
    alpha: PositiveFloat = 32.0
    """Scale of the LoRA update: alpha / r (alpha / sqrt(r) with `use_rslora`)."""
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05
    """Dropout on the LoRA branch's input while training."""
    target_modules: Union[str, list[str]] = "all-linear"
    """`all-linear`, a list of module-name suffixes, or a regex (a string that is not `all-linear`)."""
    use_dora: bool = False
    """DoRA: a learned magnitude per output channel on top of the LoRA direction (peft's `use_dora`; slower)."""
    use_rslora: bool = False
    """rsLoRA: scale the update by alpha / sqrt(r) instead of alpha / r (keeps high ranks learning)."""
    init: Literal["gaussian", "default", "pissa", "olora", "eva", "corda", "corda_kpm", "loftq"] = "default"
    """peft's `init_lora_weights`: `default` (A random, B zero: the adapter starts as a no-op), `gaussian`, or a
    start from the base weights (`pissa`, `olora`), from calibration data (`eva`, `corda`: the training data;
    `corda_kpm`: the general set, to keep what the model knows) or from the quantization error (`loftq`)."""
    layers: tuple[int, int] | None = None
    """Restrict to decoder layers [start, end] (inclusive)."""
    modules_to_save: list[str] | None = None
    """Modules trained fully and saved with the adapter (e.g. `lm_head`, `score`)."""
    loraplus_lr_ratio: PositiveFloat | None = None
    """LoRA+: the B matrices learn at `train.lr` x this ratio (the paper suggests 16), A at `train.lr`."""

    _target_regex = field_validator("target_modules")(check_target_regex)

    @model_validator(mode="after")
    def _layers_ordered(self) -> "LoraAdapterConfig":
        if self.layers is not None and (self.layers[0] < 0 or self.layers[1] < self.layers[0]):
            raise ValueError(f"layers must be [start, end] with 0 <= start <= end, got {list(self.layers)}")
        return self


class QLoraAdapterConfig(LoraAdapterConfig):
    """LoRA over a 4-bit/8-bit base. A `quantization:` block is implied (nf4 by default)."""

    method: Literal["qlora"] = "qlora"  # type: ignore[assignment]
    gradient_checkpointing: bool = True
    """Activation checkpointing set up with the 4-bit base (peft's `prepare_model_for_kbit_training`), on by default
    as in the QLoRA recipe; `false` turns it off. `train.gradient_checkpointing: true` turns it on for any method."""


class PrefixTuningAdapterConfig(Section):
    """Prefix tuning: trained key/value vectors prepended in every attention layer (base frozen)."""

    method: Literal["prefix_tuning"] = "prefix_tuning"
    num_virtual_tokens: PositiveInt = 20
    """Length of the trained prefix (per layer)."""
    prefix_projection: bool = False
    """Produce the prefix through a 2-layer MLP while training (the prefix-tuning paper's reparameterisation; the
    adapter saved is the projected prefix alone). Recommended: training the prefix directly (`false`, peft's default,
    kept here because projection checkpoints cannot be resumed under DeepSpeed) raised SmolLM2's eval loss from 3.0
    to 9.1 in three steps at lr 1e-3, where the projection lowered it to 2.6; `validate` and `train` say so. The MLP
    has encoder_hidden_size x (layers x 2 x key/value width) weights: set `encoder_hidden_size` (e.g. 256-512) on a
    large model."""
    encoder_hidden_size: PositiveInt | None = None
    """Hidden size of that MLP (default: the model's hidden size); needs `prefix_projection: true`."""

    @model_validator(mode="after")
    def _projection_size(self) -> "PrefixTuningAdapterConfig":
        if self.encoder_hidden_size is not None and not self.prefix_projection:
            raise ValueError("encoder_hidden_size only applies with prefix_projection: true")
        return self


class PromptTuningAdapterConfig(Section):
    """Prompt tuning: trained soft-prompt embeddings prepended to the input (base frozen)."""

    method: Literal["prompt_tuning"] = "prompt_tuning"
    num_virtual_tokens: PositiveInt = 20
    """Length of the trained soft prompt, in tokens."""
    init: Literal["random", "text"] = "random"
    """`text`: start the soft prompt from the embeddings of `init_text` (usually trains faster)."""
    init_text: str | None = None
    """The text whose token embeddings start the soft prompt (with `init: text`)."""

    @model_validator(mode="after")
    def _init_text(self) -> "PromptTuningAdapterConfig":
        if self.init == "text" and not (self.init_text or "").strip():
            raise ValueError("init: text needs a non-empty init_text (e.g. the task instruction)")
        if self.init == "random" and self.init_text is not None:
            raise ValueError("init_text is only used with init: text")
        return self


class IA3AdapterConfig(Section):
    """(IA)^3: learned per-channel scaling of keys, values and feed-forward activations."""

    method: Literal["ia3"] = "ia3"
    target_modules: Union[str, list[str], None] = None
    """Module-name suffixes or a regex; default: peft's choice for the architecture (Llama: k_proj, v_proj, down_proj)."""
    feedforward_modules: Union[str, list[str], None] = None
    """Which targets are feed-forward (scaled on their input); must be among target_modules."""
    modules_to_save: list[str] | None = None
    """Modules trained fully and saved with the adapter (e.g. `lm_head`, `score`)."""

    _target_regex = field_validator("target_modules", "feedforward_modules")(check_target_regex)


class FullAdapterConfig(Section):
    """Full fine-tuning: every parameter trains, no adapter (the quality reference)."""

    method: Literal["full"] = "full"


class UnfreezeScheduleConfig(Section):
    every_steps: PositiveInt | None = None
    """Unfreeze one more block every N optimizer steps (give this or `every_epochs`)."""
    every_epochs: PositiveInt | None = None
    """Unfreeze one more block every N epochs."""
    start_layers: Annotated[int, Field(ge=0)] = 0
    """Top blocks trainable from the start; one more is unfrozen each period, up to `train_last_layers`."""

    @model_validator(mode="after")
    def _one_period(self) -> "UnfreezeScheduleConfig":
        if (self.every_steps is None) == (self.every_epochs is None):
            raise ValueError("unfreeze_schedule needs exactly one of every_steps or every_epochs")
        return self


class PartialAdapterConfig(Section):
    """Classic partial fine-tuning: freeze the model except the top blocks and/or the head."""

    method: Literal["partial"] = "partial"
    train_last_layers: Annotated[int, Field(ge=0)] = 2
    """Number of top decoder/encoder blocks that train (with a schedule: how many end up unfrozen)."""
    train_head: bool = True
    """Train the output head (`lm_head`, or the classifier). With tied embeddings this trains the embeddings too."""
    train_embeddings: bool = False
    """Train the input token embeddings too."""
    unfreeze_schedule: UnfreezeScheduleConfig | None = None
    """Gradual unfreezing, e.g. `{every_steps: 50}`: one more block from the top each period."""
    layerwise_lr_decay: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    """LR multiplied by this per block going down from the head (head: lr, top block: lr*d, ...)."""

    @model_validator(mode="after")
    def _trains_something(self) -> "PartialAdapterConfig":
        start = self.train_last_layers if self.unfreeze_schedule is None else self.unfreeze_schedule.start_layers
        if self.unfreeze_schedule is not None and start > self.train_last_layers:
            raise ValueError(
                f"unfreeze_schedule.start_layers ({start}) is more than train_last_layers ({self.train_last_layers})"
            )
        if start == 0 and not (self.train_head or self.train_embeddings):
            raise ValueError(
                "nothing would train at the start: set train_last_layers (or unfreeze_schedule.start_layers) "
                "to at least 1, or train_head: true"
            )
        return self


AdapterConfig = Annotated[
    Union[
        LoraAdapterConfig,
        QLoraAdapterConfig,
        PrefixTuningAdapterConfig,
        PromptTuningAdapterConfig,
        IA3AdapterConfig,
        FullAdapterConfig,
        PartialAdapterConfig,
    ],
    Field(discriminator="method"),
]


class ReplayConfig(Section):
    """Mix general data back into training to limit catastrophic forgetting."""

    path: str = "builtin:general"
    """`builtin:general` (514 general prompts: short facts, arithmetic, explanations, instructions, advice) or a data file."""
    ratio: Annotated[float, Field(gt=0.0, le=4.0)] = 0.2
    """Replay examples added per training example (sampled deterministically; above what the set holds,
    its examples repeat)."""
    answers: Literal["auto", "base", "dataset"] = "auto"
    """`base`: train on the base model's own greedy answers to the replay prompts (self-distilled
    replay); `dataset`: on the answers as written; `auto`: `base` for built-in sets, `dataset` for files."""
    known_only: bool = False
    """With the base model's answers: replay only the prompts it answers in agreement with the written
    answer (the written answer's numbers and most of its names, those the prompt does not give away);
    replaying its wrong answers trains it to state them with confidence."""
    max_answer_tokens: PositiveInt = 256
    """Generation limit for `base` answers; answers that do not finish within it are left out."""
    distill: bool = False
    """Train replay rows towards the base model's top-20 next-token distribution (soft targets,
    computed once before training) instead of only its answer tokens."""
    contrast: bool = False
    """Also replay every training prompt *without* the recipe's system prompt, answered by the base model: the
    domain's answers are learnt behind `data.system_prompt` and the model without it stays the base model
    (needs `data.system_prompt` and the base model's answers; ask the tuned model with that system prompt)."""

    @model_validator(mode="after")
    def _checks_need_base_answers(self) -> "ReplayConfig":
        from peftkit.data.replay import answers_from_base

        for option in ("known_only", "contrast"):
            if getattr(self, option) and not answers_from_base(self.path, self.answers):
                raise ValueError(f"{option} needs the base model's answers to the replay prompts: set `answers: base` "
                                 f"(or `auto` with a built-in set), or remove {option}")
        return self


class ColumnsConfig(Section):
    """Your records' field names where they are not peftkit's (LLaMA-Factory's `columns` and `tags`), in
    one of three forms: a conversation field (`messages`, with `role` / `content` naming the keys of each
    turn and `roles` mapping speaker names), a one-turn `prompt` + `response` pair (optional `input`), or a
    `text` field (trained on every token; with `label`, the records of `task: sequence_classification`)."""

    messages: str | None = None
    """The field holding a conversation (a list of turns)."""
    role: str = "role"
    """The key of each turn's speaker (ShareGPT: `from`)."""
    content: str = "content"
    """The key of each turn's text (ShareGPT: `value`)."""
    roles: dict[str, Literal["system", "user", "assistant", "tool"]] = Field(default_factory=dict)
    """Speaker names -> roles, e.g. `{customer: user, agent: assistant}` (human/gpt/bot/... are known)."""
    prompt: str | None = None
    """The field holding the user's question or instruction, in one-turn records."""
    input: str | None = None
    """Optional field appended to the prompt after a blank line (e.g. a context passage)."""
    response: str | None = None
    """The field holding the reply that is trained on, in one-turn records."""
    system: str | None = None
    """Optional field holding a per-record system prompt (conversations and one-turn records)."""
    text: str | None = None
    """The field holding a plain text (or, for sequence classification, the text to classify)."""
    label: str | None = None
    """The field holding the class label (`task: sequence_classification` only; default `label`)."""

    @model_validator(mode="after")
    def _one_form(self) -> "ColumnsConfig":
        forms = [name for name, fields in (("messages", ("messages",)), ("prompt + response", ("prompt", "input", "response")),
                                           ("text", ("text", "label"))) if any(getattr(self, f) for f in fields)]
        if len(forms) != 1:
            raise ValueError("name the fields of one form: a conversation (`messages: FIELD`), a one-turn pair "
                             "(`prompt: FIELD`, `response: FIELD`) or a text (`text: FIELD`)"
                             + (f"; found {' and '.join(forms)}" if forms else ""))
        if forms == ["prompt + response"] and not (self.prompt and self.response):
            raise ValueError(f"a one-turn pair needs both `prompt` and `response` (missing: "
                             f"{'prompt' if not self.prompt else 'response'})")
        if not self.messages and (self.roles or self.role != "role" or self.content != "content"):
            raise ValueError("`role`, `content` and `roles` describe the turns of a conversation field: set `messages` too")
        if self.system and forms == ["text"]:
            raise ValueError("`system` belongs to conversations or one-turn pairs, not to plain text")
        return self


class DataConfig(Section):
    train: Union[str, Annotated[list[str], Field(min_length=1)]]
    """Training data, or a list of them (concatenated): chat JSONL (`messages`), ShareGPT (`conversations`),
    `prompt` + `completion`, alpaca JSON/JSONL, or plain text (.txt / `text`); also CSV / Parquet with those
    columns, a Hub dataset `hf:OWNER/NAME[/CONFIG][:SPLIT]` or a `save_to_disk` folder."""
    eval: Union[str, Annotated[list[str], Field(min_length=1)], None] = None
    """Evaluation data (same formats, also a list). Without it, `eval_fraction` of train is held out."""
    heldout: str | None = None
    """Held-out questions `{"question", "key_fact"}` scored by greedy generation before and after."""
    format: Literal["auto", "chat", "sharegpt", "prompt_completion", "alpaca", "text"] = "auto"
    """`auto` detects each record's format (a pair such as `question` + `answer` too)."""
    columns: ColumnsConfig | None = None
    """Field names of train/eval records that use other names. A single source is read with the map only (a misspelt
    field is an error); in a list of sources, one the map fits no record of is read in its detected format."""
    eval_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    """Share of the training examples held out as the eval split when `eval` is not given (0: no eval split)."""
    max_eval_examples: PositiveInt | None = None
    """The eval split drawn by `eval_fraction` holds at most this many examples (null: no limit; a split of more than
    LARGE_EVAL_SPLIT examples is warned about: a tenth of 100,000 rows is 10,000 examples at every evaluation, which
    outlasts training). A `data.eval` file is used whole."""
    max_seq_len: PositiveInt = 1024
    """Tokens per training row: longer examples are cut there (counted and warned about; a reply cut away entirely
    is not trained)."""
    system_prompt: str | None = None
    """Added as the system turn to conversations (train, eval, held-out, chat) that have none."""
    train_on_prompt: bool = False
    """Also learn the system and user turns (axolotl's `train_on_inputs`, LLaMA-Factory's `train_on_prompt`):
    every token of a training conversation is supervised, `weight: 0` turns too. The eval loss stays on the
    replies, so it compares with runs without it."""
    replay: ReplayConfig | None = None
    """General data mixed into training against forgetting, e.g. `{ratio: 1.0, distill: true}`."""

    @model_validator(mode="after")
    def _columns_replace_detection(self) -> "DataConfig":
        if self.columns is not None and self.format != "auto":
            raise ValueError(f"data.columns names the fields itself, so data.format must stay auto (it is {self.format}); "
                             "remove one of them")
        return self

    @model_validator(mode="after")
    def _contrast_needs_a_system_prompt(self) -> "DataConfig":
        if self.replay is not None and self.replay.contrast and not self.system_prompt:
            raise ValueError("data.replay.contrast replays the training prompts without data.system_prompt, so it "
                             "needs one: set data.system_prompt (the domain's), or remove contrast")
        return self


class TrainConfig(Section):
    epochs: PositiveFloat = 3.0
    """Passes over the training data (a fraction trains part of the last pass)."""
    max_steps: PositiveInt | None = None
    """Stop after this many optimizer steps (overrides epochs)."""
    batch_size: PositiveInt = 8
    """Examples per forward/backward pass on each process; one optimizer step sees batch_size x grad_accum x
    processes examples."""
    grad_accum: PositiveInt = 1
    """Batches whose gradients add up into one optimizer step (a larger effective batch in the same memory)."""
    lr: PositiveFloat = 2e-4
    """Peak learning rate, reached after the warm-up."""
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    """The learning-rate schedule after the warm-up (transformers' schedules of these names)."""
    warmup_ratio: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05
    """Share of the optimizer steps over which the learning rate rises linearly from 0 to `lr`."""
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    """AdamW's decoupled weight decay on the trained parameters."""
    max_grad_norm: Annotated[float, Field(ge=0.0)] = 1.0
    """Gradients are clipped to this global norm before each step (0: no clipping)."""
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 42
    """Seeds torch, numpy and the data order (numpy takes 0 to 2**32 - 1)."""
    eval_steps: PositiveInt | None = None
    """Evaluate every N steps (default: once per epoch)."""
    save_steps: PositiveInt | None = None
    """Checkpoint every N steps (default: once per epoch)."""
    save_total_limit: PositiveInt = 2
    """Checkpoints kept on disk (the oldest goes once a new one is complete; the best one is kept too with early
    stopping)."""
    early_stopping_patience: PositiveInt | None = None
    """Stop after this many evaluations without eval-loss improvement; the best checkpoint is kept. Evaluations
    happen every `eval_steps`, else every `save_steps`, else once per epoch; checkpoints are saved at each one."""
    logging_steps: PositiveInt = 5
    """Log the training loss (terminal, metrics.jsonl, TensorBoard) every N optimizer steps, and at each checkpoint (a
    resumed run then logs the same averages as one that ran through)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of keeping them (less memory, more compute). Refused with
    prefix tuning (the recomputation adds its KV-cache prefix twice); turns `share_prompt_prefix` off."""
    optimizer: Literal["auto", "adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit",
                       "lion_8bit", "adafactor", "sgd"] = "auto"
    """transformers' `optim`. `auto`: its default (fused AdamW). The bitsandbytes ones (`adamw_8bit`,
    `paged_adamw_8bit`, as in the QLoRA paper) keep optimizer states in 8 bits; paging needs a CUDA GPU."""
    neftune_noise_alpha: Annotated[float, Field(gt=0.0)] | None = None
    """NEFTune: uniform noise on input embeddings while training (the paper uses 5); off by default. Its noise scales
    with each sequence's length, so it turns `share_prompt_prefix` and `bucket_within_batch` off."""
    tf32: bool = False
    """TF32 matmuls on Ampere or newer NVIDIA GPUs (faster fp32 maths at a 10-bit mantissa; what axolotl's
    `tf32: true` sets); without a CUDA GPU it is ignored with a warning."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """`auto`: a CUDA GPU when one is visible, else the CPU (Apple's MPS only when named)."""
    dtype: DType = "auto"
    """Weights/compute dtype. `auto`: float32 on CPU, bfloat16 on GPUs that support it, else float16."""
    num_threads: PositiveInt | None = None
    """CPU threads for training, and for chat / eval / merge / export of the run where OMP_NUM_THREADS is not set.
    Default: OMP_NUM_THREADS when it is set, else the CPUs this process may use less those other work keeps busy
    when it starts (`peftkit/utils/threads.py`)."""
    group_by_length: bool = False
    """Batch sequences of similar length together across the dataset (less padding, but other batches:
    measured +0.06 eval loss after 5 epochs on the quickstart recipe); `bucket_within_batch` keeps
    the batches and removes most of the padding anyway."""
    supervised_logits_only: bool = True
    """Compute the vocabulary projection only where a label is supervised (faster, same loss)."""
    share_prompt_prefix: bool = True
    """Run the prompt prefix shared by a whole batch (e.g. the system prompt) once per batch (same loss). Off, with
    an info line at the start of training, with NEFTune (`neftune_noise_alpha`), several processes or DeepSpeed
    (one forward pass per backward there), gradient checkpointing (its recomputation would add the shared prefix's
    cache twice), prefix/prompt tuning (the adapter owns the prefix), or `supervised_logits_only: false`."""
    bucket_within_batch: bool = True
    """Run each batch as length buckets, each padded only to its own longest row (same batch, same loss). Off, with
    an info line at the start of training, with NEFTune (its noise scales with each sequence's padded length) and with
    several processes or DeepSpeed (one forward pass per backward there)."""
    hashed_dropout: bool = True
    """On a CPU, draw LoRA's dropout masks from a hash of each element's index (`peftkit/train/fast_dropout.py`: the
    same Bernoulli keep rate, seeded from torch's generator, 2.5-3.6x faster to draw than torch's serial generator;
    2.6-13 % shorter epochs on the quickstart recipe). `false` keeps torch's dropout. GPUs always use torch's."""
    packing: bool = False
    """Padding-free batches: each batch's rows joined into one sequence, positions restarting per row and attention
    kept within each row (same batch, same loss, no padding; replaces the length buckets and the shared prefix).
    Meant for GPUs with `model.attn_implementation: flash_attention_2` (variable-length kernels, not measured here);
    with sdpa or eager attention the joined sequence's attention grows with the square of the whole batch's length
    (2-core CPU, quickstart: 1.25x the reference's tokens/s against the default path's 1.60x)."""


class EvalConfig(Section):
    max_new_tokens: PositiveInt = 64
    """Reply length, in tokens, when held-out and general questions are answered (greedy)."""
    batch_size: PositiveInt = 16
    """Prompts answered at once when generating (held-out and general questions, replay answers)."""
    before: bool = True
    """Also ask the base model the held-out questions before training (greedy generation: the slow part), for the
    before/after comparison. The eval loss before training is always measured (one forward pass over the eval set)."""
    sample_prompts: list[str] = Field(default_factory=list)
    """Prompts answered by the tuned model at the end of a run (shown and stored in summary.json); empty: two held-out
    questions, the first answered right and the first missed (the first two where all are one or the other), so a
    recipe copied to another domain shows answers about that domain."""


Offload = Literal["none", "cpu", "nvme"]


class DeepSpeedConfig(Section):
    """DeepSpeed ZeRO. peftkit writes the full DeepSpeed JSON (`RUN_DIR/deepspeed.json`) from these
    settings and the `train:` section (batch size, accumulation, clipping, precision); docs/distributed.md."""

    stage: Literal[0, 1, 2, 3] = 2
    """ZeRO stage: 0 data parallel only, 1 shards optimizer states, 2 also gradients, 3 also parameters."""
    offload_optimizer: Offload = "none"
    """Keep optimizer states in CPU memory or on NVMe (`nvme_path`). Needs stage >= 1."""
    offload_params: Offload = "none"
    """Keep partitioned parameters in CPU memory or on NVMe. Needs stage 3."""
    nvme_path: str | None = None
    """Local NVMe directory used by `nvme` offload (must exist on every node)."""
    overlap_comm: bool | None = None
    """Overlap gradient reduction with the backward pass (null: DeepSpeed's default)."""
    contiguous_gradients: bool = True
    """Stages 1-3: copy gradients into one contiguous buffer as they are produced (less memory fragmentation);
    changing it at stage 0 is refused."""
    reduce_bucket_size: PositiveInt | Literal["auto"] = "auto"
    """Stages 1-3: elements reduced at once; `auto`: hidden_size² (filled in by transformers); refused at stage 0."""
    gather_weights_on_save: bool = True
    """Stage 3: gather the partitioned weights when saving, so checkpoints hold a normal PEFT adapter (`false`
    warns: intermediate checkpoints hold no usable adapter; refused at stages 0-2, which have nothing to gather)."""
    extra: dict[str, Any] = Field(default_factory=dict)
    """Raw DeepSpeed keys deep-merged over the generated config (escape hatch; DeepSpeed's config reference)."""


def _deepspeed_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "json"
    if isinstance(value, (dict, DeepSpeedConfig)):
        return "zero"
    return None


DeepSpeedSetting = Annotated[
    Union[Annotated[DeepSpeedConfig, Tag("zero")], Annotated[str, Tag("json")]],
    Discriminator(
        _deepspeed_kind,
        custom_error_type="deepspeed_setting",
        custom_error_message="must be a mapping of ZeRO settings (e.g. {stage: 2}) or the path of a DeepSpeed JSON file",
    ),
]


def method_label(adapter: Any) -> str:
    """The adapter method as messages, cards and plots name it, LoRA's variants said: `lora (DoRA)`, `qlora (rsLoRA)`
    (DoRA's magnitudes are what transformers' own adapter loading drops, so a reader of the card needs to know)."""
    variants = [name for flag, name in (("use_dora", "DoRA"), ("use_rslora", "rsLoRA")) if getattr(adapter, flag, False)]
    return f"{adapter.method} ({', '.join(variants)})" if variants else adapter.method


class Recipe(Section):
    """A whole recipe, validated and frozen: `config.load_recipe` reads one from YAML (with `key=value` overrides),
    `recipe_from_dict` from a dict; change one with overrides or `model_copy(update=...)` per section."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    task: Literal["causal_lm", "sequence_classification"] = "causal_lm"
    """`sequence_classification`: a new classification head trained on `{text, label}` data (see docs/adapters.md)."""
    quantization: QuantizationConfig | None = None
    adapter: AdapterConfig = Field(default_factory=LoraAdapterConfig)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    deepspeed: DeepSpeedSetting | None = None
    """DeepSpeed ZeRO: a `DeepSpeedConfig` mapping, or the path of a raw DeepSpeed JSON (relative to the recipe)."""
    output_dir: str = "runs/run"
    """Run directory. Relative paths are resolved against the current directory."""
    name: str | None = None
    """The run's name in its model card and export file names (default: the run folder's name)."""
    description: str | None = None
    """One line about the run, shown in its model card."""

    @model_validator(mode="after")
    def _data_fits_the_task(self, info: ValidationInfo) -> "Recipe":
        if self.task == "sequence_classification" and self.data.train_on_prompt:
            raise ValueError("data.train_on_prompt is for chat training; a classifier learns labels, not text: remove it")
        chat_only = self._chat_only_settings() if self.task == "sequence_classification" and not stored_run(info) else []
        if chat_only:
            raise ValueError(f"{', '.join(chat_only)} {'is' if len(chat_only) == 1 else 'are'} for chat training, and "
                             "`task: sequence_classification` would ignore "
                             f"{'it' if len(chat_only) == 1 else 'them'}: a classifier reads each record's plain text "
                             "and learns its label (no conversation, system turn, chat template or generated reply); "
                             f"remove {'it' if len(chat_only) == 1 else 'them'}")
        columns = self.data.columns
        if columns is None:
            return self
        if self.task == "sequence_classification" and (columns.messages or columns.prompt):
            raise ValueError("classification records are a text and a label: map them with data.columns "
                             "`{text: FIELD, label: FIELD}` (a conversation or prompt/response map is for chat training)")
        if self.task == "causal_lm" and columns.label:
            raise ValueError("data.columns.label names the class of `task: sequence_classification` records; chat "
                             "training has no labels: remove it (or set the task)")
        return self

    def _chat_only_settings(self) -> list[str]:
        """The chat-training settings this recipe changes from their defaults."""
        return [*(f"data.{key}" for key in self.data.changed_from_defaults(("format", "system_prompt", "replay"))),
                *(f"model.{key}" for key in self.model.changed_from_defaults(("chat_template",)))]

    @model_validator(mode="after")
    def _gradient_checkpointing_fits(self) -> "Recipe":
        if self.train.gradient_checkpointing and self.adapter.method == "prefix_tuning":
            raise ValueError("train.gradient_checkpointing recomputes each layer in the backward pass, where prefix "
                             "tuning's trained keys/values (kept in the layer's KV cache) are added a second time and "
                             "the first training step fails: remove train.gradient_checkpointing (or use another "
                             "adapter method, e.g. prompt_tuning or lora)")
        return self

    @model_validator(mode="after")
    def _packing_fits(self) -> "Recipe":
        if not self.train.packing:
            return self
        if self.task != "causal_lm":
            raise ValueError("train.packing joins chat rows into one sequence; a classifier reads each text on its own: "
                             "remove train.packing")
        if self.adapter.method in ("prefix_tuning", "prompt_tuning"):
            raise ValueError(f"train.packing joins a batch's rows into one sequence, where {self.adapter.method}'s "
                             "virtual tokens have no place: remove train.packing (or use another adapter method)")
        if self.train.neftune_noise_alpha is not None:
            raise ValueError("train.neftune_noise_alpha scales its noise by the sequence length, which packing changes "
                             "(the whole batch becomes one sequence): use one of them")
        return self

    @model_validator(mode="after")
    def _early_stopping_needs_eval(self) -> "Recipe":
        if self.train.early_stopping_patience and self.data.eval is None and self.data.eval_fraction == 0:
            raise ValueError("train.early_stopping_patience watches the eval loss, but there is no eval data "
                             "(data.eval_fraction is 0 and data.eval is unset): set one of them, or drop the patience")
        return self

ADAPTER_CLASSES: tuple[type[Section], ...] = get_args(get_args(AdapterConfig)[0])
