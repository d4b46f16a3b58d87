"""Turning verified tokens into a request's output: appending them up to a finishing one (EOS,
stop token, stop string, length), detokenising, text deltas that always concatenate to the
final text, and the emitted tokens' log-probabilities."""
import torch
from tokenizers.decoders import DecodeStream

from minedraft.sequence import RequestOutput, Sequence


class IncrementalDetokenizer:
    """A request's output text as tokens arrive: tokenizers' streaming decoder takes each token
    once, where decoding the whole output again at every step costs time quadratic in its length.
    Its text is always a prefix of the whole output's decoding (it holds back a character whose
    bytes have not all arrived; tests/test_output.py checks it on the shipped tokenizers)."""

    def __init__(self, tokenizer, skip_special_tokens: bool):
        self.backend = tokenizer.backend_tokenizer
        self.stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self.text = ""
        self.num_tokens = 0

    def update(self, output_ids: list[int]) -> str:
        for token in output_ids[self.num_tokens:]:
            self.text += self.stream.step(self.backend, token) or ""
        self.num_tokens = len(output_ids)
        return self.text


class OutputBuilder:
    def __init__(self, tokenizer, eos_token_ids: tuple[int, ...], max_model_len: int):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len

    def append(self, seq: Sequence, new_tokens: list[int]) -> list[int]:
        """Append verified tokens until one finishes the request; returns those kept."""
        params = seq.params
        for kept, token in enumerate(new_tokens, 1):
            seq.token_ids.append(token)
            if token in self.eos_token_ids and not params.ignore_eos:
                seq.finish_reason = "eos"
            elif token in params.stop_token_ids and seq.num_generated >= params.min_tokens:
                seq.finish_reason = "stop"
                seq.text = self.decode(seq, seq.output_ids[:-1])  # the stop token's own text is left out
            elif params.stop and seq.num_generated >= params.min_tokens and self._cut_at_stop(seq):
                seq.finish_reason = "stop"
            elif seq.num_generated >= params.max_tokens or len(seq.token_ids) >= self.max_model_len:
                seq.finish_reason = "length"
            if seq.is_finished:
                return new_tokens[:kept]
        return new_tokens

    def output(self, seq: Sequence, new_tokens: list[int], error: str | None = None,
               logprobs: list[dict] | None = None) -> RequestOutput:
        cumulative = seq.cumulative_logprob if seq.params.logprobs is not None else None
        return RequestOutput(request_id=seq.request_id, new_token_ids=new_tokens, text_delta=self._text_delta(seq),
                             finished=seq.is_finished, finish_reason=seq.finish_reason,
                             num_input_tokens=seq.num_prompt_tokens, num_output_tokens=seq.num_generated,
                             num_drafted_tokens=seq.num_drafted_tokens, num_accepted_tokens=seq.num_accepted_tokens,
                             error=error, logprobs=logprobs, cumulative_logprob=cumulative)

    def logprobs(self, seq: Sequence, logits: torch.Tensor, new_tokens: list[int]) -> list[dict] | None:
        """Log-probabilities of the emitted tokens under the target alone (raw logits, before
        temperature and filtering, as vLLM reports them), with the top `logprobs` alternatives.
        `logits[i]` is the verification's output just before new token i: exact under speculation,
        since each emitted token's logits come from a pass that saw exactly the tokens before it."""
        if seq.params.logprobs is None:
            return None
        entries = []
        for position, token in enumerate(new_tokens):
            logprobs = logits[position].log_softmax(-1)
            chosen = float(logprobs[token])
            seq.cumulative_logprob += chosen
            entry = {token: {"logprob": chosen, "rank": int((logprobs > logprobs[token]).sum()) + 1,
                             "decoded_token": self.tokenizer.decode([token])}}
            if seq.params.logprobs:
                values, others = logprobs.topk(seq.params.logprobs)
                for rank, (value, other) in enumerate(zip(values.tolist(), others.tolist()), 1):
                    entry.setdefault(other, {"logprob": value, "rank": rank,
                                             "decoded_token": self.tokenizer.decode([other])})
            entries.append(entry)
        return entries

    def decode(self, seq: Sequence, ids: list[int] | None = None) -> str:
        return self.tokenizer.decode(seq.output_ids if ids is None else ids,
                                     skip_special_tokens=seq.params.skip_special_tokens)

    def _streamed_text(self, seq: Sequence) -> str:
        """The output's text so far, decoded incrementally where the tokenizer is a fast one."""
        if not getattr(self.tokenizer, "is_fast", False):
            return self.decode(seq)
        if seq.detokenizer is None:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, seq.params.skip_special_tokens)
        return seq.detokenizer.update(seq.output_ids)

    def _cut_at_stop(self, seq: Sequence) -> bool:
        text = self._streamed_text(seq)
        hits = [i for i in (text.find(s, max(0, seq.num_text_sent - len(s))) for s in seq.params.stop) if i >= 0]
        if hits:
            first = min(hits)
            kept = first + len(next(s for s in seq.params.stop if text.startswith(s, first))) \
                if seq.params.include_stop_str_in_output else first
            seq.text = text[:kept]
        return bool(hits)

    def _text_delta(self, seq: Sequence) -> str:
        """New text since the last output. Held back while it ends in an incomplete UTF-8
        character, or could still grow into a stop string, so the deltas always concatenate
        to the final text."""
        if not seq.is_finished:
            seq.text = self._streamed_text(seq)
        elif seq.finish_reason != "stop":
            seq.text = self.decode(seq)  # once: with any trailing bytes the stream still holds
        ready = len(seq.text)
        if not seq.is_finished:
            ready = len(seq.text.rstrip("\ufffd"))
            if seq.params.stop:
                ready = min(ready, len(seq.text) - max(len(s) for s in seq.params.stop) + 1)
        delta = seq.text[seq.num_text_sent:max(ready, seq.num_text_sent)]
        seq.num_text_sent += len(delta)
        return delta
