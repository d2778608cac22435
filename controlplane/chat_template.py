"""Chat messages -> prompt text, by the model's Jinja chat template, rendered as Hugging Face's
`apply_chat_template` renders it (the same sandbox, whitespace options, `tojson`, `raise_exception`
and `strftime_now`; the tokenizer config's special tokens as variables).

Where the template comes from, first found: `duetserve serve --chat-template` (a file, or the
template text itself, as vLLM's flag), the checkpoint folder's `chat_template.jinja`, its
`tokenizer_config.json`'s `chat_template` (a string, or a list of named templates: `default`), and,
for a random-weight preset (no folder), the preset family's format: Llama 3 headers for `llama-*`,
ChatML (Qwen's format) for the others. A checkpoint folder without a template has none: chat
requests then fail with a clear error, as in vLLM.

This module only renders text: it does not tokenize, and it knows nothing of gRPC or sampling.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

# variables a template reads that a request's chat_template_kwargs may not replace
RESERVED_KWARGS = frozenset({"messages", "add_generation_prompt", "tools", "documents"})
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")

CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3 = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
PRESET_SPECIAL_TOKENS = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}  # Llama 3's, as text


class ChatTemplateError(ValueError):
    """A chat request the template cannot render (the template raised, or the request is malformed);
    a client error, its message says why."""


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str
    name: str | None = None
    tool_calls: tuple[dict[str, Any], ...] = ()
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """As a template sees it: the optional fields only when set (templates test `is defined`)."""
        message: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.name:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [dict(call) for call in self.tool_calls]
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        if self.reasoning_content:
            message["reasoning_content"] = self.reasoning_content
        return message


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"the chat template refused the messages: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """Hugging Face's `tojson`: unlike Jinja's own, it does not escape HTML characters."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationBlock(jinja2.ext.Extension):
    """transformers' `{% generation %}...{% endgeneration %}`, which marks the assistant's part for
    training masks: here it renders its body, as transformers does for a prompt."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[Any]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, _GenerationBlock])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """A compiled template; `origin` says where it came from (for logs and errors)."""

    def __init__(self, source: str, origin: str, special_tokens: dict[str, str] | None = None) -> None:
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ValueError(f"chat template {origin}: line {exc.lineno}: {exc.message}") from exc
        self.origin = origin
        self.special_tokens = dict(special_tokens or {})

    def render(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
               continue_final_message: bool = False, kwargs: dict[str, Any] | None = None,
               tools: list[dict[str, Any]] | None = None) -> str:
        """The prompt text. `continue_final_message` leaves the last message open for the model to go
        on (the text after its content is cut), so it excludes `add_generation_prompt`; `tools` is
        the template's `tools` (None: no tools)."""
        if not messages:
            raise ChatTemplateError("chat.messages: at least one message is needed")
        if continue_final_message and add_generation_prompt:
            raise ChatTemplateError("chat: continue_final_message and add_generation_prompt exclude each other "
                                    "(set add_generation_prompt to false)")
        extra = dict(kwargs or {})
        clash = sorted(RESERVED_KWARGS & extra.keys())
        if clash:
            raise ChatTemplateError(f"chat.chat_template_kwargs: {', '.join(clash)} may not be set there")
        variables = {**self.special_tokens, **extra, "messages": [m.as_dict() for m in messages],
                     "add_generation_prompt": add_generation_prompt, "tools": tools or None, "documents": None}
        try:
            text = self._template.render(variables)
        except ChatTemplateError:
            raise
        except Exception as exc:  # template code: undefined calls, sandbox refusals, type errors, recursion
            raise ChatTemplateError(f"the chat template ({self.origin}) failed on these messages: {exc!r}") from exc
        if continue_final_message:
            content = messages[-1].content
            final = content.strip()
            cut = text.rfind(final)
            if not final or cut < 0:
                raise ChatTemplateError("chat: continue_final_message needs a final message with text that the "
                                        "template keeps verbatim")
            # as transformers: the message's trailing whitespace stays when the template kept it verbatim
            body = content.lstrip()
            kept = text[cut : cut + len(body)] == body
            text = text[: cut + (len(body) if kept else len(final))]
        return text


def _special_tokens(config: dict[str, Any]) -> dict[str, str]:
    """The tokenizer config's special tokens as strings (each is a string or an added-token object)."""
    tokens = {}
    for key in SPECIAL_TOKEN_KEYS:
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            tokens[key] = value
    return tokens


def _from_config(config: dict[str, Any]) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not readable JSON: {exc}") from exc
    return config if isinstance(config, dict) else {}


def load_chat_template(model: str, override: str | None = None) -> ChatTemplate | None:
    """The template for `model` (a checkpoint folder or a preset name), `override` first: a path to a
    file, else the template text itself. None: the checkpoint has no template."""
    folder = Path(model)
    config = _read_config(folder) if folder.is_dir() else {}
    special = _special_tokens(config)
    if override is not None:
        path = Path(override)
        if "{" not in override and path.is_file():
            return ChatTemplate(path.read_text(encoding="utf-8"), str(path), special)
        if "{" not in override:
            raise ValueError(f"--chat-template {override!r}: no such file (and not a template: it has no '{{')")
        return ChatTemplate(override, "--chat-template", special)
    if folder.is_dir():
        jinja_file = folder / "chat_template.jinja"
        if jinja_file.is_file():
            return ChatTemplate(jinja_file.read_text(encoding="utf-8"), str(jinja_file), special)
        source = _from_config(config)
        return ChatTemplate(source, str(folder / "tokenizer_config.json"), special) if source else None
    if model.startswith("llama"):
        return ChatTemplate(LLAMA3, f"preset {model} (Llama 3 format)", PRESET_SPECIAL_TOKENS)
    return ChatTemplate(CHATML, f"preset {model} (ChatML)")
