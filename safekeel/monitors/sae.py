"""TopK sparse autoencoders on the residual stream: model, training on a shared activation stream, save/load.

After Gao et al. 2024 ("Scaling and evaluating sparse autoencoders"), following EleutherAI's
`sparsify` and openai/sparse_autoencoder:

    pre  = relu(W_enc (s * x - b_dec) + b_enc)          s: input scale (see SaeConfig.normalize_inputs)
    z    = topk(pre, k)                                  exactly k latents kept per token
    x_hat = (W_dec^T z + b_dec) / s

- Decoder rows (one per latent) have unit norm: the gradient component parallel to each row is
  removed before every optimiser step and the rows are renormalised after it.
- b_dec starts at the geometric median (or mean) of the first batch; W_dec starts as the
  (normalised) transpose of the encoder, the encoder bias at zero.
- Loss = FVU + aux_coef * AuxK. FVU is the summed squared error over the summed squared deviation of
  the batch from its mean. AuxK reconstructs the residual x - x_hat from the top-aux_k DEAD latents
  (those that have not fired for `dead_tokens` tokens) and is normalised by the residual's own total
  variance; it is zero when no latent is dead.
- A `SaeTrainer` trains several SAEs (several hookpoints and/or sizes) on ONE stream of
  `{hookpoint: float32 [n_tokens, d_in]}` dicts, so they share each model forward; each SAE re-batches
  its hookpoint's tokens into its own `batch_size`.
- One folder per SAE: `cfg.json` (config and provenance: model hash, hookpoint meaning, input scale,
  training tokens and final metrics, library versions) and `sae.safetensors`.

Hookpoints are `layers.N`: the residual stream ENTERING decoder block N, i.e. transformers'
`hidden_states[N]` (see safekeel.models.capture).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from safekeel.models.capture import Hookpoint
from safekeel.provenance import library_versions, write_json_atomic

FORMAT_VERSION = 1
RUN_STATUSES = ("completed", "stream_ended", "cancelled")
"""How a training run ended: its token budget reached; the stream ran out first; `should_stop` said so."""


class SaeModelMismatchError(ValueError):
    """A saved SAE was trained on activations of a different model than the one it is loaded for."""


@dataclass
class SaeConfig:
    """One TopK SAE and how to train it."""

    hookpoint: str
    """`layers.N`: the residual stream entering decoder block N (transformers `hidden_states[N]`)."""
    d_in: int
    """Width of the activations (the model's hidden size)."""
    expansion_factor: int = 32
    """Latents = expansion_factor * d_in, unless `num_latents` is set."""
    num_latents: int = 0
    """Number of latents; 0 means expansion_factor * d_in."""
    k: int = 32
    """Active latents per token (the TopK)."""
    aux_k: int = 256
    """Dead latents used by the AuxK loss (capped at the number of latents, and at the number dead)."""
    aux_coef: float = 1 / 32
    """Weight of the AuxK loss (Gao et al. 2024); 0 disables it."""
    dead_tokens: int = 10_000_000
    """A latent is dead once it has not fired (nonzero top-k activation) for this many training tokens."""
    lr: float | None = None
    """Adam learning rate, constant. None: sparsify's rule 2e-4 / sqrt(num_latents / 2**14)
    (2e-4 at 16k latents, larger for smaller SAEs)."""
    batch_size: int = 4096
    """Tokens per optimiser step. The stream's chunks are re-batched to this size; a final partial
    batch is dropped."""
    max_tokens: int | None = None
    """Token budget: training completes after ceil(max_tokens / batch_size) steps. None: train until
    the stream ends."""
    seed: int = 0
    """Seeds the weight initialisation (the global torch RNG is left untouched)."""
    normalize_inputs: bool = True
    """Scale inputs by s = sqrt(d_in / mean ||x||^2), estimated on the first batch, so their mean
    squared norm is d_in (makes lr and k transferable across layers and models). s is saved with the
    SAE and applied inside encode/decode, which take and return raw activations. False: s = 1."""
    b_dec_init: Literal["geometric_median", "mean"] = "geometric_median"
    """Initial decoder bias: the geometric median (Weiszfeld; openai/sparse_autoencoder) or the mean
    (sparsify) of the first batch."""
    name: str = ""
    """Run and folder name; empty: `{hookpoint}-n{num_latents}-k{k}-s{seed}`."""

    def __post_init__(self) -> None:
        Hookpoint.parse(self.hookpoint)
        if self.d_in < 1:
            raise ValueError(f"d_in must be >= 1, got {self.d_in}")
        if self.num_latents < 0 or (self.num_latents == 0 and self.expansion_factor < 1):
            raise ValueError("set num_latents > 0 or expansion_factor >= 1")
        if not 1 <= self.k <= self.n_latents:
            raise ValueError(f"k must be in [1, {self.n_latents}] (the number of latents), got {self.k}")
        if self.aux_k < 1 or self.aux_coef < 0:
            raise ValueError("aux_k must be >= 1 and aux_coef >= 0")
        if self.dead_tokens < 1:
            raise ValueError(f"dead_tokens must be >= 1, got {self.dead_tokens}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2 (FVU divides by the batch's variance)")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 or None, got {self.max_tokens}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.b_dec_init not in ("geometric_median", "mean"):
            raise ValueError(f"b_dec_init must be 'geometric_median' or 'mean', got {self.b_dec_init!r}")

    @property
    def n_latents(self) -> int:
        return self.num_latents or self.d_in * self.expansion_factor

    @property
    def effective_aux_k(self) -> int:
        return min(self.aux_k, self.n_latents)

    @property
    def effective_lr(self) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(self.n_latents / 2**14)

    @property
    def budget_steps(self) -> int | None:
        return None if self.max_tokens is None else math.ceil(self.max_tokens / self.batch_size)

    @property
    def run_name(self) -> str:
        return self.name or f"{self.hookpoint}-n{self.n_latents}-k{self.k}-s{self.seed}"


class EncoderOutput(NamedTuple):
    top_acts: Tensor
    """[n, k] activations of the selected latents (>= 0; in normalised units)."""
    top_indices: Tensor
    """[n, k] indices of the selected latents."""


class ForwardOutput(NamedTuple):
    sae_out: Tensor
    """[n, d_in] reconstruction, in the input's (raw) units."""
    latent_acts: Tensor
    """[n, k] activations of the top-k latents."""
    latent_indices: Tensor
    """[n, k] indices of the top-k latents."""
    fvu: Tensor
    """Fraction of variance unexplained: sum (x - x_hat)^2 / sum (x - mean_batch(x))^2."""
    auxk_loss: Tensor
    """aux_coef * AuxK loss (already weighted: the training loss is fvu + auxk_loss); 0 if none dead."""


def fraction_of_variance_unexplained(x: Tensor, x_hat: Tensor) -> Tensor:
    """Summed squared error over the summed squared deviation of x ([n, d]) from its mean over n."""
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()


def geometric_median(points: Tensor, max_iters: int = 100, tol: float = 1e-6) -> Tensor:
    """The point minimising the summed Euclidean distance to `points` ([n, d]), by Weiszfeld's iteration."""
    median = points.mean(0)
    for _ in range(max_iters):
        weights = 1.0 / (points - median).norm(dim=1).clamp_min(1e-8)
        updated = (weights[:, None] * points).sum(0) / weights.sum()
        moved = float((updated - median).norm())
        median = updated
        if moved <= tol * (float(median.norm()) + 1e-8):
            break
    return median


class TopKSAE(nn.Module):
    """A TopK sparse autoencoder; encode/decode/forward take and return raw activations."""

    def __init__(self, cfg: SaeConfig, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.cfg = cfg
        self.d_in = cfg.d_in
        self.num_latents = cfg.n_latents
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.encoder = nn.Linear(cfg.d_in, self.num_latents, device=device)
        self.encoder.bias.data.zero_()
        self.W_dec = nn.Parameter(self.encoder.weight.data.clone())
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, device=device))
        self.input_scale: Tensor
        self.register_buffer("input_scale", torch.ones((), device=device))
        self.set_decoder_norm_to_unit_norm()
        self.model_hash: str | None = None
        """Fingerprint of the model whose activations trained this SAE (capture.model_fingerprint)."""
        self.training_record: dict[str, Any] = {}
        """How it was trained: tokens, steps, status, final metrics (written by the trainer)."""
        self.extra: dict[str, Any] = {}
        """Free-form provenance saved in cfg.json (e.g. the capture settings and dataset)."""

    @property
    def device(self) -> torch.device:
        return self.encoder.weight.device

    @torch.no_grad()
    def initialize_from(self, x: Tensor) -> None:
        """Data-dependent init from a first batch of raw activations: input scale, then b_dec."""
        x = x.to(self.device, torch.float32)
        if self.cfg.normalize_inputs:
            self.input_scale.fill_(math.sqrt(self.d_in / float(x.pow(2).sum(1).mean().clamp_min(1e-12))))
        scaled = x * self.input_scale
        self.b_dec.copy_(geometric_median(scaled) if self.cfg.b_dec_init == "geometric_median" else scaled.mean(0))

    def pre_acts(self, x: Tensor) -> Tensor:
        """[n, num_latents] ReLU'd encoder activations of raw inputs, before the top-k."""
        return F.relu(self.encoder(x * self.input_scale - self.b_dec))

    def encode(self, x: Tensor) -> EncoderOutput:
        """The k largest (ReLU'd) latents per row of raw inputs x ([n, d_in])."""
        return EncoderOutput(*self.pre_acts(x).topk(self.cfg.k, dim=-1, sorted=False))

    def _decode_directions(self, acts: Tensor, indices: Tensor) -> Tensor:
        """sum_j acts_j W_dec[indices_j] per row, in normalised units (no b_dec)."""
        return F.embedding_bag(indices, self.W_dec, per_sample_weights=acts, mode="sum")

    def decode(self, top_acts: Tensor, top_indices: Tensor) -> Tensor:
        """Raw-unit reconstruction from sparse latents ([n, k] activations and indices)."""
        return (self._decode_directions(top_acts, top_indices) + self.b_dec) / self.input_scale

    def forward(self, x: Tensor, dead_mask: Tensor | None = None) -> ForwardOutput:
        """Reconstruct raw inputs x ([n, d_in]); with a [num_latents] bool `dead_mask`, also the AuxK loss."""
        x = x.to(self.device, torch.float32)
        pre = self.pre_acts(x)
        top_acts, top_indices = pre.topk(self.cfg.k, dim=-1, sorted=False)
        sae_out = self.decode(top_acts, top_indices)
        residual = x - sae_out
        fvu = fraction_of_variance_unexplained(x, sae_out)

        num_dead = 0 if dead_mask is None else int(dead_mask.sum())
        if num_dead > 0 and self.cfg.aux_coef > 0:
            aux_k = min(self.cfg.effective_aux_k, num_dead)
            aux_acts, aux_indices = pre.masked_fill(~dead_mask, float("-inf")).topk(aux_k, dim=-1, sorted=False)
            residual_hat = self._decode_directions(aux_acts, aux_indices) / self.input_scale
            target = residual.detach()
            residual_variance = (target - target.mean(0)).pow(2).sum().clamp_min(torch.finfo(target.dtype).tiny)
            auxk_loss = self.cfg.aux_coef * (residual_hat - target).pow(2).sum() / residual_variance
        else:
            auxk_loss = fvu.new_zeros(())
        return ForwardOutput(sae_out, top_acts, top_indices, fvu, auxk_loss)

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        self.W_dec.data /= self.W_dec.data.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).eps)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project each decoder row's gradient onto the row's orthogonal complement."""
        if self.W_dec.grad is None:
            return
        rows = self.W_dec.data
        parallel = (self.W_dec.grad * rows).sum(1, keepdim=True) / rows.pow(2).sum(1, keepdim=True)
        self.W_dec.grad -= parallel * rows

    def save(self, folder: str | Path) -> Path:
        """Write `sae.safetensors` and `cfg.json` into `folder` (created); returns the folder."""
        from safetensors import __version__ as safetensors_version
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".sae.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp)
            os.replace(tmp, folder / "sae.safetensors")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        versions = library_versions()
        versions["safetensors"] = safetensors_version
        write_json_atomic(folder / "cfg.json", {
            "format_version": FORMAT_VERSION,
            "kind": "topk_sae",
            "config": asdict(self.cfg),
            "d_in": self.d_in,
            "num_latents": self.num_latents,
            "hookpoint_meaning": Hookpoint.parse(self.cfg.hookpoint).meaning,
            "normalization": {
                "normalize_inputs": self.cfg.normalize_inputs,
                "input_scale": float(self.input_scale),
                "meaning": "encode/decode multiply raw activations by input_scale and divide reconstructions by it",
            },
            "model_hash": self.model_hash,
            "training": self.training_record,
            "extra": self.extra,
            "library_versions": versions,
        })
        return folder

    @classmethod
    def load(cls, folder: str | Path, expected_model_hash: str | None = None,
             device: str | torch.device = "cpu") -> "TopKSAE":
        """Load a saved SAE. With `expected_model_hash`, refuse (SaeModelMismatchError, a ValueError)
        an SAE trained on another model's activations; tensor shapes are checked against the config."""
        from safetensors.torch import load_file

        folder = Path(folder)
        cfg_path = folder / "cfg.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{folder} holds no cfg.json")
        meta = json.loads(cfg_path.read_text())
        if meta.get("kind") != "topk_sae":
            raise ValueError(f"{cfg_path} is not a TopK SAE (kind={meta.get('kind')!r})")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{cfg_path} has format_version {meta.get('format_version')}; this code reads {FORMAT_VERSION}")
        if expected_model_hash is not None and meta.get("model_hash") != expected_model_hash:
            raise SaeModelMismatchError(
                f"SAE {folder} was trained on activations of model {meta.get('model_hash')!r}, not of "
                f"{expected_model_hash!r}: its latents mean nothing for this model; retrain it")
        sae = cls(SaeConfig(**meta["config"]), device=device)
        tensors = load_file(str(folder / "sae.safetensors"), device=str(device))
        expected = {name: tuple(t.shape) for name, t in sae.state_dict().items()}
        found = {name: tuple(t.shape) for name, t in tensors.items()}
        if found != expected:
            raise ValueError(f"{folder / 'sae.safetensors'} does not match its cfg.json: tensors {found}, "
                             f"config implies {expected}")
        sae.load_state_dict(tensors, strict=True)
        sae.model_hash = meta.get("model_hash")
        sae.training_record = meta.get("training", {})
        sae.extra = meta.get("extra", {})
        return sae


@dataclass
class TrainStats:
    """Running statistics of one SAE's training."""

    steps: int = 0
    tokens: int = 0
    fvu: float = math.nan
    """FVU of the last step."""
    fvu_ema: float = math.nan
    """Bias-corrected exponential moving average of the per-step FVU."""
    fvu_history: list[float] = field(default_factory=list)
    """FVU of every step."""
    l0: float = math.nan
    """Mean active (nonzero) latents per token in the last step: k unless some top-k acts were 0."""
    auxk_loss: float = 0.0
    """Weighted AuxK loss of the last step."""
    dead_fraction: float = 0.0
    """Fraction of latents that have not fired within the last `dead_tokens` training tokens."""
    compute_seconds: float = 0.0
    """Time spent in this SAE's steps (the shared model forward is not included)."""

    def summary(self) -> dict[str, Any]:
        """Everything but the per-step history; NaN (no step yet) as None, so it stays valid JSON."""
        return {k: None if isinstance(v, float) and math.isnan(v) else v
                for k, v in asdict(self).items() if k != "fvu_history"}


class SaeResult(NamedTuple):
    name: str
    config: SaeConfig
    status: str
    """One of RUN_STATUSES."""
    stats: TrainStats
    sae: TopKSAE
    folder: Path | None
    """Where it was saved (None when the trainer had no output folder)."""


def chunk_tokens(chunk: Mapping[str, Tensor]) -> int:
    """Number of tokens in one stream item (all hookpoints must agree)."""
    counts = {int(t.shape[0]) for t in chunk.values()}
    if len(counts) != 1:
        raise ValueError(f"stream item has differing token counts across hookpoints: {sorted(counts)}")
    return counts.pop()


def check_unique_names(configs: Sequence[SaeConfig]) -> None:
    names = [c.run_name for c in configs]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"run names must be unique (they name the output folders); duplicated: {duplicated}. "
                         "Set SaeConfig.name.")


class SaeRun:
    """One SAE in training: the model, its Adam optimiser, its token buffer and its statistics."""

    def __init__(self, cfg: SaeConfig, *, device: str | torch.device = "cpu", ema_decay: float = 0.9) -> None:
        if not 0 <= ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.cfg = cfg
        self.sae = TopKSAE(cfg, device=device)
        self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=cfg.effective_lr)
        self.tokens_since_fired = torch.zeros(cfg.n_latents, dtype=torch.long, device=device)
        self.stats = TrainStats()
        self.ema_decay = ema_decay
        self._ema_raw = 0.0
        self._initialized = False
        self._buffer: list[Tensor] = []
        self._buffered = 0

    @property
    def done(self) -> bool:
        """The token budget is spent."""
        return self.cfg.max_tokens is not None and self.stats.tokens >= self.cfg.max_tokens

    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.cfg.dead_tokens

    def feed(self, chunk: Mapping[str, Tensor]) -> int:
        """Buffer this run's hookpoint from one stream item; take a step per full batch. Returns steps taken."""
        if self.cfg.hookpoint not in chunk:
            raise KeyError(f"the stream has no {self.cfg.hookpoint!r} (run {self.cfg.run_name}); it has {sorted(chunk)}")
        acts = chunk[self.cfg.hookpoint]
        if acts.ndim != 2 or acts.shape[1] != self.cfg.d_in:
            raise ValueError(f"{self.cfg.hookpoint}: expected [n_tokens, {self.cfg.d_in}] activations, got {tuple(acts.shape)}")
        if self.done:
            return 0
        started = time.perf_counter()
        self._buffer.append(acts.detach().to(self.sae.device, torch.float32))
        self._buffered += acts.shape[0]
        steps = 0
        if self._buffered >= self.cfg.batch_size:
            pending = torch.cat(self._buffer)
            offset = 0
            while pending.shape[0] - offset >= self.cfg.batch_size and not self.done:
                self.step(pending[offset:offset + self.cfg.batch_size])
                offset += self.cfg.batch_size
                steps += 1
            rest = pending[offset:] if not self.done else pending[:0]
            self._buffer = [rest] if rest.shape[0] else []
            self._buffered = rest.shape[0]
        self.stats.compute_seconds += time.perf_counter() - started
        return steps

    def step(self, x: Tensor) -> ForwardOutput:
        """One optimiser step on a batch of raw activations ([batch, d_in])."""
        if not self._initialized:
            self.sae.initialize_from(x)
            self._initialized = True
        dead = self.dead_mask()
        out = self.sae(x, dead_mask=dead if self.cfg.aux_coef > 0 else None)
        self.optimizer.zero_grad(set_to_none=True)
        (out.fvu + out.auxk_loss).backward()
        self.sae.remove_gradient_parallel_to_decoder_directions()
        self.optimizer.step()
        self.sae.set_decoder_norm_to_unit_norm()

        with torch.no_grad():
            fired = out.latent_indices[out.latent_acts > 0]
            self.tokens_since_fired += x.shape[0]
            self.tokens_since_fired[fired] = 0
        stats = self.stats
        stats.steps += 1
        stats.tokens += x.shape[0]
        stats.fvu = float(out.fvu.detach())
        stats.fvu_history.append(stats.fvu)
        self._ema_raw = self.ema_decay * self._ema_raw + (1 - self.ema_decay) * stats.fvu
        stats.fvu_ema = self._ema_raw / (1 - self.ema_decay ** stats.steps)
        stats.l0 = float((out.latent_acts > 0).sum(-1).float().mean())
        stats.auxk_loss = float(out.auxk_loss.detach())
        stats.dead_fraction = float(self.dead_mask().float().mean())
        return out

    def finish(self, status: str, folder: str | Path | None, *, model_hash: str | None = None,
               extra: Mapping[str, Any] | None = None) -> SaeResult:
        """Record how the run ended on the SAE and save it into `folder` (if given)."""
        if status not in RUN_STATUSES:
            raise ValueError(f"unknown status {status!r}; known: {RUN_STATUSES}")
        self._buffer, self._buffered = [], 0
        self.sae.model_hash = model_hash
        self.sae.extra = dict(extra or {})
        self.sae.training_record = {"status": status, "budget_steps": self.cfg.budget_steps,
                                    "effective_lr": self.cfg.effective_lr, **self.stats.summary()}
        saved = self.sae.save(folder) if folder is not None else None
        return SaeResult(self.cfg.run_name, self.cfg, status, self.stats, self.sae, saved)


class SaeTrainer:
    """Trains several SAEs on one activation stream (each model forward feeds all of them)."""

    def __init__(self, configs: Sequence[SaeConfig], out_dir: str | Path | None = None, *,
                 model_hash: str | None = None, extra: Mapping[str, Any] | None = None,
                 device: str | torch.device = "cpu", ema_decay: float = 0.9, progress: bool = False,
                 should_stop: Callable[[], bool] | None = None) -> None:
        """`out_dir`: each SAE is saved to out_dir / run_name (None: not saved). `model_hash` and
        `extra` are recorded in every cfg.json. `should_stop` is polled before each stream item."""
        if not configs:
            raise ValueError("at least one SaeConfig is needed")
        check_unique_names(configs)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.model_hash = model_hash
        self.extra = dict(extra or {})
        self.progress = progress
        self.should_stop = should_stop
        self.runs = [SaeRun(cfg, device=device, ema_decay=ema_decay) for cfg in configs]

    def fit(self, stream: Iterable[Mapping[str, Tensor]]) -> list[SaeResult]:
        """Consume the stream until every run has spent its budget, the stream ends or `should_stop`
        returns True; save each SAE as it finishes. Results in config order."""
        from tqdm.auto import tqdm

        results: dict[int, SaeResult] = {}
        active = dict(enumerate(self.runs))
        status_at_end = "stream_ended"
        with tqdm(desc="SAE training", unit="tok", unit_scale=True, disable=not self.progress) as bar:
            for chunk in stream:
                if self.should_stop is not None and self.should_stop():
                    status_at_end = "cancelled"
                    break
                for index, run in list(active.items()):
                    run.feed(chunk)
                    if run.done:
                        results[index] = self._finish(active.pop(index), "completed")
                bar.update(chunk_tokens(chunk))
                bar.set_postfix({r.cfg.run_name: f"{r.stats.fvu_ema:.3f}" for r in active.values()}, refresh=False)
                if not active:
                    break
        for index, run in active.items():
            status = "completed" if status_at_end == "stream_ended" and run.cfg.max_tokens is None else status_at_end
            results[index] = self._finish(run, status)
        return [results[i] for i in range(len(self.runs))]

    def _finish(self, run: SaeRun, status: str) -> SaeResult:
        folder = self.out_dir / run.cfg.run_name if self.out_dir is not None else None
        return run.finish(status, folder, model_hash=self.model_hash, extra=self.extra)


class SaeMetrics(NamedTuple):
    fvu: float
    """Summed squared error over the summed squared deviation from the mean of ALL evaluated tokens."""
    l0: float
    """Mean active latents per token."""
    dead_fraction: float
    """Fraction of latents that never fired on the evaluated tokens."""
    tokens: int


@torch.no_grad()
def evaluate_sae(sae: TopKSAE, stream: Iterable[Mapping[str, Tensor] | Tensor],
                 max_tokens: int | None = None) -> SaeMetrics:
    """FVU, L0 and dead fraction on held-out activations: stream items are `{hookpoint: [n, d_in]}`
    dicts (the SAE's hookpoint is read) or bare [n, d_in] tensors."""
    squared_error = 0.0
    count = 0
    total = torch.zeros(sae.d_in, dtype=torch.float64)
    total_sq = torch.zeros(sae.d_in, dtype=torch.float64)
    active = 0.0
    fired = torch.zeros(sae.num_latents, dtype=torch.bool, device=sae.device)
    for item in stream:
        x = item if isinstance(item, Tensor) else item[sae.cfg.hookpoint]
        if max_tokens is not None:
            x = x[:max_tokens - count]
        if x.shape[0] == 0:
            break
        x = x.to(sae.device, torch.float32)
        acts, indices = sae.encode(x)
        error = x - sae.decode(acts, indices)
        squared_error += float(error.double().pow(2).sum())
        x64 = x.double().cpu()
        total += x64.sum(0)
        total_sq += x64.pow(2).sum(0)
        count += x.shape[0]
        active += float((acts > 0).sum())
        fired[indices[acts > 0]] = True
        if max_tokens is not None and count >= max_tokens:
            break
    if count < 2:
        raise ValueError("evaluate_sae needs at least 2 tokens")
    variance = float((total_sq - total.pow(2) / count).sum())
    return SaeMetrics(squared_error / variance, active / count, float((~fired).float().mean()), count)
