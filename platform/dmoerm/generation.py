"""Batched generation of N candidate responses per prompt (best-of-N studies): vLLM on GPUs, transformers
``generate`` as the fallback (CPU, or CUDA without vLLM).

    cfg = GenerationConfig(model="Qwen/Qwen2.5-0.5B-Instruct", num_candidates=16, temperature=1.0, seed=0)
    candidates = generate_candidates(prompts, cfg)          # one list of 16 strings per prompt

A prompt is a string (sent as is) or a conversation (a list of :class:`~dmoerm.data.records.Turn`, rendered
with the tokenizer's chat template plus the assistant's generation prompt). Both backends receive the same
token ids, so a prompt means the same thing to each.

Sampling is seeded per prompt, not per batch: the candidates of a prompt depend on ``seed``, the prompt and
the candidate's index only, never on which prompts share its batch, the batch size, or the Ray worker that
ran it (vLLM: one ``SamplingParams(seed=...)`` per request; transformers: a per-row generator, see
:class:`_SeededSampler`). Sampling is plain temperature + nucleus (``top_p``) over the whole vocabulary,
with no top-k, on both backends. ``temperature=0`` is greedy decoding: all N candidates are then the same.

vLLM is imported lazily (it has no CPU build and lives in the ``gpu`` extra). Nothing in this project has
run the vLLM path: no machine we have holds vLLM. :class:`VLLMGenerator` is a thin mapping onto vLLM's
public offline API, tested against a stand-in module that records its arguments.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from dmoerm.data.records import Turn

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

Prompt = str | Sequence[Turn]
Backend = Literal["auto", "vllm", "transformers"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
VLLM_MISSING = ("GenerationConfig.backend is 'vllm' but vllm is not installed: install the gpu extra "
                "(pip install 'dmoerm[gpu]', Linux with CUDA only), or use backend: auto or transformers")


@dataclass
class GenerationConfig:
    """What to generate with and how to sample. ``temperature``, ``top_p``, ``max_new_tokens`` and ``seed``
    mean the same on both backends."""

    model: str
    """A Hugging Face causal LM: hub id or local folder (e.g. ``Qwen/Qwen2.5-0.5B-Instruct``)."""
    num_candidates: int = 4
    """N: candidates generated per prompt."""
    max_new_tokens: int = 256
    """Most tokens per candidate (a candidate ends earlier at the model's end-of-sequence token)."""
    temperature: float = 1.0
    """Sampling temperature; 0 = greedy decoding (then all N candidates are identical)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches ``top_p``; 1 = all."""
    seed: int = 0
    """Seeds every prompt's sampling (with the prompt's text): same seed, same prompt -> same candidates."""
    batch_size: int = 8
    """Transformers: prompts per ``generate`` call (a call holds ``batch_size * num_candidates`` sequences).
    vLLM schedules its own batches and gets every prompt of a worker in one call."""
    backend: Backend = "auto"
    """``auto``: vLLM when it is importable and CUDA is available, else transformers."""
    dtype: DType = "auto"
    """Weights' dtype; ``auto``: bfloat16 on CUDA, float32 on CPU (vLLM: the checkpoint's own)."""
    device: str | None = None
    """Transformers backend: ``cuda``, ``cuda:1``, ``cpu``...; ``None``: ``cuda`` when present, else ``cpu``."""
    chat_template: str | None = None
    """A Jinja chat template replacing the tokenizer's own (for conversation prompts)."""
    vllm_engine_kwargs: dict[str, Any] = field(default_factory=dict)
    """More arguments for ``vllm.LLM`` (e.g. ``tensor_parallel_size``, ``gpu_memory_utilization``,
    ``max_model_len``); ignored by transformers."""

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError("GenerationConfig.model must name a causal LM (a hub id or a local folder)")
        for name in ("num_candidates", "max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GenerationConfig.{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"GenerationConfig.seed must be an integer, got {self.seed!r}")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"GenerationConfig.temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"GenerationConfig.top_p must be in (0, 1], got {self.top_p!r}")
        if self.backend not in ("auto", "vllm", "transformers"):
            raise ValueError(f"GenerationConfig.backend must be auto, vllm or transformers, got {self.backend!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"GenerationConfig.dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if not isinstance(self.vllm_engine_kwargs, dict):
            raise ValueError("GenerationConfig.vllm_engine_kwargs must be a mapping of vllm.LLM arguments")


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_backend(cfg: GenerationConfig) -> Literal["vllm", "transformers"]:
    """``cfg.backend`` with ``auto`` decided here (vLLM needs CUDA); a clear error if vLLM is asked for but
    missing."""
    if cfg.backend == "transformers":
        return "transformers"
    has_vllm = vllm_available()
    if cfg.backend == "vllm":
        if not has_vllm:
            raise ImportError(VLLM_MISSING)
        return "vllm"
    import torch

    return "vllm" if has_vllm and torch.cuda.is_available() else "transformers"


# ---------------------------------------------------------------------------------- prompts and batches


def load_tokenizer(cfg: GenerationConfig) -> Any:
    from transformers import AutoTokenizer

    from dmoerm.modeling.backbone import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model))
    if cfg.chat_template is not None:
        tokenizer.chat_template = cfg.chat_template
    return tokenizer


def encode_prompts(prompts: Sequence[Prompt], tokenizer: Any) -> list[list[int]]:
    """Token ids of each prompt: a string with the tokenizer's special tokens, a conversation through the
    chat template (which holds its own special tokens, so none are added: what vLLM's ``LLM.chat`` does)."""
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            out.append(tokenizer(p, add_special_tokens=True)["input_ids"])
            continue
        if not p or not all(isinstance(t, Turn) for t in p):
            raise ValueError(f"prompt {i}: a prompt is a string or a non-empty list of Turn, got {p!r:.80}")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"prompt {i} is a conversation but the tokenizer of this model has no chat template: "
                             "set GenerationConfig.chat_template or pass prompt strings")
        text = tokenizer.apply_chat_template([{"role": t.role, "content": t.content} for t in p], tokenize=False,
                                             add_generation_prompt=True)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def plan_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Prompt indices, longest first (ties in input order), cut into batches of ``batch_size``: prompts of
    similar length share a batch, so little compute goes to padding, and the largest batch runs first."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]


def prompt_seed(seed: int, token_ids: Sequence[int], candidate: int | None = None) -> int:
    """A 63-bit seed from the run's seed, a prompt's token ids and (transformers) a candidate's index."""
    blob = json.dumps([seed, list(token_ids), candidate]).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big") >> 1


class Generator(Protocol):
    cfg: GenerationConfig
    tokenizer: Any
    backend: str
    prompts_per_call: int | None
    """Prompts per :meth:`generate_batch` call; ``None``: any number (the engine batches)."""

    def generate_batch(self, token_ids: Sequence[Sequence[int]]) -> list[list[str]]:
        """``num_candidates`` texts for each prompt, in one engine call."""
        ...


def generate_candidates(prompts: Sequence[Prompt], cfg: GenerationConfig, *, generator: Generator | None = None,
                        progress: bool = True) -> list[list[str]]:
    """``cfg.num_candidates`` responses for every prompt, in prompt order; ``generator`` reuses a loaded
    one (:func:`build_generator`)."""
    from tqdm.auto import tqdm

    gen = generator or build_generator(cfg)
    ids = encode_prompts(prompts, gen.tokenizer)
    batches = plan_batches([len(x) for x in ids], gen.prompts_per_call or max(1, len(ids)))
    out: list[list[str] | None] = [None] * len(ids)
    for batch in tqdm(batches, desc=f"generate ({gen.backend})", unit="batch", disable=not progress or not batches):
        for i, texts in zip(batch, gen.generate_batch([ids[i] for i in batch])):
            out[i] = texts
    missing = [i for i, texts in enumerate(out) if texts is None]
    if missing:  # a planning bug, never a silent drop
        raise RuntimeError(f"no candidates were generated for prompts {missing[:10]}")
    return out  # type: ignore[return-value]


def build_generator(cfg: GenerationConfig) -> Generator:
    return VLLMGenerator(cfg) if resolve_backend(cfg) == "vllm" else TransformersGenerator(cfg)


# ---------------------------------------------------------------------------------- transformers


class _SeededSampler:
    """A logits processor that samples every row with its own ``torch.Generator`` and leaves only the
    sampled token finite, so ``generate``'s greedy step takes it. Transformers' own sampling draws from one
    global generator for the whole batch, which would tie a prompt's candidates to its batch-mates."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float) -> None:
        import torch

        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        import torch

        probs = torch.softmax(scores.float() / self.temperature, dim=-1)  # (R, V)
        if self.top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            sorted_p[(sorted_p.cumsum(-1) - sorted_p) >= self.top_p] = 0.0  # drop tokens past the nucleus
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        cdf = probs.cumsum(-1)  # (R, V)
        u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in self.generators])
        u = (u.to(cdf.device, cdf.dtype) * cdf[:, -1]).unsqueeze(-1)  # (R, 1): one draw per row, on the CPU
        token = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)  # first token whose cdf > u
        return torch.full_like(scores, float("-inf")).scatter_(-1, token, 0.0)


def _device_and_dtype(cfg: GenerationConfig) -> tuple[str, torch.dtype]:
    import torch

    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.dtype == "auto":
        return device, torch.bfloat16 if device.startswith("cuda") else torch.float32
    return device, getattr(torch, cfg.dtype)


class TransformersGenerator:
    """``AutoModelForCausalLM.generate`` over left-padded batches (decoder-only models)."""

    backend = "transformers"

    def __init__(self, cfg: GenerationConfig) -> None:
        from transformers import AutoModelForCausalLM

        from dmoerm.modeling.backbone import resolve_model_path

        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg)
        self.device, dtype = _device_and_dtype(cfg)
        self.model = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.model), dtype=dtype)
        self.model.to(self.device).eval()
        self.prompts_per_call = cfg.batch_size
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        if pad is None:
            raise ValueError(f"the tokenizer of {cfg.model} has neither a pad nor an eos token: cannot pad a batch")
        self.pad_token_id = pad
        if cfg.temperature == 0 and cfg.num_candidates > 1:
            logger.warning("temperature 0 is greedy decoding: the %d candidates of a prompt will be identical",
                           cfg.num_candidates)

    def generate_batch(self, token_ids: Sequence[Sequence[int]]) -> list[list[str]]:
        import copy

        import torch
        from transformers import LogitsProcessorList

        cfg, n = self.cfg, self.cfg.num_candidates
        greedy = cfg.temperature == 0
        rows = 1 if greedy else n  # greedy: one row per prompt, repeated N times below
        width = max(len(x) for x in token_ids)
        ids = torch.full((len(token_ids), width), self.pad_token_id, dtype=torch.long)  # (B, T), left padded
        mask = torch.zeros_like(ids)
        for r, x in enumerate(token_ids):
            ids[r, width - len(x):] = torch.tensor(list(x), dtype=torch.long)
            mask[r, width - len(x):] = 1
        ids, mask = ids.repeat_interleave(rows, 0), mask.repeat_interleave(rows, 0)  # (B*rows, T)
        gen_cfg = copy.deepcopy(self.model.generation_config)
        gen_cfg.update(do_sample=False, num_beams=1, num_return_sequences=1, max_new_tokens=cfg.max_new_tokens,
                       temperature=None, top_p=None, top_k=None, pad_token_id=self.pad_token_id)
        processors = LogitsProcessorList()
        if not greedy:
            seeds = [prompt_seed(cfg.seed, x, j) for x in token_ids for j in range(n)]
            processors.append(_SeededSampler(seeds, float(cfg.temperature), float(cfg.top_p)))
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      generation_config=gen_cfg, logits_processor=processors)
        texts = self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)  # (B*rows) strings
        if greedy:
            return [[t] * n for t in texts]
        return [texts[k * n:(k + 1) * n] for k in range(len(token_ids))]


# ---------------------------------------------------------------------------------- vLLM


class VLLMGenerator:
    """vLLM's offline engine. Follows vLLM's public offline API as documented at
    https://docs.vllm.ai/en/stable/serving/offline_inference.html and in ``vllm/entrypoints/llm.py``
    (vllm-project/vllm @0012cf69): ``LLM(model, dtype=, seed=, **engine_args)``;
    ``LLM.generate(prompts, sampling_params=[one per prompt], use_tqdm=)`` where a prompt may be a
    ``TokensPrompt`` dict ``{"prompt_token_ids": [...]}``, returning ``RequestOutput``s in prompt order, each
    with ``.outputs`` (``CompletionOutput``: ``.index``, ``.text``); ``SamplingParams(n, temperature, top_p,
    max_tokens, seed)``. NOT RUN in this project: no machine of ours has vLLM."""

    backend = "vllm"
    prompts_per_call: int | None = None

    def __init__(self, cfg: GenerationConfig) -> None:
        try:
            import vllm
        except ImportError as err:
            raise ImportError(VLLM_MISSING) from err
        from dmoerm.modeling.backbone import resolve_model_path

        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg)  # the same ids as the transformers backend, chat template included
        self._sampling_params = vllm.SamplingParams
        kwargs = {"dtype": cfg.dtype, "seed": cfg.seed, **cfg.vllm_engine_kwargs}
        self.llm = vllm.LLM(model=resolve_model_path(cfg.model), **kwargs)

    def generate_batch(self, token_ids: Sequence[Sequence[int]]) -> list[list[str]]:
        cfg = self.cfg
        greedy = cfg.temperature == 0  # older vLLM refuses n > 1 when greedy: ask once, repeat N times
        n = 1 if greedy else cfg.num_candidates
        params = [self._sampling_params(n=n, temperature=float(cfg.temperature),
                                        top_p=float(cfg.top_p), max_tokens=cfg.max_new_tokens,
                                        seed=prompt_seed(cfg.seed, x)) for x in token_ids]
        outputs = self.llm.generate([{"prompt_token_ids": list(x)} for x in token_ids], sampling_params=params,
                                    use_tqdm=False)
        if len(outputs) != len(token_ids):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(token_ids)} prompts")
        result = []
        for k, request in enumerate(outputs):
            texts = [c.text for c in sorted(request.outputs, key=lambda c: c.index)]
            if len(texts) != n:
                raise RuntimeError(f"vLLM returned {len(texts)} candidates for prompt {k}, asked for {n}")
            result.append(texts * cfg.num_candidates if greedy else texts)
        return result


# ---------------------------------------------------------------------------------- files


def read_prompts(uri: str) -> tuple[list[str], list[Prompt]]:
    """``(ids, prompts)`` from JSON lines (local or ``s3://``): each record has ``prompt`` (a string) or
    ``context`` (a list of ``{"role", "content"}``, like a ``dmoerm`` record) and an optional ``id`` (default:
    the line number). Other keys are ignored. A bad record raises ``DataError`` naming file, line and field."""
    from dmoerm.data.readers import RecordError, read_jsonl
    from dmoerm.data.records import DataError

    ids: list[str] = []
    prompts: list[Prompt] = []
    for line, _, rec in read_jsonl(uri):
        if isinstance(rec, RecordError):
            raise DataError(rec.reason, path=uri, line=line, field_name=rec.field_name)
        if ("prompt" in rec) == ("context" in rec):
            raise DataError("a prompt record needs exactly one of 'prompt' or 'context'", path=uri, line=line)
        if "prompt" in rec:
            if not isinstance(rec["prompt"], str) or not rec["prompt"]:
                raise DataError("must be a non-empty string", path=uri, line=line, field_name="prompt")
            prompts.append(rec["prompt"])
        else:
            ctx = rec["context"]
            try:
                prompts.append([Turn(t["role"], t["content"]) for t in ctx])
                if not ctx:
                    raise ValueError("no turns")
            except (TypeError, KeyError, ValueError) as err:
                raise DataError(f"must be a non-empty list of {{'role', 'content'}} turns ({err})", path=uri,
                                line=line, field_name="context") from None
        ids.append(str(rec.get("id", line)))
    if len(set(ids)) != len(ids):
        raise DataError("prompt ids must be unique", path=uri, field_name="id")
    return ids, prompts


def write_candidates(uri: str | os.PathLike[str], ids: Sequence[str], prompts: Sequence[Prompt],
                     candidates: Sequence[Sequence[str]], cfg: GenerationConfig) -> int:
    """JSON lines ``{"id", "prompt" | "context", "candidates": [...], "generation": {...}}``, written
    atomically (local or ``s3://``); returns the number of rows."""
    from dmoerm import storage

    if not len(ids) == len(prompts) == len(candidates):
        raise ValueError(f"{len(ids)} ids, {len(prompts)} prompts and {len(candidates)} candidate lists differ")
    meta = {k: getattr(cfg, k) for k in ("model", "num_candidates", "max_new_tokens", "temperature", "top_p",
                                         "seed")}
    with storage.open_uri(os.fspath(uri), "wb") as out:
        for sid, p, texts in zip(ids, prompts, candidates):
            row: dict[str, Any] = {"id": sid}
            if isinstance(p, str):
                row["prompt"] = p
            else:
                row["context"] = [{"role": t.role, "content": t.content} for t in p]
            row.update(candidates=list(texts), generation=meta)
            out.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
    return len(ids)
