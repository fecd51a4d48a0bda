"""The chat REPL and one-shot mode on a tiny trained run."""

from __future__ import annotations

import io
import sys
from unittest import mock

import pytest
import torch

from peftkit.config import recipe_from_dict
from peftkit.errors import PeftkitError
from peftkit.runs import load_run
from peftkit.serve.chat import chat
from peftkit.train.run import train


def test_repl_keeps_history_resets_and_exits(tiny_recipe):
    run_dir = train(recipe_from_dict({**tiny_recipe, "train": {**tiny_recipe["train"], "max_steps": 1}, "eval": {"before": False}})).run_dir
    run = load_run(run_dir)
    stdin = io.StringIO("hello\nwhat is the network?\n/reset\n/help\nwho is the head librarian?\n/exit\n")
    out = io.StringIO()
    history = chat(run.model, run.tokenizer, system_prompt="be brief", max_new_tokens=5, stdin=stdin, out=out)
    assert [m["role"] for m in history] == ["system", "user", "assistant"], "history restarts after /reset"
    assert history[1]["content"] == "who is the head librarian?"
    assert out.getvalue().count("bot> ") == 3, "/help is not sent to the model"
    assert "Commands: /reset clears the conversation" in out.getvalue()
    assert out.getvalue().count("(new conversation)") == 1, "/reset is acknowledged"


def test_one_shot_prompt(tiny_recipe):
    run_dir = train(recipe_from_dict({**tiny_recipe, "train": {**tiny_recipe["train"], "max_steps": 1}, "eval": {"before": False}})).run_dir
    run = load_run(run_dir)
    out = io.StringIO()
    history = chat(run.model, run.tokenizer, system_prompt=None, prompt="hello", max_new_tokens=4, out=out)
    assert history[-1]["role"] == "assistant"
    said = out.getvalue().strip()
    assert said == history[-1]["content"] if history[-1]["content"] else said.startswith("(no reply: the model ")


def test_tools_reach_the_template_and_tool_results_continue_the_conversation(tiny_recipe, tmp_path, capsys):
    from peftkit.cli import main

    recipe = {**tiny_recipe, "model": {**tiny_recipe["model"], "chat_template": "chatml"},
              "train": {**tiny_recipe["train"], "max_steps": 1}, "eval": {"before": False}}
    run = load_run(train(recipe_from_dict(recipe)).run_dir)
    tools = ({"type": "function", "function": {"name": "find_book", "parameters": {"type": "object"}}},)
    seen = []
    original = run.tokenizer.apply_chat_template
    run.tokenizer.apply_chat_template = lambda messages, **kw: seen.append((messages, kw)) or original(messages, **kw)
    stdin = io.StringIO("is the river here?\n/tool {\"shelf\": \"B4\"}\n/exit\n")
    history = chat(run.model, run.tokenizer, system_prompt=None, max_new_tokens=3, stdin=stdin, out=io.StringIO(),
                   tools=tools)
    assert [m["role"] for m in history] == ["user", "assistant", "tool", "assistant"]
    assert history[2]["content"] == '{"shelf": "B4"}'
    seen = [(messages, kw) for messages, kw in seen if messages[0]["content"] not in ("Hello", "?")]  # not the probes
    assert all(kw.get("tools") == list(tools) for _, kw in seen) and len(seen) == 2
    assert "<tools>" in original(history, tokenize=False, tools=list(tools))
    bad = tmp_path / "tools.json"
    bad.write_text("[{\"description\": \"no name\"}]")
    assert main(["chat", str(run.run_dir), "--tools", str(bad), "--prompt", "hi"]) == 2
    assert "tool 1 in `tools` needs a `name`" in capsys.readouterr().err


def test_tools_for_a_template_that_leaves_them_out_are_refused_not_dropped(tiny_recipe):
    recipe = {**tiny_recipe, "train": {**tiny_recipe["train"], "max_steps": 1}, "eval": {"before": False}}
    run = load_run(train(recipe_from_dict(recipe)).run_dir)  # the tiny model's own ChatML template: no tools
    tools = ({"type": "function", "function": {"name": "find_book", "parameters": {"type": "object"}}},)
    with pytest.raises(PeftkitError, match="leaves the tool schemas out of the prompt .'find_book'.*chatml"):
        chat(run.model, run.tokenizer, system_prompt=None, prompt="hi", max_new_tokens=2, out=io.StringIO(), tools=tools)


def test_generation_stops_at_the_last_learned_position(tmp_path):
    """GPT-2-style models index a learned position table: a prompt plus reply past it would fail inside the model."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from peftkit.evaluate.generation import room_to_answer
    from peftkit.models.skeleton import learned_position_limit

    gpt2 = GPT2LMHeadModel(GPT2Config(n_positions=32, n_embd=16, n_layer=1, n_head=2, vocab_size=50))
    assert learned_position_limit(gpt2) == 32
    assert room_to_answer(20, 64, 32) == 12 and room_to_answer(20, 5, 32) == 5 and room_to_answer(20, 64, None) == 64
    with pytest.raises(PeftkitError, match="fills all 32 positions"):
        room_to_answer(32, 8, 32)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_generation_leaves_a_prompt_learning_adapters_virtual_tokens_their_positions(method):
    """Prompt tuning's soft prompt and prefix tuning's cached prefix both take positions of the learned table before
    the text: a reply sized to the bare table ran past it (IndexError inside GPT-2's position embedding)."""
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from peftkit.evaluate.generation import generate_replies, text_position_limit

    config = (PromptTuningConfig if method == "prompt" else PrefixTuningConfig)(task_type="CAUSAL_LM", num_virtual_tokens=8)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_positions=32, n_embd=16, n_layer=1, n_head=2, vocab_size=50))
    model = get_peft_model(gpt2, config)
    assert text_position_limit(gpt2) == 32 and text_position_limit(model) == 24

    class Words:  # one token per word: a 20-token prompt
        padding_side, pad_token_id, eos_token_id, chat_template = "right", 0, 49, None

        def __call__(self, texts, **kwargs):
            if isinstance(texts, str):
                return {"input_ids": [1 + len(w) % 40 for w in texts.split()]}
            ids = torch.tensor([[1 + len(w) % 40 for w in t.split()] for t in texts])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

        def decode(self, row, **kwargs):
            return " ".join(map(str, row))

    tokenizer = Words()
    prompt = " ".join(["word"] * 20)
    with mock.patch("peftkit.evaluate.generation.generation_prompt", lambda tok, conversation, tools: prompt), \
            mock.patch("peftkit.evaluate.generation.stop_token_ids", lambda model, tok: [49]):
        reply = generate_replies(model, tokenizer, [[{"role": "user", "content": prompt}]], max_new_tokens=64)[0]
    assert len(reply.token_ids) <= 4  # 20 prompt + 8 virtual + 4 = the 32 positions


def test_tools_are_read_from_a_schema_list_or_from_training_data(tmp_path):
    import json

    import pytest

    from peftkit.data.formats import read_tools
    from peftkit.errors import DataError

    schema = {"type": "function", "function": {"name": "find_book", "parameters": {"type": "object"}}}
    (tmp_path / "tools.json").write_text(json.dumps([schema]))
    (tmp_path / "train.jsonl").write_text(json.dumps({"tools": json.dumps([schema]), "messages": []}) + "\n")
    assert read_tools(str(tmp_path / "tools.json")) == read_tools(str(tmp_path / "train.jsonl")) == (schema,)
    # OpenAI's legacy `functions`, which training reads (wrapped as tools), read the same way
    (tmp_path / "legacy.jsonl").write_text(json.dumps({"functions": [schema["function"]], "messages": []}) + "\n")
    assert read_tools(str(tmp_path / "legacy.jsonl")) == (schema,)
    # training data whose first conversations use no tools: the first record with some
    (tmp_path / "later.jsonl").write_text(json.dumps({"tools": "", "messages": []}) + "\n"
                                          + json.dumps({"messages": []}) + "\n"
                                          + json.dumps({"tools": [schema], "messages": []}) + "\n")
    assert read_tools(str(tmp_path / "later.jsonl")) == (schema,)
    with pytest.raises(DataError, match="does not exist"):
        read_tools(str(tmp_path / "missing.json"))


@pytest.mark.parametrize("target", ["embed_tokens", "packing"])
def test_a_run_with_a_lora_on_the_embeddings_trains_and_chats(tiny_recipe, target):
    """peft wraps a LoRA'd `embed_tokens` in a layer without `num_embeddings`: chat's and packing's vocabulary
    checks read the rows through it (both were an AttributeError)."""
    adapter = {**tiny_recipe["adapter"], "target_modules": ["q_proj", "embed_tokens"]}
    train_cfg = {**tiny_recipe["train"], "max_steps": 1, "packing": target == "packing"}
    run_dir = train(recipe_from_dict({**tiny_recipe, "adapter": adapter, "train": train_cfg, "eval": {"before": False}})).run_dir
    run = load_run(run_dir)
    out = io.StringIO()
    history = chat(run.model, run.tokenizer, system_prompt=None, prompt="hello", max_new_tokens=3, out=out)
    assert history[-1]["role"] == "assistant" and out.getvalue().strip()


def test_generation_stops_at_the_templates_end_of_turn_when_it_is_not_eos(tiny_model_dir, tmp_path):
    """A Qwen2.5-base-like tokenizer: ChatML turns end with <|im_end|>, but EOS is another token. Training
    teaches <|im_end|> as each reply's last token, so chat, eval and the merged export must stop there."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from peftkit.evaluate.generation import stop_token_ids
    from peftkit.export.hf import save_model_dir

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tokenizer.eos_token = "<unk>"  # stands in for <|endoftext|>
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn != tokenizer.eos_token_id
    assert stop_token_ids(model, tokenizer) == [tokenizer.eos_token_id, end_of_turn]
    save_model_dir(model, tokenizer, tmp_path / "merged", dtype="float32", shard_size=10**9)
    saved = GenerationConfig.from_pretrained(str(tmp_path / "merged"))
    assert saved.eos_token_id == [tokenizer.eos_token_id, end_of_turn]


def test_an_empty_reply_is_said_not_shown_as_a_blank_line(tiny_recipe, monkeypatch):
    run_dir = train(recipe_from_dict({**tiny_recipe, "train": {**tiny_recipe["train"], "max_steps": 1}, "eval": {"before": False}})).run_dir
    run = load_run(run_dir)
    monkeypatch.setattr("peftkit.serve.chat.stop_token_ids", lambda model, tokenizer: list(range(len(tokenizer))))
    out = io.StringIO()
    history = chat(run.model, run.tokenizer, system_prompt=None, prompt="hello", max_new_tokens=4, out=out)
    assert history[-1]["content"] == ""  # the first token ended the turn (it may decode as a newline: blank space)
    assert "(no reply: the model ended its turn at once)" in out.getvalue() or \
        "(no reply: the model wrote only blank space)" in out.getvalue()


def test_blank_space_and_a_failing_generation_are_said(tiny_recipe, monkeypatch):
    """A reply of only whitespace is not "ended its turn at once"; an error inside generation reaches the user
    (it ran in a worker thread, and the REPL waited on the streamer forever)."""
    run_dir = train(recipe_from_dict({**tiny_recipe, "train": {**tiny_recipe["train"], "max_steps": 1}, "eval": {"before": False}})).run_dir
    run = load_run(run_dir)
    space = run.tokenizer.convert_tokens_to_ids("Ċ")  # a newline in the byte-level vocabulary
    original = run.model.generate

    def blank(**kwargs):
        kwargs["streamer"].put(kwargs["input_ids"])  # the prompt, which the streamer skips
        kwargs["streamer"].put(torch.tensor([[space, space]]))
        kwargs["streamer"].end()

    monkeypatch.setattr(run.model, "generate", blank)
    out = io.StringIO()
    history = chat(run.model, run.tokenizer, system_prompt=None, prompt="hello", max_new_tokens=4, out=out)
    assert history[-1]["content"] == "" and "(no reply: the model wrote only blank space)" in out.getvalue()
    assert "\n\n" not in out.getvalue()  # the blank space itself is not printed before the note

    def broken(**kwargs):
        raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(run.model, "generate", broken)
    with pytest.raises(RuntimeError, match="device-side assert"):
        chat(run.model, run.tokenizer, system_prompt=None, prompt="hello", max_new_tokens=4, out=io.StringIO())
    monkeypatch.setattr(run.model, "generate", original)


def test_a_run_whose_base_moved_and_a_recipe_given_as_the_run_are_explained(tiny_recipe, tmp_path):
    import yaml

    from peftkit.errors import ModelNotFoundError, RunDirError

    run_dir = train(recipe_from_dict({**tiny_recipe, "train": {**tiny_recipe["train"], "max_steps": 1}, "eval": {"before": False}})).run_dir
    stored = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    stored["model"]["name"] = str(tmp_path / "moved-away")
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(stored))
    with pytest.raises(ModelNotFoundError, match=r"put the base model back, or set model.name in .*recipe.yaml"):
        load_run(run_dir)
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(tiny_recipe))
    with pytest.raises(RunDirError, match="is a file; pass the run directory .* not the recipe$"):
        load_run(recipe_file)
    gguf_file = tmp_path / "model-f16.gguf"
    gguf_file.write_bytes(b"GGUF")
    with pytest.raises(RunDirError, match=r"is a GGUF file, which llama.cpp and Ollama run .*run directory it was"):
        load_run(gguf_file)


def test_token_rates_below_ten_keep_two_significant_digits():
    from peftkit.train.report import tokens_rate

    assert tokens_rate(0.23) == "0.23" and tokens_rate(7.46) == "7.5" and tokens_rate(1234.6) == "1,235"
    assert tokens_rate(None) == "n/a"


@pytest.fixture
def tiny_chat(tiny_model_dir):
    """The tiny Llama and its ChatML tokenizer, untrained: enough for the REPL's own behaviour."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), AutoTokenizer.from_pretrained(str(tiny_model_dir))


def test_input_that_is_not_utf8_is_replaced_not_a_crash(tiny_chat, capsys):
    """stdin and argv decode undecodable bytes as lone surrogates (surrogateescape), which the tokenizer refuses
    with a TypeError: they become U+FFFD, said once, and the REPL goes on."""
    model, tokenizer = tiny_chat
    # a stray byte, an escaped é (two bytes that are UTF-8 together) and a lone surrogate
    stdin = io.StringIO("caf\udcc3 \udcc3\udca9 \ud800!\nhello\n/exit\n")
    out = io.StringIO()
    history = chat(model, tokenizer, system_prompt=None, max_new_tokens=2, stdin=stdin, out=out)
    assert [m["content"] for m in history if m["role"] == "user"] == ["caf\ufffd é \ufffd!", "hello"]
    assert out.getvalue().count("bytes that are not valid UTF-8 were replaced") == 1
    assert out.getvalue().count("bot> ") == 2
    out = io.StringIO()
    history = chat(model, tokenizer, system_prompt="be \udcff brief", prompt="hi \udcfe", max_new_tokens=2, out=out)
    assert history[0]["content"] == "be \ufffd brief" and history[1]["content"] == "hi \ufffd"
    assert "bytes that are not valid UTF-8 were replaced" in capsys.readouterr().err  # --prompt: stdout is the reply
    assert "not valid UTF-8" not in out.getvalue()


def test_a_conversation_that_outgrows_learned_positions_is_said_and_the_repl_goes_on(tiny_chat, monkeypatch, capsys):
    """A GPT-2-like position table (the tiny Llama with a limit patched in): a reply cut short by it says so, and a
    history past it is an error for that turn, not the end of the chat; --prompt still raises."""
    from peftkit.data.chat import generation_prompt

    model, tokenizer = tiny_chat
    first = tokenizer(generation_prompt(tokenizer, [{"role": "user", "content": "hello"}]), add_special_tokens=False)
    limit = len(first["input_ids"]) + 3
    monkeypatch.setattr("peftkit.serve.chat.text_position_limit", lambda model: limit)
    monkeypatch.setattr("peftkit.serve.chat.stop_token_ids", lambda model, tokenizer: [len(tokenizer) + 7])  # never
    stdin = io.StringIO("hello\nand what about the river?\n/reset\nhello\n/exit\n")
    out = io.StringIO()
    history = chat(model, tokenizer, system_prompt=None, max_new_tokens=8, stdin=stdin, out=out)
    said = out.getvalue()
    cut = f" (cut short: the conversation fills the model's {limit} positions; /reset starts a new one)\n"
    assert said.count(cut) == 2, said
    assert "bot> error: a prompt of " in said and f"fills all {limit} positions" in said
    assert "/reset starts a new conversation" in said.split("error: ")[1]
    assert [m["role"] for m in history] == ["user", "assistant"] and history[0]["content"] == "hello"
    assert said.count("bot> ") == 3
    out = io.StringIO()
    capsys.readouterr()
    chat(model, tokenizer, system_prompt=None, prompt="hello", max_new_tokens=8, out=out)
    assert f"the reply was cut short: the prompt and reply fill the model's {limit} positions\n" in capsys.readouterr().err
    assert "cut short" not in out.getvalue()  # --prompt: stdout holds the reply alone
    with pytest.raises(PeftkitError, match=f"fills all {limit} positions"):
        chat(model, tokenizer, system_prompt=None, prompt="hello " * 10, max_new_tokens=8, out=io.StringIO())
    out = io.StringIO()
    chat(model, tokenizer, system_prompt=None, prompt="hello", max_new_tokens=3, out=out)
    assert "cut short" not in out.getvalue() + capsys.readouterr().err  # the budget was not cut


def test_ctrl_c_before_generation_starts_stops_the_reply_not_the_chat(tiny_chat, monkeypatch):
    """Ctrl-C right after `bot> ` lands while the prompt is built or the worker starts: that reply stops, the REPL
    goes on; a worker that started is stopped and waited for (not left generating while the process exits)."""
    import threading

    from peftkit.data.chat import generation_prompt

    model, tokenizer = tiny_chat
    calls = []

    def interrupted_once(tok, messages, tools=None):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return generation_prompt(tok, messages, tools)

    def repl(stdin, out, max_new_tokens):
        try:
            return chat(model, tokenizer, system_prompt=None, max_new_tokens=max_new_tokens, stdin=stdin, out=out)
        except KeyboardInterrupt:  # not re-raised: it would end the whole test session
            pytest.fail("Ctrl-C before the reply streamed quit the chat")

    monkeypatch.setattr("peftkit.serve.chat.generation_prompt", interrupted_once)
    out = io.StringIO()
    history = repl(io.StringIO("hello\nhi\n/exit\n"), out, 2)
    assert "bot>  (stopped)\n" in out.getvalue() and out.getvalue().count("bot> ") == 2
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"] and history[1]["content"] == ""

    start, workers = threading.Thread.start, []

    def start_then_interrupt(self):
        start(self)
        workers.append(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(threading.Thread, "start", start_then_interrupt)
    out = io.StringIO()
    repl(io.StringIO("hello\n"), out, 64)
    monkeypatch.setattr(threading.Thread, "start", start)
    assert "bot>  (stopped)\n" in out.getvalue() and len(workers) == 1 and not workers[0].is_alive()


def test_commands_are_known_first_words_and_paths_reach_the_model(tiny_chat):
    model, tokenizer = tiny_chat
    stdin = io.StringIO("hello\n/reset now\n/etc/hosts\n/usr/bin is a folder?\n/foo\n/exit now\nnever sent\n")
    out = io.StringIO()
    history = chat(model, tokenizer, system_prompt=None, max_new_tokens=2, stdin=stdin, out=out)
    assert [m["content"] for m in history if m["role"] == "user"] == ["/etc/hosts", "/usr/bin is a folder?"]
    assert out.getvalue().count("bot> ") == 3 and out.getvalue().count("Commands: ") == 1  # only /foo


def test_a_tool_result_without_tools_is_said_not_asked(tiny_chat):
    """`/tool 42` in a chat started without --tools went to the model as the user's question "/tool 42"."""
    model, tokenizer = tiny_chat
    out = io.StringIO()
    history = chat(model, tokenizer, system_prompt=None, max_new_tokens=2, stdin=io.StringIO("/tool 42\n/tool\n"), out=out)
    assert history == [] and out.getvalue().count("(no tools in this chat: /tool answers a tool call when chat "
                                                  "starts with --tools FILE)") == 2


def test_a_loaded_run_asks_with_the_recipes_system_prompt(tiny_recipe):
    """The README's Python example asked without it, so the run's template put the base model's default in its place."""
    from peftkit.runs import LoadedRun

    run = LoadedRun(None, recipe_from_dict({**tiny_recipe, "data": {**tiny_recipe["data"], "system_prompt": "be brief"}}),
                    None, None)
    asked = run.with_system_prompt([{"role": "user", "content": "hi"}])
    assert asked == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    own = [{"role": "system", "content": "mine"}, {"role": "user", "content": "hi"}]
    assert run.with_system_prompt(own) == own


def test_an_error_during_a_reply_starts_on_a_line_of_its_own(tiny_chat):
    """SIGTERM mid-reply: "terminated (SIGTERM)" was printed after the partial reply, on its line."""
    from peftkit.errors import Terminated

    model, tokenizer = tiny_chat
    words = tokenizer("hello there friend", add_special_tokens=False)["input_ids"]

    def some_words(**kwargs):
        kwargs["streamer"].put(kwargs["input_ids"])  # the prompt, which the streamer skips
        for word in words:
            kwargs["streamer"].put(torch.tensor([word]))
        kwargs["streamer"].end()

    class SigtermOnSecondWrite(io.StringIO):
        writes = 0

        def write(self, text):
            self.writes += 1
            if self.writes == 2:
                raise Terminated()
            return super().write(text)

    model.generate = some_words
    out = SigtermOnSecondWrite()
    with pytest.raises(Terminated):
        chat(model, tokenizer, system_prompt=None, prompt="hi", max_new_tokens=8, out=out)
    assert out.getvalue().strip() and out.getvalue().endswith("\n"), out.getvalue()


def test_a_strict_utf8_stdin_does_not_end_the_chat_on_a_stray_byte(tiny_chat, monkeypatch):
    """Under a UTF-8 locale (not C.UTF-8) stdin decodes strictly: a Latin-1 byte raised UnicodeDecodeError."""
    model, tokenizer = tiny_chat
    strict = io.TextIOWrapper(io.BytesIO(b"caf\xe9\n/exit\n"), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdin", strict)
    history = chat(model, tokenizer, system_prompt=None, max_new_tokens=2, out=io.StringIO())
    assert history[0]["content"] == "caf\ufffd"


def test_a_conversation_past_the_trained_context_of_a_rope_model_is_said(tiny_chat, monkeypatch, capsys):
    """RoPE models run past their trained context with no error, only worse replies: a 9,000-token prompt to SmolLM2
    (8,192) answered without a word. Now a note (REPL: with /reset; --prompt: on stderr)."""
    model, tokenizer = tiny_chat
    monkeypatch.setattr("peftkit.serve.chat.trained_context", lambda model: 12)
    out = io.StringIO()
    chat(model, tokenizer, system_prompt=None, max_new_tokens=4, stdin=io.StringIO("hello there\n/exit\n"), out=out)
    assert "note: the conversation runs past the 12 tokens the model was trained on" in out.getvalue()
    assert "/reset starts a new one" in out.getvalue()
    out = io.StringIO()
    chat(model, tokenizer, system_prompt=None, prompt="hello there", max_new_tokens=4, out=out)
    assert "note: the prompt runs past the 12 tokens" in capsys.readouterr().err and "note" not in out.getvalue()
    monkeypatch.setattr("peftkit.serve.chat.trained_context", lambda model: 10_000)
    out = io.StringIO()
    chat(model, tokenizer, system_prompt=None, max_new_tokens=4, stdin=io.StringIO("hello there\n/exit\n"), out=out)
    assert "note" not in out.getvalue() + capsys.readouterr().err


def _cut_inside_an_emoji(tokenizer) -> list[int]:
    """Tokens of a reply that stops after the first byte-level token of an emoji."""
    whole = tokenizer("Opens at 9 \U0001f558", add_special_tokens=False)["input_ids"]
    cut = whole[:-1]
    while not tokenizer.decode(cut).endswith("\ufffd"):
        cut = cut[:-1]
    assert tokenizer.decode(cut).startswith("Opens at 9"), "precondition: the emoji is split over byte tokens"
    return cut


def test_a_reply_cut_inside_a_character_is_stored_and_shown_without_its_broken_start(tiny_model_dir, tiny_tokenizer):
    """A reply cut by max_new_tokens halfway through an emoji's byte tokens ended in U+FFFD, in heldout.jsonl and
    on the screen."""
    from transformers import AutoModelForCausalLM

    from peftkit.evaluate.generation import generate_replies
    from peftkit.serve.chat import stream_reply

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    reply_ids = _cut_inside_an_emoji(tiny_tokenizer)
    stop = tiny_tokenizer.eos_token_id
    assert stop not in reply_ids

    def generate(input_ids, streamer=None, **kwargs):
        new = torch.tensor([reply_ids] * input_ids.shape[0])
        if streamer is not None:
            streamer.put(input_ids.cpu())
            for token in reply_ids:
                streamer.put(torch.tensor([token]))
            streamer.end()
        return torch.cat([input_ids, new], dim=1)

    messages = [{"role": "user", "content": "When does it open?"}]
    with mock.patch.object(model, "generate", generate):
        stored = generate_replies(model, tiny_tokenizer, [messages], max_new_tokens=len(reply_ids))[0]
        out = io.StringIO()
        shown = stream_reply(model, tiny_tokenizer, messages, max_new_tokens=len(reply_ids), out=out)
    assert not stored.finished and stored.text == "Opens at 9"
    assert shown == "Opens at 9" and "\ufffd" not in out.getvalue() and out.getvalue().startswith("Opens at 9")


def test_a_reply_that_ran_out_of_tokens_inside_a_character_is_not_called_an_ended_turn(tiny_recipe, monkeypatch):
    run_dir = train(recipe_from_dict({**tiny_recipe, "train": {**tiny_recipe["train"], "max_steps": 1}, "eval": {"before": False}})).run_dir
    run = load_run(run_dir)
    first_byte = run.tokenizer.convert_tokens_to_ids("â")  # 0xE2: the first byte of a three-byte character
    assert run.tokenizer.decode([first_byte]) == "\ufffd"

    def partial_characters(**kwargs):
        kwargs["streamer"].put(kwargs["input_ids"])
        ids = kwargs["input_ids"]
        for _ in range(kwargs["max_new_tokens"]):
            ids = torch.cat([ids, torch.tensor([[first_byte]])], dim=1)
            kwargs["stopping_criteria"][0](ids, None)
            kwargs["streamer"].put(torch.tensor([first_byte]))
        kwargs["streamer"].end()

    monkeypatch.setattr(run.model, "generate", partial_characters)
    out = io.StringIO()
    chat(run.model, run.tokenizer, system_prompt=None, prompt="hello", max_new_tokens=4, out=out)
    assert "(no reply: its 4 new tokens decode to no text; raise --max-new-tokens)" in out.getvalue()
    assert "ended its turn" not in out.getvalue()


def test_generating_replies_leaves_the_saved_tokenizer_padding_as_it_was(tiny_recipe, tmp_path):
    from transformers import AutoTokenizer

    from peftkit.evaluate.generation import generate_replies

    run_dir = train(recipe_from_dict({**tiny_recipe, "train": {**tiny_recipe["train"], "max_steps": 1}, "eval": {"before": False}})).run_dir
    run = load_run(run_dir)
    side, backend_padding = run.tokenizer.padding_side, run.tokenizer._tokenizer.padding
    questions = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "a much longer question here"}]]
    generate_replies(run.model, run.tokenizer, questions, max_new_tokens=2, batch_size=2)
    assert run.tokenizer.padding_side == side and run.tokenizer._tokenizer.padding == backend_padding
    run.tokenizer.save_pretrained(tmp_path / "saved")
    assert AutoTokenizer.from_pretrained(tmp_path / "saved").padding_side == side == "right"
