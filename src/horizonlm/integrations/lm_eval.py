"""HorizonLM (or the transformer baseline) as an ``lm-evaluation-harness`` model,
``--model horizonlm`` (extra ``[eval]``).

``lm_eval`` finds no models outside its own package, so its command line is reached through this
module, which registers the model first::

    python -m horizonlm.integrations.lm_eval run --model horizonlm --model_args pretrained=DIR \
        --tasks wikitext lambada_openai --device cuda:0 --batch_size 16

From Python, importing this module is enough: ``lm_eval.simple_evaluate(model="horizonlm", ...)``.
``pretrained`` is a folder from ``horizon export`` or a checkpoint (or run) folder; ``--device``
and ``--batch_size`` are lm_eval's own flags (without CUDA, its default ``cuda:0`` means the CPU).

- ``loglikelihood``: each distinct context is read once, in windows with the state carried; its
  continuations are then scored side by side from copies of that state, right-padded (exact: a
  causal model never sees the padding of a position it scores).
- ``loglikelihood_rolling``: the document is one stream fed in windows of ``window`` tokens with
  the state carried, so a whole book is one context and a window is the only memory bound. It is
  :func:`horizonlm.evaluate.evaluate_tokens`, the code of ``horizon eval``: the first token is
  given, not scored (there is no BOS token), and the totals equal ``horizon eval`` on the same text.
- ``generate_until``: one request at a time, sampled as ``horizon generate`` samples.
An empty context is a newline, as in ``horizon generate``.
"""

from __future__ import annotations

import logging
from typing import Any

import lm_eval.models  # noqa: F401  (registers lm_eval's own models; get_model skips that once any is registered)
import numpy as np
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from torch import Tensor
from tqdm import tqdm

from horizonlm.data.tokenizers import tokenizer_from_spec
from horizonlm.devices import resolve_device
from horizonlm.evaluate import evaluate_tokens
from horizonlm.generate import sample_next
from horizonlm.integrations.export import load_any


def _pick_device(name: str | None) -> torch.device:
    """lm_eval's command line asks for cuda:0 unless told otherwise; without CUDA, take the CPU."""
    if name and name.startswith("cuda") and not torch.cuda.is_available():
        logging.getLogger(__name__).warning("device %s asked for, but CUDA is not available: running on the CPU", name)
        name = "cpu"
    return resolve_device(name or "auto") if name in (None, "auto", "cpu", "cuda") else torch.device(name)


@register_model("horizonlm")
class HorizonEvalLM(LM):
    """``model_args``: ``pretrained`` (required), ``window`` (tokens per call, default 4096),
    ``batch_size`` (continuations scored together), ``device``, ``bf16`` (autocast on CUDA, as
    ``horizon eval``), ``max_gen_toks``, ``seed`` (of sampling)."""

    def __init__(self, pretrained: str, window: int = 4096, batch_size: int | str | None = 16,
                 max_batch_size: int | None = None, device: str | None = "auto", bf16: bool = True,
                 max_gen_toks: int = 256, seed: int = 0) -> None:
        super().__init__()
        ckpt = load_any(pretrained)
        self._device = _pick_device(device)
        self.model = ckpt.model.to(self._device).eval()
        self.tokenizer = tokenizer_from_spec(ckpt.info["tokenizer"])
        self.window = int(window)
        auto = batch_size is None or str(batch_size).startswith("auto")
        self.batch_size = int(max_batch_size or 64) if auto else int(batch_size)
        self.bf16 = bool(bf16)
        self.max_gen_toks = int(max_gen_toks)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.prefix = (self.tokenizer.encode("\n") or [0])[-1:]

    def _autocast(self) -> torch.autocast:
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self._device.type == "cuda" and self.bf16)

    @torch.no_grad()
    def _feed(self, tokens: Tensor, state: Any, keep_all: bool) -> tuple[Tensor, Any]:
        """Windows of ``window`` tokens, the state carried; every position's logits, or the last's."""
        pieces = []
        with self._autocast():
            for start in range(0, tokens.shape[1], self.window):
                logits, state = self.model(tokens[:, start : start + self.window], state)  # (B, W, V)
                pieces.append(logits.float() if keep_all else logits[:, -1:].float())
        logits = torch.cat(pieces, dim=1) if keep_all else pieces[-1]  # (B, L, V) or (B, 1, V)
        return logits, state

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm_eval's convention: trailing spaces of the context go to the continuation, and the
        continuation is what the whole adds to the context (a BPE merge may cross the boundary)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return list(self.prefix), self.tokenizer.encode(continuation)
        whole, ctx = self.tokenizer.encode(context + continuation), self.tokenizer.encode(context)
        return ctx, whole[len(ctx):]

    def _score(self, last: Tensor, state: Any, continuations: list[list[int]]) -> list[tuple[float, bool]]:
        """Log-probability and greediness of each continuation after one context's state."""
        k, n = len(continuations), max(len(c) for c in continuations)
        padded = torch.tensor([c + [0] * (n - len(c)) for c in continuations], device=self._device)  # (k, n)
        logits = last.expand(k, 1, last.shape[-1])  # (k, 1, V)
        if n > 1:
            rest, _ = self._feed(padded[:, :-1], state.expand(k) if k > 1 else state, keep_all=True)  # (k, n-1, V)
            logits = torch.cat([logits, rest], dim=1)  # (k, n, V)
        picked = logits.log_softmax(dim=-1).gather(-1, padded.unsqueeze(-1)).squeeze(-1)  # (k, n)
        greedy = logits.argmax(dim=-1) == padded  # (k, n)
        return [(float(picked[i, : len(c)].sum()), bool(greedy[i, : len(c)].all()))
                for i, c in enumerate(continuations)]

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*req.args) for req in requests]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, _) in enumerate(pairs):
            groups.setdefault(tuple(ctx), []).append(i)
        results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
        for ctx, members in tqdm(groups.items(), disable=disable_tqdm, desc="loglikelihood"):
            last, state = self._feed(torch.tensor([ctx], device=self._device), None, keep_all=False)  # (1, 1, V)
            members = [i for i in members if pairs[i][1]]  # an empty continuation has log-probability 0
            for start in range(0, len(members), self.batch_size):
                batch = members[start : start + self.batch_size]
                for i, result in zip(batch, self._score(last, state, [pairs[i][1] for i in batch])):
                    results[i] = result
        for req, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", req.args, result)
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        results = []
        for req in tqdm(requests, disable=disable_tqdm, desc="loglikelihood_rolling"):
            (text,) = req.args
            ids = np.asarray(self.tokenizer.encode(text), dtype=np.int64)
            total = 0.0 if len(ids) < 2 else evaluate_tokens(self.model, ids, self.window, self._device,
                                                             bf16=self.bf16, progress=False)["total_nats"]
            results.append(-total)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, -total)
        return results

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        results = []
        for req in tqdm(requests, disable=disable_tqdm, desc="generate_until"):
            context, gen_kwargs = req.args
            kwargs = dict(gen_kwargs or {})
            until = kwargs.get("until") or []
            until = [s for s in ([until] if isinstance(until, str) else until) if s]
            temperature = float(kwargs.get("temperature", 0.0))
            if not kwargs.get("do_sample", temperature > 0):
                temperature = 0.0
            ids = self.tokenizer.encode(context) or list(self.prefix)
            logits, state = self._feed(torch.tensor([ids], device=self._device), None, keep_all=False)  # (1, 1, V)
            out: list[int] = []
            text = ""
            for _ in range(int(kwargs.get("max_gen_toks", self.max_gen_toks))):
                token = sample_next(logits[:, -1], temperature, int(kwargs.get("top_k", 0)),
                                    float(kwargs.get("top_p", 1.0)), self.generator)  # (1,)
                out.append(int(token))
                text = self.tokenizer.decode(out)
                if any(s in text for s in until):
                    break
                logits, state = self._feed(token.view(1, 1), state, keep_all=False)  # (1, 1, V)
            for stop in until:
                text = text.split(stop)[0]
            results.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return results


def main() -> None:
    """``lm_eval``'s own command line, with ``--model horizonlm`` registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
