"""Chat templates: rendered as transformers' apply_chat_template renders them (the reference), found
where a checkpoint keeps them, and every refusal a ChatTemplateError or ValueError that says why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from controlplane.chat_template import (
    CHATML, LLAMA3, PRESET_SPECIAL_TOKENS, ChatMessage, ChatTemplate, ChatTemplateError, load_chat_template,
)

# A template with what real ones use: a namespace, loop controls, tojson, raise_exception, a kwarg
# (enable_thinking, as Qwen3's), the special-token variables and a message's optional name.
RICH = """{{- bos_token }}
{%- set ns = namespace(system=none) %}
{%- for message in messages %}
  {%- if message['role'] == 'system' %}{% set ns.system = message['content'] %}{% continue %}{% endif %}
  {%- if message['role'] not in ['user', 'assistant'] %}
    {{- raise_exception('role ' + message['role'] + ' is not supported') }}
  {%- endif %}
  {%- if loop.first and ns.system %}[SYS]{{ ns.system }}[/SYS]{% endif %}
  <{{ message['role'] }}{% if message.name is defined %} name={{ message.name | tojson }}{% endif %}>
  {{ message['content'] | trim }}{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}
{% endfor %}
{%- if add_generation_prompt %}<assistant>{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}{% endif %}
{{- '' if meta is not defined else (meta | tojson) }}"""

CONVERSATION = [ChatMessage("system", "Be brief."), ChatMessage("user", "Hi there, what is 2+2?", name="ann"),
                ChatMessage("assistant", " It is 4. "), ChatMessage("user", "Ünïcode & <tags> \"quotes\"")]


def _reference(template: str, messages: list[ChatMessage], **kwargs: object) -> str:
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), chat_template=template,
                                        bos_token="<s>", eos_token="</s>")
    return tokenizer.apply_chat_template([m.as_dict() for m in messages], tokenize=False, **kwargs)


@pytest.mark.parametrize("template", [CHATML, LLAMA3, RICH], ids=["chatml", "llama3", "rich"])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_rendering_matches_transformers(template: str, generation_prompt: bool) -> None:
    ours = ChatTemplate(template, "test", {"bos_token": "<s>", "eos_token": "</s>"})
    for kwargs in ({}, {"enable_thinking": False}, {"meta": {"k": "é<>", "n": [1, 2]}}):
        got = ours.render(CONVERSATION, generation_prompt, kwargs=kwargs)
        assert got == _reference(template, CONVERSATION, add_generation_prompt=generation_prompt, **kwargs)
    if template == RICH:  # the kwarg reached the template
        assert "<think></think>" in ours.render(CONVERSATION, True, kwargs={"enable_thinking": False})


@pytest.mark.parametrize("template", [CHATML, LLAMA3, RICH], ids=["chatml", "llama3", "rich"])
def test_continue_final_message_matches_transformers(template: str) -> None:
    messages = [ChatMessage("user", "Name a colour."), ChatMessage("assistant", "The colour is")]
    ours = ChatTemplate(template, "test", {"bos_token": "<s>", "eos_token": "</s>"})
    got = ours.render(messages, add_generation_prompt=False, continue_final_message=True)
    assert got == _reference(template, messages, add_generation_prompt=False, continue_final_message=True)
    assert got.endswith("The colour is")
    for content in ("1. apples\n2. ", " 1. apples\n2. "):  # trailing space kept, with a leading one too
        spaced = [ChatMessage("user", "List two."), ChatMessage("assistant", content)]
        got = ours.render(spaced, add_generation_prompt=False, continue_final_message=True)
        assert got == _reference(template, spaced, add_generation_prompt=False, continue_final_message=True)


def test_the_generation_block_renders_its_body_as_transformers_does() -> None:
    """transformers' `{% generation %}` tag (assistant masks for training) in a checkpoint's template."""
    template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}<a>{{ m['content'] }}</a>"
                "{% endgeneration %}{% else %}<u>{{ m['content'] }}</u>{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}<a>{% endif %}")
    messages = [ChatMessage("user", "hi"), ChatMessage("assistant", "hello"), ChatMessage("user", "more")]
    got = ChatTemplate(template, "test", {}).render(messages, True)
    assert got == _reference(template, messages, add_generation_prompt=True) == "<u>hi</u><a>hello</a><u>more</u><a>"


def test_the_presets_formats() -> None:
    chatml = ChatTemplate(CHATML, "t").render([ChatMessage("user", "hi")])
    assert chatml == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    llama = ChatTemplate(LLAMA3, "t", PRESET_SPECIAL_TOKENS).render([ChatMessage("user", " hi ")], False)
    assert llama == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"


def test_refusals_say_why() -> None:
    rich = ChatTemplate(RICH, "rich", {"bos_token": "<s>", "eos_token": "</s>"})
    with pytest.raises(ChatTemplateError, match="refused the messages: role tool is not supported"):
        rich.render([ChatMessage("tool", "{}")])
    with pytest.raises(ChatTemplateError, match="at least one message"):
        rich.render([])
    with pytest.raises(ChatTemplateError, match="exclude each other"):
        rich.render(CONVERSATION, add_generation_prompt=True, continue_final_message=True)
    with pytest.raises(ChatTemplateError, match="add_generation_prompt, messages may not be set"):
        rich.render(CONVERSATION, kwargs={"messages": [], "add_generation_prompt": True})
    dropper = ChatTemplate("{% for m in messages %}{{ m['role'] }}{% endfor %}", "dropper")
    with pytest.raises(ChatTemplateError, match="continue_final_message needs"):
        dropper.render([ChatMessage("user", "hello")], False, continue_final_message=True)
    with pytest.raises(ChatTemplateError, match="failed on these messages"):
        ChatTemplate("{{ messages[0]['content'] + 1 }}", "typed").render([ChatMessage("user", "x")])


def test_the_sandbox_holds() -> None:
    escape = ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}", "escape")
    with pytest.raises(ChatTemplateError, match="failed on these messages"):
        escape.render([ChatMessage("user", "x")])
    mutate = ChatTemplate("{% set _ = messages.append({'role': 'x'}) %}{{ messages | length }}", "mutate")
    with pytest.raises(ChatTemplateError):
        mutate.render([ChatMessage("user", "x")])


def test_a_syntax_error_names_the_line() -> None:
    with pytest.raises(ValueError, match=r"chat template bad: line 2: .*"):
        ChatTemplate("ok\n{% for m in messages %}", "bad")


def test_where_the_template_comes_from(tmp_path: Path) -> None:
    assert load_chat_template("tiny").origin == "preset tiny (ChatML)"  # type: ignore[union-attr]
    assert load_chat_template("qwen3-8b").render([ChatMessage("user", "a")]).startswith("<|im_start|>")  # type: ignore[union-attr]
    llama = load_chat_template("llama-3.1-8b")
    assert llama is not None and llama.render([ChatMessage("user", "a")]).startswith("<|begin_of_text|>")

    folder = tmp_path / "ckpt"
    folder.mkdir()
    assert load_chat_template(str(folder)) is None  # a checkpoint without a template has none
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "<B>"}, "eos_token": "<E>"}))
    assert load_chat_template(str(folder)) is None
    config = {"bos_token": {"content": "<B>"}, "eos_token": "<E>", "chat_template": "{{ bos_token }}{{ eos_token }}"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_chat_template(str(folder)).render([ChatMessage("u", "x")]) == "<B><E>"  # type: ignore[union-attr]
    config["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_chat_template(str(folder)).render([ChatMessage("u", "x")]) == "D"  # type: ignore[union-attr]
    (folder / "chat_template.jinja").write_text("J{{ bos_token }}")
    found = load_chat_template(str(folder))
    assert found is not None and found.render([ChatMessage("u", "x")]) == "J<B>"
    assert found.origin.endswith("chat_template.jinja")

    override = tmp_path / "mine.jinja"
    override.write_text("M{{ messages | length }}")
    assert load_chat_template(str(folder), str(override)).render([ChatMessage("u", "x")]) == "M1"  # type: ignore[union-attr]
    inline = load_chat_template("tiny", "{{ messages[0]['content'] }}!")
    assert inline is not None and inline.render([ChatMessage("u", "x")]) == "x!"
    with pytest.raises(ValueError, match="no such file"):
        load_chat_template("tiny", str(tmp_path / "missing.jinja"))
    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not readable JSON"):
        load_chat_template(str(folder))


TOOLS_TEMPLATE = """{%- if tools %}<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>{% endif %}
{%- for m in messages %}
<{{ m.role }}>{% if m.reasoning_content is defined %}<think>{{ m.reasoning_content }}</think>{% endif %}{{ m.content }}
{%- if m.tool_calls is defined %}{% for c in m.tool_calls %}<call>{{ c.function.name }}({{ c.function.arguments | tojson }})</call>{% endfor %}{% endif %}
{%- if m.tool_call_id is defined %} [answers {{ m.tool_call_id }}]{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<assistant>{% endif %}"""
WEATHER = {"type": "function", "function": {"name": "weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def test_tools_and_tool_calls_render_as_transformers_renders_them() -> None:
    call = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo", "days": 2}}}
    messages = [ChatMessage("user", "Weather in Oslo?"),
                ChatMessage("assistant", "", tool_calls=(call,), reasoning_content="I should call weather."),
                ChatMessage("tool", "-3 C", tool_call_id="call-1")]
    ours = ChatTemplate(TOOLS_TEMPLATE, "tools").render(messages, tools=[WEATHER])
    reference = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), chat_template=TOOLS_TEMPLATE)
    want = reference.apply_chat_template([m.as_dict() for m in messages], tools=[WEATHER], tokenize=False,
                                         add_generation_prompt=True)
    assert ours == want
    assert '<call>weather({"city": "Oslo", "days": 2})</call>' in ours and "[answers call-1]" in ours
    assert ChatTemplate(TOOLS_TEMPLATE, "tools").render(messages[:1]) == "<user>Weather in Oslo?<assistant>"
