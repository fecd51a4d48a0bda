"""README.md model cards for exported models and adapters: provenance, merge numbers, verification, usage."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import yaml

from peftkit.models.registry import hub_base_model


def _front_matter(data: dict[str, Any]) -> str:
    return "---\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True) + "---\n"


def _cell(text: str) -> str:
    """`text` quoted for one Markdown table cell or sentence (one line, pipes escaped)."""
    return "\"" + " ".join(text.split()).replace("|", "\\|") + "\""


def _num(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)


def verification_section(report: dict[str, Any] | None) -> list[str]:
    if report is None:
        return ["## Verification", "", "Not verified (`--no-verify`).", ""]
    lines = [
        "## Verification",
        "",
        f"Reloaded in a fresh process and compared with: {report.get('reference')}, on "
        f"{report['prompts']} fixed chat prompts.",
        "",
        "| check | value |",
        "|---|---|",
        f"| max abs logit diff | {_num(report['max_abs_diff'])} (tolerance {_num(report['tolerance'])}) |",
        f"| greedy-token agreement (teacher-forced) | {report['greedy_agreement']:.1%} |",
    ]
    lines.append(f"| identical greedy answers | {report['greedy_exact']:.0%} |")
    if "tokenizer_match" in report:
        lines.append(f"| tokenizer / chat template round trip | {report['tokenizer_match']} / {report['template_match']} |")
    lines.append(f"| passed | {report['passed']} |")
    return [*lines, ""]


OTHER_BASE_NOTE = " (**not the base the adapter was trained on**: same shapes, other weights)"


def merged_card(merged: Any, *, dtype: str, verification: dict[str, Any] | None, out: Path) -> str:
    run = merged.primary
    info = run.info
    runs = merged.runs
    if merged.combination:
        names = [r.recipe.name or r.run_dir.name for r in runs]
        names = ", ".join(names if len(set(names)) == len(names) else [r.run_dir.name for r in runs])  # seed soups
        title = f"{merged.combination['combination']} combination of {names} merged into {run.model_cfg.name}"
    else:
        title = f"{run.recipe.name or run.run_dir.name}: {info.method} merged into {run.model_cfg.name}"
    lines = [
        _front_matter({
            "base_model": hub_base_model(run.model_cfg.name),
            "library_name": "transformers",
            "tags": ["peftkit", "merged", *dict.fromkeys(r.info.method.lower() for r in runs)],
        }),
        f"# {title}",
        "",
        run.recipe.description or "Fine-tuned with peftkit; the adapter is folded into the weights (no peft needed).",
        "",
        "## Merge",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{run.model_cfg.name}`{OTHER_BASE_NOTE * any(r.other_base for r in runs)} |",
        f"| adapter(s) | {', '.join(f'`{r.run_dir}` ({r.info.method}, r={r.info.rank}, alpha={r.info.alpha})' for r in runs)} |",
        f"| dtype | {dtype} |",
        f"| merged vs unmerged (in memory, float32) | max abs logit diff {_num(merged.merge_max_abs_diff)} |",
    ]
    system = run.recipe.data.system_prompt
    if system:
        lines.append(f"| default system prompt | {_cell(system)} (the chat template adds it to conversations without a "
                     "system message; send your own to replace it) |")
    if merged.combination:
        c = merged.combination
        lines.append(f"| combination | {c['combination']}, weights {c['weights']} |")
        if c.get("qlora_base"):
            lines.append(f"| QLoRA merge target | {c['qlora_base']} {c['bits']}-bit weights (what the adapters trained "
                         "against) |")
    if merged.qlora:
        q = merged.qlora
        lines += [
            f"| QLoRA merge target | {q['base']} weights |",
            f"| error if merged into dequantized {q['quantization']['bits']}-bit weights | {_num(q['dequantized_max_abs_diff'])} |",
            f"| error if merged into original weights | {_num(q['original_max_abs_diff'])} |",
        ]
    lines += ["", *verification_section(verification)]
    lines += [
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("{out}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{out}")',
        'messages = [{"role": "user", "content": "Hello!"}]',
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", return_dict=True)",
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0]))",
        "```",
        "",
        (f"For llama.cpp / Ollama: `peftkit export {shlex.quote(str(run.run_dir))} --format gguf`." if not merged.combination else
         "For llama.cpp / Ollama: convert this folder with llama.cpp's `convert_hf_to_gguf.py` (`peftkit export "
         "RUN --format gguf` exports one run, not this combination)."),
        "",
    ]
    return "\n".join(lines)


def classifier_loading(labels: list[str], adapter: str, pad_token_id: int | None = None) -> str:
    """The one line of Python that loads a classification adapter with its labels (and the pad id training set on a
    decoder whose config has none: without it the classifier cannot find each row's last token in a batch)."""
    id2label = dict(enumerate(labels))
    pad = f", pad_token_id={pad_token_id}" if pad_token_id is not None else ""
    return (f'AutoPeftModelForSequenceClassification.from_pretrained("{adapter}", num_labels={len(labels)}, '
            f"id2label={id2label!r}, label2id={ {name: i for i, name in id2label.items()}!r}{pad})")


def bnb_kwargs(quantization: Any, skip_modules: list[str] | None = None) -> dict[str, Any] | None:
    """The BitsAndBytesConfig arguments a run's base was quantized with (JSON-friendly; None: not quantized).
    `blocksize` is not a BitsAndBytesConfig field: peftkit's loader applies it, and the cards say so.

    The compute dtype is the quantization's own: pass one with `compute_dtype: auto` resolved to what the run
    computed in (peftkit.runs.trained_quantization); an unresolved `auto` is taken as a CPU's float32."""
    q = quantization
    if q is None:
        return None
    skip = {"llm_int8_skip_modules": skip_modules} if skip_modules else {}
    if q.bits == 8:
        return {"load_in_8bit": True, **skip}
    compute_dtype = "float32" if q.compute_dtype == "auto" else q.compute_dtype
    return {"load_in_4bit": True, "bnb_4bit_quant_type": q.quant_type, "bnb_4bit_use_double_quant": q.double_quant,
            "bnb_4bit_compute_dtype": compute_dtype, "blocksize": q.blocksize, **skip}


def quantized_base_loading(bnb: dict[str, Any] | None) -> tuple[list[str], str]:
    """Lines and a `from_pretrained` keyword argument that load the base as training did: a QLoRA adapter learnt the
    quantized weights' errors too, and on the unquantized base it answers differently."""
    if not bnb:
        return [], ""
    settings = {k: v for k, v in bnb.items() if k != "blocksize"}
    trained_dtype = settings.get("bnb_4bit_compute_dtype")
    if trained_dtype == "float32":  # a CPU run's: on a GPU bfloat16 is the usual, faster choice
        settings["bnb_4bit_compute_dtype"] = "bfloat16"
    arguments = ", ".join(f"{k}={v!r}" for k, v in settings.items())
    lines = ["from transformers import BitsAndBytesConfig",
             f"quantization = BitsAndBytesConfig({arguments})  # the same quantized weights as training (on a GPU)"]
    if trained_dtype == "float32":
        lines.append(f"# bfloat16 computes fast on a GPU; bnb_4bit_compute_dtype='{trained_dtype}' reproduces the "
                     "training's (and the export's verification) numbers exactly")
        lines.append("# on a CPU with AVX512-BF16, bitsandbytes repacks 4-bit weights for a bf16 inference kernel on "
                     "the first forward without gradients (logits ~1e-2 off); the verification ran with it off: "
                     "set `support_avx512bf16_for_cpu = False` on every layer that has it for the same numbers")
    if bnb.get("blocksize") not in (None, 64):
        lines.append(f"# trained with quantization blocks of {bnb['blocksize']} (peftkit's loader sets them; "
                     "BitsAndBytesConfig has no field for it)")
    return lines, ", quantization_config=quantization"


def adapter_card(manifest: dict[str, Any], verification: dict[str, Any] | None, out: Path) -> str:
    base = manifest["base_model"]
    base_ref = base.get("path") or base["name"]
    local = f" (local path `{base['path']}`)" if base.get("path") and base["path"] != base["name"] else ""
    lines = [
        _front_matter({"base_model": hub_base_model(base["name"]), "library_name": "peft", "tags": ["peftkit", manifest["method"].lower()]}),
        f"# {manifest['method']} adapter for {base['name']}",
        "",
        "| | |",
        "|---|---|",
        f"| peft type | {manifest['peft_type']} |",
        *([f"| rank / alpha | {manifest.get('rank')} / {manifest.get('alpha')} |"] if manifest.get("rank") else []),
        f"| target modules | {manifest.get('target_modules')} |",
        f"| base model | `{base['name']}`{local} |",
        *([f"| base weights | {_cell(base['note'])[1:-1]} |"] if base.get("note") else []),  # GGUF-converted bases
        "",
        "## Serving engines",
        "",
        "| engine | accepts it | why not / notes |",
        "|---|---|---|",
    ]
    for engine, status in manifest["serving"].items():
        why = "; ".join(status["reasons"] or status.get("notes", []))
        lines.append(f"| {engine} | {'yes' if status['compatible'] else 'no'} | {why} |")
    if manifest.get("system_prompt"):
        lines += ["", f"Trained with the system prompt {_cell(manifest['system_prompt'])}. The tokenizer saved here adds it "
                  "when a conversation has none, but a server that renders prompts with the base model's chat template "
                  "instead of this folder's (common for multi-LoRA serving) does not: send it as the first message."]
    lines += ["", *verification_section(verification)]
    labels = base.get("labels")
    if labels is not None:  # a classifier: its head needs the label count before the adapter loads
        use = ["from peft import AutoPeftModelForSequenceClassification",
               f"model = {classifier_loading(labels, str(out), base.get('pad_token_id'))}"]
    else:
        quantized = quantized_base_loading(manifest.get("bitsandbytes_config"))
        use = ["from peft import PeftModel", "from transformers import AutoModelForCausalLM",
               *quantized[0], f'base = AutoModelForCausalLM.from_pretrained("{base_ref}"{quantized[1]})',
               f'model = PeftModel.from_pretrained(base, "{out}")']
    lines += ["## Use", "", "```python", *use, "```", ""]
    return "\n".join(lines)
