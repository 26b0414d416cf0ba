"""The spectrogram front end: audio in, standardised 149-band log-filtered spectrogram out (an ``nn.Module``).

It reproduces the reference (madmom-style) features of the Mid-level Features papers:

- STFT with a symmetric Hann window of 2048 samples (``np.hanning(2048)``), FFT size = frame size, magnitude,
  the 1024 bins ``k * sr / 2048`` for ``k = 0..1023`` (the Nyquist bin is dropped, as madmom does);
- madmom's ``LogarithmicFilterbank``: 24 bands per octave from 20 Hz to 16 kHz around 440 Hz, overlapping
  triangular filters between consecutive centre bins, each normalised to sum 1, duplicate FFT bins merged
  (``unique_filters``). Frequencies above Nyquist map to the last bin and merge away, so at 22.05 kHz there
  are 149 bands, centres 32.3 Hz .. 10,852.7 Hz;
- ``log10(1 + x)``; then per-band standardisation with training-set mean/std (persistent buffers).

Framing. Frame ``t`` is centred on sample ``t * hop`` and covers samples ``[t * hop - 1024, t * hop + 1024)``;
samples outside the signal are zeros. This is madmom's ``FramedSignal`` with ``origin=0`` (frames centred on
their reference sample), implemented as ``torch.stft(center=True, pad_mode="constant")``. madmom keeps
``ceil(N / hop)`` frames, torch's STFT gives ``N // hop + 1``; we keep the first ``N // hop`` (469 for a
15-s segment), i.e. exactly the frames whose hop interval ``[t * hop, (t + 1) * hop)`` lies inside the
signal. Every kept frame then describes real audio (none is centred in the zero padding past the end), and
a 15-s segment gives the 149 x 469 input the models are built for.

The window and filterbank are non-persistent buffers rebuilt from :class:`FrontendConfig` (the config travels
with the model, checkpoints stay small); only ``mean`` and ``std`` are saved. Everything runs in float32 with
autocast disabled, so a model under bf16/fp16 autocast still sees the same features.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mdlda.params import PCM_SCALE

MIN_STD = 1e-5


@dataclass(frozen=True)
class FrontendConfig:
    """Parameters of the front end (madmom names). The defaults are the reference features."""

    sample_rate: int = 22050
    frame_size: int = 2048
    hop_size: int = 704
    bands_per_octave: int = 24
    fmin: float = 20.0
    fmax: float = 16000.0
    fref: float = 440.0
    norm_filters: bool = True
    unique_filters: bool = True
    log_add: float = 1.0
    peak_normalize: bool = False  # scale each segment to a peak of 1 before the STFT (level-free features)
    # training-time noise (SpecAugment, Park et al. 2019; a noised student, Xie et al. 2020): in train mode each
    # segment's standardised spectrogram gets ``masks`` bands of up to ``freq_mask`` bands and ``masks`` spans of
    # up to ``time_mask`` frames set to 0 (the training mean). Evaluation, pseudo-labels and serving never mask.
    freq_mask: int = 0
    time_mask: int = 0
    masks: int = 2

    def __post_init__(self) -> None:
        if self.sample_rate <= 0 or self.hop_size <= 0:
            raise ValueError(f"sample_rate and hop_size must be positive, got {self.sample_rate}, {self.hop_size}")
        if self.frame_size <= 0 or self.frame_size % 2:
            raise ValueError(f"frame_size must be a positive even number, got {self.frame_size}")
        if self.bands_per_octave <= 0:
            raise ValueError(f"bands_per_octave must be positive, got {self.bands_per_octave}")
        if not 0 < self.fmin < self.fmax:
            raise ValueError(f"need 0 < fmin < fmax, got fmin={self.fmin}, fmax={self.fmax}")
        if self.fref <= 0 or self.log_add <= 0:
            raise ValueError(f"fref and log_add must be positive, got {self.fref}, {self.log_add}")
        if min(self.freq_mask, self.time_mask) < 0 or self.masks < 1:
            raise ValueError(
                f"freq_mask and time_mask must be >= 0 and masks >= 1, got {self.freq_mask}, {self.time_mask}, "
                f"{self.masks}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FrontendConfig:
        """Build from a dict (e.g. a logged config); missing keys take defaults, unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown FrontendConfig keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)


def _log_frequencies(bands_per_octave: int, fmin: float, fmax: float, fref: float) -> np.ndarray:
    """``fref * 2 ** (k / bands_per_octave)`` for all integer k with fmin <= f <= fmax (madmom's)."""
    lo = np.floor(np.log2(fmin / fref) * bands_per_octave)
    hi = np.ceil(np.log2(fmax / fref) * bands_per_octave)
    freqs = fref * 2.0 ** (np.arange(lo, hi) / bands_per_octave)
    # floor/ceil may overshoot the range by one step on either side
    freqs = freqs[np.searchsorted(freqs, fmin) :]
    return freqs[: np.searchsorted(freqs, fmax, side="right")]


def _nearest_bins(freqs: np.ndarray, bin_freqs: np.ndarray, unique: bool) -> np.ndarray:
    """Nearest FFT bin of each frequency (ties go to the lower bin; past the last bin -> the last bin)."""
    right = np.clip(np.searchsorted(bin_freqs, freqs), 1, len(bin_freqs) - 1)
    left = right - 1
    bins = np.where(freqs - bin_freqs[left] < bin_freqs[right] - freqs, left, right)
    return np.unique(bins) if unique else bins


def log_filterbank(config: FrontendConfig) -> tuple[np.ndarray, np.ndarray]:
    """madmom's LogarithmicFilterbank for ``config``.

    Returns ``(weights, centres)``: weights ``(frame_size // 2, num_bands)`` float32, one overlapping
    triangular filter per band spanning from the previous to the next centre bin (peak 1 at its centre bin,
    zero at both ends; a filter narrower than 2 bins becomes the single start bin), normalised to sum 1 if
    ``norm_filters``; centres ``(num_bands,)`` are the frequencies [Hz] of the filters' centre bins.
    """
    num_bins = config.frame_size // 2
    bin_freqs = np.arange(num_bins) * config.sample_rate / config.frame_size  # (1024,)
    freqs = _log_frequencies(config.bands_per_octave, config.fmin, config.fmax, config.fref)
    bins = _nearest_bins(freqs, bin_freqs, config.unique_filters)
    if len(bins) < 3:
        raise ValueError(f"{config} gives {len(bins)} filter bins; a triangular filterbank needs at least 3")
    weights = np.zeros((num_bins, len(bins) - 2), dtype=np.float64)
    centres = np.zeros(len(bins) - 2, dtype=np.float64)
    for band in range(len(bins) - 2):
        start, centre, stop = (int(b) for b in bins[band : band + 3])
        if stop - start < 2:  # too narrow (only without unique bins): one bin at the start
            centre, stop = start, start + 1
        filt = np.zeros(stop - start)
        filt[: centre - start] = np.linspace(0.0, 1.0, centre - start, endpoint=False)  # rising, no centre
        filt[centre - start :] = np.linspace(1.0, 0.0, stop - centre, endpoint=False)  # falling, no stop bin
        if config.norm_filters:
            filt /= filt.sum()
        # madmom puts filters into bands with np.maximum; one filter per band makes that a plain assignment
        weights[start:stop, band] = filt
        centres[band] = bin_freqs[centre]
    return weights.astype(np.float32), centres


class Frontend(nn.Module):
    """(B, N) audio -> (B, 1, num_bands, T) standardised log-filtered spectrogram; see the module docstring.

    Input is float audio in [-1, 1] or int16 PCM (divided by 32767), shape (B, N) or (N,).
    """

    def __init__(self, config: FrontendConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else FrontendConfig()
        weights, centres = log_filterbank(self.config)
        self.num_bands = weights.shape[1]
        self.center_frequencies = centres  # (num_bands,) Hz, for plots and tests
        window = torch.hann_window(self.config.frame_size, periodic=False, dtype=torch.float64)  # np.hanning
        self.register_buffer("window", window.float(), persistent=False)  # (2048,)
        self.register_buffer("filterbank", torch.from_numpy(weights), persistent=False)  # (1024, 149)
        self.register_buffer("mean", torch.zeros(self.num_bands))  # (149,)
        self.register_buffer("std", torch.ones(self.num_bands))  # (149,)

    def extra_repr(self) -> str:
        c = self.config
        return f"sr={c.sample_rate}, frame={c.frame_size}, hop={c.hop_size}, bands={self.num_bands}"

    def num_frames(self, num_samples: int) -> int:
        """Frames for ``num_samples`` of audio: ``num_samples // hop`` (469 for a 15-s segment)."""
        return num_samples // self.config.hop_size

    def _prepare(self, audio: Tensor | np.ndarray) -> Tensor:
        audio = torch.as_tensor(audio)  # numpy arrays (e.g. shard rows) are accepted too
        if audio.ndim == 1:
            audio = audio[None]
        if audio.ndim != 2:
            raise ValueError(f"expected audio of shape (B, N) or (N,), got {tuple(audio.shape)}")
        if self.num_frames(audio.shape[-1]) < 1:
            raise ValueError(f"{audio.shape[-1]} samples is shorter than one hop ({self.config.hop_size})")
        if audio.dtype == torch.int16:
            audio = audio.to(device=self.window.device, dtype=torch.float32) / PCM_SCALE
        elif not audio.is_floating_point():
            raise TypeError(f"expected float or int16 audio, got {audio.dtype}")
        else:
            audio = audio.to(device=self.window.device, dtype=torch.float32)
        if self.config.peak_normalize:  # digital silence stays silent: the peak is floored at -80 dBFS
            audio = audio / audio.abs().amax(dim=1, keepdim=True).clamp_min(1e-4)
        return audio

    def magnitude(self, audio: Tensor) -> Tensor:
        """(B, N) audio -> (B, frame_size // 2, T) STFT magnitude, float32 (framing: module docstring)."""
        audio = self._prepare(audio)  # (B, N) float32
        n_fft = self.config.frame_size
        with torch.autocast(device_type=audio.device.type, enabled=False):
            spec = torch.stft(
                audio,
                n_fft=n_fft,
                hop_length=self.config.hop_size,
                win_length=n_fft,
                window=self.window,
                center=True,  # pad frame_size // 2 on both sides: frame t is centred on sample t * hop
                pad_mode="constant",
                normalized=False,
                onesided=True,
                return_complex=True,
            )  # (B, 1025, N // hop + 1)
            return spec[:, : n_fft // 2, : self.num_frames(audio.shape[-1])].abs()  # (B, 1024, T)

    def spectrogram(self, audio: Tensor) -> Tensor:
        """(B, N) audio -> (B, num_bands, T) ``log10(log_add + |X| @ filterbank)``, not standardised."""
        mag = self.magnitude(audio)  # (B, 1024, T)
        with torch.autocast(device_type=mag.device.type, enabled=False):
            filtered = torch.matmul(mag.transpose(1, 2), self.filterbank)  # (B, T, 149)
            return torch.log10(filtered + self.config.log_add).transpose(1, 2)  # (B, 149, T)

    def forward(self, audio: Tensor) -> Tensor:
        """(B, N) audio -> (B, 1, num_bands, T) standardised spectrogram, float32 even under autocast."""
        spec = self.spectrogram(audio)  # (B, 149, T)
        with torch.autocast(device_type=spec.device.type, enabled=False):
            spec = (spec - self.mean[:, None]) / self.std[:, None]  # (B, 149, T)
            c = self.config
            if self.training and (c.freq_mask or c.time_mask):
                b, f, t = spec.shape
                spec = spec * _keep(b, f, c.freq_mask, c.masks, spec)[:, :, None]
                spec = spec * _keep(b, t, c.time_mask, c.masks, spec)[:, None, :]
        return spec[:, None]  # (B, 1, 149, T)

    def set_standardization(self, mean: Tensor | np.ndarray, std: Tensor | np.ndarray) -> None:
        """Set the per-band training-set ``mean`` and ``std``, each (num_bands,); std < 1e-5 is clamped."""
        mean_t = torch.as_tensor(np.asarray(mean, dtype=np.float64) if not torch.is_tensor(mean) else mean)
        std_t = torch.as_tensor(np.asarray(std, dtype=np.float64) if not torch.is_tensor(std) else std)
        for name, value in (("mean", mean_t), ("std", std_t)):
            if tuple(value.shape) != (self.num_bands,):
                raise ValueError(f"{name} must have shape ({self.num_bands},), got {tuple(value.shape)}")
            if not torch.isfinite(value).all():
                raise ValueError(f"{name} contains NaN or infinite values")
        if (std_t <= 0).any():
            bad = torch.nonzero(std_t <= 0).flatten().tolist()
            raise ValueError(f"std must be > 0; bands {bad} are not (a band that is constant over the data?)")
        with torch.no_grad():
            self.mean.copy_(mean_t.detach().to(self.mean))
            self.std.copy_(std_t.detach().to(self.std).clamp_min(MIN_STD))


def _keep(batch: int, size: int, width: int, masks: int, like: Tensor) -> Tensor:
    """(batch, size) float 0/1: per segment, ``masks`` random spans of 0..``width`` positions are 0."""
    if width == 0:
        return torch.ones(batch, size, device=like.device)
    widths = torch.randint(0, min(width, size) + 1, (batch, masks, 1), device=like.device)
    starts = (torch.rand(batch, masks, 1, device=like.device) * (size - widths + 1)).long()
    pos = torch.arange(size, device=like.device)  # (size,)
    hit = ((pos >= starts) & (pos < starts + widths)).any(dim=1)  # (batch, size)
    return (~hit).float()


def floored_std(std: np.ndarray, band_floor: float) -> np.ndarray:
    """Per-band std with every band below ``band_floor`` x the median band std (and any below 1e-4) set to 1.

    Such a band carries almost no energy in the training set (e.g. above the cut-off of the codec the labelled
    clips were stored with): standardising it by its tiny std would turn any energy a recording of the other
    domain has there into tens or hundreds of standard deviations. With std 1 it is centred and left unscaled.
    """
    std = np.asarray(std, dtype=np.float64)
    return np.where(std < max(band_floor * float(np.median(std)), 1e-4), 1.0, std)


@torch.no_grad()
def standardization_stats(frontend: Frontend, batches: Iterable[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-band mean and (population, ddof=0) std over all frames of all ``batches`` of (B, N) audio.

    Streams: each batch's spectrogram is reduced to per-band count/mean/M2 in float64 and merged (Chan et
    al.), so nothing but (num_bands,) accumulators is kept. Returns float32 tensors (num_bands,) on the CPU,
    ready for :meth:`Frontend.set_standardization`.
    """
    count = 0
    mean = torch.zeros(frontend.num_bands, dtype=torch.float64)
    m2 = torch.zeros(frontend.num_bands, dtype=torch.float64)
    for audio in batches:
        spec = frontend.spectrogram(audio).to("cpu", torch.float64)  # (B, 149, T)
        values = spec.transpose(0, 1).reshape(frontend.num_bands, -1)  # (149, B * T)
        n = values.shape[1]
        if n == 0:
            continue
        b_mean = values.mean(dim=1)  # (149,)
        b_m2 = ((values - b_mean[:, None]) ** 2).sum(dim=1)  # (149,)
        delta = b_mean - mean
        total = count + n
        mean = mean + delta * (n / total)
        m2 = m2 + b_m2 + delta**2 * (count * n / total)
        count = total
    if count == 0:
        raise ValueError("standardization_stats got no audio frames")
    return mean.float(), (m2 / count).sqrt().float()
