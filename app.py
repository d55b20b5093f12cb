"""ShotStream Live: interactive, streaming, multi-shot video generation in a Gradio app.

    python app.py                      # the embedded toy-world model, offline, on the CPU
    python app.py --model shotstream   # KlingTeam/ShotStream on Wan2.1-T2V-1.3B (downloaded from the Hub)

The model can also be chosen with SHOTSTREAM_MODEL=tiny|shotstream; on a Hugging Face Space the default is the real
model. SHOTSTREAM_WEIGHTS / SHOTSTREAM_BASE_MODEL point the real model at local files instead of the Hub.

How a shot flows: the prompt is checked on the CPU, then `stream_shot`, the one `@spaces.GPU` function, runs the
pipeline and yields a `ShotUpdate` per chunk: an MPEG-TS segment for the streaming player and a status line, and on the
last chunk the story with the shot committed and the shot's mp4. A visitor's `Session` (in `gr.State`) is replaced only
then, so a stopped or failed shot leaves the story, the chat and the files exactly as they were.
"""

import spaces  # first: on ZeroGPU it patches torch's CUDA at import

# isort: split
import argparse
import atexit
import json
import os
import random
import shutil
import tempfile
import time
import unicodedata
from collections.abc import Generator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import gradio as gr
import numpy as np
import torch

from shotstream.pipeline import ShotStreamPipeline
from shotstream.presets import EMBEDDED_MODEL, get_preset
from shotstream.story import MAX_JSON_BYTES, Story, StoryError, parse_story_json
from shotstream.text import clean_text
from shotstream.video_io import read_video, write_mp4, write_ts_chunk

ROOT = Path(__file__).resolve().parent
EXAMPLES_DIR = ROOT / "examples"  # toy-*.json for the embedded model, film-*.json for the real one
MODELS = ("tiny", "shotstream")
REAL_PRESET = "wan2.1-1.3b"
BASE_MODEL_FILES = ["vae/*", "tokenizer/*", "text_encoder/*"]  # the Wan transformer is not needed
MAX_PROMPT_CHARS = 2_000  # longer prompts are cut, with a notice (the text encoder reads far fewer tokens anyway)
DISPLAY_SIZE = 256  # smaller videos are enlarged (nearest neighbour, integer factor) to at least this
GPU_BASE_SECONDS, GPU_SECONDS_PER_CHUNK = 20, 4  # ZeroGPU lease per shot: text + context, then each chunk
QUEUE_SIZE, CONCURRENT_SHOTS, CONCURRENT_OTHER = 32, 2, 4
SESSION_HOURS = 2  # files a visitor was shown are kept in Gradio's cache this long
STOPPED = "Stopped: the story is as it was before this shot."


@dataclass(frozen=True)
class ShotUpdate:
    """What `stream_shot` yields per chunk. Picklable: on ZeroGPU it crosses from the GPU worker."""

    segment: str  # MPEG-TS file of this chunk
    status: str
    story: Story | None = None  # last chunk only: the story with the shot committed
    clip: str | None = None  # last chunk only: the whole shot as mp4


@dataclass(frozen=True)
class Session:
    """One visitor's story, kept in `gr.State` on the CPU. Replaced by handlers, never changed in place."""

    story: Story | None = None  # None until the first shot is done
    clips: tuple[str, ...] = ()  # mp4 of every shot
    seeds: tuple[int, ...] = ()  # seed of every shot
    folder: str = ""  # this visitor's files


def copy_story(story: Story) -> Story:
    """A story that the library may extend in place without touching `story` (shot memories are immutable)."""
    return replace(story, shots=list(story.shots))


def clean_input(text: str | None, what: str) -> tuple[str, list[str]]:
    """Control characters removed and the text cut to MAX_PROMPT_CHARS; returns it and notices for the visitor."""
    text = "".join(" " if unicodedata.category(c) in ("Cc", "Cs") else c for c in text or "").strip()
    if len(text) <= MAX_PROMPT_CHARS:
        return text, []
    notice = f"The {what} has {len(text):,} characters; only the first {MAX_PROMPT_CHARS:,} are used."
    return text[:MAX_PROMPT_CHARS].strip(), [notice]


def for_display(frames: np.ndarray) -> np.ndarray:
    """uint8 (T, H, W, 3) enlarged by an integer factor so that its short side is at least DISPLAY_SIZE."""
    factor = -(-DISPLAY_SIZE // min(frames.shape[1:3]))
    return frames.repeat(factor, axis=1).repeat(factor, axis=2) if factor > 1 else frames


def render_chat(session: Session) -> list[dict]:
    """The chat of a session: the story setting, then per shot the prompt and the finished clip."""
    if session.story is None:
        return []
    chat = [{"role": "user", "content": f"Story setting: {session.story.global_caption}"}]
    for k, (prompt, clip, seed) in enumerate(zip(session.story.prompts, session.clips, session.seeds, strict=True)):
        chat.append({"role": "user", "content": f"Shot {k + 1}: {prompt}"})
        chat.append({"role": "assistant", "content": [f"Shot {k + 1} (seed {seed})", {"path": clip}]})
    return chat


def setting_box(session: Session) -> dict:
    """The story-setting textbox: locked to the story's caption while a story is going."""
    if session.story is None:
        return gr.update(interactive=True)
    return gr.update(value=session.story.global_caption, interactive=False)


def refuse(message: str) -> gr.Error:
    """An error meant for the visitor (shown in the page, not logged as a server fault)."""
    return gr.Error(message[:1].upper() + message[1:], print_exception=False)


class StoryStudio:
    """The app's event handlers around one pipeline. Plain methods, so tests drive them without a server.

    Handlers that change the story return or yield `(player, status, chat, session, prompt, setting)`.
    """

    def __init__(self, pipe: ShotStreamPipeline, workdir: str | None = None) -> None:
        self.pipe, self.preset = pipe, pipe.preset
        self.vocabulary = toy_vocabulary() if self.preset.name == "tiny" else None
        self.workdir = workdir or tempfile.mkdtemp(prefix="shotstream-app-")
        atexit.register(shutil.rmtree, self.workdir, ignore_errors=True)
        self.stream_shot = spaces.GPU(duration=self.gpu_seconds)(self._stream_shot)

    # ------------------------------------------------------------------ GPU

    def gpu_seconds(self, story: Story, prompt: str, seed: int, folder: str) -> int:
        return GPU_BASE_SECONDS + GPU_SECONDS_PER_CHUNK * self.preset.chunks_per_shot

    def _stream_shot(self, story: Story, prompt: str, seed: int, folder: str) -> Iterator[ShotUpdate]:
        """Generate the next shot of `story` (extended in place), one `ShotUpdate` per chunk. The only GPU code."""
        name = os.path.join(folder, f"shot{story.num_shots + 1}-seed{seed}-{time.time_ns()}")
        frames, start = [], time.perf_counter()
        for chunk in self.pipe.stream_shot(story, prompt, generator=torch.Generator().manual_seed(seed)):
            frames.append(for_display(chunk.frames))
            segment = f"{name}-{chunk.chunk_index}.ts"
            write_ts_chunk(frames[-1], segment, fps=self.preset.fps)
            made, seconds = sum(map(len, frames)), time.perf_counter() - start
            status = (
                f"Shot {chunk.shot_index + 1}: chunk {chunk.chunk_index + 1} of {chunk.num_chunks}, "
                f"{made}/{self.preset.pixel_frames_per_shot} frames, {made / seconds:.1f} frames/s"
            )
            if not chunk.is_last:
                yield ShotUpdate(segment, status)
                continue
            clip = f"{name}.mp4"
            write_mp4(np.concatenate(frames), clip, fps=self.preset.fps)
            yield ShotUpdate(segment, status, chunk.story, clip)

    # ------------------------------------------------------------------ shots

    def check_shot(self, story: Story, prompt: str | None) -> tuple[str, list[str]]:
        """The cleaned prompt and notices about it; `gr.Error` when it cannot be generated."""
        prompt, notices = clean_input(prompt, "shot prompt")
        if not clean_text(prompt):
            raise refuse("Describe the shot first: the prompt is empty.")
        if story.num_shots >= self.preset.max_shots:
            raise refuse(f"The story has {story.num_shots} shots, the most this model makes. Undo or start anew.")
        limit = self.preset.text_encoder.max_length
        if (tokens := self.pipe.caption_token_counts(story, prompt)[-1]) > limit:
            notices.append(f"The shot's caption is {tokens} tokens; the model reads the first {limit}.")
        return prompt, notices + self.unknown_words(prompt)

    def new_story_for(self, setting: str | None, seed: int) -> tuple[Story, list[str]]:
        setting, notices = clean_input(setting, "story setting")
        try:
            return self.pipe.new_story(setting, seed), notices + self.unknown_words(setting)
        except StoryError as error:
            raise refuse(str(error)) from error

    def unknown_words(self, text: str) -> list[str]:
        if self.vocabulary is None:
            return []
        from train.toyworld import caption_tokens

        unknown = sorted({word for word in caption_tokens(text) if word not in self.vocabulary})
        return [f"The toy model does not know: {' '.join(unknown[:12])}."] if unknown else []

    def run_shot(
        self, current: Session, story: Story, prompt: str, seed: int, notices: list[str]
    ) -> Generator[tuple, None, Session]:
        """Stream one shot after `story` into the player; the last yield (and the return) is the new session."""
        for notice in notices:
            gr.Warning(notice)
        note = " ".join(["", *notices])
        folder = current.folder or tempfile.mkdtemp(dir=self.workdir)
        updates, segments, new = self.stream_shot(copy_story(story), prompt, seed, folder), [], None
        try:
            for update in updates:
                segments.append(update.segment)
                if update.story is None:
                    yield update.segment, update.status + note, gr.skip(), gr.skip(), gr.skip(), gr.skip()
                    continue
                keep = story.num_shots
                new = Session(update.story, (*current.clips[:keep], update.clip), (*current.seeds[:keep], seed), folder)
                self.discard(current, new)
                yield update.segment, f"{update.status}. Done.{note}", render_chat(new), new, "", setting_box(new)
        finally:
            updates.close()  # a stop lands here: the shot ends on the GPU and its story was never committed
            for segment in segments:  # Gradio has read them into its own stream by now
                Path(segment).unlink(missing_ok=True)
        if new is None:
            raise refuse("The shot ended without its last chunk; the story is unchanged.")
        return new

    def generate(self, setting: str, prompt: str, seed: float | None, randomize: bool, session: Session):
        """Generate the next shot; the first shot starts the story from `setting`."""
        seed, notices = int(seed or 0), []
        story = session.story
        if story is None:
            story, notices = self.new_story_for(setting, seed)
        prompt, more = self.check_shot(story, prompt)
        shot_seed = random.randrange(2**31) if randomize else seed + story.num_shots
        yield from self.run_shot(session, story, prompt, shot_seed, notices + more)

    def regenerate(self, session: Session):
        """Generate the last shot again with a new random seed (the old one stays until the new one is done)."""
        if session.story is None:
            raise refuse("There is no shot to regenerate.")
        story = copy_story(session.story)
        prompt = story.undo()
        yield from self.run_shot(session, story, prompt, random.randrange(2**31), [])

    def read_story(self, text: str | None, seed: int) -> tuple[Story, list[tuple[str, list[str]]], list[str]]:
        """A reference-format story checked like typed input: the new story, (prompt, notices) per shot, notices."""
        try:
            caption, prompts = parse_story_json(text or "", self.preset.max_shots)
        except StoryError as error:
            raise refuse(str(error)) from error
        story, notices = self.new_story_for(caption, seed)
        return story, [self.check_shot(story, prompt) for prompt in prompts], notices

    def play(self, text: str, seed: float | None, session: Session):
        """Generate a whole story from the reference JSON format, shot after shot (a new story)."""
        seed = int(seed or 0)
        story, shots, notices = self.read_story(text, seed)  # every shot is checked before any GPU time
        for k, (prompt, more) in enumerate(shots):
            session = yield from self.run_shot(session, story, prompt, seed + k, notices + more)
            story, notices = session.story, []

    def undo(self, session: Session) -> tuple:
        if session.story is None:
            raise refuse("There is no shot to undo.")
        story = copy_story(session.story)
        prompt = story.undo()
        new = Session(story if story.num_shots else None, session.clips[:-1], session.seeds[:-1], session.folder)
        self.discard(session, new)
        status = f"Removed shot {session.story.num_shots}; its prompt is back in the box."
        return gr.skip(), status, render_chat(new), new, prompt, setting_box(new)

    def new_story(self, session: Session) -> tuple:
        new = Session(folder=session.folder)
        self.discard(session, new)
        status = "New story: write the story setting, then the first shot."
        return None, status, [], new, "", gr.update(value="", interactive=True)

    # ------------------------------------------------------------------ files

    def export_json(self, session: Session) -> tuple[str, str]:
        """The story in the reference JSON format, as text and as a file."""
        if session.story is None:
            raise refuse("There is no story to export yet.")
        text = json.dumps(session.story.to_json(), indent=2, ensure_ascii=False)
        (path := Path(session.folder) / "story.json").write_text(text + "\n", encoding="utf-8")
        return text, str(path)

    def export_video(self, session: Session) -> str:
        """The whole story as one mp4."""
        if not session.clips:
            raise refuse("There is no shot to download yet.")
        path = Path(session.folder) / "story.mp4"
        write_mp4(np.concatenate([read_video(clip) for clip in session.clips]), path, fps=self.preset.fps)
        return str(path)

    def read_json_file(self, path: str) -> tuple[str, dict]:
        """An uploaded story file: checked, then shown in the JSON box (and its setting in the setting box)."""
        if os.path.getsize(path) > MAX_JSON_BYTES:
            raise refuse(f"The story file is larger than {MAX_JSON_BYTES:,} bytes.")
        text = Path(path).read_bytes().decode("utf-8", errors="replace")
        story, shots, _ = self.read_story(text, 0)
        gr.Info(f"A story with {len(shots)} shots: press Play story JSON to generate it.")
        return text, gr.update(value=story.global_caption)

    @staticmethod
    def discard(old: Session, new: Session) -> None:
        """Delete the clips of `old` that `new` no longer shows (the chat plays Gradio's cached copies)."""
        for clip in set(old.clips) - set(new.clips):
            Path(clip).unlink(missing_ok=True)

    @staticmethod
    def forget(session: Session | None) -> None:
        """`gr.State` delete callback: the visitor is gone."""
        if session is not None and session.folder:
            shutil.rmtree(session.folder, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- the page


def toy_vocabulary() -> set[str]:
    from train.toyworld import caption_vocabulary

    return set(caption_vocabulary())


def model_help(preset_name: str) -> str:
    if preset_name != "tiny":
        return (
            "Free English text. Like the published model's training data, the **story setting** describes the "
            "characters and the place in detail, and each **shot** its framing, action and camera. "
            "At most 512 tokens per caption."
        )
    from train.toyworld import MOTIONS, PALETTE, SETTINGS, SHAPES, SIZE_WORDS

    def words(items) -> str:
        return ", ".join(f"`{w}`" for w in items)

    return (
        "The embedded model knows only the toy world (other words are ignored):\n\n"
        "- story setting: `A <colour> <shape> [and a <colour> <shape>] in the <setting>.`\n"
        "- shot: `<shot size> of the <shape> <motion>[, on the left|right][, now in the <setting>].`; "
        "for both characters `... of the circle and the square bounce.`\n"
        f"- settings: {words(SETTINGS)}; shapes: {words(SHAPES)}; colours: {words(PALETTE)}\n"
        f"- shot sizes: {words(SIZE_WORDS.values())}\n"
        f"- motions: {words(m for m, _ in MOTIONS.values())} (both characters: {words(m for _, m in MOTIONS.values())})"
    )


def load_examples(preset_name: str) -> tuple[list[list[str]], list[str]]:
    """Rows (setting, first shot, JSON) and labels of the example stories that suit the model."""
    patterns = ["toy-*.json"] if preset_name == "tiny" else ["film-*.json", "toy-*.json"]
    rows, labels = [], []
    for path in [p for pattern in patterns for p in sorted(EXAMPLES_DIR.glob(pattern))]:
        story = json.loads(path.read_text(encoding="utf-8"))
        rows.append([story["global_caption"], story["shot1"], json.dumps(story, indent=2, ensure_ascii=False)])
        labels.append(path.stem.split("-", 1)[1].replace("-", " "))
    return rows, labels


def create_demo(pipe: ShotStreamPipeline, about: str = "", workdir: str | None = None) -> gr.Blocks:
    """The page around `pipe`; building it touches no GPU."""
    studio, preset = StoryStudio(pipe, workdir), pipe.preset
    seconds = preset.pixel_frames_per_shot / preset.fps
    with gr.Blocks(title="ShotStream", delete_cache=(3600, SESSION_HOURS * 3600)) as demo:
        gr.Markdown(f"# ShotStream: interactive multi-shot video\n{about}")
        session = gr.State(Session(), delete_callback=studio.forget)
        with gr.Row():
            with gr.Column(scale=3):
                chat = gr.Chatbot(label="Story", height=460, elem_id="chat", placeholder="Your shots appear here.")
            with gr.Column(scale=2):
                player = gr.Video(label="Live", streaming=True, autoplay=True, elem_id="player")
                status = gr.Textbox(label="Status", interactive=False, elem_id="status")
        setting = gr.Textbox(label="Story setting", elem_id="setting", placeholder="A red circle in the meadow.")
        with gr.Row():
            prompt = gr.Textbox(label="Next shot", elem_id="prompt", scale=5, placeholder="Close-up of the circle ...")
            generate_btn = gr.Button("Generate shot", variant="primary", elem_id="generate", scale=1)
            stop_btn = gr.Button("Stop", variant="stop", elem_id="stop", scale=1)
        with gr.Row():
            undo_btn = gr.Button("Undo last shot", elem_id="undo")
            regenerate_btn = gr.Button("Regenerate last shot (new seed)", elem_id="regenerate")
            new_btn = gr.Button("New story", elem_id="new")
            play_btn = gr.Button("Play story JSON", elem_id="play")
        with gr.Accordion("Advanced: seed and shot settings", open=False):
            with gr.Row():
                seed = gr.Number(label="Seed (shot k uses seed + k)", value=0, precision=0, minimum=0)
                randomize = gr.Checkbox(label="New random seed for every shot", value=False)
            gr.Markdown(
                f"Each shot: {preset.pixel_frames_per_shot} frames ({seconds:.1f} s at {preset.fps} fps, "
                f"{preset.width}x{preset.height}), generated in {preset.chunks_per_shot} streamed chunks; "
                f"at most {preset.max_shots} shots per story."
            )
        with gr.Accordion("Story file: import and export (reference JSON format)", open=False):
            story_json = gr.Code(language="json", label='{"global_caption": ..., "shot1": ..., ...}', lines=8)
            with gr.Row():
                upload_btn = gr.UploadButton("Upload story .json", file_types=[".json"])
                export_btn = gr.Button("Export story JSON")
                video_btn = gr.Button("Whole story as mp4")
            downloads = gr.File(label="Download", elem_id="downloads")
        with gr.Accordion("What the model understands", open=preset.name == "tiny"):
            gr.Markdown(model_help(preset.name))
        rows, labels = load_examples(preset.name)
        if rows:
            gr.Examples(rows, [setting, prompt, story_json], label="Example stories", example_labels=labels)
        gr.DeepLinkButton()

        story_outputs = [player, status, chat, session, prompt, setting]
        shot_events = dict(
            outputs=story_outputs, concurrency_id="shot", concurrency_limit=CONCURRENT_SHOTS, show_progress="minimal"
        )
        shots = [
            gr.on(
                [generate_btn.click, prompt.submit],
                studio.generate,
                [setting, prompt, seed, randomize, session],
                api_name="generate",
                **shot_events,
            ),
            regenerate_btn.click(studio.regenerate, session, api_name="regenerate", **shot_events),
            play_btn.click(studio.play, [story_json, seed, session], api_name="play", **shot_events),
        ]
        # Anything that changes the story first stops a shot in progress (its story stays untouched).
        triggers = [[generate_btn.click, prompt.submit], [regenerate_btn.click], [play_btn.click]]
        for own, trigger in zip(shots, triggers, strict=True):
            gr.on(trigger, None, cancels=[event for event in shots if event is not own])
        stop_btn.click(lambda: STOPPED, outputs=status, cancels=shots, api_name="stop")
        undo_btn.click(studio.undo, session, story_outputs, cancels=shots, api_name="undo")
        new_btn.click(studio.new_story, session, story_outputs, cancels=shots, api_name="new_story")
        export_btn.click(studio.export_json, session, [story_json, downloads], api_name="export_json")
        video_btn.click(studio.export_video, session, downloads, api_name="export_video")
        upload_btn.upload(studio.read_json_file, upload_btn, [story_json, setting], api_name="upload_json")
    return demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=CONCURRENT_OTHER)


# ---------------------------------------------------------------------------------------------------- model


def load_pipeline(model: str) -> tuple[ShotStreamPipeline, str]:
    """The pipeline for `model` ("tiny" or "shotstream") and a line for the page saying what it is."""
    device = "cuda" if torch.cuda.is_available() else "cpu"  # ZeroGPU fakes CUDA here, the worker gets the real one
    if model == "tiny":
        if (EMBEDDED_MODEL / "shotstream.json").is_file():
            pipe = ShotStreamPipeline.from_pretrained(EMBEDDED_MODEL, device=device)
            size = f"{pipe.preset.width}x{pipe.preset.height} at {pipe.preset.fps} fps"
            return pipe, (
                f"Model: the **embedded toy-world ShotStream** ({size}, shown enlarged), trained on a CPU: expect "
                "the right setting most of the time and rough shapes and colours (docs/results.md)."
            )
        about = (
            "**Untrained random weights**: the trained toy model (`assets/tiny/`) is not installed, so every shot "
            "is noise. Everything else works."
        )
        return ShotStreamPipeline.from_random("tiny", sorted(toy_vocabulary()), device=device), about
    if model != "shotstream":
        raise ValueError(f"unknown model {model!r}; choose one of {MODELS}")
    preset = get_preset(REAL_PRESET)
    try:
        from huggingface_hub import hf_hub_download, snapshot_download

        weights = os.environ.get("SHOTSTREAM_WEIGHTS") or hf_hub_download(
            preset.shotstream_repo, preset.shotstream_checkpoint
        )
        if not Path(weights).is_file():  # before building a 1.3B model around it
            raise FileNotFoundError(f"no such file: {weights}")
        base = os.environ.get("SHOTSTREAM_BASE_MODEL") or snapshot_download(
            preset.base_model_repo, allow_patterns=BASE_MODEL_FILES
        )
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        pipe = ShotStreamPipeline.from_pretrained(
            preset=REAL_PRESET, weights=weights, base_model=base, device=device, dtype=dtype
        )
    except Exception as error:  # offline, gated, missing or corrupt files: all mean "no real model here"
        raise SystemExit(
            f"Cannot load the ShotStream weights ({type(error).__name__}: {error}).\n"
            f"They come from the Hub repos {preset.shotstream_repo} ({preset.shotstream_checkpoint}) and "
            f"{preset.base_model_repo} (vae, tokenizer, text_encoder); set SHOTSTREAM_WEIGHTS and "
            "SHOTSTREAM_BASE_MODEL to local copies, or run the embedded model: python app.py --model tiny"
        ) from error
    size = f"{preset.width}x{preset.height} at {preset.fps} fps"
    about = f"Model: **ShotStream** ({preset.shotstream_repo} on {preset.base_model_repo}, {size})."
    return pipe, about


def default_model() -> str:
    return os.environ.get("SHOTSTREAM_MODEL") or ("shotstream" if os.environ.get("SPACE_ID") else "tiny")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", choices=MODELS, default=default_model(), help="$SHOTSTREAM_MODEL, else shotstream on a Space, tiny"
    )
    args = parser.parse_args(argv)
    missing = [tool for tool in ("ffmpeg", "ffprobe") if shutil.which(tool) is None]
    if missing:  # Gradio's streaming video remuxes every chunk with both
        raise SystemExit(
            f"streaming video needs {' and '.join(missing)} on PATH: `apt-get install ffmpeg` (Debian/Ubuntu)"
        )
    pipe, about = load_pipeline(args.model)
    create_demo(pipe, about).launch(max_file_size=MAX_JSON_BYTES)


if __name__ == "__main__":
    main()
