"""A request's prompt as token ids, the same for every engine (no Ray).

Chat messages are rendered with raychat's own template (the exact OpenChat / C-RLFT tokens
training used, with the request's ``condition``), never an engine's chat template; text prompts
are tokenized, token-id prompts checked against the vocabulary; every prompt is checked against
the context. User errors are :class:`PromptError` s carrying the OpenAI error body.
"""

from __future__ import annotations

from raychat.core.data.templates import ChatTemplate
from raychat.core.data.tokenizer import ConversationTokenizer
from raychat.serve.engine_protocol import EngineRequest
from raychat.serve.errors import error_body


class PromptError(ValueError):
    """A user error found while preparing a prompt; carries the OpenAI error body."""

    def __init__(self, body: dict):
        super().__init__(body["error"]["message"])
        self.body = body


class PromptEncoder:
    """Builds and checks prompts for one model.

    Args:
        tokenizer: the checkpoint's Hugging Face tokenizer.
        template: the chat template.
        default_condition: the condition of chat requests that name none.
        max_context: prompt plus completion tokens the model takes.
        vocab_size: token ids must be below this.
    """

    def __init__(
        self, tokenizer, template: ChatTemplate, default_condition: str | None, max_context: int, vocab_size: int
    ):
        self.tokenizer, self.template, self.condition = tokenizer, template, default_condition
        self.max_context, self.vocab_size = max_context, vocab_size
        self.ct = ConversationTokenizer(tokenizer, template, max_context)

    @classmethod
    def for_model(cls, tokenizer, model_config, cfg) -> PromptEncoder:
        """The encoder of a served checkpoint: ``cfg`` is its ServeConfig (template, condition, max_context)."""
        from raychat.core.data.templates import get_template

        max_context = cfg.max_context or int(getattr(model_config, "max_position_embeddings", 2048))
        return cls(
            tokenizer, get_template(cfg.template), cfg.default_condition, max_context, int(model_config.vocab_size)
        )

    @property
    def stop_ids(self) -> list[int]:
        """Tokens that end a completion: the template's end of turn, and the tokenizer's end of sequence."""
        eos = self.tokenizer.eos_token_id
        return [self.ct.eot_id] + ([eos] if eos is not None and eos != self.ct.eot_id else [])

    def encode(self, req: EngineRequest) -> list[int]:
        """The prompt's token ids (chat template for messages).

        Raises:
            PromptError: for token ids outside the vocabulary or a prompt that does not fit the context.
        """
        if req.messages is not None:
            condition = req.condition if req.condition is not None else self.condition
            prompt = self.ct.encode_prompt(req.messages, condition=condition, system=req.system)
            param = "messages"
        elif isinstance(req.prompt, str):
            prompt = self.tokenizer(req.prompt, add_special_tokens=self.template.add_bos)["input_ids"]
            param = "prompt"
        else:
            prompt, param = list(req.prompt or []), "prompt"
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad or not prompt:
                raise PromptError(
                    error_body(
                        f"prompt: token ids must be in [0, {self.vocab_size}); got {bad[:5] or 'none'}", param="prompt"
                    )
                )
        room = self.max_context - len(prompt)
        if room <= 0 or (req.max_tokens is not None and req.max_tokens > room):
            asked = f" + {req.max_tokens} completion tokens" if req.max_tokens is not None else ""
            raise PromptError(
                error_body(
                    f"This model's maximum context length is {self.max_context} tokens; the request has {len(prompt)} "
                    f"prompt tokens{asked}. Shorten the {param} or lower max_tokens.",
                    param=param,
                    code="context_length_exceeded",
                )
            )
        return prompt

    def max_tokens(self, req: EngineRequest, prompt_len: int, default: int) -> int:
        """The request's completion budget: its own ``max_tokens``, else ``default`` within the context."""
        return req.max_tokens or min(default, self.max_context - prompt_len)


def unsupported(req: EngineRequest, engine: str) -> None:
    """Refuses, naming the parameter, what an engine without logprobs or structured output was asked for.

    Raises:
        PromptError: for ``logprobs``, ``echo`` or ``response_format``.
    """
    for name, value in (("logprobs", req.logprobs), ("echo", req.echo), ("response_format", req.response_format)):
        if value is not None and value is not False:  # logprobs=0 (the token's own logprob) is a request too
            raise PromptError(
                error_body(f"{name} is not supported by the {engine} engine (serve with engine: vllm)", param=name)
            )
