"""Stage 4: MuseTok token ids per bar -> per-bar MuseTok latents (clean-room encoder).

Input: per-bar token id lists (ids 0..166 of MuseTok's vocabulary, PAD 167, at most 128 per bar,
as `midiva.events.BarEvents.bar_token_ids()` gives them) and the official tokenizer checkpoint.
Output: `EncodedBars` — per bar the quantised latent (n_bars, d_latent) float32 (128 for the
real model), the residual-VQ code indices (n_bars, n_quantizers) int64 and the pre-quantisation
vector (n_bars, d_latent) float32. Every bar is encoded independently (SPEC.md §3), so bars of
many songs share one forward pass, grouped by token length and padded only to each batch's
longest bar. Also: checkpoint download/loading and the safetensors container for bar tensors.
MIDI files -> per-file latent files (workers, resume, failures ledger) is `midiva.encode`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import pickle
import shutil
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from midiva.atomic import atomic_output
from midiva.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    VocabularyError,
)
from midiva.events import MAX_TOKENS_PER_BAR, N_TOKENS, PAD_ID
from midiva.representations import EncodeContext, Representation

log = logging.getLogger(__name__)

LATENT_DIM = 128
MUSETOK_FILE_ID = "1HK534lEVdHYl3HMRkKvz8CWYliXRmOq_"
MUSETOK_URL = f"https://drive.google.com/file/d/{MUSETOK_FILE_ID}"
CHECKPOINT_RELPATH = Path("musetok") / "best_tokenizer" / "model.pt"
CPU_BATCH_TOKENS = 4096  # on 2 CPU cores, 4,096-token batches ran 2x faster than 32,768 (cache)
DEFAULT_N_HEADS = 8  # the real model's enc_n_head; shapes cannot tell it
_LN_EPS = 1e-5
_VQ_EPS = 1e-6
# Prefixes of the tokenizer's state_dict that the latent path never runs (SPEC.md §4.7).
_IGNORED_PREFIXES = ("decoder.", "dec_out_proj.", "encoder.tr_encoder_layer.")
_ENCODER_PREFIXES = ("token_emb.", "pe.", "encoder.", "enc_out_proj.", "residual_sim_vq.")
_AUTOCAST = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


@dataclass(frozen=True)
class EncoderConfig:
    """Sizes of the MuseTok encoder path (the real model: 12, 8, 512, 2048, 128, 16, 2048)."""

    n_layers: int
    n_heads: int
    d_model: int
    d_ff: int
    d_latent: int
    n_quantizers: int
    codebook_size: int
    n_tokens: int = N_TOKENS
    max_len: int = MAX_TOKENS_PER_BAR

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"EncoderConfig.{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}; pass the "
                "checkpoint's enc_n_head (config.json beside it, or n_heads=)"
            )
        if self.max_len < 2:
            raise ConfigError(f"max_len must be at least 2 (positions 0 and 1 are never masked), got {self.max_len}")

    def to_dict(self) -> dict[str, int]:
        """Plain dict of the sizes (JSON-ready)."""
        return asdict(self)


FULL_CONFIG = EncoderConfig(
    n_layers=12, n_heads=8, d_model=512, d_ff=2048, d_latent=LATENT_DIM, n_quantizers=16, codebook_size=2048
)


@dataclass(frozen=True)
class EncoderOutput:
    """One forward pass: latents (N, d_latent), indices (N, K), pre_quant (N, d_latent), hidden (N, d_model)."""

    latents: torch.Tensor
    indices: torch.Tensor
    pre_quant: torch.Tensor
    hidden: torch.Tensor


@dataclass(frozen=True)
class EncodedBars:
    """Per-bar MuseTok encodings, in the order the bars were given.

    Attributes:
        latents: (n_bars, d_latent) float32, the quantised latent MuseTok uses.
        indices: (n_bars, n_quantizers) int64, the chosen code of each quantizer.
        pre_quant: (n_bars, d_latent) float32, the encoder projection before quantisation.
        hidden: (n_bars, d_model) float32 transformer output at position 0, when requested.
    """

    latents: npt.NDArray[np.float32]
    indices: npt.NDArray[np.int64]
    pre_quant: npt.NDArray[np.float32]
    hidden: npt.NDArray[np.float32] | None = None

    @property
    def n_bars(self) -> int:
        """Number of bars."""
        return int(self.latents.shape[0])

    def slice(self, start: int, stop: int) -> EncodedBars:
        """Bars [start, stop) as a new EncodedBars (copies, so the parent can be freed)."""
        part = [
            None if a is None else a[start:stop].copy()
            for a in (self.latents, self.indices, self.pre_quant, self.hidden)
        ]
        return EncodedBars(*part)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the network


class _Node(nn.Module):
    """A named container, so parameter names reproduce the checkpoint's key paths."""

    def __init__(self, **children: nn.Module) -> None:
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)


class _SelfAttention(nn.Module):
    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)


class _EncoderLayer(nn.Module):
    """nn.TransformerEncoderLayer's maths (post-norm, ReLU), written out so the last layer can pool early."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.self_attn = _SelfAttention(d_model)
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.norm1 = nn.LayerNorm(d_model, eps=_LN_EPS)
        self.norm2 = nn.LayerNorm(d_model, eps=_LN_EPS)

    def forward(self, x: torch.Tensor, keep: torch.Tensor, first_only: bool = False) -> torch.Tensor:
        """x (N, L, D), keep (N, 1, 1, L) True = attend; first_only returns (N, 1, D) for position 0 only."""
        n, length, d_model = x.shape
        heads, d_head = self.n_heads, d_model // self.n_heads
        w, b = self.self_attn.in_proj_weight, self.self_attn.in_proj_bias
        if first_only:
            # Only position 0 is pooled, so the last layer needs one query row per bar.
            residual = x[:, :1]
            q = F.linear(residual, w[:d_model], b[:d_model]).view(n, 1, heads, d_head).transpose(1, 2)
            kv = F.linear(x, w[d_model:], b[d_model:]).view(n, length, 2, heads, d_head).permute(2, 0, 3, 1, 4)
            k, v = kv[0], kv[1]
        else:
            residual = x
            qkv = F.linear(x, w, b).view(n, length, 3, heads, d_head).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        attn = attn.transpose(1, 2).reshape(n, q.shape[2], d_model)
        y = self.norm1(residual + self.self_attn.out_proj(attn))
        return self.norm2(y + self.linear2(F.relu(self.linear1(y))))


class _SimVQLayer(nn.Module):
    frozen_codebook: torch.Tensor

    def __init__(self, codebook_size: int, d_latent: int) -> None:
        super().__init__()
        self.register_buffer("frozen_codebook", torch.zeros(codebook_size, d_latent))
        self.code_transform = nn.Linear(d_latent, d_latent, bias=False)


def sinusoidal_positions(n_positions: int, d_model: int) -> torch.Tensor:
    """MuseTok's positional table (n_positions, d_model) in float32: sin on even columns, cos on odd."""
    position = torch.arange(n_positions, dtype=torch.float32)[:, None]
    div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(n_positions, d_model)
    table[:, 0::2] = torch.sin(position * div_term)
    table[:, 1::2] = torch.cos(position * div_term)
    return table


class MuseTokEncoder(nn.Module):
    """MuseTok's tokenizer encoder path: bar tokens -> transformer -> position 0 -> projection -> ResidualSimVQ.

    Submodule names mirror the checkpoint's keys, so a strict `load_state_dict` checks every tensor.
    """

    checkpoint_sha256: str = ""  # set by the representation's loader: identifies the weights in fingerprints

    embedding: nn.Embedding
    positions: torch.Tensor
    implicit_codebooks: torch.Tensor
    codebook_sq_norms: torch.Tensor

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        object.__setattr__(self, "embedding", nn.Embedding(config.n_tokens, config.d_model))  # a view, not a 2nd key
        self.layers = tuple(_EncoderLayer(config.d_model, config.n_heads, config.d_ff) for _ in range(config.n_layers))
        self.quantizers = tuple(_SimVQLayer(config.codebook_size, config.d_latent) for _ in range(config.n_quantizers))
        # Registered under MuseTok's names; the tuples above are typed views of the same modules.
        self.token_emb = _Node(emb_lookup=self.embedding)
        self.encoder = _Node(tr_encoder=_Node(layers=nn.ModuleList(self.layers)))
        self.enc_out_proj = nn.Linear(config.d_model, config.d_latent)
        self.residual_sim_vq = _Node(layers=nn.ModuleList(self.quantizers))
        # Derived tensors, rebuilt by `refresh()`; not part of the checkpoint.
        self.register_buffer("positions", sinusoidal_positions(config.max_len, config.d_model), persistent=False)
        shape = (config.n_quantizers, config.codebook_size, config.d_latent)
        self.register_buffer("implicit_codebooks", torch.zeros(shape), persistent=False)
        self.register_buffer("codebook_sq_norms", torch.zeros(shape[:2]), persistent=False)

    @torch.no_grad()
    def refresh(self) -> None:
        """Precompute the implicit codebooks C_k = frozen_codebook_k @ code_transform_kᵀ (call after loading)."""
        books = [layer.code_transform(layer.frozen_codebook) for layer in self.quantizers]
        self.implicit_codebooks.copy_(torch.stack(books))
        self.codebook_sq_norms.copy_(self.implicit_codebooks.pow(2).sum(-1))

    def forward(self, tokens: torch.Tensor, padding_mask: torch.Tensor) -> EncoderOutput:
        """Encode a batch of bars.

        Args:
            tokens: (N, L) int64 token ids, L <= max_len, padded with PAD_ID.
            padding_mask: (N, L) bool, True = padding (ignored as a key); positions 0, 1 must be False.

        Returns:
            EncoderOutput with latents, indices, pre_quant and hidden for each bar.
        """
        length = tokens.shape[1]
        x = self.embedding(tokens) * math.sqrt(self.config.d_model) + self.positions[:length]
        keep = ~padding_mask[:, None, None, :]
        for i, layer in enumerate(self.layers):
            x = layer(x, keep, first_only=i == len(self.layers) - 1)
        hidden = x[:, 0].float()
        with contextlib.ExitStack() as stack:
            if torch.is_autocast_enabled(hidden.device.type):
                # Index decisions are sensitive; the projection and VQ always run in float32.
                stack.enter_context(torch.autocast(hidden.device.type, enabled=False))
            pre_quant = F.linear(hidden, self.enc_out_proj.weight.float(), self.enc_out_proj.bias.float())
            latents, indices = self.quantize(pre_quant)
        return EncoderOutput(latents=latents, indices=indices, pre_quant=pre_quant, hidden=hidden)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual SimVQ with the rotation trick (SPEC.md §4.6): z (N, d_latent) -> (latents, indices (N, K))."""
        residual = z
        out = torch.zeros_like(z)
        chosen = []
        for book, sq_norms in zip(self.implicit_codebooks, self.codebook_sq_norms, strict=True):
            # Same expansion as torch.cdist's matmul path; argmin keeps the first minimum.
            dist = residual.pow(2).sum(-1, keepdim=True) - 2.0 * residual @ book.T + sq_norms
            index = dist.argmin(dim=-1)
            code = book[index]
            quantized = _rotate_to(residual, code)
            out = out + quantized
            residual = residual - quantized
            chosen.append(index)
        return out, torch.stack(chosen, dim=-1)


def _rotate_to(src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Rotation-trick value of the code `tgt` for the input `src` (equals tgt up to rounding)."""
    norm_src = src.norm(dim=-1, keepdim=True)
    norm_tgt = tgt.norm(dim=-1, keepdim=True)
    u = src / norm_src.clamp(min=_VQ_EPS)
    q = tgt / norm_tgt.clamp(min=_VQ_EPS)
    w = u + q
    w = w / w.norm(dim=-1, keepdim=True).clamp(min=_VQ_EPS)
    rotated = src - 2.0 * (src * w).sum(-1, keepdim=True) * w + 2.0 * (src * u).sum(-1, keepdim=True) * q
    return rotated * (norm_tgt / norm_src.clamp(min=_VQ_EPS))


def random_encoder(config: EncoderConfig = FULL_CONFIG, *, seed: int = 0) -> MuseTokEncoder:
    """An encoder with random weights of the given architecture (benchmarks and tests; not meaningful latents)."""
    gen = torch.Generator().manual_seed(seed)
    encoder = MuseTokEncoder(config)
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if param.ndim == 1:
                param.copy_(1 + 0.2 * noise if "norm" in name else 0.1 * noise)
            else:
                param.copy_(noise / math.sqrt(param.shape[1]))
        for layer in encoder.quantizers:
            layer.frozen_codebook.copy_(
                torch.randn(layer.frozen_codebook.shape, generator=gen) / math.sqrt(config.d_latent)
            )
    encoder.refresh()
    return encoder.eval().requires_grad_(False)


# ---------------------------------------------------------------- devices and batching


def resolve_device(name: str | torch.device) -> torch.device:
    """Turn 'auto', 'cpu', 'cuda' or 'cuda:N' into a usable torch.device.

    Raises:
        ConfigError: CUDA was asked for but is absent, or the name is not a device.
    """
    text = str(name).strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        log.info("device 'auto': no CUDA device is available, running on CPU")
        return torch.device("cpu")
    try:
        device = torch.device(text)
    except RuntimeError as err:
        raise ConfigError(f"{name!r} is not a device; use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {text!r} was requested but CUDA is not available (torch {torch.__version__}, "
            f"CUDA build: {torch.version.cuda or 'none'}); use --device cpu or --device auto"
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"device {text!r} was requested but only {torch.cuda.device_count()} CUDA device(s) are visible"
        )
    return device


def _autocast_context(device: torch.device, autocast: str | None) -> contextlib.AbstractContextManager[Any]:
    if autocast is None or autocast.lower() in ("none", "fp32", "float32"):
        return contextlib.nullcontext()
    dtype = _AUTOCAST.get(autocast.lower())
    if dtype is None:
        raise ConfigError(f"autocast must be none, bf16 or fp16, got {autocast!r}")
    if device.type == "cpu" and dtype is torch.float16:
        raise ConfigError("fp16 autocast needs a CUDA device; use bf16 on CPU or no autocast")
    return torch.autocast(device.type, dtype=dtype)


def _flatten_bars(bars: Sequence[Sequence[int]], max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All bars' ids in one array, each bar truncated to max_len: (flat, starts, lengths)."""
    lengths = np.fromiter((min(len(bar), max_len) for bar in bars), dtype=np.int64, count=len(bars))
    starts = np.zeros(len(bars), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    flat = np.empty(int(lengths.sum()), dtype=np.int64)
    for start, length, bar in zip(starts.tolist(), lengths.tolist(), bars, strict=True):
        flat[start : start + length] = bar[:length]
    return flat, starts, lengths


def _pad_batch(
    flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray, rows: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (n, L) padded with PAD_ID to the batch's longest bar (L >= 2) and the padding mask (n, L)."""
    batch_lengths = lengths[rows]
    width = max(2, int(batch_lengths.max()))
    positions = np.arange(width, dtype=np.int64)
    valid = positions[None, :] < batch_lengths[:, None]
    gather = np.where(valid, starts[rows, None] + positions[None, :], 0)
    tokens = np.where(valid, flat[gather] if flat.size else PAD_ID, PAD_ID)
    mask = ~valid
    mask[:, :2] = False  # MuseTok never masks positions 0 and 1, even in all-padding bars
    return torch.from_numpy(tokens), torch.from_numpy(mask)


def _batches(
    order: np.ndarray, sorted_lengths: np.ndarray, batch_size: int, batch_tokens: int | None
) -> Iterator[np.ndarray]:
    """Consecutive runs of the length-sorted bars, each within batch_size bars and batch_tokens padded tokens."""
    widths = np.maximum(sorted_lengths, 2)
    begin = 0
    while begin < len(order):
        end = min(begin + batch_size, len(order))
        if batch_tokens is not None:
            # Lengths ascend, so a run's padded size is its count times its last width.
            padded = np.arange(1, end - begin + 1) * widths[begin:end]
            end = begin + max(1, int(np.searchsorted(padded, batch_tokens, side="right")))
        yield order[begin:end]
        begin = end


def encode_bars(
    encoder: MuseTokEncoder,
    bars: Sequence[Sequence[int]],
    *,
    batch_size: int = 4096,
    batch_tokens: int | None = None,
    device: str | torch.device | None = None,
    autocast: str | None = None,
    include_hidden: bool = False,
) -> EncodedBars:
    """Encode bars (token id lists, any number of songs) in length-sorted batches; order is preserved.

    Args:
        encoder: a loaded MuseTokEncoder (moved to `device` when one is given).
        bars: token ids per bar; ids beyond the encoder's max_len (128) are dropped, as MuseTok does.
        batch_size: most bars per forward pass; with max_len this bounds device memory for any input.
        batch_tokens: most padded tokens (bars x longest bar) per pass (default: none on GPU; 4,096 on CPU,
            where small batches measured faster and 4,096 full bars would need 4 GiB for one FFN activation).
        autocast: None (float32), 'bf16' or 'fp16' (CUDA); quantisation always runs in float32.
        include_hidden: also return the (n_bars, d_model) transformer output at position 0.

    Raises:
        VocabularyError: a token id is outside 0..n_tokens-1.
        ConfigError: bad batch_size, device or autocast.
    """
    if batch_size < 1 or (batch_tokens is not None and batch_tokens < 1):
        raise ConfigError(f"batch_size and batch_tokens must be positive, got {batch_size} and {batch_tokens}")
    cfg = encoder.config
    target = resolve_device(device) if device is not None else next(encoder.parameters()).device
    encoder.to(target)
    flat, starts, lengths = _flatten_bars(bars, cfg.max_len)
    if flat.size and (flat.min() < 0 or flat.max() >= cfg.n_tokens):
        bad = int(flat[(flat < 0) | (flat >= cfg.n_tokens)][0])
        raise VocabularyError(
            f"token id {bad} is outside the encoder's vocabulary 0..{cfg.n_tokens - 1}; "
            "bars must come from midiva.events (MuseTok's dictionary)"
        )
    n_bars = len(lengths)
    latents = np.empty((n_bars, cfg.d_latent), dtype=np.float32)
    pre_quant = np.empty((n_bars, cfg.d_latent), dtype=np.float32)
    indices = np.empty((n_bars, cfg.n_quantizers), dtype=np.int64)
    hidden = np.empty((n_bars, cfg.d_model), dtype=np.float32) if include_hidden else None
    order = np.argsort(lengths, kind="stable")
    if batch_tokens is None and target.type == "cpu":
        batch_tokens = CPU_BATCH_TOKENS
    non_blocking = target.type == "cuda"
    with torch.inference_mode(), _autocast_context(target, autocast):
        for rows in _batches(order, lengths[order], batch_size, batch_tokens):
            tokens, mask = _pad_batch(flat, starts, lengths, rows)
            if non_blocking:
                tokens, mask = tokens.pin_memory(), mask.pin_memory()
            out = encoder(tokens.to(target, non_blocking=non_blocking), mask.to(target, non_blocking=non_blocking))
            latents[rows] = out.latents.float().cpu().numpy()
            pre_quant[rows] = out.pre_quant.float().cpu().numpy()
            indices[rows] = out.indices.cpu().numpy()
            if hidden is not None:
                hidden[rows] = out.hidden.float().cpu().numpy()
    return EncodedBars(latents=latents, indices=indices, pre_quant=pre_quant, hidden=hidden)


def encode_songs(
    encoder: MuseTokEncoder, songs: Sequence[Sequence[Sequence[int]]], **options: Any
) -> list[EncodedBars]:
    """Encode several songs' bars in shared batches; returns one EncodedBars per song (options: encode_bars')."""
    flat_bars = [bar for song in songs for bar in song]
    encoded = encode_bars(encoder, flat_bars, **options)
    bounds = np.cumsum([0, *(len(song) for song in songs)]).tolist()
    return [encoded.slice(bounds[i], bounds[i + 1]) for i in range(len(songs))]


# ---------------------------------------------------------------- checkpoints


def default_checkpoint_path(storage_dir: Path | str | None = None) -> Path:
    """`<storage>/musetok/best_tokenizer/model.pt`, storage as `midiva.config.get_storage_dir` resolves it."""
    from midiva.config import get_storage_dir

    return get_storage_dir(storage_dir) / CHECKPOINT_RELPATH


def _how_to_get(path: Path, *, download_failed: bool = False) -> str:
    by_hand = (
        f"download the zip from {MUSETOK_URL} by hand (in a browser) and unpack it so that its "
        f"best_tokenizer/model.pt is at {path}"
    )
    if download_failed:  # re-running the command that just failed would not help
        return f"{by_hand}; then rerun your command (it finds the file there)"
    return f"{by_hand}, or run `midiva download-musetok` (add --storage-dir DIR for another location)"


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """torch.load (weights only) -> the tokenizer's state_dict with wrappers and prefixes removed."""
    from safetensors import SafetensorError

    try:  # torch.load reads .safetensors files too, and raises SafetensorError for a damaged one
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except (
        OSError,
        RuntimeError,
        EOFError,
        ValueError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
        SafetensorError,
    ) as err:
        detail = (str(err).splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"cannot read {str(path)!r} as a PyTorch checkpoint ({type(err).__name__}: {detail}); "
            f"the file may be truncated or not a state_dict: {_how_to_get(path)}"
        ) from err
    state = raw
    if isinstance(raw, Mapping):
        for wrapper in ("model_state_dict", "state_dict", "model"):
            if isinstance(raw.get(wrapper), Mapping):
                state = raw[wrapper]
                break
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(
            f"{str(path)!r} holds a {type(raw).__name__}, not a state_dict (tensors by name, possibly "
            "under 'model_state_dict' or 'state_dict'); is this the MuseTok tokenizer checkpoint?"
        )
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = str(key)
        for prefix in ("module.", "_orig_mod."):
            name = name.removeprefix(prefix)
        if name.startswith(_IGNORED_PREFIXES):
            continue
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{str(path)!r}: entry {key!r} is a {type(value).__name__}, not a tensor")
        tensors[name] = value
    return tensors


def _read_config(config: Path | str | Mapping[str, Any] | None, checkpoint: Path) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    path = Path(config) if config is not None else checkpoint.parent / "config.json"
    if config is None and not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read encoder config {str(path)!r}: {err}; expected JSON with enc_n_head") from err
    if not isinstance(data, dict):
        raise ConfigError(f"encoder config {str(path)!r} must hold a JSON object, got {type(data).__name__}")
    log.debug("encoder config from %s", path)
    return data


def _shape(tensors: Mapping[str, torch.Tensor], key: str, path: Path, ndim: int) -> tuple[int, ...]:
    if key not in tensors:
        raise CheckpointError(f"{str(path)!r} has no {key!r}; is this the MuseTok tokenizer checkpoint?")
    shape = tuple(tensors[key].shape)
    if len(shape) != ndim:
        raise CheckpointError(f"{str(path)!r}: {key!r} has shape {shape}, expected {ndim} dimensions")
    return shape


# Names a MuseTok config.json uses -> EncoderConfig fields (our own field names are accepted too).
_CONFIG_KEYS = {
    "enc_n_layer": "n_layers",
    "enc_n_head": "n_heads",
    "enc_d_model": "d_model",
    "enc_d_ff": "d_ff",
    "d_vae_latent": "d_latent",
    "num_quantizers": "n_quantizers",
    "n_token": "n_tokens",
    "d_embed": "d_model",
}


def infer_config(
    tensors: Mapping[str, torch.Tensor], path: Path, declared: Mapping[str, Any], n_heads: int | None
) -> EncoderConfig:
    """Sizes from tensor shapes; heads from n_heads > declared config > 8; declared sizes must agree."""
    n_tokens, d_embed = _shape(tensors, "token_emb.emb_lookup.weight", path, 2)
    if "token_emb.emb_proj.weight" in tensors:
        raise CheckpointError(f"{str(path)!r} has token_emb.emb_proj (d_embed != d_model), which MuseTok cannot run")
    if n_tokens != N_TOKENS:
        raise CheckpointError(
            f"expected a {N_TOKENS}-row token embedding, found {n_tokens} in {str(path)!r}; "
            "is this the MuseTok tokenizer checkpoint?"
        )
    d_ff = _shape(tensors, "encoder.tr_encoder.layers.0.linear1.weight", path, 2)[0]
    d_latent = _shape(tensors, "enc_out_proj.weight", path, 2)[0]
    codebook_size = _shape(tensors, "residual_sim_vq.layers.0.frozen_codebook", path, 2)[0]
    n_layers = next(i for i in range(10**6) if f"encoder.tr_encoder.layers.{i}.linear1.weight" not in tensors)
    n_quantizers = next(i for i in range(10**6) if f"residual_sim_vq.layers.{i}.frozen_codebook" not in tensors)
    found = {
        "n_layers": n_layers,
        "d_model": d_embed,
        "d_ff": d_ff,
        "d_latent": d_latent,
        "n_quantizers": n_quantizers,
        "codebook_size": codebook_size,
        "n_tokens": n_tokens,
    }
    heads_declared: int | None = None
    for key, value in declared.items():
        field_name = _CONFIG_KEYS.get(key, key)
        if field_name not in found and field_name != "n_heads":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(
                f"the encoder config's {key} must be a positive integer, got {value!r}; fix the "
                f"config.json beside {str(path)!r} (MuseTok's has enc_n_head 8)"
            )
        if field_name == "n_heads":
            heads_declared = value
        elif value != found[field_name]:
            raise CheckpointError(
                f"the encoder config says {key}={value} but {str(path)!r} holds {field_name}="
                f"{found[field_name]}; the config file belongs to another checkpoint"
            )
    heads = n_heads if n_heads is not None else heads_declared if heads_declared is not None else DEFAULT_N_HEADS
    return EncoderConfig(n_heads=heads, **found)


def _check_and_load(encoder: MuseTokEncoder, tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Strict load: the first missing, misshapen, non-float, non-finite or unexpected key is an error."""
    expected = encoder.state_dict()
    for key, target in expected.items():
        if key not in tensors:
            raise CheckpointError(
                f"{str(path)!r} lacks {key!r} (expected shape {tuple(target.shape)}) for an encoder "
                f"of {encoder.config}; the file is truncated or of another architecture"
            )
        found = tensors[key]
        if tuple(found.shape) != tuple(target.shape):
            raise CheckpointError(
                f"{str(path)!r}: {key!r} has shape {tuple(found.shape)}, expected {tuple(target.shape)} "
                f"for an encoder of {encoder.config}; is this the MuseTok tokenizer checkpoint?"
            )
        if not found.is_floating_point():
            raise CheckpointError(f"{str(path)!r}: {key!r} has dtype {found.dtype}, expected floating point")
        if not bool(torch.isfinite(found).all()):
            raise CheckpointError(f"{str(path)!r}: {key!r} contains NaN or infinite values; the file is corrupt")
    unexpected = [k for k in tensors if k not in expected and k != "pe.pe" and k.startswith(_ENCODER_PREFIXES)]
    if unexpected:
        raise CheckpointError(
            f"{str(path)!r} has {len(unexpected)} encoder tensor(s) this architecture does not use, "
            f"first {unexpected[0]!r} {tuple(tensors[unexpected[0]].shape)}; the layer or quantizer "
            "numbering has a gap"
        )
    encoder.load_state_dict({k: tensors[k].float() for k in expected}, strict=True)
    table = tensors.get("pe.pe")
    cfg = encoder.config
    if table is None:
        log.info("%s has no pe.pe; using the recomputed sinusoidal table", path)
        return
    rows = table.reshape(table.shape[0], -1) if table.ndim == 3 else table
    if rows.ndim != 2 or rows.shape[0] < cfg.max_len or rows.shape[1] != cfg.d_model:
        raise CheckpointError(
            f"{str(path)!r}: 'pe.pe' has shape {tuple(table.shape)}, expected (>= {cfg.max_len}, 1, {cfg.d_model})"
        )
    encoder.positions.copy_(rows[: cfg.max_len].float())


def load_encoder(
    path: Path | str | None = None,
    *,
    config: Path | str | Mapping[str, Any] | None = None,
    n_heads: int | None = None,
    device: str | torch.device = "cpu",
    storage_dir: Path | str | None = None,
) -> MuseTokEncoder:
    """Load the MuseTok tokenizer checkpoint's encoder path, inferring its sizes from tensor shapes.

    Args:
        path: model.pt (raw state_dict, or a dict holding one); None: `default_checkpoint_path(storage_dir)`.
        config: JSON file or dict with `enc_n_head` (default: config.json beside the checkpoint, if any).
        n_heads: attention heads, overriding the config (default 8, the real model).
        device: 'cpu', 'cuda', 'cuda:N' or 'auto'.
        storage_dir: where the default checkpoint lives.

    Raises:
        CheckpointError: missing, unreadable, truncated or wrong-architecture checkpoint.
        ConfigError: bad config file, head count or device.
    """
    ckpt = Path(path) if path is not None else default_checkpoint_path(storage_dir)
    if not ckpt.is_file():
        raise CheckpointError(f"no MuseTok checkpoint at {str(ckpt)!r}: {_how_to_get(ckpt)}")
    target = resolve_device(device)
    declared = _read_config(config, ckpt)
    tensors = _read_state_dict(ckpt)
    cfg = infer_config(tensors, ckpt, declared, n_heads)
    encoder = MuseTokEncoder(cfg)
    _check_and_load(encoder, tensors, ckpt)
    encoder.refresh()
    log.info("loaded MuseTok encoder from %s: %s", ckpt, cfg)
    return encoder.eval().requires_grad_(False).to(target)


def download_musetok(
    storage_dir: Path | str | None = None, *, file_id: str = MUSETOK_FILE_ID, force: bool = False, quiet: bool = True
) -> Path:
    """Fetch the official tokenizer zip with gdown, unpack best_tokenizer/model.pt, and verify it loads.

    Args:
        storage_dir: destination root (default: `midiva.config.get_storage_dir()`).
        file_id: Google Drive id of the zip.
        force: download again even when a loadable checkpoint is already there.
        quiet: hide gdown's progress bar.

    Returns:
        The checkpoint path, `<storage>/musetok/best_tokenizer/model.pt`.

    Raises:
        CheckpointError: the download failed or the file does not load as the encoder.
    """
    target = default_checkpoint_path(storage_dir)
    if target.is_file() and not force:
        load_encoder(target)
        log.info("MuseTok checkpoint already present and loadable at %s", target)
        return target
    import gdown

    root = target.parent.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointError(f"cannot create {str(root)!r}: {err.strerror or err}; choose --storage-dir") from err
    archive = root / "musetok_tokenizer.download"
    log.info("downloading the MuseTok tokenizer (Google Drive id %s) to %s", file_id, archive)
    try:
        fetched = gdown.download(id=file_id, output=str(archive), quiet=quiet)
    except Exception as err:  # gdown surfaces network, quota and HTML-page failures as many exception types
        raise CheckpointError(
            f"download of {MUSETOK_URL} failed ({type(err).__name__}: {err}); {_how_to_get(target, download_failed=True)}"
        ) from err
    if not fetched or not archive.is_file():
        raise CheckpointError(
            f"download of {MUSETOK_URL} produced no file; {_how_to_get(target, download_failed=True)}"
        )
    try:
        _unpack_checkpoint(archive, target)
        load_encoder(target)
    except CheckpointError:
        target.unlink(missing_ok=True)
        raise
    finally:
        archive.unlink(missing_ok=True)
    log.info("MuseTok checkpoint verified at %s", target)
    return target


def _unpack_checkpoint(archive: Path, target: Path) -> None:
    """Copy best_tokenizer/model.pt (and a config.json beside it) out of the zip, atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if not zipfile.is_zipfile(archive):
        raise CheckpointError(
            f"the download {str(archive)!r} is not a zip archive (Google Drive may have served an HTML page); "
            f"{_how_to_get(target, download_failed=True)}"
        )
    with zipfile.ZipFile(archive) as zf:
        names = [n for n in zf.namelist() if not n.endswith("/")]
        models = [n for n in names if n.endswith("best_tokenizer/model.pt")]
        if not models:
            raise CheckpointError(
                f"the downloaded zip holds no best_tokenizer/model.pt (it has {names[:5]}); {_how_to_get(target, download_failed=True)}"
            )
        configs = [n for n in names if n == models[0].removesuffix("model.pt") + "config.json"]
        for member, dest in [(models[0], target), *((c, target.with_name("config.json")) for c in configs)]:
            with (
                atomic_output(dest, hint="choose a writable --storage-dir") as tmp,
                zf.open(member) as src,
                open(tmp, "xb") as out,
            ):
                shutil.copyfileobj(src, out, 1 << 20)


# ---------------------------------------------------------------- bar tensor container


def save_bar_tensors(path: Path | str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> Path:
    """Write per-bar arrays and string metadata to a .safetensors file atomically (temp file + rename).

    Raises:
        OutputError: the file cannot be written.
        TypeError: a metadata value is not a string.
    """
    from safetensors.numpy import save_file

    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata must map str to str; {bad[0]!r} does not")
    target = Path(path)
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    with atomic_output(target, hint="check the output directory") as tmp:
        save_file(arrays, str(tmp), metadata=dict(metadata))
    return target


def load_bar_tensors(path: Path | str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a file written by `save_bar_tensors`: (arrays by name, string metadata).

    Raises:
        DataError: the file is missing or not a safetensors file.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (OSError, SafetensorError) as err:
        raise DataError(f"cannot read bar tensors from {str(path)!r}: {err}; re-run `midiva encode` for it") from err
    return tensors, metadata


# ---------------------------------------------------------------- as a representation (midiva.representations)


def _load_representation(checkpoint: Path | str | None, device: str, storage_dir: Path | str | None) -> MuseTokEncoder:
    """The encoder of the musetok representation, with the sha256 of its checkpoint (the resume fingerprint)."""
    from midiva.config import sha256_file

    path = Path(checkpoint) if checkpoint else default_checkpoint_path(storage_dir)
    encoder = load_encoder(path, device=device)
    encoder.checkpoint_sha256 = sha256_file(path)
    return encoder


def _encode_representation(
    encoder: MuseTokEncoder, songs: Sequence[Sequence[Sequence[int]]], context: EncodeContext
) -> list[dict[str, npt.NDArray[Any]]]:
    """Per song: latents (the model's block), codebook indices and pre-quantisation vectors."""
    extra = {"autocast": context.autocast} if context.autocast else {}
    encoded = encode_songs(encoder, songs, batch_size=context.batch_size, device=context.device, **extra)
    return [
        {"latents": np.asarray(e.latents, dtype=np.float32), "indices": e.indices, "pre_quant": e.pre_quant}
        for e in encoded
    ]


REPRESENTATION = Representation(
    name="musetok",
    needs="tokens",
    batched=True,
    store_key="latents",
    load=_load_representation,
    encode=_encode_representation,
    fingerprint=lambda encoder: {"checkpoint_sha256": getattr(encoder, "checkpoint_sha256", "")},
    batch_invariant=False,  # bars are length-sorted into shared, padded batches
    description="MuseTok's per-bar latents (the official tokenizer checkpoint, encoded in batches on --device)",
)
