"""The agent runtime: model loading, the chat template with tool calls, tool-call parsing, the
embedded base model, and the rollout loop.

Importing this package is cheap (no torch, no transformers): heavy imports happen inside the
functions that need them. Main entry points:

- `tracetune.agent.model`: `load_model`, `load_tokenizer`, `pick_device_dtype`, `stop_token_ids`
- `tracetune.agent.template`: `render_messages`, `ensure_chat_template`, `normalize_messages`
- `tracetune.agent.parsing`: `parse_assistant_output`, `to_openai_message`
- `tracetune.agent.base_model`: `build_base_model` (the embedded default), `run_probes`
"""

from tracetune.agent.parsing import (
    ParsedCall,
    ParsedTurn,
    parse_assistant_output,
    to_openai_message,
)

__all__ = ["ParsedCall", "ParsedTurn", "parse_assistant_output", "to_openai_message"]
