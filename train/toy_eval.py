"""Evaluator of the toy world: reads a (generated) video back into story attributes and scores them.

Implements the "Evaluation" section of `shared/toyworld.md`. Every measurement is made on the pixels only;
the ground-truth `ToyStory` is used to compare, to know how many characters a shot shows (they are matched
left to right) and to skip landmark checks where the ground truth itself hides the landmark.

Pixel model. A pixel is background when it is close to the segment between the shot's sky and ground colours
(robust to a blurred horizon); foreground pixels are quantised to the nearest body/core colour and split into
8-connected components of one colour. A character is a large, roughly square component of a palette colour
(its core is a hole inside it); the landmark is a tall, thin component standing on the horizon.
Garbage input (black, noise, wrong length) never raises: attributes that cannot be measured score 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from train.toyworld import (
    COLOURS,
    FRAMES_PER_SHOT,
    HORIZON,
    LANDMARK_HEIGHT,
    LANDMARK_WIDTH,
    MIN_CUT_DIFFERENCE,
    PALETTE,
    SETTINGS,
    SHAPES,
    SHOT_SIZES,
    ToyStory,
    character_tracks,
)

# Cut threshold on the mean absolute difference (0..255, all channels) between consecutive frames, fitted on
# ground truth: the largest difference inside a shot is 8.35 (exhaustive search over shapes, colours and
# settings of the fastest motion, a close-up bounce; 8.2 over 1500 sampled shots) and every cut is at least
# MIN_CUT_DIFFERENCE = 10.5 (the sampler guarantees it), so the threshold sits between the two. Per video
# it is raised by the video's noise floor, the NOISE_FLOOR_PERCENTILE of its frame differences (<= 0.7 on
# ground truth; about the noise level of a noisy video).
CUT_THRESHOLD = (8.4 + MIN_CUT_DIFFERENCE) / 2
NOISE_FLOOR_PERCENTILE = 10
CUT_TOLERANCE = 1  # a detected cut may be this many frames off the true boundary
FOREGROUND_DISTANCE = 40.0  # RGB distance to the sky-ground colour segment; palette colours are >= 63 away
BAND = 0.05, 0.9  # setting bands: rows above BAND[0]*H (sky) and below BAND[1]*H (ground)
MIN_AREA = 0.004  # smallest character component, fraction of the frame area
MAX_ASPECT = 1.5  # characters are as wide as tall; the landmark is twice as tall as wide
CORE_BOX = 0.08, 0.15  # core sample: +-0.08 h around the centre column, rows from the centre to +0.15 h
FILL_RATIOS = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}  # area / bounding box
GROW_RATIO, SHRINK_RATIO = 1.12, 0.9  # end/start height ratios that count as grows / shrinks
MOVE_MIN = 0.08  # centre shift (fraction of the width) that counts as a move
BOUNCE_MIN = 0.04  # vertical range of the bottom edge (fraction of the height) that counts as a bounce
LANDMARK_X_TOLERANCE = 0.05  # fraction of the width
METRICS = ("transition", "setting", "body_colour", "shape", "shot_size", "motion")
METRICS += ("core_consistency", "landmark_consistency", "inter_shot", "intra_shot")

COLOUR_NAMES = list(COLOURS)
COLOUR_RGB = np.array(list(COLOURS.values()), dtype=np.float32)
NUM_BODY_COLOURS = len(PALETTE)  # COLOURS starts with the palette; its last two are core-only


@dataclass
class CharacterTrack:
    """Per-frame measurements of one character in a shot; NaN where it was not found."""

    body: np.ndarray  # index into COLOUR_NAMES
    shape: np.ndarray  # index into SHAPES
    core: np.ndarray  # index into COLOUR_NAMES
    cx: np.ndarray  # centre x, fraction of the width
    bottom: np.ndarray  # bottom edge, fraction of the height
    height: np.ndarray  # fraction of the height


# ----------------------------------------------------------------------------- cuts


def frame_differences(video: np.ndarray) -> np.ndarray:
    """(T,) mean absolute difference of each frame to the previous one (0 for the first frame)."""
    video = video.astype(np.float32)
    return np.concatenate([[0.0], np.abs(video[1:] - video[:-1]).mean(axis=(1, 2, 3))])


def detect_cuts(video: np.ndarray, threshold: float = CUT_THRESHOLD) -> np.ndarray:
    """Frame indices t whose difference to frame t-1 exceeds the threshold plus the video's noise floor."""
    differences = frame_differences(video)
    floor = np.percentile(differences[1:], NOISE_FLOOR_PERCENTILE) if len(differences) > 1 else 0.0
    return np.flatnonzero(differences > threshold + floor)


def _near(frame: int, targets: np.ndarray) -> bool:
    return bool(np.any(np.abs(targets - frame) <= CUT_TOLERANCE))


# ----------------------------------------------------------------------------- pixels


def measure_setting(frames: np.ndarray) -> tuple[str, np.ndarray, np.ndarray]:
    """Nearest setting to the median colours of the top and bottom bands over a shot's frames."""
    h = frames.shape[1]
    sky = np.median(frames[:, : max(1, round(BAND[0] * h))].reshape(-1, 3), axis=0)
    ground = np.median(frames[:, round(BAND[1] * h) :].reshape(-1, 3), axis=0)
    errors = {s: np.abs(sky - a).sum() + np.abs(ground - b).sum() for s, (a, b) in SETTINGS.items()}
    return min(errors, key=errors.get), sky.astype(np.float32), ground.astype(np.float32)


def _quantise(frames: np.ndarray) -> np.ndarray:
    """(T, H, W) index of the nearest colour in COLOURS."""
    scores = frames @ (-2 * COLOUR_RGB.T) + (COLOUR_RGB**2).sum(axis=1)  # |p - c|^2 - |p|^2
    return scores.argmin(axis=-1)


def _foreground(frames: np.ndarray, sky: np.ndarray, ground: np.ndarray) -> np.ndarray:
    """Pixels far from every mix of the sky and ground colours."""
    direction = ground - sky
    t = ((frames - sky) @ direction) / max(float(direction @ direction), 1e-6)
    nearest = sky + np.clip(t, 0, 1)[..., None] * direction
    return ((frames - nearest) ** 2).sum(axis=-1) > FOREGROUND_DISTANCE**2


NEIGHBOURS = ((0, 1), (1, 0), (1, 1), (1, -1))  # (dy, dx) of half the 8-neighbourhood; links go both ways


def _pair(dy: int, dx: int) -> tuple[tuple, tuple]:
    """Index expressions (lo, hi) such that a[hi] is the (dy, dx) neighbour of a[lo], for (T, H, W) arrays."""

    def axis(d: int) -> tuple[slice, slice]:
        return (slice(None, -d or None), slice(d, None)) if d >= 0 else (slice(-d, None), slice(None, d))

    (ylo, yhi), (xlo, xhi) = axis(dy), axis(dx)
    return (slice(None), ylo, xlo), (slice(None), yhi, xhi)


def _label_components(colour: np.ndarray) -> np.ndarray:
    """8-connected components of equal colour per frame; -1 is background. Label = smallest pixel index."""
    inside = colour >= 0
    labels = np.where(inside, np.arange(colour.size, dtype=np.int32).reshape(colour.shape), colour.size)
    links = [(lo, hi, (colour[lo] == colour[hi]) & inside[lo]) for lo, hi in (_pair(*d) for d in NEIGHBOURS)]
    while True:
        previous = labels.copy()
        for lo, hi, same in links:  # both ends of every link take the smaller label
            smaller = np.minimum(labels[lo], labels[hi])
            np.copyto(labels[lo], smaller, where=same)
            np.copyto(labels[hi], smaller, where=same)
        labels[inside] = labels.reshape(-1)[labels[inside]]  # pointer jumping: adopt the label of the label
        if np.array_equal(labels, previous):
            return np.where(inside, labels, -1)


def _components(labels: np.ndarray, colour: np.ndarray) -> dict[str, np.ndarray]:
    """Table of components: frame, colour, pixel count and inclusive bounding box."""
    t, y, x = np.nonzero(labels >= 0)
    ids, inverse, count = np.unique(labels[t, y, x], return_inverse=True, return_counts=True)
    table = {"id": ids, "count": count, "t": t[np.unique(inverse, return_index=True)[1]]}
    table["colour"] = colour.reshape(-1)[ids]
    for axis, values, size in (("y", y, labels.shape[1]), ("x", x, labels.shape[2])):
        table[f"{axis}0"], table[f"{axis}1"] = np.full(len(ids), size), np.full(len(ids), -1)
        np.minimum.at(table[f"{axis}0"], inverse, values)
        np.maximum.at(table[f"{axis}1"], inverse, values)
    return table


# ----------------------------------------------------------------------------- characters and landmark


def _pick_characters(table: dict[str, np.ndarray], rows: np.ndarray, count: int) -> list[int]:
    """The `count` largest components of `rows` not nested in a bigger one, ordered left to right."""
    picked: list[int] = []
    for r in rows[np.argsort(-table["count"][rows], kind="stable")]:
        if len(picked) == count:
            break
        if not any(_nested(table, r, p) for p in picked):
            picked.append(int(r))
    return sorted(picked, key=lambda r: table["x0"][r])


def _nested(table: dict[str, np.ndarray], inner: int, outer: int) -> bool:
    inside_y = table["y0"][outer] <= table["y0"][inner] and table["y1"][inner] <= table["y1"][outer]
    inside_x = table["x0"][outer] <= table["x0"][inner] and table["x1"][inner] <= table["x1"][outer]
    return bool(inside_y and inside_x)


def _measure_character(labels: np.ndarray, quantised: np.ndarray, table: dict, r: int) -> tuple:
    """(body, shape, core, cx, bottom, height) of component r; positions in pixels."""
    t, y0, y1, x0, x1 = (int(table[k][r]) for k in ("t", "y0", "y1", "x0", "x1"))
    mask = labels[t, y0 : y1 + 1, x0 : x1 + 1] == table["id"][r]
    first = mask.argmax(axis=1)
    last = mask.shape[1] - 1 - mask[:, ::-1].argmax(axis=1)
    fill = (last - first + 1).sum() / mask.size  # the core is a hole: fill each row between its ends
    shape = int(np.argmin([abs(fill - FILL_RATIOS[s]) for s in SHAPES]))
    height, cx, cy = y1 - y0 + 1, (x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2
    half = max(CORE_BOX[0] * height, 0.5)
    rows = slice(int(cy), int(np.ceil(cy + max(CORE_BOX[1] * height, 1))))
    box = quantised[t, rows, int(cx - half) : int(np.ceil(cx + half))].reshape(-1)
    box = box[box != table["colour"][r]]
    core = np.bincount(box, minlength=len(COLOURS)).argmax() if box.size else np.nan
    return table["colour"][r], shape, core, cx, y1 + 1, height


def _find_landmark(table: dict, rows: np.ndarray, picked: list[int], size: tuple) -> tuple[int, float] | None:
    """(colour, centre x as a fraction of the width) of the most landmark-like component, or None."""
    (h, w), height = size, table["y1"] - table["y0"] + 1
    on_horizon = np.abs(table["y1"] + 1 - HORIZON * h) <= 0.05 * h
    tall = np.abs(height - LANDMARK_HEIGHT * h) <= 0.5 * LANDMARK_HEIGHT * h
    thin = table["x1"] - table["x0"] + 1 <= 2 * LANDMARK_WIDTH * w
    shaped = rows[(on_horizon & tall & thin)[rows]]
    free = [r for r in shaped if all(r != p and not _nested(table, r, p) for p in picked)]
    if not free:
        return None
    r = max(free, key=lambda r: table["count"][r])
    return int(table["colour"][r]), (table["x0"][r] + table["x1"][r] + 1) / 2 / w


@dataclass
class ShotMeasurement:
    """What `measure_shot` reads from one shot."""

    setting: str
    characters: list[CharacterTrack]  # left to right
    landmark_frame: int | None  # the frame the landmark was looked for on
    landmark: tuple | None  # (colour index, centre x as a fraction of the width), None if not found


def measure_shot(
    frames: np.ndarray,
    num_characters: int,
    landmark_frame: int | None = None,
) -> ShotMeasurement:
    """Read a shot's frames (T, H, W, 3) back into setting, per-frame character attributes and landmark."""
    frames = frames.astype(np.float32)
    T, H, W = frames.shape[:3]
    setting, sky, ground = measure_setting(frames)
    quantised = _quantise(frames)
    colour = np.where(_foreground(frames, sky, ground), quantised, -1)
    labels = _label_components(colour)
    table = _components(labels, colour)
    height, width = table["y1"] - table["y0"] + 1, table["x1"] - table["x0"] + 1
    body_like = (table["colour"] < NUM_BODY_COLOURS) & (table["count"] >= MIN_AREA * H * W)
    candidate = body_like & (height <= MAX_ASPECT * width) & (width <= MAX_ASPECT * height)
    values = np.full((num_characters, T, 6), np.nan)
    landmark = None
    for t in range(T):
        in_frame = np.flatnonzero(table["t"] == t)
        picked = _pick_characters(table, in_frame[candidate[in_frame]], num_characters)
        for i, r in enumerate(picked):
            values[i, t] = _measure_character(labels, quantised, table, r)
        if t == landmark_frame:
            landmark = _find_landmark(table, in_frame, picked, (H, W))
    scale = np.array([1, 1, 1, 1 / W, 1 / H, 1 / H])
    tracks = [CharacterTrack(*(values[i] * scale).T) for i in range(num_characters)]
    return ShotMeasurement(setting, tracks, landmark_frame, landmark)


def classify_motion(track: CharacterTrack) -> str | None:
    """The motion phrase key (see toyworld.MOTIONS) that best explains a character's trajectory."""
    start, end = slice(0, 3), slice(-3, None)
    scale = _median(track.height[end]) / _median(track.height[start])
    dx = _median(track.cx[end]) - _median(track.cx[start])
    bottom = track.bottom[~np.isnan(track.bottom)]
    if np.isnan(scale) or np.isnan(dx) or bottom.size < len(track.bottom) // 2:
        return None
    if scale > GROW_RATIO or scale < SHRINK_RATIO:
        return "grow" if scale > 1 else "shrink"
    if abs(dx) > MOVE_MIN:
        return "right" if dx > 0 else "left"
    return "bounce" if np.ptp(bottom) > BOUNCE_MIN else "still"


def _median(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(np.median(x)) if x.size else np.nan


# ----------------------------------------------------------------------------- scoring


def _clear_landmark_frame(story: ToyStory, k: int, margin: float = 0.02) -> int | None:
    """Ground truth: the frame of shot k nearest its middle where no character's box touches the landmark."""
    landmark = story.landmarks[story.segment(k)]
    cx, cy, h = character_tracks(story, k).transpose(1, 0, 2)  # each (num_shown, T)
    apart_x = np.abs(cx - landmark.x) > h / 2 + LANDMARK_WIDTH / 2 + margin
    apart_y = cy + h / 2 < HORIZON - LANDMARK_HEIGHT - margin
    clear = np.flatnonzero(np.all(apart_x | apart_y, axis=0))
    return int(clear[np.argmin(np.abs(clear - FRAMES_PER_SHOT // 2))]) if clear.size else None


def _score_attributes(story: ToyStory, k: int, m: ShotMeasurement) -> dict[str, float]:
    """Setting, body colour, shape, shot size, motion and intra-shot consistency of shot k."""
    shot, mid = story.shots[k], FRAMES_PER_SHOT // 2
    heights = np.array(list(SHOT_SIZES.values()))
    checks = []  # per shown character: body colour, shape, shot size, motion, intra-shot consistency
    for i, track in zip(shot.characters, m.characters, strict=True):
        truth = story.characters[i]
        found = track.height[mid] > 0  # False for NaN
        size = list(SHOT_SIZES)[np.abs(heights - track.height[mid]).argmin()] if found else None
        checks.append(
            [
                track.body[mid] == COLOUR_NAMES.index(truth.body),
                track.shape[mid] == SHAPES.index(truth.shape),
                size == shot.size,
                classify_motion(track) == shot.motion,
                _intra_shot(track),
            ]
        )
    body, shape, size, motion, intra = np.mean(checks, axis=0)
    return {
        "setting": float(m.setting == story.setting_of(k)),
        "body_colour": body,
        "shape": shape,
        "shot_size": size,
        "motion": motion,
        "intra_shot": intra,
    }


def _intra_shot(track: CharacterTrack) -> float:
    """Fraction of frames whose body colour, shape and core colour equal the middle frame's."""
    identity = np.stack([track.body, track.shape, track.core], axis=1)
    return float(np.all(identity == identity[len(identity) // 2], axis=1).mean())


def _score_memory(story: ToyStory, k: int, m: ShotMeasurement, cores: dict, landmarks: dict) -> dict:
    """Inter-shot consistency of shot k against the first measurement of each character and landmark.

    `cores` (character -> core) and `landmarks` (segment -> landmark) hold the references and are updated.
    """
    core_checks, landmark_checks = [], []
    for i, track in zip(story.shots[k].characters, m.characters, strict=True):
        core = track.core[FRAMES_PER_SHOT // 2]
        if i in cores:
            core_checks.append(float(core == cores[i]))  # NaN (not found) never equals
        else:
            cores[i] = core
    if m.landmark_frame is not None:
        segment = story.segment(k)
        if segment not in landmarks:
            landmarks[segment] = m.landmark
        else:
            ref, now = landmarks[segment], m.landmark
            same = ref is not None and now is not None and ref[0] == now[0]
            landmark_checks.append(float(same and abs(ref[1] - now[1]) <= LANDMARK_X_TOLERANCE))
    return {
        "core_consistency": _mean(core_checks),
        "landmark_consistency": _mean(landmark_checks),
        "inter_shot": _mean(core_checks + landmark_checks),
    }


def _mean(values: list) -> float:
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else np.nan


def evaluate_story(video: np.ndarray, story: ToyStory) -> dict:
    """Score one video (T, H, W, 3) against its story.

    Returns {"transition": story-level 0/1, "shots": [per-shot dict of METRICS]}; NaN marks a metric that
    does not apply to a shot (e.g. consistency in a character's first shot). A video with the wrong number
    of frames is cut or padded with black frames.
    """
    num_frames = FRAMES_PER_SHOT * len(story.shots)
    video = np.asarray(video)[:num_frames]
    video = np.concatenate([video, np.zeros((num_frames - len(video), *video.shape[1:]), video.dtype)])
    cuts = detect_cuts(video)
    starts = np.arange(1, len(story.shots)) * FRAMES_PER_SHOT
    transition = all(_near(b, cuts) for b in starts) and all(_near(c, starts) for c in cuts)
    cores, landmarks, shots = {}, {}, []
    for k, shot in enumerate(story.shots):
        first = k * FRAMES_PER_SHOT
        frames = video[first : first + FRAMES_PER_SHOT]
        m = measure_shot(frames, len(shot.characters), _clear_landmark_frame(story, k))
        own = cuts[(cuts >= first) & (cuts < first + FRAMES_PER_SHOT)]
        found = k == 0 or _near(first, cuts)
        result = {"transition": float(found and all(_near(c, starts) for c in own))}
        result.update(_score_attributes(story, k, m))
        result.update(_score_memory(story, k, m, cores, landmarks))
        shots.append(result)
    return {"transition": float(transition), "shots": shots}


def evaluate_stories(videos: list[np.ndarray], stories: list[ToyStory]) -> dict:
    """Every metric overall and by shot index (1-based), over a set of stories.

    "overall" averages shots (transition: the fraction of stories whose cuts are exactly right), "by_shot"
    maps metric -> {shot index: mean}; NaN entries (metric not applicable) are left out of the means.
    """
    results = [evaluate_story(v, s) for v, s in zip(videos, stories, strict=True)]
    rows = [(k + 1, shot) for r in results for k, shot in enumerate(r["shots"])]
    indices = sorted({k for k, _ in rows})
    overall = {m: _mean([shot[m] for _, shot in rows]) for m in METRICS}
    overall["transition"] = _mean([r["transition"] for r in results])
    by_shot = {m: {i: _mean([shot[m] for k, shot in rows if k == i]) for i in indices} for m in METRICS}
    return {"overall": overall, "by_shot": by_shot, "stories": results}
