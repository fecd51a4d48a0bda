"""`task: sequence_classification`: labeled data, metrics, training with LoRA / partial / full, reload."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from peftkit.config import recipe_from_dict
from peftkit.data.classification import build_classification_data, check_classification_data, load_labeled
from peftkit.errors import ConfigError, DataError
from peftkit.evaluate.classification import classification_metrics
from peftkit.runs import load_run
from peftkit.train.classification import predict_labels
from peftkit.train.run import train
from tests.conftest import assert_speed_leaves_out_evaluation, build_tiny_tokenizer, write_jsonl

torch.set_num_threads(1)

POSITIVE = ["great movie", "good food", "great service", "good good", "great great movie"]
NEGATIVE = ["terrible movie", "bad food", "terrible service", "bad bad", "terrible terrible food"]


def _records(repeat: int = 2) -> list[dict[str, str]]:
    rows = [{"text": t, "label": "positive"} for t in POSITIVE] + [{"text": t, "label": "negative"} for t in NEGATIVE]
    return rows * repeat


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A saved tiny BERT encoder (no classifier, like all-MiniLM) with the tiny tokenizer."""
    from transformers import BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _recipe(model_dir: Path, tmp_path: Path, adapter: dict, **train) -> dict:
    train_file = write_jsonl(tmp_path / "train.jsonl", _records(3))
    heldout = write_jsonl(tmp_path / "heldout.jsonl", _records(1))
    return {
        "name": "tiny-cls",
        "task": "sequence_classification",
        "model": {"name": str(model_dir)},
        "adapter": adapter,
        "data": {"train": str(train_file), "eval": str(heldout), "heldout": str(heldout), "max_seq_len": 32},
        "train": {"max_steps": 12, "batch_size": 10, "lr": 2e-2, "scheduler": "constant", "warmup_ratio": 0.0,
                  "logging_steps": 2, "seed": 0, "num_threads": 1, **train},
        "eval": {"sample_prompts": ["great food", "terrible movie"]},
        "output_dir": str(tmp_path / "run"),
    }


def test_labeled_data_and_label_ids(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "zebra"}, {"text": "b", "label": "ant"}, {"text": "c", "label": 3}])
    assert [i.label for i in load_labeled(path)] == ["zebra", "ant", "3"]
    csv = tmp_path / "d.csv"
    csv.write_text("text,label\ngood one,pos\nbad one,neg\n")
    data = build_classification_data(recipe_from_dict({"data": {"train": str(csv), "eval_fraction": 0.0}}).data, tiny_tokenizer)
    assert data.labels == ["neg", "pos"] and [r["labels"] for r in data.train] == [1, 0]
    with pytest.raises(DataError, match="need `text` and `label`"):
        load_labeled(write_jsonl(tmp_path / "bad.jsonl", [{"text": "x", "answer": "y"}]))
    train = write_jsonl(tmp_path / "t.jsonl", _records(1))
    unknown = write_jsonl(tmp_path / "e.jsonl", [{"text": "meh", "label": "neutral"}])
    problems = check_classification_data(recipe_from_dict({"data": {"train": str(train), "eval": str(unknown)}}).data)
    assert len(problems) == 1 and "'neutral' do not occur in the training data (its labels: negative, positive)" in problems[0]
    single = write_jsonl(tmp_path / "s.jsonl", [{"text": "x", "label": "only"}] * 3)
    assert "single label" in check_classification_data(recipe_from_dict({"data": {"train": str(single)}}).data)[0]
    from peftkit.data.classification import label_names

    numbered = load_labeled(write_jsonl(tmp_path / "n.jsonl", [{"text": "x", "label": n} for n in (10, 2, 0, 1, 11)]))
    assert label_names(numbered) == ["0", "1", "2", "10", "11"], "integer labels keep their numbers as ids"
    superscript = load_labeled(write_jsonl(tmp_path / "s2.jsonl", [{"text": "x", "label": n} for n in ("²", "1")]))
    assert label_names(superscript) == ["1", "²"], "a non-ASCII digit is a name, not a number (int() would fail)"
    assert label_names(load_labeled(write_jsonl(tmp_path / "m.jsonl", [{"text": "x", "label": n} for n in ("2", "10", "b")]))) \
        == ["10", "2", "b"]


def test_accuracy_and_macro_f1():
    scores = classification_metrics([0, 0, 1, 1, 2, 0], [0, 1, 1, 1, 2, 2], num_labels=3)
    assert scores["accuracy"] == pytest.approx(4 / 6)
    # per-label F1 = 2tp / (2tp + fp + fn): 0 -> 2/4 (tp1 fp2 fn0), 1 -> 4/5 (tp2 fp0 fn1), 2 -> 2/3 (tp1 fp0 fn1)
    assert scores["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert classification_metrics([1, 1], [1, 1], num_labels=3)["macro_f1"] == 1.0  # absent labels do not count


def _run_card_snippets(run_dir: Path) -> None:
    """The run card's "Use" code runs as written; loading prints no "newly initialized ... TRAIN this model" warning
    for a head the adapter restores."""
    import contextlib
    import io
    import logging
    import re

    from transformers.utils import logging as hf_logging

    snippets = re.findall(r"```python\n(.*?)```", (run_dir / "README.md").read_text(), re.S)
    assert len(snippets) == (2 if (run_dir / "model").is_dir() else 1)
    printed, warned = io.StringIO(), io.StringIO()
    handler, level = logging.StreamHandler(warned), hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    logging.getLogger("transformers").addHandler(handler)
    try:
        for code in snippets:
            namespace: dict = {}
            with contextlib.redirect_stdout(printed):
                exec(code, namespace)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
        hf_logging.set_verbosity(level)
    assert printed.getvalue().strip() in ("['positive']", "['negative']")
    if snippets[1:]:
        assert namespace["model"].config.id2label == {0: "negative", 1: "positive"}
    assert "newly initialized" not in warned.getvalue()


def _check_run(result, trained_head: str) -> None:
    run_dir, summary = result.run_dir, result.summary
    assert json.loads((run_dir / "labels.json").read_text())["id2label"] == {"0": "negative", "1": "positive"}
    for split in ("eval", "heldout"):
        assert summary[f"{split}_accuracy_after"] == 1.0, summary
        assert summary[f"{split}_macro_f1_after"] == 1.0
        assert summary[f"{split}_loss_after"] < summary[f"{split}_loss_before"]
    assert summary["labels"] == ["negative", "positive"]
    assert [s["reply"] for s in summary["samples"]] == ["positive", "negative"]
    assert 0 < summary["eval_seconds_in_training"] < summary["train_seconds"]  # the per-epoch evaluations, timed
    assert_speed_leaves_out_evaluation(summary, summary["trained_tokens"])
    _run_card_snippets(run_dir)
    run = load_run(run_dir)
    base = run.model.get_base_model() if hasattr(run.model, "get_base_model") else run.model
    assert base.config.id2label == {0: "negative", 1: "positive"}
    assert predict_labels(run.model, run.tokenizer, POSITIVE + NEGATIVE) == ["positive"] * 5 + ["negative"] * 5
    # texts are cut where the run's scores cut them (data.max_seq_len 32), not at 512: Python matches summary.json
    cut_at = []

    class Watched:
        def __init__(self, tokenizer):
            self.__dict__["inner"] = tokenizer

        def __call__(self, *args, **kwargs):
            cut_at.append(kwargs.get("max_length"))
            return self.inner(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __setattr__(self, name, value):
            setattr(self.inner, name, value)

    predict_labels(run.model, Watched(run.tokenizer), ["word " * 100])
    predict_labels(run.model, Watched(run.tokenizer), ["word " * 100], max_seq_len=64)
    assert cut_at == [32, 64]
    assert any(name.split(".")[-1] == trained_head for name, _ in base.named_modules())
    from peftkit.cli import main

    for command in ("chat", "eval"):  # generation commands: one message, before any weights load
        assert main([command, str(run_dir)]) == 2
    from rich.console import Console

    from peftkit.train.report import print_run_report

    console = Console(record=True, width=400)
    print_run_report(console, run_dir, summary)
    shown = console.export_text()  # (export_text clears what it returns)
    assert "(scores in summary.json)" in shown and "peftkit chat" not in shown
    # the classifier's own measures on screen, not only in summary.json
    assert f"{summary['eval_accuracy_after']:.1%}" in shown.split("eval accuracy")[1].splitlines()[0]
    assert "eval macro-F1" in shown


def test_lora_on_a_decoder_trains_the_score_head(tiny_model_dir, tmp_path):
    result = train(recipe_from_dict(_recipe(tiny_model_dir, tmp_path, {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0})))
    config = json.loads((result.run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
    assert 0 < result.summary["trainable_share"] < 0.5
    _check_run(result, "score")
    from peftkit.cli import main  # the adapter export the merge refusal points to says how to load it, not "merge it"

    assert main(["export", str(result.run_dir), "--format", "adapter", "--no-verify"]) == 0
    serving = json.loads((result.run_dir / "adapter-export" / "manifest.json").read_text())["serving"]
    assert not serving["vllm"]["compatible"] and "sequence-classification adapter" in serving["vllm"]["reasons"][0]
    assert "merge" not in json.dumps(serving) and "AutoPeftModelForSequenceClassification" in json.dumps(serving)


def test_merge_and_export_refuse_a_classifier_before_choosing_threads(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """The refusal came after the thread choice, whose busy-CPU warning ("merging on 1 thread ...") was said first
    for a command that then did nothing."""
    import peftkit.runs
    from peftkit.cli import main

    recipe = _recipe(tiny_model_dir, tmp_path, {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0}, max_steps=1)
    recipe["eval"] = {"before": False}
    run_dir = str(train(recipe_from_dict(recipe)).run_dir)
    chosen: list[str] = []
    monkeypatch.setattr(peftkit.runs, "use_run_threads", lambda recipe, doing, **kw: chosen.append(doing))
    for argv in (["merge", run_dir], ["merge", "--adapters", run_dir, run_dir, "--out", str(tmp_path / "c")],
                 ["export", run_dir, "--format", "gguf"], ["export", run_dir, "--format", "adapter"]):
        capsys.readouterr()
        assert main(argv) != 0, argv
        assert "is a sequence_classification run" in capsys.readouterr().err, argv
    assert chosen == []
    assert main(["export", run_dir, "--format", "adapter", "--no-verify"]) == 0 and chosen == ["exporting"]


def test_grad_accum_gives_the_loss_and_gradient_norm_of_one_whole_batch(tiny_model_dir, tmp_path):
    """The same 8 rows per optimizer step as one batch of 8 or as 4 x 2 accumulated: the same logged loss and grad
    norm (both were grad_accum times larger: the Trainer took the model's mean loss as already divided)."""
    logged = []
    for batch_size, grad_accum in ((8, 1), (2, 4)):
        recipe = _recipe(tiny_model_dir, tmp_path / f"{batch_size}x{grad_accum}", {"method": "lora", "r": 4, "alpha": 8,
                         "dropout": 0.0}, max_steps=2, batch_size=batch_size, grad_accum=grad_accum, logging_steps=1)
        recipe["eval"] = {"before": False}
        run_dir = train(recipe_from_dict(recipe)).run_dir
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        logged.append([(row["loss"], row["grad_norm"]) for row in rows if "grad_norm" in row])
    assert len(logged[0]) == 2 and torch.tensor(logged[0]).allclose(torch.tensor(logged[1]), rtol=1e-4), logged


def test_lora_on_bert_targets_query_key_value_dense(tiny_bert_dir, tmp_path):
    adapter = {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["query", "key", "value", "dense"]}
    result = train(recipe_from_dict(_recipe(tiny_bert_dir, tmp_path, adapter, max_steps=20, lr=1e-2)))
    config = json.loads((result.run_dir / "adapter" / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"query", "key", "value", "dense"} and "classifier" in config["modules_to_save"]
    _check_run(result, "classifier")
    # `dense` also names the classifier's pooler, which a causal-LM skeleton of BERT lacks: the export checks the
    # adapter against the classifier it was trained on
    from peftkit.cli import main

    assert main(["export", str(result.run_dir), "--format", "adapter", "--no-verify"]) == 0
    assert (result.run_dir / "adapter-export" / "adapter_model.safetensors").is_file()


def test_qlora_on_bert_keeps_the_new_classifier_head_unquantized(tiny_bert_dir, tmp_path):
    """transformers keeps the last parameter's module unquantized, named without `.weight`: for BERT that is
    `classifier.bias`, which names no module, so the new head was quantized and the first evaluation died in
    bitsandbytes (`assert module.weight.shape[1] == 1`)."""
    adapter = {"method": "qlora", "r": 4, "alpha": 8, "target_modules": ["query", "value"]}
    result = train(recipe_from_dict(_recipe(tiny_bert_dir, tmp_path, adapter, max_steps=2)))
    assert result.summary["steps"] == 2 and result.summary["eval_loss_after"] is not None
    from peftkit.runs import load_run

    model = load_run(result.run_dir).model
    kinds = {name: type(module).__name__ for name, module in model.named_modules()}
    assert any(kind == "Linear4bit" for kind in kinds.values())  # the encoder is 4-bit
    assert not any(kind.startswith("Linear4bit") for name, kind in kinds.items() if ".classifier" in name)


@pytest.mark.parametrize("method", ["partial", "full"])
def test_partial_and_full_on_bert(method, tiny_bert_dir, tmp_path):
    adapter = {"method": "partial", "train_last_layers": 1} if method == "partial" else {"method": "full"}
    result = train(recipe_from_dict(_recipe(tiny_bert_dir, tmp_path, adapter, lr=5e-3)))
    assert (result.run_dir / "model" / "config.json").is_file() and not (result.run_dir / "adapter").exists()
    share = result.summary["trainable_share"]
    assert share == 1.0 if method == "full" else 0 < share < 0.5
    _check_run(result, "classifier")
    from peftkit.export.merge import resolve_run
    from peftkit.errors import ExportError

    with pytest.raises(ExportError, match=r"/model is the trained classifier itself: load it with transformers' "
                                          r"AutoModelForSequenceClassification"):  # not "its adapter"
        resolve_run(result.run_dir)


def test_prompt_methods_are_rejected_for_classification(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="prefix_tuning does not support task: sequence_classification"):
        train(recipe_from_dict(_recipe(tiny_model_dir, tmp_path, {"method": "prefix_tuning"})))


def test_pissa_scores_before_training_are_the_base_models(tiny_model_dir, tmp_path):
    """PiSSA leaves a residual base under its adapter: the "before" scores must come from the base model
    (the untrained adapted model), not from the residual with the adapter switched off."""
    losses = {}
    for init in ("default", "pissa"):
        recipe = _recipe(tiny_model_dir, tmp_path / init, {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "init": init},
                         max_steps=1)
        losses[init] = train(recipe_from_dict(recipe)).summary["eval_loss_before"]
    assert losses["pissa"] == pytest.approx(losses["default"], rel=1e-4)


@pytest.mark.parametrize(("model", "init"), [("decoder", "eva"), ("decoder", "corda_kpm"), ("bert", "corda"), ("decoder", "pissa")])
def test_calibrated_inits_train_a_classifier(model, init, tiny_model_dir, tiny_bert_dir, tmp_path, monkeypatch):
    """EVA and CorDA compute the adapter's start from data: the training texts (`eva`, `corda`), or the
    built-in general prompts as plain text for `corda_kpm` (what the model should keep doing well)."""
    from peftkit.adapters import lora

    seen = []
    real = lora._preprocess_corda
    monkeypatch.setattr(lora, "_preprocess_corda", lambda m, config, rows: seen.append(rows) or real(m, config, rows))
    decoder = model == "decoder"
    adapter = {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "init": init,
               **({} if decoder else {"target_modules": ["query", "value"]})}
    result = train(recipe_from_dict(_recipe(tiny_model_dir if decoder else tiny_bert_dir, tmp_path, adapter, max_steps=20)))
    _check_run(result, "score" if decoder else "classifier")
    if init == "corda_kpm":
        assert len(seen[0]) > 100, "kpm calibrates on the general prompts, not on the 30 training texts"
    elif init == "corda":
        assert len(seen[0]) == result.summary["data_stats"]["train_rows"]


def test_a_three_label_adapter_export_loads_as_its_card_says(tiny_bert_dir, tmp_path):
    """The export named `AutoPeftModelForSequenceClassification.from_pretrained(DIR)`, which builds a 2-label head
    that a 3-label adapter does not fit (size mismatch); the export now carries labels.json and the full call."""
    import re

    from peftkit.cli import main

    recipe = _recipe(tiny_bert_dir, tmp_path, {"method": "lora", "r": 4, "alpha": 8, "target_modules": ["query", "value"]},
                     max_steps=2)
    three = [*_records(1), {"text": "movie food service", "label": "neutral"}, {"text": "food movie", "label": "neutral"}]
    recipe["data"].update({"train": str(write_jsonl(tmp_path / "three.jsonl", three * 2)), "heldout": None})
    recipe["data"]["eval"] = recipe["data"]["train"]
    run_dir = train(recipe_from_dict(recipe)).run_dir
    assert main(["export", str(run_dir), "--format", "adapter", "--no-verify"]) == 0
    export = run_dir / "adapter-export"
    assert json.loads((export / "labels.json").read_text()) == json.loads((run_dir / "labels.json").read_text())
    card = (export / "README.md").read_text()
    call = re.search(r"model = (AutoPeftModelForSequenceClassification\.from_pretrained\(.*\))", card).group(1)
    assert "AutoModelForCausalLM" not in card and call in (export / "manifest.json").read_text().replace('\\"', '"')
    from peft import AutoPeftModelForSequenceClassification  # noqa: F401 - the card's call runs as written

    model = eval(call)  # noqa: S307 - the card's own line
    assert model.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    tokenizer = load_run(run_dir).tokenizer
    batch = tokenizer(["great movie", "bad food"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, load_run(run_dir).model(**batch).logits)


def test_a_resumed_classifier_keeps_the_label_ids_it_started_with(tiny_bert_dir, tmp_path):
    """labels.json was rewritten from the data on resume: a run started before a change in label ordering (integer
    labels sort by value now) would have had its head's ids renumbered without a word."""
    from peftkit.errors import DataError

    recipe = recipe_from_dict(_recipe(tiny_bert_dir, tmp_path, {"method": "full"}, max_steps=2, save_steps=1))
    run_dir = train(recipe).run_dir
    labels_file = run_dir / "labels.json"
    older = {"id2label": {"0": "positive", "1": "negative"}, "label2id": {"positive": 0, "negative": 1}}
    labels_file.write_text(json.dumps(older))
    from peftkit.errors import RunDirError

    with pytest.raises(RunDirError, match="holds a finished run"):  # as `peftkit train --resume` says
        train(recipe, resume=True)
    (run_dir / "summary.json").unlink()  # as a run stopped after its last checkpoint
    train(recipe, resume=True)
    assert json.loads(labels_file.read_text()) == older
    changed = write_jsonl(tmp_path / "train.jsonl", [{"text": "meh", "label": "neutral"}, *_records(3)])
    assert changed.is_file()
    (run_dir / "summary.json").unlink()
    with pytest.raises(DataError, match="the training labels changed since"):
        train(recipe, resume=True)


def test_labels_differing_only_in_case_are_warned_about(tmp_path, caplog):
    """`pos` and `POS` are two classes (labels are kept as written): far more often one class written two ways."""
    import logging

    from peftkit.data.classification import label_names

    labels = ["pos", "POS ", "neg", "pos", "very  bad", "Very bad"]
    records = [{"text": f"text {i}", "label": label} for i, label in enumerate(labels)]
    with caplog.at_level(logging.WARNING, logger="peftkit.data.classification"):
        assert label_names(load_labeled(write_jsonl(tmp_path / "d.jsonl", records))) == [
            "POS", "Very bad", "neg", "pos", "very  bad"]
    assert ("labels that differ only in case or spacing are separate classes: 'POS' (1) / 'pos' (2); 'Very bad' (1) / "
            "'very  bad' (1). If each group is one class, write its label one way in the data (the run trains a head "
            "with 5 classes)") in caplog.text


def test_a_decoder_classifier_export_names_the_pad_id_training_set(tmp_path):
    """A decoder whose config has no pad id (GPT-2, Llama 3, ...): training sets it so the classifier finds each row's
    last token; the card's loading call has to set it too, or batches of two fail."""
    import re

    from peft import AutoPeftModelForSequenceClassification  # noqa: F401 - the card's call runs as written

    from peftkit.cli import main
    from tests.conftest import build_tiny_llama, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(len(tokenizer))
    model.config.pad_token_id = None
    base = tmp_path / "no-pad"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    recipe = _recipe(base, tmp_path, {"method": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                     max_steps=2)
    run_dir = train(recipe_from_dict(recipe)).run_dir
    assert main(["export", str(run_dir), "--format", "adapter", "--no-verify"]) == 0
    card = (run_dir / "adapter-export" / "README.md").read_text()
    call = re.search(r"model = (AutoPeftModelForSequenceClassification\.from_pretrained\(.*\))", card).group(1)
    assert f"pad_token_id={tokenizer.pad_token_id}" in call
    exported = eval(call)  # noqa: S307 - the card's own line
    batch = load_run(run_dir).tokenizer(["great movie", "bad food today"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(exported(**batch).logits, load_run(run_dir).model(**batch).logits)


def test_a_classifier_resumed_after_its_last_step_trains_no_further(tiny_bert_dir, tmp_path):
    """Killed after its last checkpoint (during the final evaluation): the resume finishes it from that checkpoint,
    as for chat runs (transformers would train a max_steps run one step more)."""
    recipe = _recipe(tiny_bert_dir, tmp_path, {"method": "full"}, max_steps=4, save_steps=2)
    run_dir = train(recipe_from_dict(recipe)).run_dir
    (run_dir / "summary.json").unlink()  # as a kill after the last checkpoint leaves it
    train(recipe_from_dict(recipe), resume=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4
    # resuming dropped the killed session's end record; the finishing session trains nothing and writes the run's
    ends = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "train_runtime" in r]
    assert len(ends) == 1 and ends[0]["step"] == 4
    assert ends[0]["train_loss"] == pytest.approx(summary["train_loss"], abs=1e-5)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_classifier_too_big_for_the_disk_is_refused_before_training(method, tiny_model_dir, tmp_path, monkeypatch):
    from collections import namedtuple

    from peftkit.errors import RunDirError

    adapter = {"method": "lora", "r": 4, "alpha": 8} if method == "lora" else {"method": "full"}
    monkeypatch.setattr(shutil, "disk_usage", lambda path: namedtuple("Usage", "total used free")(1, 1, 1000))
    with pytest.raises(RunDirError, match="not enough free space for this run in .*: 1.0 KB free, and it writes at least"):
        train(recipe_from_dict(_recipe(tiny_model_dir, tmp_path, adapter)))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_an_early_stopped_classifier_says_so_and_logs_no_second_evaluation_at_its_last_step(tiny_bert_dir, tmp_path):
    """The best checkpoint's weights are loaded at the end: their scores are its evaluation, not a new one logged at
    the last step (which drew a vertical line on the loss curve)."""
    recipe = _recipe(tiny_bert_dir, tmp_path, {"method": "lora", "r": 4, "alpha": 8}, lr=0.5, max_steps=40,
                     eval_steps=2, save_steps=2, early_stopping_patience=1)
    run_dir = train(recipe_from_dict(recipe)).run_dir
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped_early"] and summary["weights_from_step"] < summary["steps"] < 40
    assert summary["epochs_trained"] == pytest.approx(summary["steps"] / 3, abs=1e-3)  # 30 rows, batches of 10
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r["step"] for r in records if "eval_loss" in r]
    assert len(evaluations) == len(set(evaluations)), evaluations  # one evaluation per step
    best = next(r for r in records if "eval_loss" in r and r["step"] == summary["weights_from_step"])
    assert summary["eval_loss_after"] == best["eval_loss"]
    assert not any(key.startswith("heldout_") for r in records if r["step"] > 0 for key in r)  # the summary has them
    assert summary["heldout_accuracy_after"] is not None
    assert f"(stopped early; the weights are step {summary['weights_from_step']}'s" in (run_dir / "README.md").read_text()


def test_a_label_the_eval_split_drew_whole_is_warned_about(tiny_tokenizer, tmp_path, caplog):
    """A misspelt one-off label (`Positive` beside `positive`) went wholly into the eval split: the head got a class
    with no training row, and summary.json's `train_label_counts` showing 0 was the only trace."""
    import logging

    from peftkit.config.schema import DataConfig
    from peftkit.data.classification import build_classification_data

    records = [{"text": f"good thing {i}", "label": "positive"} for i in range(6)]
    records += [{"text": f"bad thing {i}", "label": "negative"} for i in range(6)] + [{"text": "fine", "label": "Positive"}]
    cfg = DataConfig(train=str(write_jsonl(tmp_path / "t.jsonl", records)), eval_fraction=0.3)
    seen = set()
    for seed in range(12):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="peftkit.data.classification"):
            data = build_classification_data(cfg, tiny_tokenizer, seed=seed)
        drawn = data.stats["train_label_counts"]["Positive"] == 0
        seen.add(drawn)
        assert ("label(s) 'Positive' have no training example" in caplog.text) == drawn, seed
    assert seen == {True, False}, "the seeds cover both cases"


def test_labelled_files_name_every_bad_record_and_an_eval_file_in_its_own_fields_is_read(tmp_path):
    """Only the first bad record was named (chat files list them all); and a `data.eval` file of `text` / `label`
    records beside a CSV mapped through data.columns was refused for lacking the mapped names."""
    from peftkit.config.schema import ColumnsConfig
    from peftkit.data.classification import load_labeled

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok", "label": "a"}, {"text": "", "label": "a"},
                                               {"text": "x", "label": ""}, {"text": None, "label": "b"}, {"text": "y"}])
    with pytest.raises(DataError) as caught:
        load_labeled(bad)
    message = str(caught.value)
    assert message.startswith(f"4 records of {bad} need fixing")
    for line in (2, 3, 4, 5):
        assert f"{bad}:{line}:" in message
    mapped = tmp_path / "train.csv"
    mapped.write_text("review,sentiment\ngreat,pos\nawful,neg\n")
    own = write_jsonl(tmp_path / "eval.jsonl", [{"text": "lovely", "label": "pos"}])
    columns = ColumnsConfig(text="review", label="sentiment")
    assert [(i.text, i.label) for i in load_labeled(mapped, columns)] == [("great", "pos"), ("awful", "neg")]
    assert [(i.text, i.label) for i in load_labeled(own, columns)] == [("lovely", "pos")]
    with pytest.raises(DataError, match="classification records need `review` and `sentiment`"):  # fits neither
        load_labeled(write_jsonl(tmp_path / "other.jsonl", [{"sentence": "x", "y": 1}]), columns)


def test_texts_longer_than_max_seq_len_are_counted_and_warned_about(tiny_tokenizer, tmp_path, caplog):
    """A classifier sees only a text's first max_seq_len tokens: a review whose verdict is at its end was cut
    silently. Texts exactly max_seq_len long are not cut."""
    import logging

    from peftkit.config.schema import DataConfig

    long_text = " ".join(["good"] * 40)
    records = [{"text": long_text, "label": "positive"}, {"text": "bad " * 3, "label": "negative"}] * 3
    cfg = DataConfig(train=str(write_jsonl(tmp_path / "t.jsonl", records)), eval_fraction=0.0, max_seq_len=16)
    with caplog.at_level(logging.WARNING, logger="peftkit.data.classification"):
        data = build_classification_data(cfg, tiny_tokenizer)
    assert data.stats["train_truncated"] == 3
    assert "3 of 6 training text(s) are longer than data.max_seq_len=16 tokens" in caplog.text
    assert "t.jsonl" in caplog.text and all(len(row["input_ids"]) <= 16 for row in data.train)

    exact = len(tiny_tokenizer(long_text)["input_ids"])
    cfg = cfg.model_copy(update={"max_seq_len": exact})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="peftkit.data.classification"):
        assert build_classification_data(cfg, tiny_tokenizer).stats["train_truncated"] == 0
    assert "longer than data.max_seq_len" not in caplog.text


def test_validate_says_what_a_classifiers_data_holds(tiny_bert_dir, tmp_path, capsys):
    """Chat recipes got a `Data:` line from validate, classifiers nothing beyond "recipe is valid"."""
    import yaml

    from peftkit.cli import main

    recipe = _recipe(tiny_bert_dir, tmp_path, {"method": "lora", "r": 4, "alpha": 8, "target_modules": ["query"]})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["validate", str(tmp_path / "r.yaml")]) == 0
    positive, negative = len(POSITIVE) * 3, len(NEGATIVE) * 3
    assert (f"Data: {positive + negative} training texts ({negative} 'negative', {positive} 'positive'), "
            f"{len(POSITIVE) + len(NEGATIVE)} eval texts, {len(POSITIVE) + len(NEGATIVE)} held-out texts"
            ) in " ".join(capsys.readouterr().out.split())
