"""The toy world: a procedurally rendered multi-shot story domain with known ground truth.

Implements the contract of `shared/toyworld.md`: a seeded story sampler, the caption grammar (the reference
JSON story format) and a deterministic numpy renderer (33 frames per shot, 16 fps, square frames).

Caption grammar (exact):
    global_caption: "A <colour> <shape>[ and a <colour> <shape>] in the <setting>."
    shot, one character:  "<Size> of the <shape> <motion>[, on the <left|right>][, now in the <setting>]."
    shot, two characters: "<Size> of the <shape> and the <shape> <plural motion>[, now in the <setting>]."
where <Size> is "Close-up", "Medium shot" or "Wide shot", <motion> is one of "stays still", "moves left",
"moves right", "bounces", "grows", "shrinks" and <plural motion> the same verb without the "s"
("stay still", "move left", ...). The two characters are named in story order; the first stands on the left.

Sampling rules beyond the spec's text (interpretations, all in `sample_story`):
- two characters have distinct shapes, so that a caption naming a shape always names one character;
- two-character shots are medium or wide shots and never "move" (otherwise the characters would overlap);
- a single character that moves left (right) starts at the centre or on the right (left), so it visibly moves;
- the landmark colour is never a body colour of the story, so the landmark never merges with a character;
- consecutive shots differ in size, characters or setting, and their cut (mean absolute difference between
  the last frame of one shot and the first of the next) is at least `MIN_CUT_DIFFERENCE` (shots are redrawn);
- a bounce is two bounces per shot, as the spec's words say (see BOUNCE_PERIOD).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np

FRAMES_PER_SHOT = 33  # 1 + 4 * 8: 9 latent frames with the 4x temporal VAE
FPS = 16
HORIZON = 0.625  # horizon line, fraction of the frame height from the top

SETTINGS = {  # setting -> (sky RGB, ground RGB)
    "meadow": ((135, 206, 235), (34, 139, 34)),
    "desert": ((255, 228, 181), (194, 154, 108)),
    "ocean": ((173, 216, 230), (0, 70, 140)),
    "night": ((15, 20, 60), (40, 40, 50)),
    "snow": ((200, 200, 210), (250, 250, 250)),
    "studio": ((230, 220, 200), (120, 80, 50)),
}
PALETTE = {  # body colours (named in captions); landmark colours are drawn from here too
    "red": (220, 40, 40),
    "orange": (255, 140, 0),
    "yellow": (255, 220, 0),
    "blue": (40, 80, 220),
    "purple": (140, 60, 200),
    "pink": (255, 105, 180),
}
COLOURS = {**PALETTE, "white": (255, 255, 255), "black": (20, 20, 20)}  # core colours (never named)
SHAPES = ("circle", "square", "triangle")
SHOT_SIZES = {"close-up": 0.55, "medium": 0.35, "wide": 0.20}  # character height, fraction of the frame
SIZE_WORDS = {"close-up": "Close-up", "medium": "Medium shot", "wide": "Wide shot"}
POSITIONS = {"left": 0.25, "centre": 0.5, "right": 0.75}  # horizontal centre at rest, fraction of the width
MOTIONS = {  # motion -> (phrase with one character, phrase with two)
    "still": ("stays still", "stay still"),
    "left": ("moves left", "move left"),
    "right": ("moves right", "move right"),
    "bounce": ("bounces", "bounce"),
    "grow": ("grows", "grow"),
    "shrink": ("shrinks", "shrink"),
}
CORE_SCALE = 0.45  # the core is a concentric copy of the body at this size
LANDMARK_WIDTH, LANDMARK_HEIGHT = 0.08, 0.16  # fractions of the frame
LANDMARK_X_RANGE = (0.1, 0.9)  # horizontal centre, uniform
MOVE_DISTANCE = 0.35  # moves left/right: centre shift over the shot, fraction of the width
# Bounce lift = BOUNCE_HEIGHT * |sin(2 pi f / BOUNCE_PERIOD)|: the spec's "two bounces per shot". (Its formula
# |sin(2 pi f / 16)| gives four bounces in 33 frames, and frame changes inside a shot as large as cuts.)
BOUNCE_HEIGHT, BOUNCE_PERIOD = 0.15, 32
GROW_END, SHRINK_END = 1.3, 0.75  # grows / shrinks: scale goes linearly from 1.0 to this
SETTING_CHANGE_PROB = 0.3  # chance that a story (2+ shots) moves to a new setting once
MIN_CUT_DIFFERENCE = 10.5  # every cut changes a 64x64 frame by >= this mean absolute difference (0..255)
MAX_SHOT_TRIES = 50  # redraws of a shot that does not cut visibly from the previous one
MAX_STORY_TRIES = 100  # redraws of a whole story when some shot cannot cut visibly (rare)


@dataclass(frozen=True)
class Character:
    shape: str  # one of SHAPES
    body: str  # PALETTE name, named in the global caption
    core: str  # COLOURS name, never named: only earlier shots show it


@dataclass(frozen=True)
class Landmark:
    colour: str  # PALETTE name, never named
    x: float  # horizontal centre, fraction of the width


@dataclass(frozen=True)
class Shot:
    size: str  # SHOT_SIZES key
    characters: tuple[int, ...]  # indices into ToyStory.characters: (0,), (1,) or (0, 1)
    motion: str  # MOTIONS key
    position: str | None  # POSITIONS key at rest for one character; None for two (left and right)
    new_setting: str | None = None  # "now in the <setting>": the story moves there from this shot on


@dataclass(frozen=True)
class ToyStory:
    setting: str  # setting of the first shot
    characters: tuple[Character, ...]
    landmarks: tuple[Landmark, ...]  # one per setting segment
    shots: tuple[Shot, ...]

    def segment(self, k: int) -> int:
        """Index of the setting segment (and landmark) of shot k (0-based)."""
        return sum(shot.new_setting is not None for shot in self.shots[: k + 1])

    def setting_of(self, k: int) -> str:
        changes = [shot.new_setting for shot in self.shots[: k + 1] if shot.new_setting is not None]
        return changes[-1] if changes else self.setting


def story_from_dict(d: dict) -> ToyStory:
    """Inverse of `dataclasses.asdict(story)` (as stored in the exported JSON files)."""
    return ToyStory(
        setting=d["setting"],
        characters=tuple(Character(**c) for c in d["characters"]),
        landmarks=tuple(Landmark(**m) for m in d["landmarks"]),
        shots=tuple(Shot(**{**s, "characters": tuple(s["characters"])}) for s in d["shots"]),
    )


def story_to_dict(story: ToyStory) -> dict:
    return asdict(story)


# ----------------------------------------------------------------------------- sampling


def sample_story(rng: np.random.Generator | int, num_shots: int) -> ToyStory:
    """Draw a story of `num_shots` shots obeying every rule of the toy world (see module docstring)."""
    rng = np.random.default_rng(rng)
    for _ in range(MAX_STORY_TRIES):
        story = _draw_story(rng, num_shots)
        if story is not None:
            return story
    raise RuntimeError(f"no story with visible cuts in {MAX_STORY_TRIES} draws")


def _draw_story(rng: np.random.Generator, num_shots: int) -> ToyStory | None:
    """One attempt: characters, settings and landmarks, then shots redrawn until every cut is visible."""
    characters = _sample_characters(rng)
    setting = str(rng.choice(list(SETTINGS)))
    change_at, new_setting = None, None
    if num_shots >= 2 and rng.random() < SETTING_CHANGE_PROB:
        change_at = int(rng.integers(1, num_shots))
        new_setting = str(rng.choice([s for s in SETTINGS if s != setting]))
    landmark_colours = [c for c in PALETTE if c not in {ch.body for ch in characters}]
    landmarks = tuple(
        Landmark(str(rng.choice(landmark_colours)), round(float(rng.uniform(*LANDMARK_X_RANGE)), 4))
        for _ in range(1 + (change_at is not None))
    )
    story = ToyStory(setting, characters, landmarks, ())
    for k in range(num_shots):
        new = new_setting if k == change_at else None
        for _ in range(MAX_SHOT_TRIES):
            shot = _sample_shot(rng, characters, new)
            candidate = ToyStory(setting, characters, landmarks, (*story.shots, shot))
            if k == 0 or _cut_is_visible(candidate, k):
                break
        else:
            return None
        story = candidate
    return story


def _sample_characters(rng: np.random.Generator) -> tuple[Character, ...]:
    num = int(rng.integers(1, 3))
    shapes = rng.choice(SHAPES, size=num, replace=False)
    characters = []
    for shape in shapes:
        body = str(rng.choice(list(PALETTE)))
        core = str(rng.choice([c for c in COLOURS if c != body]))
        characters.append(Character(str(shape), body, core))
    return tuple(characters)


def _sample_shot(rng: np.random.Generator, characters: tuple, new_setting: str | None) -> Shot:
    groups = [(0,), (1,), (0, 1)] if len(characters) == 2 else [(0,)]
    shown = groups[int(rng.integers(len(groups)))]
    if len(shown) == 2:
        size = str(rng.choice(["medium", "wide"]))
        motion = str(rng.choice(["still", "grow", "shrink"]))
        return Shot(size, shown, motion, None, new_setting)
    size = str(rng.choice(list(SHOT_SIZES)))
    motion = str(rng.choice(list(MOTIONS)))
    blocked = {"left": "left", "right": "right"}.get(motion)  # a mover starts away from its target edge
    position = str(rng.choice([p for p in POSITIONS if p != blocked]))
    return Shot(size, shown, motion, position, new_setting)


def _cut_is_visible(story: ToyStory, k: int) -> bool:
    """Shot k differs from shot k-1 in size, characters or setting, and the cut is a large frame change."""
    prev, shot = story.shots[k - 1], story.shots[k]
    if prev.size == shot.size and prev.characters == shot.characters and shot.new_setting is None:
        return False
    last = render_shot(story, k - 1, f=[FRAMES_PER_SHOT - 1]).astype(np.float32)
    first = render_shot(story, k, f=[0]).astype(np.float32)
    return float(np.abs(first - last).mean()) >= MIN_CUT_DIFFERENCE


# ----------------------------------------------------------------------------- captions


def captions(story: ToyStory) -> dict[str, str]:
    """The story in the reference JSON format: {"global_caption": ..., "shot1": ..., "shotN": ...}."""
    names = [f"{c.body} {c.shape}" for c in story.characters]
    out = {"global_caption": f"A {' and a '.join(names)} in the {story.setting}."}
    for k, shot in enumerate(story.shots):
        out[f"shot{k + 1}"] = _shot_caption(story, shot)
    return out


def _shot_caption(story: ToyStory, shot: Shot) -> str:
    subject = " and the ".join(story.characters[i].shape for i in shot.characters)
    motion = MOTIONS[shot.motion][len(shot.characters) - 1]
    text = f"{SIZE_WORDS[shot.size]} of the {subject} {motion}"
    if shot.position in ("left", "right"):
        text += f", on the {shot.position}"
    if shot.new_setting is not None:
        text += f", now in the {shot.new_setting}"
    return text + "."


def caption_tokens(text: str) -> list[str]:
    """Word-level split of a caption: lower-case, then the regex `\\w+|[^\\w\\s]`.

    "meadow.shot0:Close-up" -> ["meadow", ".", "shot0", ":", "close", "-", "up"].
    """
    return re.findall(r"\w+|[^\w\s]", text.lower())


def caption_vocabulary() -> list[str]:
    """Every token `caption_tokens` can return for `global_caption + "shot{k}:" + shot{k+1}`, sorted."""
    phrases = [phrase for pair in MOTIONS.values() for phrase in pair]
    words = [*SETTINGS, *PALETTE, *SHAPES, *SIZE_WORDS.values(), *phrases]
    words += ["a", "and", "in", "the", "of", "on", "now", "left", "right", ".", ",", ":"]
    words += [f"shot{k}" for k in range(8)]
    return sorted({token for word in words for token in caption_tokens(word)})


# ----------------------------------------------------------------------------- rendering


def character_tracks(story: ToyStory, k: int, f: np.ndarray | None = None) -> np.ndarray:
    """Per shown character and frame of shot k: centre x, centre y and height, as fractions of the frame.

    Returns (num_shown, 3, len(f)) for frame indices f (default: all FRAMES_PER_SHOT frames).
    Width equals height for every shape.
    """
    shot = story.shots[k]
    f = np.arange(FRAMES_PER_SHOT) if f is None else np.asarray(f)
    progress = f / (FRAMES_PER_SHOT - 1)
    end_scale = {"grow": GROW_END, "shrink": SHRINK_END}.get(shot.motion, 1.0)
    h = SHOT_SIZES[shot.size] * (1 + (end_scale - 1) * progress)
    lift = BOUNCE_HEIGHT * np.abs(np.sin(2 * np.pi * f / BOUNCE_PERIOD)) if shot.motion == "bounce" else 0.0
    shift = {"left": -MOVE_DISTANCE, "right": MOVE_DISTANCE}.get(shot.motion, 0.0) * progress
    starts = [POSITIONS[shot.position]] if shot.position else [POSITIONS["left"], POSITIONS["right"]]
    tracks = []
    for x0 in starts:
        cx = np.clip(x0 + shift, h / 2, 1 - h / 2)  # keep the body inside the frame
        cy = np.clip(HORIZON - h / 2 - lift, h / 2, 1 - h / 2)
        tracks.append(np.stack([cx, cy, h]))
    return np.stack(tracks)


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, cx, cy, h) -> np.ndarray:
    """Pixels (centres u, v) inside a shape of height h centred at (cx, cy); all arrays broadcast."""
    dx, dy = u - cx, v - cy
    if shape == "circle":
        return dx**2 + dy**2 <= (h / 2) ** 2
    if shape == "square":
        return (np.abs(dx) <= h / 2) & (np.abs(dy) <= h / 2)
    return (dy <= h / 2) & (np.abs(dx) <= (dy + h / 2) / 2)  # triangle, apex up, base = height


def render_shot(story: ToyStory, k: int, size: int = 64, f: np.ndarray | None = None) -> np.ndarray:
    """Render shot k (0-based) as uint8 (len(f), size, size, 3); f: frame indices, default all 33."""
    tracks = character_tracks(story, k, f)
    centres = (np.arange(size) + 0.5) / size
    u, v = centres[None, None, :], centres[None, :, None]
    sky, ground = (np.array(c, dtype=np.uint8) for c in SETTINGS[story.setting_of(k)])
    background = np.where(v[0, :, :, None] < HORIZON, sky, ground)
    frames = np.broadcast_to(background, (tracks.shape[-1], size, size, 3)).copy()
    landmark = story.landmarks[story.segment(k)]
    in_landmark = (np.abs(u - landmark.x) <= LANDMARK_WIDTH / 2) & (v >= HORIZON - LANDMARK_HEIGHT)
    in_landmark &= v < HORIZON
    frames[np.broadcast_to(in_landmark, frames.shape[:3])] = PALETTE[landmark.colour]
    for i, track in zip(story.shots[k].characters, tracks, strict=True):
        character = story.characters[i]
        cx, cy, h = (t[:, None, None] for t in track)
        frames[_shape_mask(character.shape, u, v, cx, cy, h)] = PALETTE[character.body]
        frames[_shape_mask(character.shape, u, v, cx, cy, CORE_SCALE * h)] = COLOURS[character.core]
    return frames


def render_story(story: ToyStory, size: int = 64) -> np.ndarray:
    """Render every shot, back to back: uint8 (FRAMES_PER_SHOT * num_shots, size, size, 3)."""
    return np.concatenate([render_shot(story, k, size) for k in range(len(story.shots))])


def shot_boundaries(num_shots: int) -> list[list[int]]:
    """[start, end) frame range per shot, as in the reference CSV's `frame_number` column."""
    return [[k * FRAMES_PER_SHOT, (k + 1) * FRAMES_PER_SHOT] for k in range(num_shots)]
