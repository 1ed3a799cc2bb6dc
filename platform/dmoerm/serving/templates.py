"""Split one chat-templated text back into ``(context turns, response)``.

RL trainers send the reward server text that still carries the policy's chat-template tokens: OpenRLHF posts
``query`` (the templated prompt followed by the decoded response, special tokens kept) and ``prompts``; verl posts
one rendered conversation to ``/classify``. :func:`split_templated` recovers the turns from such text using the
markers of the template (:class:`TemplateMarkers`), detected automatically or named.

The parse is marker-based, not a Jinja inversion: a turn is the text between one turn opener and the next; the
response is everything after the last assistant opener. What the template adds around content (turn
terminators, bos/eos, pad tokens, Llama-2's ``<<SYS>>`` block, Llama-3.1's date preamble) is removed; content is
otherwise returned exactly as it appears in the text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import cast

from dmoerm.data.records import ROLES, Role, Turn

__all__ = ["BUILTIN_TEMPLATES", "TemplateMarkers", "detect_template", "split_templated"]


@dataclass(frozen=True)
class TemplateMarkers:
    """The strings that delimit turns in one chat template."""

    name: str
    """Short name (the key in :data:`BUILTIN_TEMPLATES` for the built-in ones)."""
    openers: dict[str, tuple[str, ...]]
    """Role -> the strings that open a turn of that role (``"<|im_start|>user\\n"``). Must include ``"user"`` and
    ``"assistant"``. The response is the text after the last assistant opener."""
    terminators: tuple[str, ...] = ()
    """End-of-turn strings removed from the end of a turn (``"<|im_end|>\\n"``, ``"<|im_end|>"``)."""
    bos: tuple[str, ...] = ()
    """Begin-of-sequence strings removed from the start of the text and from the end of a turn (Llama-2 repeats
    ``<s>`` before every ``[INST]``)."""
    eos: tuple[str, ...] = ()
    """End-of-sequence and pad strings removed from the end of the response and of every turn."""
    detect: tuple[str, ...] = ()
    """Strings that must all appear in a text for ``template="auto"`` to pick this template."""
    content_pad: str = ""
    """A separator the template puts on both sides of content (Llama-2: ``" "``); one is removed from each side."""
    system_wrap: tuple[str, str] | None = None
    """``(start, end)`` around a system prompt folded into the first user turn (Llama-2: ``<<SYS>>``)."""
    leading_role: Role | None = None
    """Role of text found before the first opener (DeepSeek writes the system prompt bare after bos); ``None``
    makes such text an error."""
    system_preamble: str | None = None
    """Regex for template-generated text at the start of the system turn, removed (Llama-3.1's knowledge/today
    dates); a system turn left empty is dropped."""
    _pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _role_of: dict[str, Role] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for role in self.openers:
            if role not in ROLES:
                raise ValueError(f"template {self.name!r}: opener role must be one of {ROLES}, got {role!r}")
        for role in ("user", "assistant"):
            if not self.openers.get(role):
                raise ValueError(f"template {self.name!r}: needs at least one {role!r} opener")
        role_of: dict[str, Role] = {}
        for role, strings in self.openers.items():
            for s in strings:
                if not s:
                    raise ValueError(f"template {self.name!r}: empty {role!r} opener")
                if s in role_of and role_of[s] != role:
                    raise ValueError(f"template {self.name!r}: opener {s!r} is used by {role_of[s]!r} and {role!r}")
                role_of[s] = cast(Role, role)
        for name in ("terminators", "bos", "eos", "detect"):
            if any(not s for s in getattr(self, name)):
                raise ValueError(f"template {self.name!r}: {name} contains an empty string")
        if self.system_wrap is not None and not all(self.system_wrap):
            raise ValueError(f"template {self.name!r}: system_wrap needs a non-empty start and end")
        if self.leading_role is not None and self.leading_role not in ROLES:
            raise ValueError(f"template {self.name!r}: leading_role must be one of {ROLES}, got {self.leading_role!r}")
        if self.system_preamble is not None:
            try:
                re.compile(self.system_preamble)
            except re.error as e:
                raise ValueError(f"template {self.name!r}: system_preamble is not a valid regex: {e}") from None
        alternatives = sorted(role_of, key=len, reverse=True)  # longest first, so a prefix never wins
        object.__setattr__(self, "_pattern", re.compile("|".join(re.escape(s) for s in alternatives)))
        object.__setattr__(self, "_role_of", role_of)


# Ordered most specific first: auto-detection takes the first whose `detect` strings are all present.
BUILTIN_TEMPLATES: dict[str, TemplateMarkers] = {
    m.name: m
    for m in (
        TemplateMarkers(
            "llama3",
            openers={r: (f"<|start_header_id|>{r}<|end_header_id|>\n\n",) for r in ROLES},
            terminators=("<|eot_id|>",),
            bos=("<|begin_of_text|>",),
            eos=("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"),
            detect=("<|start_header_id|>", "<|end_header_id|>"),
            system_preamble=r"(?:Environment: ipython\n)?Cutting Knowledge Date: [^\n]*\nToday Date: [^\n]*\n\n",
        ),
        TemplateMarkers(
            "chatml",
            openers={r: (f"<|im_start|>{r}\n",) for r in ROLES},
            terminators=("<|im_end|>\n", "<|im_end|>"),
            bos=("<s>",),
            eos=("<|im_end|>", "<|endoftext|>"),
            detect=("<|im_start|>",),
        ),
        TemplateMarkers(
            "gemma",
            openers={"user": ("<start_of_turn>user\n",), "assistant": ("<start_of_turn>model\n",),
                     "system": ("<start_of_turn>system\n",)},
            terminators=("<end_of_turn>\n", "<end_of_turn>"),
            bos=("<bos>",),
            eos=("<end_of_turn>", "<eos>", "<pad>"),
            detect=("<start_of_turn>",),
        ),
        TemplateMarkers(
            "phi3",
            openers={r: (f"<|{r}|>\n",) for r in ROLES},
            terminators=("<|end|>\n", "<|end|>"),
            bos=("<s>",),
            eos=("<|end|>", "<|endoftext|>"),
            detect=("<|assistant|>", "<|end|>"),
        ),
        TemplateMarkers(
            "zephyr",
            openers={r: (f"<|{r}|>\n",) for r in ROLES},
            terminators=("</s>\n", "</s>"),
            bos=("<s>",),
            eos=("</s>",),
            detect=("<|assistant|>",),
        ),
        TemplateMarkers(
            "deepseek",  # DeepSeek-V3 / R1: system prompt bare after bos, then <｜User｜> / <｜Assistant｜> turns
            openers={"user": ("<｜User｜>",), "assistant": ("<｜Assistant｜>",)},
            terminators=("<｜end▁of▁sentence｜>",),
            bos=("<｜begin▁of▁sentence｜>",),
            eos=("<｜end▁of▁sentence｜>",),
            detect=("<｜Assistant｜>",),
            leading_role="system",
        ),
        TemplateMarkers(
            "llama2",  # Llama-2-chat and Mistral/Mixtral-instruct: [INST] user [/INST] assistant</s>
            openers={"user": ("[INST] ",), "assistant": (" [/INST]",)},
            terminators=("</s>",),
            bos=("<s>",),
            eos=("</s>",),
            detect=("[/INST]",),
            content_pad=" ",
            system_wrap=("<<SYS>>\n", "\n<</SYS>>\n\n"),
        ),
        TemplateMarkers(
            "hh",  # Anthropic HH-RLHF plain text; prompts often end in "Assistant:" with no space
            openers={"user": ("\n\nHuman:",), "assistant": ("\n\nAssistant:",)},
            eos=("<|endoftext|>", "</s>"),
            detect=("Human:", "Assistant:"),
            content_pad=" ",
        ),
    )
}


def detect_template(text: str) -> TemplateMarkers | None:
    """The first built-in template whose markers all appear in ``text``, or ``None``."""
    for markers in BUILTIN_TEMPLATES.values():
        if all(s in text for s in markers.detect):
            return markers
    return None


def _resolve(template: str | TemplateMarkers, text: str) -> TemplateMarkers | None:
    if isinstance(template, TemplateMarkers):
        return template
    if template == "auto":
        return detect_template(text)
    if template not in BUILTIN_TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; use 'auto' or one of {sorted(BUILTIN_TEMPLATES)}")
    return BUILTIN_TEMPLATES[template]


def _strip_prefix(text: str, prefixes: tuple[str, ...]) -> str:
    for p in prefixes:
        if text.startswith(p):
            return text[len(p):]
    return text


def _strip_suffixes(text: str, suffixes: tuple[str, ...]) -> str:
    """Remove any of ``suffixes`` from the end of ``text``, repeatedly (``"<|end|>\\n<|endoftext|>"``)."""
    ordered = sorted(set(suffixes), key=len, reverse=True)
    stripped = True
    while stripped:
        stripped = False
        for s in ordered:
            if text.endswith(s):
                text, stripped = text[: -len(s)], True
                break
    return text


def _unpad(text: str, pad: str) -> str:
    if pad and text.startswith(pad):
        text = text[len(pad):]
    if pad and text.endswith(pad):
        text = text[: -len(pad)]
    return text


def _clean_body(body: str, m: TemplateMarkers) -> str:
    return _unpad(_strip_suffixes(body, m.terminators + m.eos + m.bos), m.content_pad)


def _clean_response(response: str, m: TemplateMarkers | None) -> str:
    if m is None:
        return response
    return _unpad(_strip_suffixes(response, m.terminators + m.eos), m.content_pad)


def _openers_in(text: str, m: TemplateMarkers) -> list[tuple[int, int, Role]]:
    """``(start, end, role)`` of every turn opener in ``text``. A template that separates turns with leading
    whitespace (HH's ``"\\n\\nHuman: "``) may omit it before the very first turn."""
    found = [(x.start(), x.end(), m._role_of[x.group()]) for x in m._pattern.finditer(text)]
    if not found or found[0][0] > 0:
        for opener, role in m._role_of.items():
            bare = opener.lstrip()
            if bare != opener and bare and text.startswith(bare):
                found.insert(0, (0, len(bare), role))
                break
    return found


def _parse_turns(context: str, m: TemplateMarkers) -> list[Turn]:
    """The turns of a context with no trailing generation prompt (bos already removed)."""
    found = _openers_in(context, m)
    turns: list[Turn] = []
    lead = context[: found[0][0]] if found else context
    if lead.strip():
        if m.leading_role is None:
            raise ValueError(f"text before the first {m.name} turn marker: {lead[:60]!r}")
        turns.append(Turn(m.leading_role, _clean_body(lead, m)))
    for i, (_, end, role) in enumerate(found):
        stop = found[i + 1][0] if i + 1 < len(found) else len(context)
        turns.append(Turn(role, _clean_body(context[end:stop], m)))
    turns = _unfold_system(turns, m)
    return [t for t in turns if t.role != "system" or t.content]


def _unfold_system(turns: list[Turn], m: TemplateMarkers) -> list[Turn]:
    out: list[Turn] = []
    for i, t in enumerate(turns):
        if t.role == "system" and m.system_preamble:
            t = Turn("system", re.sub(f"^(?:{m.system_preamble})", "", t.content))
        first_user = t.role == "user" and not any(u.role == "user" for u in turns[:i])
        if first_user and m.system_wrap and t.content.startswith(m.system_wrap[0]):
            start, end = m.system_wrap
            head, sep, rest = t.content[len(start):].partition(end)
            if sep:
                out.extend([Turn("system", head), Turn("user", rest)])
                continue
        out.append(t)
    return out


def split_templated(
    text: str, template: str | TemplateMarkers = "auto", prompt: str | None = None
) -> tuple[list[Turn], str]:
    """Split a chat-templated conversation into its context turns and the final assistant response.

    Args:
        text: the templated text: OpenRLHF's ``query`` (prompt + decoded response, special tokens kept) or the
            rendered conversation verl sends to ``/classify``.
        template: ``"auto"`` (detect from the markers present, most specific template first), the name of a
            built-in template (:data:`BUILTIN_TEMPLATES`), or custom :class:`TemplateMarkers`.
        prompt: the templated prompt alone (OpenRLHF's ``prompts``). When ``text`` starts with it, the response is
            the rest of ``text`` and the turns are parsed from ``prompt`` (its trailing generation prompt, and any
            prefill after it, is dropped); a prompt with no recognisable template becomes one user turn.
            Otherwise ``text`` is split at its last assistant turn opener.

    Returns:
        ``(turns, response)``: every turn before the response (earlier assistant turns included, system prompts as
        ``"system"`` turns) and the response with trailing eos / end-of-turn / pad tokens removed. The response
        may be empty.

    Raises:
        ValueError: no recognisable template (and no usable ``prompt``), no assistant turn, an empty context, text
            before the first turn marker, or an unknown template name. The message says which.
    """
    if prompt is not None and text.startswith(prompt):
        m = _resolve(template, text)
        if m is None:
            if not prompt.strip():
                raise ValueError("the prompt is empty and the text has no recognisable chat template, so there is "
                                 "no context to score the response against")
            return [Turn("user", prompt)], text[len(prompt):]
        head = _strip_prefix(prompt, m.bos)
        found = _openers_in(head, m)
        if found and found[-1][2] == "assistant":
            head = head[: found[-1][0]]
        turns = _parse_turns(head, m)
        response = _clean_response(text[len(prompt):], m)
    else:
        m = _resolve(template, text)
        if m is None:
            names = ", ".join(BUILTIN_TEMPLATES)
            why = "does not start with the given prompt and " if prompt is not None else ""
            raise ValueError(f"the text {why}has no recognisable chat template (looked for {names}); send the "
                             "prompt separately or name the template")
        body = _strip_prefix(text, m.bos)
        assistant_at = [(s, e) for s, e, role in _openers_in(body, m) if role == "assistant"]
        if not assistant_at:
            raise ValueError(f"the text has no assistant turn marker of the {m.name!r} template, so no response "
                             "can be found in it")
        start, end = assistant_at[-1]
        turns = _parse_turns(body[:start], m)
        response = _clean_response(body[end:], m)
    if not turns:
        raise ValueError(f"the text has no context turns before the response ({m.name!r} template); a reward needs "
                         "at least one prompt turn")
    return turns, response
