"""Completion generators for the infilling benchmarks: anything that, given a prefix and a suffix,
samples middles.

A generator builds the FIM prompt its model was trained on, in one of the two orders of Bavarian et
al. (2022):

    PSM: <fim_prefix> prefix <fim_suffix> suffix <fim_middle>   -> middle <|endoftext|>
    SPM: <fim_prefix> <fim_suffix> suffix <fim_middle> prefix   -> middle <|endoftext|>

samples with nucleus sampling, stops at end-of-text, and returns the middle as text. torch and
transformers are imported only when a model is loaded, so scoring a samples file needs neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

FIM_MODES = ("psm", "spm")


class CompletionGenerator(Protocol):
    """What the benchmark needs from a model: ``n`` middles for one (prefix, suffix)."""

    def generate(self, prefix: str, suffix: str, n: int, temperature: float, top_p: float,
                 max_new_tokens: int, mode: str) -> list[str]:
        ...


@dataclass(frozen=True)
class FimTokens:
    """Names of the special tokens in the model's vocabulary (StarCoder-style defaults, which
    megafim's Hugging Face export uses too)."""

    prefix: str = "<fim_prefix>"
    suffix: str = "<fim_suffix>"
    middle: str = "<fim_middle>"
    eot: str = "<|endoftext|>"


def check_sampling_args(n: int, temperature: float, top_p: float, max_new_tokens: int,
                        mode: str) -> None:
    """Shared validation so that every generator rejects the same bad input the same way."""
    if n < 1:
        raise ValueError(f"n (samples per task) must be >= 1, got {n}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if mode not in FIM_MODES:
        raise ValueError(f"mode must be one of {FIM_MODES}, got {mode!r}")


def truncate_at_stop(ids: Sequence[int], stop_ids: set[int]) -> list[int]:
    """The generated ids before the first stop token (all of them if none was produced)."""
    out = []
    for token in ids:
        if token in stop_ids:
            break
        out.append(int(token))
    return out


class HFCompletionGenerator:
    """A Hugging Face causal LM directory (``AutoModelForCausalLM`` + ``AutoTokenizer``) whose
    tokenizer has the FIM sentinels and end-of-text as tokens, e.g. a megafim model exported with
    megafim.convert or a public FIM model such as StarCoder or SantaCoder."""

    def __init__(self, model_dir: str, device: str | None = None, dtype: str = "auto",
                 batch_size: int = 16, tokens: FimTokens = FimTokens()):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        ids = {name: self._special_id(model_dir, getattr(tokens, name))
               for name in ("prefix", "suffix", "middle", "eot")}
        self.pre, self.suf, self.mid, self.eot = (ids[k] for k in ("prefix", "suffix", "middle",
                                                                    "eot"))
        # A sentinel can never be part of a middle: a model that emits one has ended the middle.
        self.stop_ids = {self.eot, self.pre, self.suf, self.mid}
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=_torch_dtype(dtype,
                                                                                       self.device))
        self.model.to(self.device).eval()

    def _special_id(self, model_dir: str, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id or \
                self.tokenizer.convert_ids_to_tokens(token_id) != token:
            raise ValueError(f"{model_dir}: the tokenizer has no token {token!r}; a FIM model "
                             f"needs {FimTokens()} as tokens (pass FimTokens(...) for other names)")
        return int(token_id)

    def prompt_ids(self, prefix: str, suffix: str, mode: str) -> list[int]:
        """The exact prompt the model sees (no BOS: megafim separates documents by EOT only)."""
        encode = lambda text: self.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
        from megafim.inference.infill import fim_prompt_ids  # torch: only once a model is loaded

        return fim_prompt_ids(encode(prefix), encode(suffix), self.pre, self.suf, self.mid, mode)

    def generate(self, prefix: str, suffix: str, n: int, temperature: float = 0.2,
                 top_p: float = 0.95, max_new_tokens: int = 256, mode: str = "psm") -> list[str]:
        import torch
        from transformers import GenerationConfig

        check_sampling_args(n, temperature, top_p, max_new_tokens, mode)
        prompt = torch.tensor([self.prompt_ids(prefix, suffix, mode)], device=self.device)
        greedy = temperature == 0
        middles: list[str] = []
        while len(middles) < n:
            count = 1 if greedy else min(self.batch_size, n - len(middles))
            # Every field set explicitly: unset ones would be filled from the model's own
            # defaults (top_k = 50, repetition penalties, ...), which is not nucleus sampling.
            config = GenerationConfig(
                do_sample=not greedy, temperature=None if greedy else temperature,
                top_p=None if greedy else top_p, top_k=None if greedy else 0, num_beams=1,
                repetition_penalty=1.0, max_new_tokens=max_new_tokens, min_new_tokens=0,
                eos_token_id=sorted(self.stop_ids), pad_token_id=self.eot,
                num_return_sequences=count,
            )
            with torch.no_grad():
                out = self.model.generate(
                    input_ids=prompt, attention_mask=torch.ones_like(prompt),
                    generation_config=config,
                )  # (count, prompt_len + generated_len), padded with EOT after a stop
            for row in out[:, prompt.shape[1]:].tolist():
                middle_ids = truncate_at_stop(row, self.stop_ids)
                middles.append(self.tokenizer.decode(middle_ids, skip_special_tokens=False,
                                                     clean_up_tokenization_spaces=False))
            if greedy:  # every greedy sample is the same
                middles = middles * n
        return middles[:n]


def _torch_dtype(name: str, device):
    import torch

    if name == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(table)}, got {name!r}")
    return table[name]


class MegafimCompletionGenerator:
    """Middles from a megafim checkpoint (or an exported Hugging Face directory) through
    ``megafim.inference``: KV-cache decoding, stopped at end-of-text."""

    def __init__(self, load_dir: str, device: str | None = None, tokenizer_model: str | None = None,
                 seed: int = 0) -> None:
        import torch

        from megafim.inference.loading import load_model

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        loaded = load_model(load_dir, device=device)
        self.model, self.tokenizer, self.seed = loaded.model, loaded.load_tokenizer(tokenizer_model), seed

    def generate(self, prefix: str, suffix: str, n: int, temperature: float = 0.2, top_p: float = 0.95,
                 max_new_tokens: int = 256, mode: str = "psm") -> list[str]:
        from megafim.inference.infill import infill
        from megafim.inference.sampling import SamplingConfig

        check_sampling_args(n, temperature, top_p, max_new_tokens, mode)
        sampling = SamplingConfig(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                  seed=self.seed)
        self.seed += 1  # a new draw for every task, reproducible from --seed
        return infill(self.model, self.tokenizer, prefix, suffix, mode=mode, sampling=sampling, num_samples=n)
