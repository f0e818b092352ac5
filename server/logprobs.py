"""Engine logprobs -> the two OpenAI shapes: legacy completions lists and chat `content` entries.

Owns how a token id is shown (its text, with the leading space kept, as OpenAI and vLLM do; or
`token_id:N` for a model without a tokenizer), the `text_offset` bookkeeping across stream chunks,
and the rule that a completions `top_logprobs` dict holds the chosen token plus the top k.
"""

from __future__ import annotations

from pydantic import BaseModel

from megalodon_infer.sample.logprobs import TokenLogprob
from megalodon_infer.tokenization.tokenizer import Tokenizer
from server.protocol import ChatCompletionLogProb, ChatCompletionLogProbsContent, CompletionLogProbs


def tokens_as_ids(body: BaseModel) -> bool:
    """vLLM's `return_tokens_as_token_ids` extension (an extra field: the wire types keep it)."""
    return bool((body.model_extra or {}).get("return_tokens_as_token_ids"))


class TokenFormatter:
    """Token ids as the strings and bytes that logprobs report. `as_ids` (vLLM's
    `return_tokens_as_token_ids`) shows every token as `token_id:N`, which a client can map back
    to the exact ids."""

    def __init__(self, tokenizer: Tokenizer | None, *, as_ids: bool = False) -> None:
        self.tokenizer = tokenizer
        self.as_ids = as_ids

    def text(self, token_id: int) -> str:
        if self.as_ids or self.tokenizer is None or not 0 <= token_id < self.tokenizer.vocab_size:
            return f"token_id:{token_id}"
        return self.tokenizer.token_text(token_id)

    def bytes(self, token_id: int) -> list[int] | None:
        if self.tokenizer is None or not 0 <= token_id < self.tokenizer.vocab_size:
            return None
        return list(self.tokenizer.token_bytes(token_id))

    def chat(self, logprobs: list[TokenLogprob] | None, top_n: int) -> list[ChatCompletionLogProbsContent]:
        """Chat `logprobs.content` entries: the chosen token and `top_n` alternatives each."""
        return [
            ChatCompletionLogProbsContent(
                token=self.text(lp.token_id),
                logprob=lp.logprob,
                bytes=self.bytes(lp.token_id),
                top_logprobs=[
                    ChatCompletionLogProb(token=self.text(tid), logprob=value, bytes=self.bytes(tid))
                    for tid, value in lp.top[:top_n]
                ],
            )
            for lp in logprobs or []
        ]


class CompletionLogprobsBuilder:
    """Legacy completions logprobs of one choice, built chunk by chunk.

    `text_offset` counts characters of the token strings from the start of the choice (the echoed
    prompt included), so the lists of consecutive chunks concatenate into the whole choice's.
    """

    def __init__(self, formatter: TokenFormatter) -> None:
        self.formatter = formatter
        self.offset = 0

    def build(self, entries: list[TokenLogprob]) -> CompletionLogProbs:
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        text_offset: list[int] = []
        top_logprobs: list[dict[str, float] | None] = []
        for entry in entries:
            token = self.formatter.text(entry.token_id)
            tokens.append(token)
            token_logprobs.append(entry.logprob)
            text_offset.append(self.offset)
            self.offset += len(token)
            if entry.logprob is None:
                top_logprobs.append(None)
                continue
            top = {token: entry.logprob}
            for token_id, value in entry.top or []:
                top.setdefault(self.formatter.text(token_id), value)
            top_logprobs.append(top)
        # Built through the constructor so the wire type clamps -inf to its floor.
        return CompletionLogProbs(tokens=tokens, token_logprobs=token_logprobs, text_offset=text_offset,
                                  top_logprobs=top_logprobs)
