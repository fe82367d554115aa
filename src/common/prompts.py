"""Conversation templates and the paper's two length prompts.

Prompts are built through fastchat's templates (or the tokenizer's own chat template), never by slicing
strings: upstream inserted its length prompts with `p[:-11]`, which only works for one template.
"""

from __future__ import annotations

from .utils import UserError

VICUNA_TEMPLATE = "vicuna_v1.1"
# Sentinel name: use the tokenizer's own chat template (SmolLM2 speaks ChatML and rarely stops otherwise).
TOKENIZER_TEMPLATE = "chat_template"

# The paper's perception-in-advance prompt (PiA, strategy `po`), word for word.
PIA_PROMPT = (
    "Before responding to the above instruction, you have to predict the length of your response. "
    "Print the estimated number of tokens in your response in the first line. "
    "Then change to a new line to respond to the instruction."
)
# The paper's query prompt (strategy `seqsch`: the instruction-tuned length predictor), word for word.
QUERY_PROMPT = (
    "Don't output the response for the above instruction. Instead, you need to predict the number of tokens "
    "in your response. Output one number only."
)


# the role of the one turn of a /v1/completions request: its text is continued as written, with no chat template
COMPLETION = "completion"


def with_length_prompt(message: str, suffix: str | None) -> str:
    """A length prompt goes on a new line after the user's message, inside the user's turn (as upstream)."""
    return f"{message}\n{suffix}" if suffix else message


def choose_template(model_name: str, tokenizer, override: str | None = None) -> str:
    """The template follows the model: vicuna_v1.1 for Vicuna, else the tokenizer's chat template,
    else vicuna_v1.1 (base LLaMA-style tokenizers carry no template)."""
    if override:
        return override
    if "vicuna" in model_name.lower():
        return VICUNA_TEMPLATE
    if getattr(tokenizer, "chat_template", None):
        return TOKENIZER_TEMPLATE
    return VICUNA_TEMPLATE


class PromptFormatter:
    """Turns a user message into the token ids the model sees, the same way everywhere
    (benchmark, length collection, length prediction, training)."""

    def __init__(self, tokenizer, template: str):
        self.tokenizer = tokenizer
        self.template = template
        if template == TOKENIZER_TEMPLATE:
            if not getattr(tokenizer, "chat_template", None):
                raise UserError("--conv-template chat_template: this tokenizer has no chat template")
        else:
            from fastchat.conversation import conv_templates

            if template not in conv_templates:
                raise UserError(
                    f"unknown --conv-template {template!r}: "
                    f"use chat_template or a fastchat name such as {VICUNA_TEMPLATE}"
                )

    def text(self, message: str, suffix: str | None = None) -> str:
        """The prompt text; `suffix` (a length prompt) goes on a new line inside the user's turn."""
        return self.conversation_text([("user", with_length_prompt(message, suffix))])

    def conversation_text(self, messages) -> str:
        """The prompt text of a conversation: (role, text) turns, roles user, assistant and system, ending with the
        user's turn that the model answers next."""
        if self.template == TOKENIZER_TEMPLATE:
            return self.tokenizer.apply_chat_template(
                [{"role": role, "content": content} for role, content in messages],
                tokenize=False,
                add_generation_prompt=True,
            )
        from fastchat.conversation import get_conv_template

        conversation = get_conv_template(self.template)
        for role, content in messages:
            if role == "system":
                conversation.set_system_message(content)
            else:
                conversation.append_message(conversation.roles[0 if role == "user" else 1], content)
        conversation.append_message(conversation.roles[1], None)
        return conversation.get_prompt()

    def encode(self, message: str, suffix: str | None = None) -> list[int]:
        return self._tokens(self.text(message, suffix))

    def encode_conversation(self, messages) -> list[int]:
        if messages and messages[-1][0] == COMPLETION:  # a /v1/completions prompt: continued as written
            return self.tokenizer(messages[-1][1]).input_ids
        return self._tokens(self.conversation_text(messages))

    def _tokens(self, text: str) -> list[int]:
        # A chat template writes its own special tokens; a fastchat prompt relies on the tokenizer's BOS.
        add_special_tokens = self.template != TOKENIZER_TEMPLATE
        return self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids


# Stanford Alpaca's training template, as FastChat's alpaca converter writes the human turn of the paper's data.
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def alpaca_human_turn(instruction: str, input_text: str = "") -> str:
    if input_text:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
