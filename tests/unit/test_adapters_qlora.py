"""QLoRA on CPU: 4-bit (nf4/fp4, double quantization) and 8-bit bases, k-bit preparation, warnings, packing."""

from __future__ import annotations

import logging

import pytest
import torch

from peftkit.adapters import build_adapter, parameter_counts
from peftkit.config.schema import ModelConfig, QLoraAdapterConfig, QuantizationConfig
from peftkit.models import load_model
from tests.conftest import CHAT_RECORDS
from tests.unit.adapters_fixtures import chat_batch

torch.set_num_threads(1)


def _qlora(model_dir, quantization: QuantizationConfig, **adapter):
    torch.manual_seed(0)
    base = load_model(ModelConfig(name=str(model_dir)), quantization, device="cpu", dtype=torch.float32)
    torch.manual_seed(0)
    return build_adapter(base, QLoraAdapterConfig(**{"r": 4, "alpha": 8, "dropout": 0.0, **adapter}), quantized=True)


@pytest.mark.parametrize(
    ("quantization", "layer_class"),
    [
        (QuantizationConfig(bits=4, quant_type="nf4", double_quant=True), "Linear4bit"),
        (QuantizationConfig(bits=4, quant_type="fp4", double_quant=False), "Linear4bit"),
        (QuantizationConfig(bits=8), "Linear8bitLt"),
    ],
)
def test_qlora_trains_on_cpu(quantization, layer_class, tiny_model_dir, tiny_tokenizer):
    model = _qlora(tiny_model_dir, quantization, init="gaussian")
    kinds = {type(m).__name__ for m in model.modules()}
    assert layer_class in kinds
    assert model.is_gradient_checkpointing  # on by default for qlora
    if quantization.bits == 4:
        weight = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
        assert weight.quant_type == quantization.quant_type
        assert weight.quant_state.nested == quantization.double_quant
    trainable, total = parameter_counts(model)
    assert 0 < trainable < total
    batch = chat_batch(tiny_tokenizer, CHAT_RECORDS)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    losses = []
    for _ in range(5):
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.01, losses


def test_8bit_cast_warning_is_said_once(tiny_model_dir, tiny_tokenizer, caplog):
    from peftkit.models.load import silence_bnb_cpu_warnings
    from peftkit.utils.log_filters import PrefixFilter

    model = _qlora(tiny_model_dir, QuantizationConfig(bits=8))
    batch = chat_batch(tiny_tokenizer, CHAT_RECORDS)
    # The filter is process-wide, and an earlier test may have let its one warning through: start a fresh one.
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    for old in [f for f in logger.filters if isinstance(f, PrefixFilter)]:
        logger.removeFilter(old)
    silence_bnb_cpu_warnings()
    with caplog.at_level(logging.WARNING, logger="bitsandbytes"):
        for _ in range(3):
            model(**batch).loss.backward()
    casts = [r for r in caplog.records if "MatMul8bitLt: inputs will be cast" in r.getMessage()]
    assert len(casts) == 1  # 14 quantized matmuls x 3 passes without the filter, none if it dropped them all


def test_hub_kernel_advice_of_bitsandbytes_is_dropped(caplog):
    """On AVX512-BF16 CPUs bitsandbytes says `pip install kernels` (a kernel fetched from the Hub) when it loads."""
    from peftkit.models.load import silence_bnb_cpu_warnings

    silence_bnb_cpu_warnings()
    silence_bnb_cpu_warnings()  # idempotent: one filter per logger
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert len(logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger="bitsandbytes"):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure ...", "x")
        logger.warning("another bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["another bitsandbytes warning"]


def test_inference_forward_does_not_break_later_training(tiny_model_dir, tiny_tokenizer):
    """bitsandbytes repacks 4-bit weights on a no-grad CPU forward (AVX512-BF16 CPUs); peftkit keeps the layout."""
    batch = chat_batch(tiny_tokenizer, CHAT_RECORDS)

    def grads(generate_first: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        base = load_model(ModelConfig(name=str(tiny_model_dir)), QuantizationConfig(bits=4), device="cpu", dtype=torch.float32)
        if generate_first:  # what the "before" held-out evaluation does
            base.eval()
            with torch.inference_mode():
                base.generate(input_ids=batch["input_ids"][:1, :8], max_new_tokens=2, do_sample=False)
        torch.manual_seed(0)
        model = build_adapter(base, QLoraAdapterConfig(r=4, init="gaussian", gradient_checkpointing=False), quantized=True)
        model.train()
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fresh, after = grads(False), grads(True)
    assert fresh.keys() == after.keys()
    for name in fresh:
        assert torch.allclose(fresh[name], after[name], atol=1e-6), name
    layers = [m for m in load_model(ModelConfig(name=str(tiny_model_dir)), QuantizationConfig(bits=4)).modules() if type(m).__name__ == "Linear4bit"]
    assert layers and not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in layers)


def test_sft_trainer_with_checkpointed_qlora(tiny_model_dir, tiny_tokenizer, tmp_path):
    """QLoRA turns gradient checkpointing on in the model: the trainer must not take its two-call shared-prefix path."""
    from transformers import TrainingArguments

    from peftkit.train.trainer import SFTTrainer

    model = _qlora(tiny_model_dir, QuantizationConfig(bits=4), init="gaussian")  # gradient_checkpointing: true
    assert model.is_activation_checkpointing
    system = {"role": "system", "content": "you are a helpful assistant. answer briefly. the library opens at nine."}
    batch = chat_batch(tiny_tokenizer, [{"messages": [system, *r["messages"]]} for r in CHAT_RECORDS[:3]])
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = SFTTrainer(model=model, args=args)
    assert not trainer.share_prefix
    model.train()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize("quantization", [QuantizationConfig(bits=4, quant_type="nf4"), QuantizationConfig(bits=8)])
def test_loftq_init_starts_closer_to_the_full_precision_model(quantization, tiny_model_dir, tiny_tokenizer):
    """LoftQ's adapter starts at the low-rank part of W - Q(W): the quantized model plus the fresh adapter is
    nearer the full-precision model than the quantized model alone (what QLoRA's B = 0 start gives)."""
    from peftkit.adapters.loftq import low_rank_factors
    from peft.utils.integrations import dequantize_module_weight

    batch = chat_batch(tiny_tokenizer, CHAT_RECORDS)
    full = load_model(ModelConfig(name=str(tiny_model_dir)), None, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        reference = full(**batch).logits
    errors = {}
    for init in ("default", "loftq"):
        model = _qlora(tiny_model_dir, quantization, r=8, alpha=16, init=init).eval()
        with torch.no_grad():
            errors[init] = (model(**batch).logits - reference).abs().mean().item()
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        quantized = dequantize_module_weight(layer.get_base_layer()).float()
        delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        original = full.model.layers[0].self_attn.q_proj.weight
        errors[f"{init}-weight"] = (original - quantized - delta).norm().item()
    assert errors["loftq-weight"] < 0.9 * errors["default-weight"], errors
    assert errors["loftq"] < errors["default"], errors
    a, b = low_rank_factors(torch.eye(6) * torch.arange(6, 0, -1), rank=2, scaling=2.0)
    assert torch.allclose(2.0 * b @ a, torch.diag(torch.tensor([6.0, 5, 0, 0, 0, 0])), atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_keep_modules_stay_full_precision_and_the_head_still_does(bits, tiny_model_dir, tiny_tokenizer):
    """`keep_modules` leaves those layers unquantized; passing a skip list must not drop transformers'
    own defaults (the output head), which a bare `llm_int8_skip_modules` would."""
    model = _qlora(tiny_model_dir, QuantizationConfig(bits=bits, keep_modules=["down_proj"]), init="gaussian")
    quantized = "Linear4bit" if bits == 4 else "Linear8bitLt"
    inner = model.base_model.model
    for layer in inner.model.layers:
        assert type(layer.mlp.down_proj.base_layer).__name__ == "Linear"  # LoRA still wraps the kept layer
        assert type(layer.mlp.up_proj.base_layer).__name__ == quantized
    assert type(inner.lm_head).__name__ == "Linear"
    loss = model(**chat_batch(tiny_tokenizer, CHAT_RECORDS)).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_unknown_keep_module_is_refused_before_loading(tiny_recipe):
    from peftkit.config import recipe_from_dict
    from peftkit.config.validate import validate_recipe
    from peftkit.errors import ConfigError

    recipe = recipe_from_dict({**tiny_recipe, "adapter": {"method": "qlora"}, "quantization": {"keep_modules": ["down_prj"]}})
    with pytest.raises(ConfigError, match="'down_prj' matches no linear layer of the model; use names such as .*down_proj"):
        validate_recipe(recipe)


def test_blocksize_32_quantizes_in_finer_blocks_and_is_closer_to_fp32(tiny_model_dir):
    """transformers' BitsAndBytesConfig has no block size: peftkit sets it on the layers it creates,
    only while loading (bitsandbytes' own class is left as it was)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    init = bnb.nn.Linear4bit.__init__
    reference = load_model(ModelConfig(name=str(tiny_model_dir)), None).model.layers[0].mlp.up_proj.weight
    errors = {}
    for blocksize in (64, 32):
        model = load_model(ModelConfig(name=str(tiny_model_dir)), QuantizationConfig(blocksize=blocksize))
        weights = [m.weight for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert weights and {w.quant_state.blocksize for w in weights} == {blocksize}
        layer = model.model.layers[0].mlp.up_proj
        errors[blocksize] = (bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state) - reference).abs().mean()
    assert errors[32] < 0.9 * errors[64], errors
    assert bnb.nn.Linear4bit.__init__ is init


def test_blocksize_is_for_4bit_only():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="blocksize applies to 4-bit quantization only"):
        QuantizationConfig(bits=8, blocksize=32)
    with pytest.raises(ValidationError):
        QuantizationConfig(blocksize=48)


def test_blocks_larger_than_64_are_refused_on_the_cpu(tiny_recipe):
    """bitsandbytes' CPU kernels quantize them wrongly for many shapes (checked here on one, so a fixed release shows)."""
    import bitsandbytes.functional as bnbf

    from peftkit.config import recipe_from_dict
    from peftkit.config.validate import validate_recipe
    from peftkit.errors import ConfigError

    torch.manual_seed(0)
    weight = torch.randn(64, 64)
    error = {bs: float((bnbf.dequantize_4bit(*bnbf.quantize_4bit(weight, blocksize=bs, quant_type="nf4")) - weight).norm()
                       / weight.norm()) for bs in (64, 128)}
    assert error[128] > 1.5 * error[64], error
    recipe = {**tiny_recipe, "adapter": {"method": "qlora"}, "train": {**tiny_recipe["train"], "device": "cpu"}}
    with pytest.raises(ConfigError, match="quantization.blocksize 128 on the CPU: .* use 32 or 64 on a CPU"):
        validate_recipe(recipe_from_dict({**recipe, "quantization": {"blocksize": 128}}), check_model=False)
    validate_recipe(recipe_from_dict({**recipe, "quantization": {"blocksize": 32}}), check_model=False)


def test_a_gpu_runs_base_with_blocks_larger_than_64_is_not_rebuilt_on_the_cpu(tiny_model_dir):
    """A GPU-trained QLoRA run with blocksize 128: merge, export verification and chat / eval on a CPU rebuilt its base
    with the broken CPU kernel, and the merge shipped a model folded into other weights than those trained."""
    from peftkit.config.schema import ModelConfig, QuantizationConfig
    from peftkit.errors import PeftkitError
    from peftkit.models import load_model

    with pytest.raises(PeftkitError, match=r"^quantization.blocksize 128: .* cannot be rebuilt on a CPU .*--qlora-base original"):
        load_model(ModelConfig(name=str(tiny_model_dir)), QuantizationConfig(bits=4, blocksize=128), device="cpu")
    assert load_model(ModelConfig(name=str(tiny_model_dir)), QuantizationConfig(bits=4, blocksize=32), device="cpu")


def test_loftq_over_an_8_bit_base_trains(tiny_recipe):
    """peft's dequantization re-assigns an 8-bit weight on CPU without its scales; the layer then failed in the
    first evaluation (`'NoneType' object has no attribute 'dtype'`)."""
    from peftkit.config import recipe_from_dict
    from peftkit.train.run import train

    recipe = recipe_from_dict({**tiny_recipe, "adapter": {"method": "qlora", "r": 4, "alpha": 8, "init": "loftq"},
                               "quantization": {"bits": 8}, "train": {**tiny_recipe["train"], "max_steps": 1}})
    summary = train(recipe).summary
    assert summary["steps"] == 1 and summary["eval_loss_after"] is not None


def test_a_model_bitsandbytes_quantizes_no_layer_of_is_refused_not_trained_as_qlora(tmp_path):
    """Falcon builds its projections from its own FalconLinear class, which transformers' quantizer passes over:
    the 'QLoRA' run would train on the full-precision model and claim a 4-bit base."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from peftkit.errors import PeftkitError
    from tests.conftest import build_tiny_tokenizer

    config = AutoConfig.for_model("falcon", vocab_size=400, hidden_size=64, num_hidden_layers=1, num_attention_heads=4)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "falcon")
    build_tiny_tokenizer().save_pretrained(tmp_path / "falcon")
    with pytest.raises(PeftkitError, match=r"bitsandbytes would quantize no layer of this FalconForCausalLM to 4 bits.*method: lora"):
        load_model(ModelConfig(name=str(tmp_path / "falcon")), QuantizationConfig(bits=4), device="cpu", dtype=torch.float32)


def test_quantizable_layers_are_checked_on_the_skeleton_before_any_weights_load(tmp_path, tiny_recipe):
    """A Falcon QLoRA recipe passed `validate` and failed once the model had loaded; GPT-2's Conv1D layers, which
    bitsandbytes does quantize, were refused as `keep_modules` ("matches no linear layer ... such as lm_head")."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from peftkit.config import recipe_from_dict
    from peftkit.config.validate import validate_recipe
    from peftkit.errors import ConfigError
    from tests.conftest import build_tiny_tokenizer

    configs = {"falcon": dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=4),
               "gpt2": dict(n_embd=64, n_layer=1, n_head=4, n_positions=256)}
    for kind, sizes in configs.items():
        AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, vocab_size=400, **sizes)).save_pretrained(tmp_path / kind)
        build_tiny_tokenizer().save_pretrained(tmp_path / kind)

    def qlora(kind, **quantization):
        return recipe_from_dict({**tiny_recipe, "model": {"name": str(tmp_path / kind)}, "adapter": {"method": "qlora"},
                                 "quantization": {"bits": 4, **quantization}})

    with pytest.raises(ConfigError, match=r"quantization: bitsandbytes would quantize no layer of this FalconForCausalLM"):
        validate_recipe(qlora("falcon"))
    validate_recipe(qlora("gpt2", keep_modules=["c_attn"]))
    validate_recipe(qlora("gpt2", keep_modules=["lm_head"]))  # never quantized: kept, as written
    with pytest.raises(ConfigError, match=r"'c_atn' matches no linear layer of the model; use names such as c_attn, c_fc, c_proj$"):
        validate_recipe(qlora("gpt2", keep_modules=["c_atn"]))
    # what transformers keeps unquantized by itself is no quantized layer: a Falcon classifier's `score` head
    from transformers import AutoModelForSequenceClassification

    from peftkit.models.load import quantizable_layers

    with torch.device("meta"):
        classifier = AutoModelForSequenceClassification.from_config(AutoConfig.for_model("falcon", **configs["falcon"]))
    assert quantizable_layers(classifier) == []


def test_peft_preparing_the_quantized_base_shows_no_transformers_deprecation(tiny_model_dir):
    """peft's prepare_model_for_kbit_training calls the renamed `gradient_checkpointing_enable`: nothing a user
    of peftkit can act on, so it is not shown."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _qlora(tiny_model_dir, QuantizationConfig(bits=4), init="gaussian")
    assert not [w for w in caught if "gradient_checkpointing_enable" in str(w.message)], [str(w.message) for w in caught]


def test_loftq_reads_the_full_precision_weights_of_the_pinned_revision(tmp_path, monkeypatch):
    """A hub cache holding only the pinned commit (model.revision): LoftQ looked for `main`'s, and where `main` was
    cached too, would read other weights than those the quantized base came from."""
    from peftkit.adapters.loftq import local_model_dir
    from peftkit.errors import ConfigError

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "models--org--tiny" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    assert local_model_dir("org/tiny", commit) == snapshot
    with pytest.raises(ConfigError, match="loftq needs the full-precision weights of 'org/tiny' on disk"):
        local_model_dir("org/tiny")  # no `main` in this cache
