"""LoRA options really do what they say: DoRA, rsLoRA, inits, target selection, layers, modules_to_save."""

from __future__ import annotations

import json

import pytest
import torch

from peftkit.adapters import build_adapter, check_targets, save_trained
from peftkit.config.schema import LoraAdapterConfig
from peftkit.errors import ConfigError
from tests.conftest import CHAT_RECORDS
from tests.unit.adapters_fixtures import chat_batch, load_tiny

torch.set_num_threads(1)


def _lora(model_dir, calibration=None, **kwargs):
    torch.manual_seed(0)
    model = load_tiny(model_dir)
    torch.manual_seed(0)
    return build_adapter(model, LoraAdapterConfig(**{"r": 4, "alpha": 8, "dropout": 0.0, **kwargs}), calibration=calibration)


def _rows(tokenizer, records=CHAT_RECORDS, copies=4):
    from peftkit.data import tokenize_conversation

    return [tokenize_conversation(tokenizer, r["messages"], 64, "t")[0] for r in records * copies]


CALIBRATED = {"eva", "corda", "corda_kpm"}


def _lora_modules(model) -> set[str]:
    """Names of the base modules that got a LoRA layer, relative to the transformers model."""
    names = set()
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            names.add(name.removeprefix("base_model.model."))
    return names


def _inputs(tokenizer):
    batch = chat_batch(tokenizer, CHAT_RECORDS)
    return {k: batch[k] for k in ("input_ids", "attention_mask")}


def test_target_names_regex_all_linear_and_layers(tiny_model_dir):
    named = _lora_modules(_lora(tiny_model_dir, target_modules=["q_proj", "v_proj"]))
    assert named == {f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")}

    regex = _lora_modules(_lora(tiny_model_dir, target_modules=r".*\.layers\.1\.mlp\.(up|down)_proj"))
    assert regex == {"model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"}

    everything = _lora_modules(_lora(tiny_model_dir, target_modules="all-linear"))
    assert len(everything) == 14 and "lm_head" not in everything  # 7 linear layers x 2 blocks, never the head

    top = _lora_modules(_lora(tiny_model_dir, target_modules="all-linear", layers=(1, 1)))
    assert top and all(n.startswith("model.layers.1.") for n in top) and len(top) == 7

    # peft ignores layers_to_transform for a regex; peftkit resolves the regex so the range still applies.
    regex_layers = _lora_modules(_lora(tiny_model_dir, target_modules=r".*_proj", layers=(0, 0)))
    assert regex_layers and all(n.startswith("model.layers.0.") for n in regex_layers) and len(regex_layers) == 7


def test_dora_and_rslora(tiny_model_dir):
    dora = _lora(tiny_model_dir, use_dora=True, target_modules=["q_proj"])
    magnitudes = [n for n, p in dora.named_parameters() if "lora_magnitude_vector" in n and p.requires_grad]
    assert len(magnitudes) == 2  # one per targeted layer, trained

    rs = _lora(tiny_model_dir, use_rslora=True, r=4, alpha=8, target_modules=["q_proj"])
    plain = _lora(tiny_model_dir, use_rslora=False, r=4, alpha=8, target_modules=["q_proj"])
    layer = rs.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / 4**0.5)  # alpha / sqrt(r)
    assert plain.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == pytest.approx(8 / 4)


@pytest.mark.parametrize("init", ["default", "gaussian", "pissa", "olora", "corda", "corda_kpm"])
def test_inits_keep_the_initial_output(init, tiny_model_dir, tiny_tokenizer):
    base = load_tiny(tiny_model_dir)
    inputs = _inputs(tiny_tokenizer)
    with torch.no_grad():
        expected = base(**inputs).logits
    model = _lora(tiny_model_dir, init=init, calibration=_rows(tiny_tokenizer) if init in CALIBRATED else None)
    with torch.no_grad():
        got = model(**inputs).logits
    assert torch.allclose(got, expected, atol=1e-4)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    b_nonzero = bool(layer.lora_B["default"].weight.abs().sum() > 0)
    assert b_nonzero == (init in ("pissa", "olora", "corda", "corda_kpm"))  # SVD/QR inits move part of W into the adapter


@pytest.mark.parametrize("init,dora", [("pissa", False), ("olora", False), ("corda_kpm", False), ("pissa", True),
                                       ("olora", True)])
def test_pissa_olora_adapter_saved_for_the_original_base(init, dora, tiny_model_dir, tiny_tokenizer, tmp_path):
    """The residual base is not what users load: the saved adapter is converted to plain LoRA (rank 2r), with
    DoRA's trained magnitudes kept (peft's conversion drops them)."""
    from peft import PeftModel

    model = _lora(tiny_model_dir, init=init, use_dora=dora, calibration=_rows(tiny_tokenizer) if init in CALIBRATED else None)
    with torch.no_grad():  # stands in for training
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn_like(param) * 0.05)
    inputs = _inputs(tiny_tokenizer)
    with torch.no_grad():
        trained = model(**inputs).logits
    saved = save_trained(model, tmp_path, "lora")
    config = json.loads((saved / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True
    reloaded = PeftModel.from_pretrained(load_tiny(tiny_model_dir), str(saved))
    with torch.no_grad():
        assert torch.allclose(reloaded(**inputs).logits, trained, atol=1e-4)


def test_eva_uses_the_training_rows(tiny_model_dir, tiny_tokenizer):
    rows = _rows(tiny_tokenizer)
    with pytest.raises(ConfigError, match="eva needs data"):
        _lora(tiny_model_dir, init="eva")
    torch.manual_seed(0)
    model = build_adapter(load_tiny(tiny_model_dir), LoraAdapterConfig(r=4, alpha=8, init="eva"), calibration=rows)
    a = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    # EVA sets A to the top right-singular vectors of the layer inputs: orthonormal rows.
    assert torch.allclose(a @ a.T, torch.eye(a.shape[0]), atol=1e-3)


def test_modules_to_save_trains_and_reloads(tiny_model_dir, tiny_tokenizer, tmp_path):
    from peft import PeftModel

    model = _lora(tiny_model_dir, target_modules=["q_proj"], modules_to_save=["norm"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.endswith("model.norm.modules_to_save.default.weight") for n in trainable)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.mul_(1.5)
    inputs = _inputs(tiny_tokenizer)
    with torch.no_grad():
        trained = model(**inputs).logits
    saved = save_trained(model, tmp_path, "lora")
    reloaded = PeftModel.from_pretrained(load_tiny(tiny_model_dir), str(saved))
    with torch.no_grad():
        assert torch.allclose(reloaded(**inputs).logits, trained, atol=1e-5)


def test_check_reports_unknown_targets_layers_and_modules(tiny_model_dir):
    model = load_tiny(tiny_model_dir)
    problems = check_targets(model, LoraAdapterConfig(target_modules=["qkv"], layers=(0, 5), modules_to_save=["classifier"]))
    text = "\n".join(problems)
    assert "layers [0, 5] is out of range: this model has layers 0..1" in text
    assert "matches no linear module" in text and "q_proj" in text and "down_proj" in text
    assert "modules_to_save: classifier not found" in text
    assert check_targets(model, LoraAdapterConfig(target_modules=r".*\.q_proj")) == []


def test_loraplus_gives_b_matrices_the_higher_learning_rate(tiny_model_dir, tmp_path):
    from transformers import TrainingArguments

    from peftkit.adapters import trainer_extras

    cfg = LoraAdapterConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], loraplus_lr_ratio=16)
    model = build_adapter(load_tiny(tiny_model_dir), cfg)
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-4, weight_decay=0.01, use_cpu=True, report_to="none")
    optimizer = trainer_extras(model, cfg, args).optimizer
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(lr_of) == {id(p) for p in trainable.values()}  # every adapter weight is optimized, nothing else
    for name, param in trainable.items():
        lr, decay = lr_of[id(param)]
        assert lr == pytest.approx(1.6e-3 if "lora_B" in name else 1e-4), name
        assert decay == pytest.approx(0.01)
    # Without the option the method adds no optimizer: the Trainer builds its usual one.
    assert trainer_extras(model, LoraAdapterConfig(r=4, alpha=8, target_modules=["q_proj"]), args).optimizer is None


def test_dora_magnitudes_get_no_weight_decay(tiny_model_dir, tmp_path):
    """They hold the base weights' column norms: decay pulled them towards 0 and shrank every adapted layer's output
    even where nothing was learnt. With and without LoRA+, A and B keep the Trainer's weight decay."""
    from transformers import TrainingArguments

    from peftkit.adapters import trainer_extras
    from peftkit.train.trainer import RunTrainer

    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-4, weight_decay=0.1, use_cpu=True, report_to="none")
    for loraplus in (None, 16):
        cfg = LoraAdapterConfig(r=4, alpha=8, target_modules=["q_proj"], use_dora=True, loraplus_lr_ratio=loraplus)
        model = build_adapter(load_tiny(tiny_model_dir), cfg)
        optimizer = trainer_extras(model, cfg, args).optimizer or RunTrainer(model=model, args=args).create_optimizer()
        decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert any("lora_magnitude_vector" in n for n in trainable) and set(decay_of) == {id(p) for p in trainable.values()}
        for name, param in trainable.items():
            assert decay_of[id(param)] == (0.0 if "lora_magnitude_vector" in name else 0.1), (loraplus, name)


def test_python_api_build_refuses_loftq_without_a_quantized_base(tiny_model_dir):
    """Callers who skip recipe validation get the same message from `build_adapter`."""
    with pytest.raises(ConfigError, match="loftq corrects the quantization error"):
        _lora(tiny_model_dir, init="loftq", target_modules=["q_proj"])


def test_gpt2_conv1d_targets_get_fan_in_fan_out_and_match_the_merged_weights(recwarn):
    """GPT-2 stores Conv1D weights as (in, out): LoRA must know, or its update is applied transposed."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)).eval()
    peft_model = build_adapter(model, LoraAdapterConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
    assert peft_model.peft_config["default"].fan_in_fan_out is True
    assert not [w for w in recwarn if "fan_in_fan_out" in str(w.message)]
    assert _lora_modules(peft_model) == {f"transformer.h.{i}.{m}" for i in range(2)
                                         for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)
        ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
        adapted = peft_model(input_ids=ids).logits
        merged = peft_model.merge_and_unload()(input_ids=ids).logits
    assert (adapted - merged).abs().max() < 1e-5


def _adapter_share_on(model, rows) -> float:
    """||ΔW x|| / ||W0 x|| of layer 0's q_proj over the tokens of `rows`: how much the initial
    adapter carries of what the original layer computes on these inputs."""
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    inputs = []
    handle = layer.register_forward_hook(lambda module, args, out: inputs.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for row in rows:
            model(input_ids=torch.tensor([row["input_ids"]]))
    handle.remove()
    x = torch.cat(inputs)
    delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    original = layer.get_base_layer().weight + delta
    return float((x @ delta.T).norm() / (x @ original.T).norm())


def test_corda_kpm_starts_where_the_calibration_rows_do_not_look(tiny_model_dir, tiny_tokenizer):
    """CorDA knowledge-preserved mode puts the components that matter least on the calibration rows into
    the adapter (training them disturbs those rows least); instruction-previewed mode the ones that
    matter most."""
    rows = _rows(tiny_tokenizer)
    kpm = _adapter_share_on(_lora(tiny_model_dir, init="corda_kpm", calibration=rows), rows)
    ipm = _adapter_share_on(_lora(tiny_model_dir, init="corda", calibration=rows), rows)
    assert kpm < 0.2 * ipm, (kpm, ipm)
    with pytest.raises(ConfigError, match="corda_kpm needs data"):
        _lora(tiny_model_dir, init="corda_kpm")


def _tiny_vision_language_model() -> torch.nn.Module:
    """A Gemma 3 vision-language model (SigLIP tower + text decoder) small enough for a unit test."""
    from transformers import AutoModelForCausalLM, Gemma3Config

    text = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=16)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                                         image_token_index=120, boi_token_index=121, eoi_token_index=122))


@pytest.mark.parametrize("target", ["all-linear", ["q_proj", "v_proj"]])
def test_lora_on_a_vision_language_model_stays_in_its_text_decoder(target):
    """Text-only chat training never runs a vision tower: `all-linear` or a suffix like `q_proj` (which peft would
    also match there) adapts the text decoder only, validation sees the same set, and a forward pass still runs."""
    from peftkit.adapters.modules import linear_module_names, selected_linear, text_decoder

    model = _tiny_vision_language_model()

    assert text_decoder(model) == "model.language_model"
    assert any(n.startswith("model.vision_tower.") and n.endswith(".q_proj") for n in linear_module_names(model))
    expected = set(selected_linear(model, target))
    assert expected and all(n.startswith("model.language_model.layers.") for n in expected)
    assert check_targets(model, LoraAdapterConfig(r=4, target_modules=target)) == []
    peft_model = build_adapter(model, LoraAdapterConfig(r=4, alpha=8, dropout=0.0, target_modules=target))
    adapted = _lora_modules(peft_model)
    assert adapted == expected and len(adapted) == (14 if target == "all-linear" else 4)
    with torch.no_grad():
        assert peft_model(input_ids=torch.tensor([[1, 5, 9, 13]])).logits.shape == (1, 4, 128)


@pytest.mark.parametrize("target", [None, ["k_proj", "v_proj", "down_proj"]])
def test_ia3_on_a_vision_language_model_scales_only_its_text_decoder(target):
    """(IA)^3 likewise: peft's defaults or listed suffixes would also match the SigLIP tower's k_proj / v_proj."""
    from peftkit.adapters.modules import selected_linear
    from peftkit.config.schema import IA3AdapterConfig

    model = _tiny_vision_language_model()
    expected = set(selected_linear(model, ["k_proj", "v_proj", "down_proj"]))
    assert len(expected) == 6  # 2 layers of the text decoder
    peft_model = build_adapter(model, IA3AdapterConfig(target_modules=target))
    scaled = {n.removeprefix("base_model.model.").rsplit(".ia3_l", 1)[0]
              for n, _ in peft_model.named_parameters() if ".ia3_l" in n}
    assert scaled == expected, sorted(scaled)
    with torch.no_grad():
        assert peft_model(input_ids=torch.tensor([[1, 5, 9, 13]])).logits.shape == (1, 4, 128)


def test_all_linear_on_an_moe_with_fused_experts_stays_on_linear_layers_and_ia3_finds_its_defaults(caplog):
    """transformers 5 stacks Mixtral's experts in 3-D parameters; peft's `all-linear` would adapt them through
    `target_parameters`, which refuses dropout and cannot be merged. peftkit keeps all-linear on linear layers, and
    IA3's defaults no longer come from peft's stale table (`w2`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from peftkit.adapters import ia3
    from peftkit.adapters.lora import has_fused_experts, lora_config
    from peftkit.config.schema import IA3AdapterConfig

    config = AutoConfig.for_model("mixtral", vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    assert has_fused_experts(model)
    with caplog.at_level("INFO", logger="peftkit"):
        peft_config = lora_config(LoraAdapterConfig(r=4, dropout=0.05, target_modules="all-linear"), model=model)
    assert sorted({name.rsplit(".", 1)[-1] for name in peft_config.target_modules}) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert "adapts its linear layers (k_proj, o_proj, q_proj, v_proj); its experts keep their weights fused" in caplog.text
    assert not peft_config.target_parameters
    adapted = build_adapter(model, LoraAdapterConfig(r=4, dropout=0.05, target_modules="all-linear"))
    adapted(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()  # peft's ParamWrapper refused dropout here
    problems = check_targets(AutoModelForCausalLM.from_config(config), LoraAdapterConfig(target_modules=["w1", "w2"]))
    assert problems and "experts' weights fused in 3-D parameters" in problems[0]
    assert ia3.resolve(AutoModelForCausalLM.from_config(config), IA3AdapterConfig()) == (["k_proj", "v_proj"], [])


@pytest.mark.parametrize(("extra", "trained"), [({"target_modules": ["q_proj", "embed_tokens"]}, "input embeddings"),
                                                ({"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
                                                 "output head"),
                                                ({"target_modules": ["q_proj"]}, None)])
def test_an_adapter_on_tied_embeddings_is_said_once_by_peftkit_not_peft(tiny_model_dir, caplog, extra, trained):
    import warnings

    with warnings.catch_warnings(record=True) as caught, caplog.at_level("INFO", logger="peftkit"):
        _lora(tiny_model_dir, **extra)
    said = "The base ties its output head to the input embeddings, and the adapter trains the"
    assert (f"{said} {trained}:" in caplog.text) if trained else said not in caplog.text
    peft_said = [str(w.message) for w in caught if "tie_word_embeddings=True" in str(w.message)]
    assert not peft_said, peft_said


def test_a_classifier_with_tied_embedding_config_is_not_told_of_an_untied_head(tiny_model_dir, caplog):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=2)
    assert model.config.tie_word_embeddings
    with caplog.at_level("INFO", logger="peftkit"):
        build_adapter(model, LoraAdapterConfig(r=4, alpha=8, target_modules=["q_proj", "embed_tokens"]),
                      task="sequence_classification")
    assert "ties its output head" not in caplog.text


def test_attaching_a_saved_adapter_on_tied_embeddings_does_not_repeat_peft_s_warning(tiny_model_dir, tmp_path):
    import warnings

    from peftkit.export.merge import _attach

    saved = save_trained(_lora(tiny_model_dir, target_modules=["q_proj", "embed_tokens"]), tmp_path, "lora")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _attach(load_tiny(tiny_model_dir), saved)
    assert not [str(w.message) for w in caught if "tie_word_embeddings=True" in str(w.message)]


def test_a_dora_or_rslora_run_is_named_so_where_lora_runs_are_named(tiny_recipe):
    """A DoRA run's header, card and plot said plain `lora`, though transformers' own adapter loading drops DoRA's
    magnitudes: a reader of the card needs to know."""
    from peftkit.config import recipe_from_dict
    from peftkit.config.schema import method_label
    from peftkit.train.run import train

    assert method_label(LoraAdapterConfig()) == "lora"
    assert method_label(LoraAdapterConfig(use_dora=True, use_rslora=True)) == "lora (DoRA, rsLoRA)"
    recipe = recipe_from_dict({**tiny_recipe, "adapter": {**tiny_recipe["adapter"], "use_dora": True},
                               "train": {**tiny_recipe["train"], "max_steps": 1}, "eval": {"before": False}})
    card = (train(recipe).run_dir / "README.md").read_text()
    assert "| method | lora (DoRA) |" in card and ": lora (DoRA) adapter for" in card
