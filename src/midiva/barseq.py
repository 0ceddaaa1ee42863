"""Stage 3c: bar REMI tokens -> a learned per-bar representation ("barseq"), trained here on EMOPIA.

Input: per song, the bar token ids that `midiva.events` makes (MuseTok's 167-event vocabulary; a
list of bars, each a list of ints). In a run these are made from the pitched tracks only, on the
file's MuseTok bars (`events.pitched_bar_token_ids`): MuseTok's own events keep drum notes as
pitched notes, and a drum kit read as pitches moves harmony and key.
Output: per song, a (n_bars, dim) float32 array whose columns are
`[embedding (embed_dim) | P(Q1..Q4) (4) | expected valence, expected arousal (2)]`; the expected
values are the quadrant probabilities times the checkpoint's label mapping, in [-1, 1].

Model: each bar's tokens are grouped into elements (a Beat token with the Pitch and Duration that
follow it; any other token alone), embedded (token, pitch class, octave, position), run through a
residual MLP (or `token_layers` transformer layers) and pooled (mean, max, log count) to a bar
vector; beside it the bar's duration-weighted pitch-class profile and its lowest note's class. A bar then attends to the bar vectors
of its window b-k..b+k (k = `context_bars`, positions outside the song masked); a key branch reads
the window's mean profile in all 12 rotations (transposition-invariant); both go to the embedding
and the quadrant head.

Long songs: every bar is encoded from its own window, so a song of any length is handled whole
(never truncated) and a bar's output depends only on the tokens of bars b-k..b+k.
Determinism: bars are run in chunks of fixed shape (`CHUNK_BARS` rows, element count rounded up
to an `ELEMENT_BUCKETS` size chosen from the bar itself; windows likewise), so an output is
bit-identical whichever songs share a batch and whatever `batch_size` is.
Bad input: a token id outside 0..166 becomes an unknown token and is counted in
`EncodeReport.oov_tokens`; a bar longer than `MAX_TOKENS_PER_BAR` tokens keeps its first ones
(as MuseTok's encoder does) and the rest are counted in `truncated_tokens`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from midiva.atomic import atomic_output
from midiva.config import sha256_file
from midiva.errors import CheckpointError, OutputError
from midiva.events import MAX_TOKENS_PER_BAR, PAD_ID, VOCABULARY
from midiva.representations import EncodeContext, Representation

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "midiva.barseq/1"
METADATA_KEY = "midiva"
DEFAULT_RESOURCE = "assets/barseq.safetensors"
VOCAB_SIZE = len(VOCABULARY)  # 167 real events, ids 0..166
UNK_ID = PAD_ID + 1  # an id outside the vocabulary is read as this token
N_EMBEDDINGS = UNK_ID + 1  # rows of the token table: events, PAD, UNK
N_QUADRANTS = 4
ELEMENT_SLOTS = 3  # Beat, Pitch, Duration
ELEMENT_BUCKETS = (8, 12, 16, 24, 32, 48, 64, 96, MAX_TOKENS_PER_BAR)
CHUNK_BARS = 64  # rows of every forward chunk: fixed, so results do not depend on batching

_PITCH_OF_ID = np.full(N_EMBEDDINGS, -1, np.int64)
_KIND_OF_ID = np.zeros(N_EMBEDDINGS, np.int64)  # 0 other, 1 beat, 2 pitch, 3 duration
for _event, _id in VOCABULARY.items():
    if _event.startswith("Note_Pitch_"):
        _PITCH_OF_ID[_id] = int(_event.rsplit("_", 1)[1])
        _KIND_OF_ID[_id] = 2
    elif _event.startswith("Beat_"):
        _KIND_OF_ID[_id] = 1
    elif _event.startswith("Note_Duration_"):
        _KIND_OF_ID[_id] = 3
_ID_OF_PITCH = {int(p): i for i, p in enumerate(_PITCH_OF_ID) if p >= 0}
_BEATS_OF_ID = np.zeros(N_EMBEDDINGS, np.float32)  # Note_Duration_d -> d in quarter notes
for _event, _id in VOCABULARY.items():
    if _event.startswith("Note_Duration_"):
        _BEATS_OF_ID[_id] = int(_event.rsplit("_", 1)[1]) / 480
N_CHROMA = 24  # duration-weighted pitch-class profile (12) + pitch class of the lowest note (12)


@dataclass(frozen=True)
class BarSeqConfig:
    """Architecture of a barseq model (stored in the checkpoint's metadata).

    Attributes:
        d_model: width of element and bar vectors; n_heads: attention heads.
        token_layers: transformer layers over a bar's elements (0: one residual MLP per element, a
            deep set: as accurate on EMOPIA val and 2.5x faster); context_bars: k of the b-k..b+k window.
        embed_dim: columns of the embedding part of the output.
        label_mapping: quadrant -> (valence, arousal) used for the expected values.
    """

    # 32, not 64: as accurate on EMOPIA val (3 seeds each: quadrant accuracy 0.618 against 0.608) at about
    # twice the bars/s (`python benchmarks/barseq_eval.py --seeds 0 1 2 --d-model 32 --speed`)
    d_model: int = 32
    n_heads: int = 4
    token_layers: int = 0
    context_bars: int = 4
    embed_dim: int = 32
    dropout: float = 0.1
    label_mapping: Mapping[str, tuple[float, float]] = field(
        default_factory=lambda: {
            "Q1": (0.8, 0.6),
            "Q2": (-0.6, 0.8),
            "Q3": (-0.8, -0.4),
            "Q4": (0.4, -0.6),
        }
    )

    @property
    def dim(self) -> int:
        """Output columns per bar: embedding, 4 quadrant probabilities, expected valence and arousal."""
        return self.embed_dim + N_QUADRANTS + 2

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (label mapping as lists)."""
        out = asdict(self)
        out["label_mapping"] = {q: list(v) for q, v in self.label_mapping.items()}
        return out


@dataclass
class EncodeReport:
    """What `encode_songs` met (counts; all 0 but n_songs/n_bars for clean input)."""

    n_songs: int = 0
    n_bars: int = 0
    oov_tokens: int = 0
    truncated_tokens: int = 0
    empty_bars: int = 0  # bars with no token at all (encoded as a lone 'Bar_None')


class _Layer(nn.Module):
    """Pre-norm transformer layer with a key mask (written out so every op is plain and row-wise)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        """x (B, L, d), key_valid (B, L) bool -> (B, L, d)."""
        b, n, d = x.shape
        h = self.n_heads
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d // h)
        scores = scores.masked_fill(~key_valid[:, None, None, :], float("-inf"))
        att = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).reshape(b, n, d)
        x = x + self.drop(self.out(att))
        return x + self.drop(self.ff(self.norm2(x)))

    def centre(self, x: torch.Tensor, key_valid: torch.Tensor, index: int) -> torch.Tensor:
        """`forward(x, key_valid)[:, index]` computed for that one query only: (B, L, d) -> (B, d)."""
        b, n, d = x.shape
        h = self.n_heads
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
        scores = torch.matmul(q[:, :, index : index + 1], k.transpose(-1, -2)) / math.sqrt(d // h)
        scores = scores.masked_fill(~key_valid[:, None, None, :], float("-inf"))
        att = torch.matmul(torch.softmax(scores, dim=-1), v).reshape(b, d)
        y = x[:, index] + self.drop(self.out(att))
        return y + self.drop(self.ff(self.norm2(y)))


class BarSeqNet(nn.Module):
    """Elements of each bar -> bar vectors -> windowed context -> (embedding, quadrant logits)."""

    pitch_of_id: torch.Tensor
    beats_of_id: torch.Tensor
    rotations: torch.Tensor
    mapping: torch.Tensor

    def __init__(self, config: BarSeqConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.token = nn.Embedding(N_EMBEDDINGS, d, padding_idx=PAD_ID)
        self.pitch_class = nn.Embedding(13, d, padding_idx=12)
        self.octave = nn.Embedding(10, d, padding_idx=0)
        self.position = nn.Embedding(MAX_TOKENS_PER_BAR, d)
        self.token_layers = nn.ModuleList(_Layer(d, config.n_heads, config.dropout) for _ in range(config.token_layers))
        # Without attention layers, each element goes through one residual MLP instead (a deep set).
        self.element_mlp = (
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
            if config.token_layers == 0
            else None
        )
        self.pool = nn.Sequential(nn.LayerNorm(2 * d + 1), nn.Linear(2 * d + 1, d))
        self.key = nn.Sequential(nn.Linear(2 * N_CHROMA, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.offset = nn.Embedding(2 * config.context_bars + 1, d)
        self.edge = nn.Parameter(torch.zeros(d))
        self.context = _Layer(d, config.n_heads, config.dropout)
        self.norm = nn.LayerNorm(2 * d)
        self.embed = nn.Linear(2 * d, config.embed_dim)
        self.head = nn.Linear(config.embed_dim, N_QUADRANTS)
        self.register_buffer("pitch_of_id", torch.from_numpy(_PITCH_OF_ID), persistent=False)
        self.register_buffer("beats_of_id", torch.from_numpy(_BEATS_OF_ID), persistent=False)
        rotations = (torch.arange(12)[:, None] + torch.arange(12)[None, :]) % 12  # [r, i] = (i + r) % 12
        self.register_buffer("rotations", torch.cat([rotations, rotations + 12], dim=1), persistent=False)
        self.register_buffer(
            "mapping",
            torch.tensor([list(config.label_mapping[q]) for q in ("Q1", "Q2", "Q3", "Q4")], dtype=torch.float32),
            persistent=False,
        )

    def bar_vectors(self, elements: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """elements (B, L, 3) ids, valid (B, L) bool -> (B, d + 24) bar vectors and pitch-class profiles."""
        pitch = self.pitch_of_id[elements[..., 1]]
        has_pitch = (pitch >= 0) & valid
        pc = torch.where(has_pitch, pitch % 12, 12)
        weight = torch.where(has_pitch, self.beats_of_id[elements[..., 2]].clamp(min=0.25), 0.0)
        profile = torch.zeros(pc.shape[0], 13, dtype=weight.dtype, device=weight.device).scatter_add(1, pc, weight)
        profile = profile[:, :12] / profile[:, :12].sum(1, keepdim=True).clamp(min=1e-6)
        lowest = torch.where(has_pitch, pitch, 1000).argmin(1, keepdim=True)
        bass_pc = torch.where(has_pitch.any(1, keepdim=True), pc.gather(1, lowest), 12)
        bass = torch.zeros(pc.shape[0], 13, dtype=weight.dtype, device=weight.device).scatter(1, bass_pc, 1.0)[:, :12]
        x = self.token(elements).sum(2)
        x = x + self.pitch_class(torch.where(has_pitch, pitch % 12, 12))
        x = x + self.octave(torch.where(has_pitch, pitch // 12, 0))
        x = x + self.position.weight[: elements.shape[1]]
        for layer in self.token_layers:
            x = layer(x, valid)
        if self.element_mlp is not None:
            x = x + self.element_mlp(x)
        mask = valid[..., None]
        count = mask.sum(1).clamp(min=1)
        mean = (x * mask).sum(1) / count
        peak = x.masked_fill(~mask, float("-inf")).amax(1)
        pooled = torch.cat([mean, peak, torch.log(count.to(x.dtype)) / 4], dim=-1)  # log count: how busy the bar is
        return torch.cat([self.pool(pooled), profile, bass], dim=-1)

    def windows(self, vectors: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Window vectors (B, W, d + 24) with valid (B, W) -> (embedding (B, e), logits (B, 4)) of the centres.

        The key branch sees the window's mean pitch-class profile (and the centre bar's) in all 12
        rotations and keeps the largest response: a learned key finder, invariant to transposition.
        """
        d, k = self.config.d_model, self.config.context_bars
        chroma = vectors[..., d:] * valid[..., None]
        window = chroma.sum(1) / valid.sum(1, keepdim=True)
        both = 12 * torch.cat([window, chroma[:, k]], dim=-1)  # (B, 48), mean 1 per profile entry
        index = torch.cat([self.rotations, self.rotations + N_CHROMA], dim=1)  # (12, 48)
        key = self.key(both[:, index]).amax(1)  # (B, d)
        x = torch.where(valid[..., None], vectors[..., :d], self.edge) + self.offset.weight
        centre = self.context.centre(x, valid, k)
        z = torch.tanh(self.embed(self.norm(torch.cat([centre, key], dim=-1))))
        return z, self.head(z)

    def outputs(self, z: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """(embedding, logits) -> the representation's columns (B, dim)."""
        probs = torch.softmax(logits, dim=-1)
        return torch.cat([z, probs, probs @ self.mapping], dim=-1)


@dataclass
class BarSeqEncoder:
    """A loaded barseq model: the network, its config, and the sha256 of its weights file."""

    net: BarSeqNet
    sha256: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> BarSeqConfig:
        """The architecture."""
        return self.net.config

    @property
    def dim(self) -> int:
        """Output columns per bar."""
        return self.net.config.dim


# ---------------------------------------------------------------- tokens -> elements


@dataclass(frozen=True)
class BarElements:
    """Bars as elements: ids (n_elements, 3) (PAD where a slot is empty), and each bar's count."""

    ids: npt.NDArray[np.int64]
    counts: npt.NDArray[np.int64]

    @property
    def starts(self) -> npt.NDArray[np.int64]:
        """Index in `ids` of each bar's first element."""
        return (np.cumsum(self.counts) - self.counts).astype(np.int64)


def bars_to_elements(bars: Sequence[Sequence[int]], report: EncodeReport | None = None) -> BarElements:
    """Group each bar's tokens into elements: a Beat opens one, a Pitch after a Beat and a Duration
    after a Pitch or Beat join it, every other token stands alone. Out-of-vocabulary ids become UNK."""
    lengths = np.array([len(b) for b in bars], np.int64)
    empty = lengths == 0
    kept = np.minimum(np.maximum(lengths, 1), MAX_TOKENS_PER_BAR)
    lone_bar = (VOCABULARY["Bar_None"],)  # what an empty bar is encoded as
    kept_tokens = (bar[:MAX_TOKENS_PER_BAR] if len(bar) else lone_bar for bar in bars)
    flat = np.fromiter(chain.from_iterable(kept_tokens), np.int64, count=int(kept.sum()))
    oov = (flat < 0) | (flat >= VOCAB_SIZE)
    flat[oov] = UNK_ID
    if report is not None:
        report.oov_tokens += int(oov.sum())
        report.truncated_tokens += int(np.maximum(lengths - MAX_TOKENS_PER_BAR, 0).sum())
        report.empty_bars += int(empty.sum())
        report.n_bars += len(bars)
    kind = _KIND_OF_ID[flat]
    first = np.zeros(len(flat), bool)
    first[np.cumsum(kept) - kept] = True
    prev = np.concatenate([[0], kind[:-1]])
    joins = ((kind == 2) & (prev == 1)) | ((kind == 3) & ((prev == 2) | (prev == 1)))
    new = first | ~joins
    element = np.cumsum(new) - 1
    slot = np.where(kind == 2, 1, np.where(kind == 3, 2, 0))
    ids = np.full((int(new.sum()), ELEMENT_SLOTS), PAD_ID, np.int64)
    ids[element, slot] = flat
    bar_of_token = np.repeat(np.arange(len(bars)), kept)
    counts = np.bincount(bar_of_token[new], minlength=len(bars)).astype(np.int64)
    return BarElements(ids, counts)


def transpose_elements(ids: npt.NDArray[np.int64], semitones: int) -> npt.NDArray[np.int64]:
    """Pitch slots shifted by `semitones`; a pitch leaving 21..108 moves by octaves back inside."""
    if semitones == 0:
        return ids
    pitch = _PITCH_OF_ID[ids[:, 1]]
    has = pitch >= 0
    shifted = pitch[has] + semitones
    shifted = np.where(shifted > 108, shifted - 12 * ((shifted - 97) // 12), shifted)
    shifted = np.where(shifted < 21, shifted + 12 * ((32 - shifted) // 12), shifted)
    out = ids.copy()
    out[has, 1] = np.array([_ID_OF_PITCH[int(p)] for p in shifted.tolist()], np.int64) if shifted.size else shifted
    return out


def _buckets(counts: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """The element bucket of each bar: the smallest `ELEMENT_BUCKETS` width that holds its elements (at least one)."""
    widths = np.asarray(ELEMENT_BUCKETS, np.int64)
    return widths[np.searchsorted(widths, np.maximum(counts, 1), side="left")]


def padded_bars(elements: BarElements, rows: npt.NDArray[np.int64], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bars `rows` of `elements` as (len(rows), width, 3) ids and (len(rows), width) valid flags."""
    starts, counts = elements.starts[rows], elements.counts[rows]
    offsets = np.arange(width)
    valid = offsets[None, :] < counts[:, None]
    index = np.where(valid, starts[:, None] + offsets[None, :], 0)
    ids = np.where(valid[..., None], elements.ids[index], PAD_ID)
    return torch.from_numpy(ids), torch.from_numpy(valid)


def song_windows(n_bars: int, context_bars: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """Bar indices (n_bars, 2k+1) of each bar's window b-k..b+k, and which lie inside the song."""
    index = np.arange(n_bars)[:, None] + np.arange(-context_bars, context_bars + 1)[None, :]
    valid = (index >= 0) & (index < n_bars)
    return np.where(valid, index, 0), valid


def _chunks(n: int) -> list[slice]:
    return [slice(s, min(s + CHUNK_BARS, n)) for s in range(0, n, CHUNK_BARS)]


def _pad_rows(t: torch.Tensor, rows: int, value: Any) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    pad = torch.full((rows - t.shape[0], *t.shape[1:]), value, dtype=t.dtype, device=t.device)
    return torch.cat([t, pad])


def _encode_bar_vectors(net: BarSeqNet, elements: BarElements, device: torch.device) -> torch.Tensor:
    """Bar vectors (n_bars, d), each from a fixed-shape chunk of bars of its own element bucket."""
    n = len(elements.counts)
    out = torch.empty(n, net.config.d_model + N_CHROMA, device=device)
    buckets = _buckets(elements.counts)
    for width in ELEMENT_BUCKETS:
        rows = np.flatnonzero(buckets == width)
        for part in _chunks(len(rows)):
            chunk = rows[part]
            ids, valid = padded_bars(elements, chunk, width)
            pad_ids = torch.full((width, ELEMENT_SLOTS), PAD_ID, dtype=ids.dtype)
            pad_ids[0, 0] = VOCABULARY["Bar_None"]
            ids = torch.cat([ids, pad_ids.expand(CHUNK_BARS - len(chunk), -1, -1)]) if len(chunk) < CHUNK_BARS else ids
            valid = _pad_rows(valid, CHUNK_BARS, False)
            valid[len(chunk) :, 0] = True
            out[torch.from_numpy(chunk).to(device)] = net.bar_vectors(ids.to(device), valid.to(device))[: len(chunk)]
    return out


def _encode_windows(net: BarSeqNet, vectors: torch.Tensor, song_bars: Sequence[int]) -> torch.Tensor:
    """Representation rows (n_bars, dim) from bar vectors, each bar's window in a fixed-shape chunk."""
    k = net.config.context_bars
    index_parts: list[npt.NDArray[np.int64]] = []
    valid_parts: list[npt.NDArray[np.bool_]] = []
    offset = 0
    for n in song_bars:
        index, valid = song_windows(n, k)
        index_parts.append(index + offset)
        valid_parts.append(valid)
        offset += n
    index_all = torch.from_numpy(np.concatenate(index_parts) if index_parts else np.zeros((0, 2 * k + 1), np.int64))
    valid_all = torch.from_numpy(np.concatenate(valid_parts) if valid_parts else np.zeros((0, 2 * k + 1), bool))
    rows = []
    for part in _chunks(len(index_all)):
        m = part.stop - part.start
        x = _pad_rows(vectors[index_all[part].to(vectors.device)], CHUNK_BARS, 0.0)
        window_valid = _pad_rows(valid_all[part], CHUNK_BARS, False)
        window_valid[m:, k] = True
        z, logits = net.windows(x, window_valid.to(vectors.device))
        rows.append(net.outputs(z, logits)[:m])
    return torch.cat(rows) if rows else torch.zeros(0, net.config.dim)


def encode_songs(
    encoder: BarSeqEncoder,
    songs: Sequence[Sequence[Sequence[int]]],
    *,
    batch_size: int = 4096,
    device: str = "cpu",
    report: EncodeReport | None = None,
) -> list[npt.NDArray[np.float32]]:
    """Encode songs (each a list of bars of token ids) to one (n_bars, dim) float32 array each.

    Songs are gathered until about `batch_size` bars (at least one song) and run in fixed-shape
    chunks, so each output is bit-identical for any batching. `report` (if given) is filled in.
    """
    net = encoder.net
    dev = torch.device(device)
    if next(net.parameters()).device != dev:
        net.to(dev)
    net.eval()
    report = report if report is not None else EncodeReport()
    out: list[npt.NDArray[np.float32]] = []
    group: list[Sequence[Sequence[int]]] = []
    n_group = 0

    def flush() -> None:
        bars = [bar for song in group for bar in song]
        elements = bars_to_elements(bars, report)
        with torch.inference_mode():
            vectors = _encode_bar_vectors(net, elements, dev)
            rows = _encode_windows(net, vectors, [len(s) for s in group]).cpu().numpy().astype(np.float32)
        offset = 0
        for song in group:
            out.append(rows[offset : offset + len(song)])
            offset += len(song)

    for song in songs:
        report.n_songs += 1
        if group and n_group + len(song) > batch_size:
            flush()
            group, n_group = [], 0
        group.append(song)
        n_group += len(song)
    if group:
        flush()
    if report.oov_tokens:
        log.debug("barseq: %d out-of-vocabulary token(s) read as unknown", report.oov_tokens)
    return out


# ---------------------------------------------------------------- checkpoints


def default_barseq_path() -> Path:
    """Filesystem path of the bundled barseq weights."""
    return Path(str(resources.files("midiva").joinpath(DEFAULT_RESOURCE)))


def save_barseq(path: Path | str, net: BarSeqNet, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write a barseq model as one .safetensors file (tensors + JSON header), atomically.

    Raises:
        OutputError: the file cannot be written.
    """
    import os

    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from midiva import __version__

    path = Path(path)
    header = {
        "format": CHECKPOINT_FORMAT,
        "midiva_version": __version__,
        "vocab_size": VOCAB_SIZE,
        "config": net.config.to_dict(),
        **dict(metadata or {}),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    try:
        with atomic_output(path, what="the barseq model", hint="choose a writable path") as tmp:
            save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(header, sort_keys=True, allow_nan=False)})
            os.chmod(tmp, 0o644)  # weights are shareable data, whatever mode the writer created them with
    except SafetensorError as err:
        raise OutputError(f"cannot write the barseq model to {str(path)!r}: {err}; choose a writable path") from err
    return path


def _config_from(header: Mapping[str, Any], path: Path) -> BarSeqConfig:
    raw = header.get("config")
    if header.get("format") != CHECKPOINT_FORMAT or not isinstance(raw, Mapping):
        raise CheckpointError(
            f"{str(path)!r} is not a barseq checkpoint (format {header.get('format')!r}, "
            f"expected {CHECKPOINT_FORMAT!r}); train one with scripts/train_barseq.sh"
        )
    if header.get("vocab_size") != VOCAB_SIZE:
        raise CheckpointError(
            f"{str(path)!r} was trained on a {header.get('vocab_size')}-event vocabulary, "
            f"this midiva uses MuseTok's {VOCAB_SIZE}; retrain it with scripts/train_barseq.sh"
        )
    try:
        values = dict(raw)
        values["label_mapping"] = {q: (float(v[0]), float(v[1])) for q, v in values["label_mapping"].items()}
        config = BarSeqConfig(**values)
    except (TypeError, KeyError, ValueError, IndexError) as err:
        raise CheckpointError(f"{str(path)!r} has an unreadable barseq config ({err}); retrain it") from err
    if sorted(config.label_mapping) != ["Q1", "Q2", "Q3", "Q4"] or config.d_model % config.n_heads:
        raise CheckpointError(f"{str(path)!r}: bad barseq config {config.to_dict()}; retrain it")
    return config


def load_barseq(path: Path | str | None = None, device: str = "cpu") -> BarSeqEncoder:
    """Load a barseq checkpoint (None: the bundled weights) with a strict shape check.

    Raises:
        CheckpointError: missing or unreadable file, or a vocabulary size or dimension that does not
            match its architecture (the message names the tensor and both shapes).
    """
    from safetensors import SafetensorError, safe_open

    path = default_barseq_path() if path is None else Path(path)
    if not path.is_file():
        raise CheckpointError(f"barseq checkpoint {str(path)!r} not found; build it with scripts/train_barseq.sh")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = json.loads((handle.metadata() or {}).get(METADATA_KEY, "{}"))
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (OSError, SafetensorError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read barseq checkpoint {str(path)!r}: {err}") from err
    net = BarSeqNet(_config_from(header, path))
    expected = net.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{str(path)!r} does not fit its barseq config: missing {missing[:3]}, unexpected "
            f"{extra[:3]}; retrain it with scripts/train_barseq.sh"
        )
    for key, want in expected.items():
        got = tensors[key]
        if tuple(got.shape) != tuple(want.shape):
            what = "vocabulary" if key == "token.weight" and got.shape[1:] == want.shape[1:] else "dimensions"
            raise CheckpointError(
                f"{str(path)!r}: {what} mismatch in {key}: expected {tuple(want.shape)}, found "
                f"{tuple(got.shape)} (a {N_EMBEDDINGS}-row token table is {VOCAB_SIZE} events + PAD + UNK)"
            )
    net.load_state_dict(tensors, strict=True)
    net.to(torch.device(device)).eval()
    return BarSeqEncoder(net=net, sha256=sha256_file(path), metadata=header)


# ---------------------------------------------------------------- as a representation (midiva.representations)


def _load_representation(checkpoint: Path | str | None, device: str, storage_dir: Path | str | None) -> BarSeqEncoder:
    """The bundled barseq weights (`checkpoint` is MuseTok's and does not apply here)."""
    return load_barseq(None, device=device)


def _encode_representation(
    encoder: BarSeqEncoder, songs: Sequence[Sequence[Sequence[int]]], context: EncodeContext
) -> list[dict[str, npt.NDArray[Any]]]:
    report = EncodeReport()
    arrays = encode_songs(encoder, songs, batch_size=context.batch_size, device=context.device, report=report)
    if report.oov_tokens or report.truncated_tokens:
        log.info(
            "barseq: %d out-of-vocabulary and %d truncated token(s) in %d songs",
            report.oov_tokens,
            report.truncated_tokens,
            report.n_songs,
        )
    return [{"barseq": a} for a in arrays]


REPRESENTATION = Representation(
    name="barseq",
    needs="pitched_tokens",  # a drum kit is not read as pitches and harmony
    batched=True,
    load=_load_representation,
    encode=_encode_representation,
    fingerprint=lambda encoder: {"barseq_sha256": encoder.sha256},
    batch_invariant=True,  # fixed-shape chunks: bit-identical for any batching (tests/test_barseq.py)
    description="a bar sequence model over REMI tokens trained here on EMOPIA (embedding, quadrant probabilities, "
    "expected valence and arousal)",
)
