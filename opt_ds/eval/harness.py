"""lm-evaluation-harness's model interface (`TemplateLM`) on an opt_ds pipeline engine.

The harness keeps its tasks, prompts, few-shot sampling and metrics; this class only turns its requests
into token ids and scores them on the engine. It tokenizes as the harness's own Hugging Face model class
(`--model hf`) does on an `opt-ds convert --to hf` export of the same checkpoint: OPT's BOS (</s>) is
prepended to every context, an empty context becomes BOS alone, and inputs longer than `max_length` lose
tokens on the left. So both give the same log-likelihoods and accuracies.

Every rank runs the same harness loop (the harness sees one process: rank 0 of a world of 1), so every
rank issues the same requests, and the collective scoring happens inside the calls below.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch.distributed as dist
from lm_eval import utils as harness_utils
from lm_eval.api.model import TemplateLM

from opt_ds.eval.scoring import PipelineScorer
from opt_ds.train.generate import generate



class OptDsLM(TemplateLM):
    def __init__(self, engine, tokenizer, *, max_length: int, micro_batch: int, max_gen_toks: int = 256,
                 progress: Optional[Callable[[str], None]] = None):
        super().__init__()
        self.engine = engine
        self.tokenizer = tokenizer
        self._max_length = max_length
        self.micro_batch = micro_batch
        self.max_gen_toks = max_gen_toks
        self.bos_text = tokenizer.decode([tokenizer.bos_id], skip_special_tokens=False)
        self.scorer = PipelineScorer(engine, micro_batch=micro_batch, max_length=max_length, progress=progress)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(next(iter(self.tokenizer.files.values())).parent)

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, left_truncate_len=None,
                   **kwargs) -> list[int]:
        add_bos = add_special_tokens is not False and not (add_special_tokens is None and string.startswith(self.bos_text))
        ids = self.tokenizer.encode(string, add_bos=add_bos)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids, skip_special_tokens: bool = True, **kwargs) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        scored = self.scorer.score(
            [((context + continuation)[-(self.max_length + 1):], len(continuation))
             for _, context, continuation in requests], what="log-likelihoods")
        for (key, _, _), result in zip(requests, scored):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return scored

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            for context, continuation in map(harness_utils.make_disjoint_window, harness_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[index] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut at the first stop string (`until`) or eos, as `--model hf` does."""
        answers = []
        for request in requests:
            context, gen_kwargs = request.args
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            until.append(self.tok_decode([self.eot_token_id], skip_special_tokens=False))
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            prompt = self.tok_encode(context, left_truncate_len=self.max_length - max_new)

            def stop(tokens: list, start=len(prompt)) -> bool:
                text = self.tok_decode(tokens[start:])
                return any(s and s in text for s in until)

            self.engine.reset_activation_shape()
            tokens = generate(self.engine, prompt, max_new_tokens=max_new, micro_batch=self.micro_batch, top_p=0.0,
                              seq_length=min(self.max_length, len(prompt) + max_new), should_stop=stop)
            self.engine.reset_activation_shape()
            text = self.tok_decode(tokens[len(prompt):])
            for s in until:
                if s:
                    text = text.split(s)[0]
            answers.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return answers

    def get_model_info(self) -> dict:
        return {"model": "opt_ds", "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                "max_length": self.max_length, "micro_batch": self.micro_batch}
