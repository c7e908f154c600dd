"""lm-evaluation-harness adapter: our CausalLM as an lm-eval model registered under the name "hybrid".

Any harness task runs on a checkpoint through it (`launch/evaluate.py --suite lm_eval --tasks ...`). It
mirrors lm-eval's own `hf` model (HFLM) where scores depend on it, so the two agree on an exported model:
tokenisation and context/continuation splitting come from lm-eval's `TemplateLM`; left truncation to
`max_length`, rolling windows (`get_rolling_token_windows` + `make_disjoint_window`), stop sequences and
post-processing are lm-eval's own functions, called the way HFLM calls them.

What differs, and why:
- `generate_until` decodes with `model.step` after a prefill (eval/generation.py), so memory stays constant
  in the generated length for recurrent families. A batch holds prompts of equal token length only:
  left padding, HFLM's way of batching ragged prompts, would feed pad tokens into a recurrent state.
- `read_twice=True` is JRT-Prompt (Arora et al., 2024, "Just read twice"): the context of every request is
  given twice, separated by a blank line, before the continuation / answer, so a fixed-size state sees the
  document again once it knows what will be asked. Use it with the harness' recall tasks `swde`, `fda` and
  `squad_completion` (Based / JRT's information-extraction and QA tasks; their data comes from the Hub).
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    Collator,
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from tqdm import tqdm

from eval.generation import generate_tokens
from eval.passkey import JRT_SEPARATOR


def hf_tokenizer(path: str | Path, eos_token: str | None = None):
    """A transformers fast tokenizer from an exported folder or a tokenizers JSON file (eos named or guessed)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path)
    if path.is_dir():
        return AutoTokenizer.from_pretrained(path)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
    if eos_token is None:  # a trained BPE of data/tokenizer.py has its document separator as first special token
        specials = [t.content for t in tok.backend_tokenizer.get_added_tokens_decoder().values() if t.special]
        eos_token = specials[0] if specials else None
    if eos_token is not None:
        tok.eos_token = eos_token
    return tok


@register_model("hybrid")
class HybridLM(TemplateLM):
    """lm-eval model over a CausalLM. Built from an object (`model=`, `tokenizer=`) or, from the lm-eval CLI,
    from an exported Hugging Face folder (`--model hybrid --model_args pretrained=DIR`)."""

    def __init__(self, model=None, tokenizer=None, pretrained: str | None = None, batch_size: int = 8,
                 max_length: int | None = None, max_gen_toks: int = 256, device: str = "cpu",
                 read_twice: bool = False, prefill_chunk: int | None = None, **_ignored):
        super().__init__()
        if model is None:
            if pretrained is None:
                raise ValueError("HybridLM needs model= (a CausalLM) or pretrained= (an exported HF folder)")
            from models.hf.export import load_hf

            model = load_hf(pretrained)
            tokenizer = tokenizer or pretrained
        if tokenizer is None:
            raise ValueError("HybridLM needs tokenizer= (a transformers tokenizer, a folder or a tokenizer.json)")
        if isinstance(tokenizer, str | Path):
            tokenizer = hf_tokenizer(tokenizer)
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self._device = torch.device(device)
        self.batch_size_per_gpu = int(batch_size)
        self._max_length = int(max_length) if max_length else model.cfg.max_seq_len
        self._max_gen_toks = int(max_gen_toks)
        self.read_twice = str(read_twice).lower() in ("true", "1")
        self.prefill_chunk = int(prefill_chunk) if prefill_chunk else None

    # --- what TemplateLM needs --------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # As HFLM: an empty context is conditioned on BOS, or EOS where the tokenizer has no BOS.
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def device(self):
        return self._device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            kwargs = {"add_special_tokens": False}
        return self.tokenizer.encode(string, **kwargs)

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _twice(self, context: str) -> str:
        return context + JRT_SEPARATOR + context if self.read_twice and context else context

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        if self.read_twice:
            for req in requests:
                req.arguments = (self._twice(req.args[0]), *req.args[1:])
        return super().loglikelihood(requests, disable_tqdm)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Sum of log-probs of each continuation and whether it is the greedy one; batches right-padded
        (harmless for a causal model: padding follows every scored position)."""
        collator = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        results = []
        pbar = tqdm(total=len(requests), disable=disable_tqdm, desc="hybrid loglikelihood")
        for chunk in collator.get_batched(n=self.batch_size_per_gpu):
            # As HFLM: keep the last max_length + 1 tokens, feed all but the last.
            inputs = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in chunk]
            width = max(len(x) for x in inputs)
            batch = torch.zeros(len(inputs), width, dtype=torch.long)
            for i, x in enumerate(inputs):
                batch[i, :len(x)] = torch.tensor(x)
            logprobs = F.log_softmax(self.model(batch.to(self.device)).logits.float(), dim=-1)
            for (request, _, cont), x, lp in zip(chunk, inputs, logprobs):
                cont_lp = lp[len(x) - len(cont):len(x)]  # (len(cont), V)
                target = torch.tensor(cont, device=self.device)
                greedy = bool((cont_lp.argmax(-1) == target).all())
                answer = (cont_lp.gather(1, target[:, None]).sum().item(), greedy)
                results.append(answer)
                if request is not None:
                    self.cache_hook.add_partial("loglikelihood", request, answer)
                pbar.update(1)
        pbar.close()
        return collator.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each string, scored in HFLM's disjoint rolling windows of max_length."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for w in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, *w))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, scores):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def _stop_check(self, until: list[str]):
        """A row is done once its decoded text holds a stop sequence (what HF's stopping criteria test)."""
        stops = [s for s in until if s]
        return (lambda toks: any(s in self.tok_decode(toks) for s in stops)) if stops else None

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        args = [(self._twice(req.args[0]), req.args[1]) for req in requests]
        collator = Collator(args, sort_fn=lambda a: (-len(self.tok_encode(a[0])), a[0]),
                            group_by="gen_kwargs", group_fn=lambda a: a[1])
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        out = []
        pbar = tqdm(total=len(requests), disable=disable_tqdm, desc="hybrid generate_until")
        for chunk in collator.get_batched(n=self.batch_size_per_gpu):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = kwargs.pop("max_gen_toks")
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            max_ctx = self.max_length - max_gen  # HFLM's left truncation of the prompt
            if max_ctx <= 0:
                raise ValueError(f"max_gen_toks={max_gen} must be below max_length={self.max_length}")
            encoded = [self.tok_encode(c)[-max_ctx:] for c in contexts]
            texts = [None] * len(contexts)
            # Sub-batches of equal prompt length: no padding ever enters a recurrent state.
            by_len: dict[int, list[int]] = {}
            for i, ids in enumerate(encoded):
                by_len.setdefault(len(ids), []).append(i)
            for rows in by_len.values():
                prompt = torch.tensor([encoded[i] for i in rows], device=self.device)
                new = generate_tokens(
                    self.model, prompt, max_gen, eos_id=self.eot_token_id, temperature=temperature,
                    is_done=self._stop_check(until),
                    chunk_size=self.prefill_chunk,
                )
                for i, toks in zip(rows, new):
                    texts[i] = postprocess_generated_text(self.tok_decode(toks), until, None)
            for context, text in zip(contexts, texts):
                self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), text)
                out.append(text)
                pbar.update(1)
        pbar.close()
        return collator.get_original(out)


def run_lm_eval(lm: HybridLM, tasks: list[str], *, task_dir: str | None = None, limit: int | float | None = None,
                num_fewshot: int | None = None, log_samples: bool = False, seed: int = 1234) -> dict:
    """lm-eval's `simple_evaluate` on our model; `task_dir` adds local task YAMLs (offline tasks)."""
    import lm_eval
    import lm_eval.models  # noqa: F401  registering "hybrid" first leaves the built-in names unloaded otherwise
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir) if task_dir else None)
    return lm_eval.simple_evaluate(
        model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
        log_samples=log_samples, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed, bootstrap_iters=0,
    )


def task_metrics(results: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from simple_evaluate's output (numbers only; stderr entries dropped)."""
    out = {}
    for task, metrics in results["results"].items():
        out[task] = {k.replace(",none", ""): float(v) for k, v in metrics.items()
                     if isinstance(v, int | float) and not isinstance(v, bool) and "_stderr" not in k}
    return out
