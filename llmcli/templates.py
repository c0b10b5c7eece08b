"""Chat templates llmcli supplies itself, for models whose files carry none."""

from __future__ import annotations

# ChatML as original Qwen's chat code wrote it: a default system turn, `<|im_start|>role\ncontent<|im_end|>\n`
# turns, and the generation prompt `<|im_start|>assistant\n`. The demo models use it too.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
