"""Training of the barseq representation on EMOPIA (from scratch, on the CPU, in minutes).

Input: an EMOPIA directory (`midis/`, `split/{train,val,test}.csv`).
Output: a barseq checkpoint (`midiva.barseq.save_barseq`), the per-epoch log, and clip metrics.
Data: every clip as it is plus `n_augment` authoring rewrites (`midiva.authoring.random_augmentation`
with synthetic drum loops, so the suite's GigaMIDI drum patterns stay unseen), tokenized once and
cached; each epoch a clip is drawn as one of its versions and transposed by a random shift.
Tempo scaling (the suite's retimings) reaches the tokens only through re-quantization: REMI bars
carry no tempo, so barseq is tempo-blind by construction.
Loss: per-bar cross-entropy against the clip's quadrant, plus the squared error of the clip's mean
expected (valence, arousal) against its label point. Units: valence/arousal in [-1, 1].
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from midiva.atomic import atomic_output
from midiva.authoring import DrumPattern, random_augmentation, rewrite_bytes, seeded_rng
from midiva.barseq import (
    ELEMENT_BUCKETS,
    N_CHROMA,
    BarElements,
    BarSeqConfig,
    BarSeqEncoder,
    BarSeqNet,
    bars_to_elements,
    encode_songs,
    padded_bars,
    save_barseq,
    song_windows,
    transpose_elements,
)
from midiva.emopia import EmopiaClip, list_emopia
from midiva.errors import MidivaError
from midiva.events import pitched_bar_token_ids, score_to_bars
from midiva.labels import DEFAULT_LABEL_MAPPING, QUADRANTS
from midiva.metrics import LevelMetrics, level_metrics
from midiva.midi import load_midi

log = logging.getLogger(__name__)

# Token caches of another format are rebuilt: 2 since barseq reads the pitched tracks only.
CACHE_FORMAT = "midiva.barseq.tokens/2"

N_EMBED = 3  # slots per element


def synthetic_drum_patterns() -> list[DrumPattern]:
    """Three plain two-bar drum loops (rock, half-time, shuffle) written in code for training."""

    def loop(name: str, hits: Sequence[tuple[float, int]]) -> DrumPattern:
        onset = np.array([h[0] for h in hits], np.float64)
        pitch = np.array([h[1] for h in hits], np.int64)
        return DrumPattern(name, onset, np.full(len(hits), 0.25), pitch, np.full(len(hits), 90, np.int64))

    eighths = [(i / 2, 42) for i in range(16)]
    rock = [*eighths, *[(b, 36) for b in (0, 2, 2.5, 4, 6, 6.5)], *[(b, 38) for b in (1, 3, 5, 7)]]
    half = [*eighths, *[(b, 36) for b in (0, 4, 4.5)], *[(b, 38) for b in (2, 6)]]
    shuffle = [
        *[(b + o, 42) for b in range(8) for o in (0, 2 / 3)],
        *[(b, 36) for b in (0, 4)],
        *[(b, 38) for b in (1, 3, 5, 7)],
    ]
    return [loop("synthetic-rock", rock), loop("synthetic-half-time", half), loop("synthetic-shuffle", shuffle)]


@dataclass
class ClipData:
    """One clip's versions as elements (version 0 is the clip as it is) and its quadrant index."""

    name: str
    song: str
    split: str
    quadrant: int
    versions: list[BarElements]


def _tokens(data: bytes, name: str) -> list[list[int]]:
    """A clip's token ids as a run gives them to barseq: its pitched tracks only, on its MuseTok bars."""
    midi = load_midi(data, name=name)
    return pitched_bar_token_ids(midi, score_to_bars(midi))


def load_clip_data(
    emopia_dir: Path | str,
    *,
    n_augment: int = 4,
    seed: int = 0,
    splits: Sequence[str] = ("train", "val", "test"),
    cache: Path | None = None,
) -> list[ClipData]:
    """Tokenize every clip of `splits` and (train only) its `n_augment` rewrites; cached in `cache` (.npz).

    The cache is used only when it was made from the same clips, settings and token format
    (`CACHE_FORMAT`); otherwise it is rebuilt.
    """
    clips = list_emopia(emopia_dir, splits).clips
    key = _cache_key(clips, n_augment, seed)
    if cache is not None and cache.is_file():
        cached = _read_cache(cache, key)
        if cached is not None:
            return cached
        log.info("%s was made from other clips, settings or tokens; rebuilding it", cache)
    drums = synthetic_drum_patterns()
    out = [_clip_data(clip, n_augment if clip.split == "train" else 0, seed, drums) for clip in clips]
    if cache is not None:
        _write_cache(cache, out, key)
    return out


def _cache_key(clips: Sequence[EmopiaClip], n_augment: int, seed: int) -> str:
    """What a token cache must have been made from: the token format, the clips (names and splits), the settings."""
    listing = "\n".join(f"{c.name}\t{c.split}\t{c.quadrant}" for c in clips)
    return hashlib.sha256(f"{CACHE_FORMAT}\n{n_augment}\n{seed}\n{listing}".encode()).hexdigest()


def _clip_data(clip: EmopiaClip, n_augment: int, seed: int, drums: Sequence[DrumPattern]) -> ClipData:
    data = clip.path.read_bytes()
    versions = [bars_to_elements(_tokens(data, clip.name))]
    for k in range(n_augment):
        _, rewrite = random_augmentation(seeded_rng("barseq-augment", seed, clip.name, k), drums)
        try:
            rewritten = rewrite_bytes(data, rewrite, seeded_rng("barseq-rewrite", seed, clip.name, k))
            versions.append(bars_to_elements(_tokens(rewritten, clip.name)))
        except MidivaError as err:
            log.debug("%s: rewrite %d skipped: %s", clip.name, k, err)
    return ClipData(clip.name, clip.song, clip.split, QUADRANTS.index(clip.quadrant), versions)


def _write_cache(path: Path, clips: Sequence[ClipData], key: str) -> None:
    arrays: dict[str, Any] = {}
    for i, c in enumerate(clips):
        for j, v in enumerate(c.versions):
            arrays[f"{i}.{j}.ids"] = v.ids.astype(np.int16)
            arrays[f"{i}.{j}.counts"] = v.counts.astype(np.int32)
    meta = np.array([f"{c.name}\t{c.song}\t{c.split}\t{c.quadrant}\t{len(c.versions)}" for c in clips])
    # atomic, under a name of its own: two runs building the same cache at once both succeed
    with atomic_output(path, what="the token cache") as tmp, open(tmp, "wb") as handle:
        np.savez(handle, meta=meta, key=np.array(key), **arrays)


def _read_cache(path: Path, key: str) -> list[ClipData] | None:
    """The cached clips, or None when the cache was made from anything else than `key` says."""
    with np.load(path) as z:
        if "key" not in z.files or str(z["key"]) != key:
            return None
        out = []
        for i, row in enumerate(z["meta"].tolist()):
            name, song, split, quadrant, n = row.split("\t")
            versions = [
                BarElements(z[f"{i}.{j}.ids"].astype(np.int64), z[f"{i}.{j}.counts"].astype(np.int64))
                for j in range(int(n))
            ]
            out.append(ClipData(name, song, split, int(quadrant), versions))
    return out


@dataclass(frozen=True)
class TrainSettings:
    """Training choices (made on EMOPIA val)."""

    epochs: int = 14
    batch_clips: int = 8
    lr: float = 5e-3
    weight_decay: float = 0.02
    max_shift: int = 5  # transposition drawn from -max_shift..max_shift+1 semitones
    p_original: float = 0.3  # chance an epoch draws the clip as it is (else one of its rewrites)
    va_weight: float = 1.0
    label_smoothing: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class EpochRecord:
    """One epoch: mean training loss, seconds, and (when a val set is given) val clip metrics."""

    epoch: int
    loss: float
    seconds: float
    val: dict[str, float] | None


def _batch_elements(
    clips: Sequence[ClipData], rng: np.random.Generator, settings: TrainSettings, augment: bool
) -> tuple[BarElements, list[int]]:
    ids, counts, n_bars = [], [], []
    for c in clips:
        if augment and len(c.versions) > 1 and rng.random() >= settings.p_original:
            v = c.versions[int(rng.integers(1, len(c.versions)))]
        else:
            v = c.versions[0]
        shift = int(rng.integers(-settings.max_shift, settings.max_shift + 2)) if augment else 0
        ids.append(transpose_elements(v.ids, shift))
        counts.append(v.counts)
        n_bars.append(len(v.counts))
    return BarElements(np.concatenate(ids), np.concatenate(counts)), n_bars


def _forward(net: BarSeqNet, elements: BarElements, n_bars: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Training forward (bucketed, any row count): (embedding, logits) of every bar, (n_bars_total, .)."""
    n = len(elements.counts)
    widths = np.array([next(b for b in ELEMENT_BUCKETS if max(int(c), 1) <= b) for c in elements.counts], np.int64)
    parts, order = [], []
    for width in ELEMENT_BUCKETS:
        rows = np.flatnonzero(widths == width)
        if len(rows):
            ids, valid = padded_bars(elements, rows, width)
            parts.append(net.bar_vectors(ids, valid))
            order.append(rows)
    vectors = torch.empty(n, net.config.d_model + N_CHROMA)
    vectors = vectors.index_copy(0, torch.from_numpy(np.concatenate(order)), torch.cat(parts))
    index: list[npt.NDArray[np.int64]] = []
    window_valid: list[npt.NDArray[np.bool_]] = []
    offset = 0
    for m in n_bars:
        i, v = song_windows(m, net.config.context_bars)
        index.append(i + offset)
        window_valid.append(v)
        offset += m
    return net.windows(vectors[torch.from_numpy(np.concatenate(index))], torch.from_numpy(np.concatenate(window_valid)))


def _loss(
    net: BarSeqNet, logits: torch.Tensor, quadrants: torch.Tensor, n_bars: Sequence[int], settings: TrainSettings
) -> torch.Tensor:
    bar_q = torch.repeat_interleave(quadrants, torch.tensor(n_bars))
    ce = torch.nn.functional.cross_entropy(logits, bar_q, reduction="none", label_smoothing=settings.label_smoothing)
    clip_of_bar = torch.repeat_interleave(torch.arange(len(n_bars)), torch.tensor(n_bars))
    sizes = torch.tensor(n_bars, dtype=torch.float32)
    ce_clip = torch.zeros(len(n_bars)).index_add(0, clip_of_bar, ce) / sizes
    va = torch.softmax(logits, -1) @ net.mapping
    va_clip = torch.zeros(len(n_bars), 2).index_add(0, clip_of_bar, va) / sizes[:, None]
    err = ((va_clip - net.mapping[quadrants]) ** 2).sum(1)
    return (ce_clip + settings.va_weight * err).mean()


def train_barseq(
    train: Sequence[ClipData],
    val: Sequence[ClipData] = (),
    config: BarSeqConfig = BarSeqConfig(),
    settings: TrainSettings = TrainSettings(),
) -> tuple[BarSeqNet, list[EpochRecord]]:
    """Train a barseq network from scratch (deterministic for a seed on one thread)."""
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    net = BarSeqNet(config)
    opt = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = -(-len(train) // settings.batch_clips)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=settings.lr, total_steps=settings.epochs * steps_per_epoch, pct_start=0.15
    )
    history = []
    for epoch in range(settings.epochs):
        t0 = time.perf_counter()
        net.train()
        order = rng.permutation(len(train))
        losses = []
        for s in range(0, len(order), settings.batch_clips):
            batch = [train[i] for i in order[s : s + settings.batch_clips]]
            elements, n_bars = _batch_elements(batch, rng, settings, augment=True)
            _, logits = _forward(net, elements, n_bars)
            loss = _loss(net, logits, torch.tensor([c.quadrant for c in batch]), n_bars, settings)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        val_metrics = None
        if val:
            m = clip_metrics(BarSeqEncoder(net, sha256=""), val)
            val_metrics = {k: v for k, v in asdict(m).items() if k not in ("confusion", "n")}
        history.append(EpochRecord(epoch, float(np.mean(losses)), time.perf_counter() - t0, val_metrics))
        log.info(
            "epoch %d loss %.4f (%.1f s) %s",
            epoch,
            history[-1].loss,
            history[-1].seconds,
            ""
            if val_metrics is None
            else f"val quad {val_metrics['quadrant_accuracy']:.3f} "
            f"v-sign {val_metrics['valence_sign_accuracy']:.3f} mae-v {val_metrics['mae_valence']:.3f}",
        )
    net.eval()
    return net, history


def elements_to_bars(elements: BarElements) -> list[list[int]]:
    """Token ids per bar back from elements (PAD slots dropped), for `encode_songs`."""
    out = []
    for s, n in zip(elements.starts.tolist(), elements.counts.tolist(), strict=True):
        block = elements.ids[s : s + n].reshape(-1)
        out.append([int(t) for t in block if t != 167])
    return out


def clip_predictions(encoder: BarSeqEncoder, clips: Sequence[ClipData], *, version: int = 0) -> npt.NDArray[np.float64]:
    """(n_clips, 2): mean over each clip's bars of barseq's expected (valence, arousal)."""
    songs = [elements_to_bars(c.versions[version]) for c in clips]
    rows = encode_songs(encoder, songs)
    return np.stack([r[:, -2:].mean(0) for r in rows]).astype(np.float64)


def clip_metrics(
    encoder: BarSeqEncoder,
    clips: Sequence[ClipData],
    mapping: Mapping[str, tuple[float, float]] = DEFAULT_LABEL_MAPPING,
) -> LevelMetrics:
    """Clip metrics of barseq's own head (graded: the mean of bar predictions, not decoded)."""
    pred = clip_predictions(encoder, clips)
    q = np.array([c.quadrant for c in clips], np.int64)
    target = np.array([mapping[QUADRANTS[i]] for i in q], np.float64)
    return level_metrics(pred, target, q)


def main(argv: list[str] | None = None) -> int:
    """Train barseq on EMOPIA train and write the checkpoint (see scripts/train_barseq.sh)."""
    parser = argparse.ArgumentParser(description="Train the barseq representation on EMOPIA train.")
    parser.add_argument("--emopia-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=None, help="token cache (.npz), built on first use")
    parser.add_argument("--augment", type=int, default=4, help="authoring rewrites per train clip")
    parser.add_argument("--epochs", type=int, default=TrainSettings.epochs)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    clips = load_clip_data(args.emopia_dir, n_augment=args.augment, cache=args.cache)
    train = [c for c in clips if c.split == "train"]
    val = [c for c in clips if c.split == "val"]
    t1 = time.perf_counter()
    settings = TrainSettings(epochs=args.epochs, seed=args.seed)
    net, history = train_barseq(train, val, settings=settings)
    seconds = time.perf_counter() - t1
    # No timings in the header: the same recipe must give the same bytes (the sha256 is a fingerprint).
    save_barseq(
        args.out,
        net,
        {
            "training": {
                **asdict(settings),
                "augment": args.augment,
                "split": "EMOPIA train (official)",
                "train_clips": len(train),
            },
            "val": history[-1].val if history else None,
        },
    )
    log.info("wrote %s (training %.0f s, data %.0f s)", args.out, seconds, t1 - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
