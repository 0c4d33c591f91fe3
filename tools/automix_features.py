"""Signal features for `tools.automix_analysis`: tempo, beats, downbeats and key.

Spectra are computed block by block, in float32, and each frame is reduced at once to the
few numbers used: the energy of a few frequency bands (onsets) and a chroma vector (key,
harmony changes). A track thus costs (frames x bands) floats, about 100 KB per minute,
whatever the size of its spectrum, and the audio only needs to be read a block at a time.

Tempo: the autocorrelation of the low-band onset envelope (kicks and snares), summed over
the first multiples of each candidate beat period (a true beat period repeats at 2, 3 and 4
beats, where a period of 3/4 or 2/3 of it does not), weighted by a log-normal tempo prior.
The beat level is then checked against the onsets between beats: when nearly all the
points half-way (or a third of the way) between beats carry onsets too, the beat is faster;
when every other beat is mostly empty, it is slower. Beats: dynamic programming (Ellis,
2007) on the onset envelope; the tempo reported is the one of the beat intervals (a line
fitted to the beat times, a missed beat counted as such).

Everything is plain numpy: nothing is compiled at run time, so that worker processes can
run side by side without sharing a compilation cache.
"""
from __future__ import annotations

import math
import typing as tp

import numpy as np

ONSET_SECONDS = 0.023  # onset spectrum window (1024 samples at 44.1 kHz); hop: half of it
CHROMA_SECONDS = 0.37  # chroma spectrum window (16384 samples at 44.1 kHz); hop: half of it
BAND_EDGES = (30., 150., 400., 1200., 4000., 11000.)  # Hz; the first band holds the kicks
CHROMA_HZ = (55., 2000.)  # frequency range of the chroma
MIN_BPM, MAX_BPM = 40., 240.
PRIOR_BPM, PRIOR_OCTAVES = 120., 1.5  # log-normal tempo prior: centre and width
MULTIPLES = 4  # beat period multiples summed by the tempo salience
RHYTHM_BANDS = 2  # bands whose drum onsets decide the tempo (kicks, snares: below 400 Hz)
FILLED, EMPTY = 0.8, 0.3  # shares of off-beats with onsets: beats twice faster, slower
TIGHTNESS = 100.  # how strongly the beat tracker keeps to the tempo
# Krumhansl-Kessler key profiles, tonic first, matched against the chroma.
MAJOR_PROFILE = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
MINOR_PROFILE = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])
HARMONIC_DECAY = 0.6  # weight of partial k + 1 relative to partial k in the key templates


# ---------------------------------------------------------------------------------------
# Block-wise spectra

def _pow2(seconds: float, samplerate: int) -> int:
    return 2 ** max(4, int(round(math.log2(seconds * samplerate))))


class BlockSpectrum:
    """Frames of `n_fft` samples every `n_fft // 2` (frame k centred on sample k * hop) of
    a signal given block by block, each reduced at once to `weights.shape[1]` features:
    |X[lo:lo + F]| ** power @ weights, with weights (F, K)."""

    def __init__(self, n_fft: int, lo: int, weights: np.ndarray, power: float):
        self.n_fft, self.hop, self.power = n_fft, n_fft // 2, power
        self.lo, self.hi = lo, lo + weights.shape[0]
        self.weights = weights.astype(np.float32)
        self.window = np.hanning(n_fft).astype(np.float32)
        self.buffer = np.zeros(n_fft // 2, np.float32)  # centred frames: half a window first
        self.features: list[np.ndarray] = []

    def feed(self, block: np.ndarray) -> None:
        """Add the next samples (T,) of the signal."""
        buffer = np.concatenate([self.buffer, block.astype(np.float32, copy=False)])
        count = (len(buffer) - self.n_fft) // self.hop + 1 if len(buffer) >= self.n_fft else 0
        if count > 0:
            frames = np.lib.stride_tricks.sliding_window_view(buffer, self.n_fft)[::self.hop]
            spectrum = np.fft.rfft(frames[:count] * self.window, axis=-1)[:, self.lo:self.hi]
            self.features.append((np.abs(spectrum) ** self.power) @ self.weights)  # (N, K)
        self.buffer = buffer[count * self.hop:].copy()

    def finish(self) -> np.ndarray:
        """The features (frames, K) of the whole signal."""
        self.feed(np.zeros(self.n_fft // 2 + self.hop, np.float32))
        if not self.features:
            return np.zeros((0, self.weights.shape[1]), np.float32)
        return np.concatenate(self.features)

    def frame_rate(self, samplerate: int) -> float:
        return samplerate / self.hop


def onset_spectrum(samplerate: int) -> BlockSpectrum:
    """Energies (frames, len(BAND_EDGES) - 1) of the onset bands."""
    n_fft = _pow2(ONSET_SECONDS, samplerate)
    freqs = np.fft.rfftfreq(n_fft, 1 / samplerate)
    edges = [min(edge, samplerate / 2) for edge in BAND_EDGES]
    lo, hi = int(np.searchsorted(freqs, edges[0])), int(np.searchsorted(freqs, edges[-1]))
    band = np.searchsorted(edges, freqs[lo:hi], side="right") - 1  # (F,)
    weights = (band[:, None] == np.arange(len(edges) - 1)[None, :]).astype(np.float32)
    return BlockSpectrum(n_fft, lo, weights, power=2.)


def chroma_spectrum(samplerate: int) -> BlockSpectrum:
    """Chroma (frames, 12) of energies, C first: each bin counts for the nearest
    semitone, fully at its centre and not at all half-way to the next."""
    n_fft = _pow2(CHROMA_SECONDS, samplerate)
    freqs = np.fft.rfftfreq(n_fft, 1 / samplerate)
    lo = int(np.searchsorted(freqs, CHROMA_HZ[0]))
    hi = int(np.searchsorted(freqs, min(CHROMA_HZ[1], samplerate / 2)))
    pitch = 12 * np.log2(freqs[lo:hi] / 440.) + 69  # MIDI pitch of each bin
    nearest = np.round(pitch)
    weight = np.maximum(0., 1. - 2. * np.abs(pitch - nearest))
    weights = np.zeros((hi - lo, 12), np.float32)
    weights[np.arange(hi - lo), nearest.astype(int) % 12] = weight
    return BlockSpectrum(n_fft, lo, weights, power=2.)


# ---------------------------------------------------------------------------------------
# Onsets and tempo

def onset_envelope(bands: np.ndarray) -> np.ndarray:
    """Spectral flux (frames,) of the band energies (frames, B): the mean over bands of the
    increase of the log energy, each band floored 40 dB below its mean."""
    if len(bands) == 0:
        return np.zeros(0, np.float32)
    log = np.log(bands + 1e-4 * bands.mean(axis=0) + 1e-12)
    flux = np.maximum(0., np.diff(log, axis=0, prepend=log[:1]))  # (frames, B)
    return flux.mean(axis=1).astype(np.float32)


def band_flux(bands: np.ndarray, band: int = 0) -> np.ndarray:
    """Spectral flux (frames,) of one band (the kick band by default)."""
    return onset_envelope(bands[:, band:band + 1])


def autocorrelation(onset: np.ndarray, max_lag: int) -> np.ndarray:
    """Unbiased autocorrelation (max_lag + 1,) of `onset` (frames,), 1 at lag 0."""
    x = onset.astype(np.float64) - onset.mean()
    n = len(x)
    size = 2 ** int(math.ceil(math.log2(n + max_lag + 1)))  # no circular wrap-around
    spectrum = np.fft.rfft(x, size)
    acf = np.fft.irfft(spectrum * np.conj(spectrum), size)[:max_lag + 1]  # 0 beyond n
    acf = acf / np.maximum(1, n - np.arange(max_lag + 1))
    return acf / acf[0] if acf[0] > 0 else np.zeros_like(acf)


def tempo_prior(bpm: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * (np.log2(bpm / PRIOR_BPM) / PRIOR_OCTAVES) ** 2)


def tempo_salience(onset: np.ndarray, fps: float) -> tuple[np.ndarray, np.ndarray]:
    """(bpm, salience) over a fine tempo grid: the autocorrelation summed over the first
    MULTIPLES multiples of each beat period, times the tempo prior."""
    bpm = np.geomspace(MIN_BPM, MAX_BPM, 1200)
    lags = 60. * fps / bpm  # frames per beat
    acf = np.maximum(0., autocorrelation(onset, int(MULTIPLES * lags.max()) + 2))
    positions = np.arange(len(acf))
    salience = sum(np.interp(k * lags, positions, acf) for k in range(1, MULTIPLES + 1))
    return bpm, np.asarray(salience) * tempo_prior(bpm)


def _grid(onset: np.ndarray, period: float, phase: float) -> np.ndarray:
    """Onset strength (N,) at each point of the grid phase + k * period (max within a
    frame)."""
    frames = np.arange(phase, len(onset) - 1, period).round().astype(int)
    near = np.stack([onset[np.clip(frames + d, 0, len(onset) - 1)] for d in (-1, 0, 1)])
    return near.max(axis=0)


def filled_shares(onset: np.ndarray, period: float,
                  fractions: tp.Sequence[float]) -> list[float]:
    """On the grid of `period` that carries the strongest onsets, for each fraction f, the
    share of the points f * period after its beats that carry an onset at least half as
    strong as a typical (median) beat."""
    if len(onset) < 3 * period:  # too short to tell: neither filled nor empty
        return [0.5] * len(fractions)
    phases = np.arange(0., period, 1.)
    best = phases[int(np.argmax([_grid(onset, period, phase).mean() for phase in phases]))]
    typical = float(np.median(_grid(onset, period, best)))
    return [float(np.mean(_grid(onset, period, best + f * period) > 0.5 * typical))
            for f in fractions]


def choose_level(onset: np.ndarray, period: float, fps: float) -> float:
    """The beat level, from `period` (frames) or a multiple or fraction of it: the beat is
    faster when nearly every point half-way between beats (or at each third) carries an
    onset as well (the backbeat was taken for off-beats), slower when most beats are empty
    every other beat (the eighth notes were taken for beats). Syncopations fill some
    off-beats, not all."""
    for _ in range(3):
        half, third, two_thirds = filled_shares(onset, period, (1 / 2, 1 / 3, 2 / 3))
        if half >= FILLED and 120. * fps / period <= MAX_BPM:
            period /= 2
        elif min(third, two_thirds) >= FILLED and 180. * fps / period <= MAX_BPM:
            period /= 3
        elif filled_shares(onset, 2 * period, (1 / 2,))[0] <= EMPTY and \
                30. * fps / period >= MIN_BPM:
            period *= 2
        else:
            break
    return period


def estimate_period(onset: np.ndarray, fps: float) -> float | None:
    """The beat period in frames of a (low-band) onset envelope, None without onsets."""
    if len(onset) < 4 or not np.any(onset > 0):
        return None
    bpm, salience = tempo_salience(onset, fps)
    return choose_level(onset, 60. * fps / float(bpm[int(np.argmax(salience))]), fps)


# ---------------------------------------------------------------------------------------
# Beats

def _smooth(onset: np.ndarray, period: float) -> np.ndarray:
    width = max(1., period / 32)
    offsets = np.arange(-int(3 * width), int(3 * width) + 1)
    kernel = np.exp(-0.5 * (offsets / width) ** 2)
    return np.convolve(onset / (onset.std() + 1e-12), kernel, "same")


def track_beats(onset: np.ndarray, period: float) -> np.ndarray:
    """Beat frames (N,) by dynamic programming: each beat adds its onset strength and a
    penalty on the log of its distance to the previous beat over `period`."""
    local = _smooth(onset, period)
    n = len(local)
    distances = np.arange(max(1, int(round(period / 2))), int(round(2 * period)) + 1)
    penalty = -TIGHTNESS * np.log(distances / period) ** 2  # (D,)
    score = np.zeros(n)
    back = np.full(n, -1)
    step = int(distances[0])  # beats of a chunk only depend on earlier chunks
    for start in range(0, n, step):
        frames = np.arange(start, min(n, start + step))
        previous = frames[:, None] - distances[None, :]  # (N, D)
        candidates = np.where(previous >= 0, score[np.maximum(previous, 0)] + penalty, -np.inf)
        best = candidates.argmax(axis=1)
        value = candidates[np.arange(len(frames)), best]
        chained = value > 0
        score[frames] = local[frames] + np.where(chained, value, 0.)
        back[frames] = np.where(chained, previous[np.arange(len(frames)), best], -1)
    tail = max(0, n - int(math.ceil(period)) - 1)
    beat = tail + int(np.argmax(score[tail:]))
    beats = [beat]
    while back[beats[-1]] >= 0:
        beats.append(int(back[beats[-1]]))
    return _trim(np.array(beats[::-1]), local)


def _trim(beats: np.ndarray, local: np.ndarray) -> np.ndarray:
    """Drop the weak beats at both ends (silence before and after the music)."""
    if len(beats) == 0:
        return beats
    strength = local[beats]
    threshold = 0.5 * float(np.sqrt(np.mean(strength ** 2)))
    strong = np.flatnonzero(strength >= threshold)
    return beats[strong[0]:strong[-1] + 1] if len(strong) else beats[:0]


def beat_tempo(times: np.ndarray) -> float:
    """Tempo (BPM) of beat times (N,) as the slope of a line fitted to them, a missed or
    extra beat counted as such."""
    intervals = np.diff(times)
    median = float(np.median(intervals))
    index = np.concatenate([[0.], np.cumsum(np.maximum(1., np.round(intervals / median)))])
    slope = float(np.polyfit(index, times, 1)[0])
    return 60. / slope if slope > 0 else 0.


def estimate_beats(bands: np.ndarray, fps: float,
                   drums: bool = True) -> tuple[float, np.ndarray]:
    """(tempo in BPM, beat times in seconds (N,)) from the onset band energies (frames, B):
    the tempo from the low bands of drums (kicks and snares; the bass notes of other
    stems would give eighth notes), the beats from all bands."""
    low = onset_envelope(bands[:, :RHYTHM_BANDS] if drums else bands)
    period = estimate_period(low, fps)
    if period is None:
        return 0., np.zeros(0)
    onset = 0.5 * (low + onset_envelope(bands))
    times = track_beats(onset, period) / fps
    if len(times) < 2:
        return 60. * fps / period, times
    return beat_tempo(times), times


# ---------------------------------------------------------------------------------------
# Downbeats and key

def _beat_means(chroma: np.ndarray, fps: float, beats: np.ndarray) -> np.ndarray:
    """Mean chroma (N - 1, 12) of each beat interval."""
    edges = np.clip((beats * fps).round().astype(int), 0, len(chroma))
    cumulative = np.concatenate([np.zeros((1, 12)), np.cumsum(chroma, axis=0)])
    sums = cumulative[np.maximum(edges[1:], edges[:-1] + 1).clip(max=len(chroma))] - \
        cumulative[edges[:-1]]
    return sums / (np.linalg.norm(sums, axis=1, keepdims=True) + 1e-12)


def harmonic_change(chroma: np.ndarray, fps: float, beats: np.ndarray) -> np.ndarray:
    """How much the harmony changes (N,) at each beat: cosine distance between the chroma
    of the two beats before and the two beats after (0 where one side is missing)."""
    change = np.zeros(len(beats))
    if len(beats) < 5 or len(chroma) == 0:
        return change
    means = _beat_means(chroma, fps, beats)  # (N - 1, 12)
    pairs = means[:-1] + means[1:]  # pairs[i]: beats i and i + 1
    pairs /= np.linalg.norm(pairs, axis=1, keepdims=True) + 1e-12
    before, after = pairs[:-2], pairs[2:]  # around beat i + 2
    change[2:len(pairs)] = 1. - np.sum(before * after, axis=1)
    return change


def downbeat_phase(kick: np.ndarray, onset_fps: float, chroma: np.ndarray,
                   chroma_fps: float, beats: np.ndarray) -> int:
    """Which of the first four beats starts the bars: the phase whose beats (every
    fourth) carry the most kick-band onsets and harmony changes, each measure relative
    to its best phase."""
    if len(beats) < 4:
        return 0
    frames = (beats * onset_fps).round().astype(int)
    near = np.stack([kick[np.clip(frames + d, 0, len(kick) - 1)] for d in range(-2, 3)])
    cues = [near.max(axis=0), harmonic_change(chroma, chroma_fps, beats)]  # each (N,)
    score = np.zeros(4)
    for cue in cues:
        phases = np.array([cue[p::4].mean() for p in range(4)])
        if phases.max() > 0:
            score += phases / phases.max()
    return int(np.argmax(score))


def harmonic_template(profile: np.ndarray, partials: int = 8) -> np.ndarray:
    """The chroma (12,) expected from notes weighted by `profile` (12,) when each note also
    sounds its partials (2f: an octave, 3f: a fifth above, ...), partial k + 1 weighing
    HARMONIC_DECAY times partial k."""
    template = np.zeros(12)
    for k in range(1, partials + 1):
        template += HARMONIC_DECAY ** (k - 1) * np.roll(profile, round(12 * math.log2(k)) % 12)
    return template


def estimate_key(chroma: np.ndarray) -> tuple[int, bool]:
    """(pitch class of the relative major key, minor?) from chroma frames (frames, 12):
    the Krumhansl-Kessler profile, with the partials of its notes, that best matches their
    mean, each frame scaled to a maximum of 1."""
    peak = chroma.max(axis=1, keepdims=True) if len(chroma) else np.zeros((0, 1))
    loud = peak[:, 0] > 1e-3 * (peak.max() if len(peak) else 0.)
    if not np.any(loud):
        return 0, False
    mean = (chroma[loud] / peak[loud]).mean(axis=0)
    templates = ((False, harmonic_template(MAJOR_PROFILE)),
                 (True, harmonic_template(MINOR_PROFILE)))
    scores = [(float(np.corrcoef(mean, np.roll(template, tonic))[0, 1]), tonic, minor)
              for minor, template in templates for tonic in range(12)]
    _, tonic, minor = max(scores)
    return (tonic + 3) % 12 if minor else tonic, minor


def features_of(mono: np.ndarray, samplerate: int,
                spectrum: tp.Callable[[int], BlockSpectrum],
                block: int = 1 << 16) -> tuple[np.ndarray, float]:
    """The features (frames, K) of a whole signal (T,) and their frame rate."""
    analyser = spectrum(samplerate)
    for start in range(0, len(mono), block):
        analyser.feed(mono[start:start + block])
    return analyser.finish(), analyser.frame_rate(samplerate)
